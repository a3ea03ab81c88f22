"""Real image pairs with ground-truth homographies: reading the two common layouts, checking the direction of
their ground truth, and the corner-error metrics (the methods themselves: model.estimators).

Layouts (detected by their files; anything else is refused with a message naming the problem):
  HPatches   a folder per sequence (i_* illumination, v_* viewpoint): 1.ppm ... 6.ppm, H_1_2 ... H_1_6
  Oxford     img1.ppm|pgm|png ... img6.*, H1to2p ... H1to6p
In both, H_1_k maps a pixel of image 1 to its position in image k (3x3, plain text).

A pair (1, k) is scored by the HPatches / SuperPoint corner error: the mean distance between the four
corners of image 1, (0, 0), (w-1, 0), (w-1, h-1), (0, h-1), mapped into image k by the estimated and by the
true H, in pixels of image k. Every estimator here returns H for the direction B -> A of DESIGN.md with
A = image k and B = image 1, which is exactly H_1_k.
"""
from __future__ import annotations

import dataclasses
import os
import re

import cv2
import numpy as np

from model.estimators.estimate import image_corners, resize_matrix

IMAGE_EXTENSIONS = ("ppm", "pgm", "png", "jpg", "jpeg")
LAYOUTS = {  # name -> (image file pattern, H file pattern, how to name H_1_k)
    "hpatches": (re.compile(r"^(\d+)\.(%s)$" % "|".join(IMAGE_EXTENSIONS), re.I), re.compile(r"^H_1_(\d+)$"),
                 "H_1_{}"),
    "oxford": (re.compile(r"^img(\d+)\.(%s)$" % "|".join(IMAGE_EXTENSIONS), re.I), re.compile(r"^H1to(\d+)p$"),
               "H1to{}p"),
}
# Oxford sequences have no prefix; their published kind of change. HPatches' prefixes decide for the rest.
OXFORD_GROUPS = {"leuven": "illumination", "graf": "viewpoint", "wall": "viewpoint", "boat": "viewpoint",
                 "bark": "viewpoint", "bikes": "blur", "trees": "blur", "ubc": "jpeg"}

THRESHOLDS = (1, 3, 5, 10)       # share of pairs with a corner error under these (px)
AUC_THRESHOLDS = (3, 5, 10)      # AUC of the cumulative error curve up to these (SuperGlue / LoFTR)


# A ground truth normalised to H[2, 2] = 1 with an entry over a million (a translation of a million pixels)
# is no photo pair: a file of 1e300 entries would otherwise reach the report as inf and NaN.
MAX_TRUTH_ENTRY = 1e6


class RealPairsError(ValueError):
    """A folder that is not a readable sequence, or a ground truth that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Sequence:
    name: str
    path: str
    layout: str
    group: str
    images: dict   # k -> file path (1 included)
    truths: dict   # k -> H_1_k (3x3 float64, H[2, 2] = 1), k >= 2
    sizes: dict    # k -> (width, height)

    def pairs(self) -> list:
        return sorted(self.truths)


def group_of(name: str) -> str:
    if name.startswith("i_"):
        return "illumination"
    if name.startswith("v_"):
        return "viewpoint"
    return OXFORD_GROUPS.get(name.lower(), "other")


def _layout_files(path: str) -> dict:
    """layout -> ({k: image file}, {k: H file}) for the layouts that have any file in path."""
    found = {}
    names = sorted(os.listdir(path))
    for layout, (image_re, h_re, _) in LAYOUTS.items():
        images, truths = {}, {}
        for name in names:
            m = image_re.match(name)
            if m:
                k = int(m.group(1))
                if k in images:
                    raise RealPairsError(f"{path}: two files for image {k} ({images[k]}, {name})")
                images[k] = name
            m = h_re.match(name)
            if m:
                truths[int(m.group(1))] = name
        if images or truths:
            found[layout] = (images, truths)
    return found


def is_sequence(path: str) -> bool:
    return os.path.isdir(path) and bool(_layout_files(path))


def read_homography(path: str) -> np.ndarray:
    """A 3x3 ground truth, normalised to H[2, 2] = 1, or RealPairsError naming the file and the problem."""
    try:
        h = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise RealPairsError(f"{path}: not a matrix of numbers ({e})") from e
    if h.shape != (3, 3):
        raise RealPairsError(f"{path}: a {h.shape[0]}x{h.shape[1]} matrix, expected 3x3")
    if not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-12 or abs(np.linalg.det(h / h[2, 2])) < 1e-12:
        raise RealPairsError(f"{path}: not an invertible homography")
    h = h / h[2, 2]
    if np.abs(h).max() > MAX_TRUTH_ENTRY:
        raise RealPairsError(f"{path}: absurd entries (largest {np.abs(h).max():.3g}; a photo's homography "
                             f"normalised to H[2, 2] = 1 has entries under {MAX_TRUTH_ENTRY:g})")
    return h


def read_gray(path: str) -> np.ndarray:
    """The image as 8-bit grayscale, or RealPairsError (missing, unreadable, not an image)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise RealPairsError(f"cannot read {path}: {e.strerror or e}") from e
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None or image.size == 0:
        raise RealPairsError(f"{path}: not an image OpenCV can decode")
    return image


def read_sequence(path: str) -> Sequence:
    """One sequence folder, checked whole: layout, every image decodable, every H a usable 3x3 matrix."""
    name = os.path.basename(os.path.normpath(path))
    found = _layout_files(path)
    if not found:
        raise RealPairsError(f"{path} is neither an HPatches sequence (1.ppm, H_1_2, ...) "
                             f"nor an Oxford one (img1.ppm, H1to2p, ...)")
    if len(found) > 1:
        raise RealPairsError(f"{path} mixes the HPatches and the Oxford layouts")
    layout, (images, truth_files) = next(iter(found.items()))
    h_name = LAYOUTS[layout][2]
    if 1 not in images:
        raise RealPairsError(f"{path}: no image 1 ({'1.ppm' if layout == 'hpatches' else 'img1.ppm'}), "
                             f"the reference of every ground truth")
    for k in sorted(images):
        if k != 1 and k not in truth_files:
            raise RealPairsError(f"{path}: image {images[k]} has no ground truth {h_name.format(k)}")
    for k in sorted(truth_files):
        if k not in images or k == 1:
            raise RealPairsError(f"{path}: {truth_files[k]} has no image {k}")
    if len(images) < 2:
        raise RealPairsError(f"{path}: image 1 alone, no pair to evaluate")
    sizes = {}
    for k, file in images.items():
        image = read_gray(os.path.join(path, file))
        sizes[k] = (image.shape[1], image.shape[0])
    truths = {k: read_homography(os.path.join(path, f)) for k, f in truth_files.items()}
    return Sequence(name, path, layout, group_of(name), {k: os.path.join(path, f) for k, f in images.items()},
                    truths, sizes)


def discover(pairs_dir: str) -> list:
    """The sequences under pairs_dir: pairs_dir itself when it is one, else each of its sub-folders (which
    must all be sequences; files beside them, such as a README, are ignored)."""
    if not os.path.isdir(pairs_dir):
        raise RealPairsError(f"pairs_dir {pairs_dir} is not a folder")
    if is_sequence(pairs_dir):
        return [read_sequence(pairs_dir)]
    subdirs = sorted(d for d in os.listdir(pairs_dir)
                     if not d.startswith(".") and os.path.isdir(os.path.join(pairs_dir, d)))
    if not subdirs:
        raise RealPairsError(f"{pairs_dir} holds no sequence: expected HPatches folders (1.ppm, H_1_2, ...) "
                             f"or Oxford ones (img1.ppm, H1to2p, ...)")
    return [read_sequence(os.path.join(pairs_dir, d)) for d in subdirs]


# ---- metrics ----

def corner_error(h_est: np.ndarray, h_true: np.ndarray, size_1: tuple) -> float:
    """Mean distance between image 1's corners mapped by the estimate and by the truth (pixels of image k);
    inf when the estimate sends a corner to infinity."""
    c = image_corners(size_1).reshape(1, 4, 2)
    with np.errstate(all="ignore"):
        d = np.linalg.norm(cv2.perspectiveTransform(c, np.asarray(h_est, np.float64))
                           - cv2.perspectiveTransform(c, h_true), axis=-1)
    value = float(d.mean())
    return value if np.isfinite(value) else float("inf")


def error_auc(errors, thresholds=AUC_THRESHOLDS) -> dict:
    """Area under the cumulative error curve up to each threshold, divided by it (SuperGlue's error_auc)."""
    errors = np.sort(np.asarray(errors, np.float64))
    recall = np.arange(1, len(errors) + 1) / max(len(errors), 1)
    errors, recall = np.r_[0.0, errors], np.r_[0.0, recall]
    out = {}
    for t in thresholds:
        last = int(np.searchsorted(errors, t))
        r = np.r_[recall[:last], recall[last - 1]]
        e = np.r_[errors[:last], t]
        out[str(t)] = round(float(np.trapezoid(r, x=e) / t), 4)
    return out


def summarise(errors, ok, seconds) -> dict:
    """One method on a set of pairs. A failed pair keeps the error of the fallback (the identity)."""
    errors, ok = np.asarray(errors, np.float64), np.asarray(ok, bool)
    finite = np.where(np.isfinite(errors), errors, np.inf)
    return {"num_pairs": int(len(errors)),
            "mean_error": round(float(np.mean(finite)), 3) if len(errors) else None,
            "median_error": round(float(np.median(finite)), 3) if len(errors) else None,
            "accuracy": {str(t): round(float(np.mean(finite < t)), 4) if len(errors) else None for t in THRESHOLDS},
            "auc": error_auc(finite),
            "failures": int(np.sum(~ok)),
            "seconds_per_pair": round(float(np.mean(seconds)), 4) if len(errors) else None}


# ---- the direction check ----

CHECK_SIDE = 384          # the check runs on copies at most this long
CHECK_MIN_OVERLAP = 0.05  # a candidate whose overlap is smaller than this share of the frame is not judged
CHECK_MARGIN = 0.2        # an alternative must beat the given H by this much normalised correlation ...
CHECK_MIN_NCC = 0.3       # ... and reach this much, to call the given H wrong
CANDIDATES = ("given", "inverted", "transposed", "inverted_transposed")


def _highpass(image: np.ndarray) -> np.ndarray:
    # A band of structure, not brightness: a slowly varying illumination change or a large uniform area
    # (sky, water) would otherwise correlate under a wrong warp (raw NCC reached 0.34 for a transposed H on
    # boat); the lower cut keeps a 2.8x zoom comparable (boat 1-6: 0.47 for the truth against 0.23 with a
    # plain high-pass; wrong candidates stay under 0.04 with both).
    x = image.astype(np.float32)
    return cv2.GaussianBlur(x, (0, 0), 1.5) - cv2.GaussianBlur(x, (0, 0), 10)


def _ncc_on_overlap(src: np.ndarray, dst: np.ndarray, g: np.ndarray) -> tuple:
    """(NCC of src warped by g with dst on their overlap, overlap share of dst's frame); NCC None if tiny."""
    size = (dst.shape[1], dst.shape[0])
    warped = cv2.warpPerspective(src, g, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones_like(src), g, size, flags=cv2.INTER_NEAREST)
    mask = cv2.erode(mask, np.ones((9, 9), np.uint8)) > 0.5  # off the border, where the high-pass is skewed
    share = float(mask.mean())
    if share < CHECK_MIN_OVERLAP:
        return None, share
    x, y = warped[mask] - warped[mask].mean(), dst[mask] - dst[mask].mean()
    denom = np.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return (float((x * y).sum()) / denom if denom > 0 else None), share


def direction_scores(gray_1: np.ndarray, gray_k: np.ndarray, h_1k: np.ndarray) -> dict:
    """Candidate -> NCC of the two images aligned by it (None: too little overlap to judge).

    Each candidate G (the given H, its inverse, its transpose, the inverse's transpose) is read as "image 1
    -> image k"; the images are compared in whichever frame the overlap covers more of (image 1 warped into
    k's frame, or k into 1's by G^-1), so that a strong zoom is compared at the finer resolution.
    """
    small, mats = [], []
    for g in (gray_1, gray_k):
        s = min(1.0, CHECK_SIDE / max(g.shape))
        new = (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s)))
        small.append(_highpass(cv2.resize(g, new, interpolation=cv2.INTER_AREA)))
        mats.append(resize_matrix((g.shape[1], g.shape[0]), new))
    h = h_1k / h_1k[2, 2]
    inv = np.linalg.inv(h)
    candidates = {"given": h, "inverted": inv, "transposed": h.T, "inverted_transposed": inv.T}
    scores = {}
    for name, g in candidates.items():
        g_small = mats[1] @ g @ np.linalg.inv(mats[0])
        forward = _ncc_on_overlap(small[0], small[1], g_small)
        backward = _ncc_on_overlap(small[1], small[0], np.linalg.inv(g_small))
        ncc = max((forward, backward), key=lambda r: r[1])[0]
        scores[name] = None if ncc is None else round(float(ncc), 3)
    return scores


def direction_verdict(scores: dict) -> str:
    """'ok', 'inconclusive' (nothing aligns the images, e.g. a drastic illumination change), or the name of
    the candidate that aligns the images clearly better than the given H: the file is in that direction."""
    given = scores["given"] if scores["given"] is not None else -1.0
    best = max((n for n in CANDIDATES[1:] if scores[n] is not None), key=lambda n: scores[n], default=None)
    if best is not None and scores[best] >= CHECK_MIN_NCC and scores[best] >= given + CHECK_MARGIN:
        return best
    return "ok" if given >= CHECK_MIN_NCC else "inconclusive"
