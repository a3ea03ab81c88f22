"""Every method on real image pairs with ground-truth homographies (HPatches or Oxford sequences).

  python -m model.evaluate_real --pairs_dir=DIR --output_dir=REPORT [--model_dir=RUN]
                                [--methods=identity,orb,sift,ecc,network] [--direction_check=refuse|warn|off]
                                [--nofigures]

DIR is one sequence or a folder of sequences (layouts: model/evaluation/real_pairs.py). For each pair (1, k) every
method (any name of model.estimators.registry: X+ecc, X_or_Y, auto) estimates H_1_k at the images' own
resolution (model.estimators.photos, A = image k, B = image 1; photos longer than 1600 px are worked on
downscaled, H mapped back exactly): the classical methods on the full images (ECC on a copy at most 320 px
long), the network on both photos squeezed to its P x P input (H = S_a^-1 . H_local . S_b), refinement
(+ecc) from the method's H at full resolution over a pyramid from the images' own size. The score is the mean corner error of image 1
mapped into image k (model.evaluation.real_pairs.corner_error). A method that fails falls back to the identity; the
pair keeps that error and the failure is counted.

Before any method runs, each ground truth is checked for its direction (model.evaluation.real_pairs.direction_scores):
a sequence whose files align the images clearly better inverted or transposed is refused (or, with
--direction_check=warn, evaluated as given and flagged in the report).

Writes REPORT/real_report.json, real_report.md, error_curves.png and figures/<sequence>_1-<k>.png.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags, logging

from model.estimators import parallel, photos, registry
from model.evaluation import real_pairs
from model.evaluation.real_pairs import RealPairsError
from pipeline.runtime import cli

DEFAULT_CLASSICAL = ("identity", "orb", "sift", "ecc")
DIRECTION_MODES = ("refuse", "warn", "off")


def resolve_methods(names: list | None, model_dir: str | None) -> tuple:
    """(method list, model_dir for the network or None). The network runs with --model_dir, else with the
    project's shipped weights; without either it is left out by default and refused when asked for."""
    if names is not None:
        try:
            registry.check(names, with_network=True)
        except registry.MethodError as e:
            raise RealPairsError(str(e)) from None
    network_names = [n for n in names or [] if registry.needs_network(n)]
    if model_dir is None and (names is None or network_names):
        from model import network  # Keras only when the network may run

        model_dir = network.shipped_model_dir()
        if model_dir is None and names is not None:
            raise RealPairsError(f"method(s) {', '.join(network_names)} need "
                                 "--model_dir: the project's shipped weights "
                                 "(data/weights/) are not in this checkout")
    if names is None:
        names = list(DEFAULT_CLASSICAL) + (["network"] if model_dir else [])
    return names, (model_dir if any(registry.needs_network(n) for n in names) else None)


def check_directions(sequences: list, mode: str) -> dict:
    """sequence name -> {k: {'scores', 'verdict'}}; RealPairsError for a wrong direction when mode is refuse."""
    out = {}
    if mode == "off":
        return out
    for seq in sequences:
        gray_1 = real_pairs.read_gray(seq.images[1])
        out[seq.name] = {}
        for k in seq.pairs():
            scores = real_pairs.direction_scores(gray_1, real_pairs.read_gray(seq.images[k]), seq.truths[k])
            verdict = real_pairs.direction_verdict(scores)
            out[seq.name][k] = {"scores": scores, "verdict": verdict}
            if verdict not in ("ok", "inconclusive"):
                message = (f"sequence {seq.name}: the ground truth of pair 1-{k} looks {verdict.replace('_', ' ')} "
                           f"(normalised correlation {scores['given']} as given, {scores[verdict]} {verdict}): "
                           f"the files must map image 1 to image k")
                if mode == "refuse":
                    raise RealPairsError(message + "; --direction_check=warn evaluates it anyway")
                logging.warning(message)
    return out


def _run_pair(seq, k: int, names: list, ctx: registry.Context) -> dict:
    try:
        image_1, image_k = photos.read(seq.images[1], ctx.channels), photos.read(seq.images[k], ctx.channels)
        found = photos.estimate(names, image_k, image_1, ctx)  # A = image k, B = image 1: H is H_1_k
    except (photos.PhotoError, registry.MethodError, parallel.WorkerError) as e:
        raise RealPairsError(f"{seq.name} 1-{k}: {e}") from None
    results = {}
    for name, result in found.items():
        e = result.estimates[0]
        h, ok, reason = (e.homography if e.homography is not None else np.eye(3)), e.ok, e.reason
        error = real_pairs.corner_error(h, seq.truths[k], seq.sizes[1])
        if not np.isfinite(error):  # a corner sent to infinity: a failure, scored as the identity
            h, ok, reason = np.eye(3), False, reason or "corner at infinity"
            error = real_pairs.corner_error(h, seq.truths[k], seq.sizes[1])
        results[name] = {"error": round(error, 3), "ok": bool(ok), "reason": reason,
                         "seconds": round(result.seconds, 4), "homography": np.round(h, 8).tolist(),
                         "answered_by": e.source, "kept_start": e.kept_why if e.kept_start else None,
                         "correlation": None if e.correlation is None else round(e.correlation, 5)}
    return results


def evaluate_real(pairs_dir: str, output_dir: str, *, methods: list | None = None, model_dir: str | None = None,
                  direction_check: str = "refuse", figures: bool = True, command: str = "") -> dict:
    """Evaluates every method on every pair under pairs_dir; writes the report; returns its dict."""
    if direction_check not in DIRECTION_MODES:
        raise RealPairsError(f"direction_check must be one of {', '.join(DIRECTION_MODES)}, got '{direction_check}'")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RealPairsError(f"output_dir {output_dir} is a file, not a folder")
    from pipeline.runtime import outputs

    try:  # the report written into the photographs' own folder would mix with them
        outputs.check_apart(output_dir, {"pairs_dir": pairs_dir})
    except outputs.OutputError as e:
        raise RealPairsError(str(e)) from None
    names, model_dir = resolve_methods(methods, model_dir)
    sequences = real_pairs.discover(pairs_dir)  # every folder read and checked before any work
    directions = check_directions(sequences, direction_check)
    network = None
    if model_dir:
        from model import evaluate

        try:
            network = evaluate.load_run(model_dir)
        except evaluate.EvaluationError as e:
            raise RealPairsError(str(e)) from e
    ctx = registry.Context(whole=True) if network is None else registry.Context(
        model=network[0], rho=float(network[1]["rho"]), patch_size=int(network[1]["patch_size"]),
        channels=int(network[1]["channels"]), whole=True)
    os.makedirs(output_dir, exist_ok=True)
    pairs = []
    for seq in sequences:
        for k in seq.pairs():
            results = _run_pair(seq, k, names, ctx)
            check = directions.get(seq.name, {}).get(k)
            pairs.append({"sequence": seq.name, "group": seq.group, "k": k,
                          "image_1": seq.images[1], "image_k": seq.images[k],
                          "size_1": list(seq.sizes[1]), "size_k": list(seq.sizes[k]),
                          "true_homography": np.round(seq.truths[k], 10).tolist(),
                          "direction_check": check, "methods": results})
            logging.info("%s 1-%d: %s", seq.name, k, ", ".join(f"{n} {r['error']:.2f} px" for n, r in results.items()))
    report = {"command": command, "pairs_dir": os.path.abspath(pairs_dir), "methods": names,
              "model": ({"model_dir": os.path.abspath(model_dir), "patch_size": int(network[1]["patch_size"]),
                         "channels": int(network[1]["channels"]), "rho": float(network[1]["rho"])}
                        if network else None),
              "thresholds_px": list(real_pairs.THRESHOLDS), "auc_thresholds_px": list(real_pairs.AUC_THRESHOLDS),
              "direction_check": direction_check,
              "direction_warnings": [f"{p['sequence']} 1-{p['k']}: {p['direction_check']['verdict']}"
                                     for p in pairs if p["direction_check"]
                                     and p["direction_check"]["verdict"] not in ("ok", "inconclusive")],
              "num_sequences": len(sequences), "num_pairs": len(pairs),
              "overall": _summaries(pairs, names),
              "groups": {g: _summaries([p for p in pairs if p["group"] == g], names)
                         for g in sorted({p["group"] for p in pairs})},
              "sequences": {s.name: {"layout": s.layout, "group": s.group, "path": os.path.abspath(s.path),
                                     "methods": _summaries([p for p in pairs if p["sequence"] == s.name], names)}
                            for s in sequences},
              "pairs": pairs}
    from model.evaluation import real_report  # matplotlib only when writing

    real_report.write(report, output_dir, figures)
    return report


def _summaries(pairs: list, names: list) -> dict:
    out = {}
    for n in names:
        rows = [p["methods"][n] for p in pairs]
        out[n] = real_pairs.summarise([r["error"] for r in rows], [r["ok"] for r in rows], [r["seconds"] for r in rows])
        if registry.refines(n):
            out[n]["refinement_kept_start"] = sum(r["kept_start"] is not None for r in rows)
    return out


FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("pairs_dir", None, "An HPatches or Oxford sequence, or a folder of them")
    flags.DEFINE_string("output_dir", None, "Where the report goes")
    flags.DEFINE_string("model_dir", None, "Training run for the network (default: the shipped weights, if any)")
    flags.DEFINE_list("methods", None, f"Comma list; {registry.GRAMMAR}. Default: identity,orb,sift,ecc, and "
                                       "network when weights are available")
    flags.DEFINE_enum("direction_check", "refuse", list(DIRECTION_MODES),
                      "A ground truth that aligns the images better inverted or transposed: refuse the run, "
                      "warn and evaluate it as given, or do not check")
    flags.DEFINE_bool("figures", True, "Write a figure per pair (image 1's true and estimated outlines in image k)")


def main(argv):
    if len(argv) > 1:
        return cli.fail("model.evaluate_real", f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.pairs_dir or not FLAGS.output_dir:
        return cli.fail("model.evaluate_real", "--pairs_dir and --output_dir are required")
    try:
        report = evaluate_real(FLAGS.pairs_dir, FLAGS.output_dir, methods=FLAGS.methods, model_dir=FLAGS.model_dir,
                               direction_check=FLAGS.direction_check, figures=FLAGS.figures,
                               command=" ".join(["python -m model.evaluate_real"] + sys.argv[1:]))
    except RealPairsError as e:
        return cli.fail("model.evaluate_real", str(e))
    except OSError as e:  # an output_dir that cannot be written
        return cli.fail("model.evaluate_real", f"{e.filename or FLAGS.output_dir}: {e.strerror or e}")
    print(summary_text(report, FLAGS.output_dir))
    return 0


def summary_text(report: dict, output_dir: str) -> str:
    width = max([16] + [len(n) for n in report["overall"]])
    lines = [f"{report['num_pairs']} pairs in {report['num_sequences']} sequence(s) of {report['pairs_dir']}",
             f"{'method':<{width}}   mean   median  <3px   AUC@10  failures  s/pair  kept start"]
    for name, s in report["overall"].items():
        kept = s.get("refinement_kept_start", "")
        lines.append(f"{name:<{width}} {s['mean_error']:>6.2f} {s['median_error']:>7.2f}  {s['accuracy']['3']:.2f}"
                     f"   {s['auc']['10']:.3f}   {s['failures']:>5}   {s['seconds_per_pair']:.3f}   {kept}")
    for w in report["direction_warnings"]:
        lines.append(f"direction warning: {w}")
    lines.append(f"report: {os.path.join(output_dir, 'real_report.md')}")
    return "\n".join(lines)


def run():
    cli.run("model.evaluate_real", main, _define_flags)


if __name__ == "__main__":
    run()
