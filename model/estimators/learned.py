"""The trained network as an estimator, batched: on the dataset's patches, or on whole photos squeezed to
its P x P input with the answer mapped back to the photos' own pixels.

  network      one pass per pair
  network_tta  the network on the 8 flips and transposes of the pair, each estimate mapped back exactly
               (pipeline.dataset.geometry.view_offsets) and the corners averaged: 8 passes for one estimate

On photos, with S_a and S_b the matrices that take an original pixel of A and of B to the squeezed frame
(estimate.resize_matrix: pixel centres at integers, as cv2.resize maps them), the photos' homography is
H = S_a^-1 . H_local . S_b (B's pixel -> squeezed B -> squeezed A -> A's pixel). The squeeze is the
dataset builder's resize (pipeline.builder.coco.decode_resize): INTER_AREA when the photo is at least P on
both sides, INTER_LINEAR otherwise.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from model.estimators.estimate import Frame, resize_matrix
from pipeline.dataset import geometry


def network_offsets(model, patches_a: np.ndarray, patches_b: np.ndarray, rho: float,
                    batch_size: int = 64) -> np.ndarray:
    """The trained network on a batch of uint8 pairs (N, P, P, C): (N, 4, 2) offsets in pixels."""
    from model import network  # TensorFlow only when the network is asked for

    out = network.predict_offsets(model, patches_a, patches_b, rho, batch_size=batch_size)
    return np.asarray(out, np.float32).reshape(-1, 4, 2)


def network_offsets_tta(model, patches_a: np.ndarray, patches_b: np.ndarray, rho: float,
                        batch_size: int = 64) -> np.ndarray:
    """The network on the 8 views of each pair (test-time augmentation), each estimate mapped back to the
    pair's own frame exactly, corners averaged: (N, 4, 2). NaN where a view's output is not finite."""
    patch_size = patches_a.shape[1]
    estimates = []
    for view in geometry.VIEWS:
        out = network_offsets(model, geometry.view_patches(patches_a, view), geometry.view_patches(patches_b, view),
                              rho, batch_size)
        finite = np.isfinite(out).all(axis=(1, 2))
        back = np.full(out.shape, np.nan, np.float32)
        back[finite] = geometry.view_offsets(out[finite], np.linalg.inv(geometry.view_matrix(view, patch_size)),
                                             patch_size)
        estimates.append(back)
    return np.mean(estimates, axis=0, dtype=np.float64).astype(np.float32)


def squeeze(image: np.ndarray, patch_size: int, channels: int) -> np.ndarray:
    """A photo resized to the network's P x P x C input, as the builder resizes its images."""
    if channels == 1 and image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif channels == 3 and (image.ndim == 2 or image.shape[2] == 1):
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    interp = cv2.INTER_AREA if image.shape[1] >= patch_size and image.shape[0] >= patch_size else cv2.INTER_LINEAR
    return cv2.resize(image, (patch_size, patch_size), interpolation=interp).reshape(patch_size, patch_size, channels)


def to_photos(h_local: np.ndarray, size_a: tuple, size_b: tuple, patch_size: int) -> np.ndarray:
    """H = S_a^-1 . H_local . S_b: a homography of the squeezed P x P frames -> the photos' own pixels
    (size_* = (width, height) of the photos)."""
    square = (patch_size, patch_size)
    h = np.linalg.inv(resize_matrix(size_a, square)) @ np.asarray(h_local, np.float64) @ resize_matrix(size_b, square)
    return h / h[2, 2]


def network(images_a, images_b, ctx, tta: bool = False) -> list:
    """Estimates of the network (tta: on 8 views) for a batch of pairs; ctx: the registry's Context (model,
    rho, whole). A non-finite output is a failure (the identity), never an exception."""
    if ctx.whole:
        p, c = ctx.patch_size, ctx.channels
        a = np.stack([squeeze(x, p, c) for x in images_a])
        b = np.stack([squeeze(x, p, c) for x in images_b])
    else:
        a, b = np.asarray(images_a), np.asarray(images_b)
    if not len(a):
        return []
    offsets = (network_offsets_tta if tta else network_offsets)(ctx.model, a, b, ctx.rho, ctx.batch_size)
    out = []
    for i, o in enumerate(offsets):
        h = geometry.homography_local(o, a.shape[1]) if np.isfinite(o).all() else None
        frame = Frame.of(images_b[i], ctx.whole)
        if h is not None and ctx.whole:
            h = to_photos(h, (images_a[i].shape[1], images_a[i].shape[0]), (frame.width, frame.height), a.shape[1])
        # No plausibility check: the network always answers (evaluation scores what it said).
        e = frame.estimate(h, check=False)
        out.append(e if ctx.whole or not e.ok else dataclasses.replace(e, offsets=o.astype(np.float32)))
    return out
