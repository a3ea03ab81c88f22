"""Prepares what travels to a bare GPU box: source images already resized, and the wheels it lacks.

  python -m model.gpu_bundle --coco_dir=COCO --bundle_dir=gpu_bundle [--splits=train=train2017,validation=val2017]
                             [--image_width=320 --image_height=240 --color] [--nowheels]

The box (Python 3.12 with JAX, numpy, OpenCV, protobuf, absl-py, matplotlib; no TensorFlow, no Beam, no
network) then runs one command from the project root, `python3 -m model.gpu_run --bundle_dir=gpu_bundle
--output_dir=OUT` (model/gpu_run.py).

bundle_dir/
  manifest.json             what was prepared: geometry, splits, image counts, wheels, source
  coco/<split>/<id>.png     every image decoded and resized exactly as pipeline.build does it
                            (coco.decode_resize with the annotation's source size), stored losslessly
  coco/annotations/image_info_<split>.json   the COCO image list, same ids, width x height = the target
  wheels/*.whl              keras and the packages it needs that the box lacks (cp312, manylinux)

Building from the bundle gives the same records, byte for byte, as building from the original images: each
image's random draws come from (seed, split, image id), and resizing an image already at the target size is
a copy (tests/test_gpu_recipe.py checks it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import cv2

from pipeline.builder import coco
from pipeline.runtime import cli

# What the box lacks: Keras 3 for JAX (it has numpy, absl-py, h5py, rich, ml_dtypes through its JAX,
# PyTorch and TensorBoard stack; typing_extensions, which optree needs, comes with PyTorch there and is carried
# anyway), google-crc32c for the shard framing and pycocotools for the image lists;
# pinned to this machine's versions so both ends run the same code.
WHEELS = ("keras", "namex", "optree", "typing_extensions", "google-crc32c", "pycocotools")
BOX_PYTHON = "3.12"
BOX_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """The bundle cannot be prepared; the message names the problem."""


def prepare_images(coco_dir: str, bundle_dir: str, splits: dict, width: int, height: int, channels: int) -> dict:
    """Writes bundle_dir/coco/<split>/<id>.png and its image list per COCO split; returns per-split counts.

    splits: {output split name: COCO split}. Images the builder would skip (missing, truncated,
    undecodable) are left out and listed with their reason."""
    root = os.path.join(bundle_dir, "coco")
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    counts = {}
    for source_split in splits.values():
        records, source = coco.list_split(coco_dir, source_split)
        out_dir = os.path.join(root, source_split)
        os.makedirs(out_dir, exist_ok=True)
        entries, failed = [], []
        for r in records:
            try:
                image = coco.decode_resize(coco.read_bytes(r.path), width, height, channels, (r.width, r.height))
            except coco.ImageError as e:
                failed.append({"image_id": r.image_id, "path": r.path, "reason": e.reason, "detail": e.detail})
                continue
            except cv2.error as e:
                failed.append({"image_id": r.image_id, "path": r.path, "reason": "undecodable", "detail": str(e)[:200]})
                continue
            name = f"{r.image_id:012d}.png"
            if not cv2.imwrite(os.path.join(out_dir, name), image):
                raise BundleError(f"cannot write {os.path.join(out_dir, name)}")
            entries.append({"id": r.image_id, "file_name": name, "width": width, "height": height})
        with open(os.path.join(root, "annotations", f"image_info_{source_split}.json"), "w") as f:
            json.dump({"info": {"description": f"{source_split} of {coco_dir}, resized to {width}x{height} "
                                               f"by model.gpu_bundle"}, "images": entries, "categories": []}, f)
        counts[source_split] = {"listed": len(records), "written": len(entries), "failed": failed,
                                "source": source}
    return counts


def download_wheels(bundle_dir: str, packages=WHEELS) -> list:
    """pip download of cp312 manylinux wheels of `packages`, at the versions installed here."""
    from importlib import metadata

    wheel_dir = os.path.join(bundle_dir, "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    pins = [f"{p}=={metadata.version(p)}" for p in packages]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", BOX_PYTHON, "--implementation", "cp", "-d", wheel_dir, *pins]
    for platform in BOX_PLATFORMS:
        cmd[cmd.index("-d"):cmd.index("-d")] = ["--platform", platform]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise BundleError(f"pip download of {', '.join(pins)} failed: {done.stderr.strip()[-300:]}")
    return sorted(f for f in os.listdir(wheel_dir) if f.endswith(".whl"))


def prepare(coco_dir: str, bundle_dir: str, splits: dict, width: int = 320, height: int = 240,
            channels: int = 1, wheels: bool = True) -> dict:
    t0 = time.time()
    os.makedirs(bundle_dir, exist_ok=True)
    counts = prepare_images(coco_dir, bundle_dir, splits, width, height, channels)
    manifest = {"coco_dir": os.path.abspath(coco_dir), "splits": splits, "image_width": width,
                "image_height": height, "channels": channels, "images": counts,
                "wheels": download_wheels(bundle_dir) if wheels else [],
                "prepared": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(bundle_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(bundle_dir: str) -> dict:
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.exists(path):
        raise BundleError(f"{path} is missing: prepare the bundle with python -m model.gpu_bundle")
    with open(path) as f:
        return json.load(f)


def size_mib(bundle_dir: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(bundle_dir) for f in fs) / 2**20


def _define_flags():
    from absl import flags

    flags.DEFINE_string("coco_dir", None, "COCO 2017 root (images in <split>/, annotations/ beside)")
    flags.DEFINE_string("bundle_dir", "gpu_bundle", "Where the bundle goes (inside the project: it travels with it)")
    flags.DEFINE_string("splits", "train=train2017,validation=val2017", "Comma list of OUTPUT_SPLIT=COCO_SPLIT")
    flags.DEFINE_integer("image_width", 320, "Width the images are resized to")
    flags.DEFINE_integer("image_height", 240, "Height the images are resized to")
    flags.DEFINE_bool("color", False, "Keep 3 channels (BGR) instead of grayscale")
    flags.DEFINE_bool("wheels", True, "Download the wheels the box lacks (--nowheels: images only)")


def main(argv):
    from absl import flags

    from pipeline.local_build import LocalBuildError, parse_splits

    f = flags.FLAGS
    if len(argv) > 1:
        return cli.fail("model.gpu_bundle", f"unexpected arguments: {' '.join(argv[1:])}")
    if not f.coco_dir:
        return cli.fail("model.gpu_bundle", "--coco_dir is required")
    try:
        m = prepare(f.coco_dir, f.bundle_dir, parse_splits(f.splits), f.image_width, f.image_height,
                    3 if f.color else 1, wheels=f.wheels)
    except (BundleError, LocalBuildError, coco.ListingError) as e:
        return cli.fail("model.gpu_bundle", str(e))
    images = ", ".join(f"{s}: {c['written']}/{c['listed']} images" for s, c in m["images"].items())
    print(f"bundle {f.bundle_dir}: {images}; wheels: {', '.join(m['wheels']) or 'none'}; "
          f"{size_mib(f.bundle_dir):.1f} MiB in {m['seconds']} s")
    return 0


def run():
    cli.run("model.gpu_bundle", main, _define_flags)


if __name__ == "__main__":
    run()
