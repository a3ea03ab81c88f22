"""The camera model for pairs: how two shots of one scene differ besides the geometry (numpy + OpenCV).

`none` (the default) leaves the patches as the warp made them. `camera` gives patch A and patch B each its
own draw of CAMERA_RANGES, from the pair's own seeded generator (the builder) or from a fresh one per batch
(training), applied in the order light meets a camera:

  shade       an additive linear ramp across the patch (uneven light): +-shade grey levels at the edges,
              rising along shade_angle (degrees);
  blur        one of: none, Gaussian (blur_sigma px), or motion blur (a line of motion_length px at
              motion_angle degrees); the kind is drawn uniformly, the other sizes are 0;
  exposure    (x - 127.5) * contrast + 127.5 + brightness (grey levels);
  gamma       255 * (x / 255) ** gamma, after clipping to [0, 255];
  noise       Gaussian, noise_sigma grey levels, drawn from noise_seed (so a pair is reproduced from its
              record alone); then rounded and clipped to uint8.

Parameters travel as float32 vectors in FIELDS order (the builder stores one per patch in the record,
schema.PHOTOMETRIC_A / _B), and `apply` works on exactly those float32 values: a record's patch is
reproduced bit for bit from the clean patch and its stored vector. Every draw takes the same number of
values from the generator, whatever the blur kind, so streams stay aligned.
"""
from __future__ import annotations

import math

import numpy as np

try:
    import cv2
except ImportError:  # readers import the contract without OpenCV; only `apply` needs it
    cv2 = None

MODELS = ("none", "camera")

FIELDS = ("contrast", "brightness", "gamma", "noise_sigma", "blur_sigma", "motion_length", "motion_angle",
          "shade", "shade_angle", "noise_seed")
NOISE_SEEDS = 2**24  # every seed exact in float32

# (low, high) of each field under `camera`; gamma is log-uniform, blur_sigma and motion_length are 0 unless
# their blur kind was drawn (then uniform in the range given here).
CAMERA_RANGES = {
    "contrast": (0.7, 1.3),
    "brightness": (-25.0, 25.0),
    "gamma": (0.75, 1.0 / 0.75),
    "noise_sigma": (0.0, 6.0),
    "blur_sigma": (0.4, 1.2),
    "motion_length": (2.0, 7.0),
    "motion_angle": (0.0, 180.0),
    "shade": (-30.0, 30.0),
    "shade_angle": (0.0, 360.0),
    "noise_seed": (0, NOISE_SEEDS - 1),
}
IDENTITY = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], np.float32)  # `apply` leaves a patch unchanged
_BLUR_KINDS = 3  # none, Gaussian, motion


def validate_model(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"photometric model must be one of {', '.join(MODELS)}, got '{name}'")
    return name


def describe(name: str) -> dict:
    """The model as homography_index.json records it: its name and, for `camera`, fields, ranges and order."""
    validate_model(name)
    if name == "none":
        return {"name": "none"}
    return {"name": name, "fields": list(FIELDS), "ranges": {k: list(v) for k, v in CAMERA_RANGES.items()},
            "blur_kinds": ["none", "gaussian", "motion"],
            "order": ["shade", "blur", "exposure", "gamma", "noise", "round to uint8"],
            "stream": "numpy default_rng([seed, crc32(split), image_id, 1]); per pair: A's draw, then B's"}


def model_name(recorded) -> str:
    """The model named by an index's config entry (absent in builds from before it: none)."""
    if recorded is None:
        return "none"
    name = recorded.get("name") if isinstance(recorded, dict) else recorded
    return validate_model(str(name))


def sample(rng: np.random.Generator) -> np.ndarray:
    """One patch's parameters under `camera`, a float32 vector in FIELDS order (always 10 draws + 1 kind)."""
    r = CAMERA_RANGES
    contrast = rng.uniform(*r["contrast"])
    brightness = rng.uniform(*r["brightness"])
    gamma = math.exp(rng.uniform(math.log(r["gamma"][0]), math.log(r["gamma"][1])))
    noise_sigma = rng.uniform(*r["noise_sigma"])
    kind = int(rng.integers(_BLUR_KINDS))
    blur_sigma = rng.uniform(*r["blur_sigma"])
    motion_length = rng.uniform(*r["motion_length"])
    motion_angle = rng.uniform(*r["motion_angle"])
    shade = rng.uniform(*r["shade"])
    shade_angle = rng.uniform(*r["shade_angle"])
    noise_seed = int(rng.integers(NOISE_SEEDS))
    return np.array([contrast, brightness, gamma, noise_sigma, blur_sigma if kind == 1 else 0.0,
                     motion_length if kind == 2 else 0.0, motion_angle, shade, shade_angle, noise_seed],
                    np.float32)


def range_problem(params: np.ndarray) -> str | None:
    """None when a stored vector is one `sample` can give (or IDENTITY), else what is out of range."""
    v = np.asarray(params, np.float64).ravel()
    if v.size != len(FIELDS) or not np.all(np.isfinite(v)):
        return f"photometric parameters must be {len(FIELDS)} finite values, got {v.size}"
    if np.array_equal(v, IDENTITY):
        return None
    tol = 1e-5
    for name, value in zip(FIELDS, v):
        lo, hi = CAMERA_RANGES[name]
        if name in ("blur_sigma", "motion_length") and value == 0:
            continue
        if not lo - tol * max(1.0, abs(lo)) <= value <= hi + tol * max(1.0, abs(hi)):
            return f"{name} = {value:g} outside [{lo:g}, {hi:g}]"
    if v[FIELDS.index("blur_sigma")] and v[FIELDS.index("motion_length")]:
        return "both a Gaussian and a motion blur (one kind is drawn)"
    if v[FIELDS.index("noise_seed")] != int(v[FIELDS.index("noise_seed")]):
        return "noise_seed is not an integer"
    return None


def motion_kernel(length: float, angle_deg: float) -> np.ndarray:
    """A normalised line kernel of `length` px through the centre at `angle_deg` (anti-aliased by rotation)."""
    size = 2 * int(math.ceil(length / 2)) + 3
    k = np.zeros((size, size), np.float32)
    c = size // 2
    half = length / 2
    k[c, c - int(half):c + int(half) + 1] = 1.0
    frac = half - int(half)  # the line's fractional ends
    if frac > 0:
        k[c, c - int(half) - 1] = k[c, c + int(half) + 1] = frac
    rot = cv2.getRotationMatrix2D((float(c), float(c)), float(angle_deg), 1.0)
    k = cv2.warpAffine(k, rot, (size, size), flags=cv2.INTER_LINEAR)
    return k / k.sum()


def shade_ramp(size: int, amplitude: float, angle_deg: float) -> np.ndarray:
    """(size, size) float32: +-amplitude at the patch's edges along angle_deg, 0 at its centre."""
    t = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)
    a = math.radians(float(angle_deg))
    proj = np.float32(math.cos(a)) * t[None, :] + np.float32(math.sin(a)) * t[:, None]
    return proj * np.float32(amplitude / max((size - 1) / 2, 1.0))


def apply(patch: np.ndarray, params: np.ndarray) -> np.ndarray:
    """One uint8 patch (P, P) or (P, P, C) seen through the camera `params` (float32, FIELDS order)."""
    v = [float(x) for x in np.asarray(params, np.float32).ravel()]
    contrast, brightness, gamma, noise_sigma, blur_sigma, motion_length, motion_angle, shade, shade_angle, seed = v
    shape = patch.shape
    x = patch.astype(np.float32).reshape(shape[0], shape[1], -1)
    if shade:
        x = x + shade_ramp(shape[0], shade, shade_angle)[:, :, None]
    if blur_sigma > 0:
        x = cv2.GaussianBlur(x, (0, 0), blur_sigma, borderType=cv2.BORDER_REFLECT_101)
    elif motion_length > 0:
        x = cv2.filter2D(x, -1, motion_kernel(motion_length, motion_angle), borderType=cv2.BORDER_REFLECT_101)
    x = x.reshape(shape[0], shape[1], -1)  # OpenCV drops a single channel axis
    x = (x - np.float32(127.5)) * np.float32(contrast) + np.float32(127.5 + brightness)
    if gamma != 1.0:
        x = np.float32(255.0) * (np.clip(x, 0, 255) / np.float32(255.0)) ** np.float32(gamma)
    if noise_sigma > 0:
        noise = np.random.default_rng(int(seed)).standard_normal(x.shape, np.float32)
        x = x + noise * np.float32(noise_sigma)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(shape)


def undo_tone(patch: np.ndarray, params: np.ndarray) -> np.ndarray:
    """float32 (P, P, C): the patch with its recorded gamma, exposure and shade undone (blur and noise cannot
    be, and clipped pixels stay clipped): what the audit compares, so a wrong label cannot hide behind them."""
    v = [float(x) for x in np.asarray(params, np.float32).ravel()]
    contrast, brightness, gamma, shade, shade_angle = v[0], v[1], v[2], v[7], v[8]
    x = patch.astype(np.float32).reshape(patch.shape[0], patch.shape[1], -1)
    if gamma != 1.0:
        x = np.float32(255.0) * (x / np.float32(255.0)) ** np.float32(1.0 / gamma)
    x = (x - np.float32(127.5 + brightness)) / np.float32(contrast) + np.float32(127.5)
    if shade:
        x = x - shade_ramp(x.shape[0], shade, shade_angle)[:, :, None]
    return x


def apply_batch(patches: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training: each uint8 patch of a (B, P, P, C) batch through its own fresh `sample(rng)`."""
    return np.stack([apply(p, sample(rng)) for p in patches])
