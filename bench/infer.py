"""Inference benchmark: milliseconds per pair of every method and its refined variant (X and X+ecc), in one
process and over a pool of every core, on the same validation pairs, in one run; and the network alone at
batch 1 and batch 64.

  python -m bench.infer [--data_dir=OUT] [--model_dir=RUN] [--pairs=128] [--methods=...] [--workers=0]

Each method is timed alone (model.estimators.registry.run on one method: nothing shared with another), so
its figure includes its parts (sift+ecc includes SIFT). The pool is started and warmed before timing.
Timing does not depend on the weights: without --model_dir the network is the untrained architecture.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
import time

from absl import app, flags

from bench.common import dataset_dir, headline

BASES = ("identity", "orb_default", "orb", "sift", "ecc", "network", "network_tta", "sift_or_network")
DEFAULT_METHODS = [m for b in BASES for m in (b, b + "+ecc")] + ["auto"]

flags.DEFINE_string("data_dir", None, "A built dataset (default: coco_mini built into a temporary folder)")
flags.DEFINE_string("model_dir", None, "A training run (default: an untrained HomographyNet)")
flags.DEFINE_integer("pairs", 128, "Validation pairs timed per method")
flags.DEFINE_list("methods", DEFAULT_METHODS, "Methods to time (any name of model.estimators.registry)")
flags.DEFINE_integer("workers", 0, "Processes of the pool figures (0: every core)")
FLAGS = flags.FLAGS


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv):
    del argv
    import cv2

    from model import network
    from model.estimators import parallel, registry
    from model.training import data

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_infer_"))
    data_dir = dataset_dir(FLAGS.data_dir, work)
    cfg = data.dataset_config(data_dir, "validation")
    batch = next(iter(data.parsed_batches(data_dir, "validation", FLAGS.pairs)))
    a, b = batch["patch_a"], batch["patch_b"]
    n, workers = len(a), FLAGS.workers or parallel.default_workers()
    print(f"machine: {os.cpu_count()} cores, OpenCV threads {cv2.getNumThreads()}, load {os.getloadavg()[0]:.1f}; "
          f"{n} validation pairs of {cfg.patch_size}x{cfg.patch_size}x{cfg.channels}; pool of {workers} processes")
    if FLAGS.model_dir:
        model, run = network.load(FLAGS.model_dir)
        rho = float(run["rho"])
    else:
        model, rho = network.build("homographynet", cfg.patch_size, cfg.channels), float(cfg.rho)
    seconds = {}
    for bs in (1, 64):
        network.predict_offsets(model, a[:bs], b[:bs], rho, batch_size=bs)  # warm up / trace
        seconds[f"network_batch{bs}"] = _time(lambda: network.predict_offsets(model, a, b, rho, batch_size=bs)) / n
    registry.check(FLAGS.methods, with_network=True)
    figures = {}
    with parallel.Pool(workers) as pool:
        parallel.run_jobs([("classical", "sift", a[i], b[i], False) for i in range(2 * workers)], pool)  # start it
        for name in FLAGS.methods:
            row = {}
            for label, p in (("one", None), ("pool", pool)):
                ctx = registry.Context(model=model, rho=rho, patch_size=cfg.patch_size, channels=cfg.channels, pool=p)
                row[label] = _time(lambda: registry.run([name], a, b, ctx)) / n
            figures[name] = row
            print(f"  {name:<22} {1000 * row['one']:8.2f} ms/pair in one process   "
                  f"{1000 * row['pool']:8.2f} ms/pair over {workers} processes")
    for name, s in seconds.items():
        print(f"  {name:<22} {1000 * s:8.2f} ms/pair")
    out = {f"{k}_ms_per_pair": 1000 * v for k, v in seconds.items()}
    for name, row in figures.items():
        out[f"{name}_ms_per_pair"] = 1000 * row["one"]
        out[f"{name}_ms_per_pair_pool"] = 1000 * row["pool"]
    headline(out)


if __name__ == "__main__":
    app.run(main)
