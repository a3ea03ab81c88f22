"""Builder benchmark: pipeline.build against the ceiling of its own pair generator, measured in one run.

  python -m bench.build [--sizes=10000,53400] [--full] [--before=REV] [--workers=2]

1. Ceiling: the project's pair generator in a plain single-process loop over JPEG bytes held in memory
   (decode + resize + 10 pairs + record encoding; the generator alone is printed too), per core, times the
   cores (checked by running the loop in that many processes at once). Also the before/after of the two kept optimisations: reduced-size JPEG decoding and warping
   only the kept window instead of the whole image.
2. pipeline.build on DirectRunner, multi_processing on every core, over a COCO layout cycling the real
   coco_mini JPEGs (10 pairs per image; 53,400 pairs = the 178 images x 30 = 300 pairs per image), at each
   size: end to end (process start to the build's last file written) and its ratio to the ceiling, peak RSS
   of the whole process tree. --full adds the seed's 406,700 pairs (40,670 images x 10, 12.5 GiB).
3. --before=REV runs the same builds with the code of git revision REV (extracted with git archive into
   the scratch folder), interleaved with the current code's, size by size: before / after in one run.
   Fixed start-up = the intercept of a least-squares line through (pairs, end-to-end seconds).
4. --runners=DirectRunner,DaskRunner builds every size with each runner in the same run (DaskRunner: a
   LocalCluster of --workers single-threaded worker processes, started and closed by pipeline.build),
   and prints DaskRunner's end-to-end time over DirectRunner's per size (`dask_over_direct_<pairs>`).
   `local` builds with pipeline.local_build instead (no Beam; a process pool writing the same shards):
   `direct_over_local_rate_<pairs>` = DirectRunner's pairs/s over its, what Beam itself costs.
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

from bench.common import COCO_MINI, REPO, PeakRss, headline, repeated_coco
from pipeline.dataset import schema

flags.DEFINE_list("sizes", ["10000", "53400"], "Pairs per pipeline.build run (10 per image)")
flags.DEFINE_integer("workers", os.cpu_count() or 2, "DirectRunner workers (multi_processing)")
flags.DEFINE_integer("ceiling_images", 150, "Images in the single-process ceiling loop")
flags.DEFINE_bool("full", False, "Also build the seed's 406,700 pairs (12.5 GiB on disk, deleted after; minutes)")
flags.DEFINE_string("before", None, "A git revision to compare with (e.g. the commit before a change); its "
                    "builds run beside the current code's, same sizes, same run")
flags.DEFINE_string("workdir", None, "Scratch folder (default: a temporary folder, removed at the end)")
flags.DEFINE_list("runners", ["DirectRunner"], "Runners to build with, each at every size: DirectRunner, "
                  "DaskRunner (a LocalCluster of --workers processes), local (pipeline.local_build, no Beam: "
                  "--workers processes writing the same bytes, the reference for Beam's own cost)")
FLAGS = flags.FLAGS


_VARIANTS = {  # name: (reduced decode, warp, encode)
    "baseline (full decode, whole-image warp)": (False, "warp_full_image_window", True),
    "reduced decode": (True, "warp_full_image_window", True),
    "window warp": (False, "warp_window", True),
    "both (as the pipeline runs)": (True, "warp_window", True),
    "both, generator only (no encoding)": (True, "warp_window", False),
}
PIPELINE_VARIANT = "both (as the pipeline runs)"


def loop_rate(images: list, variant: str) -> float:
    """Pairs/s of the plain single-process loop over (bytes, width, height) of real JPEGs, on one core."""
    import cv2

    from pipeline.builder import coco
    from pipeline.dataset import geometry, schema

    cv2.setNumThreads(1)  # one core, as each pipeline worker runs
    reduced, warp, encode = _VARIANTS[variant]
    config = geometry.PairConfig()
    t0, n = time.perf_counter(), 0
    for i, (data, w, h) in enumerate(images):
        src = (w, h) if reduced else (0, 0)
        image = coco.decode_resize(data, config.image_width, config.image_height, 1, src)
        for pair in geometry.generate_pairs(image, config, "train", i, warp=getattr(geometry, warp)):
            if encode:
                schema.encode(pair.patch_a, pair.patch_b, pair.offsets, pair.corners, i, pair.patch_index)
            n += 1
    return n / (time.perf_counter() - t0)


def ceiling(images: list) -> dict:
    """Pairs/s of one core for each variant (the other cores idle)."""
    rates = {}
    for name in _VARIANTS:
        rates[name] = loop_rate(images, name)
        print(f"  ceiling, 1 core, {name:<40} {rates[name]:8.0f} pairs/s")
    return rates


def concurrent_ceiling(images: list, processes: int) -> float:
    """The pipeline's loop in `processes` processes at once (forked, images already in memory), summed:
    checks that the ceiling's `per core x cores` holds on this machine (shared caches, vCPUs)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.starmap(loop_rate, [(images, PIPELINE_VARIANT)] * processes))


def runner_args(runner: str, workers: int) -> list:
    """pipeline.build's runner flags for `workers` processes on this machine."""
    if runner == "local":  # pipeline.local_build: no Beam, a process pool writing the same bytes
        return [f"--workers={workers}"]
    if runner == "DaskRunner":  # a LocalCluster of single-threaded processes, as DirectRunner's workers
        return ["--runner=DaskRunner", f"--dask_local_workers={workers}"]
    return ["--runner=DirectRunner", f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]


def runner_variants(codes: dict) -> list:
    """(name, code tree, runner) per build variant: DirectRunner keeps the code's name, others get a suffix."""
    return [(name if runner == "DirectRunner" else f"{name}_{runner.removesuffix('Runner').lower()}", code, runner)
            for name, code in codes.items() for runner in FLAGS.runners
            if runner != "local" or name == "after"]  # the reference: the current code's no-Beam builder


def build_module(runner: str) -> str:
    return "pipeline.local_build" if runner == "local" else "pipeline.build"


def run_build(coco_dir: pathlib.Path, out: pathlib.Path, workers: int, code_dir: pathlib.Path = REPO,
              runner: str = "DirectRunner") -> dict:
    """One pipeline.build in a subprocess (run from code_dir's tree); end to end = process start to the
    newest mtime in out (the metadata a build writes last). code_dir may hold code from before the index
    moved to schema.INDEX (--before): its index is then dataset_info.json."""
    cmd = [sys.executable, "-m", build_module(runner), f"--coco_dir={coco_dir}", f"--output_dir={out}",
           "--splits=train=train2017", "--overwrite"] + runner_args(runner, workers)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(code_dir))
    os.sync()  # every run starts with no dirty pages of earlier ones to write back (large builds are disk-bound)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=code_dir)
    with PeakRss(proc.pid) as rss:
        output, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"bench.build: {build_module(runner)} failed:\n{output[-3000:]}")
    index = out / schema.INDEX if (out / schema.INDEX).exists() else out / "dataset_info.json"
    with open(index) as f:
        info = json.load(f)
    end_to_end = max(p.stat().st_mtime for p in out.iterdir()) - t0
    n = info["splits"]["train"]["num_examples"]
    size = sum(p.stat().st_size for p in out.glob("*.tfrecord-*"))
    shutil.rmtree(out, ignore_errors=True)
    return {"pairs": n, "wall": wall, "end_to_end": end_to_end, "pipeline_seconds": info["build"]["seconds"],
            "peak_rss": rss.peak, "bytes": size}


def startup_fit(runs: list) -> tuple:
    """Least squares end_to_end = startup + pairs / rate over the runs: (startup s, marginal pairs/s)."""
    import numpy as np

    if len(runs) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit([r["pairs"] for r in runs], [r["end_to_end"] for r in runs], 1)
    return float(intercept), float(1 / slope)


def code_tree(rev: str, work: pathlib.Path) -> pathlib.Path:
    """The repository at rev, extracted (git archive: no checkout, the working tree is untouched)."""
    dest = work / f"code_{rev.replace('/', '_')}"
    if not dest.exists():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main(argv):
    del argv
    if not COCO_MINI.exists():
        sys.exit(f"bench.build: {COCO_MINI} is missing")
    work = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="bench_build_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sizes = [int(x) for x in FLAGS.sizes] + ([406700] if FLAGS.full else [])
        codes = {"after": REPO}
        if FLAGS.before:
            codes = {"before": code_tree(FLAGS.before, work), "after": REPO}
        print(f"machine: {os.cpu_count()} cores; workers: {FLAGS.workers}; sizes: {sizes}; "
              f"code: {', '.join(f'{k}={v}' for k, v in codes.items())}")
        with open(COCO_MINI / "annotations" / "instances_train2017.json") as f:
            entries = sorted(json.load(f)["images"], key=lambda im: im["id"])[:FLAGS.ceiling_images]
        images = [((COCO_MINI / "train2017" / e["file_name"]).read_bytes(), e["width"], e["height"]) for e in entries]
        rates = ceiling(images)
        per_core = rates[PIPELINE_VARIANT]
        ceil = per_core * FLAGS.workers
        together = concurrent_ceiling(images, FLAGS.workers)
        print(f"  ceiling = {per_core:.0f} pairs/s/core x {FLAGS.workers} = {ceil:.0f} pairs/s "
              f"(the loop in {FLAGS.workers} processes at once: {together:.0f} pairs/s, "
              f"{together / ceil:.2f} of it)")
        figures = {
            "ceiling_pairs_per_s": ceil,
            "concurrent_loop_pairs_per_s": together,
            "concurrent_loop_over_ceiling": together / ceil,
            "ceiling_per_core_pairs_per_s": per_core,
            "generator_only_per_core_pairs_per_s": rates["both, generator only (no encoding)"],
            "baseline_per_core_pairs_per_s": rates["baseline (full decode, whole-image warp)"],
            "optimisation_speedup": per_core / rates["baseline (full decode, whole-image warp)"],
        }
        runs = {name: [] for name, _, _ in runner_variants(codes)}
        for pairs in sizes:
            coco_dir = repeated_coco(work / f"coco_{pairs}", -(-pairs // 10))
            for name, code, runner in runner_variants(codes):
                r = run_build(coco_dir, work / "out", FLAGS.workers, code, runner)
                runs[name].append(r)
                print(f"  {name:<6} {build_module(runner):<20} {r['pairs']:7d} pairs: end to end {r['end_to_end']:7.1f} s "
                      f"({r['pairs'] / r['end_to_end']:5.0f} pairs/s, {r['pairs'] / r['end_to_end'] / ceil:.2f} of "
                      f"the ceiling; beyond the ceiling's time: {r['end_to_end'] - r['pairs'] / ceil:5.1f} s), "
                      f"process exit {r['wall']:.1f} s, peak RSS {r['peak_rss'] / 2**20:5.0f} MiB, "
                      f"{r['bytes'] / 2**30:.2f} GiB", flush=True)
                figures[f"{name}_{pairs}_end_to_end_s"] = r["end_to_end"]
                figures[f"{name}_{pairs}_over_ceiling"] = r["pairs"] / r["end_to_end"] / ceil
                figures[f"{name}_{pairs}_peak_rss_mib"] = r["peak_rss"] / 2**20
            shutil.rmtree(coco_dir, ignore_errors=True)
        for name, rs in runs.items():
            startup, marginal = startup_fit(rs)
            figures[f"{name}_fixed_startup_s"] = startup
            figures[f"{name}_marginal_pairs_per_s"] = marginal
            figures[f"{name}_marginal_over_ceiling"] = marginal / ceil
        if "DaskRunner" in FLAGS.runners and "DirectRunner" in FLAGS.runners:
            for pairs in sizes:  # the goal: DaskRunner within 1.5x of DirectRunner on the same cores
                figures[f"dask_over_direct_{pairs}"] = (figures[f"after_dask_{pairs}_end_to_end_s"]
                                                       / figures[f"after_{pairs}_end_to_end_s"])
        if "local" in FLAGS.runners and "DirectRunner" in FLAGS.runners:
            for pairs in sizes:  # Beam's share: the Beam build's rate over the no-Beam builder's, same bytes
                figures[f"direct_over_local_rate_{pairs}"] = (figures[f"after_local_{pairs}_end_to_end_s"]
                                                             / figures[f"after_{pairs}_end_to_end_s"])
        headline(figures)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
