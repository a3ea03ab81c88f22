"""The seed's experiments in one runner: rho sweep, dropout / batch-norm ablation, MobileNetV2 transfer
learning, transfer from our own network, colour input; one report.

  python -m model.experiments --coco_dir=DIR --output_dir=EXP [--scale=smoke|full] [--variants=a,b,...]
                              [--tower_weights=PATH|imagenet] [--tower_frozen_layers=130] [--tower_l2=0.01]
                              [--finetune_frozen_convs=4] [--steps=N] [--splits=train=...,validation=...]
                              [--architecture=homographynet|compact] [--bn_momentum=0.99]
                              [any Beam flag, e.g. --direct_num_workers]

What runs is in model/sweep/plan.py (scales, variants), the report in model/sweep/report.py.
--architecture=compact puts the compact network (model.network.build_compact) in every HomographyNet
variant; each run records it in config.json as model.train does. Everything goes through the project's library functions (pipeline.build.build, model.train.train,
model.evaluate.evaluate). Layout of EXP:

  data/rho<R>_<gray|color>/       one dataset per distinct (rho, channels), reused by every variant
  data/rho<R>_<gray|color>.done.json
  classical/rho<R>_<...>/         identity, ORB, SIFT, ECC on that dataset's validation split (+ .done.json)
  runs/<variant>/run/             the training run (an interrupted one resumes from its checkpoints)
  runs/<variant>/eval/            the network's evaluation
  runs/<variant>/result.json      written last: a variant that has it is complete and skipped on a rerun
  experiments.log.jsonl           one line per step run or skipped
  report.md, report.json, mace_vs_rho.png, ablation.png, transfer_curves.png

Each *.done.json / result.json holds the settings it was made with; a rerun with other settings stops
with a message instead of mixing results (use another output_dir, or remove that folder).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from absl import flags, logging

from model import network
from model.sweep import report as experiments_report
from model.sweep.plan import (SCALES, VARIANTS, VARIANTS_BY_NAME, ExperimentError, Scale,  # noqa: F401
                              Settings, Variant, select)
from model.sweep.report import (ABLATION, ABLATION_PLOT, CLASSICAL_METHODS, REPORT_JSON,  # noqa: F401
                                REPORT_MD, RHO_PLOT, TRANSFER_PLOT, markdown)
from pipeline.runtime import cli

LOG_FILE = "experiments.log.jsonl"


# ---------------------------------------------------------------------------------------------- bookkeeping

def _log(s: Settings, event: str, what: str, **extra) -> None:
    """One line per step of the sweep (what ran or was skipped): the evidence a rerun resumes."""
    os.makedirs(s.output_dir, exist_ok=True)
    with open(os.path.join(s.output_dir, LOG_FILE), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, "what": what, **extra}) + "\n")
    logging.info("experiments: %s %s %s", event, what, extra or "")


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # atomic: a marker is either whole or absent


def _completed(path: str, spec: dict):
    """The stored result of a step done with the same spec; None if not done; ExperimentError if done differently."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("spec") != spec:
        diff = sorted(k for k in set(spec) | set(done.get("spec", {})) if spec.get(k) != done.get("spec", {}).get(k))
        raise ExperimentError(f"{path} was made with other settings (differs in: {', '.join(diff)}); "
                              f"use another --output_dir or remove {os.path.dirname(path)}")
    return done


def _spec(obj) -> dict:
    return json.loads(json.dumps(obj))  # what JSON gives back (tuples -> lists), so specs compare equal


# ---------------------------------------------------------------------------------------------- the steps

def dataset_name(rho: int, channels: int) -> str:
    return f"rho{rho}_{'color' if channels == 3 else 'gray'}"


def ensure_dataset(s: Settings, rho: int, channels: int) -> str:
    """Builds data/rho<R>_<gray|color> once (pipeline.build); returns its folder."""
    from pipeline.build import build
    from pipeline.dataset import schema
    from pipeline.dataset.geometry import PairConfig

    name = dataset_name(rho, channels)
    out = os.path.join(s.output_dir, "data", name)
    config = PairConfig(patch_size=s.scale.patch_size, rho=rho, image_width=s.scale.image_width,
                        image_height=s.scale.image_height, channels=channels,
                        patches_per_image=s.scale.patches_per_image, seed=0)
    spec = _spec({"coco_dir": os.path.abspath(s.coco_dir), "splits": s.scale.splits, "max_images": s.scale.max_images,
                  "config": dataclasses.asdict(config)})
    marker = out + ".done.json"
    # A dataset built before the index moved to schema.INDEX has a marker but no index: rebuilt.
    if _completed(marker, spec) and os.path.exists(os.path.join(out, schema.INDEX)):
        _log(s, "skip", f"dataset {name}")
        return out
    t0 = time.time()
    info = build(s.coco_dir, out, s.scale.splits, config, max_images=s.scale.max_images, overwrite=True,
                 beam_args=list(s.beam_args))
    seconds = round(time.time() - t0, 1)
    _write_json(marker, {"spec": spec, "seconds": seconds,
                         "num_examples": {k: v["num_examples"] for k, v in info["splits"].items()}})
    _log(s, "build", f"dataset {name}", seconds=seconds)
    return out


def ensure_classical(s: Settings, data_dir: str) -> dict:
    """The classical methods on a dataset's validation split (model.evaluate), once; returns their rows."""
    from model import evaluate

    name = os.path.basename(data_dir)
    out = os.path.join(s.output_dir, "classical", name)
    spec = _spec({"data_dir": os.path.abspath(data_dir), "methods": CLASSICAL_METHODS,
                  "max_pairs": s.scale.eval_max_pairs})
    marker = out + ".done.json"
    done = _completed(marker, spec)
    if done:
        _log(s, "skip", f"classical {name}")
        return done["methods"]
    t0 = time.time()
    report = evaluate.evaluate(data_dir, "validation", out, methods=list(CLASSICAL_METHODS),
                               max_pairs=s.scale.eval_max_pairs, num_visualizations=s.scale.num_visualizations)
    seconds = round(time.time() - t0, 1)
    _write_json(marker, {"spec": spec, "seconds": seconds, "num_pairs": report["num_pairs"],
                         "methods": report["methods"]})
    _log(s, "evaluate", f"classical {name}", seconds=seconds)
    return report["methods"]


def architecture_options(s: Settings, v: Variant) -> dict:
    """network.build options of a variant (the towers' settings, or the run it starts from and what it freezes;
    --bn_momentum as model.train passes it, recorded only when not Keras's default so earlier sweeps still match)."""
    if v.architecture == "mobilenetv2_towers":
        return {"frozen_layers": s.tower_frozen_layers, "l2": s.tower_l2, "alpha": s.scale.tower_alpha,
                "weights": s.tower_weights or None}
    options = {"bn_momentum": s.bn_momentum} if s.bn_momentum != 0.99 else {}
    if v.init_from:
        options.update(init_from=os.path.abspath(run_dir(s, v.init_from)),
                       freeze=network.first_convs(s.finetune_frozen_convs, v.batchnorm))
    return options


def tower_weights_text(weights: str) -> str:
    if not weights:
        return "random initialisation (no --tower_weights given; 'imagenet' needs a machine that can download)"
    return "ImageNet (keras.applications)" if weights == "imagenet" else f"from {weights}"


def variant_dir(s: Settings, name: str) -> str:
    return os.path.join(s.output_dir, "runs", name)


def run_dir(s: Settings, name: str) -> str:
    return os.path.join(variant_dir(s, name), "run")


def run_variant(s: Settings, v: Variant) -> dict:
    """Trains (or resumes) and evaluates one variant, unless its result.json says it is done."""
    from model import evaluate, train

    rho = s.scale.rho(v.rho)
    options = architecture_options(s, v)
    train_args = {**s.scale.train, "architecture": s.network_of(v), "dropout": v.dropout, "batchnorm": v.batchnorm}
    spec = _spec({"variant": dataclasses.asdict(v), "rho": rho, "scale": dataclasses.asdict(s.scale),
                  "train": train_args, "architecture_options": options, "coco_dir": os.path.abspath(s.coco_dir)})
    result_path = os.path.join(variant_dir(s, v.name), "result.json")
    done = _completed(result_path, spec)
    if done:
        _log(s, "skip", f"variant {v.name}")
        return done
    data_dir = ensure_dataset(s, rho, v.channels)
    classical = ensure_classical(s, data_dir)
    if v.init_from and not os.path.exists(os.path.join(variant_dir(s, v.init_from), "result.json")):
        raise ExperimentError(f"variant {v.name} starts from {v.init_from}, which is not complete")

    t0 = time.time()
    summary = train.train(data_dir, run_dir(s, v.name), architecture_options=options, **train_args)
    train_call = round(time.time() - t0, 1)
    _log(s, "train", f"variant {v.name}", seconds=train_call, steps=f"{summary['start_step']}->{summary['final_step']}")

    t0 = time.time()
    report = evaluate.evaluate(data_dir, "validation", os.path.join(variant_dir(s, v.name), "eval"),
                               model_dir=run_dir(s, v.name), methods=["network"],
                               max_pairs=s.scale.eval_max_pairs, num_visualizations=s.scale.num_visualizations)
    _log(s, "evaluate", f"variant {v.name}", seconds=round(time.time() - t0, 1))

    model, _ = network.load(run_dir(s, v.name))
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    with open(os.path.join(run_dir(s, v.name), "history.json")) as f:
        history = json.load(f)
    last_val = [r for r in history if r.get("val_mace") is not None]
    result = {"spec": spec, "variant": v.name, "group": v.group, "description": v.description,
              "paper_rho": v.rho, "rho": rho, "channels": v.channels, "input_channels": 2 * v.channels,
              "architecture": s.network_of(v), "dropout": v.dropout, "batchnorm": v.batchnorm,
              "architecture_options": options, "data_dir": data_dir, "run_dir": run_dir(s, v.name),
              "steps": summary["final_step"], "batch_size": train_args["batch_size"],
              "parameters": int(model.count_params()), "trainable_parameters": int(trainable),
              "train_seconds": history[-1]["elapsed_s"] if history else None, "train_call_seconds": train_call,
              "final_train_mace": history[-1]["train_mace"] if history else None,
              "final_val_mace": last_val[-1]["val_mace"] if last_val else None,
              "mace": report["methods"]["network"], "num_pairs": report["num_pairs"],
              "classical": {m: classical[m] for m in ("identity", "orb") if m in classical}}
    if v.architecture == "mobilenetv2_towers":
        result["tower_weights"] = tower_weights_text(s.tower_weights)
    _write_json(result_path, result)  # last: from here on the variant counts as complete
    return result


def check_tower_weights(s: Settings) -> None:
    """Fails before any work when the towers' weights cannot be had (no such file; 'imagenet' offline)."""
    if not s.tower_weights:
        return
    if s.tower_weights != "imagenet":
        if not os.path.exists(s.tower_weights):
            raise ExperimentError(f"--tower_weights {s.tower_weights}: no such file")
        return
    import keras

    try:  # downloads into ~/.keras once; the towers then load from there
        keras.applications.MobileNetV2(input_shape=(s.scale.patch_size,) * 2 + (3,), alpha=s.scale.tower_alpha,
                                       include_top=False, weights="imagenet")
    except Exception as e:  # Keras raises a bare Exception for a failed download
        raise ExperimentError(f"--tower_weights=imagenet: cannot get the ImageNet weights ({e}); pass a weights "
                              f"file, or no --tower_weights for random towers") from e


def run_sweep(s: Settings, variants=None) -> dict:
    """Every selected variant (datasets built and classical methods run on the way), then the report."""
    t0 = time.time()
    chosen = select(variants)
    if any(v.architecture == "mobilenetv2_towers" for v in chosen):
        check_tower_weights(s)
    _log(s, "start", f"sweep {s.scale_name}", variants=[v.name for v in chosen])
    results = [run_variant(s, v) for v in chosen]
    classical = {}
    for data_dir in sorted({r["data_dir"] for r in results}):
        classical[os.path.basename(data_dir)] = ensure_classical(s, data_dir)
    report = write_report(s, results, classical)
    _log(s, "done", f"sweep {s.scale_name}", seconds=round(time.time() - t0, 1))
    return report


# ---------------------------------------------------------------------------------------------- the report

def report_notes(s: Settings, results: list) -> list:
    notes = []
    if s.scale_name == "smoke":
        notes.append("Smoke scale: 32 px patches, a few hundred pairs, about a hundred steps. These MACE figures show "
                     "that every variant runs end to end; they say nothing about the methods' accuracy (a network this "
                     "briefly trained predicts close to zero offsets, i.e. about the identity). ORB, SIFT and ECC "
                     "mostly fail on 32 px patches (failures column) and fall back to the identity.")
    if s.architecture != "homographynet":
        notes.append(f"Network: --architecture={s.architecture} for every HomographyNet variant (rho, ablation, "
                     f"fine-tuning, colour); the MobileNetV2 towers keep their own.")
    if any(r["architecture"] == "mobilenetv2_towers" for r in results):
        notes.append(f"MobileNetV2 towers: weights {tower_weights_text(s.tower_weights)}; first "
                     f"{s.tower_frozen_layers} layers of each tower frozen; dense 1024 with L2 {s.tower_l2}; "
                     f"alpha {s.scale.tower_alpha}.")
    for r in results:
        if r["architecture_options"].get("init_from"):
            notes.append(f"{r['variant']}: starts from {r['architecture_options']['init_from']}, frozen layers "
                         f"{', '.join(r['architecture_options']['freeze'])}.")
    return notes


def write_report(s: Settings, results: list, classical: dict) -> dict:
    return experiments_report.write_report(s, results, classical, report_notes(s, results))


# ---------------------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def _define_flags():
    """Defined when the CLI runs, not at import (pipeline.build and model.train use the same names)."""
    flags.DEFINE_string("coco_dir", None, "COCO 2017 root (train2017/, val2017/, annotations/)")
    flags.DEFINE_string("output_dir", None, "Sweep folder: datasets, runs, report; reused to resume")
    flags.DEFINE_string("splits", "", "OUTPUT_SPLIT=COCO_SPLIT list (train and validation); default: the scale's "
                        "(full: train=test2017,validation=val2017; smoke: train=train2017,validation=val2017)")
    flags.DEFINE_enum("scale", "smoke", list(SCALES), "smoke: this CPU in minutes; full: the paper's schedule (GPU)")
    flags.DEFINE_list("variants", None, f"Comma list of {', '.join(VARIANTS_BY_NAME)}; default: all")
    flags.DEFINE_string("tower_weights", "", "MobileNetV2 tower weights: a headless weights file, 'imagenet' "
                        "(downloads), or empty for random towers")
    flags.DEFINE_integer("tower_frozen_layers", network.TOWER_FROZEN_LAYERS, "Layers frozen at the start of each tower")
    flags.DEFINE_float("tower_l2", network.TOWER_L2, "L2 regularisation of the towers' dense 1024 layer")
    flags.DEFINE_integer("finetune_frozen_convs", 4, "Convolutions (with their batch norm) frozen when fine-tuning "
                         "from the rho 20 network")
    flags.DEFINE_integer("steps", 0, "Training steps of every variant; 0 = the scale's (lr decay at 1/3 of them)")
    flags.DEFINE_enum("architecture", "homographynet", ["homographynet", "compact"], "Network of the HomographyNet "
                      "variants (rho, ablation, fine-tuning, colour), as model.train's --architecture; the towers "
                      "variant keeps MobileNetV2")
    flags.DEFINE_float("bn_momentum", 0.99, "Batch norm momentum of those networks, as model.train's --bn_momentum")


def settings_from_flags(beam_args: list) -> Settings:
    from pipeline.build import parse_splits

    scale = SCALES[FLAGS.scale]
    if FLAGS.splits:
        splits = parse_splits(FLAGS.splits)
        if set(splits) != {"train", "validation"}:
            raise ExperimentError(f"--splits must name the splits train and validation, got {', '.join(splits)}")
        scale = dataclasses.replace(scale, splits=splits)
    if FLAGS.steps:
        scale = dataclasses.replace(scale, train={**scale.train, "steps": FLAGS.steps,
                                                  "lr_decay_steps": max(1, FLAGS.steps // 3),
                                                  "checkpoint_every": min(scale.train["checkpoint_every"], FLAGS.steps)})
    return Settings(FLAGS.coco_dir, FLAGS.output_dir, scale, FLAGS.scale, FLAGS.tower_weights,
                    FLAGS.tower_frozen_layers, FLAGS.tower_l2, FLAGS.finetune_frozen_convs, beam_args,
                    architecture=FLAGS.architecture, bn_momentum=FLAGS.bn_momentum)


def _fail(message: str) -> int:
    return cli.fail("model.experiments", message)


def main(argv):
    if not FLAGS.coco_dir or not FLAGS.output_dir:
        return _fail("--coco_dir and --output_dir are required")
    from model.evaluate import EvaluationError
    from model.train import Diverged, TrainError
    from model.training.data import DatasetError
    from pipeline.build import BuildError
    from pipeline.runtime.outputs import OutputError

    t0 = time.time()
    try:
        report = run_sweep(settings_from_flags(argv[1:]), FLAGS.variants)
    except (ExperimentError, BuildError, TrainError, EvaluationError, DatasetError, Diverged, OutputError) as e:
        return _fail(str(e))
    print(markdown(report))
    print(f"sweep done in {time.time() - t0:.0f} s; report: {os.path.join(FLAGS.output_dir, REPORT_MD)}")
    return 0


def run():
    cli.run("model.experiments", main, _define_flags, beam_args=True)


if __name__ == "__main__":
    run()
