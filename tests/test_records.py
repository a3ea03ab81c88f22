"""pipeline.records / pipeline.dataset.tf_example: the shards written and read without TensorFlow, checked
against TensorFlow's own Example, TFRecord writer and tf.data reader on every record of a coco_mini build."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline import records
from pipeline.dataset import schema, tf_example
from pipeline.dataset.dataset_info import DatasetError

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYS = (schema.PATCH_A, schema.PATCH_B, schema.OFFSETS, schema.CORNERS, schema.IMAGE_ID, schema.PATCH_INDEX)


@pytest.fixture(scope="module")
def mini_build(tmp_path_factory, coco_mini):
    """Every image of coco_mini (178 train + 50 validation), 2 pairs each, 3 shards per split."""
    from pipeline.build import build
    from pipeline.dataset.geometry import PairConfig

    out = str(tmp_path_factory.mktemp("records") / "ds")
    build(coco_mini, out, {"train": "train2017", "validation": "val2017"}, PairConfig(patches_per_image=2),
          num_shards=3, beam_args=["--runner=DirectRunner"])
    return out


def _shards(data_dir, split):
    with open(os.path.join(data_dir, "homography_index.json")) as f:
        info = json.load(f)
    return [(os.path.join(data_dir, s["file"]), s["num_examples"]) for s in info["splits"][split]["shards"]]


def _tf_encode(tf, r):
    """The seed's schema.encode, verbatim in TensorFlow: the reference the TF-free codec must match."""
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        schema.PATCH_A: feature(bytes_list=tf.train.BytesList(value=[r[schema.PATCH_A].tobytes()])),
        schema.PATCH_B: feature(bytes_list=tf.train.BytesList(value=[r[schema.PATCH_B].tobytes()])),
        schema.OFFSETS: feature(float_list=tf.train.FloatList(value=r[schema.OFFSETS].tolist())),
        schema.CORNERS: feature(float_list=tf.train.FloatList(value=r[schema.CORNERS].tolist())),
        schema.IMAGE_ID: feature(int64_list=tf.train.Int64List(value=[int(r[schema.IMAGE_ID])])),
        schema.PATCH_INDEX: feature(int64_list=tf.train.Int64List(value=[int(r[schema.PATCH_INDEX])])),
    })).SerializeToString(deterministic=True)


def test_example_descriptors_are_tensorflows():
    from google.protobuf import descriptor_pb2
    from tensorflow.core.example import example_pb2, feature_pb2

    for ours, theirs in zip(tf_example.file_descriptor_protos(), (feature_pb2, example_pb2)):
        ref = descriptor_pb2.FileDescriptorProto()
        theirs.DESCRIPTOR.CopyToProto(ref)
        ref.ClearField("options")  # go/java package names only
        assert ours == ref


def test_every_record_of_a_coco_mini_build_is_tf_examples_bytes(mini_build):
    import tensorflow as tf
    from apache_beam.io.tfrecordio import _TFRecordUtil

    n = 0
    for split in ("train", "validation"):
        for path, count in _shards(mini_build, split):
            stored = list(records.iter_records(path))
            assert len(stored) == count > 0
            assert stored == [t.numpy() for t in tf.data.TFRecordDataset(path)]  # TF reads our framing
            for data in stored:
                r = schema.decode(data, 128, 1)
                assert _tf_encode(tf, r) == data  # the codec writes tf.train.Example's bytes
                assert schema.encode(r[schema.PATCH_A], r[schema.PATCH_B], r[schema.OFFSETS], r[schema.CORNERS],
                                     r[schema.IMAGE_ID], r[schema.PATCH_INDEX]) == data
            ours, beams = io.BytesIO(), io.BytesIO()
            for data in stored:
                records.write_record(ours, data)
                _TFRecordUtil.write_record(beams, data)
            with open(path, "rb") as f:
                assert ours.getvalue() == beams.getvalue() == f.read()
            n += count
    assert n == (178 + 50) * 2


def test_tf_record_writer_file_reads_back(tmp_path):
    import tensorflow as tf

    payloads = [b"", b"x", os.urandom(70000)]
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)
    assert list(records.iter_records(path)) == payloads
    ours = io.BytesIO()
    for p in payloads:
        records.write_record(ours, p)
    assert ours.getvalue() == pathlib.Path(path).read_bytes()


def test_reader_equals_tf_data_on_every_record(mini_build):
    import tensorflow as tf

    for split in ("train", "validation"):
        files = [p for p, _ in _shards(mini_build, split)]
        ref = {k: [] for k in KEYS}
        for batch in tf.data.TFRecordDataset(files).batch(100):
            parsed = schema.parse_batch(batch, 128, 1)
            for k in KEYS:
                ref[k].append(parsed[k].numpy())
        ref = {k: np.concatenate(v) for k, v in ref.items()}
        got = list(records.batches(mini_build, split, 100))
        assert [len(b[schema.IMAGE_ID]) for b in got][:-1] == [100] * (len(got) - 1)
        got = {k: np.concatenate([b[k] for b in got]) for k in KEYS}
        assert len(got[schema.IMAGE_ID]) == len(ref[schema.IMAGE_ID]) == records.open_split(mini_build, split).num_examples
        for k in KEYS:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert got[schema.PATCH_A].tobytes() == ref[schema.PATCH_A].tobytes()
        assert got[schema.PATCH_B].tobytes() == ref[schema.PATCH_B].tobytes()
        for k in (schema.OFFSETS, schema.CORNERS):  # bit for bit
            assert np.array_equal(got[k].view(np.uint32), ref[k].view(np.uint32)), k
        for k in (schema.IMAGE_ID, schema.PATCH_INDEX):
            assert np.array_equal(got[k], ref[k]), k


def _ids(batches):
    return [(int(i), int(p)) for b in batches for i, p in zip(b[schema.IMAGE_ID], b[schema.PATCH_INDEX])]


def test_shuffle_is_a_seeded_permutation(mini_build):
    plain = _ids(records.batches(mini_build, "train", 32))
    assert len(plain) == len(set(plain)) == 356
    a = _ids(records.batches(mini_build, "train", 32, shuffle=True, seed=3, shuffle_buffer=64))
    b = _ids(records.batches(mini_build, "train", 32, shuffle=True, seed=3, shuffle_buffer=64))
    c = _ids(records.batches(mini_build, "train", 32, shuffle=True, seed=4, shuffle_buffer=64))
    assert a == b and a != c and a != plain
    assert sorted(a) == sorted(c) == sorted(plain)
    small = _ids(records.batches(mini_build, "train", 100, shuffle=True, seed=3, shuffle_buffer=10))
    assert sorted(small) == sorted(plain) and small != plain  # a buffer smaller than a batch works too
    # Mixed beyond the buffer's reach: records travel across shards, not only within a window of 64.
    pos = {r: i for i, r in enumerate(plain)}
    assert max(abs(pos[r] - i) for i, r in enumerate(a)) > 64


def test_patch_matches_its_labels_after_shuffling(mini_build):
    """Shuffling moves whole records: each batch row's fields still belong together."""
    by_id = {(int(b[schema.IMAGE_ID][i]), int(b[schema.PATCH_INDEX][i])): (b[schema.PATCH_A][i].copy(), b[schema.OFFSETS][i].copy())
             for b in records.batches(mini_build, "train", 50) for i in range(len(b[schema.IMAGE_ID]))}
    for b in records.batches(mini_build, "train", 16, shuffle=True, seed=0, shuffle_buffer=100):
        for i in range(len(b[schema.IMAGE_ID])):
            a, off = by_id[(int(b[schema.IMAGE_ID][i]), int(b[schema.PATCH_INDEX][i]))]
            assert np.array_equal(a, b[schema.PATCH_A][i]) and np.array_equal(off, b[schema.OFFSETS][i])


def test_repeat_and_drop_remainder(mini_build):
    it = records.batches(mini_build, "validation", 64, repeat=True)
    got = [next(it) for _ in range(5)]  # 320 records out of 100 per epoch: three epochs and a bit
    assert all(len(b[schema.IMAGE_ID]) == 64 for b in got)
    ids = _ids(got)
    assert ids[:100] == ids[100:200] == ids[200:300]
    sizes = [len(b[schema.IMAGE_ID]) for b in records.batches(mini_build, "validation", 64)]
    assert sizes == [64, 36]
    assert [len(b[schema.IMAGE_ID]) for b in records.batches(mini_build, "validation", 64, drop_remainder=True)] == [64]
    assert records.num_batches(100, 64, False) == 2 and records.num_batches(100, 64, True) == 1


def test_worker_processes_give_the_same_batches(mini_build):
    for kwargs in ({}, {"shuffle": True, "seed": 5, "shuffle_buffer": 50}):
        inproc = list(records.batches(mini_build, "train", 40, **kwargs))
        workers = list(records.batches(mini_build, "train", 40, workers=2, **kwargs))
        assert len(inproc) == len(workers) == 9
        for x, y in zip(inproc, workers):
            for k in KEYS:
                assert np.array_equal(x[k], y[k]), k


def _copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_corrupt_and_truncated_shards_name_shard_and_offset(mini_build, tmp_path):
    ds = _copy_dataset(mini_build, tmp_path / "ds")
    path, count = _shards(ds, "validation")[1]
    good = list(records.iter_records(path))
    sizes = [len(r) + 16 for r in good]
    blob = pathlib.Path(path).read_bytes()
    third = sum(sizes[:2])  # byte offset of the third record

    def damaged(data, problem):
        pathlib.Path(path).write_bytes(data)
        got = []
        with pytest.raises(records.CorruptShardError, match=problem) as e:
            for r in records.iter_records(path):
                got.append(r)
        assert e.value.path == path and e.value.offset == third
        assert path in str(e.value) and f"byte offset {third}" in str(e.value) and "pipeline.audit" in str(e.value)
        assert got == good[:2]  # everything before the damage, nothing after it
        return e.value

    damaged(blob[:third + 100], "ends inside a record")
    damaged(blob[:third + 5], "ends inside a record header")
    flipped = bytearray(blob)
    flipped[third + 12 + 5000] ^= 0x01  # one bit inside the third record's patch bytes
    damaged(bytes(flipped), "data fails its CRC")
    flipped = bytearray(blob)
    flipped[third + 1] ^= 0x40  # the third record's length
    damaged(bytes(flipped), "length fails its CRC")

    # Through the reader (and its worker processes) the same error surfaces, never a batch of garbage.
    pathlib.Path(path).write_bytes(bytes(flipped))
    for workers in (0, 1):
        with pytest.raises(records.CorruptShardError) as e:
            list(records.batches(ds, "validation", 8, workers=workers))
        assert e.value.path == path and e.value.offset == third


def test_bad_datasets_raise_one_clear_error(mini_build, tmp_path):
    with pytest.raises(DatasetError, match="no homography_index.json in"):
        records.batches(str(tmp_path / "nowhere"), "train", 8)
    ds = _copy_dataset(mini_build, tmp_path / "ds")
    path, count = _shards(ds, "train")[0]
    os.remove(path)
    with pytest.raises(DatasetError, match=f"missing \\(or not files\\), e.g. {path}"):
        records.batches(ds, "train", 8)
    ds2 = _copy_dataset(mini_build, tmp_path / "ds2")
    path, count = _shards(ds2, "train")[2]
    kept = list(records.iter_records(path))[:-3]
    with open(path, "wb") as f:
        for r in kept:
            records.write_record(f, r)  # a valid shard, three records short of its index entry
    with pytest.raises(DatasetError, match=f"{path} holds {count - 3} records but homography_index.json lists {count}"):
        list(records.batches(ds2, "train", 8))
    with pytest.raises(DatasetError, match="does not fit the schema"):
        records.decode_batch([kept[0]], 64, 1)  # a reader told the wrong patch size


def test_cli_checks_a_dataset_and_fails_in_one_line(mini_build, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def run(data_dir, *flags):
        return subprocess.run([sys.executable, "-m", "pipeline.records", f"--data_dir={data_dir}", *flags],
                              capture_output=True, text=True, cwd=REPO, env=env)

    ok = run(mini_build, "--split=validation")
    assert ok.returncode == 0, ok.stderr
    assert "validation: 100 records in 3 shards, every CRC checked" in ok.stdout
    absent = _copy_dataset(mini_build, tmp_path / "absent")
    gone = _shards(absent, "train")[1][0]
    os.remove(gone)
    short = _copy_dataset(mini_build, tmp_path / "short")
    cut, count = _shards(short, "validation")[0]
    kept = list(records.iter_records(cut))[:-1]
    with open(cut, "wb") as f:
        for r in kept:
            records.write_record(f, r)
    broken = _copy_dataset(mini_build, tmp_path / "broken")
    damaged = _shards(broken, "train")[2][0]
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) - 10)
    for data_dir, named in ((tmp_path / "nothing", "homography_index.json"), (absent, gone),
                            (short, f"{cut} holds {count - 1} records but homography_index.json lists {count}"),
                            (broken, damaged)):
        bad = run(data_dir)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert bad.stderr.count("\n") == 1 and named in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def hide_packages(folder, names, log=None):
    """Writes folder/sitecustomize.py: with folder on PYTHONPATH, every Python process started (workers
    included) sees `names` as not installed (import fails, find_spec gives None); with `log`, each lookup
    of one of them is appended to that file."""
    pathlib.Path(folder, "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, sys
        from importlib.machinery import PathFinder
        HIDDEN, LOG = {set(names)!r}, {log and str(log)!r}
        if os.environ.get("HOOK_SEEN"):
            with open(os.environ["HOOK_SEEN"], "a") as f:
                f.write(f"{{os.getpid()}}\\n")
        class _Hiding(PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    if LOG:
                        with open(LOG, "a") as f:
                            f.write(f"{{os.getpid()}} {{name}}\\n")
                    return None
                return PathFinder.find_spec(name, path, target)
        sys.meta_path[:] = [_Hiding if f is PathFinder else f for f in sys.meta_path]
    """))


def test_reader_needs_only_numpy_and_protobuf(mini_build, tmp_path):
    """The reader and its worker processes (a sitecustomize reaches them too) with no TF, Beam, OpenCV."""
    hide_packages(tmp_path, {"tensorflow", "apache_beam", "cv2", "keras", "torch", "jax", "absl"})
    code = textwrap.dedent(f"""
        from pipeline import records
        if __name__ == "__main__":
            total = 0
            for b in records.batches({mini_build!r}, "train", 64, shuffle=True, seed=1, workers=1):
                total += int(b["image_id"].sum()) + int(b["patch_a"].sum(dtype="int64"))
            import cv2
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}"))
    assert "No module named 'cv2'" in out.stderr  # the hiding was in force, after the reader ran
    code = code.replace("import cv2", "print(total)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}"))
    assert out.returncode == 0, out.stderr
    expected = sum(int(b[schema.IMAGE_ID].sum()) + int(b[schema.PATCH_A].sum(dtype=np.int64))
                   for b in records.batches(mini_build, "train", 64))
    assert int(out.stdout.strip()) == expected


def test_build_generates_pairs_without_tensorflow(coco_mini, tmp_path):
    """Every process of a multi-processing build (driver and both workers) runs with TensorFlow hidden and
    logs any lookup of it; the build must succeed with an empty log."""
    hook, attempts = tmp_path / "hook", tmp_path / "attempts"
    hook.mkdir()
    hide_packages(hook, {"tensorflow"}, log=attempts)
    seen = tmp_path / "seen"
    env = dict(os.environ, PYTHONPATH=f"{hook}:{REPO}", HOOK_SEEN=str(seen))
    out = tmp_path / "ds"
    run = subprocess.run([sys.executable, "-m", "pipeline.build", f"--coco_dir={coco_mini}", f"--output_dir={out}",
                          "--max_images=8", "--patches_per_image=2", "--splits=train=train2017",
                          "--runner=DirectRunner", "--direct_num_workers=2",
                          "--direct_running_mode=multi_processing"], capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(seen.read_text().split()) >= 3  # the driver and the two SDK workers ran with the hook
    assert not attempts.exists(), attempts.read_text()
    assert records.open_split(str(out), "train").num_examples == 16
