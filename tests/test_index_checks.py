"""Issue 24, an index that disagrees with itself or its shards: one check of the index
(pipeline/dataset/index_checks.py) behind every reader (pipeline.records and its Keras adapter, tf.data in
model.training.data, the audit), record lengths bounded by the index's geometry before anything is
allocated, and a shard of another patch size named in one line, never a wrong MACE with exit 0."""
import json
import os
import shutil
import struct

import pytest

from model.training import data
from pipeline import records
from pipeline.dataset import dataset_info, index_checks, schema
from pipeline.dataset.dataset_info import DatasetError
from pipeline.reader import framing
from pipeline.reader.keras_dataset import RecordsPyDataset
from tests.test_model_train_failures import error_line, run_cli


def copy_with(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        raw = json.loads((dst / schema.INDEX).read_text())
        edit(raw)
        (dst / schema.INDEX).write_text(json.dumps(raw))
    return str(dst)


def shard(data_dir, split, index):
    raw = json.loads(open(os.path.join(data_dir, schema.INDEX)).read())
    return os.path.join(data_dir, raw["splits"][split]["shards"][index]["file"])


def _set(path, value):
    def edit(raw):
        *keys, last = path
        target = raw
        for k in keys:
            target = target[k]
        target[last] = value
    return edit


def _twice(shards):  # the second shard replaced by the first under another spelling: counts still agree
    shards[1] = dict(shards[0], file="./" + shards[0]["file"])


BAD_INDEXES = [  # (edit, what the one line says)
    (_set(["splits", "validation", "num_examples"], 3), "num_examples is 3 but its 2 shards list 32 records"),
    (_set(["splits", "validation", "num_examples"], -5), "num_examples is -5, not a whole number >= 0"),
    (_set(["splits", "validation", "shards", 0, "num_examples"], -5), "is -5, not a whole number >= 0"),
    (_set(["splits", "validation", "shards", 0, "num_examples"], 3.5), "is 3.5, not a whole number >= 0"),
    (_set(["splits", "validation", "shards", 0, "file"], "../../elsewhere"), "is not a file name inside"),
    (_set(["config", "patch_size"], 100000), "patch_size 100000 is larger than the 1024 px allowed"),
    (_set(["config", "rho"], 0), "rho must be at least 1, got 0"),
    # second round (issue 24): what int() used to let through, and shards read twice
    (_set(["config", "rho"], 8.5), "config 'rho' is 8.5, not a whole number"),
    (_set(["config", "patch_size"], True), "config 'patch_size' is True, not a whole number"),
    (_set(["splits", "validation", "shards", 0, "file"], "a\u0000b"), "is not a file name inside"),
    (lambda raw: _twice(raw["splits"]["validation"]["shards"]), "is listed twice"),
    (lambda raw: raw["splits"]["validation"].update(raw["splits"]["train"]), "is listed twice (also in split 'train')"),
]


@pytest.mark.parametrize("edit,says", BAD_INDEXES)
def test_every_reader_refuses_an_index_that_disagrees_with_itself(tiny_dataset, tmp_path, edit, says):
    ds = copy_with(tiny_dataset, tmp_path / "ds", edit)
    readers = {"records.batches": lambda: list(records.batches(ds, "validation", 8)),
               "keras adapter": lambda: RecordsPyDataset(ds, "validation", 8, training=False)[0],
               "tf.data": lambda: next(iter(data.make_dataset(ds, "validation", 8, training=False))),
               "parsed_batches": lambda: next(data.parsed_batches(ds, "validation", 8, reader="records"))}
    for name, read in readers.items():
        with pytest.raises(DatasetError, match=f"{schema.INDEX}.*") as e:
            read()
        assert says in str(e.value), (name, str(e.value))
    proc = run_cli("pipeline.records", f"--data_dir={ds}", "--split=validation")
    assert proc.returncode == 2 and says in error_line(proc, "pipeline.records")


def claim_length(path, length, record=0):
    """Rewrites one record's header to claim `length` bytes, its CRC made valid again."""
    raw = bytearray(open(path, "rb").read())
    pos = 0
    for _ in range(record):
        pos += 16 + struct.unpack("<Q", raw[pos:pos + 8])[0]
    head = struct.pack("<Q", length)
    raw[pos:pos + 12] = head + struct.pack("<I", framing.masked_crc32c(head))
    open(path, "wb").write(bytes(raw))
    return pos


def test_a_header_claiming_one_tebibyte_is_refused_before_it_is_read(tiny_dataset, tmp_path):
    ds = copy_with(tiny_dataset, tmp_path / "ds")
    path = shard(ds, "train", 1)
    offset = claim_length(path, 1 << 40, record=5)
    lo, hi = index_checks.record_bounds(32, 1)
    with pytest.raises(records.CorruptShardError) as e:  # no MemoryError: nothing that size is asked for
        list(records.batches(ds, "train", 8))
    assert (e.value.path, e.value.offset) == (path, offset)
    assert f"a record of {1 << 40} bytes where this dataset's geometry makes records of {lo} to {hi}" in str(e.value)
    with pytest.raises(records.CorruptShardError):  # tf.data: refused before TFRecordDataset reads the header
        data.make_dataset(ds, "train", 8, training=True)
    proc = run_cli("model.train", f"--data_dir={ds}", f"--model_dir={tmp_path / 'run'}", "--steps=2",
                   "--batch_size=8", "--architecture=compact")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"shard {path} is damaged at byte {offset} (a record of {1 << 40} bytes" in error_line(proc, "model.train")


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory, coco_mini):
    """tiny_dataset's flags with 16 px patches: its shards hold 16-px records, four of which make the bytes of
    one 32-px patch."""
    from pipeline import local_build
    from pipeline.dataset.geometry import PairConfig

    out = str(tmp_path_factory.mktemp("tiny16") / "ds")
    local_build.build(coco_mini, out, {"train": "train2017", "validation": "val2017"},
                      PairConfig(patch_size=16, rho=8, image_width=80, image_height=60, patches_per_image=4),
                      max_images=8, num_shards=2, workers=1, log=None)
    return out


def mixed(tiny_dataset, tiny16, dst):
    """tiny_dataset with its second validation shard replaced by the 16-px build's, counts made consistent."""
    ds = copy_with(tiny_dataset, dst)
    shutil.copy(shard(tiny16, "validation", 1), shard(ds, "validation", 1))
    return ds, shard(ds, "validation", 1)


def test_a_shard_of_another_patch_size_is_named_not_reshaped(tiny_dataset, tiny16, tmp_path):
    ds, odd = mixed(tiny_dataset, tiny16, tmp_path / "ds")
    with pytest.raises(records.CorruptShardError, match="another patch size") as e:
        list(records.batches(ds, "validation", 8))
    assert e.value.path == odd
    with pytest.raises(records.CorruptShardError, match="another patch size"):
        data.read_batches(ds, "validation", 8)
    proc = run_cli("model.train", f"--data_dir={ds}", f"--model_dir={tmp_path / 'run'}", "--steps=2",
                   "--batch_size=8", "--val_every=2", "--architecture=compact", "--steps_per_loop=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc, "model.train")
    assert f"shard {odd} is damaged at byte 0" in line and "another patch size" in line, line
    assert "validation MACE" not in proc.stdout + proc.stderr


def test_parse_batch_never_reshapes_other_patches_and_the_shard_is_found(tiny_dataset, tiny16, tmp_path):
    import tensorflow as tf

    small = [r for r in records.iter_records(shard(tiny16, "validation", 1))][:8]
    with pytest.raises(tf.errors.InvalidArgumentError) as e:  # 8 records of 16 px are not 2 of 32 px
        schema.parse_batch(tf.constant(small), 32, 1)
    ds, odd = mixed(tiny_dataset, tiny16, tmp_path / "ds")
    found = data.damaged_shard(e.value, ds, "validation")  # what training and evaluation do with that error
    assert found.path == odd and "another patch size" in str(found)


def test_tf_data_count_errors_name_the_shard(tiny_dataset, tmp_path):
    def move_one(raw):  # the index still adds up, but two shards' counts are wrong
        shards = raw["splits"]["train"]["shards"]
        shards[0]["num_examples"] += 1
        shards[1]["num_examples"] -= 1
    ds = copy_with(tiny_dataset, tmp_path / "ds", move_one)
    with pytest.raises(DatasetError, match=f"{shard(ds, 'train', 0)} holds 16 records but "
                                           f"{schema.INDEX} lists 17"):
        data.make_dataset(ds, "train", 8, training=True)
    proc = run_cli("model.evaluate", f"--data_dir={ds}", "--split=train", f"--output_dir={tmp_path / 'r'}",
                   "--methods=identity")
    assert proc.returncode == 2
    assert f"{shard(ds, 'train', 0)} holds 16 records" in error_line(proc, "model.evaluate")


def test_the_audit_reads_bounded_records_and_reports_instead_of_crashing(tiny_dataset, tiny16, tmp_path):
    from pipeline import audit

    ds, odd = mixed(tiny_dataset, tiny16, tmp_path / "ds")
    claim_length(shard(ds, "train", 0), 1 << 40)
    report = audit.audit(ds, str(tmp_path / "report"), beam_args=["--runner=DirectRunner"])
    assert {"train/shard_read", "validation/shard_read"} <= set(report["failed_hard_checks"])
    errors = {c["name"]: c["numbers"]["errors"] for c in report["checks"] if c["name"].endswith("/shard_read")}
    assert "a record of 1099511627776 bytes" in errors["train/shard_read"][0]["error"]
    assert errors["validation/shard_read"][0]["file"] == os.path.basename(odd)
    assert "another patch size" in errors["validation/shard_read"][0]["error"]


def test_a_shard_or_an_index_that_is_a_folder_is_one_line(tiny_dataset, tmp_path):
    """Issue 24, second round: a folder under a shard's or the index's name was read as a file (a traceback)."""
    ds = copy_with(tiny_dataset, tmp_path / "ds")
    first = shard(ds, "validation", 0)
    os.remove(first)
    os.mkdir(first)
    for name, read in {"records.batches": lambda: list(records.batches(ds, "validation", 8)),
                       "dataset_config": lambda: data.dataset_config(ds, "validation")}.items():
        with pytest.raises(DatasetError, match="are missing \\(or not files\\)"):
            read()
    proc = run_cli("pipeline.records", f"--data_dir={ds}", "--split=validation", "--workers=-1")
    assert proc.returncode == 2 and "--workers must be >= 0" in error_line(proc, "pipeline.records")
    os.remove(os.path.join(ds, schema.INDEX))
    os.mkdir(os.path.join(ds, schema.INDEX))
    proc = run_cli("pipeline.records", f"--data_dir={ds}", "--split=validation")
    assert proc.returncode == 2 and "cannot be read: Is a directory" in error_line(proc, "pipeline.records")
