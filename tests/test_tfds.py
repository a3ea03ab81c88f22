"""Every build is a TensorFlow Datasets dataset directory (issue 23): TFDS reads the records pipeline.records
reads, value for value; the metadata is the bytes TFDS itself writes; names, old builds and --overwrite."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pipeline import records
from pipeline.build import BuildError
from pipeline.build import build as beam_build
from pipeline.dataset import dataset_info, photometric, schema, tfds_metadata
from pipeline.dataset.geometry import PairConfig
from pipeline.local_build import LocalBuildError
from pipeline.local_build import build as local_build
from pipeline.reader.framing import iter_records
from tests.conftest import REPO

SMALL = dict(patch_size=32, rho=8, image_width=80, image_height=60)
SPLITS = {"train": "train2017", "validation": "val2017"}
FILE_ORDER = dict(shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1))

# key: (builder, dataset name, PairConfig arguments, build arguments)
BUILDS = {
    "gray": ("beam", "homography", dict(patches_per_image=3), dict(max_images=8, num_shards=3)),
    "color": ("local", "coco_pairs", dict(channels=3, patches_per_image=3), dict(max_images=8, num_shards=2)),
    "camera": ("local", "homography_camera", dict(photometric="camera", patches_per_image=3),
               dict(max_images=8, num_shards=2)),
    # 3 images in 5 shards: shards 3 and 4 of each split are empty files, listed with 0 records
    "empty_shards": ("beam", "homography", dict(patches_per_image=4), dict(max_images=3, num_shards=5)),
}

# The features a record of each schema version holds (camera builds: all of them). A change to the record
# schema fails here until schema.VERSION is bumped and its features are pinned below.
PINNED_FEATURES = {
    "1.0.0": {"patch_a", "patch_b", "offsets", "corners", "image_id", "patch_index", "photometric_a",
              "photometric_b"},
}


def run_build(kind, coco_dir, out, name, config, splits=SPLITS, **kw):
    if kind == "beam":
        return beam_build(coco_dir, str(out), splits, config, name=name, beam_args=["--runner=DirectRunner"], **kw)
    return local_build(coco_dir, str(out), splits, config, name=name, workers=2, log=None, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory, coco_mini):
    """key -> (TFDS data_dir, the build's folder = data_dir/<name>/<version>, as tfds.load looks for it)."""
    made = {}

    def get(key):
        if key not in made:
            kind, name, config, kw = BUILDS[key]
            root = tmp_path_factory.mktemp(f"tfds_{key}")
            out = root / name / schema.VERSION
            run_build(kind, coco_mini, out, name, PairConfig(**SMALL, **config), **kw)
            made[key] = (str(root), str(out))
        return made[key]
    return get


def project_records(data_dir, split):
    """The split as pipeline.records reads it, one dict a record in file order, plus the camera parameters
    of camera builds (which the batching reader leaves out) from the schema's own decoder."""
    info = dataset_info.read(data_dir)
    batch = next(records.batches(data_dir, split, batch_size=10**6))
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch[schema.IMAGE_ID]))]
    decoded = [schema.decode(r, info.config.patch_size, info.config.channels)
               for path in info.split(split).shard_files for r in iter_records(path)]
    assert len(decoded) == len(rows)
    for row, d in zip(rows, decoded):
        row.update({k: d[k] for k in (schema.PHOTOMETRIC_A, schema.PHOTOMETRIC_B) if k in d})
    return rows


def assert_same(tfds_rows, project_rows):
    assert len(tfds_rows) == len(project_rows) > 0
    for got, want in zip(tfds_rows, project_rows):
        assert set(got) == set(want)
        for key, value in want.items():
            assert np.asarray(got[key]).dtype == np.asarray(value).dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("key", list(BUILDS))
def test_builder_from_directory_reads_the_records_pipeline_records_reads(built, key):
    _, out = built(key)
    index = dataset_info.read(out)
    builder = tfds.builder_from_directory(out)
    assert (builder.info.name, str(builder.info.version)) == (BUILDS[key][1], schema.VERSION)
    assert index.raw["version"] == schema.VERSION
    c = index.config
    assert builder.info.features["patch_a"].shape == (c.patch_size, c.patch_size, c.channels)
    for split in SPLITS:
        s = index.split(split)
        assert builder.info.splits[split].shard_lengths == s.shard_counts
        assert builder.info.splits[split].num_examples == s.num_examples
        assert_same(list(tfds.as_numpy(builder.as_dataset(split=split, **FILE_ORDER))), project_records(out, split))
    if key == "empty_shards":
        assert index.split("train").shard_counts[-2:] == [0, 0]
    if key == "camera":
        assert schema.PHOTOMETRIC_A in builder.info.features


def test_tfds_load_finds_a_build_by_name_under_data_dir(built):
    root, out = built("gray")
    ds = tfds.load("homography", data_dir=root, split="validation", **FILE_ORDER)
    assert_same(list(tfds.as_numpy(ds)), project_records(out, "validation"))


@pytest.mark.parametrize("key, split, start, stop", [("gray", "train", 10, 20), ("empty_shards", "train", 3, 11),
                                                     ("empty_shards", "validation", 9, 12)])
def test_split_slicing_returns_the_right_records(built, key, split, start, stop):
    _, out = built(key)
    builder = tfds.builder_from_directory(out)
    sliced = list(tfds.as_numpy(builder.as_dataset(split=f"{split}[{start}:{stop}]", **FILE_ORDER)))
    assert_same(sliced, project_records(out, split)[start:stop])


def tfds_own_metadata(raw, directory):
    """dataset_info.json and features.json as TFDS's own DatasetInfo writes them for the same metadata."""
    c = raw["config"]
    p, ch = c["patch_size"], c["channels"]
    features = {
        "patch_a": tfds.features.Tensor(shape=(p, p, ch), dtype=np.uint8, encoding="bytes"),
        "patch_b": tfds.features.Tensor(shape=(p, p, ch), dtype=np.uint8, encoding="bytes"),
        "offsets": tfds.features.Tensor(shape=(8,), dtype=np.float32),
        "corners": tfds.features.Tensor(shape=(8,), dtype=np.float32),
        "image_id": tfds.features.Scalar(dtype=np.int64),
        "patch_index": tfds.features.Scalar(dtype=np.int64),
    }
    if photometric.model_name(c.get("photometric")) == "camera":
        features.update({k: tfds.features.Tensor(shape=(10,), dtype=np.float32)
                         for k in ("photometric_a", "photometric_b")})
    identity = tfds.core.dataset_info.DatasetIdentity(
        name=raw["name"], version=tfds.core.Version(schema.VERSION), data_dir=directory, module_name="",
        release_notes=schema.RELEASE_NOTES)
    info = tfds.core.DatasetInfo(builder=identity, features=tfds.features.FeaturesDict(features),
                                 description=tfds_metadata.description(raw), citation=tfds_metadata.CITATION,
                                 homepage=tfds_metadata.HOMEPAGE)
    info.set_file_format("tfrecord")
    info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[sh["num_examples"] for sh in s["shards"]], num_bytes=0,
                            filename_template=tfds.core.ShardedFileTemplate(
                                data_dir=directory, template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
                                dataset_name=raw["name"], split=split, filetype_suffix="tfrecord"))
        for split, s in raw["splits"].items()]))
    info.write_to_directory(directory)
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in (schema.TFDS_DATASET_INFO, schema.TFDS_FEATURES)}


@pytest.mark.parametrize("key", ["camera", "empty_shards", "color"])
def test_metadata_is_the_bytes_tfds_itself_writes(built, key, tmp_path):
    _, out = built(key)
    ours = {name: open(os.path.join(out, name), "rb").read()
            for name in (schema.TFDS_DATASET_INFO, schema.TFDS_FEATURES)}
    assert ours == tfds_own_metadata(dataset_info.read(out).raw, str(tmp_path))
    assert tfds_metadata.FILEPATH_TEMPLATE == tfds.core.naming.DEFAULT_FILENAME_TEMPLATE
    assert ".." not in ours[schema.TFDS_DATASET_INFO].decode() and "/" not in json.loads(
        ours[schema.TFDS_DATASET_INFO])["splits"][0]["filepathTemplate"]  # beside the shards: works on gs://


def test_beam_and_local_builds_write_the_same_tfds_metadata(built, coco_mini, tmp_path):
    _, beam_out = built("gray")
    _, name, config, kw = BUILDS["gray"]
    run_build("local", coco_mini, tmp_path / "local", name, PairConfig(**SMALL, **config), **kw)
    for file in (schema.TFDS_DATASET_INFO, schema.TFDS_FEATURES):
        assert (tmp_path / "local" / file).read_bytes() == open(os.path.join(beam_out, file), "rb").read()


def test_a_dashed_name_is_refused_before_the_build(coco_mini, tmp_path):
    with pytest.raises(BuildError, match="'coco-pairs' is not a TensorFlow Datasets name.*'coco_pairs'"):
        run_build("beam", coco_mini, tmp_path / "beam", "coco-pairs", PairConfig(**SMALL), max_images=1)
    with pytest.raises(LocalBuildError, match="not a TensorFlow Datasets name"):
        run_build("local", coco_mini, tmp_path / "local", "Coco", PairConfig(**SMALL), max_images=1)
    proc = subprocess.run([sys.executable, "-m", "pipeline.local_build", f"--coco_dir={coco_mini}",
                           f"--output_dir={tmp_path / 'cli'}", "--dataset_name=coco-pairs"],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("pipeline.local_build: error: --dataset_name 'coco-pairs' is not a TensorFlow")
    assert not any(p.exists() for p in (tmp_path / "beam", tmp_path / "local", tmp_path / "cli"))


def test_a_build_from_before_the_index_moved_is_refused_with_one_line(built, tmp_path):
    _, out = built("gray")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    raw = json.loads((old / schema.INDEX).read_text())
    raw["format_version"] = 1
    del raw["version"]
    (old / schema.INDEX).unlink()
    (old / schema.TFDS_FEATURES).unlink()
    (old / schema.TFDS_DATASET_INFO).write_text(json.dumps(raw))  # the old project index, under TFDS's name
    from model.training import data

    for read in (lambda: records.open_split(str(old), "train"), lambda: data.dataset_config(str(old), "train")):
        with pytest.raises(dataset_info.DatasetError, match="built before the project's index moved .* rebuild it"):
            read()
    proc = subprocess.run([sys.executable, "-m", "pipeline.records", f"--data_dir={old}"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "rebuild it" in proc.stderr, proc.stderr
    (old / schema.TFDS_DATASET_INFO).write_text(json.dumps({"name": "other", "version": "1.0.0"}))  # TFDS's own
    with pytest.raises(dataset_info.DatasetError, match=f"no {schema.INDEX} in .*: not a built dataset"):
        records.open_split(str(old), "train")


@pytest.mark.parametrize("kind", ["beam", "local"])
def test_overwrite_removes_every_file_of_the_previous_build(coco_mini, tmp_path, kind, monkeypatch):
    """Before it writes anything, --overwrite removes all the previous build wrote (TFDS's metadata too), so a
    build that then dies leaves nothing that claims the old dataset; one that completes leaves only its own."""
    from pipeline.builder import shards

    out = tmp_path / "ds"
    run_build(kind, coco_mini, out, "first_build", PairConfig(**SMALL, photometric="camera"), max_images=4,
              num_shards=3)
    (out / (schema.TFDS_FEATURES + ".tmp")).write_text("{}")  # a temporary file of an interrupted write
    first = set(os.listdir(out))
    assert {schema.INDEX, schema.TFDS_DATASET_INFO, schema.TFDS_FEATURES, "failed_images-train.jsonl",
            "first_build-train.tfrecord-00002-of-00003"} <= first
    (out / "notes.txt").write_text("mine")

    def second_build():  # no file name in common with the first: another name, another split
        run_build(kind, coco_mini, out, "second", PairConfig(**SMALL), splits={"holdout": "val2017"}, max_images=2,
                  num_shards=1, overwrite=True)

    def explode(*args):
        raise RuntimeError("died before its metadata")
    monkeypatch.setattr(shards, "write_metadata", explode)
    with pytest.raises(Exception, match="died before its metadata"):
        second_build()
    assert set(os.listdir(out)) & first == set()
    monkeypatch.undo()
    second_build()
    index = dataset_info.read(str(out))
    written = {schema.INDEX, schema.TFDS_DATASET_INFO, schema.TFDS_FEATURES, "failed_images-holdout.jsonl",
               "second-holdout.tfrecord-00000-of-00001"}
    assert index.split("holdout").shard_files == [os.path.join(str(out), "second-holdout.tfrecord-00000-of-00001")]
    assert set(os.listdir(out)) == written | {"notes.txt"}
    assert tfds.builder_from_directory(str(out)).info.name == "second"


def test_the_version_pins_the_record_schema(built):
    _, out = built("camera")
    info = dataset_info.read(out)
    record = next(iter_records(info.split("train").shard_files[0]))
    held = set(schema.decode(record, info.config.patch_size, info.config.channels))
    assert schema.VERSION in PINNED_FEATURES and schema.VERSION in schema.RELEASE_NOTES
    assert held == PINNED_FEATURES[schema.VERSION], "the record schema changed: bump schema.VERSION"
    assert set(tfds_metadata.features(info.raw["config"])["featuresDict"]["features"]) == held
