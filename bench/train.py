"""Training-step benchmark: samples/s of train steps fed by the real input pipeline against the same
steps fed by one batch held in memory (the input's cost is the difference).

  python -m bench.train [--data_dir=OUT] [--batch_size=64] [--steps=20] [--keras_bn]

The step is model.train's, for each of --architectures (the paper's HomographyNet and the compact one): forward + backward, Euclidean loss on scaled offsets, SGD with
momentum, inside a tf.function loop of steps. On this CPU a step is compute-bound, so the ratio says
little about a GPU; on a GPU box run the same command (BUILD_NOTES.md says what to expect).
"""
from __future__ import annotations

import os
import pathlib
import tempfile
import time

from absl import app, flags

from bench.common import dataset_dir, headline

flags.DEFINE_string("data_dir", None, "A built dataset (default: coco_mini built into a temporary folder)")
flags.DEFINE_integer("batch_size", 64, "Batch size")
flags.DEFINE_integer("steps", 20, "Timed steps per variant (after 3 warm-up steps)")
flags.DEFINE_list("architectures", ["homographynet", "compact"], "Networks to time, each fed both ways; "
                  "compact@W: the compact network of width W (model.train --compact_width=W)")
flags.DEFINE_bool("keras_bn", False, "Also time each network with Keras's own BatchNormalization in place of "
                  "network.FusedBatchNormalization (the ratio is the fused kernel's speed-up)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from model import network
    from model.training import data

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_train_"))
    data_dir = dataset_dir(FLAGS.data_dir, work)
    cfg = data.dataset_config(data_dir, "train")
    b = FLAGS.batch_size
    gpus = tf.config.list_physical_devices("GPU")
    print(f"machine: {os.cpu_count()} cores, {len(gpus)} GPU(s); data: {data_dir}; batch {b}; "
          f"patch {cfg.patch_size}x{cfg.patch_size}x{2 * cfg.channels}")

    def timed(architecture):
        spec, _, bn = architecture.partition("/")
        name, _, width = spec.partition("@")
        options = ({"width": int(width)} if width else {}) | ({"fused_bn": False} if bn == "keras_bn" else {})
        model = network.build(name, cfg.patch_size, cfg.channels, options=options)
        print(f"{architecture}: {model.count_params():,} parameters")
        return _rates(model, keras, tf, data_dir, b)

    variants = [v for a in FLAGS.architectures for v in ([a, a + "/keras_bn"] if FLAGS.keras_bn else [a])]
    rates = {a: timed(a) for a in variants}
    figures = {}
    for a, r in rates.items():
        for name, rate in r.items():
            print(f"  {a:<14} train steps fed by {name:<22} {rate:8.1f} samples/s")
        figures[f"{a}_train_samples_per_s_in_memory"] = r["in-memory batch"]
        figures[f"{a}_train_samples_per_s_real_input"] = r["real input pipeline"]
        figures[f"{a}_input_cost_fraction"] = 1 - r["real input pipeline"] / r["in-memory batch"]
    for a in FLAGS.architectures:
        if a + "/keras_bn" in rates:
            figures[f"{a}_fused_bn_speedup"] = rates[a]["in-memory batch"] / rates[a + "/keras_bn"]["in-memory batch"]
    if "homographynet" in rates and "compact" in rates:
        figures["compact_speedup"] = rates["compact"]["in-memory batch"] / rates["homographynet"]["in-memory batch"]
    headline(figures)


def _rates(model, keras, tf, data_dir, b):
    from model.training import data

    optimizer = keras.optimizers.SGD(0.005, momentum=0.9)

    @tf.function
    def loop(iterator, n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            x, y = next(iterator)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(0.5 * tf.reduce_sum(tf.square(model(x, training=True) - y), -1))
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            total += loss
        return total

    def samples_per_second(ds):
        it = iter(ds)
        loop(it, tf.constant(3)).numpy()  # trace + warm up
        t0 = time.perf_counter()
        loop(it, tf.constant(FLAGS.steps)).numpy()
        return FLAGS.steps * b / (time.perf_counter() - t0)

    real = data.make_dataset(data_dir, "train", b, training=True)
    one_batch = tf.data.Dataset.from_tensors(next(iter(real))).repeat()
    return {"in-memory batch": samples_per_second(one_batch), "real input pipeline": samples_per_second(real)}


if __name__ == "__main__":
    app.run(main)
