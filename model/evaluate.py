"""MACE evaluation of the network and the classical methods on a built split, with figures.

  python -m model.evaluate --data_dir=OUT --split=validation [--model_dir=RUN] --output_dir=REPORT
                           [--methods=identity,orb,sift,ecc,network] [--max_pairs=N] [--num_visualizations=6]

Without --model_dir only the classical methods run. Pairs are streamed in the dataset's order (one
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

from model.estimators import methods as methods_lib
from model.evaluation import report as report_lib
from model.training import run_dir
from pipeline.dataset import geometry
from pipeline.runtime import cli

IDENTITY_MACE_PER_RHO = 0.765  # E|u - 0| over the square [-1, 1]^2: the identity's MACE is 0.765 * rho


class EvaluationError(ValueError):
    """An evaluation that cannot run; the message names the problem."""


def default_methods(with_network: bool) -> list:
    return list(methods_lib.DEFAULT_CLASSICAL) + (["network", "network_tta"] if with_network else [])


def check_methods(names: list, with_network: bool) -> list:
    unknown = [n for n in names if n not in methods_lib.ALL_METHODS]
    if unknown:
        raise EvaluationError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(methods_lib.ALL_METHODS)}")
    needs = [n for n in names if n in methods_lib.NETWORK_METHODS]
    if needs and not with_network:
        raise EvaluationError(f"method '{needs[0]}' needs --model_dir (a training run)")
    if not names or len(set(names)) != len(names):
        raise EvaluationError(f"--methods must name each method once, got {','.join(names) or 'nothing'}")
    return names


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
    seconds: float = 0.0


def _network(model, a, b, model_rho: float, tta: bool = False):
    """(offsets (N, 4, 2), finite (N,)): a diverged model's non-finite outputs become the identity."""
    out = (methods_lib.network_offsets_tta if tta else methods_lib.network_offsets)(model, a, b, model_rho)
    finite = np.isfinite(out).all(axis=(1, 2))
    out[~finite] = 0.0
    return out, finite


def _run_batch(batch: dict, names: list, collected: dict, model, model_rho: float) -> None:
    a, b = batch["patch_a"], batch["patch_b"]
    for name in names:
        start = time.perf_counter()
        if name in ("network", "network_tta"):
            out, finite = _network(model, a, b, model_rho, tta=name == "network_tta")
            collected[name].offsets.extend(out)
            collected[name].ok.extend(finite.tolist())
            if not finite.all():
                collected[name].reasons["non-finite output"] += int((~finite).sum())
        else:
            net = _network(model, a, b, model_rho)[0] if name == "sift_or_network" else None
            for i, (pa, pb) in enumerate(zip(a, b)):
                e = methods_lib.sift_or_network(pa, pb, net[i]) if net is not None else methods_lib.estimate(name, pa, pb)
                collected[name].offsets.append(e.offsets)
                collected[name].ok.append(e.ok)
                if not e.ok:  # counted by kind: the text before any detail in parentheses or after ':'
                    collected[name].reasons[e.reason.split(" (")[0].split(":")[0]] += 1
        collected[name].seconds += time.perf_counter() - start


def summarise(errors: np.ndarray, ok: np.ndarray, seconds: float, reasons: dict) -> dict:
    """One method's row. Rounded once here: the JSON and the Markdown both print these values."""
    n = len(errors)
    return {"num_pairs": n,
            "mean_mace": round(float(errors.mean()), 3),
            "median_mace": round(float(np.median(errors)), 3),
            "p90_mace": round(float(np.percentile(errors, 90)), 3),
            "failure_rate": round(float(1.0 - ok.mean()), 4),
            "failures": int(n - ok.sum()),
            "seconds_per_pair": float(f"{seconds / n:.3g}"),
            "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def evaluate(data_dir: str, split: str, output_dir: str, *, model_dir: str | None = None,
             methods: list | None = None, max_pairs: int = 0, num_visualizations: int = 6,
             batch_size: int = 64, log_every: int = 100, command: str | None = None) -> dict:
    """Runs every method on the split's pairs, writes the report files, returns the report dict.

    Raises model.training.data.DatasetError (missing index, unknown or empty split) or EvaluationError.
    """
    from model.training import data

    cfg = data.dataset_config(data_dir, split)
    names = check_methods(list(methods) if methods else default_methods(bool(model_dir)), bool(model_dir))
    if max_pairs < 0 or num_visualizations < 0:
        raise EvaluationError("--max_pairs and --num_visualizations must be >= 0")
    model, run = (None, None)
    if set(names) & set(methods_lib.NETWORK_METHODS):
        model, run = load_network(model_dir, cfg.patch_size, cfg.channels)
    total = min(max_pairs, cfg.num_examples) if max_pairs else cfg.num_examples
    # Pairs to draw: spread evenly over the evaluated pairs, so they come from different images.
    show = sorted(set(np.linspace(0, total - 1, num_visualizations).round().astype(int).tolist())) \
        if num_visualizations else []
    kept = {}
    true_offsets, collected = [], {n: _Collected() for n in names}
    logging.info("evaluating %s on %d pairs of %s/%s", ", ".join(names), total, data_dir, split)
    started, seen, next_log = time.time(), 0, log_every
    fingerprint = hashlib.blake2b(digest_size=16)
    for batch in _batches(data, data_dir, split, batch_size):
        batch = {k: v[:total - seen] for k, v in batch.items()}
        for key in ("patch_a", "patch_b", "offsets"):  # the pairs themselves, in order: model.ship's "same pairs"
            fingerprint.update(np.ascontiguousarray(batch[key]).tobytes())
        _run_batch(batch, names, collected, model, float(run["rho"]) if run else 0.0)
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
        "methods": {n: summarise(errors[n], np.asarray(collected[n].ok), collected[n].seconds,
                                  collected[n].reasons) for n in names},
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
    flags.DEFINE_list("methods", None, f"Comma list from {', '.join(methods_lib.ALL_METHODS)}; "
                                       f"default: {', '.join(methods_lib.DEFAULT_CLASSICAL)} (+ network with --model_dir)")
    flags.DEFINE_integer("max_pairs", 0, "Evaluate only the first N pairs; 0 = all")
    flags.DEFINE_integer("num_visualizations", 6, "Pairs drawn with every method's quadrilateral")
    flags.DEFINE_integer("batch_size", 64, "Pairs read (and given to the network) at a time")
    flags.DEFINE_integer("log_every", 100, "Log progress every N pairs")


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
                          log_every=FLAGS.log_every,
                          command=" ".join(["python -m model.evaluate", *sys.argv[1:]]))
    except (EvaluationError, DatasetError) as e:
        return _fail(str(e))
    print(summary_text(report, FLAGS.output_dir))
    return 0


def run():
    cli.run("model.evaluate", main, _define_flags)


if __name__ == "__main__":
    run()
