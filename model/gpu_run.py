"""One command for a bare GPU box: build the pairs, train both networks under a time budget, evaluate, report.

On the box, from the project root (the working tree and gpu_bundle/ travel together; see model/gpu_bundle.py):

  python3 -m model.gpu_run --bundle_dir=gpu_bundle --output_dir=OUT [--minutes=3 --architectures=compact,homographynet]

The box has Python 3.12, JAX, numpy, OpenCV, protobuf and absl-py, but no TensorFlow, no Beam and no network:
  1. keras, google-crc32c and pycocotools come from the bundle's wheels where the box lacks them (installed
     into OUT/../gpu_work/site); the backend is JAX unless KERAS_BACKEND says otherwise.
  2. The pairs are written by pipeline.local_build from the bundle's resized images: the same records, byte
     for byte, as pipeline.build on the original COCO images with the same flags. Two datasets: `train`
     (--patches_per_image pairs per training image, plus a validation split for the curves) and `eval`
     (the validation images at 10 pairs each, seed 0: the same validation pairs as the CPU figures in
     BUILD_NOTES.md, so runs on any machine compare).
  3. Each network trains with model.train (Keras on JAX, reader without TensorFlow) for --minutes of wall
     clock (model.train's --max_minutes), bfloat16 and XLA on a GPU.
  4. model.evaluate scores each network beside identity, ORB and SIFT on the eval pairs.
OUT gets summary.json and summary.md (device, pairs/s, MACE mean / median / p90 per method), and per
network its report, curves and run record; the weights of networks under 16 MiB (what comes back from the
box) as model.keras.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from pipeline.runtime import cli

EVAL_PAIRS_PER_IMAGE = 10  # the standard validation pairs: coco val2017 x 10, seed 0
MAX_BROUGHT_BACK = 16 * 2**20
CLASSICAL = ("identity", "orb", "sift")
COPIED = ("config.json", "history.csv", "history.json", "mace.png", "model.keras")


class RecipeError(ValueError):
    """The recipe cannot run; the message names the problem."""


NEEDED = ("keras", "google_crc32c", "pycocotools")  # modules the box may lack; the bundle carries their wheels


def ensure_packages(bundle_dir: str, site_dir: str) -> list:
    """Makes NEEDED importable: as installed, else from the bundle's wheels (installed into site_dir, which
    goes last on sys.path so the box's own packages win). Returns the modules that came from the bundle."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        wheels = sorted(glob.glob(os.path.join(bundle_dir, "wheels", "*.whl")))
        if not wheels:
            raise RecipeError(f"{', '.join(missing)} not installed and {bundle_dir}/wheels holds no wheels "
                              f"(prepare the bundle with python -m model.gpu_bundle)")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--target", site_dir, *wheels], capture_output=True, text=True)
        if done.returncode:
            raise RecipeError(f"installing the bundle's wheels failed: {done.stderr.strip()[-300:]}")
        sys.path.append(site_dir)
        importlib.invalidate_caches()
        still = [m for m in missing if importlib.util.find_spec(m) is None]
        if still:
            raise RecipeError(f"the bundle's wheels do not provide {', '.join(still)}")
    return missing


def device_text() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return ", ".join(sorted({f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.devices()}))
    return keras.backend.backend()


def on_gpu() -> bool:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    return False


def build_data(bundle_dir: str, work_dir: str, manifest: dict, patches_per_image: int, max_images: int,
               rho: int, workers: int) -> tuple[str, str]:
    """(training dataset, evaluation dataset), built by the local builder from the bundle's images."""
    from pipeline import local_build
    from pipeline.dataset.geometry import PairConfig

    common = dict(image_width=manifest["image_width"], image_height=manifest["image_height"],
                  channels=manifest["channels"], rho=rho, seed=0)
    coco_dir = os.path.join(bundle_dir, "coco")
    train_dir, eval_dir = os.path.join(work_dir, "train_data"), os.path.join(work_dir, "eval_data")
    splits = manifest["splits"]
    local_build.build(coco_dir, train_dir, splits, PairConfig(patches_per_image=patches_per_image, **common),
                      max_images=max_images, overwrite=True, workers=workers)
    local_build.build(coco_dir, eval_dir, {"validation": splits["validation"]},
                      PairConfig(patches_per_image=EVAL_PAIRS_PER_IMAGE, **common), max_images=max_images,
                      overwrite=True, workers=workers)
    return train_dir, eval_dir


def train_one(architecture: str, train_dir: str, run_dir: str, minutes: float, steps: int, batch_size: int,
              gpu: bool) -> dict:
    from model import train

    t0 = time.time()
    result = train.train(train_dir, run_dir, architecture=architecture, steps=steps, batch_size=batch_size,
                         optimizer="adam", learning_rate=1e-3, lr_decay_steps=max(steps // 3, 1),
                         lr_decay_factor=0.3, dropout=False, max_minutes=minutes,
                         mixed_precision="bfloat16" if gpu else "none", jit_compile=gpu,
                         val_every=max(steps // 20, 1), val_batches=8, log_every=max(steps // 100, 1),
                         checkpoint_every=max(steps // 10, 1))
    with open(os.path.join(run_dir, "history.json")) as f:
        history = json.load(f)
    rates = sorted(r["examples_per_sec"] for r in history[1:] if r.get("examples_per_sec")) or \
        [r["examples_per_sec"] for r in history if r.get("examples_per_sec")]
    return {"steps": result["final_step"], "wall_s": round(time.time() - t0, 1),
            "train_pairs_per_s": round(rates[len(rates) // 2], 1) if rates else None,
            "last_val_mace": (result.get("last") or {}).get("val_mace")}


def recipe(bundle_dir: str, output_dir: str, *, minutes: float = 3.0, architectures=("compact", "homographynet"),
        patches_per_image: int = 1000, max_images: int = 0, rho: int = 32, steps: int = 100000,
        batch_size: int = 64, workers: int = 0, work_dir: str | None = None, log=print) -> dict:
    from model import gpu_bundle

    manifest = gpu_bundle.read_manifest(bundle_dir)
    work_dir = work_dir or os.path.join(os.path.dirname(os.path.abspath(output_dir)), "gpu_work")
    os.makedirs(output_dir, exist_ok=True)
    from_bundle = ensure_packages(bundle_dir, os.path.join(work_dir, "site"))
    gpu = on_gpu()
    summary = {"device": device_text(), "keras_backend": os.environ["KERAS_BACKEND"], "from_bundle": from_bundle,
               "bundle": manifest["splits"], "patches_per_image": patches_per_image, "minutes_per_network": minutes,
               "networks": {}, "methods": {}}
    log(f"device: {summary['device']}; building pairs from {bundle_dir}")
    t0 = time.time()
    train_dir, eval_dir = build_data(bundle_dir, work_dir, manifest, patches_per_image, max_images, rho,
                                     workers or os.cpu_count() or 1)
    summary["build_s"] = round(time.time() - t0, 1)
    from model import evaluate

    for i, arch in enumerate(architectures):
        run_dir = os.path.join(work_dir, "runs", arch)
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: the budget is the experiment
        log(f"training {arch} for {minutes} min")
        net = train_one(arch, train_dir, run_dir, minutes, steps, batch_size, gpu)
        report_dir = os.path.join(output_dir, arch)
        methods = (list(CLASSICAL) if i == 0 else []) + ["network"]
        report = evaluate.evaluate(eval_dir, "validation", report_dir, model_dir=run_dir, methods=methods,
                                   num_visualizations=3)
        net["validation"] = report["methods"]["network"]
        net["parameters"] = _parameters(arch, manifest)
        for name in CLASSICAL:
            if name in report["methods"]:
                summary["methods"][name] = report["methods"][name]
        for name in COPIED:
            src = os.path.join(run_dir, name)
            if os.path.exists(src) and os.path.getsize(src) <= MAX_BROUGHT_BACK:
                shutil.copy(src, os.path.join(report_dir, name))
        summary["networks"][arch] = net
        log(f"{arch}: {net['steps']} steps, {net['train_pairs_per_s']} pairs/s, validation MACE "
            f"{net['validation']['mean_mace']} px (median {net['validation']['median_mace']})")
    summary["num_eval_pairs"] = report["num_pairs"]
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(markdown(summary))
    return summary


def _parameters(architecture: str, manifest: dict) -> int:
    from model import network

    return network.build(architecture, 128, manifest["channels"], dropout=False).count_params()


def markdown(s: dict) -> str:
    lines = [f"# GPU recipe: {s['device']} (Keras on {s['keras_backend']})", "",
             f"{s['num_eval_pairs']} validation pairs (val2017 x {EVAL_PAIRS_PER_IMAGE}, seed 0); training pairs: "
             f"{s['patches_per_image']} per training image, built in {s['build_s']} s; "
             f"{s['minutes_per_network']} min of training per network.", "",
             "| method | parameters | steps | train pairs/s | mean MACE (px) | median | p90 |", "|---|---|---|---|---|---|---|"]
    for name, n in s["networks"].items():
        v = n["validation"]
        lines.append(f"| {name} | {n['parameters']} | {n['steps']} | {n['train_pairs_per_s']} | {v['mean_mace']} | "
                     f"{v['median_mace']} | {v['p90_mace']} |")
    for name, m in s["methods"].items():
        lines.append(f"| {name} | | | | {m['mean_mace']} | {m['median_mace']} | {m['p90_mace']} |")
    return "\n".join(lines) + "\n"


def _define_flags():
    from absl import flags

    flags.DEFINE_string("bundle_dir", "gpu_bundle", "The bundle made by python -m model.gpu_bundle")
    flags.DEFINE_string("output_dir", None, "Where summary.json/.md, the reports, curves and small weights go")
    flags.DEFINE_string("work_dir", None, "Datasets and full run directories (default: gpu_work beside output_dir)")
    flags.DEFINE_float("minutes", 3.0, "Wall-clock training budget per network")
    flags.DEFINE_list("architectures", ["compact", "homographynet"], "Networks to train, in order")
    flags.DEFINE_integer("patches_per_image", 1000, "Training pairs per training image")
    flags.DEFINE_integer("max_images", 0, "Use only the first N images of each split (0 = all; tests)")
    flags.DEFINE_integer("steps", 100000, "Step cap (the wall-clock budget normally ends a run first)")
    flags.DEFINE_integer("batch_size", 64, "Batch size")
    flags.DEFINE_integer("workers", 0, "Builder processes (0 = one per core)")


def main(argv):
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        return cli.fail("model.gpu_run", f"unexpected arguments: {' '.join(argv[1:])}")
    if not f.output_dir:
        return cli.fail("model.gpu_run", "--output_dir is required")
    if f.minutes <= 0 or f.patches_per_image <= 0:
        return cli.fail("model.gpu_run", "--minutes and --patches_per_image must be positive")
    try:
        s = recipe(f.bundle_dir, f.output_dir, minutes=f.minutes, architectures=f.architectures,
                patches_per_image=f.patches_per_image, max_images=f.max_images, steps=f.steps,
                batch_size=f.batch_size, workers=f.workers, work_dir=f.work_dir)
    except ValueError as e:  # RecipeError, BundleError, LocalBuildError, TrainError, DatasetError
        return cli.fail("model.gpu_run", str(e))
    print(markdown(s))
    return 0


def run():
    cli.run("model.gpu_run", main, _define_flags)


if __name__ == "__main__":
    run()
