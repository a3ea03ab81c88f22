"""Shared fixtures: the real COCO sample beside the repo, a synthetic COCO layout, and small built datasets."""
import json
import os
import pathlib

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"


@pytest.fixture(scope="session")
def coco_mini():
    if not COCO_MINI.exists():
        pytest.fail(f"{COCO_MINI} is missing: the tests need ../shared/data/coco_mini beside the repo")
    return str(COCO_MINI)


def textured_image(rng, width=400, height=300):
    """A strongly textured colour image (random rectangles + noise): features for ORB/SIFT everywhere."""
    img = np.full((height, width, 3), 127, np.uint8)
    for _ in range(120):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(5, 60)), y0 + int(rng.integers(5, 60))
        cv2.rectangle(img, (x0, y0), (x1, y1), [int(c) for c in rng.integers(0, 256, 3)], -1)
    noise = rng.normal(0, 8, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def textured_pairs(seed: int, num_images: int, blur_sigma: float = 0.0, patches_per_image: int = 4) -> list:
    """Grayscale pairs (rho 32) of textured 320x240 images (optionally smoothed), exactly as the builder makes them."""
    from pipeline.dataset import geometry

    rng, config, pairs = np.random.default_rng(seed), geometry.PairConfig(patches_per_image=patches_per_image), []
    for image_id in range(num_images):
        image = textured_image(rng, 320, 240)
        if blur_sigma:
            image = cv2.GaussianBlur(image, (0, 0), blur_sigma)
        pairs += geometry.generate_pairs(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), config, "validation", image_id)
    return pairs


def make_coco_layout(root: pathlib.Path, split: str, images: dict, annotation: str = "instances"):
    """Writes images {file_name: ndarray or bytes} under root/split and a COCO-format image list."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for i, (name, content) in enumerate(sorted(images.items()), start=1):
        path = root / split / name
        if isinstance(content, bytes):
            path.write_bytes(content)
            h = w = 0
        else:
            cv2.imwrite(str(path), content)
            h, w = content.shape[:2]
        image_id = int(os.path.splitext(name)[0]) if os.path.splitext(name)[0].isdigit() else 1000 + i
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
    if annotation:
        with open(root / "annotations" / f"{annotation}_{split}.json", "w") as f:
            json.dump({"images": entries, "annotations": [], "categories": []}, f)
    return entries


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A COCO layout of 6 train and 3 validation textured images (ids 1..9)."""
    root = tmp_path_factory.mktemp("synthetic_coco")
    rng = np.random.default_rng(7)
    make_coco_layout(root, "train2017", {f"{i:012d}.jpg": textured_image(rng) for i in range(1, 7)})
    make_coco_layout(root, "val2017", {f"{i:012d}.jpg": textured_image(rng) for i in range(7, 10)})
    return str(root)


@pytest.fixture(scope="session")
def built_dataset(tmp_path_factory, coco_mini):
    """coco_mini, first 16 images of each split, 4 pairs each: 64 train + 64 validation pairs (rho 32)."""
    from pipeline.build import build
    from pipeline.dataset.geometry import PairConfig

    out = str(tmp_path_factory.mktemp("built") / "ds")
    build(coco_mini, out, {"train": "train2017", "validation": "val2017"},
          PairConfig(patches_per_image=4), max_images=16, num_shards=2,
          beam_args=["--runner=DirectRunner"])
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, coco_mini):
    """coco_mini at a quarter of the scale (32 px patches of 80x60 images, rho 8), 8 images per split x 4 pairs:
    32 train + 32 validation pairs for fast training tests. Tests that damage it work on a copy."""
    from pipeline.build import build
    from pipeline.dataset.geometry import PairConfig

    out = str(tmp_path_factory.mktemp("tiny") / "ds")
    build(coco_mini, out, {"train": "train2017", "validation": "val2017"},
          PairConfig(patch_size=32, rho=8, image_width=80, image_height=60, patches_per_image=4),
          max_images=8, num_shards=2, beam_args=["--runner=DirectRunner"])
    return out


@pytest.fixture
def small_fs(tmp_path):
    """make(size, read_only=False) -> a folder on a tmpfs of that size (a disk that fills up, or a read-only
    filesystem), unmounted after the test. Needs the right to mount (root here); skipped without it."""
    import subprocess

    mounted = []

    def make(size="4m", read_only=False, name="fs"):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
        mounted.append(folder)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
