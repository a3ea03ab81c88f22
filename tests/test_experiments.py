"""model.experiments: the smoke sweep end to end on the synthetic COCO layout, resuming, frozen layers, colour.

One sweep (all variants, a few steps each) is shared by the module; the tests read what it left.
"""
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from model import experiments, network

STEPS = 6


@pytest.fixture(scope="module")
def sweep(synthetic_coco, tmp_path_factory):
    smoke = experiments.SCALES["smoke"]
    scale = dataclasses.replace(smoke, max_images=0, train={**smoke.train, "steps": STEPS, "batch_size": 8,
                                                            "val_every": 3, "log_every": 3, "steps_per_loop": 3,
                                                            "checkpoint_every": STEPS, "lr_decay_steps": 2})
    s = experiments.Settings(synthetic_coco, str(tmp_path_factory.mktemp("exp")), scale, "smoke")
    return s, experiments.run_sweep(s)


def _log(s):
    with open(os.path.join(s.output_dir, experiments.LOG_FILE)) as f:
        return [json.loads(line) for line in f]


def _markers(s):
    paths = [os.path.join(experiments.variant_dir(s, v.name), "result.json") for v in experiments.VARIANTS]
    for sub in ("data", "classical"):
        d = os.path.join(s.output_dir, sub)
        paths += [os.path.join(d, n) for n in os.listdir(d) if n.endswith(".done.json")]
    return {p: os.stat(p).st_mtime_ns for p in paths}


def test_report_lists_every_variant_with_finite_mace(sweep):
    s, report = sweep
    with open(os.path.join(s.output_dir, experiments.REPORT_JSON)) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(report))
    rows = {r["variant"]: r for r in on_disk["variants"]}
    assert set(rows) == set(experiments.VARIANTS_BY_NAME)
    for name, r in rows.items():
        assert r["steps"] == STEPS, name
        for k in ("mace_mean", "mace_median", "identity_mean", "orb_mean", "train_seconds"):
            assert math.isfinite(r[k]), (name, k)
        assert r["parameters"] >= r["trainable_parameters"] > 0
    # identity is the expected 0.765 * rho (the smoke rho of each dataset) within sampling noise
    for name in ("rho20", "rho32", "rho40"):
        assert rows[name]["identity_mean"] == pytest.approx(0.765 * rows[name]["rho"], rel=0.25)
    assert rows["no_batchnorm"]["parameters"] < rows["rho32"]["parameters"]  # BN's gamma/beta/stats gone
    md = open(os.path.join(s.output_dir, experiments.REPORT_MD)).read()
    for name in rows:
        assert f"| {name} |" in md
    assert "random initialisation" in md  # the towers' weights are said to be random
    for png in (experiments.RHO_PLOT, experiments.ABLATION_PLOT, experiments.TRANSFER_PLOT):
        with open(os.path.join(s.output_dir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    # one dataset per distinct (rho, channels): 3 grayscale rhos and the colour one
    built = [e["what"] for e in _log(s) if e["event"] == "build"]
    assert sorted(built) == sorted(f"dataset {n}" for n in ("rho5_gray", "rho8_gray", "rho10_gray", "rho8_color"))


def test_rerun_skips_completed_work(sweep):
    s, _ = sweep
    before, n = _markers(s), len(_log(s))
    experiments.run_sweep(s)
    new = _log(s)[n:]
    assert {e["event"] for e in new} == {"start", "skip", "done"}
    assert _markers(s) == before  # nothing rewritten


def test_interrupted_variant_resumes_without_retraining(sweep):
    s, _ = sweep
    os.remove(os.path.join(experiments.variant_dir(s, "rho40"), "result.json"))  # died after training
    n = len(_log(s))
    experiments.run_sweep(s, ["rho40"])
    ran = [e for e in _log(s)[n:] if e["event"] in ("build", "train")]
    assert ran == [{**ran[0], "event": "train", "what": "variant rho40", "steps": f"{STEPS}->{STEPS}"}]
    assert os.path.exists(os.path.join(experiments.variant_dir(s, "rho40"), "result.json"))


def test_other_settings_are_refused(sweep):
    s, _ = sweep
    other = dataclasses.replace(s, scale=dataclasses.replace(s.scale, train={**s.scale.train, "steps": STEPS + 1}))
    with pytest.raises(experiments.ExperimentError, match="other settings"):
        experiments.run_variant(other, experiments.VARIANTS_BY_NAME["rho32"])


def _weights(layer):
    return [np.asarray(w) for w in layer.get_weights()]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_finetune_keeps_frozen_convs_of_its_source(sweep):
    s, _ = sweep
    source, _ = network.load(experiments.run_dir(s, "rho20"))
    tuned, config = network.load(experiments.run_dir(s, "finetune_from_rho20"))
    frozen = config["architecture_options"]["freeze"]
    assert frozen == network.first_convs(s.finetune_frozen_convs)
    for name in frozen:
        assert not tuned.get_layer(name).trainable
        assert _same(_weights(tuned.get_layer(name)), _weights(source.get_layer(name))), name
    # the layers after them did train
    assert not _same(_weights(tuned.get_layer("conv5")), _weights(source.get_layer("conv5")))
    assert not _same(_weights(tuned.get_layer("offsets")), _weights(source.get_layer("offsets")))


def test_mobilenet_towers_frozen_layers_unchanged(sweep):
    import keras

    s, _ = sweep
    trained, config = network.load(experiments.run_dir(s, "mobilenetv2_towers"))
    options = config["architecture_options"]
    keras.utils.set_random_seed(config["seed"])  # model.train seeds right before building: same initial weights
    initial = network.build("mobilenetv2_towers", config["patch_size"], config["channels"], config["dropout"],
                            config["batchnorm"], options=options)
    n = options["frozen_layers"]
    assert n == s.tower_frozen_layers == 130
    for tower in ("tower_a", "tower_b"):
        before, after = initial.get_layer(tower).layers, trained.get_layer(tower).layers
        assert len(after) > n
        frozen = [i for i in range(n) if before[i].weights]
        assert frozen and all(not after[i].trainable for i in frozen)
        for i in frozen:
            assert _same(_weights(before[i]), _weights(after[i])), (tower, after[i].name)
        # the unfrozen end of the tower did train
        assert any(not _same(_weights(before[i]), _weights(after[i])) for i in range(n, len(after)) if after[i].weights)
    assert not _same(_weights(initial.get_layer("fc1")), _weights(trained.get_layer("fc1")))


def test_colour_records_have_three_channels_and_the_model_six(sweep):
    import tensorflow as tf

    from model.training import data
    from pipeline.dataset import schema

    s, _ = sweep
    result = json.load(open(os.path.join(experiments.variant_dir(s, "colour"), "result.json")))
    cfg = data.dataset_config(result["data_dir"], "train")
    assert cfg.channels == 3
    raw = next(iter(tf.data.TFRecordDataset(list(cfg.shard_files))))
    example = tf.train.Example.FromString(raw.numpy())
    p = cfg.patch_size
    for key in (schema.PATCH_A, schema.PATCH_B):
        assert len(example.features.feature[key].bytes_list.value[0]) == p * p * 3
    model, _ = network.load(result["run_dir"])
    assert tuple(model.inputs[0].shape[1:]) == (p, p, 6)
    gray, _ = network.load(experiments.run_dir(s, "rho32"))
    assert tuple(gray.inputs[0].shape[1:]) == (p, p, 2)


def test_select_adds_the_source_of_a_finetune_and_refuses_unknown_names():
    assert [v.name for v in experiments.select(["finetune_from_rho20"])] == ["rho20", "finetune_from_rho20"]
    with pytest.raises(experiments.ExperimentError, match="unknown variant"):
        experiments.select(["rho33"])


def test_tower_weights_from_a_file(tmp_path):
    import keras

    keras.utils.set_random_seed(1)
    source = network.build("mobilenetv2_towers", 32, 1, options={"alpha": 0.35})
    path = str(tmp_path / "tower.weights.h5")
    source.get_layer("tower_a").save_weights(path)
    keras.utils.set_random_seed(2)
    model = network.build("mobilenetv2_towers", 32, 1, options={"alpha": 0.35, "weights": path})
    for tower in ("tower_a", "tower_b"):  # both towers start from the file
        assert _same([np.asarray(w) for w in model.get_layer(tower).get_weights()],
                     [np.asarray(w) for w in source.get_layer("tower_a").get_weights()])
    s = experiments.Settings("unused", str(tmp_path), experiments.SCALES["smoke"], tower_weights=str(tmp_path / "no.h5"))
    with pytest.raises(experiments.ExperimentError, match="no such file"):
        experiments.run_sweep(s, ["mobilenetv2_towers"])


def test_architecture_option_puts_the_compact_network_in_the_homographynet_variants(synthetic_coco, tmp_path):
    smoke = experiments.SCALES["smoke"]
    scale = dataclasses.replace(smoke, max_images=0, train={**smoke.train, "steps": 4, "batch_size": 8,
                                                            "val_every": 4, "log_every": 2, "steps_per_loop": 2,
                                                            "checkpoint_every": 4, "lr_decay_steps": 2})
    s = experiments.Settings(synthetic_coco, str(tmp_path / "exp"), scale, "smoke", architecture="compact",
                             bn_momentum=0.9)
    report = experiments.run_sweep(s, ["no_batchnorm"])
    row = report["variants"][0]
    config = json.load(open(os.path.join(experiments.run_dir(s, "no_batchnorm"), "config.json")))
    assert row["architecture"] == config["architecture"] == "compact" and config["batchnorm"] is False
    assert config["architecture_options"] == {"bn_momentum": 0.9} and config["final_step"] == 4
    model, _ = network.load(experiments.run_dir(s, "no_batchnorm"))
    assert row["parameters"] == model.count_params() == network.build_compact(32, batchnorm=False).count_params()
    assert "--architecture=compact" in open(os.path.join(s.output_dir, experiments.REPORT_MD)).read()


def test_a_dataset_from_before_the_index_moved_is_rebuilt(sweep):
    from pipeline.dataset import dataset_info, schema

    s, _ = sweep
    data = os.path.join(s.output_dir, "data", experiments.dataset_name(8, 1))
    raw = dataset_info.read(data).raw
    os.remove(os.path.join(data, schema.INDEX))  # what a build from before issue 23 left: the index under TFDS's name
    os.remove(os.path.join(data, schema.TFDS_FEATURES))
    with open(os.path.join(data, schema.TFDS_DATASET_INFO), "w") as f:
        json.dump({**raw, "format_version": 1}, f)
    n = len(_log(s))
    assert experiments.ensure_dataset(s, 8, 1) == data
    assert [e["what"] for e in _log(s)[n:] if e["event"] == "build"] == [f"dataset {experiments.dataset_name(8, 1)}"]
    assert dataset_info.read(data).raw["splits"] == raw["splits"]
