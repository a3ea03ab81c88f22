"""Peak memory and time of the training step alone, by batch-norm layer: Keras's own BatchNormalization,
network.FusedBatchNormalization (what model.train builds) and no BN at all.

  python -m bench.step_memory [--architecture=homographynet] [--batch_size=74] [--steps=5]

Each variant runs in a fresh process (peak resident memory, ru_maxrss, is per process): the network at
128 px grayscale, Adam, `train_on_batch` on one random batch held in memory, --steps steps; it prints the
peak after the first step and after the last, and the seconds a step from the second on. No input
pipeline, no checkpoint: what the step itself holds (bench.peak_memory measures whole model.train runs).
"""
from __future__ import annotations

import os
import subprocess
import sys

from absl import app, flags

from bench.common import REPO, headline

flags.DEFINE_enum("architecture", "homographynet", ["homographynet", "compact"], "The network")
flags.DEFINE_integer("batch_size", 74, "Pairs a step")
flags.DEFINE_integer("steps", 5, "Steps per variant (at least 2)")
FLAGS = flags.FLAGS

VARIANTS = ("keras_bn", "fused_bn", "no_bn")

STEP = """
import resource, sys, time
import numpy as np, keras
from model import network
architecture, batch, steps, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
options = {"keras_bn": {"fused_bn": False}, "fused_bn": {}, "no_bn": {}}[variant]
model = network.build(architecture, 128, 1, batchnorm=variant != "no_bn", options=options)
model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
rng = np.random.default_rng(0)
x, y = rng.random((batch, 128, 128, 2), np.float32), rng.random((batch, 8), np.float32)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
model.train_on_batch(x, y)
first = peak()
t0 = time.perf_counter()
for _ in range(steps - 1):
    model.train_on_batch(x, y)
print(first, peak(), (time.perf_counter() - t0) / (steps - 1))
"""


def main(argv):
    del argv
    if FLAGS.steps < 2 or FLAGS.batch_size < 1:
        raise app.UsageError("--steps must be at least 2 and --batch_size at least 1")
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    figures = {}
    print(f"{FLAGS.architecture}, batch {FLAGS.batch_size}, {FLAGS.steps} steps, Adam, a batch in memory")
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, "-c", STEP, FLAGS.architecture, str(FLAGS.batch_size),
                              str(FLAGS.steps), variant], env=env, cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
        first, last, seconds = (float(v) for v in out[-3:])
        print(f"  {variant:<9} peak {first:.2f} GiB after step 1, {last:.2f} after step {FLAGS.steps}; "
              f"{seconds:.2f} s a step")
        figures |= {f"{variant}_peak_gib": round(last, 2), f"{variant}_s_per_step": round(seconds, 2)}
    figures["fused_bn_step_speedup"] = round(figures["keras_bn_s_per_step"] / figures["fused_bn_s_per_step"], 2)
    figures["fused_bn_gib_saved"] = round(figures["keras_bn_peak_gib"] - figures["fused_bn_peak_gib"], 2)
    headline(figures)


if __name__ == "__main__":
    app.run(main)
