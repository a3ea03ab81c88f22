"""MACE evaluation of the network and the classical methods on a built split, with figures.

  python -m model.evaluate --data_dir=OUT --split=validation [--model_dir=RUN] --output_dir=REPORT
                           [--methods=identity,orb,sift,ecc,network,network+ecc,auto] [--max_pairs=N]
                           [--num_visualizations=6] [--workers=0]

Any name of model.estimators.registry: the base methods, X+ecc (refined from X's H), X_or_Y, auto.
Without --model_dir only the classical methods run. The per-pair work (classical methods, refinement) runs
over a pool of --workers processes (0: every core), the network batched in this process; the results are
the same, pair for pair, as in one process. Pairs are streamed in the dataset's order (one
deterministic pass through model.training.data.parsed_batches: tf.data on Keras's TensorFlow backend, the
TensorFlow-free reader otherwise); a damaged shard stops it with one line naming the shard and byte offset
(model.training.data.DamagedShardError). Only the predictions and the few pairs to draw are
kept, so a split of any size fits in memory. Writes to output_dir (see model/evaluation/report.py):
mace_report.json, mace_report.md, mace_bar.png, mace_histograms.png, pair_<k>.png.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import sys
import time

import numpy as np
from absl import flags, logging

from model.estimators import parallel, registry
from model.evaluation import report as report_lib
from model.training import run_dir
from pipeline.dataset import geometry
from pipeline.runtime import cli

DEFAULT_CLASSICAL = ("identity", "orb", "sift", "ecc")  # orb_default is on request (--methods)
IDENTITY_MACE_PER_RHO = 0.765  # E|u - 0| over the square [-1, 1]^2: the identity's MACE is 0.765 * rho


# What a report folder holds: an earlier report may be replaced, any other non-empty folder is refused.
REPORT_FILES = (report_lib.JSON_FILE, report_lib.MARKDOWN_FILE, report_lib.BAR_FILE, report_lib.HISTOGRAM_FILE,
                "pair_*.png", "*/" + report_lib.JSON_FILE)  # make demo's reports/sample/shipped beside one


class EvaluationError(ValueError):
    """An evaluation that cannot run; the message names the problem."""


def default_methods(with_network: bool) -> list:
    return list(DEFAULT_CLASSICAL) + (["network", "network_tta"] if with_network else [])


def check_methods(names: list, with_network: bool) -> list:
    try:
        return registry.check(names, with_network)
    except registry.MethodError as e:
        raise EvaluationError(str(e)) from None


def load_run(model_dir: str):
    """(keras model, run config) of a training run, or EvaluationError saying why not."""
    from model import network

    if not os.path.isdir(model_dir):
        raise EvaluationError(f"model_dir {model_dir} does not exist")
    try:
        model, run = network.load(model_dir)
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        raise EvaluationError(f"cannot load a model from {model_dir}: {e}") from e
    missing = [k for k in ("patch_size", "channels", "rho") if k not in run]
    if missing:
        raise EvaluationError(f"the run config of {model_dir} lacks {', '.join(missing)}")
    return model, run


def load_network(model_dir: str, patch_size: int, channels: int):
    """(model, run config) of a training run whose input matches the dataset's patches."""
    model, run = load_run(model_dir)
    # The model's own input shape (P, P, 2C) decides, not only what config.json claims.
    shape = tuple(model.inputs[0].shape)
    got = (int(shape[1]), int(shape[3]) // 2)
    if got != (patch_size, channels) or (int(run["patch_size"]), int(run["channels"])) != got:
        raise EvaluationError(f"the model in {model_dir} takes {got[0]} px patches with {got[1]} channel(s), "
                              f"the dataset has {patch_size} px with {channels}: evaluate it on a dataset built "
                              f"with the same --patch_size and --color")
    return model, run


@dataclasses.dataclass
class _Collected:
    offsets: list = dataclasses.field(default_factory=list)  # (4, 2) per pair
    ok: list = dataclasses.field(default_factory=list)
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # refinement kept its start
    answered_by: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0


def _kind(reason: str) -> str:
    """A reason counted by kind: the text before any detail in parentheses or after ':'."""
    return reason.split(" (")[0].split(":")[0]


def _run_batch(batch: dict, names: list, collected: dict, ctx: registry.Context) -> None:
    try:
        results = registry.run(names, batch["patch_a"], batch["patch_b"], ctx)
    except (registry.MethodError, parallel.WorkerError) as e:
        raise EvaluationError(str(e)) from None
    for name, result in results.items():
        c = collected[name]
        c.seconds += result.seconds
        for e in result.estimates:
            c.offsets.append(e.offsets)
            c.ok.append(e.ok)
            if not e.ok:
                c.reasons[_kind(e.reason)] += 1
            if e.kept_start:
                c.kept[_kind(e.kept_why)] += 1
            c.answered_by[e.source] += 1


def summarise(errors: np.ndarray, ok: np.ndarray, seconds: float, reasons: dict) -> dict:
    """One method's row. Rounded once here: the JSON and the Markdown both print these values."""
    n = len(errors)
    return {"num_pairs": n,
            "mean_mace": round(float(errors.mean()), 3),
            "median_mace": round(float(np.median(errors)), 3),
            "p90_mace": round(float(np.percentile(errors, 90)), 3),
            "under_1px": round(float(np.mean(errors < 1.0)), 4),
            "failure_rate": round(float(1.0 - ok.mean()), 4),
            "failures": int(n - ok.sum()),
            "seconds_per_pair": float(f"{seconds / n:.3g}"),
            "failure_reasons": _by_count(reasons)}


def _by_count(counter: dict) -> dict:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _summary(name: str, errors: np.ndarray, c: _Collected) -> dict:
    """summarise() plus, for a refined method, how often refinement kept the start (and why), and for a
    chain, which of its members answered."""
    out = summarise(errors, np.asarray(c.ok), c.seconds, c.reasons)
    if registry.refines(name):
        out["refinement_kept_start"] = int(sum(c.kept.values()))
        out["refinement_kept_reasons"] = _by_count(c.kept)
    if registry.is_chain(name):
        out["answered_by"] = _by_count(c.answered_by)
    return out


# A batch's bounds (README, "What the commands promise"): --batch_size=1000000 on 65,536 pairs held them all and
# passed 8 GiB. 128 pairs: twice the default; 64 MiB of patches: 10 pairs of 1024 px colour.
MAX_BATCH = 128
MAX_BATCH_BYTES = 64 << 20


def evaluate(data_dir: str, split: str, output_dir: str, *, model_dir: str | None = None,
             methods: list | None = None, max_pairs: int = 0, num_visualizations: int = 6,
             batch_size: int = 64, log_every: int = 100, command: str | None = None, workers: int = 0) -> dict:
    """Runs every method on the split's pairs, writes the report files, returns the report dict.

    workers: processes for the per-pair work (classical methods, refinement); 0 = every core, 1 = this
    process alone (the same results either way; the network stays batched here).
    Raises model.training.data.DatasetError (missing index, unknown or empty split) or EvaluationError.
    """
    from model.training import data

    # None: the defaults; an empty --methods= is refused by check (never silently the defaults)
    names = check_methods(list(methods) if methods is not None else default_methods(bool(model_dir)), bool(model_dir))
    cfg = data.dataset_config(data_dir, split)
    if max_pairs < 0 or num_visualizations < 0 or workers < 0:
        raise EvaluationError("--max_pairs, --num_visualizations and --workers must be >= 0")
    if batch_size < 1:
        raise EvaluationError(f"--batch_size must be >= 1, got {batch_size}")
    pair_bytes = 2 * cfg.patch_size ** 2 * cfg.channels
    most = max(1, min(MAX_BATCH, MAX_BATCH_BYTES // pair_bytes))
    if batch_size > most:  # a batch is read whole, made float32 and given to the network at once
        raise EvaluationError(f"--batch_size {batch_size}: at most {most} pairs of {cfg.patch_size} px are read "
                              f"at a time ({MAX_BATCH} pairs, {MAX_BATCH_BYTES >> 20} MiB of patches)")
    from pipeline.runtime import outputs

    try:  # a file, a folder that cannot be written: refused before any work (a report folder is reused)
        outputs.check_output_dir(output_dir, must_be_empty=False, inputs={"data_dir": data_dir},
                                 reuse_if=REPORT_FILES)
    except outputs.OutputError as e:
        raise EvaluationError(str(e)) from None
    model, run = (None, None)
    if any(registry.needs_network(n) for n in names):
        model, run = load_network(model_dir, cfg.patch_size, cfg.channels)
    workers = workers or parallel.default_workers()
    with parallel.Pool(workers) as pool:
        ctx = registry.Context(model=model, rho=float(run["rho"]) if run else None, patch_size=cfg.patch_size,
                               channels=cfg.channels, pool=pool, batch_size=batch_size)
        return _evaluate(data, cfg, names, ctx, data_dir, split, output_dir, model_dir, run, max_pairs,
                         num_visualizations, batch_size, log_every, command)


def _evaluate(data, cfg, names, ctx, data_dir, split, output_dir, model_dir, run, max_pairs, num_visualizations,
              batch_size, log_every, command) -> dict:
    total = min(max_pairs, cfg.num_examples) if max_pairs else cfg.num_examples
    # Pairs to draw: spread evenly over the evaluated pairs, so they come from different images.
    show = sorted(set(np.linspace(0, total - 1, num_visualizations).round().astype(int).tolist())) \
        if num_visualizations else []
    kept = {}
    true_offsets, collected = [], {n: _Collected() for n in names}
    logging.info("evaluating %s on %d pairs of %s/%s (%d worker process(es))", ", ".join(names), total, data_dir,
                 split, ctx.pool.workers)
    started, seen, next_log = time.time(), 0, log_every
    fingerprint = hashlib.blake2b(digest_size=16)
    for batch in _batches(data, data_dir, split, batch_size):
        batch = {k: v[:total - seen] for k, v in batch.items()}
        for key in ("patch_a", "patch_b", "offsets"):  # the pairs themselves, in order: model.ship's "same pairs"
            fingerprint.update(np.ascontiguousarray(batch[key]).tobytes())
        _run_batch(batch, names, collected, ctx)
        true_offsets.extend(batch["offsets"].reshape(-1, 4, 2))
        for i in show:
            if seen <= i < seen + len(batch["offsets"]):
                kept[i] = {k: batch[k][i - seen] for k in ("patch_a", "patch_b", "image_id", "patch_index")}
        seen += len(batch["offsets"])
        if seen >= next_log or seen >= total:
            logging.info("  %d/%d pairs (%.1f pairs/s)", seen, total, seen / max(time.time() - started, 1e-9))
            next_log += log_every
        if seen >= total:
            break

    true_offsets = np.asarray(true_offsets, np.float32)
    errors = {n: geometry.mace(np.asarray(collected[n].offsets), true_offsets) for n in names}
    rho = cfg.rho
    report = {
        "dataset": {"data_dir": data_dir, "split": split, "num_examples": cfg.num_examples,
                    "config": _full_config(data_dir)},
        "model": ({"model_dir": model_dir, **{k: run.get(k) for k in ("rho", "patch_size", "channels",
                                                                        "architecture", "steps")},
                   "weights_sha256": run_dir.weights_digest(model_dir)}
                  if run else None),
        "num_pairs": int(seen),
        "pairs_fingerprint": fingerprint.hexdigest(),
        "methods": {n: _summary(n, errors[n], collected[n]) for n in names},
        "workers": ctx.pool.workers,
        "identity_check": {"expected_mace": round(IDENTITY_MACE_PER_RHO * rho, 3),
                           "measured_mace": round(float(geometry.mace(np.zeros_like(true_offsets),
                                                                      true_offsets).mean()), 3)},
        "figures": {},
        "command": command,  # the CLI's command line; None for a library call
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write(report, errors, true_offsets, collected, kept, output_dir)
    return report


def _batches(data, data_dir: str, split: str, batch_size: int):
    """data.parsed_batches, with a damaged shard reported as DamagedShardError (shard and byte offset)."""
    try:
        yield from data.parsed_batches(data_dir, split, batch_size)
    except Exception as e:
        damaged = data.damaged_shard(e, data_dir, split)
        if damaged is None:
            raise
        raise damaged from None


def _full_config(data_dir: str) -> dict:
    """The generation config of homography_index.json (patch_size, rho, image size, channels, pairs/image, seed)."""
    from pipeline.dataset import dataset_info

    return dict(dataset_info.read(data_dir).raw["config"])


def _write(report: dict, errors: dict, true_offsets: np.ndarray, collected: dict, kept: dict,
           output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    figures = report["figures"]
    figures["bar"] = report_lib.BAR_FILE
    report_lib.bar_chart(report, os.path.join(output_dir, report_lib.BAR_FILE))
    figures["histograms"] = report_lib.HISTOGRAM_FILE
    report_lib.histograms(report, errors, os.path.join(output_dir, report_lib.HISTOGRAM_FILE))
    figures["pairs"] = []
    for i, pair in sorted(kept.items()):
        name = f"pair_{i:05d}.png"
        preds = {n: (collected[n].offsets[i], float(errors[n][i])) for n in errors}
        report_lib.pair_figure(pair["patch_a"], pair["patch_b"], true_offsets[i], preds,
                               f"pair {i}: image {int(pair['image_id'])}, patch {int(pair['patch_index'])}",
                               os.path.join(output_dir, name))
        figures["pairs"].append(name)
    report_lib.write_json(report, output_dir)
    report_lib.write_markdown(report, output_dir)


def summary_text(report: dict, output_dir: str) -> str:
    width = max(len(n) for n in report["methods"])
    lines = [f"MACE on {report['num_pairs']} pairs of {report['dataset']['data_dir']}/{report['dataset']['split']} "
             f"(rho {report['dataset']['config']['rho']}):"]
    for name, m in report["methods"].items():
        lines.append(f"  {name:<{width}}  mean {m['mean_mace']:7.3f}  median {m['median_mace']:7.3f}  "
                     f"p90 {m['p90_mace']:7.3f} px  failures {100 * m['failure_rate']:5.1f}%  "
                     f"{1000 * m['seconds_per_pair']:.2f} ms/pair")
    ident = report["identity_check"]
    lines.append(f"  identity expected 0.765 * rho = {ident['expected_mace']} px, measured {ident['measured_mace']} px")
    lines.append(f"report: {os.path.join(output_dir, report_lib.MARKDOWN_FILE)}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags():
    """Defined when the CLI runs, not at import: other modules (pipeline.build, model.train) use the same names."""
    flags.DEFINE_string("data_dir", None, "Built dataset (holds homography_index.json)")
    flags.DEFINE_string("split", "validation", "Split to evaluate on")
    flags.DEFINE_string("model_dir", None, "Training run (model.keras + config.json); omit for the classical methods alone")
    flags.DEFINE_string("output_dir", None, "Where the report files go")
    flags.DEFINE_list("methods", None, f"Comma list; {registry.GRAMMAR}. Default: {', '.join(DEFAULT_CLASSICAL)} "
                                       f"(+ network, network_tta with --model_dir)")
    flags.DEFINE_integer("max_pairs", 0, "Evaluate only the first N pairs; 0 = all")
    flags.DEFINE_integer("num_visualizations", 6, "Pairs drawn with every method's quadrilateral")
    flags.DEFINE_integer("batch_size", 64, "Pairs read (and given to the network) at a time")
    flags.DEFINE_integer("log_every", 100, "Log progress every N pairs")
    flags.DEFINE_integer("workers", 0, "Processes for the per-pair work (classical methods, refinement): "
                                       "0 = every core, 1 = this process alone; the results are the same")


def _fail(message: str) -> int:
    return cli.fail("model.evaluate", message)


def main(argv):
    if len(argv) > 1:
        return _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.data_dir or not FLAGS.output_dir:
        return _fail("--data_dir and --output_dir are required")
    from model.training.data import DatasetError

    try:
        report = evaluate(FLAGS.data_dir, FLAGS.split, FLAGS.output_dir, model_dir=FLAGS.model_dir,
                          methods=FLAGS.methods, max_pairs=FLAGS.max_pairs,
                          num_visualizations=FLAGS.num_visualizations, batch_size=FLAGS.batch_size,
                          log_every=FLAGS.log_every, workers=FLAGS.workers,
                          command=" ".join(["python -m model.evaluate", *sys.argv[1:]]))
    except (EvaluationError, DatasetError) as e:
        return _fail(str(e))
    print(summary_text(report, FLAGS.output_dir))
    return 0


def run():
    cli.run("model.evaluate", main, _define_flags)


if __name__ == "__main__":
    run()
