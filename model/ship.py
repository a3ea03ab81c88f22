"""Ships a trained run with the project: its weights, its curves and a card, replacing the shipped ones only
when it is better on the same validation pairs.

  python -m model.ship --model_dir=RUN --report_dir=REPORT --camera_report_dir=CAMERA_REPORT
                       [--ship_dir=data/weights/compact_rho32] [--device=...]

REPORT and CAMERA_REPORT are `python -m model.evaluate --model_dir=RUN --output_dir=... ...` on the two
standard validation sets (val2017 x 10, seed 0, built with --photometric=none and --photometric=camera),
the network beside the classical methods. ship_dir gets:
  model.keras        the network without optimizer state (what inference needs; small enough to clone)
  config.json        the run's settings, as model.train wrote them
  history.csv, mace.png   the training curves
  evaluation.json, evaluation_camera.json   the two evaluation reports the card quotes
  CARD.md            how it was trained (data, steps, wall time, device) and what it measures, beside the
                     classical methods on the same pairs
The gate (`decide`): both reports must have been made from RUN's own model.keras (their weights digest)
and on the very pairs the shipped weights were scored on (their pairs fingerprint: a hash of every
evaluated pair's patches and labels, in order). The run replaces the shipped weights when its network's
mean MACE is lower on one set and at most 2 % higher on the other (RULE); --force overrides the rule,
never the binding to RUN.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from model import network
from pipeline.runtime import cli

EVALUATION_FILE = "evaluation.json"
EVALUATION_FILES = {"clean": EVALUATION_FILE, "camera": "evaluation_camera.json"}
TOLERANCE = 0.02
RULE = ("lower mean MACE of the network on one of the two standard sets (clean, camera) and at most "
        f"{TOLERANCE:.0%} higher on the other, on the same pairs")
CARD_FILE = "CARD.md"
MAX_WEIGHTS_BYTES = 10 * 2**20  # DESIGN.md: shipped weights stay small enough to clone
COPIED = ("history.csv", "mace.png")
SHIPPED_FILES = (network.MODEL_FILE, CARD_FILE, *EVALUATION_FILES.values())  # what a ship_dir holds


class ShipError(ValueError):
    """The run cannot be shipped; the message says why."""


def _mace(report: dict, path: str) -> float:
    """The network's mean MACE of a report: a finite number >= 0, else ShipError (NaN or a string would
    compare as never better or crash the gate; a negative one as always better)."""
    value = report["methods"]["network"]["mean_mace"]
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ShipError(f"{path}: the network's mean MACE is {value!r}, not a number of pixels >= 0")
    return value


def _same_data(d: dict, config: dict) -> bool:
    """Whether a report's dataset is the run's training data: the same folder, or (a copy) the same split
    size and geometry."""
    if config.get("data_dir") and os.path.realpath(str(d.get("data_dir"))) == os.path.realpath(config["data_dir"]):
        return True
    keys = ("rho", "patch_size", "image_width", "image_height")
    return d.get("num_examples") == config.get("train_examples") and \
        all((d.get("config") or {}).get(k) == config.get(k) for k in keys)


def _read_report(report_dir: str, model_dir: str, kind: str = "clean", config: dict | None = None) -> dict:
    """The evaluation report in report_dir, refused unless model.evaluate wrote it as it is (its seal), it
    scored model_dir's own weights, on pairs of the kind expected (clean: --photometric=none, camera:
    --photometric=camera) and not on the run's own training split."""
    from model.evaluation import report as report_lib
    from model.training import run_dir
    from pipeline.dataset import photometric

    path = os.path.join(report_dir, report_lib.JSON_FILE)
    if not os.path.exists(path):
        raise ShipError(f"no {report_lib.JSON_FILE} in {report_dir}: run python -m model.evaluate first")
    try:
        with open(path) as f:
            report = json.load(f)
        report["methods"]["network"]["mean_mace"], report["dataset"]["config"]
        pairs = photometric.model_name(report["dataset"]["config"].get("photometric"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShipError(f"{path} is not an evaluation report with a 'network' method "
                        f"({type(e).__name__}: {e}): evaluate with --model_dir") from None
    if report.get(report_lib.SEAL) != report_lib.seal(report):
        raise ShipError(f"{path} is not as model.evaluate wrote it (its {report_lib.SEAL} does not match its "
                        f"content: edited, or written before reports were sealed): evaluate the run again")
    _mace(report, path)
    wanted = "none" if kind == "clean" else "camera"
    if pairs != wanted:
        raise ShipError(f"{path} scored --photometric={pairs} pairs, the {kind} report needs --photometric={wanted} "
                        f"pairs: pass each report to its own flag (--report_dir clean, --camera_report_dir camera)")
    d = report["dataset"]
    if d.get("num_examples") not in (None, report.get("num_pairs")):  # --max_pairs: a part of the set
        raise ShipError(f"{path} scored {report.get('num_pairs')} of the {d['num_examples']} pairs of split "
                        f"'{d.get('split')}' (--max_pairs): evaluate the whole split")
    if config and d.get("split") == config.get("train_split", "train") and _same_data(d, config):
        raise ShipError(f"{path} scored split '{d['split']}' of {d['data_dir']}, the pairs {model_dir} trained on: "
                        f"evaluate on validation pairs it never saw")
    if not os.path.exists(os.path.join(model_dir, network.MODEL_FILE)):
        raise ShipError(f"{model_dir} is not a finished training run (no {network.MODEL_FILE})")
    digest = (report.get("model") or {}).get("weights_sha256")
    if digest is None or digest != run_dir.weights_digest(model_dir):
        raise ShipError(f"{path} did not score the weights of {model_dir} (its weights digest differs): "
                        f"evaluate this run with python -m model.evaluate --model_dir={model_dir}")
    return report


def same_pairs(a: dict, b: dict) -> bool:
    """Whether two evaluation reports scored the same pairs: their fingerprints (a hash of the pairs)."""
    return bool(a.get("pairs_fingerprint")) and a.get("pairs_fingerprint") == b.get("pairs_fingerprint")


def decide(new: dict, old: dict, force: bool = False) -> tuple[bool, str]:
    """(replace?, why) for new reports {set: report} against the shipped ones (an empty dict: nothing shipped)."""
    if not old:
        return True, "nothing shipped yet"
    missing = [k for k in old if k not in new]
    if missing:
        return False, f"the shipped weights were scored on the {', '.join(missing)} set too: evaluate the run there"
    figures = {k: (_mace(new[k], f"the {k} report"), _mace(old[k], f"the shipped {k} report")) for k in old}
    text = "; ".join(f"{k}: {n} px against the shipped {o} px" for k, (n, o) in figures.items())
    if force:
        return True, f"--force ({text})"
    other = [k for k in old if not same_pairs(new[k], old[k])]
    if other:
        return False, (f"different pairs on the {', '.join(other)} set (pairs fingerprints differ or are missing): "
                       f"evaluate on the pairs the shipped weights were scored on, or pass --force")
    better = [k for k, (n, o) in figures.items() if n < o]
    close = all(n <= o * (1 + TOLERANCE) for n, o in figures.values())
    if better and close:
        return True, f"better ({RULE}): {text}"
    return False, f"not better ({RULE}): {text}"


def data_text(config: dict) -> str:
    """Where the training pairs came from, read from the training dataset's index when it is still there."""
    from pipeline.dataset import dataset_info

    split = config.get("train_split", "train")
    try:
        info = dataset_info.read(config["data_dir"])
        s = info.raw["splits"][split]
        return (f"{s['num_examples']:,} training pairs: {s['images_used']:,} images of the build's `{s['source_split']}` folder x "
                f"{info.config.patches_per_image} pairs each (seed {info.config.seed})")
    except (KeyError, ValueError):  # DatasetError is a ValueError: the dataset has moved or gone
        return (f"{config.get('train_examples')} training pairs from `{shown_path(str(config.get('data_dir')))}` "
                f"(split `{split}`)")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shown_path(text: str) -> str:
    """Text with this machine's folders out of it: paths inside the repository made relative to it, other
    absolute paths cut to their last folder (cards are read on other machines)."""
    import re

    def one(m):
        path = m.group(0)
        if path.startswith(REPO + os.sep):
            return os.path.relpath(path, REPO)
        return ".../" + os.path.basename(path.rstrip("/"))
    return re.sub(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]*", one, text)  # absolute paths of two parts or more


def _table(reports: dict) -> list:
    kinds = list(reports)
    head = "| method | " + " | ".join(f"{k}: mean MACE (px) | {k}: median | {k}: failures" for k in kinds) + \
        " | ms / pair |"
    lines = [head, "|---" * (1 + 3 * len(kinds) + 1) + "|"]
    for name, m in reports[kinds[0]]["methods"].items():
        label = {"network": "**network (these weights)**",
                 "network_tta": "**network_tta (these weights, 8 views)**"}.get(name, name)
        cells = []
        for k in kinds:
            r = reports[k]["methods"].get(name)
            cells += [str(r["mean_mace"]), str(r["median_mace"]), str(r["failures"])] if r else ["", "", ""]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {1000 * m['seconds_per_pair']:.2f} |")
    return lines


def card(config: dict, history: list, reports: dict, device: str, parameters: int, note: str = "") -> str:
    """CARD.md: how the weights were trained and what they measure, every figure from the files beside it."""
    last = history[-1] if history else {}
    vals = [r for r in history if r.get("val_mace") is not None]
    report = reports["clean"]
    d = report["dataset"]
    c = d["config"]
    hours = (last.get("elapsed_s") or 0) / 3600
    camera = " and fresh camera changes on patch A and B (`--photometric=camera`)" \
        if config.get("photometric", "none") != "none" else ""
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
           "(`--augment`)" if config.get("augment") else "") + camera + ".",
        *([f"- Started from the weights of `{shown_path(config['architecture_options']['init_from'])}` "
           "(`--init_from`)."] if (config.get("architecture_options") or {}).get("init_from") else []),
        f"- Wall time: {hours:.2f} h on {device}.",
        "- Curves: `history.csv`, `mace.png` (training and validation MACE against steps)."
        + (f" Last validation check: {vals[-1]['val_mace']:.2f} px at step {vals[-1]['step']}." if vals else ""),
        *([f"- Note: {shown_path(note)}"] if note else []),
        "", "## What it measures", "",
        f"{report['num_pairs']} validation pairs it never saw: split `{d['split']}` of a build with rho {c['rho']}, "
        f"{c['patches_per_image']} pairs per image, seed {c['seed']}"
        + (", once as built (`clean`, `evaluation.json`) and once with each patch through its own camera change "
           "(`--photometric=camera`: the same geometry; `evaluation_camera.json`)" if "camera" in reports else
           " (`evaluation.json`)")
        + f". Command: `{shown_path(report.get('command') or 'python -m model.evaluate')}`.", "", *_table(reports)]
    lines += ["", "Identity is the error of predicting no motion (expected 0.765 x rho). The classical methods "
              "run on the same pairs (model/estimators); a failed estimate counts as the identity."]
    if "network_tta" in report["methods"]:
        lines += ["network_tta runs these weights on the 8 flips and transposes of each pair, maps each estimate "
                  "back to the pair's frame exactly (pipeline/dataset/geometry.py: view_offsets) and averages the "
                  "corners: no training, 8 passes per estimate."]
    return "\n".join(lines) + "\n"


def ship(model_dir: str, report_dir: str, ship_dir: str = network.SHIPPED_MODEL_DIR, *, device: str = "CPU",
         force: bool = False, note: str = "", camera_report_dir: str | None = None) -> tuple[bool, str]:
    """Ships model_dir's network into ship_dir if it is better (see decide); returns (shipped?, why)."""
    import keras

    try:
        config = network.read_config(model_dir)
        history_path = os.path.join(model_dir, "history.json")
        history = []
        if os.path.exists(history_path):
            with open(history_path) as f:
                history = json.load(f)
        if not isinstance(history, list):  # read_config already refuses a config.json that is not a run's
            raise ValueError(f"{history_path} is not a run's history (a JSON list)")
    except ValueError as e:  # RunConfigError is one; a history.json cut short too
        raise ShipError(f"{model_dir} is not a readable training run: {e}") from None
    reports = {"clean": _read_report(report_dir, model_dir, "clean", config)}
    if camera_report_dir:
        reports["camera"] = _read_report(camera_report_dir, model_dir, "camera", config)
    if config is None:
        raise ShipError(f"{model_dir} is not a finished training run (needs {network.CONFIG_FILE})")
    from pipeline.runtime import outputs

    try:  # ship_dir a file, or its folder read-only: one line, the shipped weights untouched
        outputs.check_output_dir(os.path.dirname(os.path.abspath(ship_dir)), must_be_empty=False, flag="ship_dir's parent")
        if os.path.islink(ship_dir):  # the swap below would replace the link, or rmtree refuse it
            raise outputs.OutputError(f"ship_dir {ship_dir} is a link: name the folder itself")
        # ship_dir is replaced whole: never a folder of something else (a dataset, COCO, the run itself)
        outputs.check_output_dir(ship_dir, must_be_empty=False, flag="ship_dir", reuse_if=SHIPPED_FILES,
                                 inputs={"model_dir": model_dir, "report_dir": report_dir,
                                         "camera_report_dir": camera_report_dir})
    except outputs.OutputError as e:
        raise ShipError(str(e)) from None
    old = {}
    for kind, name in EVALUATION_FILES.items():
        path = os.path.join(ship_dir, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old[kind] = json.load(f)
                old[kind]["methods"]["network"]["mean_mace"]
            except (ValueError, KeyError, TypeError) as e:
                raise ShipError(f"the shipped {path} is unreadable ({type(e).__name__}: {e}); restore it from git") from None
    replace, why = decide(reports, old, force)
    if not replace:
        return False, why
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
        for kind, r in reports.items():
            with open(os.path.join(tmp, EVALUATION_FILES[kind]), "w") as f:
                json.dump(r, f, indent=2)
        with open(os.path.join(tmp, CARD_FILE), "w") as f:
            f.write(card(config, history, reports, device, model.count_params(), note))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become the shipped folder's mode
        if os.path.exists(ship_dir):
            shutil.rmtree(ship_dir)
        os.replace(tmp, ship_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True, why


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model_dir", None, "Finished training run (config.json, model.keras, history)")
    flags.DEFINE_string("report_dir", None, "model.evaluate's output for that run on the clean validation pairs")
    flags.DEFINE_string("camera_report_dir", None, "model.evaluate's output for that run on the camera validation "
                        "pairs (the same pairs built with --photometric=camera)")
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
        shipped, why = ship(f.model_dir, f.report_dir, f.ship_dir, device=f.device, force=f.force, note=f.note,
                            camera_report_dir=f.camera_report_dir)
    except ShipError as e:
        return cli.fail("model.ship", str(e))
    print(f"{'shipped to ' + f.ship_dir if shipped else 'kept the shipped weights'}: {why}")
    return 0


def run():
    cli.run("model.ship", main, _define_flags)


if __name__ == "__main__":
    run()
