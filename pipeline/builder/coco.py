"""Listing COCO 2017 splits and decoding their images. Remote paths (gs://...) go through Beam's FileSystems;
local ones through plain file I/O, so that listing and decoding also work where Beam is not installed
(the local builder on a bare GPU box).

A split is listed from annotations/instances_<split>.json, else annotations/image_info_<split>.json
(test2017 ships only that), else from the files of the <split>/ folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import zlib

import cv2
import numpy as np
from pipeline.dataset.dataset_info import join

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _remote(path: str) -> bool:
    return "://" in path


def _filesystems():
    from apache_beam.io.filesystems import FileSystems  # only for remote paths: Beam is optional locally

    return FileSystems


def _open(path: str):
    return _filesystems().open(path) if _remote(path) else open(path, "rb")


def _exists(path: str) -> bool:
    return _filesystems().exists(path) if _remote(path) else os.path.exists(path)


def _match(pattern: str) -> list:
    if _remote(pattern):
        return [m.path for m in _filesystems().match([pattern])[0].metadata_list]
    return [p for p in glob.glob(pattern) if os.path.isfile(p)]


class ListingError(ValueError):
    """The COCO folder or annotation file cannot be listed; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: str
    width: int = 0  # from the annotation file when known, else 0
    height: int = 0


def annotation_candidates(coco_dir: str, split: str) -> list:
    ann = join(coco_dir, "annotations")
    return [join(ann, f"instances_{split}.json"), join(ann, f"image_info_{split}.json")]


def _load_coco_images(path: str) -> list:
    """Image entries of a COCO-format file, read with pycocotools (from bytes, so gs:// works)."""
    from pycocotools.coco import COCO  # noqa: local import keeps workers that never list light

    try:
        with _open(path) as f:
            dataset = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ListingError(f"malformed annotation file {path}: {e}") from e
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ListingError(f"malformed annotation file {path}: no 'images' list")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            coco.createIndex()
        images = coco.loadImgs(coco.getImgIds())
        for im in images:
            int(im["id"]), str(im["file_name"])
    except (KeyError, TypeError, ValueError) as e:
        raise ListingError(f"malformed annotation file {path}: bad image entry ({type(e).__name__}: {e})") from e
    return images


def image_id_from_name(file_name: str) -> int:
    """COCO file names are zero-padded ids; any other name gets a stable 31-bit hash."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    digits = re.fullmatch(r"(?:COCO_[a-z0-9]+_)?(\d+)", stem)
    return int(digits.group(1)) if digits else zlib.crc32(stem.encode("utf-8")) & 0x7FFFFFFF


def list_split(coco_dir: str, split: str) -> tuple[list, str]:
    """(image records sorted by id, description of the source). Raises ListingError on bad input."""
    if not _exists(coco_dir):
        raise ListingError(f"coco_dir {coco_dir} does not exist")
    image_dir = join(coco_dir, split)
    for ann in annotation_candidates(coco_dir, split):
        if _exists(ann):
            entries = _load_coco_images(ann)
            records = [ImageRecord(int(im["id"]), join(image_dir, im["file_name"]),
                                   int(im.get("width") or 0), int(im.get("height") or 0)) for im in entries]
            source = ann
            break
    else:
        pattern = join(image_dir, "*")
        files = sorted(p for p in _match(pattern) if p.lower().endswith(IMAGE_EXTENSIONS))
        records = [ImageRecord(image_id_from_name(p), p) for p in files]
        source = f"files of {image_dir} (no annotation file)"
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise ListingError(f"split {split}: duplicate image ids in {source}")
    if not records:
        raise ListingError(f"split {split} has no images (listed from {source})")
    return sorted(records, key=lambda r: r.image_id), source


class ImageError(Exception):
    """An input image that cannot be used; .reason is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_bytes(path: str) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except (IOError, OSError) as e:  # Beam raises BeamIOError (an IOError) for missing files
        raise ImageError("missing", f"cannot open {path}: {e}") from e


def _jpeg_truncated(data: bytes) -> bool:
    # libjpeg "decodes" a truncated JPEG with a grey tail and only warns; the EOI marker tells.
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]


def reduced_flag(src_w: int, src_h: int, width: int, height: int, channels: int) -> int:
    """IMREAD_REDUCED_* flag when the source is at least 2x, 4x or 8x the target on both axes."""
    gray = channels == 1
    factor = min(src_w // width, src_h // height) if src_w and src_h else 1
    for f, (g, c) in ((8, (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8)),
                      (4, (cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4)),
                      (2, (cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2))):
        if factor >= f:
            return g if gray else c
    return cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR


def decode_resize(data: bytes, width: int, height: int, channels: int, src_size=(0, 0)) -> np.ndarray:
    """Decodes any OpenCV-readable image (JPEG incl. grayscale/CMYK, PNG, ...) to (height, width[, 3]) uint8.

    Resized to exactly width x height whatever the aspect ratio, as the paper does. src_size, when known
    from the annotation, lets OpenCV decode JPEGs at reduced size (the DCT scaling is nearly free).
    Raises ImageError with reason 'empty', 'truncated' or 'undecodable'.
    """
    if not data:
        raise ImageError("empty", "zero-byte file")
    if _jpeg_truncated(data):
        raise ImageError("truncated", "JPEG without its end-of-image marker")
    buf = np.frombuffer(data, np.uint8)
    flag = reduced_flag(src_size[0], src_size[1], width, height, channels)
    image = cv2.imdecode(buf, flag)
    if image is None and flag not in (cv2.IMREAD_GRAYSCALE, cv2.IMREAD_COLOR):
        image = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageError("undecodable", "not an image OpenCV can decode")
    if image.dtype != np.uint8:  # 16-bit PNG/TIFF
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    interp = cv2.INTER_AREA if image.shape[1] >= width and image.shape[0] >= height else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)
