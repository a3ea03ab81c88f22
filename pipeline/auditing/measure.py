"""The audit's first Beam steps, each a named composite transform that can be tested alone.

  ReadShards        shard specs -> (split, decoded record); tagged output 'shards': one status per shard
                    (records read vs homography_index.json, read/parse error such as a truncated shard)
  MeasurePairs      (split, record) -> small per-pair summary (no pixels): label residual, flags, moments

The summaries are what every statistic is combined from (pipeline/auditing/statistics.py), so no later
step holds records or patches.

Portable subset, as in the builder: one output per ParDo (ReadShards splits its union output with two
Maps), so Beam 2.77's DaskRunner runs it too.
"""
from __future__ import annotations

import hashlib
import logging
import typing

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.dataset import geometry, index_checks, photometric, schema
from pipeline.reader.framing import CorruptShardError, read_framed  # the builder's TFRecord framing

NAMESPACE = "homography_audit"


# ---------------------------------------------------------------- TFRecord framing, with errors as values

class ShardReadError(ValueError):
    """A shard that cannot be read to its end (truncated, corrupt, or unparsable record)."""


def iter_tfrecords(f, lengths: tuple | None = None):
    """Yields the payloads of a TFRecord stream, read and crc-checked by the builder's own framing code
    (pipeline.reader.framing; lengths: the record sizes the geometry allows, index_checks.record_bounds);
    raises ShardReadError naming the record, its byte offset and the kind of damage."""
    index = 0
    try:
        for data in read_framed(f, lengths=lengths):
            index += 1
            yield data
    except CorruptShardError as e:
        kind = "truncated" if e.truncated else ("corrupt (checksum mismatch)" if "CRC" in e.problem else "corrupt")
        raise ShardReadError(f"{kind} at record {index}, byte offset {e.offset} ({e.problem})") from e


class _ReadShardFn(beam.DoFn):
    def __init__(self, config: geometry.PairConfig):
        self._config = config
        self._records = Metrics.counter(NAMESPACE, "records_read")
        self._shards = Metrics.counter(NAMESPACE, "shards_read")
        self._errors = Metrics.counter(NAMESPACE, "shard_errors")

    def process(self, spec):
        cfg, count, error = self._config, 0, None
        split_counter = Metrics.counter(NAMESPACE, f"{spec['split']}_records_read")
        try:
            with FileSystems.open(spec["path"], compression_type=CompressionTypes.UNCOMPRESSED) as f:
                for data in iter_tfrecords(f, index_checks.record_bounds(cfg.patch_size, cfg.channels)):
                    try:
                        record = schema.decode(data, cfg.patch_size, cfg.channels)
                    except Exception as e:  # a record that is not our schema is a damaged shard
                        raise ShardReadError(f"record {count} does not parse: {type(e).__name__}: {e}") from e
                    count += 1
                    self._records.inc()
                    split_counter.inc()
                    yield "record", (spec["split"], record)
        except (ShardReadError, OSError) as e:
            error = str(e) or type(e).__name__
            self._errors.inc()
            logging.error("audit: %s shard %s: %s", spec["split"], spec["file"], error)
        self._shards.inc()
        logging.info("audit: read %s shard %d: %d records (%d listed)%s", spec["split"], spec["index"], count,
                     spec["expected"], f", ERROR: {error}" if error else "")
        yield "shard", dict(spec, read=count, error=error)


def _of_kind(kind):
    return lambda item: [item[1]] if item[0] == kind else []


class ReadShards(beam.PTransform):
    """Shard specs {split, index, file, path, expected} -> .records: (split, record); .shards: one status each."""

    def __init__(self, specs: list, config: geometry.PairConfig):
        super().__init__()
        self._specs = specs
        self._config = config

    def expand(self, pbegin):
        both = (pbegin
                | "ListShards" >> beam.Create(self._specs)  # reshuffles: shards spread over workers
                | "Read" >> beam.ParDo(_ReadShardFn(self._config)))
        return ReadOutputs(records=both | "Records" >> beam.FlatMap(_of_kind("record")),
                           shards=both | "Shards" >> beam.FlatMap(_of_kind("shard")))


class ReadOutputs(typing.NamedTuple):
    records: beam.PCollection  # (split, record)
    shards: beam.PCollection   # one status dict per shard


# ---------------------------------------------------------------- per-pair measures (pure functions)

def offset_problem(offsets: np.ndarray, rho: float) -> str | None:
    """None when all 8 offsets are finite and within [-rho, rho]."""
    o = np.asarray(offsets, np.float64)
    if o.shape != (8,) or not np.all(np.isfinite(o)):
        return f"offsets not 8 finite values: {o.tolist()}"
    worst = float(np.max(np.abs(o)))
    return None if worst <= rho else f"|offset| {worst:.3f} > rho {rho}"


def corner_problem(corners: np.ndarray, config: geometry.PairConfig) -> str | None:
    """None when corners are a P x P square at an integer top-left inside DESIGN.md's margins."""
    c = np.asarray(corners, np.float64)
    if c.shape != (8,) or not np.all(np.isfinite(c)):
        return f"corners not 8 finite values: {c.tolist()}"
    x, y = c[0], c[1]
    if np.max(np.abs(c.reshape(4, 2) - geometry.patch_corners(x, y, config.patch_size))) > 1e-3:
        return f"corners {c.tolist()} are not a {config.patch_size}x{config.patch_size} square"
    if x != round(x) or y != round(y):
        return f"top-left ({x}, {y}) is not integer"
    p, r = config.patch_size, config.rho
    if not (r <= x <= config.image_width - p - r and r <= y <= config.image_height - p - r):
        return (f"top-left ({x:g}, {y:g}) outside margins x in [{r}, {config.image_width - p - r}], "
                f"y in [{r}, {config.image_height - p - r}]")
    return None


def label_residual(patch_a: np.ndarray, patch_b: np.ndarray, offsets: np.ndarray, patch_size: int):
    """Mean |warp(A, H_local) - B| over the eroded valid region, and the valid share of the patch.

    patch_B(v) = patch_A(H_local v) (DESIGN.md step 5): OpenCV's dst -> src map with WARP_INVERSE_MAP.
    Returns (255.0, 0.0) when the label gives no usable region (degenerate or non-finite offsets).
    """
    p = patch_size
    try:
        h = geometry.homography_local(np.asarray(offsets, np.float32), p)
        if not np.all(np.isfinite(h)):
            return 255.0, 0.0
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        pred = cv2.warpPerspective(patch_a, h, (p, p), flags=flags)
        mask = cv2.warpPerspective(np.ones((p, p), np.uint8), h, (p, p), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    except cv2.error:
        return 255.0, 0.0
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0  # drop the bilinear fringe at A's border
    if not mask.any():
        return 255.0, 0.0
    diff = np.abs(pred.reshape(p, p, -1).astype(np.float32) - patch_b.astype(np.float32))[mask]
    return float(diff.mean()), float(mask.mean())


# Camera builds (--photometric=camera): a label is checked on the patches with their recorded tone (exposure,
# gamma, shade) undone and both smoothed (blur and noise cannot be undone), as the mean |warp(A', H) - B'| over
# the valid, unclipped region relative to B's own mean deviation there. Measured on 1,780 coco_mini pairs
# (BUILD_NOTES): right labels 0.07 median, 0.46 max; flipped offsets 1.18 median, another pair's B 1.56;
# 0.6 separates them. Too little unclipped overlap to judge counts as no evidence (0, valid share 0).
CAMERA_RESIDUAL_THRESHOLD = 0.6
CAMERA_SMOOTHING = 1.5  # px, Gaussian sigma on both patches
CAMERA_MIN_SPREAD = 4.0  # grey levels: the denominator's floor, so a flat patch is not judged on its noise
CAMERA_MIN_SHARE = 0.1  # of the patch: less unclipped overlap than this is not judged


def camera_label_residual(patch_a: np.ndarray, patch_b: np.ndarray, offsets: np.ndarray, params_a, params_b,
                          patch_size: int) -> tuple[float, float]:
    """(relative residual, judged share of the patch) of a camera pair: see CAMERA_RESIDUAL_THRESHOLD."""
    p = patch_size
    gray_a, gray_b = patch_a.reshape(p, p, -1).mean(axis=2), patch_b.reshape(p, p, -1).mean(axis=2)
    ua = cv2.GaussianBlur(photometric.undo_tone(patch_a, params_a).mean(axis=2), (0, 0), CAMERA_SMOOTHING)
    ub = cv2.GaussianBlur(photometric.undo_tone(patch_b, params_b).mean(axis=2), (0, 0), CAMERA_SMOOTHING)
    try:
        h = geometry.homography_local(np.asarray(offsets, np.float32), p)
        if not np.all(np.isfinite(h)):
            return 255.0, 0.0
        warped = cv2.warpPerspective(ua.astype(np.float32), h, (p, p), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        unclipped_a = ((gray_a > 2) & (gray_a < 253)).astype(np.uint8)
        mask = cv2.warpPerspective(unclipped_a, h, (p, p), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    except cv2.error:
        return 255.0, 0.0
    mask = cv2.erode(mask, np.ones((7, 7), np.uint8)) > 0  # the smoothing's and the warp's fringe
    mask &= cv2.erode(((gray_b > 2) & (gray_b < 253)).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if mask.mean() < CAMERA_MIN_SHARE:
        return 0.0, 0.0
    spread = np.abs(ub[mask] - ub[mask].mean()).mean()
    return float(np.abs(warped - ub)[mask].mean() / max(spread, CAMERA_MIN_SPREAD)), float(mask.mean())


def photometric_problem(record: dict, model: str) -> str | None:
    """None when the pair's recorded camera parameters fit the build's model, else what is wrong."""
    params = [record.get(k) for k in (schema.PHOTOMETRIC_A, schema.PHOTOMETRIC_B)]
    if model == "none":
        return None if all(v is None for v in params) else "camera parameters in a --photometric=none build"
    if any(v is None for v in params):
        return "camera parameters missing"
    for name, v in zip(("patch_a", "patch_b"), params):
        problem = photometric.range_problem(v)
        if problem:
            return f"{name}: {problem}"
    return None


def measure_pair(split: str, record: dict, config: geometry.PairConfig) -> dict:
    """The small summary of one pair that every statistic is combined from (no pixels kept)."""
    a, b = record[schema.PATCH_A], record[schema.PATCH_B]
    offsets, corners = record[schema.OFFSETS], record[schema.CORNERS]
    problem = photometric_problem(record, config.photometric)
    if config.photometric == "camera" and problem is None:
        residual, valid = camera_label_residual(a, b, offsets, record[schema.PHOTOMETRIC_A],
                                                record[schema.PHOTOMETRIC_B], config.patch_size)
    else:
        residual, valid = label_residual(a, b, offsets, config.patch_size)
    return {
        "split": split, "image_id": record[schema.IMAGE_ID], "patch_index": record[schema.PATCH_INDEX],
        "offsets": np.asarray(offsets, np.float64),
        "top_left": np.asarray(corners[:2], np.float64),
        "offset_problem": offset_problem(offsets, config.rho),
        "corner_problem": corner_problem(corners, config),
        "residual": residual, "valid_share": valid, "photometric_problem": problem,
        "image": np.array([a.mean(), a.std(), b.mean(), b.std()], np.float64),
        "pixels": np.stack([np.bincount(a.ravel(), minlength=256), np.bincount(b.ravel(), minlength=256)]),
        "hash": hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest(),
    }


class _MeasureFn(beam.DoFn):
    def __init__(self, config):
        self._config = config

    def setup(self):
        cv2.setNumThreads(1)

    def process(self, element):
        split, record = element
        yield measure_pair(split, record, self._config)


class MeasurePairs(beam.PTransform):
    """(split, record) -> per-pair summary dict (see measure_pair)."""

    def __init__(self, config: geometry.PairConfig):
        super().__init__()
        self._config = config

    def expand(self, pcoll):
        return pcoll | "Measure" >> beam.ParDo(_MeasureFn(self._config))
