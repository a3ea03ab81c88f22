"""model.ship: shipped weights are replaced only by a better network on the same validation pairs."""
import json
import subprocess
import sys

import numpy as np
import pytest

from model import network, ship
from tests.test_gpu_recipe import REPO


def report(mean_mace: float, num_pairs: int = 500, rho: int = 32) -> dict:
    row = {"mean_mace": mean_mace, "median_mace": mean_mace / 2, "p90_mace": 2 * mean_mace, "failures": 0,
           "seconds_per_pair": 0.01}
    return {"dataset": {"split": "validation", "config": {"rho": rho, "patches_per_image": 10, "seed": 0}},
            "num_pairs": num_pairs, "command": "python -m model.evaluate ...",
            "methods": {"identity": dict(row, mean_mace=24.5), "sift": dict(row, mean_mace=1.8), "network": row}}


def test_decide_replaces_only_a_worse_network_on_the_same_pairs():
    assert ship.decide(report(5.0), None) == (True, "nothing shipped yet")
    assert ship.decide(report(4.0), report(5.0))[0]
    assert not ship.decide(report(5.0), report(5.0))[0]
    assert not ship.decide(report(6.0), report(5.0))[0]
    replace, why = ship.decide(report(1.0, num_pairs=50), report(5.0))
    assert not replace and "different pairs" in why
    assert not ship.decide(report(1.0, rho=20), report(5.0))[0]
    assert ship.decide(report(9.0), report(5.0), force=True)[0]


@pytest.fixture
def run_dir(tmp_path):
    """A finished (untrained) compact run: model.keras, config.json, history.json, and its evaluation."""
    d = tmp_path / "run"
    d.mkdir()
    model = network.build("compact", 64, 1, dropout=False)
    model.save(d / network.MODEL_FILE)
    config = {"architecture": "compact", "patch_size": 64, "channels": 1, "rho": 16, "batch_size": 8,
              "data_dir": str(tmp_path / "gone"), "train_examples": 80, "optimizer": "adam"}
    (d / network.CONFIG_FILE).write_text(json.dumps(config))
    (d / "history.json").write_text(json.dumps([{"step": 10, "val_mace": 9.5, "elapsed_s": 36.0}]))
    rep = tmp_path / "report"
    rep.mkdir()
    (rep / "mace_report.json").write_text(json.dumps(report(7.25)))
    return d, rep, model


def test_ship_copies_weights_card_and_refuses_a_worse_run(run_dir, tmp_path):
    d, rep, model = run_dir
    target = tmp_path / "weights" / "compact"
    shipped, why = ship.ship(str(d), str(rep), str(target), device="2 CPU cores", note="resumed once")
    assert shipped and why == "nothing shipped yet"
    assert {p.name for p in target.iterdir()} == {"model.keras", "config.json", "evaluation.json", "CARD.md"}
    import keras

    loaded = keras.models.load_model(target / "model.keras")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 2)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), rtol=1e-5, atol=1e-6)
    card = (target / "CARD.md").read_text()
    assert "| **network (these weights)** | 7.25 |" in card and "| sift | 1.8 |" in card
    assert "2 CPU cores" in card and "10 steps of batch 8" in card and "0.01 h" in card
    assert "- Note: resumed once" in card
    # The same run again is not better: the shipped files stay as they are.
    before = (target / "model.keras").read_bytes()
    (rep / "mace_report.json").write_text(json.dumps(report(8.0)))
    shipped, why = ship.ship(str(d), str(rep), str(target))
    assert not shipped and "not better" in why and (target / "model.keras").read_bytes() == before


def test_ship_cli_refuses_what_is_not_a_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "model.ship", f"--model_dir={tmp_path}", f"--report_dir={tmp_path}",
                           f"--ship_dir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "run python -m model.evaluate first" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "w").exists()
