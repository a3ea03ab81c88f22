"""The audit's statistics: Beam steps from per-pair summaries (pipeline/auditing/measure.py) to the report.

  SplitStatistics   summaries -> (split, stats) through one streaming CombineFn (memory flat)
  ResidualQuantiles summaries -> (split, 101 approximate percentiles of the label residual)
  PairsPerImage     summaries -> (split, per-image counts report) and the per-image keys for Leakage
  Leakage           per-image keys -> image ids found in more than one split
  Duplicates        summaries -> identical patch_a (by hash), within and across splits

Every step holds per-pair summaries of a few hundred bytes, combined with CombineFns (combiner lifting),
so no step ever collects records or patches in memory.

Portable subset, as in the builder: no side inputs (CombineGlobally without defaults; the driver supplies
the empty result), so Beam 2.77's DaskRunner runs it too. DaskRunner lifts no combiner: each
CombinePerKey gathers its group.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipeline.dataset import geometry

OFFSET_BINS = 32
RESIDUAL_EDGES = np.concatenate([[0.0], np.logspace(-3, np.log10(256.0), 49)])  # [0, 1e-3) holds exact zeros
RESIDUAL_UNITS = {"none": "grey levels", "camera": "relative to the patch's spread, tone undone (measure.py)"}
NEAR_CONSTANT_STD = 2.0  # grey levels: a patch with less spread than this has no usable texture
MAX_EXAMPLES = 5


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


# The top-left heat map has at most this many cells a side: one cell per pixel up to it (the default 320 x 240
# geometry: 129 x 49), else cells of `position_step` px. Per pixel at 8192 px images it was 7,105 x 7,105 int64
# (400 MB an accumulator, copied by every merge and written out as JSON): the audit of such a build passed 6 GB.
MAX_POSITION_CELLS = 256


def position_step(c: geometry.PairConfig) -> int:
    """Pixels a heat map cell spans on each axis (1 when the positions fit MAX_POSITION_CELLS)."""
    span = max(c.image_width, c.image_height) - c.patch_size - 2 * c.rho + 1
    return max(1, -(-span // MAX_POSITION_CELLS))


def position_cells(side: int, c: geometry.PairConfig, step: int) -> int:
    return max(1, -(-(side - c.patch_size - 2 * c.rho + 1) // step))


class SplitStatsFn(beam.CombineFn):
    """Every per-split statistic of the pair summaries in one flat-memory accumulator."""

    def __init__(self, config: geometry.PairConfig, residual_threshold: float):
        self._config = config
        self._threshold = residual_threshold
        self._step = position_step(config)  # once: add_input runs per pair

    def create_accumulator(self):
        c, step = self._config, self._step
        nx, ny = position_cells(c.image_width, c, step), position_cells(c.image_height, c, step)
        return {
            "offsets": Moments(8), "offset_hist": Histogram(8, np.linspace(-c.rho, c.rho, OFFSET_BINS + 1)),
            "top_left": Moments(2), "positions": np.zeros((max(ny, 1), max(nx, 1)), np.int64),
            "image": Moments(4), "near_constant": np.zeros(2, np.int64), "pixels": np.zeros((2, 256), np.int64),
            "residual": Moments(1), "residual_hist": Histogram(1, RESIDUAL_EDGES), "valid_share": Moments(1),
            "offset_range": Failures(), "margins": Failures(), "label": Failures(), "photometric": Failures(),
        }

    def add_input(self, acc, s):
        c, key = self._config, (s["image_id"], s["patch_index"])
        acc["offsets"].add(s["offsets"])
        acc["offset_hist"].add(s["offsets"])
        acc["top_left"].add(s["top_left"])
        if s["corner_problem"] is None:
            step = self._step
            acc["positions"][(int(s["top_left"][1]) - c.rho) // step, (int(s["top_left"][0]) - c.rho) // step] += 1
        else:
            acc["margins"].add(key + (s["corner_problem"],))
        if s.get("photometric_problem") is not None:
            acc["photometric"].add(key + (s["photometric_problem"],))
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
        out["residual_unit"] = RESIDUAL_UNITS[self._config.photometric]
        out["near_constant_std"] = NEAR_CONSTANT_STD
        out["positions_step"] = self._step
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
