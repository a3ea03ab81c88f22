"""The reader's adapters: keras.utils.PyDataset (Keras 3 on a non-TensorFlow backend) and
torch.utils.data.IterableDataset (the CPU build of torch), and the numpy model inputs they share."""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline import records
from pipeline.dataset import schema
from tests.test_records import hide_packages

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ids(batches):
    return [(int(i), int(p)) for b in batches for i, p in zip(b[schema.IMAGE_ID], b[schema.PATCH_INDEX])]


def test_model_inputs_equal_model_data(built_dataset):
    from model.training import data

    batch = next(records.batches(built_dataset, "train", 16))
    x, y = records.model_inputs(batch, 32)
    ref_x = data.normalize(batch[schema.PATCH_A], batch[schema.PATCH_B])
    ref_y = np.asarray(data.scale_labels(batch[schema.OFFSETS], 32))
    assert x.dtype == ref_x.dtype == np.float32 and x.shape == ref_x.shape == (16, 128, 128, 2)
    assert np.array_equal(x.view(np.uint32), ref_x.view(np.uint32))
    assert np.array_equal(y.view(np.uint32), ref_y.view(np.uint32))


def test_pydataset_evaluation_order_and_training_stream(built_dataset):
    from pipeline.reader.keras_dataset import RecordsPyDataset

    ordered = list(records.batches(built_dataset, "validation", 24))
    val = RecordsPyDataset(built_dataset, "validation", 24, training=False)
    assert len(val) == 3  # 64 records: 24 + 24 + 16
    for i in (0, 1, 2, 1, 0, 2):  # any order Keras asks in: batch i is the i-th batch
        x, y = val[i]
        ref_x, ref_y = records.model_inputs(ordered[i], 32)
        assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)
    with pytest.raises(IndexError):
        val[3]

    seen = []
    train = RecordsPyDataset(built_dataset, "train", 16, training=True, seed=1, shuffle_buffer=32,
                             transform=lambda b: b)
    assert len(train) == 4
    for _ in range(3):  # epochs: full batches from one endless seeded stream
        batches = [train[i] for i in np.random.default_rng(0).permutation(len(train))]
        assert all(len(b[schema.IMAGE_ID]) == 16 for b in batches)
        seen += _ids(batches)
        train.on_epoch_end()
    assert sorted(seen[:64]) != seen[:64]  # shuffled
    assert len(set(seen)) == 64  # every record of the split came through within three epochs
    with pytest.raises(ValueError, match="reader_workers"):
        RecordsPyDataset(built_dataset, "train", 16, use_multiprocessing=True, workers=2)


def test_keras_fit_evaluate_predict_on_torch_backend_without_tensorflow(built_dataset, tmp_path):
    """Keras 3 on the PyTorch backend, TensorFlow unimportable: fit, evaluate and predict through the PyDataset."""
    hide_packages(tmp_path, {"tensorflow", "apache_beam"})
    code = textwrap.dedent(f"""
        import numpy as np, keras
        from pipeline import records
        from pipeline.reader.keras_dataset import RecordsPyDataset
        assert keras.backend.backend() == "torch"
        train = RecordsPyDataset({built_dataset!r}, "train", 16, training=True, seed=0)
        val = RecordsPyDataset({built_dataset!r}, "validation", 24, training=False)
        model = keras.Sequential([keras.Input((128, 128, 2)), keras.layers.Conv2D(4, 8, strides=8),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8)])
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(train, epochs=2, validation_data=val, verbose=0)
        assert len(history.history["loss"]) == 2 and np.isfinite(history.history["val_loss"]).all()
        pred = model.predict(val, verbose=0)
        x = np.concatenate([records.model_inputs(b, 32)[0] for b in records.batches({built_dataset!r}, "validation", 64)])
        assert pred.shape == (64, 8)
        assert np.allclose(pred, model.predict_on_batch(x), atol=1e-5)  # predict lines up with the records
        print("ok", model.evaluate(val, verbose=0))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=f"{tmp_path}:{REPO}"))
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


def test_torch_iterable_dataset_workers_read_each_record_once(built_dataset):
    import torch
    from torch.utils.data import DataLoader

    from pipeline.reader.torch_dataset import RecordsIterableDataset

    everything = sorted(_ids(records.batches(built_dataset, "train", 64)))
    ds = RecordsIterableDataset(built_dataset, "train", 8, shuffle=True, seed=0, shuffle_buffer=16)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    b = batches[0]
    assert b[schema.PATCH_A].dtype == torch.uint8 and tuple(b[schema.PATCH_A].shape) == (8, 128, 128, 1)
    assert b[schema.OFFSETS].dtype == torch.float32 and b[schema.IMAGE_ID].dtype == torch.int64
    ids = _ids({k: v.numpy() for k, v in b.items()} for b in batches)
    assert sorted(ids) == everything  # the two workers read disjoint shards: each record once

    def epoch_ids(epoch):  # in-process (spawning workers costs seconds; once is enough to test them)
        ds.set_epoch(epoch)
        return _ids({k: v.numpy() for k, v in b.items()} for b in ds)

    assert epoch_ids(0) == epoch_ids(0) != epoch_ids(1)  # seeded per epoch: set_epoch reshuffles
    assert sorted(epoch_ids(1)) == everything
    # The tensors hold the records' bytes: same as the plain reader, in-process, unshuffled.
    plain = RecordsIterableDataset(built_dataset, "train", 64)
    (only,) = list(plain)
    ref = next(records.batches(built_dataset, "train", 64))
    for k in ref:
        assert np.array_equal(only[k].numpy(), ref[k]), k
    # Two ranks of a distributed job split the shards; more readers than shards is refused up front.
    r0 = _ids({k: v.numpy() for k, v in b.items()} for b in RecordsIterableDataset(built_dataset, "train", 8, rank=0, world_size=2))
    r1 = _ids({k: v.numpy() for k, v in b.items()} for b in RecordsIterableDataset(built_dataset, "train", 8, rank=1, world_size=2))
    assert sorted(r0 + r1) == everything and not set(r0) & set(r1)
    with pytest.raises(records.DatasetError, match="too few to feed 3 readers"):
        RecordsIterableDataset(built_dataset, "train", 8, rank=0, world_size=3)


def test_readme_reader_example_runs_without_tensorflow(built_dataset, tmp_path):
    """The README's reader blocks, verbatim but for the data folder, with TensorFlow and Beam hidden."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("<!-- reader-example"):text.index("<!-- /reader-example -->")]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2 and 'data_dir = "out/coco"' in blocks[0]
    prelude = textwrap.dedent("""
        import keras
        model = keras.Sequential([keras.Input((128, 128, 2)), keras.layers.Conv2D(2, 16, strides=16),
                                  keras.layers.Flatten(), keras.layers.Dense(8)])
        model.compile(optimizer="sgd", loss="mse")
    """)
    checks = textwrap.dedent("""
        # (64 records over 2 shards here: each DataLoader worker's single shard gives a batch of 32)
        assert tuple(a.shape) == (32, 1, 128, 128) and float(a.min()) >= -1 and float(a.max()) <= 1
        assert x.shape == (64, 128, 128, 2) and y.shape == (64, 8) and patch_a.dtype.name == "uint8"
        assert len(model.history.history["loss"]) == 2
        print("ok")
    """)
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0].replace('"out/coco"', repr(built_dataset)) + prelude + blocks[1] + checks)
    hide_packages(tmp_path, {"tensorflow", "apache_beam"})
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=f"{tmp_path}:{REPO}"))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
