"""model.train and model.evaluate fail loudly and lose nothing (issue 15): damaged shards (cut short, a
flipped byte) through tf.data and the TensorFlow-free reader, divergence, two jobs on one run directory,
SIGTERM / SIGKILL, and the --max_minutes budget."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from model import network, train
from model.training import data, run_dir
from pipeline import records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 32 px patches: 4 steps of 8 pairs make an epoch of the 32 training pairs.
FAST = dict(batch_size=8, shuffle_buffer=16, steps_per_loop=1, log_every=1, val_every=0, architecture="compact")


@pytest.fixture(scope="module")
def tiny(tiny_dataset):
    return tiny_dataset


def shard_of(data_dir, split="train", index=0):
    info = json.load(open(os.path.join(data_dir, "homography_index.json")))
    return os.path.join(data_dir, info["splits"][split]["shards"][index]["file"])


def record_offsets(path):
    """Byte offset of each record (TFRecord framing: 8-byte length, 4-byte CRC, payload, 4-byte CRC)."""
    raw, offsets, pos = open(path, "rb").read(), [], 0
    while pos < len(raw):
        offsets.append(pos)
        pos += 12 + struct.unpack("<Q", raw[pos:pos + 8])[0] + 4
    return offsets


def damage(path, how):
    """Cuts the shard inside its 11th record, or flips one payload byte of it (its data CRC then fails)."""
    start = record_offsets(path)[10]
    if how == "cut":
        with open(path, "r+b") as f:
            f.truncate(start + 100)
    else:
        with open(path, "r+b") as f:
            f.seek(start + 12 + 50)
            byte = f.read(1)
            f.seek(start + 12 + 50)
            f.write(bytes([byte[0] ^ 0xFF]))
    return start


def reader_says(path):
    with pytest.raises(records.CorruptShardError) as e:
        for _ in records.iter_records(path):
            pass
    return e.value


def run_cli(module, *args, env=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def error_line(proc, module):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith(f"{module}: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("reader,how", [("tf.data", "cut"), ("tf.data", "flip"), ("records", "cut"),
                                        ("records", "flip")])
def test_damaged_shard_met_while_training_is_named_after_a_checkpoint(tiny, tmp_path, reader, how):
    copy = str(tmp_path / "ds")
    shutil.copytree(tiny, copy)
    shard = shard_of(copy, index=1)
    # The shard is damaged once training runs (step 3): the next epoch that reads it meets the damage.
    hook = lambda step: damage(shard, how) if step == 3 else None  # noqa: E731
    model_dir = str(tmp_path / "run")
    with pytest.raises(data.DamagedShardError) as e:
        train.train(copy, model_dir, steps=40, checkpoint_every=1000, step_hook=hook, reader=reader, **FAST)
    err, truth = e.value, reader_says(shard)
    assert (err.path, err.offset) == (truth.path, truth.offset) == (shard, truth.offset)
    message = str(err)
    assert f"shard {shard} is damaged at byte {truth.offset}" in message and "python -m pipeline.audit" in message
    stopped = int(message.split("training stopped at step ")[1].split(";")[0])
    assert stopped >= 3
    # checkpoint_every=1000: only the damage path saved this one, at the last completed step
    assert [s for s, _ in run_dir.checkpoints(model_dir)] == [stopped]
    assert not os.path.exists(os.path.join(model_dir, "model.keras"))


def test_damaged_shard_cli_train_and_evaluate_one_line_exit_2(tiny, tmp_path):
    copy = str(tmp_path / "ds")
    shutil.copytree(tiny, copy)
    shard = shard_of(copy, "validation", 0)
    damage(shard, "cut")
    offset = reader_says(shard).offset
    proc = run_cli("model.evaluate", f"--data_dir={copy}", f"--output_dir={tmp_path / 'report'}",
                   "--methods=identity")
    assert proc.returncode == 2
    line = error_line(proc, "model.evaluate")
    assert f"shard {shard} is damaged at byte {offset}" in line and "pipeline.audit" in line, line
    proc = run_cli("model.train", f"--data_dir={copy}", f"--model_dir={tmp_path / 'run'}", "--steps=4",
                   "--batch_size=8", "--val_every=2", "--checkpoint_every=100", "--steps_per_loop=1",
                   "--architecture=compact")
    assert proc.returncode == 2
    line = error_line(proc, "model.train")
    assert f"shard {shard} is damaged at byte {offset}" in line and "training stopped at step 2" in line, line
    assert [s for s, _ in run_dir.checkpoints(str(tmp_path / "run"))] == [2]


def finite_checkpoint(path, config):
    model = network.build(config["architecture"], config["patch_size"], config["channels"], config["dropout"],
                          config["batchnorm"])
    run_dir.restore_checkpoint(model, path)
    return all(np.isfinite(np.asarray(w)).all() for w in model.weights)


def test_divergence_stops_keeps_the_last_good_checkpoint_and_resumes(tiny, tmp_path):
    model_dir = str(tmp_path / "run")
    train.train(tiny, model_dir, steps=4, checkpoint_every=2, **FAST)
    assert [s for s, _ in run_dir.checkpoints(model_dir)] == [2, 4]
    final_of_step_4 = os.stat(os.path.join(model_dir, "model.keras")).st_mtime_ns
    # The squared loss with an absurd learning rate: weights and loss overflow in the first step or two.
    proc = run_cli("model.train", f"--data_dir={tiny}", f"--model_dir={model_dir}", "--steps=40",
                   "--batch_size=8", "--steps_per_loop=1", "--log_every=1", "--val_every=0", "--checkpoint_every=1",
                   "--architecture=compact", "--loss=euclidean", "--learning_rate=1e38")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc, "model.train")
    assert line.startswith("model.train: diverged: ") and "non-finite" in line, line
    assert " at step 5" in line or " by step 5" in line or " at step 6" in line, line
    # checkpoint_every=1, yet no checkpoint of the diverged weights: step 4's stays the one to resume from
    # (a finite but absurd step-5 checkpoint would be kept only if step 5's weights were all finite)
    saved = [s for s, _ in run_dir.checkpoints(model_dir)]
    assert saved[-1] <= 5 and f"the last good checkpoint (step {saved[-1]}) is where the same command resumes" \
        in line, line
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert all(finite_checkpoint(p, config) for _, p in run_dir.checkpoints(model_dir))
    # the diverged weights never reach model.keras either (it is still the one of the run that ended at 4)
    assert os.stat(os.path.join(model_dir, "model.keras")).st_mtime_ns == final_of_step_4
    for step, path in run_dir.checkpoints(model_dir):  # keep only the checkpoints from before the absurd rate
        if step > 4:
            os.remove(path)
    result = train.train(tiny, model_dir, steps=6, checkpoint_every=1, **FAST)
    assert result["start_step"] == 4 and result["final_step"] == 6
    model, _ = network.load(model_dir)
    assert all(np.isfinite(np.asarray(w)).all() for w in model.weights)


def wait_for(predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def history_steps(model_dir):
    try:
        return [r["step"] for r in json.load(open(os.path.join(model_dir, "history.json")))]
    except (OSError, ValueError):
        return []


def test_one_job_per_run_dir_sigterm_saves_sigkill_resumes(tiny, tmp_path):
    model_dir = str(tmp_path / "run")
    args = ["-m", "model.train", f"--data_dir={tiny}", f"--model_dir={model_dir}", "--steps=100000",
            "--batch_size=8", "--steps_per_loop=1", "--log_every=1", "--val_every=0", "--architecture=compact"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen([sys.executable, *args, "--checkpoint_every=1000"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(history_steps(model_dir)) >= 3), "the first job did not start training"
        # A second job on the same run directory is refused at once, naming the first.
        with pytest.raises(train.RunBusy, match=f"in use by process {first.pid} on "):
            train.train(tiny, model_dir, steps=5, **FAST)
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, stderr[-3000:]
    seen = history_steps(model_dir)[-1]
    saved = run_dir.latest_checkpoint(model_dir)[0]
    assert saved >= seen >= 3  # SIGTERM saved the last completed step (no periodic checkpoint before 1000)

    # SIGKILL, most likely while writing one of the checkpoints it writes every step: its lock file stays,
    # perhaps a partial checkpoint too.
    second = subprocess.Popen([sys.executable, *args, "--checkpoint_every=1"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: run_dir.latest_checkpoint(model_dir)[0] >= saved + 3)
    finally:
        second.kill()
        second.wait()
    assert json.load(open(os.path.join(model_dir, ".lock")))["pid"] == second.pid
    # what a kill in the middle of a checkpoint leaves: a partial file under a name no reader takes
    partial = os.path.join(model_dir, "checkpoints", "partial-999999-1.weights.h5")
    with open(partial, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    last = run_dir.latest_checkpoint(model_dir)[0]
    result = train.train(tiny, model_dir, steps=last + 2, checkpoint_every=1000, **FAST)
    assert result["start_step"] == last and result["final_step"] == last + 2
    assert not os.path.exists(partial)


def test_max_minutes_ends_like_a_normal_run_and_resumes(tiny, tmp_path):
    model_dir = str(tmp_path / "run")
    result = train.train(tiny, model_dir, steps=1000, checkpoint_every=500, max_minutes=0.0001, **FAST)
    stopped = result["final_step"]
    assert 1 <= stopped < 1000 and result["stop_reason"] == "max_minutes"
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["stop_reason"] == "max_minutes" and config["final_step"] == stopped
    assert [s for s, _ in run_dir.checkpoints(model_dir)] == [stopped]
    for name in ("model.keras", "history.json", "export/saved_model.pb"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    assert history_steps(model_dir)[-1] == stopped
    result = train.train(tiny, model_dir, steps=stopped + 3, checkpoint_every=500, **FAST)
    assert result["start_step"] == stopped and result["final_step"] == stopped + 3
    assert result["stop_reason"] == "complete" and history_steps(model_dir) == list(range(1, stopped + 4))


def test_augment_needs_the_records_reader_and_init_from_copies_weights(tiny, tmp_path):
    with pytest.raises(train.TrainError, match="--reader=records"):
        train.train(tiny, str(tmp_path / "r"), steps=1, augment=True, reader="tf.data", architecture="compact")
    with pytest.raises(train.TrainError, match="not a finished training run"):
        train.train(tiny, str(tmp_path / "r"), steps=1, architecture="compact",
                    architecture_options={"init_from": str(tmp_path / "nowhere")})
    # A fresh run started from another run's weights: before any step, its network is that run's network.
    first = str(tmp_path / "first")
    train.train(tiny, first, steps=2, batch_size=4, val_every=0, checkpoint_every=2, log_every=1, steps_per_loop=1,
                shuffle_buffer=8, architecture="compact", reader="records", augment=True)
    source, _ = network.load(first)
    copy = network.build("compact", 32, 1, options={"init_from": first})
    for a, b in zip(source.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)
