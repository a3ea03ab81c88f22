"""The training loop behind model.train: the compiled network and its optimizer, the resume from the latest
checkpoint, Keras fit with one callback (model/training/callbacks.py) and validation, and how a run ends:
the final model, the SavedModel export and the curves, or a checkpoint of the last completed step first
(Ctrl-C, SIGTERM, a damaged shard), or Diverged with nothing saved from the bad step.

model/train.py checks the arguments and the run directory, holds its lock, and calls fit().
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
from absl import logging

from model import network
from model.training import callbacks, data, losses, run_dir
from pipeline.runtime import outputs


class Diverged(RuntimeError):
    """The loss or the weights became non-finite; the message names the step and the checkpoint kept."""


def devices(keras) -> tuple:
    """(strategy or None, device names): MirroredStrategy over several GPUs on TensorFlow (synchronous data
    parallelism); one device otherwise. On JAX, Keras uses the default device (the first GPU, else CPU)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else None
        return strategy, [d.name for d in gpus] or ["CPU"]
    if keras.backend.backend() == "jax":
        import jax

        return None, [str(d) for d in jax.devices()]
    return None, [keras.backend.backend()]


def versions(keras) -> dict:
    out = {"backend": keras.backend.backend(), "keras": keras.__version__}
    for name in ("tensorflow", "jax"):
        module = sys.modules.get(name)
        out[name] = getattr(module, "__version__", None) if module else None
    return out


def steps_per_execution(a: dict, start_step: int) -> int:
    """Steps per compiled call: --steps_per_loop, reduced so that it divides every event interval and the
    steps left. Keras runs whole executions only, so events (rows, validation, checkpoints, the last step)
    land exactly on their steps."""
    g = int(a["steps_per_loop"])
    for k in ("log_every", "val_every", "checkpoint_every"):
        if a[k]:
            g = math.gcd(g, int(a[k]))
    return math.gcd(g, int(a["steps"]) - start_step) or g


def build_model(a: dict, config: dict, spe: int):
    """The compiled model, its optimizer and learning-rate schedule."""
    import keras

    keras.utils.set_random_seed(a["seed"])
    model = network.build(a["architecture"], config["patch_size"], config["channels"], a["dropout"], a["batchnorm"],
                          dtype=network.dtype_policy(a["mixed_precision"]), options=config["architecture_options"])
    schedule = keras.optimizers.schedules.ExponentialDecay(
        a["learning_rate"], a["lr_decay_steps"], a["lr_decay_factor"], staircase=True)
    clip = a["clip_norm"] or None
    if a["optimizer"] == "adam":
        optimizer = keras.optimizers.Adam(schedule, beta_1=a["momentum"], global_clipnorm=clip)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=a["momentum"], global_clipnorm=clip)
    if a["mixed_precision"] == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # dynamic loss scaling
    model.compile(optimizer=optimizer, loss=losses.keras_loss(a["loss"]), metrics=[losses.keras_mace(config["rho"])],
                  jit_compile=config["jit_compile"], steps_per_execution=spe)
    optimizer.build(model.trainable_variables)  # its variables must exist before a checkpoint restores them
    return model, optimizer, schedule


def fit(data_dir: str, model_dir: str, a: dict, config: dict, started: float, step_hook) -> dict:
    """Trains the run that model.train.train checked and locked: resumes from the latest checkpoint,
    fits to a["steps"], saves the final model; returns train()'s summary dict. Raises Diverged,
    data.DamagedShardError (a checkpoint first) or KeyboardInterrupt (a checkpoint first)."""
    def spe_at(step: int) -> int:
        return steps_per_execution(a, step) if step < a["steps"] else 1

    # The newest checkpoint that loads (one cut short by a full disk is passed over, with a warning).
    latest = run_dir.restore_newest(model_dir, lambda step: build_model(a, config, spe_at(step)))
    if latest:
        (model, optimizer, schedule), start_step, path = latest
        logging.info("resumed from %s at step %d", path, start_step)
    else:
        start_step = 0
        model, optimizer, schedule = build_model(a, config, spe_at(0))
    spe = spe_at(start_step)
    config["resumed_from_step"] = start_step
    config["steps_per_execution"] = spe
    run_dir.write_json(os.path.join(model_dir, network.CONFIG_FILE), config)
    logging.info("model %s: %d parameters; Keras on %s (%s), %d replica(s), global batch %d, %d steps per "
                 "execution; steps %d -> %d", a["architecture"], model.count_params(), config["backend"],
                 ", ".join(config["devices"]), config["replicas"], config["global_batch_size"], spe, start_step,
                 a["steps"])
    batch, rho = config["global_batch_size"], float(config["rho"])
    history = run_dir.read_history(model_dir, start_step)
    scalars = run_dir.ScalarLogs(model_dir)

    def validate():
        sums, n = [0.0, 0.0, 0.0], 0
        try:
            for x, y in data.eval_batches(data_dir, a["val_split"], batch, a["val_batches"], a["reader"]):
                pred = np.asarray(model.predict_on_batch(x), np.float32)
                sums[0] += float(losses.per_example_loss(a["loss"], pred, y).sum())
                sums[1] += float(losses.mace_pixels(pred, y, rho).sum())
                sums[2] += float(losses.mace_pixels(np.zeros_like(y), y, rho).sum())
                n += len(y)
        except Exception as e:  # a damaged validation shard: named like a training one
            damaged = data.damaged_shard(e, data_dir, a["val_split"])
            if damaged is None:
                raise
            raise damaged from None
        return tuple(v / max(n, 1) for v in sums)

    monitor = callbacks.TrainingMonitor(
        model_dir=model_dir, start_step=start_step, steps=a["steps"], batch_size=batch, a=a, rho=rho,
        history=history, learning_rate=schedule, validate=validate if a["val_every"] else None, scalars=scalars,
        max_seconds=60.0 * a["max_minutes"], started=started, step_hook=step_hook)
    monitor.set_model(model)  # fit sets it too; a finished run's rerun (no fit) still checkpoints through it
    monitor.last_checkpoint = start_step if latest else None  # already on disk
    iterations0 = int(np.asarray(optimizer.iterations))

    def steps_done() -> int:  # exact after an exception too: the optimizer counts the steps it applied
        return start_step + int(np.asarray(optimizer.iterations)) - iterations0

    try:
        if start_step < a["steps"]:
            # Fresh shuffle order after a resume (the data stream itself is not checkpointed).
            stream = data.train_batches(data_dir, a["train_split"], batch, shuffle_buffer=a["shuffle_buffer"],
                                        seed=a["seed"] + start_step, reader=a["reader"],
                                        workers=a["reader_workers"], augment=a["augment"],
                                        photometric=a["photometric"],
                                        photometric_share=a["photometric_share"])
            model.fit(stream, epochs=1, steps_per_epoch=a["steps"] - start_step, verbose=0, callbacks=[monitor],
                      shuffle=False)  # the stream is shuffled already
        monitor.checkpoint(monitor.step)  # the last step's (refused, as Diverged, if its weights are non-finite)
    except callbacks.Diverged as e:
        last = run_dir.latest_checkpoint(model_dir)
        raise Diverged(f"{e}; stopped without saving it: "
                       + (f"the last good checkpoint (step {last[0]}) is where the same command resumes"
                          if last else "no checkpoint was saved yet, the same command starts over")
                       + "; lower --learning_rate or set --clip_norm") from None
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM from the CLI): keep every finished step.
        done = steps_done()
        if done > start_step:
            monitor.checkpoint(done)
        logging.warning("interrupted at step %d; checkpoint saved, run the same command to resume", done)
        raise
    except outputs.OutputError as e:  # a full or read-only disk: nothing more can be saved
        last = run_dir.latest_checkpoint(model_dir)
        raise outputs.OutputError(f"{e}; training stopped at step {steps_done()}; "
                                  + (f"the checkpoint of step {last[0]} is where the same command resumes once "
                                     f"there is room" if last else "no checkpoint was saved")) from None
    except Exception as e:
        damaged = data.damaged_shard(e, data_dir, a["train_split"])
        if damaged is None:
            raise
        done = steps_done()
        if done > start_step:
            monitor.checkpoint(done)
        saved = run_dir.latest_checkpoint(model_dir)
        raise data.DamagedShardError(damaged.path, damaged.offset, damaged.detail, data_dir,
                                     note=f"training stopped at step {done}; "
                                          + (f"checkpoint of step {saved[0]} kept, the same command resumes from it"
                                             if saved else "no checkpoint yet")) from None
    finally:
        scalars.close()

    step = monitor.step
    callbacks.sync_weights(model)
    final = run_dir.save_final_model(model, os.path.join(model_dir, network.MODEL_FILE))
    exported = run_dir.export_saved_model(final, os.path.join(model_dir, "export"), config["patch_size"],
                                          config["channels"], rho)
    if history:
        run_dir.plot_mace(history, os.path.join(model_dir, "mace.png"), os.path.basename(os.path.abspath(model_dir)))
    config.update(final_step=step, stop_reason=monitor.stop_reason or ("complete" if step >= a["steps"] else None),
                  export="export" if exported else None)
    if not exported:
        config["export_note"] = (f"no SavedModel: it needs Keras on TensorFlow (this run: {config['backend']}); "
                                 f"model.keras loads under either backend")
    run_dir.write_json(os.path.join(model_dir, network.CONFIG_FILE), config)
    logging.info("done: step %d%s, model in %s", step,
                 " (time budget reached)" if monitor.stop_reason == "max_minutes" else "", model_dir)
    return {"start_step": start_step, "final_step": step, "stop_reason": config["stop_reason"],
            "learning_rate": float(f"{float(schedule(step - 1)):.7g}") if step else None,
            "optimizer_iterations": int(np.asarray(optimizer.iterations)), "last": history[-1] if history else None,
            "model_dir": model_dir, "config": config}
