"""The Beam steps of the dataset audit, each a named composite transform that can be tested alone.

  ReadShards        shard specs -> (split, decoded record); tagged output 'shards': one status per shard
                    (records read vs dataset_info.json, read/parse error such as a truncated shard)
  MeasurePairs      (split, record) -> small per-pair summary (no pixels): label residual, flags, moments
  SplitStatistics   summaries -> (split, stats) through one streaming CombineFn (memory flat)
  ResidualQuantiles summaries -> (split, 101 approximate percentiles of the label residual)
  PairsPerImage     summaries -> (split, per-image counts report) and the per-image keys for Leakage
  Leakage           per-image keys -> image ids found in more than one split
  Duplicates        summaries -> identical patch_a (by hash), within and across splits

Everything downstream of ReadShards holds per-pair summaries of a few hundred bytes, combined with
CombineFns (combiner lifting), so no step ever collects records or patches in memory.

Portable subset, as in the builder: one output per ParDo (ReadShards splits its union output with two
Maps), no side inputs (CombineGlobally without defaults; the driver supplies the empty result), so
Beam 2.77's DaskRunner runs it too. DaskRunner lifts no combiner: each CombinePerKey gathers its group.
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

from pipeline import geometry, schema
from pipeline.records import CorruptShardError, read_framed  # the builder's TFRecord framing

NAMESPACE = "homography_audit"
OFFSET_BINS = 32
RESIDUAL_EDGES = np.concatenate([[0.0], np.logspace(-3, np.log10(256.0), 49)])  # [0, 1e-3) holds exact zeros
NEAR_CONSTANT_STD = 2.0  # grey levels: a patch with less spread than this has no usable texture
MAX_EXAMPLES = 5


# ---------------------------------------------------------------- TFRecord framing, with errors as values

class ShardReadError(ValueError):
    """A shard that cannot be read to its end (truncated, corrupt, or unparsable record)."""


def iter_tfrecords(f):
    """Yields the payloads of a TFRecord stream, read and crc-checked by the builder's own framing code
    (pipeline.records); raises ShardReadError naming the record, its byte offset and the kind of damage."""
    index = 0
    try:
        for data in read_framed(f):
            index += 1
            yield data
    except CorruptShardError as e:
        kind = "truncated" if e.truncated else "corrupt (checksum mismatch)"
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
                for data in iter_tfrecords(f):
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


def measure_pair(split: str, record: dict, config: geometry.PairConfig) -> dict:
    """The small summary of one pair that every statistic is combined from (no pixels kept)."""
    a, b = record[schema.PATCH_A], record[schema.PATCH_B]
    offsets, corners = record[schema.OFFSETS], record[schema.CORNERS]
    residual, valid = label_residual(a, b, offsets, config.patch_size)
    return {
        "split": split, "image_id": record[schema.IMAGE_ID], "patch_index": record[schema.PATCH_INDEX],
        "offsets": np.asarray(offsets, np.float64),
        "top_left": np.asarray(corners[:2], np.float64),
        "offset_problem": offset_problem(offsets, config.rho),
        "corner_problem": corner_problem(corners, config),
        "residual": residual, "valid_share": valid,
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


# ---------------------------------------------------------------- streaming accumulators

class Moments:
    """Count, mean, M2 (Chan et al.'s parallel update), min, max of a fixed-length vector."""

    def __init__(self, dims: int):
        self.n = 0
        self.mean = np.zeros(dims)
        self.m2 = np.zeros(dims)
        self.min = np.full(dims, np.inf)
        self.max = np.full(dims, -np.inf)

    def add(self, v):
        self.merge_values(1, np.asarray(v, np.float64), 0.0, v, v)

    def merge(self, o: "Moments"):
        if o.n:
            self.merge_values(o.n, o.mean, o.m2, o.min, o.max)

    def merge_values(self, n, mean, m2, lo, hi):
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
        self.n = total
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)

    def to_dict(self) -> dict:
        if not self.n:
            return {"n": 0}
        return {"n": self.n, "mean": self.mean.tolist(), "std": np.sqrt(self.m2 / self.n).tolist(),
                "min": self.min.tolist(), "max": self.max.tolist()}


class Histogram:
    """Per-dimension counts over fixed edges, plus below/above counts (values outside the edges)."""

    def __init__(self, dims: int, edges):
        self.edges = np.asarray(edges, np.float64)
        self.counts = np.zeros((dims, len(self.edges) - 1), np.int64)
        self.below = np.zeros(dims, np.int64)
        self.above = np.zeros(dims, np.int64)

    def add(self, v):
        v = np.atleast_1d(np.asarray(v, np.float64))
        i = np.searchsorted(self.edges, v, side="right") - 1
        i[v == self.edges[-1]] = len(self.edges) - 2  # the last edge is inclusive
        below, above = i < 0, i >= len(self.edges) - 1
        self.below += below
        self.above += above
        ok = ~(below | above)
        self.counts[np.nonzero(ok)[0], i[ok]] += 1

    def merge(self, o: "Histogram"):
        self.counts += o.counts
        self.below += o.below
        self.above += o.above

    def to_dict(self) -> dict:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "below": self.below.tolist(), "above": self.above.tolist()}


class Failures:
    """Count of failed pairs and the first few (smallest keys, so the report is deterministic)."""

    def __init__(self):
        self.count = 0
        self.examples = []

    def add(self, example: tuple):
        self.count += 1
        self.examples = sorted(self.examples + [example])[:MAX_EXAMPLES]

    def merge(self, o: "Failures"):
        self.count += o.count
        self.examples = sorted(self.examples + o.examples)[:MAX_EXAMPLES]

    def to_dict(self) -> dict:
        return {"count": self.count, "examples": [list(e) for e in self.examples]}


class SplitStatsFn(beam.CombineFn):
    """Every per-split statistic of the pair summaries in one flat-memory accumulator."""

    def __init__(self, config: geometry.PairConfig, residual_threshold: float):
        self._config = config
        self._threshold = residual_threshold

    def create_accumulator(self):
        c = self._config
        nx, ny = c.image_width - c.patch_size - 2 * c.rho + 1, c.image_height - c.patch_size - 2 * c.rho + 1
        return {
            "offsets": Moments(8), "offset_hist": Histogram(8, np.linspace(-c.rho, c.rho, OFFSET_BINS + 1)),
            "top_left": Moments(2), "positions": np.zeros((max(ny, 1), max(nx, 1)), np.int64),
            "image": Moments(4), "near_constant": np.zeros(2, np.int64), "pixels": np.zeros((2, 256), np.int64),
            "residual": Moments(1), "residual_hist": Histogram(1, RESIDUAL_EDGES), "valid_share": Moments(1),
            "offset_range": Failures(), "margins": Failures(), "label": Failures(),
        }

    def add_input(self, acc, s):
        c, key = self._config, (s["image_id"], s["patch_index"])
        acc["offsets"].add(s["offsets"])
        acc["offset_hist"].add(s["offsets"])
        acc["top_left"].add(s["top_left"])
        if s["corner_problem"] is None:
            acc["positions"][int(s["top_left"][1]) - c.rho, int(s["top_left"][0]) - c.rho] += 1
        else:
            acc["margins"].add(key + (s["corner_problem"],))
        if s["offset_problem"] is not None:
            acc["offset_range"].add(key + (s["offset_problem"],))
        acc["image"].add(s["image"])
        acc["near_constant"] += s["image"][[1, 3]] < NEAR_CONSTANT_STD
        acc["pixels"] += s["pixels"]
        acc["residual"].add([s["residual"]])
        acc["residual_hist"].add([s["residual"]])
        acc["valid_share"].add([s["valid_share"]])
        if s["residual"] > self._threshold:
            acc["label"].add(key + (round(s["residual"], 3),))
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for a in accs:
            for k, v in a.items():
                if isinstance(v, np.ndarray):
                    out[k] += v
                else:
                    out[k].merge(v)
        return out

    def extract_output(self, acc):
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v.to_dict()) for k, v in acc.items()}
        out["pairs"] = acc["offsets"].n
        out["residual_threshold"] = self._threshold
        out["near_constant_std"] = NEAR_CONSTANT_STD
        return out


class SplitStatistics(beam.PTransform):
    """Pair summaries -> (split, statistics dict)."""

    def __init__(self, config: geometry.PairConfig, residual_threshold: float):
        super().__init__()
        self._fn = SplitStatsFn(config, residual_threshold)

    def expand(self, summaries):
        return (summaries
                | "BySplit" >> beam.Map(lambda s: (s["split"], s))
                | "Combine" >> beam.CombinePerKey(self._fn))


class ResidualQuantiles(beam.PTransform):
    """Pair summaries -> (split, [p0, p1, ..., p100]) of the label residual, approximate, streaming."""

    def expand(self, summaries):
        return (summaries
                | "BySplit" >> beam.Map(lambda s: (s["split"], s["residual"]))
                | "Quantiles" >> beam.ApproximateQuantiles.PerKey(101))


# ---------------------------------------------------------------- keyed checks

class CountAndExamplesFn(beam.CombineFn):
    """Counts elements and keeps the MAX_EXAMPLES smallest (deterministic whatever the bundling)."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, x):
        return acc[0] + 1, sorted(acc[1] + [x])[:MAX_EXAMPLES]

    def merge_accumulators(self, accs):
        n, ex = 0, []
        for a_n, a_ex in accs:
            n, ex = n + a_n, sorted(ex + a_ex)[:MAX_EXAMPLES]
        return n, ex

    def extract_output(self, acc):
        return {"count": acc[0], "examples": acc[1]}


class ImageCountsFn(beam.CombineFn):
    """Per split: images seen, how many pairs each has, and the images that break the rules.

    Input values: (split, image_id, sorted patch indices); failed_ids: {(split, image_id)} of the images
    listed in failed_images-<split>.jsonl, which must have no pairs.
    """

    def __init__(self, patches_per_image: int, failed_ids: set):
        self._ppi = patches_per_image
        self._failed = frozenset(failed_ids)

    def create_accumulator(self):
        return {"images": 0, "pairs_histogram": {}, "wrong_pairs": Failures(), "failed_with_pairs": Failures()}

    def add_input(self, acc, item):
        split, image_id, indices = item
        acc["images"] += 1
        acc["pairs_histogram"][len(indices)] = acc["pairs_histogram"].get(len(indices), 0) + 1
        if list(indices) != list(range(self._ppi)):
            acc["wrong_pairs"].add((image_id, f"patch indices {list(indices)[:12]}"))
        if (split, image_id) in self._failed:
            acc["failed_with_pairs"].add((image_id, len(indices)))
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for a in accs:
            out["images"] += a["images"]
            for k, v in a["pairs_histogram"].items():
                out["pairs_histogram"][k] = out["pairs_histogram"].get(k, 0) + v
            out["wrong_pairs"].merge(a["wrong_pairs"])
            out["failed_with_pairs"].merge(a["failed_with_pairs"])
        return out

    def extract_output(self, acc):
        return {"images": acc["images"], "patches_per_image": self._ppi,
                "pairs_histogram": {str(k): v for k, v in sorted(acc["pairs_histogram"].items())},
                "wrong_pairs": acc["wrong_pairs"].to_dict(), "failed_with_pairs": acc["failed_with_pairs"].to_dict()}


class _IndicesFn(beam.CombineFn):
    """The patch indices of one image (at most patches_per_image of them in a good dataset)."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, i):
        return acc + [i]

    def merge_accumulators(self, accs):
        return [i for a in accs for i in a]

    def extract_output(self, acc):
        return sorted(acc)


class PairsPerImage(beam.PTransform):
    """Summaries -> {'images': ((split, image_id), [indices]) for Leakage, 'report': (split, counts report)}."""

    def __init__(self, patches_per_image: int, failed_ids: set):
        super().__init__()
        self._fn = ImageCountsFn(patches_per_image, failed_ids)

    def expand(self, summaries):
        images = (summaries
                  | "ByImage" >> beam.Map(lambda s: ((s["split"], s["image_id"]), s["patch_index"]))
                  | "Indices" >> beam.CombinePerKey(_IndicesFn()))
        report = (images
                  | "BySplit" >> beam.Map(lambda kv: (kv[0][0], (kv[0][0], kv[0][1], kv[1])))
                  | "Counts" >> beam.CombinePerKey(self._fn))
        return {"images": images, "report": report}


def _union(sets):
    return frozenset().union(*sets)


class Leakage(beam.PTransform):
    """((split, image_id), _) -> one {'count', 'examples'} of image ids found in more than one split."""

    def expand(self, images):
        return (images
                | "ById" >> beam.Map(lambda kv: (kv[0][1], frozenset([kv[0][0]])))
                | "Splits" >> beam.CombinePerKey(_union)
                | "Shared" >> beam.Filter(lambda kv: len(kv[1]) > 1)
                | "AsExample" >> beam.Map(lambda kv: (kv[0], sorted(kv[1])))
                | "Summarize" >> beam.CombineGlobally(CountAndExamplesFn()).without_defaults())


MAX_TRACKED_IMAGES = 64


class CopiesFn(beam.CombineFn):
    """Copies of one patch_a: how many, from which splits and images (up to MAX_TRACKED_IMAGES), first few."""

    def create_accumulator(self):
        return 0, frozenset(), []

    def add_input(self, acc, x):
        return self.merge_accumulators([acc, (1, frozenset([x[:2]]), [x])])

    def merge_accumulators(self, accs):
        n, images, ex = 0, frozenset(), []
        for a_n, a_images, a_ex in accs:
            n, ex = n + a_n, sorted(ex + a_ex)[:MAX_EXAMPLES]
            images = frozenset(sorted(images | a_images)[:MAX_TRACKED_IMAGES])
        return n, images, ex

    def extract_output(self, acc):
        return {"count": acc[0], "splits": sorted({i[0] for i in acc[1]}), "images": len(acc[1]),
                "examples": [list(e) for e in acc[2]]}


class Duplicates(beam.PTransform):
    """Summaries -> one {'groups', 'extra_copies', 'cross_split_groups', 'examples'} of identical patch_a."""

    def expand(self, summaries):
        return (summaries
                | "ByHash" >> beam.Map(lambda s: (s["hash"], (s["split"], s["image_id"], s["patch_index"])))
                | "Copies" >> beam.CombinePerKey(CopiesFn())
                | "Repeated" >> beam.Filter(lambda kv: kv[1]["count"] > 1)
                | "Summarize" >> beam.CombineGlobally(DuplicateGroupsFn()).without_defaults())


class DuplicateGroupsFn(beam.CombineFn):
    """Groups of identical patch_a, told apart: the same window drawn twice from one image (expected now
    and then: positions are independent draws) vs copies across images or splits (duplicate sources)."""

    _COUNTS = ("groups", "extra_copies", "same_image_groups", "cross_image_groups", "cross_split_groups")

    def create_accumulator(self):
        return dict({k: 0 for k in self._COUNTS}, examples=[])

    def add_input(self, acc, kv):
        digest, copies = kv
        acc["groups"] += 1
        acc["extra_copies"] += copies["count"] - 1
        acc["same_image_groups"] += copies["images"] == 1
        acc["cross_image_groups"] += copies["images"] > 1
        acc["cross_split_groups"] += len(copies["splits"]) > 1
        # examples: cross-image groups first, they are the interesting ones
        example = [int(copies["images"] == 1), digest, copies["count"], copies["examples"]]
        acc["examples"] = sorted(acc["examples"] + [example])[:MAX_EXAMPLES]
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            for k in self._COUNTS:
                out[k] += a[k]
            out["examples"] = sorted(out["examples"] + a["examples"])[:MAX_EXAMPLES]
        return out

    def extract_output(self, acc):
        return dict(acc, examples=[e[1:] for e in acc["examples"]])
