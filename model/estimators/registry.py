"""Method names -> estimators: the base methods, and the grammar that composes them.

  BASE       identity, orb, orb_default, sift, ecc (classical.py, one pair at a time),
             network, network_tta (learned.py, batched)
  X+ecc      X, then its H refined by ECC coarse to fine from there (refine.py); '+ecc' at the end of a
             name refines everything before it: sift_or_network+ecc refines whichever answered
  X_or_Y     X where it succeeds, Y on the pairs where X failed (sift_or_network: SIFT's precision where it
             finds a homography, the network's robustness where it does not)
  auto       the best of network+ecc, network_tta+ecc and sift+ecc on each pair: the candidate whose
             alignment correlates best, all measured on the region where every candidate's warp is defined

Every method maps a batch of pairs (images A and B: arrays (N, P, P, C) of the dataset, or lists of whole
photos) to one Estimate per pair. run() evaluates a list of names on one batch: each part is computed once
and shared (sift, sift+ecc and auto run SIFT once), and each name's cost is its own work plus that of its
parts, as if it had run alone. Adding a method is one function and one line in BASE or CHAINS.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np

from model.estimators import classical, learned, parallel

BASE_NETWORK = ("network", "network_tta")
BASE = tuple(classical.METHODS) + BASE_NETWORK
REFINE, OR = "+ecc", "_or_"
CHAINS = {"auto": ("network+ecc", "network_tta+ecc", "sift+ecc")}  # best of, by correlation
GRAMMAR = (f"a method is one of {', '.join(BASE)}; X+ecc (X, then ECC refinement from its H); "
           f"X_or_Y (X where it succeeds, Y where it fails); "
           + "; ".join(f"{k} (the best of {', '.join(v)} by correlation)" for k, v in CHAINS.items()))


class MethodError(ValueError):
    """An unknown or unusable method name; the message is one line."""


@functools.lru_cache(maxsize=None)
def parse(name: str) -> tuple:
    """The method tree: ('base', name) | ('refine', name, X) | ('or', name, X, Y) | ('best', name, (X, ...))."""
    if name in CHAINS:
        return ("best", name, tuple(parse(c) for c in CHAINS[name]))
    if name in BASE:
        return ("base", name)
    if name.endswith(REFINE) and len(name) > len(REFINE):
        return ("refine", name, parse(name[:-len(REFINE)]))
    left, sep, right = name.partition(OR)
    if sep and left and right:
        return ("or", name, parse(left), parse(right))
    raise MethodError(f"unknown method '{name}': {GRAMMAR}")


def leaves(node: tuple) -> set:
    if node[0] == "base":
        return {node[1]}
    parts = node[2] if node[0] == "best" else node[2:]
    return set().union(*(leaves(p) for p in parts))


def needs_network(name: str) -> bool:
    return bool(leaves(parse(name)) & set(BASE_NETWORK))


def is_chain(name: str) -> bool:
    """Whether the method chooses among members (X_or_Y, a best-of chain): its report says which answered."""
    def walk(node):
        return node[0] in ("or", "best") or (node[0] == "refine" and walk(node[2]))
    return walk(parse(name))


def refines(name: str) -> bool:
    """Whether the method refines (its report counts how often refinement kept the start)."""
    return REFINE in name or parse(name)[0] == "best"


def check(names: list, with_network: bool) -> list:
    """names, each parsed; MethodError (one line) for an unknown name, a repeat, or a network without model."""
    if not names or len(set(names)) != len(names):
        raise MethodError(f"--methods must name each method once, got {','.join(names) or 'nothing'}")
    for name in names:
        parse(name)
    needs = [n for n in names if needs_network(n)]
    if needs and not with_network:
        raise MethodError(f"method '{needs[0]}' needs --model_dir (a training run)")
    return list(names)


@dataclasses.dataclass
class Context:
    """What the methods share: the network (model, rho, its P and channels), whole photos or the dataset's
    patches, the worker pool for per-pair work (None: this process), the network's batch size."""
    model: object = None
    rho: float | None = None
    patch_size: int = 128
    channels: int = 1
    whole: bool = False
    pool: parallel.Pool | None = None
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class Result:
    estimates: list  # one Estimate per pair, in order
    seconds: float   # this method on the batch, its parts included, as if it had run alone


def run(names: list, images_a, images_b, ctx: Context) -> dict:
    """{name: Result} for every name on one batch of pairs."""
    batch = _Batch(images_a, images_b, ctx)
    return {n: Result(batch.estimates(parse(n)), batch.cost[n]) for n in names}


def _take(seq, idx: list):
    return seq[idx] if isinstance(seq, np.ndarray) else [seq[i] for i in idx]


class _Batch:
    def __init__(self, images_a, images_b, ctx: Context):
        self.a, self.b, self.ctx, self.n = images_a, images_b, ctx, len(images_a)
        self.cost, self._cache, self._saved = {}, {}, []

    def estimates(self, node: tuple, idx: list | None = None) -> list:
        """node's estimates on the pairs idx (default: all), from the cache when computed before."""
        name, everything = node[1], idx is None or len(idx) == self.n
        idx = list(range(self.n)) if idx is None else list(idx)
        for key in ((name, None), (name, tuple(idx))):
            if key in self._cache:
                found, cost = self._cache[key]
                self._saved = [s + cost * len(idx) / len(found) for s in self._saved]
                return found if key[1] is not None or everything else [found[i] for i in idx]
        self._saved.append(0.0)
        start = time.perf_counter()
        found = _EVALUATORS[node[0]](self, node, idx) if idx else []
        cost = time.perf_counter() - start + self._saved.pop()
        self._cache[(name, None if everything else tuple(idx))] = (found, cost)
        if everything:
            self.cost[name] = cost
        return found

    def jobs(self, make, idx: list) -> list:
        return parallel.run_jobs([make(self.a[i], self.b[i]) for i in idx], self.ctx.pool)


def _base(batch: _Batch, node: tuple, idx: list) -> list:
    name, ctx = node[1], batch.ctx
    if name in BASE_NETWORK:
        if ctx.model is None:
            raise MethodError(f"method '{name}' needs a model (--model_dir)")
        found = learned.network(_take(batch.a, idx), _take(batch.b, idx), ctx, tta=name == "network_tta")
    else:
        found = batch.jobs(lambda a, b: ("classical", name, a, b, ctx.whole), idx)
    return [dataclasses.replace(e, source=name) for e in found]


def _refine(batch: _Batch, node: tuple, idx: list) -> list:
    starts = iter(batch.estimates(node[2], idx))
    found = batch.jobs(lambda a, b: ("refine", a, b, next(starts), batch.ctx.whole), idx)
    return [e if e.kept_start else dataclasses.replace(e, source=e.source + REFINE) for e in found]


def _or(batch: _Batch, node: tuple, idx: list) -> list:
    first = batch.estimates(node[2], idx)
    failed = [i for i, e in zip(idx, first) if not e.ok]
    second = iter(batch.estimates(node[3], failed) if failed else [])
    return [e if e.ok else next(second) for e in first]


def _best(batch: _Batch, node: tuple, idx: list) -> list:
    candidates = [batch.estimates(c, idx) for c in node[2]]
    per_pair = iter(list(zip(*candidates)))
    scores = batch.jobs(lambda a, b: ("correlations", a, b, [e.homography if e.ok else None
                                                              for e in next(per_pair)]), idx)
    out = []
    for k, score in enumerate(scores):
        usable = [j for j, c in enumerate(candidates) if c[k].ok] or [0]
        best = max(usable, key=lambda j: (score[j] if math.isfinite(score[j]) else -math.inf, -j))
        out.append(candidates[best][k])
    return out


_EVALUATORS = {"base": _base, "refine": _refine, "or": _or, "best": _best}
