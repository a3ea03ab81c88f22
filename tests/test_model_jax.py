"""Keras 3 on JAX: model.train, model.evaluate and model.predict run with KERAS_BACKEND=jax where neither
TensorFlow nor Apache Beam can be imported (the GPU box has neither); the loss falls, a resume continues at
the right step, and a .keras file saved under one backend predicts the same offsets under the other.

One JAX subprocess (the backend is fixed when Keras is imported) does the JAX side; this process is the
TensorFlow side."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from model import network, train
from pipeline import records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(batch_size=8, shuffle_buffer=16, steps_per_loop=4, log_every=4, val_every=8, checkpoint_every=8,
             architecture="compact", optimizer="adam", learning_rate=0.002, dropout=False)

# Makes `import tensorflow` and `import apache_beam` fail in the subprocess, as on the GPU box.
BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "apache_beam"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Block())
"""

JAX_SIDE = """
import json, os, shutil, sys
import numpy as np
for name in ("tensorflow", "apache_beam"):
    try:
        __import__(name)
        raise SystemExit(f"{name} imported despite the blocker")
    except ImportError:
        pass
import keras
assert keras.backend.backend() == "jax"
from model import evaluate, network, predict, train  # the CLIs' modules, whole
args = json.loads(sys.argv[1])
first = train.train(args["data"], args["run"], steps=16, **args["small"])
second = train.train(args["data"], args["run"], steps=32, reader_workers=2, **args["small"])
report = evaluate.evaluate(args["data"], "validation", args["report"], model_dir=args["run"],
                           methods=["identity", "network"], num_visualizations=1)
patches = np.load(args["patches"])
out = {"first": {k: first[k] for k in ("start_step", "final_step", "optimizer_iterations")},
       "second": {k: second[k] for k in ("start_step", "final_step", "optimizer_iterations")},
       "network_mace": report["methods"]["network"]["mean_mace"]}
model, config = network.load(args["run"])
out["jax_run_offsets"] = network.predict_offsets(model, patches["a"], patches["b"], config["rho"]).tolist()
tf_model, tf_config = network.load(args["tf_run"])
out["tf_run_offsets"] = network.predict_offsets(tf_model, patches["a"], patches["b"], tf_config["rho"]).tolist()
with open(args["image"], "rb") as f:
    image = f.read()
pred = predict.predict_homography(image, image, "network", patch_size=config["patch_size"], model=model,
                                  rho=config["rho"])
out["predict_ok"] = bool(pred.ok and np.isfinite(pred.homography).all())
# a shard cut while training runs: named, after a checkpoint of the last completed step (JAX's state synced)
from model.training import data, run_dir
shutil.copytree(args["data"], args["damaged"])
shard = os.path.join(args["damaged"], sorted(p for p in os.listdir(args["damaged"]) if "-train.tfrecord" in p)[1])
def cut(step):
    if step == 4:
        with open(shard, "r+b") as f:
            f.truncate(5000)
try:
    train.train(args["damaged"], args["damaged_run"], steps=64, step_hook=cut,
                **{**args["small"], "checkpoint_every": 1000, "val_every": 0})
    out["damage"] = None
except data.DamagedShardError as e:
    out["damage"] = {"path": e.path, "offset": e.offset, "message": str(e), "shard": shard,
                     "checkpoints": [s for s, _ in run_dir.checkpoints(args["damaged_run"])]}
out["modules"] = sorted(m for m in ("tensorflow", "apache_beam") if m in sys.modules)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny(tiny_dataset):
    return tiny_dataset


@pytest.fixture(scope="module")
def both_backends(tiny, tmp_path_factory, coco_mini):
    root = tmp_path_factory.mktemp("jax")
    tf_run = str(root / "tf_run")
    train.train(tiny, tf_run, steps=8, **SMALL)  # the TensorFlow side's model.keras
    batch = next(records.batches(tiny, "validation", 16))
    np.savez(root / "patches.npz", a=batch["patch_a"], b=batch["patch_b"])
    (root / "blocker").mkdir()
    (root / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    image = sorted(os.listdir(os.path.join(coco_mini, "val2017")))[0]
    args = {"data": tiny, "run": str(root / "jax_run"), "tf_run": tf_run, "report": str(root / "report"),
            "patches": str(root / "patches.npz"), "image": os.path.join(coco_mini, "val2017", image),
            "small": SMALL, "damaged": str(root / "damaged"), "damaged_run": str(root / "damaged_run")}
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(root / "blocker"), REPO])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(JAX_SIDE), json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][0][len("RESULT "):])
    return result, args, batch


def test_jax_runs_without_tensorflow_or_beam(both_backends):
    result, args, _ = both_backends
    assert result["modules"] == []
    assert result["predict_ok"] and np.isfinite(result["network_mace"])
    config = json.load(open(os.path.join(args["run"], "config.json")))
    assert config["backend"] == "jax" and config["tensorflow"] is None and config["input"] == "pipeline.records"
    assert config["reader_workers"] == 2  # the resumed half read its shards in worker processes
    assert config["export"] is None and "needs Keras on TensorFlow" in config["export_note"]
    assert not os.path.exists(os.path.join(args["run"], "export"))
    assert os.path.exists(os.path.join(args["run"], "model.keras"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(args["run"], "logs", "train")))


def test_jax_loss_falls_and_resume_continues_at_the_right_step(both_backends):
    result, args, _ = both_backends
    assert result["first"] == {"start_step": 0, "final_step": 16, "optimizer_iterations": 16}
    assert result["second"] == {"start_step": 16, "final_step": 32, "optimizer_iterations": 32}
    history = json.load(open(os.path.join(args["run"], "history.json")))
    assert [r["step"] for r in history] == list(range(4, 33, 4))  # no gap, no duplicate across the resume
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], [r["train_loss"] for r in history]
    assert json.load(open(os.path.join(args["run"], "config.json")))["resumed_from_step"] == 16


def test_keras_file_predicts_the_same_offsets_under_both_backends(both_backends):
    result, args, batch = both_backends
    for run, key in ((args["run"], "jax_run_offsets"), (args["tf_run"], "tf_run_offsets")):
        model, config = network.load(run)  # this process: TensorFlow
        here = network.predict_offsets(model, batch["patch_a"], batch["patch_b"], config["rho"])
        there = np.asarray(result[key], np.float32)
        assert here.shape == there.shape == (16, 8) and np.isfinite(here).all()
        np.testing.assert_allclose(here, there, atol=1e-3 * config["rho"], err_msg=run)
        assert np.abs(here).max() > 1e-3  # not a degenerate all-zero output


def test_jax_damaged_shard_is_named_after_a_checkpoint(both_backends):
    result, _, _ = both_backends
    damage = result["damage"]
    assert damage is not None, "training on a shard cut at step 4 did not fail"
    assert damage["path"] == damage["shard"] and damage["offset"] < 5000
    assert f"shard {damage['shard']} is damaged at byte {damage['offset']}" in damage["message"]
    stopped = int(damage["message"].split("training stopped at step ")[1].split(";")[0])
    assert stopped >= 4 and damage["checkpoints"] == [stopped]
