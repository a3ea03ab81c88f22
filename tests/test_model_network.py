"""model/network.py: HomographyNet's layer structure, ablation flags, predict_offsets."""
import pathlib

import keras
import numpy as np
import pytest

from model import network
from model.training import data


def layers_of(model, kind):
    return [l for l in model.layers if isinstance(l, kind)]


def test_layer_structure_matches_the_paper():
    m = network.build_homographynet()
    assert m.input_shape == (None, 128, 128, 2) and m.output_shape == (None, 8)
    convs = layers_of(m, keras.layers.Conv2D)
    assert [c.filters for c in convs] == [64, 64, 64, 64, 128, 128, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" for c in convs)
    assert len(layers_of(m, keras.layers.BatchNormalization)) == 8
    pools = layers_of(m, keras.layers.MaxPooling2D)
    assert len(pools) == 3 and all(p.pool_size == (2, 2) for p in pools)
    # Pools come after the 2nd, 4th and 6th conv; each conv is followed by BN then ReLU.
    order = [type(l).__name__ for l in m.layers if not isinstance(l, keras.layers.InputLayer)]
    blocks = " ".join(order).split("Conv2D")[1:]
    assert [("MaxPooling2D" in b) for b in blocks] == [False, True, False, True, False, True, False, False]
    assert all(b.split()[:2] == ["FusedBatchNormalization", "Activation"] for b in blocks)
    assert all(l.activation.__name__ == "relu" for l in layers_of(m, keras.layers.Activation))
    drops = layers_of(m, keras.layers.Dropout)
    assert [d.rate for d in drops] == [0.5, 0.5]
    dense = layers_of(m, keras.layers.Dense)
    assert [(d.units, d.activation.__name__) for d in dense] == [(1024, "relu"), (8, "linear")]
    assert order[-5:] == ["Flatten", "Dropout", "Dense", "Dropout", "Dense"]  # dropout before each dense
    # Plain Keras layers only: no TF ops inside the model (it must run on another Keras backend); the
    # fused BN runs Keras's own layer off TensorFlow.
    assert all(type(l).__module__.startswith("keras.") or type(l) is network.FusedBatchNormalization
               for l in m.layers)
    filters = [64, 64, 64, 64, 128, 128, 128, 128]
    convs_params = sum(9 * i * o for i, o in zip([2] + filters[:-1], filters))
    bn_params = 4 * (4 * 64 + 4 * 128)
    dense_params = 16 * 16 * 128 * 1024 + 1024 + 1024 * 8 + 8
    assert m.count_params() == convs_params + bn_params + dense_params  # convs without bias under BN


def test_ablation_flags_remove_layers():
    m = network.build_homographynet(patch_size=32, dropout=False)
    assert not layers_of(m, keras.layers.Dropout) and len(layers_of(m, keras.layers.BatchNormalization)) == 8
    m = network.build_homographynet(patch_size=32, batchnorm=False)
    assert not layers_of(m, keras.layers.BatchNormalization) and len(layers_of(m, keras.layers.Dropout)) == 2
    assert all(c.use_bias for c in layers_of(m, keras.layers.Conv2D))
    assert len(layers_of(m, keras.layers.Conv2D)) == 8


def test_colour_input_and_registry():
    assert network.ARCHITECTURES["homographynet"] is network.build_homographynet
    m = network.build("homographynet", patch_size=64, channels=3)
    assert m.input_shape == (None, 64, 64, 6)
    with pytest.raises(ValueError, match="unknown architecture"):
        network.build("resnet", 64, 1)


def test_mixed_precision_keeps_a_float32_output():
    m = network.build_homographynet(patch_size=32, dtype="mixed_bfloat16")
    assert m.get_layer("conv1").compute_dtype == "bfloat16"
    assert m.get_layer("offsets").compute_dtype == "float32"
    assert m(np.zeros((2, 32, 32, 2), np.float32)).dtype == "float32"


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"])
def test_fused_batchnorm_trains_like_keras_own(policy):
    """Output, gradients and moving statistics of a training step equal Keras's composed BN: a wrong
    variance correction, momentum or cast shows here."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).normal(2, 3, (4, 8, 8, 5)), tf.float32)
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=5).astype(np.float32) for _ in range(2)] + [rng.normal(size=5).astype(np.float32),
                                                                           np.full(5, 2, np.float32)]
    results = []
    for layer in (keras.layers.BatchNormalization(momentum=0.9, dtype=policy),
                  network.FusedBatchNormalization(momentum=0.9, dtype=policy)):
        layer.build(x.shape)
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(y, tf.float32)))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance, layer(x, training=False)])
    tol = 1e-5 if policy is None else 2e-2
    for name, plain, fused in zip(["y", "dx", "dgamma", "dbeta", "mean", "variance", "inference"], *results):
        plain, fused = np.asarray(plain, np.float32), np.asarray(fused, np.float32)
        np.testing.assert_allclose(fused, plain, rtol=tol, atol=tol * np.abs(plain).max(), err_msg=name)
    assert fused.dtype == np.float32 and results[1][0].dtype == results[0][0].dtype


def test_final_model_file_holds_keras_own_layers_only(tmp_path):
    import json
    import zipfile

    from model.training import run_dir

    m = network.build_homographynet(patch_size=32)
    assert network.FusedBatchNormalization in {type(l) for l in m.layers}
    m.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).random((4, 32, 32, 2), np.float32)
    m.fit(x, np.zeros((4, 8), np.float32), epochs=1, verbose=0)  # moving statistics away from their start
    path = str(tmp_path / "model.keras")
    run_dir.save_final_model(m, path)
    with zipfile.ZipFile(path) as z:
        config = z.read("config.json").decode()
    assert "FusedBatchNormalization" not in config and "homography>" not in config
    registered = keras.saving.get_custom_objects()
    saved = dict(registered)
    registered.clear()  # loads without this project's registrations
    try:
        loaded = keras.models.load_model(path)
    finally:
        registered.update(saved)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(m(x, training=False)),
                               rtol=1e-5, atol=1e-6)


def test_predict_offsets_is_model_output_times_rho():
    m = network.build_homographynet(patch_size=32)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    got = network.predict_offsets(m, a, b, rho=8, batch_size=2)  # batches of 2, 2, 1
    assert got.shape == (5, 8) and got.dtype == np.float32
    want = np.asarray(m(data.normalize(a, b), training=False)) * 8
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="patches must both be"):
        network.predict_offsets(m, a, b[:3], rho=8)


def test_compact_network_is_small_strided_and_keeps_position():
    m = network.build("compact", 128, 1, dropout=True)
    assert m.input_shape == (None, 128, 128, 2) and m.output_shape == (None, 8)
    assert m.count_params() < 2_000_000  # the bound; the paper's network holds 34 M
    convs = layers_of(m, keras.layers.Conv2D)
    # No conv works at full resolution: the stem is a 4x4 stride-4 conv, then the map halves to P/32.
    assert convs[0].kernel_size == (4, 4) and convs[0].strides == (4, 4)
    assert [c.strides[0] for c in convs[1:]] == [s for _, s in network.COMPACT_STAGES]
    assert m.get_layer("flatten").output.shape[1:] == (4 * 4 * 8 * 32,)  # a 4x4 map, not a global pool
    assert [d.units for d in layers_of(m, keras.layers.Dense)] == [8]
    assert [d.rate for d in layers_of(m, keras.layers.Dropout)] == [0.2]
    assert not layers_of(network.build("compact", 64, 1, dropout=False), keras.layers.Dropout)
    assert all(type(l).__module__.startswith("keras.") or type(l) is network.FusedBatchNormalization
               for l in m.layers)  # any Keras backend
    # A shift of the content moves the features: the output depends on where things are.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 128, 128, 2)).astype(np.float32)
    y = np.asarray(m(x, training=False))
    assert not np.allclose(y, np.asarray(m(np.roll(x, 16, axis=2), training=False)), atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 32"):
        network.build("compact", 100, 1)


def test_the_shipped_network_is_trained_and_loads(built_dataset):
    """The weights that ship with the project: present, small, and far better than the identity on
    coco_mini validation pairs it never saw (trained on train2017 only)."""
    from pipeline import records

    found = network.shipped_model_dir()
    assert found == network.SHIPPED_MODEL_DIR and found.endswith("data/weights/compact_rho32")
    assert (pathlib.Path(found) / network.MODEL_FILE).stat().st_size < 10 * 2**20
    assert (pathlib.Path(found) / "CARD.md").is_file()
    model, config = network.load(found)
    assert config["architecture"] == "compact" and config["rho"] == 32 and model.count_params() < 2_000_000
    batch = next(records.batches(built_dataset, "validation", 64))
    pred = network.predict_offsets(model, batch["patch_a"], batch["patch_b"], rho=32).reshape(-1, 4, 2)
    true = batch["offsets"].reshape(-1, 4, 2)
    mace = np.linalg.norm(pred - true, axis=-1).mean()
    identity = np.linalg.norm(true, axis=-1).mean()
    assert identity > 18 and mace < 0.4 * identity  # shipped: ~5.6 px against ~24.6 on val2017
