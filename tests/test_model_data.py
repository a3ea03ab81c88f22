"""model/training/data.py: shapes, dtypes, normalisation, labels = offsets / rho for known records, clear errors."""
import json

import numpy as np
import pytest
import tensorflow as tf

from model.training import data
from pipeline.dataset import dataset_info, schema


def raw_records(data_dir, split):
    """The split's records in homography_index.json order, decoded with the schema's numpy decoder."""
    info = dataset_info.read(data_dir)
    files = info.split(split).shard_files
    c = info.config
    return [schema.decode(r.numpy(), c.patch_size, c.channels) for r in tf.data.TFRecordDataset(files)], c


def test_eval_dataset_matches_raw_records(built_dataset):
    records, c = raw_records(built_dataset, "validation")
    xs, ys = [], []
    for x, y in data.make_dataset(built_dataset, "validation", 24, training=False):
        assert x.dtype == tf.float32 and y.dtype == tf.float32
        assert x.shape[1:] == (c.patch_size, c.patch_size, 2 * c.channels) and y.shape[1:] == (8,)
        xs.append(x.numpy())
        ys.append(y.numpy())
    assert [len(b) for b in xs] == [24, 24, 16]  # one pass, last partial batch kept
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() - x.min() > 1.0  # normalised, real contrast
    a = np.stack([r[schema.PATCH_A] for r in records]).astype(np.float32)
    b = np.stack([r[schema.PATCH_B] for r in records]).astype(np.float32)
    np.testing.assert_allclose(x[..., :c.channels], a / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(x[..., c.channels:], b / 127.5 - 1, atol=1e-6)
    offsets = np.stack([r[schema.OFFSETS] for r in records])
    np.testing.assert_allclose(y, offsets / c.rho, rtol=1e-6)
    np.testing.assert_allclose(y * c.rho, offsets, atol=1e-5)
    assert np.abs(y).max() <= 1.0


def test_training_dataset_shuffles_repeats_and_keeps_labels(built_dataset):
    records, c = raw_records(built_dataset, "train")
    known = {tuple(np.round(r[schema.OFFSETS] / c.rho, 5)) for r in records}
    ds = data.make_dataset(built_dataset, "train", 16, training=True, shuffle_buffer=64, seed=1)
    assert ds.element_spec[0].shape == (16, c.patch_size, c.patch_size, 2 * c.channels)  # static batch
    labels = np.concatenate([y.numpy() for _, y in ds.take(6)])  # 96 > 64 pairs: it repeats
    assert labels.shape == (96, 8)
    assert all(tuple(np.round(row, 5)) in known for row in labels)
    first_epoch = [tuple(np.round(row, 5)) for row in labels[:64]]
    assert len(set(first_epoch)) == 64  # every pair once per epoch
    in_order = [tuple(np.round(r[schema.OFFSETS] / c.rho, 5)) for r in records]
    assert first_epoch != in_order  # shuffled


def test_read_batches_gives_schema_dicts(built_dataset):
    records, c = raw_records(built_dataset, "validation")
    batches = list(data.read_batches(built_dataset, "validation", 40))
    assert [len(b[schema.OFFSETS]) for b in batches] == [40, 24]
    b = batches[0]
    assert b[schema.PATCH_A].dtype == tf.uint8 and b[schema.PATCH_A].shape == (40, c.patch_size, c.patch_size, c.channels)
    assert b[schema.CORNERS].shape == (40, 8) and b[schema.IMAGE_ID].dtype == tf.int64
    np.testing.assert_array_equal(b[schema.PATCH_B].numpy()[3], records[3][schema.PATCH_B])
    assert [int(v) for v in b[schema.IMAGE_ID]][:5] == [r[schema.IMAGE_ID] for r in records[:5]]
    np.testing.assert_array_equal(b[schema.OFFSETS].numpy()[7], records[7][schema.OFFSETS])


def test_normalize_numpy_and_tf_agree():
    a = np.array([0, 127, 255], np.uint8).reshape(1, 1, 3, 1)
    b = np.array([255, 128, 0], np.uint8).reshape(1, 1, 3, 1)
    n = data.normalize(a, b)
    t = data.normalize(tf.constant(a), tf.constant(b)).numpy()
    assert n.dtype == np.float32 and n.shape == (1, 1, 3, 2)
    np.testing.assert_allclose(n, t, atol=1e-7)
    np.testing.assert_allclose(n[0, 0, :, 0], [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-7)
    np.testing.assert_allclose(n[0, 0, :, 1], [1.0, 128 / 127.5 - 1, -1.0], atol=1e-7)


def copy_index(built_dataset, tmp_path, edit):
    raw = dataset_info.read(built_dataset).raw
    edit(raw)
    (tmp_path / schema.INDEX).write_text(json.dumps(raw))
    return str(tmp_path)


def test_clear_errors(built_dataset, tmp_path):
    with pytest.raises(data.DatasetError, match="no homography_index.json"):
        data.make_dataset(str(tmp_path), "train", 8, training=True)
    with pytest.raises(data.DatasetError, match="split 'test' is not in"):
        data.make_dataset(built_dataset, "test", 8, training=False)

    def empty(raw):
        raw["splits"]["train"].update(num_examples=0, shards=[])
    (tmp_path / "e").mkdir()
    (tmp_path / "m").mkdir()
    with pytest.raises(data.DatasetError, match="split 'train' .* holds no examples"):
        data.make_dataset(copy_index(built_dataset, tmp_path / "e", empty), "train", 8, training=True)
    with pytest.raises(data.DatasetError, match="missing"):  # index copied without its shards
        data.read_batches(copy_index(built_dataset, tmp_path / "m", lambda raw: None), "validation", 8)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_dataset(built_dataset, "train", 0, training=True)


def test_input_throughput_reports_pairs_per_second(built_dataset):
    r = data.input_throughput(built_dataset, "train", batch_size=8, batches=3, shuffle_buffer=16)
    assert r["batches"] == 3 and r["pairs_per_sec"] > 0 and r["seconds"] > 0


def test_augmented_batches_are_exact_views_of_the_records(built_dataset):
    """--augment: every batch is one of the 8 flips/transposes of records the builder wrote, with the
    offsets of that view (which reproduce its patch B from its patch A), and the views vary."""
    import cv2

    from pipeline import records
    from pipeline.dataset import geometry

    plain = list(records.batches(built_dataset, "validation", 16))
    seen = set()
    for b, aug in zip(plain, data.augment_views(iter(plain), seed=3)):
        matches = [v for v in geometry.VIEWS if np.array_equal(aug["patch_a"], geometry.view_patches(b["patch_a"], v))
                   and np.array_equal(aug["patch_b"], geometry.view_patches(b["patch_b"], v))]
        assert matches, "the augmented patches are no view of the records"
        view = matches[0]
        seen.add(view)
        np.testing.assert_allclose(aug["offsets"], geometry.view_offsets(
            b["offsets"], geometry.view_matrix(view, 128), 128).reshape(-1, 8), atol=1e-4)
        h = geometry.homography_local(aug["offsets"][0], 128)
        from_a = cv2.warpPerspective(aug["patch_a"][0, ..., 0], h, (128, 128), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        inside = cv2.warpPerspective(np.ones((128, 128), np.uint8), h, (128, 128),
                                     flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
        inside = cv2.erode(inside, np.ones((3, 3), np.uint8)) > 0
        assert np.abs(from_a.astype(float) - aug["patch_b"][0, ..., 0])[inside].mean() < 1.0
    assert len(seen) >= 2
    x, y = next(data.train_batches(built_dataset, "train", 8, reader="records", augment=True, seed=0))
    # a flipped view's offsets may pass rho by about a pixel (corners at 0 and P, pixel centres at 0..P-1)
    assert x.shape == (8, 128, 128, 2) and y.shape == (8, 8) and np.abs(y).max() <= (32 + 2) / 32
    with pytest.raises(ValueError, match="--reader=records"):
        data.train_batches(built_dataset, "train", 8, reader="tf.data", augment=True)
