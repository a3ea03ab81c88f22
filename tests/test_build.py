"""The Beam builder end to end: counts, homography_index.json, bad inputs, refusals, determinism, Dataflow graph."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import psutil
import pytest
import tensorflow as tf

from pipeline.build import BuildError, build, parse_splits
from pipeline.dataset import dataset_info, schema
from pipeline.dataset.geometry import PairConfig, homography_local
from tests.conftest import REPO, make_coco_layout, textured_image

DIRECT = ["--runner=DirectRunner"]


def _records(path):
    return [r.numpy() for r in tf.data.TFRecordDataset(path)]


def _all_records(out):
    info = dataset_info.read(out)
    return {s: [r for f in info.split(s, allow_empty=True).shard_files for r in _records(f)] for s in info.splits}


def test_end_to_end_counts_and_index_agree_with_files(synthetic_coco, tmp_path):
    out = str(tmp_path / "ds")
    info = build(synthetic_coco, out, parse_splits("train=train2017,validation=val2017"),
                 PairConfig(patches_per_image=3), num_shards=4, beam_args=DIRECT)
    assert info["config"]["patches_per_image"] == 3 and info["config"]["rho"] == 32
    train, val = info["splits"]["train"], info["splits"]["validation"]
    assert (train["images_listed"], train["images_used"], train["images_failed"], train["num_examples"]) == (6, 6, 0, 18)
    assert (val["images_listed"], val["num_examples"]) == (3, 9)
    assert [s["file"] for s in train["shards"]] == [f"homography-train.tfrecord-0000{i}-of-00004" for i in range(4)]
    records = _all_records(out)
    for split, s in info["splits"].items():
        for shard in s["shards"]:
            assert len(_records(os.path.join(out, shard["file"]))) == shard["num_examples"]
        assert len(records[split]) == s["num_examples"]
        assert open(os.path.join(out, f"failed_images-{split}.jsonl")).read() == ""
    # Every image appears with patch indices 0..2, and its label reproduces its warp.
    decoded = [schema.decode(r, 128, 1) for r in records["train"]]
    by_image = {}
    for d in decoded:
        by_image.setdefault(d["image_id"], []).append(d["patch_index"])
    assert {k: sorted(v) for k, v in by_image.items()} == {i: [0, 1, 2] for i in range(1, 7)}
    for d in decoded[:6]:
        assert np.abs(d["offsets"]).max() <= 32
        h = homography_local(d["offsets"], 128)
        warped = cv2.warpPerspective(d["patch_a"][..., 0], h, (128, 128), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        mask = cv2.warpPerspective(np.ones((128, 128), np.uint8), h, (128, 128), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
        mask = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
        assert np.abs(warped.astype(float) - d["patch_b"][..., 0])[mask].mean() < 0.5


def test_coco_mini_default_build(coco_mini, tmp_path):
    """The issue's acceptance run: 178 x 10 train and 50 x 10 validation pairs."""
    info = build(coco_mini, str(tmp_path / "ds"), parse_splits("train=train2017,validation=val2017"),
                 PairConfig(), beam_args=DIRECT)
    assert info["splits"]["train"]["num_examples"] == 1780
    assert info["splits"]["validation"]["num_examples"] == 500
    assert sum(s["num_examples"] for s in info["splits"]["train"]["shards"]) == 1780


def test_coco_mini_default_build_shards_split_evenly_over_workers(coco_mini, tmp_path, caplog):
    """Automatic shard counts are multiples of 8 (178 images: 8 shards of 22-23 images, never 1 idle
    worker for a lone last shard), and a named DirectRunner runs on Beam's FnApiRunner without trying Prism."""
    from pipeline.builder.shards import auto_num_shards

    assert [auto_num_shards(n, PairConfig()) for n in (5, 178, 1780, 5340, 40670)] == [5, 8, 16, 32, 200]
    assert all(auto_num_shards(n, PairConfig()) % 8 == 0 for n in range(8, 200000, 997))
    caplog.set_level("INFO")
    info = build(coco_mini, str(tmp_path / "ds"), parse_splits("train=train2017"), PairConfig(patches_per_image=1),
                 beam_args=DIRECT + ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    counts = sorted(s["num_examples"] for s in info["splits"]["train"]["shards"])
    assert len(counts) == 8 and counts[0] >= 22 and counts[-1] <= 23 and sum(counts) == 178
    assert info["build"]["runner"] == "DirectRunner" and info["build"]["metrics"]["train_pairs_written"] == 178
    assert "Prism" not in caplog.text


def test_runner_objects():
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from pipeline.runtime import runners

    for name in ("DirectRunner", "direct", "apache_beam.runners.direct.direct_runner.SwitchingDirectRunner"):
        assert isinstance(runners.pipeline_runner(PipelineOptions([f"--runner={name}"])), FnApiRunner)
    for name in ("DataflowRunner", "PrismRunner", runners.DASK_RUNNER):
        assert runners.pipeline_runner(PipelineOptions([f"--runner={name}"])) is None


def _cmyk_jpeg(image):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def test_bad_inputs_are_skipped_counted_and_listed(tmp_path):
    rng = np.random.default_rng(3)
    good = textured_image(rng)
    jpeg = cv2.imencode(".jpg", good)[1].tobytes()
    images = {
        "000000000001.jpg": good,
        "000000000002.png": textured_image(rng),                                   # PNG: used
        "000000000003.jpg": cv2.cvtColor(textured_image(rng), cv2.COLOR_BGR2GRAY),  # grayscale JPEG: used
        "000000000004.jpg": _cmyk_jpeg(textured_image(rng)),                      # CMYK JPEG: used
        "000000000005.jpg": cv2.resize(textured_image(rng), (90, 60)),             # smaller than target: used
        "000000000006.jpg": jpeg[: len(jpeg) // 2],                                # truncated
        "000000000007.jpg": b"",                                                   # zero bytes
        "000000000008.jpg": bytes(rng.integers(0, 256, 5000, dtype=np.uint8)),    # corrupt
        "000000000009.jpg": b"this is a text file, not an image\n" * 20,          # not an image
    }
    root = tmp_path / "coco"
    entries = make_coco_layout(root, "train2017", images)
    entries.append({"id": 10, "file_name": "000000000010.jpg", "width": 640, "height": 480})  # missing file
    with open(root / "annotations" / "instances_train2017.json", "w") as f:
        json.dump({"images": entries, "annotations": [], "categories": []}, f)
    out = str(tmp_path / "ds")
    info = build(str(root), out, {"train": "train2017"}, PairConfig(patches_per_image=2), beam_args=DIRECT)
    s = info["splits"]["train"]
    assert (s["images_listed"], s["images_used"], s["images_failed"], s["num_examples"]) == (10, 5, 5, 10)
    assert s["failed_by_reason"] == {"empty": 1, "missing": 1, "truncated": 1, "undecodable": 2}
    metrics = info["build"]["metrics"]  # the Beam counters agree with the index
    assert (metrics["train_images_listed"], metrics["train_images_used"], metrics["train_pairs_written"]) == (10, 5, 10)
    assert metrics["train_images_failed_undecodable"] == 2 and metrics["train_images_failed_missing"] == 1
    failed = [json.loads(line) for line in open(os.path.join(out, "failed_images-train.jsonl"))]
    assert [(f["image_id"], f["reason"]) for f in failed] == [
        (6, "truncated"), (7, "empty"), (8, "undecodable"), (9, "undecodable"), (10, "missing")]
    assert all(f["path"] and f["detail"] for f in failed)
    ids = {schema.decode(r, 128, 1)["image_id"] for r in _all_records(out)["train"]}
    assert ids == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "does not exist"),
    ("malformed_json", "malformed annotation file"),
    ("no_images_list", "no 'images' list"),
    ("empty_split", "has no images"),
    ("rho_too_big", "cannot fit"),
    ("bad_splits", "is not NAME=COCO_SPLIT"),
])
def test_bad_configuration_stops_before_the_job_starts(tmp_path, synthetic_coco, case, message):
    coco, splits, config = synthetic_coco, "train=train2017", PairConfig()
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    if case == "missing_dir":
        coco = str(tmp_path / "nope")
    elif case == "malformed_json":
        (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
        coco = str(root)
    elif case == "no_images_list":
        (root / "annotations" / "instances_train2017.json").write_text('{"annotations": []}')
        coco = str(root)
    elif case == "empty_split":
        (root / "train2017").mkdir()
        coco = str(root)
    elif case == "rho_too_big":
        config = PairConfig(rho=60)
    out = tmp_path / "ds"
    with pytest.raises(BuildError, match=message):
        build(coco, str(out), parse_splits("train" if case == "bad_splits" else splits), config, beam_args=DIRECT)
    assert not out.exists()


def test_folder_listing_without_annotations(tmp_path):
    rng = np.random.default_rng(5)
    make_coco_layout(tmp_path / "coco", "test2017", {f"{i:012d}.jpg": textured_image(rng) for i in (3, 11)}, annotation=None)
    info = build(str(tmp_path / "coco"), str(tmp_path / "ds"), {"train": "test2017"}, PairConfig(patches_per_image=1),
                 beam_args=DIRECT)
    assert info["splits"]["train"]["num_examples"] == 2
    assert "no annotation file" in info["splits"]["train"]["source"]


def test_image_info_file_is_accepted_like_test2017(tmp_path):
    rng = np.random.default_rng(6)
    make_coco_layout(tmp_path / "coco", "test2017", {f"{i:012d}.jpg": textured_image(rng) for i in (5, 6, 7)},
                     annotation="image_info")
    info = build(str(tmp_path / "coco"), str(tmp_path / "ds"), {"train": "test2017"}, PairConfig(patches_per_image=2),
                 beam_args=DIRECT)
    assert info["splits"]["train"]["num_examples"] == 6
    assert info["splits"]["train"]["source"].endswith("image_info_test2017.json")


def test_non_empty_output_dir_is_refused_unless_overwrite(synthetic_coco, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = (synthetic_coco, str(out), {"validation": "val2017"}, PairConfig(patches_per_image=1))
    with pytest.raises(BuildError, match="not empty"):
        build(*args, beam_args=DIRECT)
    info = build(*args, overwrite=True, beam_args=DIRECT)
    assert info["splits"]["validation"]["num_examples"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # files that are not ours are left alone


def test_a_build_that_dies_leaves_no_index_and_no_tfds_metadata(synthetic_coco, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    args = (synthetic_coco, str(out), {"validation": "val2017"}, PairConfig(patches_per_image=1))
    build(*args, beam_args=DIRECT)
    metadata = (schema.INDEX, schema.TFDS_DATASET_INFO, schema.TFDS_FEATURES)
    assert all((out / name).exists() for name in metadata)

    from pipeline.dataset import geometry

    def explode(*a, **k):
        raise RuntimeError("worker died")
    monkeypatch.setattr(geometry, "generate_pairs", explode)
    with pytest.raises(Exception, match="worker died"):
        build(*args, overwrite=True, beam_args=DIRECT)
    assert not any((out / name).exists() for name in metadata)


def test_same_records_byte_for_byte_whatever_the_runner_mode(coco_mini, tmp_path):
    kw = dict(splits={"train": "train2017"}, config=PairConfig(patches_per_image=2), max_images=24)
    one = build(coco_mini, str(tmp_path / "one"), beam_args=DIRECT + ["--direct_num_workers=1"], **kw)
    two = build(coco_mini, str(tmp_path / "two"),
                beam_args=DIRECT + ["--direct_num_workers=2", "--direct_running_mode=multi_processing"], **kw)
    assert one["splits"] == two["splits"]
    for shard in one["splits"]["train"]["shards"]:
        a = (tmp_path / "one" / shard["file"]).read_bytes()
        assert a == (tmp_path / "two" / shard["file"]).read_bytes() and len(a) > 0
    other_seed = build(coco_mini, str(tmp_path / "seed1"), beam_args=DIRECT,
                       **dict(kw, config=PairConfig(patches_per_image=2, seed=1)))
    assert sorted(_all_records(str(tmp_path / "seed1"))["train"]) != sorted(_all_records(str(tmp_path / "one"))["train"])
    assert other_seed["splits"]["train"]["num_examples"] == 48


def test_dataflow_job_graph_builds_offline(coco_mini):
    result = build(coco_mini, "gs://dummy-bucket/out", parse_splits("train=train2017,validation=val2017"),
                   PairConfig(), max_images=4, num_shards=16,
                   beam_args=["--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--project=dummy-project",
                              "--region=us-central1", "--temp_location=gs://dummy-bucket/tmp",
                              "--sdk_location=container"])
    names = {t.unique_name for t in result["job"].proto_pipeline.components.transforms.values()}
    for split in ("train", "validation"):
        for step in ("ListImages", "GroupByShard/Reshuffle", "WriteShards/GenerateAndWrite", "Finalize/Summarize"):
            assert f"{split}/{step}" in names
    assert "WriteDatasetInfo/Write" in names
    # The fusion break sits between the listing and the DoFn that reads the images.
    assert result["job"].proto.type.name == "JOB_TYPE_BATCH"


def test_cli_prints_a_clear_error_without_traceback(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "pipeline.build", f"--coco_dir={tmp_path}/missing",
                           f"--output_dir={tmp_path}/ds"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "pipeline.build: error: coco_dir" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline.build", "--output_dir=x"], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "--coco_dir and --output_dir are required" in proc.stderr


def _alive(procs, command=None):
    """The processes still running (of those whose command line starts with `command`, if given)."""
    found = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and command in (None, *p.cmdline()[:1]):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _sigkill_when(driver, ready, what: str, stderr=None) -> list:
    """Collects the driver's descendants until ready(procs) (60 s at most), SIGKILLs the driver and returns
    the command lines of those still running 5 s later (multiprocessing's resource tracker aside); every
    process started here is killed before it returns."""
    procs = {}
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            for p in psutil.Process(driver.pid).children(recursive=True):
                procs.setdefault(p.pid, p)
            if ready(procs):
                break
            assert driver.poll() is None, stderr.read_text()[-2000:] if stderr else "ended before the kill"
            time.sleep(0.02)
        else:
            pytest.fail(f"no {what} within 60 s")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        killed = time.time()
        while _alive(procs.values()) and time.time() - killed < 5:
            time.sleep(0.1)
        return [p.cmdline() for p in _alive(procs.values()) if "resource_tracker" not in " ".join(p.cmdline())]
    finally:  # only the processes started here
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for p in _alive(procs.values()):
            p.kill()


def _has_shard_bytes(out) -> bool:
    return out.exists() and any(".tfrecord-" in n and (out / n).stat().st_size for n in os.listdir(out))


@pytest.mark.parametrize("when", ["starting", "writing"])
def test_sigkilled_driver_takes_its_worker_processes_along(when, coco_mini, tmp_path):
    """SIGKILL leaves the driver no cleanup: its worker processes (multi_processing) end themselves within
    seconds. Beam's own workers, killed as they started, waited 2 x 60 s for the driver's channels. The
    killed build leaves shard files and never an index; the same command with --overwrite then writes the
    same bytes as a build that was never killed."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "pipeline.build", f"--coco_dir={coco_mini}", f"--output_dir={out}",
           "--splits=train=train2017", "--max_images=24", "--patches_per_image=40", "--num_shards=2",
           "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with open(tmp_path / "stderr", "w") as err:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    if when == "starting":  # both workers exist (not Beam's `sh -c` around them)
        ready = lambda procs: len(_alive(procs.values(), sys.executable)) == 2  # noqa: E731
    else:
        ready = lambda procs: _has_shard_bytes(out)  # noqa: E731
    left = _sigkill_when(driver, ready, f"worker processes {when}", tmp_path / "stderr")
    assert not left, f"{len(left)} worker processes outlived the driver by 5 s: {left}"
    names = set(os.listdir(out)) if out.exists() else set()
    assert names <= {f"homography-train.tfrecord-0000{i}-of-00002" for i in range(2)}, names  # no index, no TFDS files
    if when == "writing":
        rerun = subprocess.run(cmd + ["--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        build(coco_mini, str(tmp_path / "ref"), {"train": "train2017"}, PairConfig(patches_per_image=40),
              max_images=24, num_shards=2, beam_args=DIRECT)
        assert dataset_info.read(str(out)).raw["splits"] == dataset_info.read(str(tmp_path / "ref")).raw["splits"]
        for name in sorted(os.listdir(tmp_path / "ref")):
            if name.startswith(("homography-", "failed_images-")):
                assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_sigkilled_local_build_takes_its_pool_along(coco_mini, tmp_path):
    """pipeline.local_build's spawn pool: without the watchdog its workers finished the shard they held (and
    could sit on the task queue) after a SIGKILL of the driver; with it they end within seconds."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "pipeline.local_build", f"--coco_dir={coco_mini}", f"--output_dir={out}",
           "--splits=train=train2017", "--patches_per_image=100", "--num_shards=4", "--workers=2"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = _sigkill_when(driver, lambda procs: _has_shard_bytes(out), "shard written")
    assert not left, f"{len(left)} pool workers outlived the driver by 5 s"
    assert not (out / "homography_index.json").exists()
