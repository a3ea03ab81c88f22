"""The dataset audit: passes on a good build, and names the right hard check on each damaged dataset."""
import io
import json
import os
import shutil
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipeline import audit
from pipeline.auditing import measure, statistics
from pipeline.dataset import dataset_info, geometry, schema
from tests.conftest import REPO, textured_image

RUNNER = ["--runner=DirectRunner"]


# ---------------------------------------------------------------- helpers

def copy_dataset(src, tmp_path):
    """A private copy of the session-scoped build, safe to damage."""
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return str(dst)


def shard_path(data_dir, split, index):
    return dataset_info.read(data_dir).split(split).shard_files[index]


def rewrite_shard(data_dir, split, index, change):
    """Rewrites one shard, record by record, with change(i, record dict) -> record dict (schema.encode)."""
    import tensorflow as tf

    cfg = dataset_info.read(data_dir).config
    path = shard_path(data_dir, split, index)
    with open(path, "rb") as f:
        records = [schema.decode(r, cfg.patch_size, cfg.channels) for r in measure.iter_tfrecords(f)]
    with tf.io.TFRecordWriter(path) as w:
        for i, r in enumerate(records):
            r = change(i, dict(r))
            w.write(schema.encode(r["patch_a"], r["patch_b"], r["offsets"], r["corners"], r["image_id"],
                                  r["patch_index"], r.get(schema.PHOTOMETRIC_A), r.get(schema.PHOTOMETRIC_B)))


def run_audit(data_dir, tmp_path, **kw):
    return audit.audit(data_dir, str(tmp_path / "report"), beam_args=RUNNER, **kw)


def by_name(report):
    return {c["name"]: c for c in report["checks"]}


# ---------------------------------------------------------------- pure functions

def test_iter_tfrecords_reads_back_and_names_truncation(tmp_path):
    import tensorflow as tf

    payloads = [b"a" * 10, b"", b"xyz" * 50]
    with tf.io.TFRecordWriter(str(tmp_path / "x.tfrecord")) as w:
        for p in payloads:
            w.write(p)
    data = (tmp_path / "x.tfrecord").read_bytes()
    assert list(measure.iter_tfrecords(io.BytesIO(data))) == payloads
    with pytest.raises(measure.ShardReadError, match="truncated"):
        list(measure.iter_tfrecords(io.BytesIO(data[:-7])))
    corrupt = bytearray(data)
    corrupt[14] ^= 0xFF  # inside the first payload
    with pytest.raises(measure.ShardReadError, match="corrupt"):
        list(measure.iter_tfrecords(io.BytesIO(bytes(corrupt))))


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(3)
    image = textured_image(rng, 320, 240)[..., 0].copy()
    offsets = geometry.sample_offsets(rng, 32)
    return geometry.make_pair(image, 70, 50, offsets, 128)


def test_label_residual_small_for_true_label_large_for_wrong_ones(pair):
    good, valid = measure.label_residual(pair.patch_a, pair.patch_b, pair.offsets, 128)
    assert good < 0.2 and valid > 0.5
    flipped, _ = measure.label_residual(pair.patch_a, pair.patch_b, -pair.offsets, 128)
    swapped, _ = measure.label_residual(pair.patch_b, pair.patch_a, pair.offsets, 128)
    assert flipped > 5 and swapped > 5


def test_label_residual_colour():
    rng = np.random.default_rng(4)
    image = textured_image(rng, 320, 240)
    offsets = geometry.sample_offsets(rng, 32)
    p = geometry.make_pair(image, 40, 60, offsets, 128)
    assert p.patch_a.shape == (128, 128, 3)
    assert measure.label_residual(p.patch_a, p.patch_b, offsets, 128)[0] < 0.2
    assert measure.label_residual(p.patch_a, p.patch_b, -offsets, 128)[0] > 5


def test_offset_and_corner_problems():
    cfg = geometry.PairConfig()
    ok = np.zeros(8, np.float32)
    assert measure.offset_problem(ok + 32, 32) is None and measure.offset_problem(ok - 32, 32) is None
    assert "rho" in measure.offset_problem(np.r_[ok[:7], 32.5], 32)
    assert "finite" in measure.offset_problem(np.r_[ok[:7], np.nan], 32)
    assert measure.corner_problem(geometry.patch_corners(32, 80, 128).ravel(), cfg) is None
    assert measure.corner_problem(geometry.patch_corners(160, 32, 128).ravel(), cfg) is None
    assert "margins" in measure.corner_problem(geometry.patch_corners(31, 40, 128).ravel(), cfg)
    assert "margins" in measure.corner_problem(geometry.patch_corners(40, 81, 128).ravel(), cfg)
    assert "square" in measure.corner_problem(geometry.patch_corners(40, 40, 100).ravel(), cfg)
    assert "integer" in measure.corner_problem(geometry.patch_corners(40.5, 40, 128).ravel(), cfg)


def test_moments_and_histogram_merge_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=(101, 2))
    parts = [statistics.Moments(2) for _ in range(3)]
    hists = [statistics.Histogram(2, np.linspace(-2, 2, 5)) for _ in range(3)]
    for i, v in enumerate(x):
        parts[i % 3].add(v)
        hists[i % 3].add(v)
    for p, h in zip(parts[1:], hists[1:]):
        parts[0].merge(p)
        hists[0].merge(h)
    d = parts[0].to_dict()
    np.testing.assert_allclose(d["mean"], x.mean(0))
    np.testing.assert_allclose(d["std"], x.std(0))
    np.testing.assert_allclose(d["min"], x.min(0))
    for k in range(2):
        counts, _ = np.histogram(x[:, k], np.linspace(-2, 2, 5))
        np.testing.assert_array_equal(hists[0].counts[k], counts)
        assert hists[0].below[k] == (x[:, k] < -2).sum() and hists[0].above[k] == (x[:, k] > 2).sum()


def test_leakage_and_pairs_per_image_transforms_alone():
    summaries = [{"split": s, "image_id": i, "patch_index": k}
                 for s, ids in (("train", (1, 2, 3)), ("validation", (3, 4))) for i in ids for k in range(2)]
    summaries.append({"split": "validation", "image_id": 4, "patch_index": 5})  # a stray third pair
    with beam.Pipeline("DirectRunner") as p:
        per_image = p | beam.Create(summaries) | statistics.PairsPerImage(2, {("train", 2)})
        assert_that(per_image["images"] | statistics.Leakage(), equal_to([{"count": 1, "examples": [(3, ["train", "validation"])]}]),
                    label="leak")
        report = per_image["report"] | beam.Map(lambda kv: (kv[0], kv[1]["images"], kv[1]["wrong_pairs"]["count"],
                                                              kv[1]["failed_with_pairs"]["count"]))
        assert_that(report, equal_to([("train", 3, 0, 1), ("validation", 2, 1, 0)]), label="counts")


# ---------------------------------------------------------------- the audit job, good and damaged

def test_audit_passes_on_good_build_with_report_and_plots(built_dataset, tmp_path):
    before = sorted(os.listdir(built_dataset))
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "pipeline.audit", f"--data_dir={built_dataset}",
                           f"--output_dir={out}", "--runner=DirectRunner"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "audit.json").read_text())
    assert report["passed"] and report["failed_hard_checks"] == []
    names = by_name(report)
    for split in ("train", "validation"):
        for check in ("shard_read", "shard_counts", "split_counts", "pairs_per_image", "offset_range", "margins",
                      "label_consistency", "offset_uniformity", "near_constant_patches"):
            assert f"{split}/{check}" in names
        stats = report["stats"][split]
        assert stats["pairs"] == 64
        assert names[f"{split}/label_consistency"]["numbers"]["mean"] < 0.2
        assert max(stats["offsets"]["max"]) <= 32 and min(stats["offsets"]["min"]) >= -32
        for plot in ("offsets", "positions", "residuals", "intensity"):
            assert (out / f"{plot}-{split}.png").stat().st_size > 1000
    assert "leakage" in names and "duplicates" in names
    assert report["metrics"]["records_read"] == 128
    md = (out / "audit.md").read_text()
    assert "Verdict: PASS" in md and "train/label_consistency" in md
    assert sorted(os.listdir(built_dataset)) == before and not (out / audit.RAW_RESULTS).exists()


def test_sign_flipped_offsets_fail_label_consistency_only(built_dataset, tmp_path):
    data = copy_dataset(built_dataset, tmp_path)
    rewrite_shard(data, "train", 0, lambda i, r: dict(r, offsets=-r["offsets"]))
    report = run_audit(data, tmp_path)
    assert report["failed_hard_checks"] == ["train/label_consistency"]
    numbers = by_name(report)["train/label_consistency"]["numbers"]
    assert numbers["above_threshold"] >= 28 and numbers["max"] > 5  # 32 flipped pairs, few textureless


def test_swapped_patches_fail_label_consistency_cli_exit_1(built_dataset, tmp_path):
    data = copy_dataset(built_dataset, tmp_path)
    rewrite_shard(data, "validation", 1, lambda i, r: dict(r, patch_a=r["patch_b"], patch_b=r["patch_a"]))
    proc = subprocess.run([sys.executable, "-m", "pipeline.audit", f"--data_dir={data}",
                           f"--output_dir={tmp_path / 'report'}", "--runner=DirectRunner"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "FAILED hard checks: validation/label_consistency" in proc.stderr
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert report["failed_hard_checks"] == ["validation/label_consistency"]
    assert "Verdict: FAIL" in (tmp_path / "report" / "audit.md").read_text()


def test_truncated_shard_is_a_failed_check_not_a_crash(built_dataset, tmp_path):
    data = copy_dataset(built_dataset, tmp_path)
    path = shard_path(data, "train", 1)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 + 100)  # mid-record (records are equal-sized: size // 2 is a record boundary)
    report = run_audit(data, tmp_path)
    failed = report["failed_hard_checks"]
    assert "train/shard_read" in failed and "train/shard_counts" in failed
    assert not any(name.startswith("validation/") for name in failed)
    error = by_name(report)["train/shard_read"]["numbers"]["errors"][0]
    assert error["file"].endswith("train.tfrecord-00001-of-00002") and "truncated" in error["error"]
    assert 0 < error["records_before_error"] < 32


def test_offsets_beyond_rho_and_corners_outside_margins(built_dataset, tmp_path):
    data = copy_dataset(built_dataset, tmp_path)

    def beyond_rho(i, r):
        if i == 3:
            r["offsets"] = r["offsets"].copy()
            r["offsets"][5] = 32.5
        return r

    def outside_margins(i, r):
        return dict(r, corners=r["corners"] - np.float32(r["corners"][0] - 31) * np.array([1, 0] * 4, np.float32)) \
            if i == 0 else r

    rewrite_shard(data, "train", 0, beyond_rho)
    rewrite_shard(data, "validation", 0, outside_margins)
    report = run_audit(data, tmp_path)
    failed = report["failed_hard_checks"]
    assert "train/offset_range" in failed and "validation/margins" in failed
    assert "train/margins" not in failed and "validation/offset_range" not in failed
    names = by_name(report)
    assert names["train/offset_range"]["numbers"]["failures"]["count"] == 1
    assert names["train/offset_range"]["numbers"]["observed_max"] == 32.5
    assert "x in [32, 160]" in names["validation/margins"]["summary"]
    assert names["validation/margins"]["numbers"]["failures"]["count"] == 1


def test_dataset_info_counts_that_disagree_with_shards(built_dataset, tmp_path):
    data = copy_dataset(built_dataset, tmp_path)
    info = dataset_info.read(data).raw
    info["splits"]["validation"]["shards"][1]["num_examples"] += 3
    dataset_info.write(data, info)
    report = run_audit(data, tmp_path)
    assert report["failed_hard_checks"] == ["validation/shard_counts", "validation/split_counts"]
    assert by_name(report)["validation/shard_counts"]["numbers"]["mismatches"] == [
        {"file": info["splits"]["validation"]["shards"][1]["file"], "listed": 35, "read": 32}]


def test_image_id_in_two_splits_is_leakage(built_dataset, tmp_path):
    data = copy_dataset(built_dataset, tmp_path)
    cfg = dataset_info.read(data).config
    with open(shard_path(data, "train", 0), "rb") as f:
        train_id = schema.decode(next(measure.iter_tfrecords(f)), cfg.patch_size, cfg.channels)["image_id"]
    with open(shard_path(data, "validation", 0), "rb") as f:
        val_id = schema.decode(next(measure.iter_tfrecords(f)), cfg.patch_size, cfg.channels)["image_id"]
    # every pair of one validation image now claims a train image's id: counts stay consistent
    rewrite_shard(data, "validation", 0, lambda i, r: dict(r, image_id=train_id) if r["image_id"] == val_id else r)
    report = run_audit(data, tmp_path)
    assert report["failed_hard_checks"] == ["leakage"]
    assert by_name(report)["leakage"]["numbers"]["examples"] == [[train_id, ["train", "validation"]]]


def test_cli_usage_errors_exit_2_without_traceback(tmp_path):
    cases = [[f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'r'}"],          # no homography_index.json
             [f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'r'}", "--residual_threshold=abc"],
             [f"--output_dir={tmp_path / 'r'}"]]
    stderr = []
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", "pipeline.audit", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "pipeline.audit: error:" in proc.stderr
        stderr.append(proc.stderr)
    assert "no homography_index.json" in stderr[0] and "residual_threshold" in stderr[1] and "--data_dir" in stderr[2]


def test_dataflow_job_graph_builds(built_dataset, tmp_path):
    result = audit.audit(built_dataset, "gs://dummy-bucket/report", beam_args=[
        "--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--project=dummy-project", "--region=us-central1",
        "--temp_location=gs://dummy-bucket/tmp", "--sdk_location=container"])
    assert result["dry_run"]
    names = {t.unique_name for t in result["job"].proto_pipeline.components.transforms.values()}
    for step in ("ReadShards/Read", "MeasurePairs/Measure", "SplitStatistics/Combine", "ResidualQuantiles/Quantiles",
                 "PairsPerImage/Counts", "Leakage/Summarize", "Duplicates/Summarize", "WriteRaw"):
        assert step in names, step


def test_position_heat_map_is_bounded_at_the_largest_geometry():
    """Issue 24: one cell per pixel at 8192 px images was 7,105 x 7,105 int64 an accumulator (the audit passed
    6 GB); cells now span several pixels there, and stay one pixel at the default geometry."""
    small = statistics.SplitStatsFn(geometry.PairConfig(), 1.0).create_accumulator()["positions"]
    assert small.shape == (240 - 128 - 64 + 1, 320 - 128 - 64 + 1)
    big = geometry.PairConfig(image_width=8192, image_height=8192, patch_size=1024, channels=3, patches_per_image=85)
    fn = statistics.SplitStatsFn(big, 1.0)
    acc = fn.create_accumulator()
    assert acc["positions"].shape == (254, 254) and statistics.position_step(big) == 28  # 7,105 px / 28
    last = 8192 - 1024 - 32  # the largest top-left coordinate
    summary = {"image_id": 1, "patch_index": 0, "offsets": np.zeros(8), "top_left": np.array([last, 32.0]),
               "corner_problem": None, "offset_problem": None, "image": np.ones(4) * 50, "residual": 0.0,
               "valid_share": 1.0, "pixels": np.zeros((2, 256), np.int64)}
    acc = fn.add_input(acc, summary)
    assert acc["positions"][0, 253] == 1 and fn.extract_output(acc)["positions_step"] == 28
