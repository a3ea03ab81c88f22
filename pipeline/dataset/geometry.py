"""Pair geometry of DESIGN.md as small pure functions (numpy + OpenCV, no TensorFlow, no Beam).

Conventions (DESIGN.md, "Geometry"):
  corners of patch A: TL (x, y), TR (x+P, y), BR (x+P, y+P), BL (x, y+P), as a (4, 2) float array;
  offsets: (4, 2) array of (dx, dy) in the same order, uniform in [-rho, rho];
  H_AB = getPerspectiveTransform(corners, corners + offsets), patch_B(u) = image(H_AB u);
  H_local = getPerspectiveTransform(c, c + offsets), patch_B(v) = patch_A(H_local v).
"""
from __future__ import annotations

import dataclasses
import zlib

try:
    import cv2
except ImportError:  # a reader of built shards needs only PairConfig (via dataset_info), not OpenCV
    cv2 = None
import numpy as np

from pipeline.dataset import photometric

# Offsets are drawn on a grid of 2**20 steps over [-rho, rho]: effectively continuous, both ends
# reachable, and (for integer rho up to 2**9) every value is exact in float32, so the stored labels
# equal the offsets that made the warp, bit for bit.
OFFSET_STEPS = 2**20

# Bounds on every input of a build and every index a reader accepts (README, "What the commands promise").
MAX_PATCH_SIZE = 1024
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PAIR_BYTES = 512 << 20  # one image's pairs are held in memory at once while a shard is written


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """What one pair depends on besides the image and the random draws."""

    patch_size: int = 128
    rho: int = 32
    image_width: int = 320
    image_height: int = 240
    channels: int = 1  # 1 = grayscale (the paper), 3 = colour (BGR, OpenCV's order)
    patches_per_image: int = 10
    seed: int = 0
    photometric: str = "none"  # the camera model of each patch (pipeline/dataset/photometric.py)

    def validate(self) -> None:
        """Raises ValueError naming the problem when the geometry cannot fit or is out of bounds (README:
        patch_size 1..MAX_PATCH_SIZE, rho >= 1, image sides up to MAX_IMAGE_SIDE, one image's pairs within
        MAX_IMAGE_PAIR_BYTES)."""
        if self.patch_size <= 0 or self.patches_per_image <= 0:
            raise ValueError(f"patch_size ({self.patch_size}) and patches_per_image ({self.patches_per_image}) "
                             f"must be positive")
        if self.seed < 0:  # numpy's seed sequences take whole numbers >= 0 only (a traceback in a worker)
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.rho < 1:
            raise ValueError(f"rho must be at least 1, got {self.rho} (rho 0 is no motion: nothing to learn, "
                             f"and labels scaled by 1/rho)")
        if self.patch_size > MAX_PATCH_SIZE:
            raise ValueError(f"patch_size {self.patch_size} is larger than the {MAX_PATCH_SIZE} px allowed")
        if max(self.image_width, self.image_height) > MAX_IMAGE_SIDE:
            raise ValueError(f"image size {self.image_width}x{self.image_height} has a side over the "
                             f"{MAX_IMAGE_SIDE} px allowed")
        pair_bytes = 2 * self.patch_size ** 2 * max(self.channels, 1)
        if self.patches_per_image * pair_bytes > MAX_IMAGE_PAIR_BYTES:
            raise ValueError(f"patches_per_image {self.patches_per_image} of {self.patch_size} px patches hold "
                             f"{self.patches_per_image * pair_bytes / 2**20:.0f} MiB per image; at most "
                             f"{MAX_IMAGE_PAIR_BYTES // pair_bytes} pairs an image at this size "
                             f"({MAX_IMAGE_PAIR_BYTES >> 20} MiB)")
        if self.photometric not in photometric.MODELS:
            raise ValueError(f"photometric must be one of {', '.join(photometric.MODELS)}, got '{self.photometric}'")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        need = self.patch_size + 2 * self.rho
        if need > self.image_width or need > self.image_height:
            raise ValueError(
                f"geometry cannot fit: patch_size + 2*rho = {self.patch_size} + 2*{self.rho} = {need} px "
                f"exceeds the resized image {self.image_width}x{self.image_height}")


def seeded_rng(seed: int, split: str, image_id: int) -> np.random.Generator:
    """The one source of randomness for an image: a function of (seed, split, image id) only."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(image_id)])


def sample_top_left(rng: np.random.Generator, width: int, height: int, patch_size: int, rho: int) -> tuple[int, int]:
    """Integer (x, y), uniform in [rho, W - P - rho] x [rho, H - P - rho], both ends inclusive."""
    x = int(rng.integers(rho, width - patch_size - rho, endpoint=True))
    y = int(rng.integers(rho, height - patch_size - rho, endpoint=True))
    return x, y


def patch_corners(x: float, y: float, patch_size: int) -> np.ndarray:
    """Corners TL, TR, BR, BL of the P x P window at (x, y), shape (4, 2), float32."""
    p = patch_size
    return np.array([[x, y], [x + p, y], [x + p, y + p], [x, y + p]], dtype=np.float32)


def offsets_from_steps(steps: np.ndarray, rho: float) -> np.ndarray:
    """Maps integer steps in [0, OFFSET_STEPS] onto [-rho, rho] (both ends included), shape (4, 2)."""
    steps = np.asarray(steps, dtype=np.float64).reshape(4, 2)
    return (rho * (2.0 * steps / OFFSET_STEPS - 1.0)).astype(np.float32)


def sample_offsets(rng: np.random.Generator, rho: float) -> np.ndarray:
    """8 offsets (dx, dy per corner), uniform in [-rho, rho], shape (4, 2), float32."""
    return offsets_from_steps(rng.integers(0, OFFSET_STEPS, size=8, endpoint=True), rho)


def homography_ab(corners: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """H_AB in image coordinates: maps patch A's corners to the perturbed corners."""
    c = np.asarray(corners, np.float32).reshape(4, 2)
    return cv2.getPerspectiveTransform(c, c + np.asarray(offsets, np.float32).reshape(4, 2))


def homography_local(offsets: np.ndarray, patch_size: int) -> np.ndarray:
    """H_local: maps a pixel of patch B to its position in patch A (B -> A)."""
    return homography_ab(patch_corners(0, 0, patch_size), offsets)


def offsets_from_homography(h_local: np.ndarray, patch_size: int) -> np.ndarray:
    """The 4-point parametrisation of a B -> A homography: H_local(c) - c, shape (4, 2)."""
    c = patch_corners(0, 0, patch_size)
    mapped = cv2.perspectiveTransform(c.reshape(1, 4, 2).astype(np.float64), np.asarray(h_local, np.float64))
    return (mapped.reshape(4, 2) - c).astype(np.float32)


# The 8 symmetries of a square patch (flips and transposes), as the pixel maps u' = M u that turn a patch
# into its view: view(u') = patch(M^-1 u'). Pixel centres are 0..P-1, so a flip is u' = P - 1 - u.
VIEWS = tuple((t, fx, fy) for t in (False, True) for fx in (False, True) for fy in (False, True))


def view_matrix(view: tuple, patch_size: int) -> np.ndarray:
    """3x3 M of a view (transpose, flip_x, flip_y): flip x, then flip y, then transpose."""
    transpose, flip_x, flip_y = view
    m = np.eye(3)
    if flip_x:
        m = np.array([[-1.0, 0, patch_size - 1], [0, 1, 0], [0, 0, 1]]) @ m
    if flip_y:
        m = np.array([[1.0, 0, 0], [0, -1, patch_size - 1], [0, 0, 1]]) @ m
    if transpose:
        m = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]) @ m
    return m


def view_patches(patches: np.ndarray, view: tuple) -> np.ndarray:
    """Patches (N, P, P, C) or (P, P, C), indexed [.., y, x, c], seen through `view` (exact: no resampling)."""
    transpose, flip_x, flip_y = view
    out = np.asarray(patches)
    if flip_x:
        out = out[..., :, ::-1, :]
    if flip_y:
        out = out[..., ::-1, :, :]
    if transpose:
        out = np.swapaxes(out, -3, -2)
    return np.ascontiguousarray(out)


def view_offsets(offsets: np.ndarray, m: np.ndarray, patch_size: int) -> np.ndarray:
    """The 4-point offsets (.., 4, 2) of a pair seen through the pixel map m: H' = m H m^-1.

    Exact for any m, so view_offsets(view_offsets(o, m), inv(m)) == o; a flip is no corner permutation
    here, since the corners sit at 0 and P while a flipped pixel centre u goes to P - 1 - u."""
    offsets = np.asarray(offsets, np.float64)
    flat = offsets.reshape(-1, 4, 2)
    m_inv = np.linalg.inv(m)
    out = np.stack([offsets_from_homography(m @ homography_local(o, patch_size) @ m_inv, patch_size) for o in flat])
    return out.reshape(offsets.shape).astype(np.float32)


def crop(image: np.ndarray, x: int, y: int, patch_size: int) -> np.ndarray:
    return image[y:y + patch_size, x:x + patch_size]


def warp_window(image: np.ndarray, h_ab: np.ndarray, x: int, y: int, patch_size: int) -> np.ndarray:
    """Patch B: the (x, y, P x P) window of image warped by inv(H_AB), computed for that window only.

    patch_B(u) = image(H_AB (u + (x, y))), so the dst -> src map is H_AB @ T(x, y) and OpenCV takes it
    as is with WARP_INVERSE_MAP; this costs P*P lookups instead of W*H for the whole warped image.
    BORDER_REPLICATE only matters for the sub-pixel fringe of bilinear interpolation at the image
    edge: the corner geometry keeps every sampled position inside the image.
    """
    to_image = np.array([[1, 0, x], [0, 1, y], [0, 0, 1]], dtype=np.float64)
    m = np.asarray(h_ab, np.float64) @ to_image
    return cv2.warpPerspective(image, m, (patch_size, patch_size),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)


def warp_full_image_window(image: np.ndarray, h_ab: np.ndarray, x: int, y: int, patch_size: int) -> np.ndarray:
    """Reference form of DESIGN.md step 4 (warp the whole image by inv(H_AB), then crop); slower."""
    h, w = image.shape[:2]
    warped = cv2.warpPerspective(image, np.linalg.inv(h_ab), (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
    return crop(warped, x, y, patch_size)


@dataclasses.dataclass(frozen=True)
class Pair:
    patch_a: np.ndarray  # (P, P, C) uint8
    patch_b: np.ndarray  # (P, P, C) uint8
    offsets: np.ndarray  # (4, 2) float32
    corners: np.ndarray  # (4, 2) float32, patch A in the resized image
    patch_index: int
    photometric_a: np.ndarray | None = None  # the camera parameters each patch was seen through, if any
    photometric_b: np.ndarray | None = None


def photometric_rng(seed: int, split: str, image_id: int) -> np.random.Generator:
    """The camera draws of an image: their own stream, so a `camera` build has the same geometry (corners,
    offsets) as the `none` build of the same flags, pair for pair."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(image_id), 1])


def camera_pair(pair: Pair, rng: np.random.Generator) -> Pair:
    """The pair with patch A and patch B each through its own camera draw, labels unchanged."""
    pa, pb = photometric.sample(rng), photometric.sample(rng)
    return dataclasses.replace(pair, patch_a=photometric.apply(pair.patch_a, pa),
                               patch_b=photometric.apply(pair.patch_b, pb), photometric_a=pa, photometric_b=pb)


def make_pair(image: np.ndarray, x: int, y: int, offsets: np.ndarray, patch_size: int, patch_index: int = 0,
              warp=warp_window) -> Pair:
    """Patch A = window (x, y) of image; patch B = same window of the image warped by inv(H_AB)."""
    corners = patch_corners(x, y, patch_size)
    h_ab = homography_ab(corners, offsets)
    a = crop(image, x, y, patch_size)
    b = warp(image, h_ab, x, y, patch_size)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return Pair(np.ascontiguousarray(a), np.ascontiguousarray(b), np.asarray(offsets, np.float32).reshape(4, 2),
                corners, patch_index)


def generate_pairs(image: np.ndarray, config: PairConfig, split: str, image_id: int, warp=warp_window) -> list[Pair]:
    """All patches_per_image pairs of one resized image; the draws depend on (seed, split, image id) only."""
    h, w = image.shape[:2]
    if (w, h) != (config.image_width, config.image_height):
        raise ValueError(f"image is {w}x{h}, expected {config.image_width}x{config.image_height}")
    rng = seeded_rng(config.seed, split, image_id)
    pairs = []
    for k in range(config.patches_per_image):
        x, y = sample_top_left(rng, w, h, config.patch_size, config.rho)
        offsets = sample_offsets(rng, config.rho)
        pairs.append(make_pair(image, x, y, offsets, config.patch_size, k, warp))
    if config.photometric == "camera":
        prng = photometric_rng(config.seed, split, image_id)
        pairs = [camera_pair(p, prng) for p in pairs]
    return pairs


def mace(pred_offsets: np.ndarray, true_offsets: np.ndarray) -> np.ndarray:
    """Mean average corner error per pair: mean over 4 corners of the Euclidean error, (N,) float64.

    Accepts (..., 8) or (..., 4, 2) arrays.
    """
    p = np.asarray(pred_offsets, np.float64).reshape(-1, 4, 2)
    t = np.asarray(true_offsets, np.float64).reshape(-1, 4, 2)
    return np.linalg.norm(p - t, axis=-1).mean(axis=-1)
