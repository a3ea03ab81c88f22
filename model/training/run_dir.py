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
import gc
import hashlib
import json
import os
import re
import socket
import sys
import time

import numpy as np

from pipeline.runtime import outputs

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


class CheckpointError(ValueError):
    """Checkpoints there, none of which loads; the message names the folder and what failed."""


def save_checkpoint(model, model_dir: str, step: int, keep: int = 3) -> str:
    """Writes checkpoints/ckpt-<step>.weights.h5 (model + optimizer variables) atomically, then keeps the
    newest `keep`. A partial file (a job killed mid-write) never has the ckpt- name. A disk that cannot
    take it (full, read-only) raises OutputError (one line) and leaves the previous checkpoints as they were."""
    d = checkpoint_dir(model_dir)
    with outputs.writing(d, "create"):
        os.makedirs(d, exist_ok=True)
    final = os.path.join(d, f"ckpt-{step}.weights.h5")
    partial = os.path.join(d, f"{_PARTIAL_PREFIX}{step}-{os.getpid()}.weights.h5")  # Keras wants the suffix
    previous = checkpoints(model_dir)
    need = os.path.getsize(previous[-1][1]) if previous else 4 * sum(
        int(np.prod(v.shape)) for v in list(model.weights) + list(getattr(model.optimizer, "variables", [])))
    outputs.reserve_space(d, need + (1 << 20), f"the checkpoint of step {step}")

    def write():
        model.save_weights(partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name says the checkpoint is complete
        os.replace(partial, final)
    write_or_fail(final, write, partial)
    for _, old in checkpoints(model_dir)[:-keep]:
        os.remove(old)
    return final


def write_or_fail(path: str, write, partial: str | None = None) -> None:
    """Runs write() (which writes path, perhaps through `partial`); an OSError (disk full, read-only
    filesystem, no permission) becomes outputs.OutputError naming path and the cause, the partial file
    removed. The HDF5 objects of a write that failed complain when freed: they are freed here, quietly.
    (save_checkpoint and save_final_model reserve the room first, so HDF5 seldom meets a full disk.)"""
    global _HDF5_FAILED
    failure = None
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # Cython prints a freed object's error itself
    try:
        try:
            write()
        except OSError as e:
            failure = f"cannot write {path}: {outputs.write_failure(e) or (str(e).splitlines() or [repr(e)])[0]}"
        gc.collect()  # the failed write's objects go now, quietly
    finally:
        sys.stderr.close()
        sys.stderr, sys.unraisablehook = stderr, hook
    if failure is None:
        return
    _HDF5_FAILED = True
    if partial and os.path.exists(partial):
        os.remove(partial)
    raise outputs.OutputError(failure)


_HDF5_FAILED = False


def hdf5_failed() -> bool:
    """Whether a write through HDF5 failed in this process: HDF5 then holds objects it cannot close and
    crashes the process at exit (H5_term_library); a command ends such a process with os._exit."""
    return _HDF5_FAILED


def restore_newest(model_dir: str, build):
    """(what build(step) returned, step, path) for the newest checkpoint that loads into build(step)[0]
    (a Keras model); None when there is no checkpoint. A newer one that does not load (cut short by a
    full disk, damaged) is passed over with a warning; CheckpointError when none loads."""
    from absl import logging

    found = checkpoints(model_dir)
    for step, path in reversed(found):
        built = build(step)
        try:
            restore_checkpoint(built[0], path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            logging.warning("checkpoint %s cannot be read (%s: %s); taking the one before it", path,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            continue
        return built, step, path
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {checkpoint_dir(model_dir)} can be read "
                              f"(see the warnings above); move them away to start the run over")
    return None


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
    write_json(os.path.join(model_dir, "history.json"), history, indent=1)
    path = os.path.join(model_dir, "history.csv")
    with outputs.writing(path), open(path, "w", newline="") as f:
        w = csv.DictWriter(f, HISTORY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})


def write_json(path: str, obj, indent: int = 2) -> None:
    """Atomically (a temporary file, then a rename); a disk that cannot take it: OutputError, one line."""
    tmp = path + ".tmp"
    try:
        with outputs.writing(path):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=indent)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    try:
        with outputs.writing(path):
            fig.savefig(path, dpi=100)
    finally:
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
        self._dir = os.path.join(model_dir, "logs")
        with outputs.writing(self._dir, "write TensorBoard logs in"):
            self._writers = {k: EventFileWriter(os.path.join(self._dir, k)) for k in ("train", "validation")}

    def write(self, split: str, step: int, values: dict) -> None:
        if self._writers is None:
            return
        metadata = self._summary.SummaryMetadata(
            plugin_data=self._summary.SummaryMetadata.PluginData(plugin_name="scalars"))
        summary = self._summary.Summary(value=[self._summary.Summary.Value(tag=k, simple_value=float(v),
                                                                           metadata=metadata)
                                               for k, v in values.items()])
        writer = self._writers[split]
        with outputs.writing(self._dir, "write TensorBoard logs in"):
            writer.add_event(self._event.Event(wall_time=time.time(), step=int(step), summary=summary))
            writer.flush()

    def close(self) -> None:
        for w in (self._writers or {}).values():
            try:
                w.close()
            except OSError:  # a full disk was reported already, where the write failed
                pass


# ---------------------------------------------------------------------------------------------- final model

def save_final_model(model, path: str):
    """Saves the inference model alone (no optimizer, no compile settings): a clean .keras file of Keras's own
    layers that loads under either backend without the training's loss functions. Returns that copy."""
    import keras

    from model import network

    # from_config, not clone_model: clone_model also compiles the copy, with the training's loss functions.
    # The fused BN of training is saved as Keras's own layer (same config and variables): model.keras
    # then loads anywhere, without this project's code.
    with keras.saving.CustomObjectScope({network.FUSED_BN_NAME: keras.layers.BatchNormalization}):
        final = keras.Model.from_config(model.get_config())
    for dst, src in zip(final.weights, model.weights):  # no numpy copy of the whole model (34 M weights)
        dst.assign(src)
    outputs.reserve_space(os.path.dirname(os.path.abspath(path)),
                          4 * sum(int(np.prod(v.shape)) for v in final.weights) + (1 << 20), path)
    write_or_fail(path, lambda: final.save(path), path)
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
    try:
        archive.write_out(path, verbose=False)
    except Exception as e:  # TensorFlow's own file errors: a full or read-only disk becomes one line
        cause = outputs.write_failure(e)
        if cause is None:
            raise
        raise outputs.OutputError(f"cannot write {path}: {cause}") from None
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
