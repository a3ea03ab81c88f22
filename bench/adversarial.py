"""Issue 24's promises run the way a hostile user would: 165 variants of bad input, each command run as a
user runs it (python -m ...), each result classified.

  python -m bench.adversarial [--work=/tmp/adversarial] [--only=SUBSTRING,...] [--skip=N] [--keep]
  (ADVERSARIAL_REPO=CHECKOUT tests another checkout; ADVERSARIAL_COCO=DIR another COCO sample)

A variant that expects a refusal passes with exit status 2, one line `<command>: error: ...`, no traceback
(or, for the audit's damaged shards, its report with exit status 1, as documented), and the files it was
pointed at unchanged (byte for byte, nothing added or removed); one that expects to work
passes with exit status 0 and the right result. Anything else is a failure: `traceback`, `exit 0` (a wrong
number or a write that should have been refused), `exit N`, `changed` (files touched by a refusal) or
`wrong` (an expected success with a wrong result). Builds its own tiny fixtures first (a COCO copy of 50
images, three datasets of 32 and 64 px, two runs, two reports: 1-3 minutes on 2 shared cores), then runs
the variants (about 20 minutes there: most import TensorFlow). Nothing outside --work is written; the COCO sample is read, never written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

# The checkout under test (this one unless named) and the COCO sample beside it (../shared/data/coco_mini).
REPO = os.environ.get("ADVERSARIAL_REPO", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO_MINI = os.environ.get("ADVERSARIAL_COCO", os.path.join(REPO, "..", "shared", "data", "coco_mini"))
TINY = ["--patch_size=32", "--rho=8", "--image_width=80", "--image_height=60", "--patches_per_image=4",
        "--max_images=8", "--num_shards=2"]
SMALL = ["--patch_size=32", "--rho=8", "--image_width=80", "--image_height=60", "--patches_per_image=2",
         "--max_images=2", "--num_shards=1", "--splits=validation=val2017"]
TRAIN = ["--architecture=compact", "--steps=2", "--batch_size=8", "--val_every=0", "--checkpoint_every=2",
         "--log_every=2", "--steps_per_loop=1", "--shuffle_buffer=16"]


def sh(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def base(work: str) -> dict:
    """The fixtures every variant copies from (built once per --work)."""
    b = {k: os.path.join(work, "base", k) for k in ("coco", "ds", "ds_cam", "ds64", "run", "run64", "rep_clean",
                                                    "rep_cam")}
    if os.path.exists(os.path.join(b["rep_cam"], "mace_report.json")):
        return b
    shutil.rmtree(os.path.join(work, "base"), ignore_errors=True)
    os.makedirs(b["coco"])
    for part in ("val2017", "annotations"):
        shutil.copytree(os.path.join(COCO_MINI, part), os.path.join(b["coco"], part),
                        ignore=shutil.ignore_patterns("*train2017*"))
    os.makedirs(os.path.join(b["coco"], "train2017"))
    for name in sorted(os.listdir(os.path.join(COCO_MINI, "train2017")))[:8]:
        shutil.copy(os.path.join(COCO_MINI, "train2017", name), os.path.join(b["coco"], "train2017"))
    shutil.copy(os.path.join(COCO_MINI, "annotations", "instances_train2017.json"),
                os.path.join(b["coco"], "annotations"))
    steps = [("pipeline.local_build", f"--coco_dir={COCO_MINI}", f"--output_dir={b['ds']}", *TINY),
             ("pipeline.local_build", f"--coco_dir={COCO_MINI}", f"--output_dir={b['ds_cam']}", *TINY,
              "--photometric=camera", "--splits=validation=val2017"),
             ("pipeline.local_build", f"--coco_dir={COCO_MINI}", f"--output_dir={b['ds64']}", "--patch_size=64",
              "--rho=8", "--image_width=100", "--image_height=90", "--patches_per_image=4", "--max_images=8",
              "--num_shards=2"),
             ("model.train", f"--data_dir={b['ds']}", f"--model_dir={b['run']}", *TRAIN),
             ("model.train", f"--data_dir={b['ds64']}", f"--model_dir={b['run64']}", *TRAIN),
             *[("model.evaluate", f"--data_dir={b[d]}", f"--model_dir={b['run']}", f"--output_dir={b[r]}",
                "--methods=identity,network", "--num_visualizations=0", "--workers=1")
               for d, r in (("ds", "rep_clean"), ("ds_cam", "rep_cam"))]]
    for module, *args in steps:
        done = sh(module, *args)
        if done.returncode:
            raise SystemExit(f"fixture {module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return b


def snapshot(path: str) -> dict:
    """Every entry below path (links not followed) with a digest of its bytes: what a refusal must not change."""
    out = {}
    if os.path.islink(path) or os.path.isfile(path):
        return {"": os.readlink(path) if os.path.islink(path) else _digest(path)}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = (os.readlink(p) if os.path.islink(p) else
                                             None if os.path.isdir(p) else _digest(p))
    return out


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=8).hexdigest()


@dataclasses.dataclass
class Variant:
    name: str
    module: str
    args: list                  # str.format'ed with the variant's paths
    setup: object = None        # setup(p): makes the variant's files; p is the dict of paths
    expect: str = "refuse"      # or "ok"
    watch: tuple = ()           # keys of p whose files a refusal must leave as they were
    check: object = None        # check(p, stdout) -> None or what is wrong, for expect="ok"


def copy(p, key, src=None, dst=None):
    shutil.copytree(p["base"][src or key], p[dst or key], symlinks=True)


def edit_json(path, change):
    with open(path) as f:
        obj = json.load(f)
    obj = change(obj) or obj
    with open(path, "w") as f:
        json.dump(obj, f)


def index(p, key="ds"):
    return os.path.join(p[key], "homography_index.json")


def link(target, name):
    os.symlink(target, name)


def run_variant(v: Variant, work: str, b: dict, i: int) -> tuple:
    root = os.path.join(work, f"v{i:03d}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    p = {"base": b, "root": root, **{k: os.path.join(root, k) for k in b}, "out": os.path.join(root, "out"),
         "ship": os.path.join(root, "ship"), "link": os.path.join(root, "link"), "x": os.path.join(root, "x")}
    if v.setup:
        v.setup(p)
    before = {k: snapshot(p[k]) for k in v.watch}
    done = sh(v.module, *[a.format(**p) for a in v.args])
    text = done.stdout + done.stderr
    lines = [l for l in done.stderr.splitlines() if l.startswith(f"{v.module}: error: ")]
    changed = [k for k in v.watch if snapshot(p[k]) != before[k]]
    if "Traceback (most recent call last)" in text:
        return "traceback", text.strip().splitlines()[-1][:200]
    if v.expect == "ok":
        if done.returncode:
            return f"exit {done.returncode}", (lines or text.strip().splitlines() or [""])[-1][:200]
        wrong = v.check(p, done.stdout) if v.check else None
        return ("wrong", wrong) if wrong else ("pass", done.stdout.strip().splitlines()[-1][:200] if done.stdout else "")
    if done.returncode == 0:
        return "exit 0", (done.stdout.strip().splitlines() or [""])[-1][:200]
    failed = [l for l in done.stderr.splitlines() if l.startswith(f"{v.module}: FAILED hard checks")]
    if v.module == "pipeline.audit" and done.returncode == 1 and failed:  # the audit reports damage (README)
        return ("changed", ", ".join(changed)) if changed else ("pass", failed[0][:200])
    if done.returncode != 2 or len(lines) != 1:
        return f"exit {done.returncode}", text.strip().splitlines()[-1][:200] if text.strip() else ""
    if changed:
        return "changed", f"{', '.join(changed)} changed; {lines[0][:150]}"
    return "pass", lines[0][:200]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/adversarial")
    parser.add_argument("--only", default="", help="comma list of substrings of the variants' names to run")
    parser.add_argument("--skip", type=int, default=0, help="start at the variant of this number")
    parser.add_argument("--keep", action="store_true", help="keep each variant's folder")
    a = parser.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    b = base(a.work)
    print(f"fixtures in {a.work}/base ({time.time() - t0:.0f} s)", flush=True)
    from bench.adversarial_variants import variants  # the list, beside this file (each under 400 lines)

    results = []
    for i, v in enumerate(variants()):
        if i < a.skip or (a.only and not any(part in v.name for part in a.only.split(","))):
            continue
        started = time.time()
        verdict, said = run_variant(v, a.work, b, i)
        results.append((v.name, verdict))
        print(f"{verdict:>9}  {v.name:<58} {time.time() - started:5.1f}s  {said}", flush=True)
        if not a.keep:
            shutil.rmtree(os.path.join(a.work, f"v{i:03d}"), ignore_errors=True)
    failed = [(n, r) for n, r in results if r != "pass"]
    print(f"\n{len(results)} variants, {len(failed)} failures, {time.time() - t0:.0f} s")
    for n, r in failed:
        print(f"  {r:>9}  {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
