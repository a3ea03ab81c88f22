"""Homography estimators on one pair of patches, all in DESIGN.md's convention.

Every classical method takes uint8 patches A and B of shape (P, P, C) (or (P, P)) and returns an
Estimate: the predicted offsets (4, 2) = H_local(c) - c, where H_local maps a pixel of patch B to its
position in patch A, plus a success flag. On any failure (too few matches, a degenerate H, cv2.error,
ECC not converging) a method falls back to the identity (zero offsets) with ok=False and a reason, so
the caller counts the failure and still scores the pair, as a user of the method would have to.

  identity   zero offsets: the sanity line (expected MACE ~ 0.765 * rho)
  orb        ORB keypoints, Hamming brute force with Lowe's ratio test, RANSAC findHomography
  orb_default  the same with OpenCV's default ORB settings (the out-of-the-box baseline)
  sift       SIFT keypoints, L2 brute force with Lowe's ratio test, RANSAC findHomography
  ecc        findTransformECC (MOTION_HOMOGRAPHY), coarse to fine over a 3-level pyramid

The network is batched instead (network_offsets), through model.network's API.
"""
from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from pipeline.dataset import geometry

CLASSICAL = ("identity", "orb", "orb_default", "sift", "ecc")
DEFAULT_CLASSICAL = ("identity", "orb", "sift", "ecc")  # orb_default is on request (--methods)
# Methods that need the trained network. sift_or_network: SIFT's estimate where SIFT finds a plausible
# homography, the network's where it does not (few features, repeated texture): the classical method's
# precision where it works, the network's robustness where it fails.
# network_tta: the network on the 8 flips and transposes of the pair, each estimate mapped back exactly
# (pipeline.dataset.geometry.view_offsets) and the corners averaged; 8 passes for one estimate.
NETWORK_METHODS = ("network", "network_tta", "sift_or_network")
ALL_METHODS = CLASSICAL + NETWORK_METHODS

RATIO = 0.8            # Lowe's ratio test; 0.8 as in Lowe (2004): rejects ~90% of false matches
MIN_MATCHES = 8        # ratio-test survivors needed before RANSAC is worth running
MIN_INLIERS = 6        # RANSAC inliers needed to trust H (4 define it exactly; 6 leave some redundancy)
RANSAC_THRESHOLD = 3.0  # reprojection error in pixels of the patch
# A homography between two patches that a method could actually have measured keeps them overlapping:
# no corner moves by more than half the patch and the area changes by less than 4x. These bounds use the
# patch size only, never the dataset's rho, so they reject nonsense without flattering any method.
MAX_CORNER_SHIFT = 0.5
MIN_AREA_RATIO = 0.25


@dataclasses.dataclass(frozen=True)
class Estimate:
    offsets: np.ndarray            # (4, 2) float32, H_local(c) - c
    ok: bool                       # False: fell back to the identity
    homography: np.ndarray | None  # H_local (B -> A), 3x3, None when the method failed
    reason: str = ""               # why it failed, "" when ok


def identity_estimate(patch_size: int, reason: str = "") -> Estimate:
    return Estimate(np.zeros((4, 2), np.float32), not reason, None if reason else np.eye(3), reason)


def from_homography(h_local: np.ndarray, patch_size: int) -> Estimate:
    """Estimate of a B -> A homography, or the identity fallback when H is degenerate."""
    problem = degeneracy(h_local, patch_size)
    if problem:
        return identity_estimate(patch_size, problem)
    return Estimate(geometry.offsets_from_homography(h_local, patch_size), True, np.asarray(h_local, np.float64))


def degeneracy(h: np.ndarray | None, patch_size: int) -> str:
    """'' when H maps the patch to a plausible quadrilateral, else why not.

    Plausible: finite, the corners stay in front (w > 0), and their image is a convex quadrilateral with
    the same orientation, an area within 4x of the patch's, and no corner moving more than half the patch.
    """
    c = geometry.patch_corners(0, 0, patch_size).astype(np.float64)
    problem, q = quadrilateral_problem(h, c)
    if problem:
        return problem
    area = 0.5 * abs(np.sum(q[:, 0] * np.roll(q[:, 1], -1) - np.roll(q[:, 0], -1) * q[:, 1]))
    if not MIN_AREA_RATIO <= area / patch_size ** 2 <= 1 / MIN_AREA_RATIO:
        return "degenerate homography (area ratio %.2f)" % (area / patch_size ** 2)
    if np.abs(q - c).max() > MAX_CORNER_SHIFT * patch_size:
        return "implausible homography (a corner moves more than %.0f px)" % (MAX_CORNER_SHIFT * patch_size)
    return ""


def quadrilateral_problem(h: np.ndarray | None, corners: np.ndarray) -> tuple:
    """('' or why not, the mapped corners (4, 2) or None): the checks that hold for any frame size.

    corners: (4, 2) in clockwise image order (TL, TR, BR, BL). H must be finite, keep them in front
    (w > 0) and map them to a convex quadrilateral of the same orientation.
    """
    if h is None:
        return "no homography", None
    h = np.asarray(h, np.float64)
    if h.shape != (3, 3) or not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-12:
        return "degenerate homography", None
    c = np.asarray(corners, np.float64).reshape(4, 2)
    w = h[2, :2] @ c.T + h[2, 2]
    if np.any(w * np.sign(h[2, 2]) <= 1e-9):
        return "degenerate homography (corner at infinity)", None
    q = cv2.perspectiveTransform(c.reshape(1, 4, 2), h).reshape(4, 2)
    edges = np.roll(q, -1, axis=0) - q
    cross = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not (np.all(cross > 0) or np.all(cross < 0)) or np.sign(cross[0]) != 1:
        return "degenerate homography (non-convex or flipped)", q
    return "", q


def to_gray(patch: np.ndarray) -> np.ndarray:
    """(P, P), (P, P, 1) or (P, P, 3) BGR uint8 -> (P, P) uint8."""
    patch = np.asarray(patch)
    if patch.ndim == 3 and patch.shape[2] == 3:
        return cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(patch.reshape(patch.shape[:2]))


# Detectors are built once per process (creation is not free and they are stateless across calls).
@functools.lru_cache(maxsize=None)
def _orb():
    # A 128 px patch needs small borders: the defaults (edgeThreshold = patchSize = 31, 8 levels) detect only
    # in the central ~66 px and build pyramid levels too small to hold a keypoint. edgeThreshold = patchSize
    # = 10, 4 levels and fastThreshold 10 were chosen on the *train* split of the COCO sample (200 pairs:
    # MACE 2.4 px against 2.8 px for 15 and 13.9 px for the defaults), never on the split that is reported.
    return cv2.ORB_create(nfeatures=1000, scaleFactor=1.2, nlevels=4, edgeThreshold=10, patchSize=10,
                          fastThreshold=10)


@functools.lru_cache(maxsize=None)
def _orb_default():
    # OpenCV's defaults (500 features, 8 levels, 31 px borders): what an out-of-the-box ORB + RANSAC gives,
    # kept to explain the paper's ORB figure (~11.7 px), which is close to this and far from the tuned one.
    return cv2.ORB_create()


@functools.lru_cache(maxsize=None)
def _sift():
    # contrastThreshold 0.01 instead of 0.04: small, often low-contrast patches yield too few keypoints at
    # the default (failure rate 7% -> 2%, MACE 2.8 -> 1.2 px on 200 train-split pairs).
    return cv2.SIFT_create(contrastThreshold=0.01)


@functools.lru_cache(maxsize=None)
def _matcher(norm: int):
    return cv2.BFMatcher(norm, crossCheck=False)


def _cv_message(e: cv2.error) -> str:
    """The short message of a cv2.error ('Iterations do not converge'), without the source path."""
    return str(getattr(e, "err", "") or str(e).strip().splitlines()[-1])


def feature_homography(patch_a: np.ndarray, patch_b: np.ndarray, detector, norm: int) -> Estimate:
    """Keypoints + brute-force kNN matching with the ratio test + RANSAC findHomography (B -> A)."""
    h, reason = keypoint_homography(to_gray(patch_a), to_gray(patch_b), detector, norm)
    if reason:
        return identity_estimate(patch_a.shape[0], reason)
    return from_homography(h, patch_a.shape[0])


def keypoint_homography(gray_a: np.ndarray, gray_b: np.ndarray, detector, norm: int,
                        ransac_threshold: float = RANSAC_THRESHOLD) -> tuple:
    """(H B -> A, '') or (None, why not): detect, match with the ratio test, RANSAC; any image sizes.

    The raw RANSAC result: plausibility bounds depend on the frame and are the caller's.
    """
    try:
        kp_a, des_a = detector.detectAndCompute(gray_a, None)
        kp_b, des_b = detector.detectAndCompute(gray_b, None)
        if des_a is None or des_b is None or len(kp_a) < 2 or len(kp_b) < 2:
            return None, "too few keypoints"
        good = [m[0] for m in _matcher(norm).knnMatch(des_b, des_a, k=2)
                if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
        if len(good) < MIN_MATCHES:
            return None, "too few matches"
        src = np.float32([kp_b[m.queryIdx].pt for m in good]).reshape(-1, 1, 2)  # in B
        dst = np.float32([kp_a[m.trainIdx].pt for m in good]).reshape(-1, 1, 2)  # in A
        h, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransac_threshold)
    except cv2.error as e:
        return None, f"cv2.error: {_cv_message(e)}"
    if h is None or mask is None or int(mask.sum()) < MIN_INLIERS:
        return None, "too few inliers"
    return h, ""


def orb(patch_a: np.ndarray, patch_b: np.ndarray) -> Estimate:
    return feature_homography(patch_a, patch_b, _orb(), cv2.NORM_HAMMING)


def orb_default(patch_a: np.ndarray, patch_b: np.ndarray) -> Estimate:
    return feature_homography(patch_a, patch_b, _orb_default(), cv2.NORM_HAMMING)


def sift(patch_a: np.ndarray, patch_b: np.ndarray) -> Estimate:
    return feature_homography(patch_a, patch_b, _sift(), cv2.NORM_L2)


ECC_LEVELS = 3          # 128 -> 64 -> 32 px: at 32 px a 32 px offset becomes 8 px, within ECC's reach
ECC_ITERATIONS = 100
ECC_EPSILON = 1e-5
ECC_MIN_CORRELATION = 0.5  # below this the alignment is not trusted
ECC_GAUSS_SIZE = 5  # OpenCV's default smoothing of both images before the gradients


def ecc(patch_a: np.ndarray, patch_b: np.ndarray) -> Estimate:
    """ECC coarse to fine. findTransformECC(template, input) finds W with input(W x) ~ template(x), so with
    template = B and input = A, W maps B's pixels into A: it is H_local itself, no inversion needed.

    ECC is a local optimiser and needs a rough initial alignment (OpenCV's documentation says so): at the
    coarsest level a translation is fitted first, then the homography from there. On 100 train-split pairs
    this lowered its MACE from 4.3 to 3.6 px, and from 9.1 to 2.4 px on strongly textured synthetic pairs.
    """
    p = patch_a.shape[0]
    try:
        w, rho_corr = ecc_homography(to_gray(patch_a), to_gray(patch_b), ECC_LEVELS)
    except cv2.error as e:
        return identity_estimate(p, f"ECC failed: {_cv_message(e)}")
    if not np.isfinite(rho_corr) or rho_corr < ECC_MIN_CORRELATION:
        return identity_estimate(p, f"ECC correlation too low ({rho_corr:.2f} < {ECC_MIN_CORRELATION})")
    return from_homography(w, p)


def ecc_homography(gray_a: np.ndarray, gray_b: np.ndarray, levels: int) -> tuple:
    """(W B -> A normalised to W[2, 2] = 1, final correlation): translation at the coarsest of `levels`
    pyramid levels, then the homography refined level by level; any (equal or not) image sizes.
    Raises cv2.error when ECC does not converge."""
    a, b = gray_a.astype(np.float32), gray_b.astype(np.float32)
    pyramid = [(a, b)]
    for _ in range(levels - 1):
        pyramid.append((cv2.pyrDown(pyramid[-1][0]), cv2.pyrDown(pyramid[-1][1])))
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPSILON)
    half, double = np.diag([0.5, 0.5, 1.0]), np.diag([2.0, 2.0, 1.0])
    coarse_a, coarse_b = pyramid[-1]
    _, shift = cv2.findTransformECC(coarse_b, coarse_a, np.eye(2, 3, dtype=np.float32), cv2.MOTION_TRANSLATION,
                                    criteria, None, ECC_GAUSS_SIZE)
    w = np.vstack([shift, [0, 0, 1]]).astype(np.float64)
    rho_corr = 0.0
    for level, (la, lb) in enumerate(reversed(pyramid)):
        if level:
            w = double @ w @ half  # a homography at scale s -> at scale 2s (pyrDown halves coordinates)
        rho_corr, w32 = cv2.findTransformECC(lb, la, w.astype(np.float32), cv2.MOTION_HOMOGRAPHY,
                                             criteria, None, ECC_GAUSS_SIZE)
        w = w32.astype(np.float64)
    return w / w[2, 2], rho_corr


_FUNCTIONS = {"identity": lambda a, b: identity_estimate(a.shape[0]), "orb": orb, "orb_default": orb_default,
              "sift": sift, "ecc": ecc}


def estimate(method: str, patch_a: np.ndarray, patch_b: np.ndarray) -> Estimate:
    """One classical method on one pair (the function evaluation and predict both call)."""
    if method not in _FUNCTIONS:
        raise ValueError(f"unknown classical method '{method}'; known: {', '.join(_FUNCTIONS)}")
    return _FUNCTIONS[method](patch_a, patch_b)


def sift_or_network(patch_a: np.ndarray, patch_b: np.ndarray, network_offsets_ab: np.ndarray) -> Estimate:
    """SIFT on one pair; where it fails, the network's offsets (4, 2) for that pair (never the identity)."""
    e = sift(patch_a, patch_b)
    if e.ok:
        return e
    return Estimate(np.asarray(network_offsets_ab, np.float32).reshape(4, 2), True, None)


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


def network_offsets(model, patches_a: np.ndarray, patches_b: np.ndarray, rho: float,
                    batch_size: int = 64) -> np.ndarray:
    """The trained network on a batch of uint8 pairs (N, P, P, C): (N, 4, 2) offsets in pixels."""
    from model import network  # TensorFlow only when the network is asked for

    out = network.predict_offsets(model, patches_a, patches_b, rho, batch_size=batch_size)
    return np.asarray(out, np.float32).reshape(-1, 4, 2)
