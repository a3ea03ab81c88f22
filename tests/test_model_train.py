"""model/train.py: a tiny run overfits, writes the whole run record, resumes at the saved step with the
same schedule, exports a working model, and refuses bad inputs before training."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from model import network, train
from model.training import data, run_dir
from pipeline.dataset import geometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and fast on CPU: 32 px patches, rho 8 (identity MACE ~6 px), 32 train + 32 validation pairs.
TINY = dict(batch_size=32, shuffle_buffer=64, steps_per_loop=5, log_every=20, val_every=60, checkpoint_every=60)




@pytest.fixture(scope="module")
def overfit_run(tiny_dataset, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("runs") / "overfit")
    result = train.train(tiny_dataset, model_dir, steps=120, dropout=False, **TINY)
    return model_dir, result


def split_arrays(data_dir, split):
    batches = list(data.read_batches(data_dir, split, 64))
    return [np.concatenate([b[k].numpy() for b in batches]) for k in ("patch_a", "patch_b", "offsets")]


def test_tiny_run_overfits(tiny_dataset, overfit_run):
    model_dir, result = overfit_run
    a, b, offsets = split_arrays(tiny_dataset, "train")
    identity = geometry.mace(np.zeros_like(offsets), offsets).mean()
    assert identity > 4.0  # rho 8: about 0.765 * 8
    last = result["last"]
    assert last["step"] == 120 and last["train_mace"] < 0.1 * identity
    # Not asserted: the saved model in inference mode on these pairs. After so few steps BN's moving
    # averages (momentum 0.99) lag far behind the fast-changing weights; here it only has to run.
    model, _ = network.load(model_dir)
    assert np.isfinite(network.predict_offsets(model, a, b, rho=8)).all()
    assert last["val_identity_mace"] == pytest.approx(
        geometry.mace(np.zeros(8), split_arrays(tiny_dataset, "validation")[2]).mean(), rel=1e-4)


def test_run_record_is_complete(overfit_run, tiny_dataset):
    model_dir, _ = overfit_run
    for name in ("config.json", "history.csv", "history.json", "model.keras", "mace.png",
                 "export/saved_model.pb", "checkpoints/ckpt-120.weights.h5"):
        assert os.path.getsize(os.path.join(model_dir, name)) > 0, name
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["patch_size"] == 32 and config["rho"] == 8 and config["channels"] == 1
    assert config["image_width"] == 80 and config["steps"] == 120 and config["dropout"] is False
    assert config["learning_rate"] == 0.005 and config["lr_decay_steps"] == 30000 and config["loss"] == "l2_distance"
    assert config["backend"] == "tensorflow" and config["input"] == "tf.data" and config["export"] == "export"
    assert config["final_step"] == 120 and config["stop_reason"] == "complete" and config["steps_per_execution"] == 5
    history = json.load(open(os.path.join(model_dir, "history.json")))
    assert [r["step"] for r in history] == [20, 40, 60, 80, 100, 120]
    assert [r["val_mace"] is not None for r in history] == [False, False, True, False, False, True]
    assert history[-1]["train_mace"] < history[0]["train_mace"]
    assert open(os.path.join(model_dir, "history.csv")).read().count("\n") == 7
    for split in ("train", "validation"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(model_dir, "logs", split)))
    assert open(os.path.join(model_dir, "mace.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [step for step, _ in run_dir.checkpoints(model_dir)] == [60, 120]


def test_export_loads_and_predicts_8_offsets_per_pair(overfit_run, tiny_dataset):
    model_dir, _ = overfit_run
    a, b, _ = split_arrays(tiny_dataset, "validation")
    exported = tf.saved_model.load(os.path.join(model_dir, "export"))
    pixels = exported.offsets(tf.constant(a[:5]), tf.constant(b[:5])).numpy()
    assert pixels.shape == (5, 8)
    model, config = network.load(model_dir)
    np.testing.assert_allclose(pixels, network.predict_offsets(model, a[:5], b[:5], config["rho"]), atol=1e-3)
    scaled = exported.serve(tf.constant(data.normalize(a[:5], b[:5]))).numpy()
    np.testing.assert_allclose(scaled * 8, pixels, atol=1e-3)


def interrupt_at(k, exc):
    def hook(step):
        if step == k:
            raise exc
    return hook


RESUME = dict(batch_size=8, shuffle_buffer=16, steps_per_loop=1, log_every=1, val_every=0, checkpoint_every=2,
              lr_decay_steps=3, learning_rate=0.01)


@pytest.mark.parametrize("exc,resumes_at", [(RuntimeError("killed"), 4), (KeyboardInterrupt(), 5)])
def test_resume_continues_at_saved_step_with_same_schedule(tiny_dataset, tmp_path, exc, resumes_at):
    model_dir = str(tmp_path / "run")
    with pytest.raises(type(exc)):
        train.train(tiny_dataset, model_dir, steps=8, step_hook=interrupt_at(5, exc), **RESUME)
    # A crash loses the steps since the last checkpoint (4); Ctrl-C checkpoints where it stopped (5).
    assert run_dir.latest_checkpoint(model_dir)[0] == resumes_at
    partial, _ = network.load(model_dir)  # no model.keras yet: loads the latest checkpoint
    assert partial.output_shape == (None, 8)
    seen = []
    result = train.train(tiny_dataset, model_dir, steps=8, step_hook=seen.append, **RESUME)
    assert result["start_step"] == resumes_at and seen[0] == resumes_at + 1 and result["final_step"] == 8
    assert result["optimizer_iterations"] == 8  # optimizer state (and its step) came back too
    history = json.load(open(os.path.join(model_dir, "history.json")))
    assert [r["step"] for r in history] == list(range(1, 9))  # no gap, no duplicate
    # lr 0.01 divided by 10 every 3 steps: the row of step s used iteration s - 1.
    for r in history:
        assert r["learning_rate"] == pytest.approx(0.01 * 0.1 ** ((r["step"] - 1) // 3), rel=1e-6), r
    assert json.load(open(os.path.join(model_dir, "config.json")))["resumed_from_step"] == resumes_at


def test_finished_run_rerun_trains_no_more(overfit_run, tiny_dataset):
    model_dir, _ = overfit_run
    result = train.train(tiny_dataset, model_dir, steps=120, dropout=False, **TINY)
    assert result["start_step"] == result["final_step"] == 120


def test_clear_errors_before_training(tiny_dataset, overfit_run, tmp_path):
    with pytest.raises(data.DatasetError, match="no homography_index.json"):
        train.train(str(tmp_path / "nowhere"), str(tmp_path / "run"), steps=2)
    with pytest.raises(data.DatasetError, match="split 'nope' is not in"):
        train.train(tiny_dataset, str(tmp_path / "run"), steps=2, val_split="nope")
    model_dir, _ = overfit_run
    with pytest.raises(train.TrainError, match="another network or input .*dropout: False there, True now"):
        train.train(tiny_dataset, model_dir, steps=2)
    config = json.load(open(os.path.join(model_dir, "config.json")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "patch_size": 128, "architecture": "mobilenet"}))
    with pytest.raises(train.TrainError, match="architecture: 'mobilenet' there.*patch_size: 128 there, 32 now"):
        train.train(tiny_dataset, str(other), steps=2, dropout=False)
    with pytest.raises(train.TrainError, match="unknown --loss 'l1'"):
        train.train(tiny_dataset, str(tmp_path / "run"), steps=2, loss="l1")
    with pytest.raises(train.TrainError, match="--steps must be positive"):
        train.train(tiny_dataset, str(tmp_path / "run"), steps=0)
    assert not os.path.exists(tmp_path / "run")  # nothing written before the checks passed


def test_cli_errors_are_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "model.train", f"--data_dir={tmp_path / 'nowhere'}",
                           f"--model_dir={tmp_path / 'run'}", "--steps=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.train: error: no homography_index.json in" in proc.stderr and "Traceback" not in proc.stderr
