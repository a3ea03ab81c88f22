"""The path to a bare GPU box: the local (no-Beam) builder, the bundle of resized images, and the box command."""
import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from pipeline import local_build
from pipeline.dataset.geometry import PairConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLITS = {"train": "train2017", "validation": "val2017"}
CONFIG = PairConfig(patches_per_image=3)

# Run a snippet where `import tensorflow` and `import apache_beam` fail, as on the GPU box.
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'apache_beam'):
            raise ImportError(f'{name} is blocked in this test (absent on the GPU box)')
sys.meta_path.insert(0, _Block())
"""


def run_blocked(code: str, **env):
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def shard_bytes(data_dir):
    info = json.loads((pathlib.Path(data_dir) / "homography_index.json").read_text())
    return {sh["file"]: (pathlib.Path(data_dir) / sh["file"]).read_bytes()
            for s in info["splits"].values() for sh in s["shards"]}, info


@pytest.fixture(scope="module")
def beam_build(coco_mini, tmp_path_factory):
    from pipeline.build import build

    out = tmp_path_factory.mktemp("beam") / "ds"
    build(coco_mini, str(out), SPLITS, CONFIG, max_images=12, num_shards=3, beam_args=["--runner=DirectRunner"])
    return out


def test_local_build_writes_the_beam_builders_bytes(coco_mini, beam_build, tmp_path):
    out = tmp_path / "local"
    local_build.build(coco_mini, str(out), SPLITS, CONFIG, max_images=12, num_shards=3, workers=2, log=None)
    beam_shards, beam_info = shard_bytes(beam_build)
    local_shards, local_info = shard_bytes(out)
    assert len(beam_shards) == 6 and local_shards == beam_shards
    assert sum(len(b) for b in local_shards.values()) > 12 * 2 * 3 * 2 * 128 * 128  # the pairs are really there
    beam_info.pop("build"), local_info.pop("build")
    assert local_info == beam_info  # same counts, shard list, sources, config
    assert (out / "failed_images-train.jsonl").read_text() == ""


def test_local_build_refuses_a_non_empty_folder_and_lists_bad_images(coco_mini, tmp_path):
    from tests.conftest import make_coco_layout, textured_image

    root = tmp_path / "coco"
    rng = np.random.default_rng(0)
    make_coco_layout(root, "train2017", {"000000000001.jpg": textured_image(rng),
                                         "000000000002.jpg": b"not an image",
                                         "000000000003.jpg": textured_image(rng)})
    (root / "train2017" / "000000000003.jpg").unlink()
    out = tmp_path / "out"
    info = local_build.build(str(root), str(out), {"train": "train2017"}, CONFIG, num_shards=2, log=None)
    s = info["splits"]["train"]
    assert (s["images_listed"], s["images_used"], s["images_failed"], s["num_examples"]) == (3, 1, 2, 3)
    assert s["failed_by_reason"] == {"missing": 1, "undecodable": 1}
    failed = [json.loads(line) for line in (out / "failed_images-train.jsonl").read_text().splitlines()]
    assert [f["image_id"] for f in failed] == [2, 3]
    with pytest.raises(local_build.LocalBuildError, match="not empty"):
        local_build.build(str(root), str(out), {"train": "train2017"}, CONFIG, log=None)
    with pytest.raises(local_build.LocalBuildError, match="local folders only"):
        local_build.build(str(root), "gs://bucket/out", {"train": "train2017"}, CONFIG, log=None)
    with pytest.raises(local_build.LocalBuildError, match="is not NAME=COCO_SPLIT"):
        local_build.parse_splits("train")


def test_bundle_images_build_the_same_records_without_tensorflow_or_beam(coco_mini, beam_build, tmp_path):
    from model import gpu_bundle

    bundle = tmp_path / "bundle"
    manifest = gpu_bundle.prepare(coco_mini, str(bundle), SPLITS, wheels=False)
    assert manifest["images"]["val2017"]["written"] == manifest["images"]["val2017"]["listed"] == 50
    png = cv2.imread(str(next((bundle / "coco" / "train2017").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert png.shape == (240, 320) and png.dtype == np.uint8  # resized grayscale, stored losslessly
    out = tmp_path / "from_bundle"
    done = run_blocked(
        "from pipeline import local_build\nfrom pipeline.dataset.geometry import PairConfig\n"
        f"local_build.build({str(bundle / 'coco')!r}, {str(out)!r}, {SPLITS!r}, PairConfig(patches_per_image=3),"
        " max_images=12, num_shards=3, workers=2, log=None)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'apache_beam')]\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shard_bytes(out)[0] == shard_bytes(beam_build)[0]


def test_bundle_refuses_missing_input(tmp_path):
    from model import gpu_bundle

    with pytest.raises(gpu_bundle.BundleError, match="manifest.json is missing"):
        gpu_bundle.read_manifest(str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "model.gpu_bundle", f"--coco_dir={tmp_path / 'nope'}",
                           f"--bundle_dir={tmp_path / 'b'}", "--nowheels"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_box_command_end_to_end_on_jax_without_tensorflow_or_beam(coco_mini, tmp_path):
    """The GPU box's one command, here on the CPU with tiny settings: build, train, evaluate, summary."""
    from model import gpu_bundle

    bundle = tmp_path / "bundle"
    gpu_bundle.prepare(coco_mini, str(bundle), SPLITS, wheels=False)
    out = tmp_path / "out"
    argv = ["model.gpu_run", f"--bundle_dir={bundle}", f"--output_dir={out}", "--architectures=compact",
            "--max_images=3", "--patches_per_image=4", "--steps=2", "--batch_size=4", "--minutes=10", "--workers=2"]
    done = run_blocked(f"sys.argv = {argv!r}\nfrom model import gpu_run\ngpu_run.run()\n", KERAS_BACKEND="jax")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["keras_backend"] == "jax" and summary["device"].startswith("cpu")
    net = summary["networks"]["compact"]
    assert net["steps"] == 2 and net["parameters"] < 2_000_000
    assert summary["num_eval_pairs"] == 3 * 10  # the validation images at 10 pairs each
    assert set(summary["methods"]) == {"identity", "orb", "sift"}
    assert 15 < summary["methods"]["identity"]["mean_mace"] < 35  # ~0.765 rho: the eval pairs are rho 32
    assert net["validation"]["num_pairs"] == 30
    assert (out / "compact" / "model.keras").is_file() and (out / "compact" / "mace_report.md").is_file()
    assert "| compact | " in (out / "summary.md").read_text()
    # A missing bundle is one line, exit 2.
    done = run_blocked(f"sys.argv = ['model.gpu_run', '--bundle_dir={tmp_path / 'none'}', '--output_dir={out}']\n"
                       "from model import gpu_run\ngpu_run.run()\n")
    assert done.returncode == 2 and "manifest.json is missing" in done.stderr and "Traceback" not in done.stderr
