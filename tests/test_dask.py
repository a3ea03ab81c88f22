"""The builder and the audit on Beam's DaskRunner against real dask.distributed clusters (127.0.0.1 only):
the same records byte for byte as DirectRunner, the same counts, failed-image lists and audit verdicts;
a cluster of separate `dask scheduler` / `dask worker` processes; a worker killed mid-build; refusals."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import psutil
import pytest
from apache_beam.io.tfrecordio import _TFRecordUtil

from pipeline import audit
from pipeline.auditing import measure
from pipeline.build import BuildError, build
from pipeline.dataset import dataset_info, schema
from pipeline.dataset.geometry import PairConfig
from tests.conftest import REPO, make_coco_layout, textured_image

DIRECT = ["--runner=DirectRunner"]
DASK_BIN = os.path.join(os.path.dirname(sys.executable), "dask")


def shard_records(data_dir):
    """{shard file: [serialised records]} of every shard homography_index.json lists."""
    info = dataset_info.read(data_dir)
    out = {}
    for split in info.splits:
        for path in info.split(split, allow_empty=True).shard_files:
            with open(path, "rb") as f:
                out[os.path.basename(path)] = list(measure.iter_tfrecords(f))
    return out


def assert_same_dataset(direct_dir, dask_dir):
    a, b = dataset_info.read(direct_dir).raw, dataset_info.read(dask_dir).raw
    assert a["splits"] == b["splits"] and a["config"] == b["config"]  # counts, shard lists, failed counts
    ra, rb = shard_records(direct_dir), shard_records(dask_dir)
    assert ra.keys() == rb.keys() and sum(map(len, ra.values())) > 0
    for name in ra:  # record by record, then the files whole
        assert ra[name] == rb[name], name
        assert open(os.path.join(direct_dir, name), "rb").read() == open(os.path.join(dask_dir, name), "rb").read()
    for split in a["splits"]:
        name = schema.failed_images_file(split)
        assert open(os.path.join(direct_dir, name)).read() == open(os.path.join(dask_dir, name)).read()


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@contextlib.contextmanager
def dask_processes(tmp_path, workers=2, scheduler_env=None):
    """`dask scheduler` and `dask worker` as separate processes on 127.0.0.1, as README's recipe starts
    them; yields (address, {worker address: Popen}); always stopped. Orphans end themselves: the
    scheduler after 5 idle minutes, the workers 30 s after losing it."""
    sched_file = tmp_path / "scheduler.json"
    logs = tmp_path / "dask_logs"
    logs.mkdir(exist_ok=True)
    procs = []
    try:
        procs.append(subprocess.Popen(
            [DASK_BIN, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file), "--idle-timeout", "300"],
            stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"),
            env=dict(os.environ, **(scheduler_env or {}))))
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert sched_file.exists(), (logs / "scheduler.log").read_text()[-2000:]
        address = json.loads(sched_file.read_text())["address"]
        for i in range(workers):
            procs.append(subprocess.Popen(
                [DASK_BIN, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--host", "127.0.0.1", "--death-timeout", "30", "--name", f"w{i}"],
                stdout=subprocess.DEVNULL, stderr=open(logs / f"worker{i}.log", "w")))
        from distributed import Client
        with Client(address, timeout=30, set_as_default=False) as client:
            if workers:
                client.wait_for_workers(workers, timeout=60)
            pids = client.run(os.getpid)
        by_pid = {p.pid: p for p in procs[1:]}
        yield address, {addr: by_pid[pid] for addr, pid in pids.items()}
    finally:
        _stop(procs[::-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_processes(tmp_path_factory.mktemp("dask")) as (address, workers):
        yield address


def dask_args(address):
    return ["--runner=DaskRunner", f"--dask_client_address={address}"]


# ---------------------------------------------------------------- the builder

def test_coco_mini_every_record_identical_with_a_two_process_local_cluster(coco_mini, tmp_path):
    """No address: the build starts a LocalCluster of 2 worker processes and closes it at the end."""
    kw = dict(splits={"train": "train2017", "validation": "val2017"}, config=PairConfig(patches_per_image=2))
    direct = build(coco_mini, str(tmp_path / "direct"), beam_args=DIRECT, **kw)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    dask = build(coco_mini, str(tmp_path / "dask"), beam_args=["--runner=DaskRunner", "--dask_local_workers=2"], **kw)
    assert (dask["splits"]["train"]["num_examples"], dask["splits"]["validation"]["num_examples"]) == (356, 100)
    assert len(dask["splits"]["train"]["shards"]) == 8
    assert_same_dataset(str(tmp_path / "direct"), str(tmp_path / "dask"))
    assert dask["build"]["runner"].endswith("DaskRunner") and "metrics" in direct["build"]
    assert "collects no Beam metrics" in dask["build"]["metrics_unavailable"]
    time.sleep(1)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, f"LocalCluster processes still running: {[p.cmdline()[:4] for p in left]}"


def _layout_with_bad_images(root):
    rng = np.random.default_rng(5)
    jpeg = cv2.imencode(".jpg", textured_image(rng))[1].tobytes()
    images = {f"{i:012d}.jpg": textured_image(rng) for i in range(1, 8)}
    images.update({"000000000008.jpg": jpeg[: len(jpeg) // 2], "000000000009.jpg": b"",
                   "000000000010.jpg": b"not an image\n" * 50})
    entries = make_coco_layout(root, "train2017", images)
    entries.append({"id": 11, "file_name": "000000000011.jpg", "width": 640, "height": 480})  # missing file
    with open(root / "annotations" / "instances_train2017.json", "w") as f:
        json.dump({"images": entries, "annotations": [], "categories": []}, f)


def test_cli_build_on_separate_scheduler_and_worker_processes_with_bad_inputs(cluster, tmp_path):
    root = tmp_path / "coco"
    _layout_with_bad_images(root)
    kw = dict(splits={"train": "train2017"}, config=PairConfig(patches_per_image=3), num_shards=3)
    build(str(root), str(tmp_path / "direct"), beam_args=DIRECT, **kw)
    proc = subprocess.run([sys.executable, "-m", "pipeline.build", f"--coco_dir={root}",
                           f"--output_dir={tmp_path / 'dask'}", "--splits=train=train2017", "--patches_per_image=3",
                           "--num_shards=3"] + dask_args(cluster),
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train       from train2017: 21 pairs in 3 shards; images listed 11, used 7, failed 4" in proc.stdout
    assert_same_dataset(str(tmp_path / "direct"), str(tmp_path / "dask"))
    failed = [json.loads(line) for line in open(tmp_path / "dask" / "failed_images-train.jsonl")]
    assert [(f["image_id"], f["reason"]) for f in failed] == [
        (8, "truncated"), (9, "empty"), (10, "undecodable"), (11, "missing")]


@pytest.mark.parametrize("retries", [3, 0])
def test_worker_killed_mid_build_is_redone_or_fails_cleanly(retries, coco_mini, tmp_path):
    """Dask's default (3 retries): the dead worker's tasks are redone elsewhere, records byte-identical.
    No retries allowed: the build fails with one line and no homography_index.json."""
    kw = dict(splits={"train": "train2017"}, config=PairConfig(patches_per_image=20), max_images=48, num_shards=4)
    if retries:
        build(coco_mini, str(tmp_path / "direct"), beam_args=DIRECT, **kw)
    out = tmp_path / "dask"
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(retries)}
    with dask_processes(tmp_path, workers=2, scheduler_env=env) as (address, workers):
        from distributed import Client
        killed = {}

        def kill_a_busy_worker():  # as soon as the first shard file is being written
            with Client(address, timeout=30, set_as_default=False) as client:
                deadline = time.time() + 120
                while time.time() < deadline and not killed:
                    if out.exists() and any(".tfrecord-" in n for n in os.listdir(out)):
                        busy = {w: ts for w, ts in client.processing().items() if ts and w in workers}
                        if busy:
                            victim = sorted(busy)[0]
                            os.kill(workers[victim].pid, signal.SIGKILL)
                            killed.update(worker=victim, tasks=len(busy[victim]))
                    time.sleep(0.01)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        if retries:
            info = build(coco_mini, str(out), beam_args=dask_args(address), **kw)
        else:
            with pytest.raises(BuildError, match=r"^the dask job failed, workers died running one of its tasks: "
                                                 r".*all those workers died"):
                build(coco_mini, str(out), beam_args=dask_args(address), **kw)
        killer.join(timeout=30)
        assert killed and killed["tasks"] > 0, "no worker was killed while it held work"
        assert workers[killed["worker"]].poll() == -signal.SIGKILL
    if retries:
        assert info["splits"]["train"]["num_examples"] == 960
        assert_same_dataset(str(tmp_path / "direct"), str(out))
    else:
        assert not (out / schema.INDEX).exists()


@pytest.mark.parametrize("module", ["pipeline.build", "pipeline.audit"])
def test_unreachable_scheduler_is_refused_before_the_job_with_one_line(module, built_dataset, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(built_dataset, data)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ([f"--coco_dir={REPO.parent / 'shared' / 'data' / 'coco_mini'}", f"--output_dir={data}", "--overwrite"]
            if module == "pipeline.build" else [f"--data_dir={data}", f"--output_dir={tmp_path / 'report'}"])
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", module, *args, "--runner=DaskRunner",
                           f"--dask_client_address=tcp://127.0.0.1:{port}", "--dask_connection_timeout=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if f"{module}: error:" in line]
    assert len(errors) == 1 and f"cannot reach the dask scheduler at tcp://127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in proc.stderr and time.time() - started < 60
    # Refused before anything was touched: the dataset (even with --overwrite) and its index are intact.
    assert sorted(os.listdir(data)) == sorted(os.listdir(built_dataset))
    assert not (tmp_path / "report" / "audit.json").exists()


def test_worker_blind_to_a_path_and_scheduler_without_workers_are_refused(cluster, tmp_path, monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.runtime import runners

    # The workers, not the driver, check: a path no worker sees is named with the worker.
    with pytest.raises(runners.RunnerError, match=r"dask worker tcp://127\.0\.0\.1:\d+ cannot see .*/not-mounted"):
        with runners.session(PipelineOptions(dask_args(cluster)), worker_paths=[str(tmp_path / "not-mounted")]):
            pytest.fail("the job must not start")
    monkeypatch.setattr(runners, "WORKER_WAIT_S", 2)
    with dask_processes(tmp_path, workers=0) as (address, _):
        with pytest.raises(runners.RunnerError, match="has no workers after 2 s"):
            with runners.session(PipelineOptions(dask_args(address))):
                pytest.fail("the job must not start")


# ---------------------------------------------------------------- the audit

def _damaged(built_dataset, tmp_path):
    """Shard 0 of train with sign-flipped labels, shard 1 of validation truncated mid-record."""
    data = tmp_path / "damaged"
    shutil.copytree(built_dataset, data)
    info = dataset_info.read(str(data))
    cfg = info.config
    path = info.split("train").shard_files[0]
    with open(path, "rb") as f:
        records = [schema.decode(r, cfg.patch_size, cfg.channels) for r in measure.iter_tfrecords(f)]
    with open(path, "wb") as f:
        for r in records:
            _TFRecordUtil.write_record(f, schema.encode(r["patch_a"], r["patch_b"], -r["offsets"], r["corners"],
                                                        r["image_id"], r["patch_index"]))
    path = info.split("validation").shard_files[1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 + 100)
    return str(data)


def _verdict(report):
    return (report["passed"], report["failed_hard_checks"], report["failed_soft_checks"],
            [(c["name"], c["hard"], c["passed"], c["summary"]) for c in report["checks"]])


def test_audit_verdict_identical_on_both_runners(cluster, built_dataset, tmp_path):
    for name, data in (("good", built_dataset), ("damaged", _damaged(built_dataset, tmp_path))):
        direct = audit.audit(data, str(tmp_path / f"{name}-direct"), beam_args=DIRECT)
        dask = audit.audit(data, str(tmp_path / f"{name}-dask"), beam_args=dask_args(cluster))
        assert _verdict(dask) == _verdict(direct), name
        assert dask["shards"] == direct["shards"] and dask["pairs_per_image"] == direct["pairs_per_image"]
        for split, stats in direct["stats"].items():  # same pairs measured; sums may differ in the last bit
            assert dask["stats"][split]["pairs"] == stats["pairs"]
            np.testing.assert_allclose(dask["stats"][split]["offsets"]["mean"], stats["offsets"]["mean"], rtol=1e-9)
        if name == "good":
            assert direct["passed"] and direct["metrics"]["records_read"] == 128 and dask["metrics"] == {}
        else:
            assert not direct["passed"]
            assert {"train/label_consistency", "validation/shard_read", "validation/shard_counts"} <= set(
                direct["failed_hard_checks"])
