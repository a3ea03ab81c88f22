"""Any method of the registry on two whole photos, at their own resolution, within stated bounds.

  - an encoded file above MAX_FILE_BYTES, or a photo above MAX_PIXELS (read from its header before it is
    decoded, where Pillow can read the header), is refused with PhotoError naming it;
  - a photo whose long side is above MAX_SIDE is downscaled to MAX_SIDE (INTER_AREA) for the work, and the
    answer is mapped back exactly: H = S_a^-1 . H_small . S_b (estimate.resize_matrix);
  - the classical methods and refinement run on the (working copies of the) photos as given; the network
    sees each squeezed to its P x P input (learned.py) and its H is mapped to the photos' pixels, from
    where `+ecc` refines it at full resolution.

H maps a pixel of photo B to its position in photo A (DESIGN.md's direction).
"""
from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np

from model.estimators import registry
from model.estimators.estimate import Frame, resize_matrix

MAX_SIDE = 1600                   # the work runs on copies at most this long (SIFT on 10,000 px: 18 GB)
MAX_PIXELS = 100_000_000          # larger photos are refused (decoded: 100 MB gray, 300 MB colour)
MAX_FILE_BYTES = 512 * 1024 ** 2  # larger files are refused before they are read whole


class PhotoError(ValueError):
    """A photo that cannot be used; the message names it and says why."""


def header_size(data: bytes) -> tuple | None:
    """(width, height) from the file's header without decoding it (Pillow), or None when Pillow cannot tell;
    (0, 0) with a header past Pillow's own decompression-bomb bound (twice 89 MP, above ours)."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except ImportError:
        return None
    except Image.DecompressionBombError:
        return (0, 0)
    except Exception:  # noqa: BLE001 - any format Pillow does not know: OpenCV decodes it, bounded after
        return None


def decode(data: bytes, channels: int, name: str) -> np.ndarray:
    """A photo's bytes -> uint8 (H, W) gray or (H, W, 3) BGR, decoded as the builder decodes; PhotoError."""
    if len(data) > MAX_FILE_BYTES:
        raise PhotoError(f"{name}: {len(data)} bytes, more than the {MAX_FILE_BYTES} accepted")
    size = header_size(data)
    if size is not None and (size == (0, 0) or size[0] * size[1] > MAX_PIXELS):
        what = f"{size[0]}x{size[1]} pixels" if size != (0, 0) else "its header claims over 178 MP"
        raise PhotoError(f"{name}: {what}, more than the {MAX_PIXELS // 10 ** 6} MP accepted")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR) \
        if data else None
    if image is None or image.size == 0:
        raise PhotoError(f"{name}: not an image OpenCV can decode")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise PhotoError(f"{name}: {image.shape[1]}x{image.shape[0]} pixels, more than the "
                         f"{MAX_PIXELS // 10 ** 6} MP accepted")
    return image


def read(path: str, channels: int = 1) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise PhotoError(f"cannot read {path}: {e.strerror or e}") from e
    return decode(data, channels, path)


def working_copy(image: np.ndarray) -> tuple:
    """(the photo, or a copy MAX_SIDE px long, the matrix from the photo's pixels to the copy's)."""
    h, w = image.shape[:2]
    if max(h, w) <= MAX_SIDE:
        return image, np.eye(3)
    s = MAX_SIDE / max(h, w)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, new, interpolation=cv2.INTER_AREA), resize_matrix((w, h), new)


def estimate(names: list, image_a: np.ndarray, image_b: np.ndarray, ctx: registry.Context) -> dict:
    """{name: registry.Result} with one Estimate each, H in the photos' own pixels (B -> A)."""
    (work_a, s_a), (work_b, s_b) = working_copy(image_a), working_copy(image_b)
    ctx = dataclasses.replace(ctx, whole=True)
    results = registry.run(names, [work_a], [work_b], ctx)
    frame = Frame.of(image_b, True)
    out = {}
    for name, result in results.items():
        e = result.estimates[0]
        if e.homography is not None and not (np.array_equal(s_a, np.eye(3)) and np.array_equal(s_b, np.eye(3))):
            h = np.linalg.inv(s_a) @ e.homography @ s_b
            e = dataclasses.replace(e, homography=h / h[2, 2], offsets=frame.offsets(h))
        out[name] = registry.Result([e], result.seconds)
    return out
