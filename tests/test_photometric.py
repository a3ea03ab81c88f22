"""The camera model (pipeline/dataset/photometric.py) and `--photometric=camera` builds."""
import glob
import os

import numpy as np
import pytest

from pipeline.dataset import photometric as ph

FIELD = {name: i for i, name in enumerate(ph.FIELDS)}


def _patch(seed=0, size=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, (size // 8, size // 8)).astype(np.uint8)
    return np.kron(base, np.ones((8, 8), np.uint8))[..., None]  # blocks: edges for blur to soften


def _params(**kw):
    v = ph.IDENTITY.copy()
    for k, x in kw.items():
        v[FIELD[k]] = x
    return v


def test_identity_leaves_patch_unchanged():
    p = _patch()
    assert np.array_equal(ph.apply(p, ph.IDENTITY), p)
    assert ph.range_problem(ph.IDENTITY) is None


def test_draws_stay_in_their_ranges_and_use_one_blur_kind():
    rng = np.random.default_rng(1)
    draws = np.stack([ph.sample(rng) for _ in range(600)])
    assert all(ph.range_problem(v) is None for v in draws)
    gauss, motion = draws[:, FIELD["blur_sigma"]] > 0, draws[:, FIELD["motion_length"]] > 0
    assert not np.any(gauss & motion)
    assert 150 < gauss.sum() < 250 and 150 < motion.sum() < 250  # each kind about a third
    assert draws[:, FIELD["contrast"]].min() < 0.75 and draws[:, FIELD["contrast"]].max() > 1.25


def test_range_problem_names_the_field():
    assert "contrast" in ph.range_problem(_params(contrast=2.0))
    assert "gamma" in ph.range_problem(_params(gamma=3.0, contrast=1.1))
    assert "both" in ph.range_problem(_params(blur_sigma=0.5, motion_length=3.0, contrast=1.1))
    assert "10 finite" in ph.range_problem(np.zeros(3))


def test_each_stage_does_what_it_says():
    p = _patch()
    f = p.astype(float)
    brighter = ph.apply(p, _params(brightness=20.0)).astype(float)
    assert np.allclose(brighter - f, 20.0, atol=0.51)
    flatter = ph.apply(p, _params(contrast=0.7)).astype(float)
    assert flatter.std() == pytest.approx(0.7 * f.std(), rel=0.02)
    darker = ph.apply(p, _params(gamma=1.3)).astype(float)
    assert darker.mean() < f.mean() - 5
    shaded = ph.apply(p, _params(shade=30.0, shade_angle=0.0)).astype(float) - f  # rises to the right
    assert shaded[:, -1].mean() == pytest.approx(30.0, abs=0.6) and shaded[:, 0].mean() == pytest.approx(-30, abs=0.6)
    for blur in (_params(blur_sigma=1.2), _params(motion_length=7.0, motion_angle=0.0)):
        b = ph.apply(p, blur).astype(float)
        assert (np.diff(b[..., 0], axis=1) ** 2).sum() < 0.8 * (np.diff(f[..., 0], axis=1) ** 2).sum()  # edges soften
        assert b.mean() == pytest.approx(f.mean(), abs=1.0)  # a blur moves no light
    # a horizontal motion blur leaves vertical detail along columns of a horizontal-stripe image alone
    stripes = np.repeat((np.arange(64) % 2 * 200 + 20).astype(np.uint8)[:, None], 64, 1)[..., None]
    assert np.array_equal(ph.apply(stripes, _params(motion_length=5.0, motion_angle=0.0)), stripes)


def test_noise_is_reproduced_by_its_seed():
    p = _patch()
    a = ph.apply(p, _params(noise_sigma=5.0, noise_seed=11))
    assert np.array_equal(a, ph.apply(p, _params(noise_sigma=5.0, noise_seed=11)))
    b = ph.apply(p, _params(noise_sigma=5.0, noise_seed=12))
    assert not np.array_equal(a, b)
    assert (a.astype(float) - p).std() == pytest.approx(5.0, rel=0.1)


def test_colour_patches_keep_their_shape():
    rng = np.random.default_rng(3)
    p = np.repeat(_patch(), 3, axis=2)
    out = ph.apply(p, ph.sample(rng))
    assert out.shape == p.shape and out.dtype == np.uint8
    batch = ph.apply_batch(np.stack([p, p]), rng)
    assert batch.shape == (2,) + p.shape and not np.array_equal(batch[0], batch[1])


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="photometric model must be one of none, camera"):
        ph.validate_model("sunny")
    from pipeline.dataset.geometry import PairConfig
    with pytest.raises(ValueError, match="photometric must be one of"):
        PairConfig(photometric="film").validate()


def test_camera_build_same_geometry_params_stored_and_reproducible(coco_mini, tmp_path):
    """A camera build has the none build's geometry pair for pair, records its parameters, and each patch
    is the clean patch through its stored parameters, bit for bit."""
    from pipeline import records
    from pipeline.dataset import schema
    from pipeline.dataset.geometry import PairConfig
    from pipeline.local_build import build

    out = {}
    for model in ("none", "camera"):
        out[model] = str(tmp_path / model)
        build(coco_mini, out[model], {"validation": "val2017"}, PairConfig(patches_per_image=3, photometric=model),
              max_images=4, num_shards=1, workers=1)
    shard = [os.path.basename(f) for f in glob.glob(os.path.join(out["none"], "*.tfrecord-*"))]
    assert len(shard) == 1
    clean = [schema.decode(r, 128, 1) for r in records.iter_records(os.path.join(out["none"], shard[0]))]
    cam = [schema.decode(r, 128, 1) for r in records.iter_records(os.path.join(out["camera"], shard[0]))]
    assert len(clean) == len(cam) == 12
    for c, m in zip(clean, cam):
        assert schema.PHOTOMETRIC_A not in c and schema.PHOTOMETRIC_B not in c
        assert np.array_equal(c[schema.OFFSETS], m[schema.OFFSETS]) and np.array_equal(c[schema.CORNERS], m[schema.CORNERS])
        assert ph.range_problem(m[schema.PHOTOMETRIC_A]) is None and ph.range_problem(m[schema.PHOTOMETRIC_B]) is None
        assert not np.array_equal(m[schema.PHOTOMETRIC_A], m[schema.PHOTOMETRIC_B])
        assert np.array_equal(ph.apply(c[schema.PATCH_A], m[schema.PHOTOMETRIC_A]), m[schema.PATCH_A])
        assert np.array_equal(ph.apply(c[schema.PATCH_B], m[schema.PHOTOMETRIC_B]), m[schema.PATCH_B])
    from pipeline.dataset import dataset_info
    info = dataset_info.read(out["camera"])
    assert info.config.photometric == "camera"
    assert info.raw["config"]["photometric"]["ranges"]["gamma"] == list(ph.CAMERA_RANGES["gamma"])
    assert dataset_info.read(out["none"]).config.photometric == "none"


def test_training_stream_changes_both_patches_and_keeps_labels(tiny_dataset):
    from model.training import data
    from pipeline.dataset import schema

    batch = next(iter(data.parsed_batches(tiny_dataset, "train", 8, "records")))
    seen = next(data.camera_views(iter([batch]), seed=0))
    assert np.array_equal(seen[schema.OFFSETS], batch[schema.OFFSETS])
    for key in (schema.PATCH_A, schema.PATCH_B):
        assert seen[key].shape == batch[key].shape
        assert all(not np.array_equal(s, b) for s, b in zip(seen[key], batch[key]))


def test_training_stream_share_leaves_the_other_pairs_exact(tiny_dataset):
    from model.training import data
    from pipeline.dataset import schema

    batch = next(iter(data.parsed_batches(tiny_dataset, "train", 32, "records")))
    seen = next(data.camera_views(iter([batch]), seed=3, share=0.5))
    same = [np.array_equal(s, b) for s, b in zip(seen[schema.PATCH_A], batch[schema.PATCH_A])]
    same_b = [np.array_equal(s, b) for s, b in zip(seen[schema.PATCH_B], batch[schema.PATCH_B])]
    assert same == same_b and 6 <= sum(same) <= 26  # whole pairs, about half of 32
