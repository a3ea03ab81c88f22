"""The seed's experiments in one runner: rho sweep, dropout / batch-norm ablation, MobileNetV2 transfer
learning, transfer from our own network, colour input; one report.

  python -m model.experiments --coco_dir=DIR --output_dir=EXP [--scale=smoke|full] [--variants=a,b,...]
                              [--tower_weights=PATH|imagenet] [--tower_frozen_layers=130] [--tower_l2=0.01]
                              [--finetune_frozen_convs=4] [--steps=N] [--splits=train=...,validation=...]
                              [any Beam flag, e.g. --direct_num_workers]

Everything goes through the project's library functions (pipeline.build.build, model.train.train,
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
from pipeline import cli

CLASSICAL_METHODS = ("identity", "orb", "sift", "ecc")
REPORT_JSON, REPORT_MD = "report.json", "report.md"
RHO_PLOT, ABLATION_PLOT, TRANSFER_PLOT = "mace_vs_rho.png", "ablation.png", "transfer_curves.png"
LOG_FILE = "experiments.log.jsonl"


class ExperimentError(ValueError):
    """A sweep that cannot go on; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one sweep. Rho values are the paper's (at 128 px patches) times rho_factor."""

    patch_size: int
    image_width: int
    image_height: int
    rho_factor: float
    patches_per_image: int
    max_images: int          # per split; 0 = all
    train: dict              # model.train keyword arguments
    tower_alpha: float       # MobileNetV2 width multiplier
    eval_max_pairs: int      # pairs of the validation split scored per method; 0 = all
    num_visualizations: int
    splits: dict = dataclasses.field(default_factory=lambda: {"train": "train2017", "validation": "val2017"})

    def rho(self, paper_rho: int) -> int:
        return max(1, round(paper_rho * self.rho_factor))


SCALES = {
    # The paper's schedule: 128 px patches of 320x240 images, 90,000 steps of 64, lr 0.005 divided by 10
    # every 30,000 steps. For a GPU machine (BUILD_NOTES.md has the cost).
    "full": Scale(128, 320, 240, 1.0, 10, 0,
                  dict(steps=90000, batch_size=64, lr_decay_steps=30000, val_every=1000, val_batches=100,
                       log_every=100, checkpoint_every=1000, steps_per_loop=50),
                  # the seed's recipe: test2017's 40,670 images x 10 = 406,700 training pairs
                  1.0, 5000, 6, {"train": "test2017", "validation": "val2017"}),
    # Everything divided by 4 (32 px patches of 80x60 images, rho 5 / 8 / 10): the same geometry, a few
    # hundred pairs, 120 steps. It checks that the whole sweep runs; its MACE says nothing about quality.
    # Learning rate 0.001: at the paper's 0.005 with batches of 16 the rho 20 and rho 40 runs diverged.
    "smoke": Scale(32, 80, 60, 0.25, 4, 24,
                   dict(steps=120, batch_size=16, learning_rate=0.001, lr_decay_steps=40, val_every=20, val_batches=0, log_every=10,
                        checkpoint_every=120, steps_per_loop=10, shuffle_buffer=256),
                   0.35, 0, 0),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    group: str            # rho | ablation | transfer | colour
    description: str
    rho: int              # the paper's rho (128 px patches); the data's is Scale.rho(rho)
    channels: int = 1
    architecture: str = "homographynet"
    dropout: bool = True
    batchnorm: bool = True
    init_from: str = ""   # another variant whose trained network starts this one


VARIANTS = (
    Variant("rho20", "rho", "HomographyNet, rho 20", 20),
    Variant("rho32", "rho", "HomographyNet, rho 32 (the paper's setting; the ablation's reference)", 32),
    Variant("rho40", "rho", "HomographyNet, rho 40", 40),
    Variant("no_dropout", "ablation", "without dropout", 32, dropout=False),
    Variant("no_batchnorm", "ablation", "without batch norm", 32, batchnorm=False),
    Variant("no_dropout_no_batchnorm", "ablation", "without dropout and batch norm", 32, dropout=False,
            batchnorm=False),
    Variant("mobilenetv2_towers", "transfer", "two MobileNetV2 towers, first layers frozen, dense 1024 + L2", 32,
            architecture="mobilenetv2_towers", dropout=False),
    Variant("finetune_from_rho20", "transfer", "HomographyNet trained at rho 20, first convs frozen, fine-tuned "
            "at rho 32", 32, init_from="rho20"),
    Variant("colour", "colour", "HomographyNet on 3-channel (BGR) patches: 6-channel input", 32, channels=3),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}
ABLATION = ("rho32", "no_dropout", "no_batchnorm", "no_dropout_no_batchnorm")


@dataclasses.dataclass
class Settings:
    """One sweep's inputs besides the variants."""

    coco_dir: str
    output_dir: str
    scale: Scale
    scale_name: str = "smoke"
    tower_weights: str = ""           # "" (random towers), "imagenet" or a weights file
    tower_frozen_layers: int = network.TOWER_FROZEN_LAYERS
    tower_l2: float = network.TOWER_L2
    finetune_frozen_convs: int = 4
    beam_args: list = dataclasses.field(default_factory=list)


def select(names) -> list:
    """Variants by name, in the sweep's order, with the variants they start from added."""
    names = list(names) if names else [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in VARIANTS_BY_NAME]
    if unknown:
        raise ExperimentError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS_BY_NAME)}")
    wanted = set(names)
    for n in names:
        if VARIANTS_BY_NAME[n].init_from:
            wanted.add(VARIANTS_BY_NAME[n].init_from)
    return [v for v in VARIANTS if v.name in wanted]


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
    from pipeline.geometry import PairConfig

    name = dataset_name(rho, channels)
    out = os.path.join(s.output_dir, "data", name)
    config = PairConfig(patch_size=s.scale.patch_size, rho=rho, image_width=s.scale.image_width,
                        image_height=s.scale.image_height, channels=channels,
                        patches_per_image=s.scale.patches_per_image, seed=0)
    spec = _spec({"coco_dir": os.path.abspath(s.coco_dir), "splits": s.scale.splits, "max_images": s.scale.max_images,
                  "config": dataclasses.asdict(config)})
    marker = out + ".done.json"
    if _completed(marker, spec):
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
    """network.build options of a variant (the towers' settings, or the run it starts from and what it freezes)."""
    if v.architecture == "mobilenetv2_towers":
        return {"frozen_layers": s.tower_frozen_layers, "l2": s.tower_l2, "alpha": s.scale.tower_alpha,
                "weights": s.tower_weights or None}
    if v.init_from:
        return {"init_from": os.path.abspath(run_dir(s, v.init_from)),
                "freeze": network.first_convs(s.finetune_frozen_convs, v.batchnorm)}
    return {}


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
    train_args = {**s.scale.train, "architecture": v.architecture, "dropout": v.dropout, "batchnorm": v.batchnorm}
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
              "architecture": v.architecture, "dropout": v.dropout, "batchnorm": v.batchnorm,
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

def _fmt(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def write_report(s: Settings, results: list, classical: dict) -> dict:
    figures = {}
    if plot_mace_vs_rho(results, classical, os.path.join(s.output_dir, RHO_PLOT)):
        figures["mace_vs_rho"] = RHO_PLOT
    if plot_ablation(results, os.path.join(s.output_dir, ABLATION_PLOT)):
        figures["ablation"] = ABLATION_PLOT
    if plot_transfer_curves(results, os.path.join(s.output_dir, TRANSFER_PLOT)):
        figures["transfer_curves"] = TRANSFER_PLOT
    notes = []
    if s.scale_name == "smoke":
        notes.append("Smoke scale: 32 px patches, a few hundred pairs, about a hundred steps. These MACE figures show "
                     "that every variant runs end to end; they say nothing about the methods' accuracy (a network this "
                     "briefly trained predicts close to zero offsets, i.e. about the identity). ORB, SIFT and ECC "
                     "mostly fail on 32 px patches (failures column) and fall back to the identity.")
    if any(r["architecture"] == "mobilenetv2_towers" for r in results):
        notes.append(f"MobileNetV2 towers: weights {tower_weights_text(s.tower_weights)}; first "
                     f"{s.tower_frozen_layers} layers of each tower frozen; dense 1024 with L2 {s.tower_l2}; "
                     f"alpha {s.scale.tower_alpha}.")
    for r in results:
        if r["architecture_options"].get("init_from"):
            notes.append(f"{r['variant']}: starts from {r['architecture_options']['init_from']}, frozen layers "
                         f"{', '.join(r['architecture_options']['freeze'])}.")
    rows = [{k: r[k] for k in ("variant", "group", "description", "paper_rho", "rho", "channels", "input_channels",
                               "architecture", "dropout", "batchnorm", "steps", "batch_size", "parameters",
                               "trainable_parameters", "train_seconds", "num_pairs")}
            | {"mace_mean": r["mace"]["mean_mace"], "mace_median": r["mace"]["median_mace"],
               "identity_mean": r["classical"].get("identity", {}).get("mean_mace"),
               "identity_median": r["classical"].get("identity", {}).get("median_mace"),
               "orb_mean": r["classical"].get("orb", {}).get("mean_mace"),
               "orb_median": r["classical"].get("orb", {}).get("median_mace"),
               **({"tower_weights": r["tower_weights"]} if "tower_weights" in r else {})}
            for r in results]
    report = {"scale": s.scale_name, "scale_settings": dataclasses.asdict(s.scale), "coco_dir": s.coco_dir,
              "variants": rows,
              "classical": {d: {m: {"mean_mace": v["mean_mace"], "median_mace": v["median_mace"],
                                    "failure_rate": v["failure_rate"]} for m, v in ms.items()}
                            for d, ms in classical.items()},
              "figures": figures, "notes": notes, "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(os.path.join(s.output_dir, REPORT_JSON), report)
    with open(os.path.join(s.output_dir, REPORT_MD), "w") as f:
        f.write(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Experiments ({report['scale']} scale)", "",
             "MACE in pixels on the validation split of each variant's dataset; identity and ORB + RANSAC on the "
             "same pairs beside it. Train time: the training loop's seconds (history.json).", "",
             "| variant | rho | input | architecture | parameters (trainable) | steps | train time (s) | "
             "MACE mean | MACE median | identity mean / median | ORB + RANSAC mean / median |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        arch = r["architecture"] + ("" if r["dropout"] else ", no dropout") + \
            ("" if r["batchnorm"] or r["architecture"] != "homographynet" else ", no BN")
        lines.append(f"| {r['variant']} | {r['rho']} (paper {r['paper_rho']}) | {r['input_channels']} ch | {arch} | "
                     f"{r['parameters']:,} ({r['trainable_parameters']:,}) | {r['steps']} | {_fmt(r['train_seconds'], 1)} | "
                     f"{_fmt(r['mace_mean'])} | {_fmt(r['mace_median'])} | "
                     f"{_fmt(r['identity_mean'])} / {_fmt(r['identity_median'])} | "
                     f"{_fmt(r['orb_mean'])} / {_fmt(r['orb_median'])} |")
    lines += ["", "## Classical methods per dataset", "", "| dataset | method | MACE mean | MACE median | failures |",
              "|---|---|---|---|---|"]
    for d, ms in report["classical"].items():
        for m, v in ms.items():
            lines.append(f"| {d} | {m} | {_fmt(v['mean_mace'])} | {_fmt(v['median_mace'])} | "
                         f"{100 * v['failure_rate']:.1f}% |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report["figures"]:
        lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in report["figures"].items()]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log_scale_if_wide(ax, values) -> None:
    values = [v for v in values if v and v > 0]
    if values and max(values) > 20 * min(values):
        ax.set_yscale("log")


def plot_mace_vs_rho(results: list, classical: dict, path: str) -> bool:
    """The network's MACE against rho (the rho variants) with the classical methods on the same datasets."""
    sweep = sorted((r["rho"], r["mace"]["mean_mace"]) for r in results if r["group"] == "rho")
    if not sweep:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*sweep), "o-", lw=2, label="HomographyNet")
    ys = [m for _, m in sweep]
    for method in CLASSICAL_METHODS:
        pts = sorted((rho, classical[dataset_name(rho, 1)][method]["mean_mace"]) for rho, _ in sweep
                     if method in classical.get(dataset_name(rho, 1), {}))
        if pts:
            ax.plot(*zip(*pts), "s--", lw=1, label=method)
            ys += [m for _, m in pts]
    _log_scale_if_wide(ax, ys)
    ax.set_xlabel("rho (pixels)")
    ax.set_ylabel("mean MACE (pixels)")
    ax.set_title("MACE against rho")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_ablation(results: list, path: str) -> bool:
    by_name = {r["variant"]: r for r in results}
    names = [n for n in ABLATION if n in by_name]
    if len(names) < 2:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"rho32": "full network", "no_dropout": "no dropout", "no_batchnorm": "no batch norm",
              "no_dropout_no_batchnorm": "neither"}
    means = [by_name[n]["mace"]["mean_mace"] for n in names]
    bars = ax.bar([labels[n] for n in names], means, color="tab:blue")
    _log_scale_if_wide(ax, means)
    ax.bar_label(bars, fmt="%.2f")
    ident = by_name[names[0]]["classical"].get("identity", {}).get("mean_mace")
    if ident is not None:
        ax.axhline(ident, color="gray", ls="--", lw=1, label=f"identity {ident:.2f} px")
        ax.legend()
    ax.set_ylabel("mean MACE (pixels)")
    ax.set_title(f"Ablation at rho {by_name[names[0]]['rho']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_transfer_curves(results: list, path: str) -> bool:
    """Training (dashed) and validation (solid) MACE against steps of the transfer variants (and rho32 for reference)."""
    runs = [r for r in results if r["group"] == "transfer"]
    if not runs:
        return False
    runs += [r for r in results if r["variant"] == "rho32"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(runs):
        with open(os.path.join(r["run_dir"], "history.json")) as f:
            history = json.load(f)
        color = f"C{i}"
        tr = [(h["step"], h["train_mace"]) for h in history if h.get("train_mace") is not None]
        va = [(h["step"], h["val_mace"]) for h in history if h.get("val_mace") is not None]
        if tr:
            ax.plot(*zip(*tr), "--", color=color, lw=1, label=f"{r['variant']} training")
        if va:
            ax.plot(*zip(*va), "o-", color=color, lw=1.5, ms=3, label=f"{r['variant']} validation")
    ax.set_yscale("log")  # early validation MACE of batch-norm networks can be orders of magnitude above the rest
    ax.set_xlabel("step")
    ax.set_ylabel("MACE (pixels, log scale)")
    ax.set_title("Transfer learning: training and validation MACE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
                    FLAGS.tower_frozen_layers, FLAGS.tower_l2, FLAGS.finetune_frozen_convs, beam_args)


def _fail(message: str) -> int:
    return cli.fail("model.experiments", message)


def main(argv):
    if not FLAGS.coco_dir or not FLAGS.output_dir:
        return _fail("--coco_dir and --output_dir are required")
    from model.data import DatasetError
    from model.evaluate import EvaluationError
    from model.train import TrainError
    from pipeline.build import BuildError

    t0 = time.time()
    try:
        report = run_sweep(settings_from_flags(argv[1:]), FLAGS.variants)
    except (ExperimentError, BuildError, TrainError, EvaluationError, DatasetError) as e:
        return _fail(str(e))
    print(markdown(report))
    print(f"sweep done in {time.time() - t0:.0f} s; report: {os.path.join(FLAGS.output_dir, REPORT_MD)}")
    return 0


def run():
    cli.run("model.experiments", main, _define_flags, beam_args=True)


if __name__ == "__main__":
    run()
