"""What every estimator returns, and the checks that decide whether a homography is an answer at all.

An Estimate holds H_local (DESIGN.md's direction: a pixel of B -> its position in A) and its offsets, the
corners of B's frame moved by H. On any failure a method falls back to the identity with ok=False and a
reason, so the caller counts the failure and still scores the pair, as a user of the method would have to.

A Frame is B's frame: a P x P patch of the dataset (offsets at the corners (0,0), (P,0), (P,P), (0,P), as
MACE measures them; plausibility bounded by the patch size) or a whole photo (corners at pixel centres, as
the HPatches corner error measures them; plausibility bounded by the area change only).
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from pipeline.dataset import geometry

# A homography between two patches that a method could actually have measured keeps them overlapping:
# no corner moves by more than half the patch and the area changes by less than 4x. These bounds use the
# patch size only, never the dataset's rho, so they reject nonsense without flattering any method.
MAX_CORNER_SHIFT = 0.5
MIN_AREA_RATIO = 0.25
MAX_IMAGE_AREA_RATIO = 100  # whole photos: a mapped image more than 10x larger or smaller is nonsense


@dataclasses.dataclass(frozen=True)
class Estimate:
    offsets: np.ndarray            # (4, 2) float32, H(c) - c at the frame's corners
    ok: bool                       # False: fell back to the identity
    homography: np.ndarray | None  # H_local (B -> A), 3x3, None when the method failed
    reason: str = ""               # why it failed, "" when ok
    source: str = ""               # the method that answered (a chain's member); set by the registry
    correlation: float | None = None        # refined methods: ECC correlation of the final alignment ...
    start_correlation: float | None = None  # ... and of the start's, measured on the same region
    kept_start: bool = False       # refinement ended where it started (the start's H is returned) ...
    kept_why: str = ""             # ... because of this


@dataclasses.dataclass(frozen=True)
class Frame:
    """B's frame: width x height pixels; whole=False for a patch of the dataset, True for a whole photo."""
    width: int
    height: int
    whole: bool = False

    @classmethod
    def of(cls, image_b: np.ndarray, whole: bool) -> "Frame":
        return cls(int(image_b.shape[1]), int(image_b.shape[0]), whole)

    def corners(self) -> np.ndarray:
        if self.whole:
            return image_corners((self.width, self.height))
        return geometry.patch_corners(0, 0, self.width).astype(np.float64)

    def problem(self, h: np.ndarray | None) -> str:
        """'' when H maps B's frame to a plausible quadrilateral, else why not."""
        if self.whole:
            return plausibility(h, (self.width, self.height))
        return degeneracy(h, self.width)

    def offsets(self, h: np.ndarray) -> np.ndarray:
        c = self.corners()
        with np.errstate(all="ignore"):
            return (cv2.perspectiveTransform(c.reshape(1, 4, 2), np.asarray(h, np.float64)).reshape(4, 2)
                    - c).astype(np.float32)

    def failure(self, reason: str) -> Estimate:
        return Estimate(np.zeros((4, 2), np.float32), False, None, reason)

    def estimate(self, h: np.ndarray | None, check: bool = True) -> Estimate:
        """The estimate of H, or the identity fallback when H is not plausible (check=False: finite only)."""
        problem = self.problem(h) if check else ("" if h is not None and np.isfinite(h).all() else
                                                   "non-finite output")
        if problem:
            return self.failure(problem)
        h = np.asarray(h, np.float64)
        return Estimate(self.offsets(h), True, h / h[2, 2])


def identity_estimate(patch_size: int, reason: str = "") -> Estimate:
    return Estimate(np.zeros((4, 2), np.float32), not reason, None if reason else np.eye(3), reason)


def from_homography(h_local: np.ndarray, patch_size: int) -> Estimate:
    """Estimate of a B -> A homography of P x P patches, or the identity fallback when H is degenerate."""
    return Frame(patch_size, patch_size).estimate(h_local)


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


def plausibility(h: np.ndarray | None, size_b: tuple) -> str:
    """'' when H maps image B's corners to a convex, same-orientation quadrilateral of sane area."""
    problem, q = quadrilateral_problem(h, image_corners(size_b))
    if problem:
        return problem
    area = 0.5 * abs(np.sum(q[:, 0] * np.roll(q[:, 1], -1) - np.roll(q[:, 0], -1) * q[:, 1]))
    ratio = area / max((size_b[0] - 1) * (size_b[1] - 1), 1)
    if not 1 / MAX_IMAGE_AREA_RATIO <= ratio <= MAX_IMAGE_AREA_RATIO:
        return "degenerate homography (area ratio %.3g)" % ratio
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


def image_corners(size: tuple) -> np.ndarray:
    """(4, 2) corners of a width x height image at pixel centres: TL, TR, BR, BL (SuperPoint's convention)."""
    w, h = size
    return np.float64([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])


def resize_matrix(size: tuple, new_size: tuple) -> np.ndarray:
    """A pixel of a size image -> its position after cv2.resize to new_size (pixel centres at integers:
    x' = sx (x + 1/2) - 1/2, as cv2.resize and warpPerspective place them)."""
    sx, sy = new_size[0] / size[0], new_size[1] / size[1]
    return np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]], np.float64)


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) BGR uint8 -> (H, W) uint8."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(image.reshape(image.shape[:2]))


def cv_message(e: cv2.error) -> str:
    """The short message of a cv2.error ('Iterations do not converge'), without the source path."""
    return str(getattr(e, "err", "") or str(e).strip().splitlines()[-1])
