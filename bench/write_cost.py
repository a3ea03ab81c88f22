"""What writing the shards costs on this machine, without Beam: the builder's own loop, with and without files.

  python -m bench.write_cost [--dest=DIR] [--shards=40] [--workers=2] [--images_per_shard=203]

Each of --workers processes runs pipeline.builder.shards.write_shard over --shards shards of real coco_mini JPEGs
(cycled; 203 images x 10 pairs = the seed's build's ~67 MB shards), once into /dev/null and once into
files under --dest (removed after). Printed: the mean seconds per shard in each fifth of the run, the
pairs/s of all processes together, and the ratio files / /dev/null. A rate that falls once a few GiB have
been written is the machine's cost of new page-cache pages, not the builder's: /dev/null stays flat.
"""
from __future__ import annotations

import multiprocessing
import os
import pathlib
import shutil
import tempfile
import time

from absl import app, flags

from bench.common import headline, repeated_coco

flags.DEFINE_string("dest", None, "Folder for the files (default: a temporary folder on the system disk)")
flags.DEFINE_integer("shards", 40, "Shards per process")
flags.DEFINE_integer("workers", os.cpu_count() or 2, "Processes writing at once")
flags.DEFINE_integer("images_per_shard", 203, "Images per shard (10 pairs each)")
FLAGS = flags.FLAGS


def _write(args) -> list:
    """Seconds per shard of one process; shard k of process p holds images [(p * shards + k) * n, ...)."""
    import cv2

    from pipeline.builder import coco, shards
    from pipeline.dataset import geometry

    coco_dir, target, proc, num_shards, n = args
    cv2.setNumThreads(1)
    config = geometry.PairConfig()
    images, _ = coco.list_split(coco_dir, "train2017")
    times = []
    for k in range(num_shards):
        first = (proc * num_shards + k) * n
        path = os.devnull if target is None else os.path.join(target, f"p{proc}-s{k:05d}")
        t0 = time.perf_counter()
        with shards.create_shard(path) as writer:
            shards.write_shard(writer, images[first:first + n], config, "train")
        times.append(time.perf_counter() - t0)
    return times


def run(coco_dir: str, target, workers: int, num_shards: int, n: int) -> list:
    os.sync()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_write, [(coco_dir, target, p, num_shards, n) for p in range(workers)])


def main(argv):
    del argv
    from pipeline.builder import coco, shards  # noqa: F401 (imported once, before the pool forks)
    from pipeline.dataset import geometry  # noqa: F401 (imported once, before the pool forks)

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_write_cost_", dir=FLAGS.dest))
    try:
        n, w, s = FLAGS.images_per_shard, FLAGS.workers, FLAGS.shards
        coco_dir = str(repeated_coco(work / "coco", n * w * s))
        pairs = n * 10 * w * s
        print(f"{w} processes x {s} shards x {n * 10} pairs (~{pairs * 32972 / 2**30:.1f} GiB in all)")
        figures = {}
        for label, target in (("devnull", None), ("files", str(work / "out"))):
            if target:
                os.makedirs(target)
            t0 = time.perf_counter()
            times = run(coco_dir, target, w, s, n)
            wall = time.perf_counter() - t0
            bounds = [(i * s // 5, (i + 1) * s // 5) for i in range(5)]
            fifths = [sum(sum(t[lo:hi]) for t in times) / (w * (hi - lo)) for lo, hi in bounds]
            print(f"  {label:<8} {pairs / wall:6.0f} pairs/s; s per shard by fifth of the run: "
                  + " ".join(f"{x:.2f}" for x in fifths), flush=True)
            figures[f"{label}_pairs_per_s"] = pairs / wall
            figures[f"{label}_first_fifth_s_per_shard"] = fifths[0]
            figures[f"{label}_last_fifth_s_per_shard"] = fifths[-1]
            if target:
                shutil.rmtree(target)
        figures["files_over_devnull"] = figures["files_pairs_per_s"] / figures["devnull_pairs_per_s"]
        headline(figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
