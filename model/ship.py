"""Ships a trained run with the project: its weights, its curves and a card, replacing the shipped ones only
when it is better on the same validation pairs.

  python -m model.ship --model_dir=RUN --report_dir=REPORT [--ship_dir=data/weights/compact_rho32] [--device=...]

REPORT is `python -m model.evaluate --model_dir=RUN --output_dir=REPORT ...` on the validation pairs (the
network beside the classical methods). ship_dir gets:
  model.keras        the network without optimizer state (what inference needs; small enough to clone)
  config.json        the run's settings, as model.train wrote them
  history.csv, mace.png   the training curves
  evaluation.json    the evaluation report the card quotes (mace_report.json of REPORT)
  CARD.md            how it was trained (data, steps, wall time, device) and what it measures, beside the
                     classical methods on the same pairs
A run replaces what ship_dir holds only if its network's mean MACE is lower on the same validation pairs
(same dataset config and split, same number of pairs); --force overrides.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from model import network
from pipeline.runtime import cli

EVALUATION_FILE = "evaluation.json"
CARD_FILE = "CARD.md"
MAX_WEIGHTS_BYTES = 10 * 2**20  # DESIGN.md: shipped weights stay small enough to clone
COPIED = ("history.csv", "mace.png")


class ShipError(ValueError):
    """The run cannot be shipped; the message says why."""


def _read_report(report_dir: str) -> dict:
    from model.evaluation import report as report_lib

    path = os.path.join(report_dir, report_lib.JSON_FILE)
    if not os.path.exists(path):
        raise ShipError(f"no {report_lib.JSON_FILE} in {report_dir}: run python -m model.evaluate first")
    with open(path) as f:
        report = json.load(f)
    if "network" not in report.get("methods", {}):
        raise ShipError(f"{path} has no 'network' method: evaluate with --model_dir")
    return report


def same_pairs(a: dict, b: dict) -> bool:
    """Whether two evaluation reports scored the same validation pairs."""
    return (a["dataset"]["config"] == b["dataset"]["config"] and a["dataset"]["split"] == b["dataset"]["split"]
            and a["num_pairs"] == b["num_pairs"])


def decide(new: dict, old: dict | None, force: bool = False) -> tuple[bool, str]:
    """(replace?, why) for a new evaluation report against the shipped one (None: nothing shipped)."""
    if old is None:
        return True, "nothing shipped yet"
    new_mace, old_mace = new["methods"]["network"]["mean_mace"], old["methods"]["network"]["mean_mace"]
    if force:
        return True, f"--force (mean MACE {new_mace} px against the shipped {old_mace} px)"
    if not same_pairs(new, old):
        return False, ("the two evaluations scored different pairs (dataset config, split or count differ): "
                       "evaluate on the shipped weights' validation pairs, or pass --force")
    if new_mace < old_mace:
        return True, f"better: mean MACE {new_mace} px against the shipped {old_mace} px on the same pairs"
    return False, f"not better: mean MACE {new_mace} px against the shipped {old_mace} px on the same pairs"


def data_text(config: dict) -> str:
    """Where the training pairs came from, read from the training dataset's index when it is still there."""
    from pipeline.dataset import dataset_info

    split = config.get("train_split", "train")
    try:
        info = dataset_info.read(config["data_dir"])
        s = info.raw["splits"][split]
        return (f"{s['num_examples']:,} training pairs: {s['images_used']} images of COCO {s['source_split']} x "
                f"{info.config.patches_per_image} pairs each (seed {info.config.seed})")
    except (KeyError, ValueError):  # DatasetError is a ValueError: the dataset has moved or gone
        return f"{config.get('train_examples')} training pairs from `{config.get('data_dir')}` (split `{split}`)"


def card(config: dict, history: list, report: dict, device: str, parameters: int, note: str = "") -> str:
    """CARD.md: how the weights were trained and what they measure, every figure from the files beside it."""
    last = history[-1] if history else {}
    vals = [r for r in history if r.get("val_mace") is not None]
    d = report["dataset"]
    c = d["config"]
    hours = (last.get("elapsed_s") or 0) / 3600
    lines = [
        f"# {config['architecture']} HomographyNet, rho {config['rho']}: model card", "",
        "## How it was trained", "",
        f"- Network: `{config['architecture']}` ({parameters:,} parameters), input {config['patch_size']}x"
        f"{config['patch_size']}x{2 * config['channels']} (patch A and B stacked), output the 8 corner offsets / rho.",
        f"- Data: {data_text(config)}, rho {config['rho']}, "
        f"{config.get('image_width')}x{config.get('image_height')} grayscale images.",
        f"- Schedule: {last.get('step')} steps of batch {config.get('batch_size')} "
        f"({(last.get('step') or 0) * config.get('batch_size', 0):,} pairs seen), optimizer "
        f"{config.get('optimizer', 'sgd')}, learning rate {config.get('learning_rate')} x "
        f"{config.get('lr_decay_factor')} every {config.get('lr_decay_steps')} steps, loss {config.get('loss')}, "
        f"dropout {config.get('dropout')}, batch norm {config.get('batchnorm')}"
        + (", each batch seen through one of the 8 flips and transposes of its patches, labels mapped exactly "
           "(`--augment`)" if config.get("augment") else "") + ".",
        *([f"- Started from the weights of `{config['architecture_options']['init_from']}` (`--init_from`)."]
          if (config.get("architecture_options") or {}).get("init_from") else []),
        f"- Wall time: {hours:.2f} h on {device}.",
        "- Curves: `history.csv`, `mace.png` (training and validation MACE against steps)."
        + (f" Last validation check: {vals[-1]['val_mace']:.2f} px at step {vals[-1]['step']}." if vals else ""),
        *([f"- Note: {note}"] if note else []),
        "", "## What it measures", "",
        f"{report['num_pairs']} validation pairs it never saw: split `{d['split']}` of a build with rho {c['rho']}, "
        f"{c['patches_per_image']} pairs per image, seed {c['seed']} (`evaluation.json`; command: "
        f"`{report.get('command') or 'python -m model.evaluate'}`).", "",
        "| method | mean MACE (px) | median (px) | p90 (px) | failures | ms / pair |", "|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        label = {"network": "**network (these weights)**",
                 "network_tta": "**network_tta (these weights, 8 views)**"}.get(name, name)
        lines.append(f"| {label} | {m['mean_mace']} | {m['median_mace']} | {m['p90_mace']} | {m['failures']} | "
                     f"{1000 * m['seconds_per_pair']:.2f} |")
    lines += ["", "Identity is the error of predicting no motion (expected 0.765 x rho). The classical methods "
              "run on the same pairs (model/estimators/methods.py); a failed estimate counts as the identity."]
    if "network_tta" in report["methods"]:
        lines += ["network_tta runs these weights on the 8 flips and transposes of each pair, maps each estimate "
                  "back to the pair's frame exactly (pipeline/dataset/geometry.py: view_offsets) and averages the corners: "
                  "no training, 8 passes per estimate."]
    return "\n".join(lines) + "\n"


def ship(model_dir: str, report_dir: str, ship_dir: str = network.SHIPPED_MODEL_DIR, *, device: str = "CPU",
         force: bool = False, note: str = "") -> tuple[bool, str]:
    """Ships model_dir's network into ship_dir if it is better (see decide); returns (shipped?, why)."""
    import keras

    report = _read_report(report_dir)
    config = network.read_config(model_dir)
    if config is None or not os.path.exists(os.path.join(model_dir, network.MODEL_FILE)):
        raise ShipError(f"{model_dir} is not a finished training run (needs {network.CONFIG_FILE} and "
                        f"{network.MODEL_FILE})")
    old_path = os.path.join(ship_dir, EVALUATION_FILE)
    old = json.load(open(old_path)) if os.path.exists(old_path) else None
    replace, why = decide(report, old, force)
    if not replace:
        return False, why
    history_path = os.path.join(model_dir, "history.json")
    history = json.load(open(history_path)) if os.path.exists(history_path) else []
    # Written beside ship_dir, then swapped in: a failure leaves the shipped weights as they were.
    parent = os.path.dirname(os.path.abspath(ship_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ship-", dir=parent)
    try:
        model = keras.models.load_model(os.path.join(model_dir, network.MODEL_FILE), compile=False)
        model.save(os.path.join(tmp, network.MODEL_FILE))  # uncompiled: no optimizer state
        size = os.path.getsize(os.path.join(tmp, network.MODEL_FILE))
        if size > MAX_WEIGHTS_BYTES:
            raise ShipError(f"{config['architecture']} weights are {size / 2**20:.1f} MiB, over the "
                            f"{MAX_WEIGHTS_BYTES / 2**20:.0f} MiB a clone should carry")
        shutil.copy(os.path.join(model_dir, network.CONFIG_FILE), tmp)
        for name in COPIED:
            if os.path.exists(os.path.join(model_dir, name)):
                shutil.copy(os.path.join(model_dir, name), tmp)
        with open(os.path.join(tmp, EVALUATION_FILE), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, CARD_FILE), "w") as f:
            f.write(card(config, history, report, device, model.count_params(), note))
        if os.path.exists(ship_dir):
            shutil.rmtree(ship_dir)
        os.replace(tmp, ship_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True, why


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model_dir", None, "Finished training run (config.json, model.keras, history)")
    flags.DEFINE_string("report_dir", None, "model.evaluate's output for that run on the validation pairs")
    flags.DEFINE_string("ship_dir", network.SHIPPED_MODEL_DIR, "Where the shipped weights live")
    flags.DEFINE_string("device", "CPU", "What trained it, for the card (e.g. '2 CPU cores', 'one H100')")
    flags.DEFINE_bool("force", False, "Replace the shipped weights even if not better on the same pairs")
    flags.DEFINE_string("note", "", "A line for the card (e.g. how the schedule changed on a resume)")


def main(argv):
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        return cli.fail("model.ship", f"unexpected arguments: {' '.join(argv[1:])}")
    if not f.model_dir or not f.report_dir:
        return cli.fail("model.ship", "--model_dir and --report_dir are required")
    try:
        shipped, why = ship(f.model_dir, f.report_dir, f.ship_dir, device=f.device, force=f.force, note=f.note)
    except ShipError as e:
        return cli.fail("model.ship", str(e))
    print(f"{'shipped to ' + f.ship_dir if shipped else 'kept the shipped weights'}: {why}")
    return 0


def run():
    cli.run("model.ship", main, _define_flags)


if __name__ == "__main__":
    run()
