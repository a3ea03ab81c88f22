"""model.ship: shipped weights are replaced only by a better network on the same validation pairs, and only
with reports made from the run's own weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from model import network, ship
from model.training import run_dir as run_dir_lib
from tests.test_gpu_recipe import REPO


def report(mean_mace: float, fingerprint: str = "pairs-1", digest: str | None = None) -> dict:
    row = {"mean_mace": mean_mace, "median_mace": mean_mace / 2, "p90_mace": 2 * mean_mace, "failures": 0,
           "seconds_per_pair": 0.01}
    return {"dataset": {"split": "validation", "config": {"rho": 32, "patches_per_image": 10, "seed": 0}},
            "num_pairs": 500, "command": "python -m model.evaluate --data_dir=/home/someone/val --model_dir=/x/run",
            "pairs_fingerprint": fingerprint, "model": {"weights_sha256": digest},
            "methods": {"identity": dict(row, mean_mace=24.5), "sift": dict(row, mean_mace=1.8), "network": row}}


def save(folder, r):
    """Writes r as model.evaluate writes a report: sealed (model.ship refuses an edited one)."""
    from model.evaluation import report as report_lib

    report_lib.write_json(r, str(folder))


def both(clean, camera, fingerprint="pairs-1"):
    return {"clean": report(clean, fingerprint), "camera": report(camera, fingerprint + "-camera")}


def test_decide_better_on_one_set_and_within_two_percent_on_the_other():
    assert ship.decide(both(5.0, 9.0), {}) == (True, "nothing shipped yet")
    assert ship.decide(both(4.0, 8.0), both(5.0, 9.0))[0]
    assert ship.decide(both(4.0, 9.15), both(5.0, 9.0))[0]          # camera 1.7 % worse: within the rule
    assert not ship.decide(both(4.0, 9.25), both(5.0, 9.0))[0]      # camera 2.8 % worse
    assert not ship.decide(both(5.0, 9.0), both(5.0, 9.0))[0]       # better on neither
    assert not ship.decide({"clean": report(1.0)}, both(5.0, 9.0))[0]  # the camera set is owed
    replace, why = ship.decide(both(1.0, 1.0, fingerprint="other"), both(5.0, 9.0))
    assert not replace and "different pairs" in why
    assert ship.decide(both(9.0, 9.0), both(5.0, 9.0), force=True)[0]


@pytest.fixture
def run_dir(tmp_path):
    """A finished (untrained) compact run: model.keras, config.json, history.json, and its two evaluations."""
    d = tmp_path / "run"
    d.mkdir()
    model = network.build("compact", 64, 1, dropout=False)
    model.save(d / network.MODEL_FILE)
    config = {"architecture": "compact", "patch_size": 64, "channels": 1, "rho": 16, "batch_size": 8,
              "data_dir": str(tmp_path / "gone"), "train_examples": 80, "optimizer": "adam",
              "architecture_options": {"init_from": "/somewhere/on/a/machine/weights"}}
    (d / network.CONFIG_FILE).write_text(json.dumps(config))
    (d / "history.json").write_text(json.dumps([{"step": 10, "val_mace": 9.5, "elapsed_s": 36.0}]))
    reps = {}
    for kind, mace in (("clean", 7.25), ("camera", 8.5)):
        reps[kind] = tmp_path / f"report_{kind}"
        reps[kind].mkdir()
        r = report(mace, "pairs-" + kind, run_dir_lib.weights_digest(str(d)))
        r["dataset"]["config"]["photometric"] = {"name": "camera" if kind == "camera" else "none"}
        save(reps[kind], r)
    return d, reps, model


def test_ship_copies_weights_card_and_refuses_a_worse_run(run_dir, tmp_path):
    d, reps, model = run_dir
    target = tmp_path / "weights" / "compact"
    shipped, why = ship.ship(str(d), str(reps["clean"]), str(target), device="2 CPU cores", note="resumed once",
                             camera_report_dir=str(reps["camera"]))
    assert shipped and why == "nothing shipped yet"
    assert {p.name for p in target.iterdir()} == {"model.keras", "config.json", "evaluation.json",
                                                  "evaluation_camera.json", "CARD.md"}
    assert oct(os.stat(target).st_mode & 0o777) == "0o755"
    import keras

    loaded = keras.models.load_model(target / "model.keras")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 2)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), rtol=1e-5, atol=1e-6)
    card = (target / "CARD.md").read_text()
    assert "| **network (these weights)** | 7.25 | 3.625 | 0 | 8.5 | 4.25 | 0 |" in card and "| sift | 1.8 |" in card
    assert "2 CPU cores" in card and "10 steps of batch 8" in card and "0.01 h" in card
    assert "- Note: resumed once" in card
    assert "/home/someone" not in card and "/somewhere" not in card and ".../val" in card
    # The same run again is not better: the shipped files stay as they are.
    before = (target / "model.keras").read_bytes()
    r = json.loads((reps["clean"] / "mace_report.json").read_text())
    r["methods"]["network"]["mean_mace"] = 8.0
    save(reps["clean"], r)  # sealed again, as model.evaluate would write it
    shipped, why = ship.ship(str(d), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))
    assert not shipped and "not better" in why and (target / "model.keras").read_bytes() == before


def test_ship_refuses_a_report_of_another_run_or_other_pairs(run_dir, tmp_path):
    d, reps, _ = run_dir
    target = tmp_path / "weights" / "compact"
    assert ship.ship(str(d), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))[0]
    other = tmp_path / "other"
    other.mkdir()
    network.build("compact", 64, 1, dropout=False).save(other / network.MODEL_FILE)
    (other / network.CONFIG_FILE).write_text((d / network.CONFIG_FILE).read_text())
    with pytest.raises(ship.ShipError, match="did not score the weights of"):  # d's reports, other's weights
        ship.ship(str(other), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))
    for kind in ("clean", "camera"):  # a better run scored on other pairs
        r = json.loads((reps[kind] / "mace_report.json").read_text())
        r["methods"]["network"]["mean_mace"] = 1.0
        r["pairs_fingerprint"] = "pairs-from-other-images"
        save(reps[kind], r)
    shipped, why = ship.ship(str(d), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))
    assert not shipped and "different pairs" in why


def test_ship_cli_refuses_what_is_not_a_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "model.ship", f"--model_dir={tmp_path}", f"--report_dir={tmp_path}",
                           f"--ship_dir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "run python -m model.evaluate first" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "w").exists()


def test_ship_refuses_a_ship_dir_that_is_a_file_and_evaluate_an_output_that_is_one(run_dir, tmp_path, tiny_dataset):
    d, reps, _ = run_dir
    target = tmp_path / "weights_file"
    target.write_text("not a folder")
    with pytest.raises(ship.ShipError, match="is not a folder"):
        ship.ship(str(d), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))
    assert target.read_text() == "not a folder"
    from model import evaluate
    with pytest.raises(evaluate.EvaluationError, match="is not a folder"):
        evaluate.evaluate(tiny_dataset, "validation", str(target), methods=["identity"])


def test_ship_refuses_edited_swapped_or_absurd_reports_and_foreign_ship_dirs(run_dir, tmp_path):
    """Issue 24, second round: the gate holds against reports edited after model.evaluate (the seal), a camera
    report passed as the clean one, a MACE that is not a number >= 0 (also in the shipped files), a report of
    the run's own training split, and a ship_dir that is a dataset, a link or the run itself."""
    d, reps, _ = run_dir
    target = tmp_path / "weights"
    edited = json.loads((reps["clean"] / "mace_report.json").read_text())
    edited["methods"]["network"]["mean_mace"] = 0.5  # fingerprint and weights digest intact
    (reps["clean"] / "mace_report.json").write_text(json.dumps(edited))
    with pytest.raises(ship.ShipError, match="is not as model.evaluate wrote it"):
        ship.ship(str(d), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))
    for value in (-1.0, float("nan"), "1.0"):
        save(reps["clean"], dict(edited, methods={**edited["methods"], "network": {"mean_mace": value}}))
        with pytest.raises(ship.ShipError, match="not a number of pixels >= 0"):
            ship.ship(str(d), str(reps["clean"]), str(target))
    edited["methods"]["network"]["mean_mace"] = 7.25
    save(reps["clean"], edited)
    with pytest.raises(ship.ShipError, match="scored --photometric=camera pairs, the clean report needs"):
        ship.ship(str(d), str(reps["camera"]), str(target), camera_report_dir=str(reps["clean"]))
    config = json.loads((d / network.CONFIG_FILE).read_text())
    save(reps["clean"], dict(edited, dataset=dict(edited["dataset"], split="train", data_dir=config["data_dir"])))
    with pytest.raises(ship.ShipError, match="the pairs .* trained on"):
        ship.ship(str(d), str(reps["clean"]), str(target))
    copied = dict(split="train", data_dir="/elsewhere/a_copy", num_examples=80, config={"rho": 16, "patch_size": 64})
    save(reps["clean"], dict(edited, num_pairs=80, dataset=copied))  # a copy of the training data
    with pytest.raises(ship.ShipError, match="the pairs .* trained on"):
        ship.ship(str(d), str(reps["clean"]), str(target))
    save(reps["clean"], dict(edited, num_pairs=4, dataset=dict(edited["dataset"], num_examples=500)))
    with pytest.raises(ship.ShipError, match="scored 4 of the 500 pairs .* evaluate the whole split"):
        ship.ship(str(d), str(reps["clean"]), str(target))
    save(reps["clean"], edited)
    foreign = tmp_path / "dataset"
    foreign.mkdir()
    (foreign / "homography_index.json").write_text("{}")
    (tmp_path / "link").symlink_to(target.parent)
    for where, says in ((foreign, "holds none of model.keras"), (tmp_path / "link", "is a link"),
                        (d, "is the model_dir")):
        with pytest.raises(ship.ShipError, match=says):
            ship.ship(str(d), str(reps["clean"]), str(where), camera_report_dir=str(reps["camera"]))
    assert (foreign / "homography_index.json").read_text() == "{}" and (d / network.MODEL_FILE).exists()
    assert ship.ship(str(d), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))[0]
    shipped = json.loads((target / "evaluation.json").read_text())
    shipped["methods"]["network"]["mean_mace"] = "abc"
    (target / "evaluation.json").write_text(json.dumps(shipped))
    with pytest.raises(ship.ShipError, match="the shipped clean report: .* not a number"):
        ship.ship(str(d), str(reps["clean"]), str(target), camera_report_dir=str(reps["camera"]))
