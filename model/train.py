"""Trains HomographyNet on built shards with the paper's recipe; checkpoints, resumes, records the run.

  python -m model.train --data_dir=OUT --model_dir=RUN [--steps=90000 --batch_size=64 --learning_rate=0.005
                        --momentum=0.9 --lr_decay_steps=30000 --lr_decay_factor=0.1 --val_every=1000 ...]

Running the same command again on the same model_dir resumes from its latest checkpoint (model,
optimizer state, step counter, hence the same learning-rate schedule). model_dir ends up with:
  config.json          every flag, the dataset's geometry, device and replicas
  checkpoints/         tf.train.Checkpoint every --checkpoint_every steps (and on Ctrl-C / SIGTERM)
  logs/{train,validation}/  TensorBoard scalars (loss, MACE in pixels, learning rate, steps/s)
  history.csv, history.json  one row per --log_every steps: train loss/MACE, validation loss/MACE
  model.keras          the final model (Keras 3 format, backend-neutral)
  export/              SavedModel for serving: endpoints `serve` (normalised (N,P,P,2C) float32 ->
                       offsets/rho) and `offsets` (uint8 patch_a, patch_b (N,P,P,C) -> offsets in pixels)
  mace.png             training and validation MACE against steps

Loss (--loss): the Euclidean (L2) distance between predicted and true offsets/rho, averaged over the
batch. The squared form (Caffe's EuclideanLoss, 0.5 * sum of squares: --loss=euclidean) diverged in the
first steps with the paper's SGD 0.005 / momentum 0.9 here (batch 8: loss 1e35; batch 64: MACE 384 px
at step 2, then collapsed to the mean); the distance has a bounded gradient and trains stably.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time

from absl import flags, logging

from model import data, network
from pipeline import cli

HISTORY_FIELDS = ("step", "learning_rate", "train_loss", "train_mace", "val_loss", "val_mace", "val_identity_mace",
                  "steps_per_sec", "examples_per_sec", "elapsed_s")
# What a checkpoint's variables depend on: a model_dir cannot be resumed with other values.
STRUCTURE_KEYS = ("architecture", "patch_size", "channels", "dropout", "batchnorm")


# Per-example losses on the scaled offsets d = prediction - offsets/rho (8 values).
LOSSES = {"euclidean": "0.5 * sum(d^2), Caffe's EuclideanLoss as in the paper",
          "mse": "mean(d^2) over the 8 values (a quarter of euclidean's gradient)",
          "l2_distance": "sqrt(sum(d^2)), the Euclidean distance itself (bounded gradient)"}


class TrainError(ValueError):
    """A run that must not start; the message names the problem."""


OPTIMIZERS = {"sgd": "SGD with --momentum (the paper)", "adam": "Adam (beta_1 = --momentum)"}

DEFAULTS = dict(steps=90000, batch_size=64, optimizer="sgd", learning_rate=0.005, momentum=0.9, lr_decay_steps=30000,
                lr_decay_factor=0.1, loss="l2_distance", clip_norm=0.0, val_every=1000, val_batches=0, checkpoint_every=1000, log_every=100,
                steps_per_loop=10, shuffle_buffer=10000, dropout=True, batchnorm=True, mixed_precision="none",
                jit_compile=False, architecture="homographynet", seed=0, train_split="train",
                val_split="validation", max_checkpoints=3)


def _check_args(a: dict) -> None:
    for k in ("steps", "batch_size", "lr_decay_steps", "checkpoint_every", "log_every", "steps_per_loop"):
        if int(a[k]) <= 0:
            raise TrainError(f"--{k} must be positive, got {a[k]}")
    for k in ("val_every", "val_batches", "shuffle_buffer"):
        if int(a[k]) < 0:
            raise TrainError(f"--{k} must be >= 0, got {a[k]}")
    if a["optimizer"] not in OPTIMIZERS:
        raise TrainError(f"unknown --optimizer '{a['optimizer']}'; known: {', '.join(OPTIMIZERS)}")
    if a["loss"] not in LOSSES:
        raise TrainError(f"unknown --loss '{a['loss']}'; known: {', '.join(LOSSES)}")
    if a["clip_norm"] < 0:
        raise TrainError(f"--clip_norm must be >= 0 (0 = off), got {a['clip_norm']}")
    if a["learning_rate"] <= 0 or not 0 <= a["momentum"] < 1 or not 0 < a["lr_decay_factor"] <= 1:
        raise TrainError(f"need learning_rate > 0, 0 <= momentum < 1, 0 < lr_decay_factor <= 1; got "
                         f"{a['learning_rate']}, {a['momentum']}, {a['lr_decay_factor']}")
    if a["architecture"] not in network.ARCHITECTURES:
        raise TrainError(f"unknown --architecture '{a['architecture']}'; known: {', '.join(network.ARCHITECTURES)}")
    try:
        network.dtype_policy(a["mixed_precision"])
    except ValueError as e:
        raise TrainError(str(e)) from e


def _check_model_dir(model_dir: str, config: dict) -> None:
    """Refuses to resume a run whose checkpoints were made for another network or input geometry."""
    old = network.read_config(model_dir)
    if old is None:
        return
    diff = [f"{k}: {old.get(k)!r} there, {config[k]!r} now" for k in STRUCTURE_KEYS if old.get(k) != config[k]]
    if diff:
        raise TrainError(f"model_dir {model_dir} holds a run with another network or input ({'; '.join(diff)}); "
                         f"use a new --model_dir")
    if old.get("rho") != config["rho"]:
        logging.warning("resuming a run trained on rho %s with data of rho %s", old.get("rho"), config["rho"])


def _strategy(tf):
    gpus = tf.config.list_logical_devices("GPU")
    # One device: the default strategy (no overhead). Several GPUs: synchronous data parallelism.
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy(), gpus


def _read_history(model_dir: str, upto_step: int) -> list:
    path = os.path.join(model_dir, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in json.load(f) if r["step"] <= upto_step]


def _write_history(model_dir: str, history: list) -> None:
    tmp = os.path.join(model_dir, "history.json.tmp")
    with open(tmp, "w") as f:
        json.dump(history, f, indent=1)
    os.replace(tmp, os.path.join(model_dir, "history.json"))
    with open(os.path.join(model_dir, "history.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, HISTORY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})


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


def _export(model, path: str, patch_size: int, channels: int, rho: float) -> None:
    """SavedModel with a `serve` endpoint (the model itself) and an `offsets` endpoint from raw uint8 patches."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, patch_size, patch_size, 2 * channels), tf.float32, name="patches")
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
    raw = tf.TensorSpec((None, patch_size, patch_size, channels), tf.uint8)
    archive.add_endpoint("offsets", lambda a, b: model(data.normalize(a, b), training=False) * float(rho),
                         input_signature=[raw, raw])
    archive.write_out(path, verbose=False)


def train(data_dir: str, model_dir: str, *, step_hook=None, architecture_options: dict | None = None,
          **kwargs) -> dict:
    """Trains (or resumes) a run; returns a summary dict (start_step, final_step, last history row, paths).

    kwargs: any key of DEFAULTS. step_hook(step) is called after each loop of steps (tests use it to
    interrupt a run). architecture_options: JSON-able options for network.build (the architecture's own,
    init_from, freeze), recorded in config.json. Raises TrainError / data.DatasetError before any training
    for bad inputs.
    """
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown train() arguments: {', '.join(sorted(unknown))}")
    a = {**DEFAULTS, **kwargs}
    _check_args(a)
    train_cfg = data.dataset_config(data_dir, a["train_split"])
    val_cfg = data.dataset_config(data_dir, a["val_split"]) if a["val_every"] else None

    import keras
    import tensorflow as tf

    strategy, gpus = _strategy(tf)
    replicas = strategy.num_replicas_in_sync
    global_batch = a["batch_size"] * replicas
    config = {**a, "data_dir": os.path.abspath(data_dir) if "://" not in data_dir else data_dir,
              "patch_size": train_cfg.patch_size, "channels": train_cfg.channels, "rho": train_cfg.rho,
              "image_width": train_cfg.image_width, "image_height": train_cfg.image_height,
              "train_examples": train_cfg.num_examples,
              "val_examples": val_cfg.num_examples if val_cfg else None,
              "replicas": replicas, "global_batch_size": global_batch,
              "devices": [d.name for d in gpus] or ["CPU"], "tensorflow": tf.__version__,
              "keras": keras.__version__, "architecture_options": dict(architecture_options or {})}
    _check_model_dir(model_dir, config)
    os.makedirs(model_dir, exist_ok=True)
    rho = float(train_cfg.rho)

    with strategy.scope():
        keras.utils.set_random_seed(a["seed"])
        model = network.build(a["architecture"], train_cfg.patch_size, train_cfg.channels, a["dropout"],
                              a["batchnorm"], dtype=network.dtype_policy(a["mixed_precision"]),
                              options=config["architecture_options"])
        schedule = keras.optimizers.schedules.ExponentialDecay(
            a["learning_rate"], a["lr_decay_steps"], a["lr_decay_factor"], staircase=True)
        if a["optimizer"] == "adam":
            optimizer = keras.optimizers.Adam(schedule, beta_1=a["momentum"], global_clipnorm=a["clip_norm"] or None)
        else:
            optimizer = keras.optimizers.SGD(schedule, momentum=a["momentum"], global_clipnorm=a["clip_norm"] or None)
        if a["mixed_precision"] == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # dynamic loss scaling
        optimizer.build(model.trainable_variables)  # optimizer slots must exist before a restore
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(model_dir, network.CHECKPOINT_DIR),
                                         max_to_keep=a["max_checkpoints"])
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("resumed from %s at step %d", manager.latest_checkpoint, int(step_var.numpy()))
    start_step = int(step_var.numpy())
    config["resumed_from_step"] = start_step
    with open(os.path.join(model_dir, network.CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    logging.info("model %s: %d parameters; %d replica(s), global batch %d; steps %d -> %d",
                 a["architecture"], model.count_params(), replicas, global_batch, start_step, a["steps"])

    def per_example(pred, y):
        """Loss on scaled offsets (see LOSSES) and MACE in pixels, per example."""
        pred = tf.cast(pred, tf.float32)
        sq = tf.reduce_sum(tf.square(pred - y), axis=-1)
        loss = {"euclidean": 0.5 * sq, "mse": sq / 8.0, "l2_distance": tf.sqrt(sq + 1e-12)}[a["loss"]]
        err = tf.reshape((pred - y) * rho, (-1, 4, 2))
        return loss, tf.reduce_mean(tf.norm(err, axis=-1), axis=-1)

    # autograph=False everywhere: no Python control flow on tensors here, and autograph re-reads the
    # source file (editing it under a running job broke a run).
    @tf.function(jit_compile=a["jit_compile"], autograph=False)
    def gradients(x, y):
        with tf.GradientTape() as tape:
            loss, mace = per_example(model(x, training=True), y)
            total = tf.reduce_sum(loss) / global_batch
            if model.losses:  # weight regularisers (e.g. the transfer head's L2), counted once per global batch
                total += tf.add_n(model.losses) / replicas
            scaled = optimizer.scale_loss(total)
        return tape.gradient(scaled, model.trainable_variables), tf.reduce_sum(loss), tf.reduce_sum(mace)

    def replica_step(x, y):
        # XLA (if asked) compiles forward + backward; the update stays outside it so that the
        # optimizer's cross-replica merge works under MirroredStrategy too.
        grads, loss_sum, mace_sum = gradients(x, y)
        optimizer.apply(grads, model.trainable_variables)
        return loss_sum, mace_sum

    sum_ = tf.distribute.ReduceOp.SUM

    @tf.function(autograph=False)  # hence an explicit while_loop
    def train_loop(iterator, n):
        def body(i, loss_sum, mace_sum):
            x, y = next(iterator)
            l, m = strategy.run(replica_step, args=(x, y))
            with tf.control_dependencies([step_var.assign_add(1)]):
                return (i + 1, loss_sum + strategy.reduce(sum_, l, axis=None),
                        mace_sum + strategy.reduce(sum_, m, axis=None))
        _, loss_sum, mace_sum = tf.while_loop(lambda i, *_: i < n, body,
                                              (tf.constant(0, tf.int64), tf.constant(0.0), tf.constant(0.0)))
        return loss_sum, mace_sum

    @tf.function(autograph=False)
    def val_step(x, y):
        def fn(x, y):
            loss, mace = per_example(model(x, training=False), y)
            ident = tf.reduce_mean(tf.norm(tf.reshape(y * rho, (-1, 4, 2)), axis=-1), axis=-1)
            return tf.reduce_sum(loss), tf.reduce_sum(mace), tf.reduce_sum(ident), tf.cast(tf.shape(y)[0], tf.float32)
        return [strategy.reduce(sum_, v, axis=None) for v in strategy.run(fn, args=(x, y))]

    def validate():
        ds = data.make_dataset(data_dir, a["val_split"], global_batch, training=False)
        if a["val_batches"]:
            ds = ds.take(a["val_batches"])
        totals = [0.0] * 4
        for x, y in strategy.experimental_distribute_dataset(ds):
            totals = [t + float(v) for t, v in zip(totals, val_step(x, y))]
        n = max(totals[3], 1.0)
        return totals[0] / n, totals[1] / n, totals[2] / n

    # Fresh shuffle order after a resume (the data stream itself is not checkpointed).
    train_ds = data.make_dataset(data_dir, a["train_split"], global_batch, training=True,
                                 shuffle_buffer=a["shuffle_buffer"], seed=a["seed"] + start_step)
    iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    writers = {k: tf.summary.create_file_writer(os.path.join(model_dir, "logs", k)) for k in ("train", "validation")}
    history = _read_history(model_dir, start_step)
    steps = a["steps"]

    def due(step, every):
        return every and (step % every == 0 or step == steps)

    def lr_at(step):
        return float(f"{float(schedule(step)):.7g}")  # float32 -> readable decimal

    step = start_step
    acc_loss = acc_mace = tf.constant(0.0)
    acc_steps, t_interval, t_start = 0, time.time(), time.time()
    elapsed0 = history[-1]["elapsed_s"] if history else 0.0
    try:
        while step < steps:
            events = [e for e in (a["log_every"], a["checkpoint_every"], a["val_every"]) if e]
            next_event = min([steps] + [(step // e + 1) * e for e in events])
            n = min(a["steps_per_loop"], next_event - step)
            loss_sum, mace_sum = train_loop(iterator, tf.constant(n, tf.int64))
            acc_loss, acc_mace = acc_loss + loss_sum, acc_mace + mace_sum  # stays on device until logged
            step += n
            acc_steps += n
            row = None
            if due(step, a["log_every"]) or due(step, a["val_every"]):
                dt = max(time.time() - t_interval, 1e-9)
                row = {"step": step, "learning_rate": lr_at(step - 1),
                       "train_loss": float(acc_loss) / (acc_steps * global_batch),
                       "train_mace": float(acc_mace) / (acc_steps * global_batch),
                       "val_loss": None, "val_mace": None, "val_identity_mace": None,
                       "steps_per_sec": acc_steps / dt, "examples_per_sec": acc_steps * global_batch / dt}
                acc_loss = acc_mace = tf.constant(0.0)
                acc_steps = 0
            if due(step, a["val_every"]):
                row["val_loss"], row["val_mace"], row["val_identity_mace"] = validate()
            if row:
                row["elapsed_s"] = round(elapsed0 + time.time() - t_start, 2)
                history.append(row)
                _log_row(row, steps, writers, tf)
                _write_history(model_dir, history)
                t_interval = time.time()
            if due(step, a["checkpoint_every"]):
                manager.save(checkpoint_number=step)
            if row and row["val_mace"] is not None:
                plot_mace(history, os.path.join(model_dir, "mace.png"), os.path.basename(os.path.abspath(model_dir)))
            if step_hook:
                step_hook(step)
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM from the CLI): keep every finished step. step_var moves with the model.
        done = int(step_var.numpy())
        if done > start_step:
            manager.save(checkpoint_number=done)
        logging.warning("interrupted at step %d; checkpoint saved, run the same command to resume", done)
        raise

    if manager.latest_checkpoint is None or int(manager.latest_checkpoint.rsplit("-", 1)[-1]) != step:
        manager.save(checkpoint_number=step)
    model.save(os.path.join(model_dir, network.MODEL_FILE))
    _export(model, os.path.join(model_dir, "export"), train_cfg.patch_size, train_cfg.channels, rho)
    if history:
        plot_mace(history, os.path.join(model_dir, "mace.png"), os.path.basename(os.path.abspath(model_dir)))
    logging.info("done: step %d, model in %s", step, model_dir)
    return {"start_step": start_step, "final_step": step, "learning_rate": lr_at(step - 1) if step else None,
            "optimizer_iterations": int(optimizer.iterations.numpy()), "last": history[-1] if history else None,
            "model_dir": model_dir, "config": config}


def _log_row(row: dict, steps: int, writers: dict, tf) -> None:
    msg = (f"step {row['step']}/{steps} lr {row['learning_rate']:.2e} loss {row['train_loss']:.4f} "
           f"MACE {row['train_mace']:.2f} px | {row['steps_per_sec']:.2f} steps/s ({row['examples_per_sec']:.0f} ex/s)")
    if row["val_mace"] is not None:
        msg += f" | validation loss {row['val_loss']:.4f} MACE {row['val_mace']:.2f} px (identity {row['val_identity_mace']:.2f})"
    logging.info(msg)
    scalars = {"train": {k.replace("train_", ""): row[k] for k in
                         ("train_loss", "train_mace", "learning_rate", "steps_per_sec")}}
    if row["val_mace"] is not None:
        scalars["validation"] = {"loss": row["val_loss"], "mace": row["val_mace"]}
    for split, values in scalars.items():
        with writers[split].as_default(step=row["step"]):
            for tag, value in values.items():
                _scalar_summary(tf, tag, value)
        writers[split].flush()


def _scalar_summary(tf, tag: str, value: float) -> None:
    """What tf.summary.scalar writes, through core TF: tf.summary.scalar itself needs the tensorboard
    package, which the pinned stack does not include; the event files read the same in TensorBoard."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=metadata.SerializeToString())


FLAGS = flags.FLAGS


def _define_flags():
    """Defined when the CLI runs, not at import: other modules (pipeline.build, model.evaluate) use the same names."""
    flags.DEFINE_string("data_dir", None, "Built dataset (holds dataset_info.json)")
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
    flags.DEFINE_integer("steps_per_loop", DEFAULTS["steps_per_loop"], "Steps run inside one tf.function call (less Python overhead on GPU)")
    flags.DEFINE_integer("shuffle_buffer", DEFAULTS["shuffle_buffer"], "Shuffle buffer, in pairs")
    flags.DEFINE_bool("dropout", True, "Dropout 0.5 before the two dense layers (--nodropout for the ablation)")
    flags.DEFINE_bool("batchnorm", True, "Batch norm after each conv (--nobatchnorm for the ablation)")
    flags.DEFINE_bool("no_dropout", False, "Same as --nodropout (the issue's spelling)")
    flags.DEFINE_bool("no_batchnorm", False, "Same as --nobatchnorm (the issue's spelling)")
    flags.DEFINE_enum("mixed_precision", "none", ["none", "bfloat16", "float16"], "Mixed precision (float16 uses loss scaling)")
    flags.DEFINE_float("bn_momentum", 0.99, "Momentum of batch norm's moving statistics (homographynet); "
                       "0.9 for runs of a few hundred steps")
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the forward and backward pass")
    flags.DEFINE_enum("architecture", DEFAULTS["architecture"], list(network.ARCHITECTURES), "Network")
    flags.DEFINE_integer("seed", 0, "Seed for initialisation, dropout and shuffling")
    flags.DEFINE_string("train_split", "train", "Split to train on")
    flags.DEFINE_string("val_split", "validation", "Split to validate on")


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
        options = {"bn_momentum": FLAGS.bn_momentum} if FLAGS.architecture in ("homographynet", "compact") else None
        result = train(FLAGS.data_dir, FLAGS.model_dir, architecture_options=options, **args)
    except (TrainError, data.DatasetError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("model.train: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    last = result["last"] or {}
    print(f"trained {result['start_step']} -> {result['final_step']} steps in {result['model_dir']}"
          + (f"; validation MACE {last['val_mace']:.2f} px" if last.get("val_mace") is not None else ""))
    return 0


def _fail(message: str) -> int:
    return cli.fail("model.train", message)


def run():
    cli.run("model.train", main, _define_flags)


if __name__ == "__main__":
    run()
