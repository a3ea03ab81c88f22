"""What model.train does between training steps, as one Keras callback (the same on TensorFlow and JAX).

After each execution of `steps_per_execution` steps, TrainingMonitor:
  - stops on a non-finite loss or MACE, before anything is saved (Diverged, naming the step);
  - writes a history row every log_every / val_every steps (interval means of loss and MACE, the
    learning rate, speed), with validation every val_every steps, and TensorBoard scalars;
  - checkpoints every checkpoint_every steps, but only weights that are all finite;
  - stops cleanly at the wall-clock budget (max_seconds), leaving the normal end to save everything;
  - calls step_hook(step) (tests use it to interrupt a run).
Keras reports loss and metrics as means since the start of fit; a row's figures are the difference of two
such running sums, so they cover exactly the steps since the previous row.
"""
from __future__ import annotations

import math
import os
import time

import keras
import numpy as np

from model.training import run_dir


class Diverged(RuntimeError):
    """The loss or the weights became non-finite; nothing from that point was saved."""


def sync_weights(model) -> None:
    """Under JAX, Keras's fit keeps the state outside the model's variables between steps; a callback that
    reads weights must write it back first. A no-op on TensorFlow."""
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def weights_finite(model) -> bool:
    return all(np.isfinite(np.asarray(w, np.float32)).all() for w in model.weights)


class TrainingMonitor(keras.callbacks.Callback):
    def __init__(self, *, model_dir: str, start_step: int, steps: int, batch_size: int, a: dict, rho: float,
                 history: list, learning_rate, validate=None, scalars=None, max_seconds: float = 0.0,
                 started: float | None = None, step_hook=None):
        super().__init__()
        self.model_dir, self.start_step, self.steps, self.batch_size = model_dir, start_step, steps, batch_size
        self.a, self.rho, self.history, self.learning_rate = a, rho, history, learning_rate
        self.validate, self.scalars, self.step_hook = validate, scalars, step_hook
        self.deadline = (started or time.time()) + max_seconds if max_seconds else None
        self.step = start_step               # last completed step
        self.stop_reason = None              # None | "max_minutes"
        self.last_checkpoint = None
        self._sums = (0, 0.0, 0.0)           # steps since fit began, and the loss / MACE sums over them
        self._row_sums = self._sums
        self._t_row = time.time()
        self._elapsed0 = history[-1]["elapsed_s"] if history else 0.0
        self._t_start = time.time()

    def _due(self, prev: int, step: int, every: int) -> bool:
        return bool(every) and (step // every > prev // every or step == self.steps)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        prev, step = self.step, self.start_step + int(batch) + 1
        self.step = step
        n = step - self.start_step
        loss, mace = float(logs.get("loss", math.nan)), float(logs.get("mace", math.nan))
        if not (math.isfinite(loss) and math.isfinite(mace)):
            where = f"at step {step}" if step - prev == 1 else f"between steps {prev + 1} and {step}"
            raise Diverged(f"the training loss became non-finite {where}")
        self._sums = (n, loss * n, mace * n)
        a = self.a
        row = None
        if self._due(prev, step, a["log_every"]) or self._due(prev, step, a["val_every"]):
            row = self._train_row(step)
        if self._due(prev, step, a["val_every"]) and self.validate:
            sync_weights(self.model)
            row["val_loss"], row["val_mace"], row["val_identity_mace"] = self.validate()
        if row:
            row["elapsed_s"] = round(self._elapsed0 + time.time() - self._t_start, 2)
            self.history.append(row)
            self._log(row)
            run_dir.write_history(self.model_dir, self.history)
            if row["val_mace"] is not None:
                run_dir.plot_mace(self.history, os.path.join(self.model_dir, "mace.png"),
                                  os.path.basename(os.path.abspath(self.model_dir)))
        if self._due(prev, step, a["checkpoint_every"]):
            self.checkpoint(step)
        if self.step_hook:
            self.step_hook(step)
        if self.deadline and time.time() >= self.deadline and step < self.steps:
            self.stop_reason = "max_minutes"
            self.model.stop_training = True

    def checkpoint(self, step: int) -> None:
        """Saves a checkpoint of `step` unless the weights are non-finite (then Diverged: the previous
        checkpoint stays the one a resume starts from)."""
        sync_weights(self.model)
        if not weights_finite(self.model):
            raise Diverged(f"the weights became non-finite by step {step} (a non-finite gradient)")
        if self.last_checkpoint != step:
            run_dir.save_checkpoint(self.model, self.model_dir, step, keep=self.a["max_checkpoints"])
            self.last_checkpoint = step

    def _train_row(self, step: int) -> dict:
        n, loss_sum, mace_sum = self._sums
        n0, loss0, mace0 = self._row_sums
        k = max(n - n0, 1)
        dt = max(time.time() - self._t_row, 1e-9)
        self._row_sums, self._t_row = self._sums, time.time()
        return {"step": step, "learning_rate": float(f"{float(self.learning_rate(step - 1)):.7g}"),
                "train_loss": (loss_sum - loss0) / k, "train_mace": (mace_sum - mace0) / k,
                "val_loss": None, "val_mace": None, "val_identity_mace": None,
                "steps_per_sec": k / dt, "examples_per_sec": k * self.batch_size / dt}

    def _log(self, row: dict) -> None:
        from absl import logging

        msg = (f"step {row['step']}/{self.steps} lr {row['learning_rate']:.2e} loss {row['train_loss']:.4f} "
               f"MACE {row['train_mace']:.2f} px | {row['steps_per_sec']:.2f} steps/s "
               f"({row['examples_per_sec']:.0f} ex/s)")
        if row["val_mace"] is not None:
            msg += (f" | validation loss {row['val_loss']:.4f} MACE {row['val_mace']:.2f} px "
                    f"(identity {row['val_identity_mace']:.2f})")
        logging.info(msg)
        if self.scalars:
            self.scalars.write("train", row["step"], {k.replace("train_", ""): row[k] for k in
                                                      ("train_loss", "train_mace", "learning_rate", "steps_per_sec")})
            if row["val_mace"] is not None:
                self.scalars.write("validation", row["step"], {"loss": row["val_loss"], "mace": row["val_mace"]})
