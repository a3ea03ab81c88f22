"""A training run directory (model_dir) on disk: its lock, checkpoints, history, figure and SavedModel.

  .lock                     held (fcntl.flock) by the one job training in this directory; holds its pid
  config.json               the run's settings (written by model.train)
  checkpoints/ckpt-<step>.weights.h5   Keras weights files: the model's weights and the optimizer's
                            variables (its iteration counter included), one per saved step
  history.json, history.csv one row per logged step
  mace.png                  training and validation MACE against steps
  model.keras, export/      the final model; export/ is a TensorFlow SavedModel (only where TF is installed)

Checkpoints are Keras's own format, so they serve the TensorFlow and JAX backends alike. A checkpoint is
written under a temporary name and renamed when complete; older ones are deleted only after that, so a
job killed (even SIGKILL) while writing resumes from the previous checkpoint.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import re
import socket
import time

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.keras"  # the finished network (model.network.MODEL_FILE)
LOCK_FILE = ".lock"
HISTORY_FIELDS = ("step", "learning_rate", "train_loss", "train_mace", "val_loss", "val_mace", "val_identity_mace",
                  "steps_per_sec", "examples_per_sec", "elapsed_s")
_CKPT = re.compile(r"^ckpt-(\d+)\.weights\.h5$")
_PARTIAL_PREFIX = "partial-"


class RunDirBusy(RuntimeError):
    """Another live process trains in this run directory; the message names it."""


class RunLock:
    """One job per run directory: an exclusive flock on model_dir/.lock, held while training.

    The kernel drops a flock when its process dies (any signal, SIGKILL included), so a lock file left by
    a dead job never blocks the next one; a live holder makes acquire() fail at once with its pid."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            try:
                h = json.loads(holder)
                who = (f"process {h['pid']} on {h['host']} (started {h['started']}: {h['command']})")
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RunDirBusy(f"model_dir {os.path.dirname(self.path) or '.'} is in use by {who}; wait for it to "
                             f"end or use another --model_dir") from None
        import sys

        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "command": " ".join(sys.argv)[:500]}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (harmless: only a held flock counts)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------- checkpoints

def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(model_dir, CHECKPOINT_DIR)


def checkpoints(model_dir: str) -> list:
    """[(step, path)] of the complete checkpoints, oldest first."""
    d = checkpoint_dir(model_dir)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d) if (m := _CKPT.match(n))]
    return sorted(found)


def latest_checkpoint(model_dir: str):
    """(step, path) of the newest complete checkpoint, or None."""
    found = checkpoints(model_dir)
    return found[-1] if found else None


def save_checkpoint(model, model_dir: str, step: int, keep: int = 3) -> str:
    """Writes checkpoints/ckpt-<step>.weights.h5 (model + optimizer variables) atomically, then keeps the
    newest `keep`. A partial file (a job killed mid-write) never has the ckpt- name."""
    d = checkpoint_dir(model_dir)
    os.makedirs(d, exist_ok=True)
    final = os.path.join(d, f"ckpt-{step}.weights.h5")
    partial = os.path.join(d, f"{_PARTIAL_PREFIX}{step}-{os.getpid()}.weights.h5")  # Keras wants the suffix
    model.save_weights(partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())  # the bytes are on disk before the name says the checkpoint is complete
    os.replace(partial, final)
    for _, old in checkpoints(model_dir)[:-keep]:
        os.remove(old)
    return final


def remove_partial_checkpoints(model_dir: str) -> None:
    """Leftovers of a job killed while writing a checkpoint (call while holding the run's lock)."""
    d = checkpoint_dir(model_dir)
    if os.path.isdir(d):
        for n in os.listdir(d):
            if n.startswith(_PARTIAL_PREFIX):
                os.remove(os.path.join(d, n))


def restore_checkpoint(model, path: str) -> None:
    """Loads a checkpoint's weights, and its optimizer variables when the model has a built optimizer."""
    model.load_weights(path)


# ---------------------------------------------------------------------------------------------- history

def read_history(model_dir: str, upto_step: int) -> list:
    path = os.path.join(model_dir, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in json.load(f) if r["step"] <= upto_step]


def write_history(model_dir: str, history: list) -> None:
    tmp = os.path.join(model_dir, "history.json.tmp")
    with open(tmp, "w") as f:
        json.dump(history, f, indent=1)
    os.replace(tmp, os.path.join(model_dir, "history.json"))
    with open(os.path.join(model_dir, "history.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, HISTORY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def plot_mace(history: list, path: str, title: str = "") -> None:
    """Training and validation MACE (pixels) against steps, like the seed's figure 19."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tr = [(r["step"], r["train_mace"]) for r in history if r.get("train_mace") is not None]
    va = [(r["step"], r["val_mace"]) for r in history if r.get("val_mace") is not None]
    ident = [r["val_identity_mace"] for r in history if r.get("val_identity_mace") is not None]
    if tr:
        ax.plot(*zip(*tr), label="training MACE", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation MACE", lw=1.5, ms=3)
    if ident:
        ax.axhline(ident[-1], color="gray", ls="--", lw=1, label=f"identity (validation) {ident[-1]:.1f} px")
    ax.set_xlabel("step")
    ax.set_ylabel("MACE (pixels)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ScalarLogs:
    """TensorBoard scalars under model_dir/logs/<train|validation>, through the tensorboard package's own
    event writer (no TensorFlow needed, so the JAX backend writes the same logs). Without the tensorboard
    package the logs are skipped (history.json has the same numbers)."""

    def __init__(self, model_dir: str):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            self._writers = None
            return
        self._event, self._summary = event_pb2, summary_pb2
        self._writers = {k: EventFileWriter(os.path.join(model_dir, "logs", k)) for k in ("train", "validation")}

    def write(self, split: str, step: int, values: dict) -> None:
        if self._writers is None:
            return
        metadata = self._summary.SummaryMetadata(
            plugin_data=self._summary.SummaryMetadata.PluginData(plugin_name="scalars"))
        summary = self._summary.Summary(value=[self._summary.Summary.Value(tag=k, simple_value=float(v),
                                                                           metadata=metadata)
                                               for k, v in values.items()])
        writer = self._writers[split]
        writer.add_event(self._event.Event(wall_time=time.time(), step=int(step), summary=summary))
        writer.flush()

    def close(self) -> None:
        for w in (self._writers or {}).values():
            w.close()


# ---------------------------------------------------------------------------------------------- final model

def save_final_model(model, path: str):
    """Saves the inference model alone (no optimizer, no compile settings): a clean .keras file that loads
    under either backend without the training's loss functions. Returns that uncompiled copy."""
    import keras

    # from_config, not clone_model: clone_model also compiles the copy, with the training's loss functions.
    final = keras.Model.from_config(model.get_config())
    final.set_weights(model.get_weights())
    final.save(path)
    return final


def export_saved_model(model, path: str, patch_size: int, channels: int, rho: float) -> bool:
    """SavedModel with a `serve` endpoint (the model itself) and an `offsets` endpoint from raw uint8 patches.
    Needs TensorFlow and the TensorFlow backend; returns False (nothing written) otherwise."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    from model.training import data

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, patch_size, patch_size, 2 * channels), tf.float32, name="patches")
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
    raw = tf.TensorSpec((None, patch_size, patch_size, channels), tf.uint8)
    archive.add_endpoint("offsets", lambda a, b: model(data.normalize(a, b), training=False) * float(rho),
                         input_signature=[raw, raw])
    archive.write_out(path, verbose=False)
    return True


def weights_digest(model_dir: str) -> str:
    """SHA-256 of the run's model.keras: what binds a report to the weights it scored (model.ship checks it);
    None for a run evaluated from a checkpoint (no model.keras yet: nothing model.ship would take)."""
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.exists(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
