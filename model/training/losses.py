"""The training losses and MACE, as Keras functions (training, either backend) and in numpy (validation).

All work on scaled offsets: d = prediction - offsets / rho (8 values per pair).
"""
from __future__ import annotations

import numpy as np

# Per-example losses (--loss).
LOSSES = {"euclidean": "0.5 * sum(d^2), Caffe's EuclideanLoss as in the paper",
          "mse": "mean(d^2) over the 8 values (a quarter of euclidean's gradient)",
          "l2_distance": "sqrt(sum(d^2)), the Euclidean distance itself (bounded gradient)"}


def keras_loss(kind: str):
    """LOSSES[kind] as a Keras loss function (Keras averages it over the batch)."""
    from keras import ops

    def loss(y_true, y_pred):
        d = ops.cast(y_pred, "float32") - ops.cast(y_true, "float32")
        sq = ops.sum(ops.square(d), axis=-1)
        return {"euclidean": 0.5 * sq, "mse": sq / 8.0, "l2_distance": ops.sqrt(sq + 1e-12)}[kind]

    loss.__name__ = kind
    return loss


def keras_mace(rho: float):
    """MACE in pixels per pair as a Keras metric function (logged as 'mace')."""
    from keras import ops

    def mace(y_true, y_pred):
        err = ops.reshape((ops.cast(y_pred, "float32") - ops.cast(y_true, "float32")) * rho, (-1, 4, 2))
        return ops.mean(ops.sqrt(ops.sum(ops.square(err), axis=-1) + 1e-12), axis=-1)

    return mace


def per_example_loss(kind: str, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LOSSES[kind] in numpy, per pair."""
    sq = np.sum(np.square(pred.astype(np.float64) - y), axis=-1)
    return {"euclidean": 0.5 * sq, "mse": sq / 8.0, "l2_distance": np.sqrt(sq + 1e-12)}[kind]


def mace_pixels(pred: np.ndarray, y: np.ndarray, rho: float) -> np.ndarray:
    """MACE in pixels per pair, from scaled predictions and labels (N, 8)."""
    err = ((pred.astype(np.float64) - y) * rho).reshape(-1, 4, 2)
    return np.linalg.norm(err, axis=-1).mean(axis=-1)
