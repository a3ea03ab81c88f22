"""Trains HomographyNet on built shards with the paper's recipe; checkpoints, resumes, records the run.

  python -m model.train --data_dir=OUT --model_dir=RUN [--steps=90000 --batch_size=64 --learning_rate=0.005
                        --momentum=0.9 --lr_decay_steps=30000 --lr_decay_factor=0.1 --val_every=1000 ...]
                        [--max_minutes=M]

One training loop (model/training/loop.py) for Keras 3 on TensorFlow or JAX (KERAS_BACKEND): model.fit
with one callback (model/training/callbacks.py). The shards are read by tf.data on TensorFlow and by the
project's TensorFlow-free reader (pipeline.records) otherwise (model/training/data.py). This module checks
the arguments and the run directory, holds the run's lock, and is the command.

Running the same command again on the same model_dir resumes from its latest checkpoint (model,
optimizer state and its iteration counter, hence the same learning-rate schedule). model_dir ends up with
(model/training/run_dir.py): config.json (every flag, the dataset's geometry, backend and devices, how the
run ended), checkpoints/, logs/{train,validation}/ (TensorBoard), history.csv / history.json, model.keras,
export/ (a SavedModel, on TensorFlow), mace.png.

How a run ends: the last step (exit 0); --max_minutes reached (exit 0, saved like a normal end); Ctrl-C
or SIGTERM (checkpoint of the last completed step, exit 130); a damaged shard (checkpoint first, then one
line naming the shard and byte offset, exit 2); a non-finite loss or weights (one line naming the step,
nothing saved from it, exit 1: the last good checkpoint is where a resume starts). A second job on a run
directory that a live job holds is refused at once (exit 2). SIGKILL while a checkpoint is written
leaves the previous checkpoint in place.

Loss (--loss): the Euclidean (L2) distance between predicted and true offsets/rho, averaged over the
batch. The squared form (Caffe's EuclideanLoss, 0.5 * sum of squares: --loss=euclidean) diverged in the
first steps with the paper's SGD 0.005 / momentum 0.9 here (batch 8: loss 1e35; batch 64: MACE 384 px
at step 2, then collapsed to the mean); the distance has a bounded gradient and trains stably.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time

from absl import flags, logging

from model import network
from model.training import data, loop, losses, run_dir
from model.training.loop import Diverged  # raised by train(); callers catch train.Diverged
from pipeline.dataset import photometric
from pipeline.runtime import cli, outputs

HISTORY_FIELDS = run_dir.HISTORY_FIELDS
plot_mace = run_dir.plot_mace
# What a checkpoint's variables depend on: a model_dir cannot be resumed with other values.
STRUCTURE_KEYS = ("architecture", "patch_size", "channels", "dropout", "batchnorm")


LOSSES = losses.LOSSES


class TrainError(ValueError):
    """A run that must not start; the message names the problem."""


class RunBusy(TrainError):
    """Another live job trains in the same model_dir; the message names its process."""


OPTIMIZERS = {"sgd": "SGD with --momentum (the paper)", "adam": "Adam (beta_1 = --momentum)"}

DEFAULTS = dict(steps=90000, batch_size=64, optimizer="sgd", learning_rate=0.005, momentum=0.9, lr_decay_steps=30000,
                lr_decay_factor=0.1, loss="l2_distance", clip_norm=0.0, val_every=1000, val_batches=0, checkpoint_every=1000, log_every=100,
                steps_per_loop=10, shuffle_buffer=data.DEFAULT_SHUFFLE_BUFFER, dropout=True, batchnorm=True, mixed_precision="none",
                jit_compile=False, architecture="homographynet", seed=0, train_split="train",
                val_split="validation", max_checkpoints=3, max_minutes=0.0, reader="auto", reader_workers=0,
                augment=False, photometric="none", photometric_share=1.0)


def _check_args(a: dict) -> None:
    for k in ("steps", "batch_size", "lr_decay_steps", "checkpoint_every", "log_every", "steps_per_loop"):
        if int(a[k]) <= 0:
            raise TrainError(f"--{k} must be positive, got {a[k]}")
    for k in ("val_every", "val_batches", "shuffle_buffer", "max_minutes", "reader_workers"):
        if a[k] < 0:
            raise TrainError(f"--{k} must be >= 0, got {a[k]}")
    if a["optimizer"] not in OPTIMIZERS:
        raise TrainError(f"unknown --optimizer '{a['optimizer']}'; known: {', '.join(OPTIMIZERS)}")
    if a["loss"] not in LOSSES:
        raise TrainError(f"unknown --loss '{a['loss']}'; known: {', '.join(LOSSES)}")
    for k in ("learning_rate", "momentum", "lr_decay_factor", "clip_norm", "max_minutes", "photometric_share"):
        if not math.isfinite(a[k]):  # NaN passes every comparison below; inf trains nothing useful
            raise TrainError(f"--{k} must be a finite number, got {a[k]}")
    if a["clip_norm"] < 0:
        raise TrainError(f"--clip_norm must be >= 0 (0 = off), got {a['clip_norm']}")
    if a["learning_rate"] <= 0 or not 0 <= a["momentum"] < 1 or not 0 < a["lr_decay_factor"] <= 1:
        raise TrainError(f"need learning_rate > 0, 0 <= momentum < 1, 0 < lr_decay_factor <= 1; got "
                         f"{a['learning_rate']}, {a['momentum']}, {a['lr_decay_factor']}")
    if a["architecture"] not in network.ARCHITECTURES:
        raise TrainError(f"unknown --architecture '{a['architecture']}'; known: {', '.join(network.ARCHITECTURES)}")
    try:
        network.dtype_policy(a["mixed_precision"])
        tf_data = data.uses_tf_data(a["reader"])
    except ValueError as e:
        raise TrainError(str(e)) from e
    if a["photometric"] not in photometric.MODELS:
        raise TrainError(f"unknown --photometric '{a['photometric']}'; known: {', '.join(photometric.MODELS)}")
    if not 0 < a["photometric_share"] <= 1:
        raise TrainError(f"--photometric_share must be in (0, 1], got {a['photometric_share']}")
    for flag, on in (("augment", a["augment"]), ("photometric", a["photometric"] != "none")):
        if on and tf_data:
            raise TrainError(f"--{flag} runs on the TensorFlow-free reader: add --reader=records")


# What a run directory holds from its first moment on (the lock, then config.json and checkpoints).
RUN_FILES = (run_dir.LOCK_FILE, network.CONFIG_FILE, run_dir.CHECKPOINT_DIR, network.MODEL_FILE)


# Bounds on what one training job may hold in memory (README, "What the commands promise").
MAX_BATCH_BYTES = 1 << 30     # one replica's batch of float32 inputs: 8,192 pairs of 128 px grayscale
MAX_SHUFFLE_BYTES = 1 << 30   # the shuffle buffer's records: 32,768 pairs of 128 px grayscale
MAX_TRAIN_BYTES = 4 << 30     # the promise: a run's peak resident memory
# The run's peak, estimated before any work from terms bench/peak_memory.py measured on this CPU (BUILD_NOTES
# section 6): the runtime; per weight the weights, gradients, two Adam moments and the checkpoint's copies;
# the shuffle buffer's records (1.2 bytes a byte: each is a string tensor of its own); per pair of a step
# 3.2 bytes for each value the network's layers compute (kept for the gradient; peaks creep up over the
# first 30 steps) and 22.5 bytes for each input value (the float batch, the ones tf.data has prefetched and
# the one being made). Runs are refused above MAX_TRAIN_BYTES less ESTIMATE_MARGIN, which covers the spread
# of peaks between runs (up to 0.3 GiB on this loaded CPU).
RUNTIME_BYTES = 700 << 20
WEIGHT_BYTES = 32
RECORD_BYTES = 1.2
VALUE_BYTES = 3.2
INPUT_BYTES = 22.5
ESTIMATE_MARGIN = 384 << 20


def memory_estimate(values: int, weights: int, input_values: int, batch_size: int, shuffle_buffer: int) -> float:
    """model.train's estimate of its peak resident bytes: a network computing `values` a pair and holding
    `weights`, fed `batch_size` pairs of `input_values` (P * P * 2C) a step from a buffer of that many
    records (one byte an input value)."""
    fixed = RUNTIME_BYTES + WEIGHT_BYTES * weights + RECORD_BYTES * shuffle_buffer * input_values
    return fixed + batch_size * (VALUE_BYTES * values + INPUT_BYTES * input_values)


def largest_batch(values: int, weights: int, input_values: int, shuffle_buffer: int) -> int:
    """The most pairs a step whose memory_estimate stays within MAX_TRAIN_BYTES - ESTIMATE_MARGIN."""
    fixed = memory_estimate(values, weights, input_values, 0, shuffle_buffer)
    per_pair = memory_estimate(values, weights, input_values, 1, shuffle_buffer) - fixed
    return max(0, int((MAX_TRAIN_BYTES - ESTIMATE_MARGIN - fixed) // per_pair))


def _check_input(a: dict, train_cfg, replicas: int, init_from: str | None, options: dict | None = None) -> None:
    """Refuses, before any work, what the data cannot feed or memory cannot hold: a batch larger than the
    training split or than MAX_BATCH_BYTES, a shuffle buffer over MAX_SHUFFLE_BYTES, a network that cannot
    take the data's patches, --init_from weights made for another network or other patches."""
    p, c = train_cfg.patch_size, train_cfg.channels
    problem = network.input_problem(a["architecture"], p, c)
    if problem:
        raise TrainError(f"--architecture={a['architecture']}: {problem}")
    batch = a["batch_size"] * replicas
    if batch > train_cfg.num_examples:
        raise TrainError(f"--batch_size {a['batch_size']} (x {replicas} replicas) is larger than the "
                         f"{train_cfg.num_examples} pairs of split '{a['train_split']}'")
    pair_bytes = p * p * c * 2
    if a["batch_size"] * pair_bytes * 4 > MAX_BATCH_BYTES:
        raise TrainError(f"--batch_size {a['batch_size']} of {p} px pairs needs more than {MAX_BATCH_BYTES >> 30} GiB "
                         f"of input a step; at most {MAX_BATCH_BYTES // (pair_bytes * 4)} at this patch size")
    if a["shuffle_buffer"] * pair_bytes > MAX_SHUFFLE_BYTES:
        raise TrainError(f"--shuffle_buffer {a['shuffle_buffer']} of {p} px pairs needs more than "
                         f"{MAX_SHUFFLE_BYTES >> 30} GiB; at most {MAX_SHUFFLE_BYTES // pair_bytes} at this patch size")
    values, weights = network.footprint(a["architecture"], p, c, a["dropout"], a["batchnorm"], options)
    need = memory_estimate(values, weights, pair_bytes, a["batch_size"], a["shuffle_buffer"])
    room = MAX_TRAIN_BYTES - ESTIMATE_MARGIN
    if need > room:
        most = largest_batch(values, weights, pair_bytes, a["shuffle_buffer"])
        raise TrainError(f"--batch_size {a['batch_size']} of {p} px pairs on the {a['architecture']} network "
                         f"({values:,} values a pair) with --shuffle_buffer {a['shuffle_buffer']} needs about "
                         f"{need / 2**30:.2f} GiB, more than the {room / 2**30:g} GiB allowed (a run must stay "
                         f"under {MAX_TRAIN_BYTES / 2**30:g} GiB); at most {most} pairs a step with this buffer")
    if init_from:
        source = _read_config(init_from)
        theirs = (source.get("architecture"), source.get("patch_size"), source.get("channels"))
        if theirs != (a["architecture"], p, c):
            raise TrainError(f"--init_from {init_from} holds a {theirs[0]} network for {theirs[1]} px patches with "
                             f"{theirs[2]} channel(s); this run trains a {a['architecture']} network on {p} px "
                             f"patches with {c}")


def _read_config(model_dir: str) -> dict | None:
    try:
        return network.read_config(model_dir)
    except network.RunConfigError as e:
        raise TrainError(str(e)) from None


def _check_model_dir(model_dir: str, config: dict) -> None:
    """Refuses to resume a run whose checkpoints were made for another network or input geometry."""
    old = _read_config(model_dir)
    if old is None:
        return
    diff = [f"{k}: {old.get(k)!r} there, {config[k]!r} now" for k in STRUCTURE_KEYS if old.get(k) != config[k]]
    if diff:
        raise TrainError(f"model_dir {model_dir} holds a run with another network or input ({'; '.join(diff)}); "
                         f"use a new --model_dir")
    if old.get("rho") != config["rho"]:
        logging.warning("resuming a run trained on rho %s with data of rho %s", old.get("rho"), config["rho"])


def train(data_dir: str, model_dir: str, *, step_hook=None, architecture_options: dict | None = None,
          **kwargs) -> dict:
    """Trains (or resumes) a run; returns a summary dict (start_step, final_step, stop_reason, last history
    row, paths, config).

    kwargs: any key of DEFAULTS. step_hook(step) is called after each execution of steps (tests use it to
    interrupt a run). architecture_options: JSON-able options for network.build (the architecture's own,
    init_from, freeze), recorded in config.json. Raises TrainError / data.DatasetError before any training
    for bad inputs (outputs.OutputError for a model_dir that is a file or cannot be written, also when a
    write fails later: a full disk); RunBusy when another live job holds model_dir; Diverged on a non-finite loss or weights
    (nothing saved from it); data.DamagedShardError for a damaged shard (a checkpoint of the last completed
    step saved first); KeyboardInterrupt (Ctrl-C, SIGTERM from the CLI) after saving a checkpoint.
    """
    started = time.time()
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown train() arguments: {', '.join(sorted(unknown))}")
    a = {**DEFAULTS, **kwargs}
    _check_args(a)
    # a file, or a folder that cannot be written (read-only filesystem): one line before any work
    # (reused when it holds a run: that is how it resumes; any other non-empty folder is not a run's)
    outputs.check_output_dir(model_dir, must_be_empty=False, flag="model_dir", inputs={"data_dir": data_dir},
                             reuse_if=RUN_FILES)
    options = architecture_options or {}
    if "bn_momentum" in options and not 0 <= options["bn_momentum"] < 1:  # NaN fails this too
        raise TrainError(f"--bn_momentum must be in [0, 1), got {options['bn_momentum']}")
    if "width" in options and not (type(options["width"]) is int and options["width"] >= 1):
        raise TrainError(f"--compact_width must be a whole number >= 1, got {options['width']}")
    init_from = options.get("init_from")
    if init_from and (_read_config(init_from) is None
                      or not os.path.exists(os.path.join(init_from, network.MODEL_FILE))):
        raise TrainError(f"--init_from {init_from} is not a finished training run (needs {network.CONFIG_FILE} and "
                         f"{network.MODEL_FILE})")
    train_cfg = data.dataset_config(data_dir, a["train_split"])
    if a["val_every"]:
        val_cfg = data.dataset_config(data_dir, a["val_split"])

    import keras

    strategy, devices = loop.devices(keras)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    config = {**a, "data_dir": os.path.abspath(data_dir) if "://" not in data_dir else data_dir,
              "patch_size": train_cfg.patch_size, "channels": train_cfg.channels, "rho": train_cfg.rho,
              "image_width": train_cfg.image_width, "image_height": train_cfg.image_height,
              "train_examples": train_cfg.num_examples,
              "val_examples": val_cfg.num_examples if a["val_every"] else None,
              "replicas": replicas, "global_batch_size": a["batch_size"] * replicas, "devices": devices,
              **loop.versions(keras), "input": "tf.data" if data.uses_tf_data(a["reader"]) else "pipeline.records",
              # JAX always compiles the step with XLA (jit); TensorFlow only with --jit_compile.
              "jit_compile": True if keras.backend.backend() == "jax" else bool(a["jit_compile"]),
              "architecture_options": dict(architecture_options or {})}
    _check_model_dir(model_dir, config)
    _check_input(a, train_cfg, replicas, init_from, options)
    with outputs.writing(model_dir, "create"):
        os.makedirs(model_dir, exist_ok=True)
    try:
        lock = run_dir.RunLock(model_dir).acquire()
    except run_dir.RunDirBusy as e:
        raise RunBusy(str(e)) from None
    try:
        run_dir.remove_partial_checkpoints(model_dir)
        if strategy:
            with strategy.scope():
                return loop.fit(data_dir, model_dir, a, config, started, step_hook)
        return loop.fit(data_dir, model_dir, a, config, started, step_hook)
    finally:
        lock.release()


FLAGS = flags.FLAGS


def _define_flags():
    """Defined when the CLI runs, not at import: other modules (pipeline.build, model.evaluate) use the same names."""
    flags.DEFINE_string("data_dir", None, "Built dataset (holds homography_index.json)")
    flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, logs, history, final model; reused to resume")
    flags.DEFINE_integer("steps", DEFAULTS["steps"], "Total training steps (the paper: 90,000)")
    flags.DEFINE_integer("batch_size", DEFAULTS["batch_size"], "Batch size per replica (global = this x replicas)")
    flags.DEFINE_enum("optimizer", DEFAULTS["optimizer"], list(OPTIMIZERS), "; ".join(f"{k}: {v}" for k, v in OPTIMIZERS.items()))
    flags.DEFINE_float("learning_rate", DEFAULTS["learning_rate"], "Initial learning rate")
    flags.DEFINE_float("momentum", DEFAULTS["momentum"], "SGD momentum (Adam's beta_1)")
    flags.DEFINE_integer("lr_decay_steps", DEFAULTS["lr_decay_steps"], "Multiply the learning rate by lr_decay_factor every N steps")
    flags.DEFINE_float("lr_decay_factor", DEFAULTS["lr_decay_factor"], "Staircase decay factor")
    flags.DEFINE_enum("loss", DEFAULTS["loss"], list(LOSSES), "; ".join(f"{k}: {v}" for k, v in LOSSES.items()))
    flags.DEFINE_float("clip_norm", DEFAULTS["clip_norm"], "Clip the global gradient norm to this (0 = off, the paper)")
    flags.DEFINE_integer("val_every", DEFAULTS["val_every"], "Validate every N steps (and at the end); 0 = never")
    flags.DEFINE_integer("val_batches", DEFAULTS["val_batches"], "Validation batches per check; 0 = the whole split")
    flags.DEFINE_integer("checkpoint_every", DEFAULTS["checkpoint_every"], "Checkpoint every N steps")
    flags.DEFINE_integer("log_every", DEFAULTS["log_every"], "Log line and history row every N steps")
    flags.DEFINE_integer("steps_per_loop", DEFAULTS["steps_per_loop"], "Steps per compiled call (Keras's "
                         "steps_per_execution; less Python overhead on a GPU); reduced to divide the event intervals")
    flags.DEFINE_float("max_minutes", 0.0, "Wall-clock budget: stop after this many minutes and save everything "
                       "as a normal end does (checkpoint, history, model.keras, export/); 0 = none")
    flags.DEFINE_integer("shuffle_buffer", DEFAULTS["shuffle_buffer"], "Shuffle buffer, in pairs")
    flags.DEFINE_bool("dropout", True, "Dropout 0.5 before the two dense layers (--nodropout for the ablation)")
    flags.DEFINE_bool("batchnorm", True, "Batch norm after each conv (--nobatchnorm for the ablation)")
    flags.DEFINE_bool("no_dropout", False, "Same as --nodropout (the issue's spelling)")
    flags.DEFINE_bool("no_batchnorm", False, "Same as --nobatchnorm (the issue's spelling)")
    flags.DEFINE_enum("mixed_precision", "none", ["none", "bfloat16", "float16"], "Mixed precision (float16 uses loss scaling)")
    flags.DEFINE_integer("compact_width", 32, "Filters of the compact network's first stage (the others are 2x, "
                         "4x, 8x it): 32 = 1.2 M parameters, 48 = 2.7 M, 64 = 4.8 M")
    flags.DEFINE_float("bn_momentum", 0.99, "Momentum of batch norm's moving statistics (homographynet); "
                       "0.9 for runs of a few hundred steps")
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the training step on TensorFlow (JAX always compiles it)")
    flags.DEFINE_enum("architecture", DEFAULTS["architecture"], list(network.ARCHITECTURES), "Network")
    flags.DEFINE_integer("seed", 0, "Seed for initialisation, dropout and shuffling")
    flags.DEFINE_string("train_split", "train", "Split to train on")
    flags.DEFINE_string("val_split", "validation", "Split to validate on")
    flags.DEFINE_enum("reader", "auto", list(data.READERS), "Shard reader: tf.data (Keras on TensorFlow), records "
                      "(pipeline.records, no TensorFlow needed), auto = tf.data on TensorFlow, records otherwise")
    flags.DEFINE_string("init_from", None, "Start from the weights of this run directory (e.g. the shipped "
                        "data/weights/compact_rho32), layer by layer by name; a fresh run only")
    flags.DEFINE_bool("augment", False, "Show each training batch through one of the 8 flips and transposes of "
                      "its patches, offsets mapped exactly (needs --reader=records)")
    flags.DEFINE_enum("photometric", "none", list(photometric.MODELS), "Give patch A and patch B of each "
                      "training pair their own fresh camera change (pipeline/dataset/photometric.py: shade, blur, "
                      "exposure, gamma, noise), labels unchanged (needs --reader=records)")
    flags.DEFINE_float("photometric_share", 1.0, "With --photometric=camera: the share of training pairs (drawn "
                       "per pair) that get camera changes; the rest stay exact")
    flags.DEFINE_integer("reader_workers", 0, "Processes decoding training shards for the records reader (0: the "
                         "training process itself; a GPU needs several to be fed)")


def main(argv):
    if len(argv) > 1:
        return _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.data_dir or not FLAGS.model_dir:
        return _fail("--data_dir and --model_dir are required")
    args = {k: FLAGS[k].value for k in DEFAULTS if k != "max_checkpoints"}
    args["dropout"] = FLAGS.dropout and not FLAGS.no_dropout
    args["batchnorm"] = FLAGS.batchnorm and not FLAGS.no_batchnorm

    def on_sigterm(signum, frame):  # a kill (preemption) checkpoints like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        options = {"bn_momentum": FLAGS.bn_momentum} if FLAGS.architecture in ("homographynet", "compact") else {}
        if FLAGS.architecture == "compact" and FLAGS.compact_width != 32:
            options["width"] = FLAGS.compact_width
        if FLAGS.init_from:  # fine-tuning: the weights of another run (or the shipped ones), layer by layer
            options["init_from"] = os.path.abspath(FLAGS.init_from)
        result = train(FLAGS.data_dir, FLAGS.model_dir, architecture_options=options, **args)
    except (TrainError, data.DatasetError, outputs.OutputError, run_dir.CheckpointError) as e:
        code = _fail(str(e))  # DamagedShardError is a DatasetError; OutputError: a disk full or read-only
        if run_dir.hdf5_failed():  # HDF5 would crash the process at exit (run_dir.write_or_fail): end it here
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except Diverged as e:
        print(f"model.train: diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("model.train: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    last = result["last"] or {}
    print(f"trained {result['start_step']} -> {result['final_step']} steps in {result['model_dir']}"
          + (" (--max_minutes reached; the same command continues)" if result["stop_reason"] == "max_minutes" else "")
          + (f"; validation MACE {last['val_mace']:.2f} px" if last.get("val_mace") is not None else ""))
    return 0


def _fail(message: str) -> int:
    return cli.fail("model.train", message)


def run():
    cli.run("model.train", main, _define_flags)


if __name__ == "__main__":
    run()
