"""ECC refinement of a homography from a start: the `+ecc` stage of any method.

refine(a, b, start, frame) starts from the start's H_local (the identity when the start failed) and runs
cv2.findTransformECC (MOTION_HOMOGRAPHY, 100 iterations, eps 1e-5) coarse to fine over a pyramid whose
depth comes from the image size: the coarsest level at least COARSEST_SIDE px on its short side (2 levels
for 128 px patches, 4 for an 850 x 680 photo). The start's correlation and the refined one are measured on
the same region (where both warps of A are defined); unlike the ecc method, refinement does not smooth the
images (REFINE_GAUSS_SIZE says why). A result
under 0.95 (or a failure) is tried again with one more level, and the better kept. Uneven light (a linear
ramp between the two shots, which ECC would explain by moving the image) is fitted at the refined H and
removed from B, and ECC run again at full resolution, twice; the start and the result are then compared on
that B. The start is kept, and the reason recorded, when ECC raises, diverges (a non-finite H), gives an implausible H
(the frame's own checks) or ends with a lower correlation than the start had: a refined estimate never
reports a lower final correlation than its start.
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from model.estimators.estimate import Estimate, Frame, cv_message, to_gray

ECC_ITERATIONS = 100
ECC_EPSILON = 1e-5
ECC_GAUSS_SIZE = 5  # OpenCV's default smoothing of both images before the gradients (the ecc method's)
# Refinement smooths nothing: smoothing A and B before warping biases the result wherever the warp scales or
# shears (blur and warp do not commute): from the true H, ECC with OpenCV's 5 px smoothing moved to 0.1-0.25 px
# of MACE on synthetic pairs, with none it stays under 0.08; on the 500 val2017 pairs network+ecc's median
# went from 0.102 to 0.011 px, and on camera pairs (noise, blur) sift+ecc's share under 1 px rose 89 -> 94 %.
REFINE_GAUSS_SIZE = 1
ECC_MIN_CORRELATION = 0.5  # below this an alignment found from nothing (a failed start) is not trusted
CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPSILON)
COARSEST_SIDE = 64  # the pyramid stops before the short side would fall under this
SHADE_ROUNDS = 2     # rounds of (fit the relative shade at the current H, remove it from B, ECC again)
SHADE_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, ECC_EPSILON)  # from a converged H
RETRY_BELOW = 0.95   # a refined correlation under this tries one more pyramid level ...
RETRY_COARSEST = 24  # ... if the coarsest level stays at least this long on its short side
MIN_OVERLAP = 0.05  # correlations on less than this share of B's frame are not compared
_HALF, _DOUBLE = np.diag([0.5, 0.5, 1.0]), np.diag([2.0, 2.0, 1.0])


def pyramid_levels(*shapes, coarsest: int = None) -> int:
    """Levels for images of these (height, width, ...) shapes: 1 + floor(log2(short side / 64)), at least 1
    (or with the coarsest level's short side at least `coarsest`)."""
    short = min(min(s[:2]) for s in shapes)
    return 1 + max(0, int(math.floor(math.log2(max(short, 1) / (coarsest or COARSEST_SIDE)))))


def pyramid(image: np.ndarray, levels: int) -> list:
    """[image, pyrDown(image), ...], finest first. pyrDown keeps pixel 2i as pixel i: x_full = 2 x_small."""
    out = [image]
    for _ in range(levels - 1):
        out.append(cv2.pyrDown(out[-1]))
    return out


def coarse_to_fine(a: np.ndarray, b: np.ndarray, start: np.ndarray, levels: int, criteria: tuple = CRITERIA,
                   gauss_size: int = REFINE_GAUSS_SIZE) -> tuple:
    """(W B -> A normalised to W[2, 2] = 1, ECC's final correlation): the homography from `start` (full
    resolution), refined level by level from the coarsest; float32 images of any sizes. Raises cv2.error."""
    scale = 2.0 ** (levels - 1)
    w = np.diag([1 / scale, 1 / scale, 1.0]) @ np.asarray(start, np.float64) @ np.diag([scale, scale, 1.0])
    rho = float("nan")
    for level, (la, lb) in enumerate(zip(reversed(pyramid(a, levels)), reversed(pyramid(b, levels)))):
        if level:
            w = _DOUBLE @ w @ _HALF  # a homography at scale s -> at scale 2s
        rho, w32 = cv2.findTransformECC(lb, la, (w / w[2, 2]).astype(np.float32), cv2.MOTION_HOMOGRAPHY,
                                        criteria, None, gauss_size)
        w = w32.astype(np.float64)
    return w / w[2, 2], rho


def correlations(gray_a: np.ndarray, gray_b: np.ndarray, homographies: list) -> list:
    """ECC correlation of B with A warped by each H (B -> A), all on the one region where every warp of A is
    defined (eroded by a pixel), on the images as refinement sees them (unsmoothed); -inf where not comparable."""
    a, b = gray_a.astype(np.float32), gray_b.astype(np.float32)
    size, ones = (b.shape[1], b.shape[0]), np.full(a.shape, 255, np.uint8)
    mask, warped = np.full(b.shape, 255, np.uint8), []
    for h in homographies:
        if h is None or not np.all(np.isfinite(h)):
            warped.append(None)
            continue
        with np.errstate(all="ignore"):
            warped.append(cv2.warpPerspective(a, h, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
            mask &= cv2.warpPerspective(ones, h, size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))
    if np.count_nonzero(mask) < MIN_OVERLAP * mask.size:
        return [-math.inf] * len(homographies)
    out = []
    for w in warped:
        try:
            value = cv2.computeECC(b, w, mask) if w is not None else -math.inf
        except cv2.error:
            value = -math.inf
        out.append(float(value) if np.isfinite(value) else -math.inf)
    return out


def _attempt(gray_a: np.ndarray, gray_b: np.ndarray, h0: np.ndarray, levels: int, frame: Frame,
             criteria: tuple = CRITERIA) -> tuple:
    """(the refined H, '') or (None, why not)."""
    try:
        h1, _ = coarse_to_fine(gray_a, gray_b, h0, levels, criteria)
    except cv2.error as e:
        return None, f"ECC failed: {cv_message(e)}"
    if not np.all(np.isfinite(h1)):
        return None, "ECC diverged"
    problem = frame.problem(h1)
    return (None, problem) if problem else (h1, "")


def relative_shade(gray_a: np.ndarray, gray_b: np.ndarray, h: np.ndarray) -> np.ndarray | None:
    """The linear ramp r(x, y) of B's frame in the least-squares fit B ~ g . A(H x) + r(x, y) + c over the
    region where A warped by H is defined: uneven light between the two shots,
    which ECC (invariant to one gain and offset only) would otherwise explain by moving the image. None when
    the region is too small."""
    a, b = gray_a, gray_b
    size = (b.shape[1], b.shape[0])
    warped = cv2.warpPerspective(a, h, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    mask = cv2.warpPerspective(np.full(a.shape, 255, np.uint8), h, size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    ys, xs = np.nonzero(cv2.erode(mask, np.ones((3, 3), np.uint8)))
    if len(xs) < MIN_OVERLAP * mask.size:
        return None
    step = max(1, len(xs) // 100_000)  # a large photo: a regular subsample is as good a fit
    ys, xs = ys[::step], xs[::step]
    design = np.stack([warped[ys, xs], xs, ys, np.ones(len(xs))], axis=1).astype(np.float64)
    coef = np.linalg.lstsq(design, b[ys, xs].astype(np.float64), rcond=None)[0]
    yy, xx = np.mgrid[:b.shape[0], :b.shape[1]]
    return (coef[1] * xx + coef[2] * yy).astype(np.float32)


def _without_shade(gray_a: np.ndarray, gray_b: np.ndarray, h: np.ndarray, frame: Frame) -> tuple:
    """(H refined at full resolution on B with its relative shade removed, that B), SHADE_ROUNDS times; a round
    that fails leaves H as it was."""
    compensated = gray_b
    for _ in range(SHADE_ROUNDS):
        ramp = relative_shade(gray_a, gray_b, h)
        if ramp is None:
            break
        compensated = gray_b - ramp
        found, _ = _attempt(gray_a, compensated, h, 1, frame, SHADE_CRITERIA)
        if found is None:
            break
        h = found
    return h, compensated


def refine(a: np.ndarray, b: np.ndarray, start: Estimate, frame: Frame | None = None) -> Estimate:
    """The start refined by ECC coarse to fine, or the start itself (kept_start, kept_why) when that fails or
    lowers the correlation. ok: the start's, or, from a failed start, a refined correlation >= 0.5.

    When the first pyramid fails or ends under RETRY_BELOW (a local optimum, or a start beyond its reach),
    one more level is tried and the better of the two by correlation is kept. Then the relative shade of
    the two images is removed from B and ECC run again at full resolution (SHADE_ROUNDS times); the start
    and the result are compared on that B.
    """
    frame = frame or Frame.of(b, False)
    gray_a, gray_b = to_gray(a).astype(np.float32), to_gray(b).astype(np.float32)
    h0 = start.homography if start.ok and start.homography is not None else np.eye(3)
    levels = pyramid_levels(gray_a.shape, gray_b.shape)
    tried = [_attempt(gray_a, gray_b, h0, levels, frame)]
    scores = correlations(gray_a, gray_b, [h0] + [h for h, _ in tried if h is not None])
    if scores[-1] < RETRY_BELOW and levels < pyramid_levels(gray_a.shape, gray_b.shape, coarsest=RETRY_COARSEST):
        tried.append(_attempt(gray_a, gray_b, h0, levels + 1, frame))
        scores = correlations(gray_a, gray_b, [h0] + [h for h, _ in tried if h is not None])
    found = [h for h, _ in tried if h is not None]
    why = tried[0][1] or tried[-1][1]
    if found:
        h1, compensated = _without_shade(gray_a, gray_b, found[int(np.argmax(scores[1:]))], frame)
        c0, c1 = correlations(gray_a, compensated, [h0, h1])
        if not c1 >= c0 or c1 == -math.inf:
            why = f"lower correlation ({c1:.4f} < {c0:.4f})" if c1 != -math.inf else "no overlap to compare"
        elif not start.ok and c1 < ECC_MIN_CORRELATION:
            why = f"correlation too low from a failed start ({c1:.2f} < {ECC_MIN_CORRELATION})"
        else:
            return dataclasses.replace(frame.estimate(h1), source=start.source, correlation=c1, start_correlation=c0)
    c0 = correlations(gray_a, gray_b, [h0])[0]  # the start alone, on its own region
    return dataclasses.replace(start, correlation=c0, start_correlation=c0, kept_start=True, kept_why=why)
