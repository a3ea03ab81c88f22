"""Inference benchmark: seconds per pair of the network (batch 1 and batch 64, this CPU) and of the
classical methods (ORB + RANSAC, SIFT + RANSAC, ECC), on the same validation pairs.

  python -m bench.infer [--data_dir=OUT] [--model_dir=RUN] [--pairs=128]

Timing does not depend on the weights: without --model_dir the network is the untrained architecture.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
import time

from absl import app, flags

from bench.common import dataset_dir, headline

flags.DEFINE_string("data_dir", None, "A built dataset (default: coco_mini built into a temporary folder)")
flags.DEFINE_string("model_dir", None, "A training run (default: an untrained HomographyNet)")
flags.DEFINE_integer("pairs", 128, "Validation pairs timed per method")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import cv2

    from model import network
    from model.estimators import methods
    from model.training import data

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_infer_"))
    data_dir = dataset_dir(FLAGS.data_dir, work)
    cfg = data.dataset_config(data_dir, "validation")
    batch = next(iter(data.read_batches(data_dir, "validation", FLAGS.pairs)))
    a, b = batch["patch_a"].numpy(), batch["patch_b"].numpy()
    n = len(a)
    print(f"machine: {os.cpu_count()} cores, OpenCV threads {cv2.getNumThreads()}; {n} validation pairs "
          f"of {cfg.patch_size}x{cfg.patch_size}x{cfg.channels}")
    if FLAGS.model_dir:
        model, _ = network.load(FLAGS.model_dir)
    else:
        model = network.build("homographynet", cfg.patch_size, cfg.channels)
    seconds = {}
    for bs in (1, 64):
        network.predict_offsets(model, a[:bs], b[:bs], cfg.rho, batch_size=bs)  # warm up / trace
        t0 = time.perf_counter()
        network.predict_offsets(model, a, b, cfg.rho, batch_size=bs)
        seconds[f"network_batch{bs}"] = (time.perf_counter() - t0) / n
    for name in ("orb", "sift", "ecc"):
        t0 = time.perf_counter()
        for i in range(n):
            methods.estimate(name, a[i], b[i])
        seconds[name] = (time.perf_counter() - t0) / n
    for name, s in seconds.items():
        print(f"  {name:<16} {1000 * s:8.2f} ms/pair  ({1 / s:8.0f} pairs/s)")
    headline({f"{k}_ms_per_pair": 1000 * v for k, v in seconds.items()})


if __name__ == "__main__":
    app.run(main)
