"""Builder benchmark: pipeline.build against the ceiling of its own pair generator, measured in one run.

  python -m bench.build [--pairs=20000] [--workers=2] [--full]

1. Ceiling: the project's pair generator in a plain single-process loop over JPEG bytes held in memory
   (decode + resize + 10 pairs + record encoding; the generator alone is printed too), per core, times the
   cores. Also the before/after of the two kept optimisations: reduced-size JPEG decoding and warping
   only the kept window instead of the whole image.
2. pipeline.build on DirectRunner, multi_processing on every core, over a COCO layout cycling the real
   coco_mini JPEGs, at two sizes (pairs/4 and pairs): pairs/s and peak RSS of the whole process tree.
3. --full: the seed's 406,700-pair build (40,670 images x 10) on this machine: wall time and peak RSS.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench.common import COCO_MINI, PeakRss, headline, repeated_coco

flags.DEFINE_integer("pairs", 20000, "Pairs in the main pipeline run (the small run is a quarter of it)")
flags.DEFINE_integer("workers", os.cpu_count() or 2, "DirectRunner workers (multi_processing)")
flags.DEFINE_integer("ceiling_images", 150, "Images in the single-process ceiling loop")
flags.DEFINE_bool("full", False, "Also build the seed's 406,700 pairs (13 GB on disk; minutes)")
flags.DEFINE_string("workdir", None, "Scratch folder (default: a temporary folder, removed at the end)")
FLAGS = flags.FLAGS


def ceiling(images: list) -> dict:
    """Pairs/s of one core for each variant, over (bytes, width, height) of real JPEGs."""
    import cv2

    from pipeline import coco, geometry, schema

    cv2.setNumThreads(1)  # one core, as each pipeline worker runs
    config = geometry.PairConfig()
    variants = {
        "baseline (full decode, whole-image warp)": (False, geometry.warp_full_image_window, True),
        "reduced decode": (True, geometry.warp_full_image_window, True),
        "window warp": (False, geometry.warp_window, True),
        "both (as the pipeline runs)": (True, geometry.warp_window, True),
        "both, generator only (no encoding)": (True, geometry.warp_window, False),
    }
    rates = {}
    for name, (reduced, warp, encode) in variants.items():
        t0, n = time.perf_counter(), 0
        for i, (data, w, h) in enumerate(images):
            src = (w, h) if reduced else (0, 0)
            image = coco.decode_resize(data, config.image_width, config.image_height, 1, src)
            for pair in geometry.generate_pairs(image, config, "train", i, warp=warp):
                if encode:
                    schema.encode(pair.patch_a, pair.patch_b, pair.offsets, pair.corners, i, pair.patch_index)
                n += 1
        rates[name] = n / (time.perf_counter() - t0)
        print(f"  ceiling, 1 core, {name:<40} {rates[name]:8.0f} pairs/s")
    return rates


def run_build(coco_dir: pathlib.Path, out: pathlib.Path, workers: int) -> dict:
    """One pipeline.build in a subprocess; returns its dataset_info plus wall time and peak tree RSS."""
    cmd = [sys.executable, "-m", "pipeline.build", f"--coco_dir={coco_dir}", f"--output_dir={out}",
           "--splits=train=train2017", "--overwrite", "--runner=DirectRunner",
           f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    with PeakRss(proc.pid) as rss:
        output, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"bench.build: pipeline.build failed:\n{output[-3000:]}")
    with open(out / "dataset_info.json") as f:
        info = json.load(f)
    n = info["splits"]["train"]["num_examples"]
    size = sum(p.stat().st_size for p in out.glob("*.tfrecord-*"))
    print(f"  pipeline.build {n:7d} pairs: {wall:7.1f} s wall ({info['build']['seconds']} s in the pipeline), "
          f"{n / wall:6.0f} pairs/s wall, {n / info['build']['seconds']:6.0f} pairs/s in pipeline, "
          f"peak RSS {rss.peak / 2**20:6.0f} MiB, {size / 2**30:.2f} GiB on disk")
    return {"pairs": n, "wall": wall, "pipeline_seconds": info["build"]["seconds"], "peak_rss": rss.peak,
            "bytes": size}


def main(argv):
    del argv
    if not COCO_MINI.exists():
        sys.exit(f"bench.build: {COCO_MINI} is missing")
    work = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="bench_build_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"machine: {os.cpu_count()} cores; workers: {FLAGS.workers}")
        with open(COCO_MINI / "annotations" / "instances_train2017.json") as f:
            entries = sorted(json.load(f)["images"], key=lambda im: im["id"])[:FLAGS.ceiling_images]
        images = [((COCO_MINI / "train2017" / e["file_name"]).read_bytes(), e["width"], e["height"]) for e in entries]
        rates = ceiling(images)
        per_core = rates["both (as the pipeline runs)"]
        ceil = per_core * FLAGS.workers
        print(f"  ceiling = {per_core:.0f} pairs/s/core x {FLAGS.workers} = {ceil:.0f} pairs/s")

        small = run_build(repeated_coco(work / "coco_small", FLAGS.pairs // 40), work / "out_small", FLAGS.workers)
        big = run_build(repeated_coco(work / "coco", FLAGS.pairs // 10), work / "out", FLAGS.workers)
        shutil.rmtree(work / "out_small", ignore_errors=True)
        figures = {
            "ceiling_pairs_per_s": ceil,
            "ceiling_per_core_pairs_per_s": per_core,
            "generator_only_per_core_pairs_per_s": rates["both, generator only (no encoding)"],
            "baseline_per_core_pairs_per_s": rates["baseline (full decode, whole-image warp)"],
            "optimisation_speedup": per_core / rates["baseline (full decode, whole-image warp)"],
            "pipeline_pairs_per_s": big["pairs"] / big["pipeline_seconds"],
            "pipeline_pairs_per_s_wall": big["pairs"] / big["wall"],
            "pipeline_over_ceiling": big["pairs"] / big["pipeline_seconds"] / ceil,
            # The two sizes differ only in data, so their difference removes the fixed start-up cost.
            "pipeline_marginal_pairs_per_s": (big["pairs"] - small["pairs"]) / (big["pipeline_seconds"] - small["pipeline_seconds"]),
            "pipeline_marginal_over_ceiling": (big["pairs"] - small["pairs"])
            / (big["pipeline_seconds"] - small["pipeline_seconds"]) / ceil,
            "peak_rss_mib_small": small["peak_rss"] / 2**20,
            "peak_rss_mib_large": big["peak_rss"] / 2**20,
            "peak_rss_ratio_large_over_small": big["peak_rss"] / small["peak_rss"],
            "data_ratio_large_over_small": big["bytes"] / small["bytes"],
            "projected_406700_pairs_minutes": 406700 / (big["pairs"] / big["wall"]) / 60,
        }
        shutil.rmtree(work / "out", ignore_errors=True)
        if FLAGS.full:
            full = run_build(repeated_coco(work / "coco_full", 40670), work / "out_full", FLAGS.workers)
            figures.update(full_pairs=full["pairs"], full_minutes=full["wall"] / 60,
                           full_pairs_per_s=full["pairs"] / full["pipeline_seconds"],
                           full_over_ceiling=full["pairs"] / full["pipeline_seconds"] / ceil,
                           full_peak_rss_mib=full["peak_rss"] / 2**20, full_gib_on_disk=full["bytes"] / 2**30)
        headline(figures)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
