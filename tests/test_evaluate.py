"""model.evaluate: the report's numbers, its two renderings, the figures, the CLI's errors, the network path."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from model import evaluate
from model.evaluation import report
from pipeline.dataset import dataset_info, schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_offsets(data_dir, split, n):
    """The first n labels of a split, read shard by shard with schema.decode: not through model.training.data."""
    info = dataset_info.read(data_dir)
    c = info.config
    out = []
    for path in info.split(split).shard_files:
        for record in tf.data.TFRecordDataset(path):
            out.append(schema.decode(record.numpy(), c.patch_size, c.channels)[schema.OFFSETS].reshape(4, 2))
    return np.array(out[:n], np.float64)


@pytest.fixture(scope="module")
def classical_report(built_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    result = evaluate.evaluate(built_dataset, "validation", out, methods=["identity", "orb", "ecc"],
                               max_pairs=40, num_visualizations=3, batch_size=16)
    return result, out


def test_identity_mace_is_the_mean_corner_offset_norm(classical_report, built_dataset):
    result, _ = classical_report
    offsets = raw_offsets(built_dataset, "validation", 40)
    expected = np.mean([np.mean([np.sqrt(dx * dx + dy * dy) for dx, dy in pair]) for pair in offsets])
    assert result["num_pairs"] == 40 and result["methods"]["identity"]["num_pairs"] == 40
    assert result["methods"]["identity"]["mean_mace"] == pytest.approx(expected, abs=1e-3)
    assert result["identity_check"]["measured_mace"] == pytest.approx(expected, abs=1e-3)
    assert result["identity_check"]["expected_mace"] == pytest.approx(0.765 * 32, abs=1e-3)
    assert result["methods"]["identity"]["failure_rate"] == 0


def test_orb_beats_the_identity_on_real_pairs(classical_report):
    m = classical_report[0]["methods"]
    assert m["orb"]["mean_mace"] < 0.5 * m["identity"]["mean_mace"]
    assert m["orb"]["median_mace"] < 5
    for entry in m.values():  # every failure is explained
        assert sum(entry["failure_reasons"].values()) == entry["failures"]


def test_json_and_markdown_agree(classical_report):
    result, out = classical_report
    with open(os.path.join(out, report.JSON_FILE)) as f:
        from_json = json.load(f)
    with open(os.path.join(out, report.MARKDOWN_FILE)) as f:
        text = f.read()
    table = report.parse_markdown_table(text)
    assert list(table) == list(from_json["methods"]) == ["identity", "orb", "ecc"]
    for name, row in table.items():
        for key, value in row.items():
            assert value == pytest.approx(from_json["methods"][name][key], rel=1e-12, abs=0), (name, key)
    assert f"{from_json['identity_check']['expected_mace']} px" in text
    assert f"measured {from_json['identity_check']['measured_mace']} px" in text
    assert from_json["dataset"]["config"]["rho"] == 32 and from_json["dataset"]["config"]["seed"] == 0


def test_figures_are_written(classical_report):
    result, out = classical_report
    files = [result["figures"]["bar"], result["figures"]["histograms"], *result["figures"]["pairs"]]
    assert len(result["figures"]["pairs"]) == 3
    for name in files:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def run_cli(module, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def assert_clean_error(proc, module, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = [l for l in proc.stderr.splitlines() if l.startswith(f"{module}: error: ")]
    assert line, proc.stderr[-2000:]
    for needle in needles:
        assert needle in line[0], line[0]


def test_cli_errors_for_bad_data(built_dataset, tmp_path):
    proc = run_cli("model.evaluate", f"--data_dir={tmp_path}", f"--output_dir={tmp_path}/r")
    assert_clean_error(proc, "model.evaluate", "homography_index.json")
    proc = run_cli("model.evaluate", f"--data_dir={built_dataset}", "--split=test", f"--output_dir={tmp_path}/r")
    assert_clean_error(proc, "model.evaluate", "split 'test'")
    empty = tmp_path / "run"
    empty.mkdir()
    proc = run_cli("model.evaluate", f"--data_dir={built_dataset}", f"--model_dir={empty}",
                   f"--output_dir={tmp_path}/r")
    assert_clean_error(proc, "model.evaluate", "cannot load a model", str(empty))
    assert not (tmp_path / "r" / report.JSON_FILE).exists()


def test_library_refuses_unknown_methods_and_network_without_model(built_dataset, tmp_path):
    with pytest.raises(evaluate.EvaluationError, match="unknown method"):
        evaluate.evaluate(built_dataset, "validation", str(tmp_path), methods=["surf"])
    with pytest.raises(evaluate.EvaluationError, match="needs --model_dir"):
        evaluate.evaluate(built_dataset, "validation", str(tmp_path), methods=["network"])
    with pytest.raises(evaluate.EvaluationError, match="'sift_or_network' needs --model_dir"):
        evaluate.evaluate(built_dataset, "validation", str(tmp_path), methods=["sift", "sift_or_network"])


# ---- the network, through a tiny real training run ----

@pytest.fixture(scope="module")
def tiny_run(built_dataset, tmp_path_factory):
    from model import train

    run = str(tmp_path_factory.mktemp("run") / "run")
    train.train(built_dataset, run, steps=2, batch_size=8, val_every=0, checkpoint_every=2, log_every=1,
                steps_per_loop=1, shuffle_buffer=16)
    return run


def test_batches_are_bounded_before_any_work(built_dataset, tmp_path):
    """Issue 24: --batch_size=1000000 read a whole split at once (65,536 pairs: past 8 GiB); now refused."""
    with pytest.raises(evaluate.EvaluationError, match=r"--batch_size 1000000: at most 128 pairs of \d+ px"):
        evaluate.evaluate(built_dataset, "validation", str(tmp_path / "r"), methods=["identity"], batch_size=10**6)
    assert not os.path.exists(tmp_path / "r")


def test_network_is_evaluated_batched(built_dataset, tiny_run, tmp_path):
    from model import network
    from model.estimators import learned

    result = evaluate.evaluate(built_dataset, "validation", str(tmp_path), model_dir=tiny_run,
                               max_pairs=20, num_visualizations=1, batch_size=8)
    assert list(result["methods"]) == ["identity", "orb", "sift", "ecc", "network", "network_tta"]
    net = result["methods"]["network"]
    assert net["num_pairs"] == 20 and net["failure_rate"] == 0 and np.isfinite(net["mean_mace"])
    assert result["model"]["model_dir"] == tiny_run and result["model"]["rho"] == 32
    # The report's network MACE is the MACE of model.network.predict_offsets on the same pairs.
    from model.training import data
    batch = next(iter(data.read_batches(built_dataset, "validation", 20)))
    model, run = network.load(tiny_run)
    pred = learned.network_offsets(model, batch["patch_a"].numpy(), batch["patch_b"].numpy(), run["rho"])
    errors = np.linalg.norm(pred - batch["offsets"].numpy().reshape(-1, 4, 2), axis=-1).mean(-1)
    assert net["mean_mace"] == pytest.approx(errors.mean(), abs=2e-3)
    tta = learned.network_offsets_tta(model, batch["patch_a"].numpy(), batch["patch_b"].numpy(), run["rho"])
    errors = np.linalg.norm(tta - batch["offsets"].numpy().reshape(-1, 4, 2), axis=-1).mean(-1)
    assert result["methods"]["network_tta"]["mean_mace"] == pytest.approx(errors.mean(), abs=2e-3)
    # SIFT where it finds H, the network where it does not: never an identity fallback.
    both = evaluate.evaluate(built_dataset, "validation", str(tmp_path / "both"), model_dir=tiny_run,
                             methods=["sift", "sift_or_network"], max_pairs=20, num_visualizations=0, batch_size=8)
    sift, hybrid = both["methods"]["sift"], both["methods"]["sift_or_network"]
    assert hybrid["failures"] == 0 and hybrid["num_pairs"] == 20
    if sift["failures"] == 0:
        assert hybrid["mean_mace"] == sift["mean_mace"]


def test_cli_refuses_a_model_of_another_patch_size(built_dataset, tiny_run, tmp_path):
    import keras

    from model import network

    other = tmp_path / "other"
    other.mkdir()
    network.build("homographynet", 64, 1).save(str(other / network.MODEL_FILE))
    with open(os.path.join(tiny_run, network.CONFIG_FILE)) as f:
        config = {**json.load(f), "patch_size": 64}
    (other / network.CONFIG_FILE).write_text(json.dumps(config))
    keras.backend.clear_session()
    proc = run_cli("model.evaluate", f"--data_dir={built_dataset}", f"--model_dir={other}",
                   f"--output_dir={tmp_path}/r")
    assert_clean_error(proc, "model.evaluate", "64 px", "128 px")


def test_cli_writes_the_report_with_the_network(built_dataset, tiny_run, tmp_path):
    proc = run_cli("model.evaluate", f"--data_dir={built_dataset}", f"--model_dir={tiny_run}",
                   f"--output_dir={tmp_path}", "--methods=identity,network", "--max_pairs=10",
                   "--num_visualizations=1", "--log_every=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network" in proc.stdout and "report:" in proc.stdout
    assert "10/10 pairs" in proc.stderr  # progress is logged
    with open(tmp_path / report.JSON_FILE) as f:
        assert list(json.load(f)["methods"]) == ["identity", "network"]
    shutil.rmtree(tmp_path)


def test_predict_cli_with_the_network(tiny_run, tmp_path):
    import cv2

    from tests.conftest import textured_image

    image = textured_image(np.random.default_rng(2), 320, 240)
    cv2.imwrite(str(tmp_path / "a.jpg"), image)
    cv2.imwrite(str(tmp_path / "b.jpg"), cv2.resize(image[20:220, 30:300], (200, 150)))
    proc = run_cli("model.predict", f"--model_dir={tiny_run}", "--method=network", f"--image_a={tmp_path}/a.jpg",
                   f"--image_b={tmp_path}/b.jpg", f"--output={tmp_path}/vis.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "H (network;" in proc.stdout and (tmp_path / "vis.png").exists()


def test_a_pool_of_workers_reports_what_one_process_does(built_dataset, tmp_path):
    """The per-pair work over 2 processes: the same numbers, pair for pair, as in this process alone."""
    runs = {}
    for workers in (1, 2):
        runs[workers] = evaluate.evaluate(built_dataset, "validation", str(tmp_path / str(workers)),
                                          methods=["orb", "sift+ecc", "orb_or_ecc"], max_pairs=24,
                                          num_visualizations=0, batch_size=8, workers=workers)
    assert runs[1]["workers"] == 1 and runs[2]["workers"] == 2
    for name in ("orb", "sift+ecc", "orb_or_ecc"):
        one, pool = (dict(runs[w]["methods"][name]) for w in (1, 2))
        one.pop("seconds_per_pair"), pool.pop("seconds_per_pair")
        assert one == pool, name
    assert runs[1]["pairs_fingerprint"] == runs[2]["pairs_fingerprint"]
    # the Markdown report: its main table parses back to the JSON, and each method sits beside its refined variant
    with open(tmp_path / "1" / report.MARKDOWN_FILE) as f:
        text = f.read()
    assert list(report.parse_markdown_table(text)) == ["orb", "sift+ecc", "orb_or_ecc"]
    kept = runs[1]["methods"]["sift+ecc"]["refinement_kept_start"]
    assert f"`sift+ecc`: refinement kept its start on {kept} of 24 pairs" in text
    assert "| **sift+ecc** | — |" in text
    assert "refinement_kept_start" in runs[1]["methods"]["sift+ecc"]
    answered = runs[1]["methods"]["orb_or_ecc"]["answered_by"]
    assert answered.get("ecc", 0) + answered.get("orb", 0) == 24 and "answered_by" not in runs[1]["methods"]["orb"]
    assert answered["orb"] == 24 - runs[1]["methods"]["orb"]["failures"]
