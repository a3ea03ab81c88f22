"""The audit of --photometric=camera builds: right labels pass despite each patch's own camera change; a wrong
label (flipped offsets, another pair's patch B) and out-of-range camera parameters fail."""
import numpy as np
import pytest

from pipeline.auditing import measure
from pipeline.dataset import geometry, photometric, schema
from tests.test_audit import by_name, copy_dataset, rewrite_shard, run_audit


@pytest.fixture(scope="module")
def camera_build(tmp_path_factory, coco_mini):
    """coco_mini, 10 images of each split x 6 pairs, camera model on (local builder, 2 shards a split)."""
    from pipeline.local_build import build

    out = str(tmp_path_factory.mktemp("camera") / "ds")
    build(coco_mini, out, {"train": "train2017", "validation": "val2017"},
          geometry.PairConfig(patches_per_image=6, photometric="camera"), max_images=10, num_shards=2, workers=1)
    return out


def test_camera_residual_separates_right_and_wrong_labels():
    from tests.conftest import textured_image

    image = textured_image(np.random.default_rng(5), 320, 240)[..., 1]
    pairs = geometry.generate_pairs(image, geometry.PairConfig(photometric="camera", patches_per_image=6), "t", 1)
    for i, p in enumerate(pairs):
        right = measure.camera_label_residual(p.patch_a, p.patch_b, p.offsets, p.photometric_a, p.photometric_b, 128)
        flipped = measure.camera_label_residual(p.patch_a, p.patch_b, -p.offsets, p.photometric_a,
                                                p.photometric_b, 128)
        assert right[0] < measure.CAMERA_RESIDUAL_THRESHOLD < flipped[0] and right[1] > 0.3
        # the plain residual would call the right label wrong: the camera change is tens of grey levels
        assert measure.label_residual(p.patch_a, p.patch_b, p.offsets, 128)[0] > 1.0


def test_photometric_problem_names_what_is_wrong():
    good = photometric.sample(np.random.default_rng(0))
    record = {schema.PHOTOMETRIC_A: good, schema.PHOTOMETRIC_B: good}
    assert measure.photometric_problem(record, "camera") is None
    assert measure.photometric_problem({}, "camera") == "camera parameters missing"
    assert "none build" in measure.photometric_problem(record, "none")
    bad = good.copy()
    bad[photometric.FIELDS.index("gamma")] = 5.0
    assert "patch_b: gamma" in measure.photometric_problem({schema.PHOTOMETRIC_A: good, schema.PHOTOMETRIC_B: bad},
                                                           "camera")


def test_audit_passes_a_correct_camera_build(camera_build, tmp_path):
    report = run_audit(camera_build, tmp_path)
    assert report["passed"], report["failed_hard_checks"]
    checks = by_name(report)
    assert checks["train/photometric_parameters"]["passed"]
    assert checks["train/label_consistency"]["numbers"]["threshold"] == measure.CAMERA_RESIDUAL_THRESHOLD


def test_audit_fails_flipped_offsets_on_a_camera_build(camera_build, tmp_path):
    data = copy_dataset(camera_build, tmp_path)
    rewrite_shard(data, "train", 0, lambda i, r: dict(r, offsets=-r["offsets"]))
    report = run_audit(data, tmp_path)
    assert report["failed_hard_checks"] == ["train/label_consistency"]
    assert by_name(report)["train/label_consistency"]["numbers"]["above_threshold"] >= 25  # of 30 flipped


def test_audit_fails_patch_b_of_another_pair_and_bad_parameters(camera_build, tmp_path):
    data = copy_dataset(camera_build, tmp_path)
    kept = {}

    def swap_b(i, r):  # each pair gets the next pair's patch B (and its parameters: only the geometry is wrong)
        kept[i] = r
        return r
    rewrite_shard(data, "validation", 0, swap_b)
    n = len(kept)

    def shifted(i, r):
        other = kept[(i + 1) % n]
        r = dict(r, patch_b=other["patch_b"], photometric_b=other[schema.PHOTOMETRIC_B])
        if i == 0:
            r[schema.PHOTOMETRIC_A] = np.where(np.arange(10) == 0, 9.0, r[schema.PHOTOMETRIC_A]).astype(np.float32)
        return r
    rewrite_shard(data, "validation", 0, shifted)
    report = run_audit(data, tmp_path)
    assert report["failed_hard_checks"] == ["validation/label_consistency", "validation/photometric_parameters"]
    assert by_name(report)["validation/label_consistency"]["numbers"]["above_threshold"] >= 25
    assert "contrast" in str(by_name(report)["validation/photometric_parameters"]["numbers"]["failures"])
