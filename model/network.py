"""HomographyNet (DeTone et al. 2016), regression head, in plain Keras 3 layers (backend-agnostic).

Input: (P, P, 2C) = patch A and patch B stacked on channels, normalised by model.training.data.normalize.
Output: 8 linear values = offsets / rho ((dx, dy) for TL, TR, BR, BL).
"""
from __future__ import annotations

import json
import os

import keras
import numpy as np

from model.training import data

CONV_FILTERS = (64, 64, 64, 64, 128, 128, 128, 128)
POOL_AFTER = (2, 4, 6)  # 2x2 max-pool after these convolutions (1-based)
DENSE_UNITS = 1024
DROPOUT_RATE = 0.5
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Weights trained by the project and shipped with it (a run directory: model.keras, config.json, CARD.md).
# Commands that take --model_dir use them when it is not given.
SHIPPED_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "weights",
                                 "compact_rho32")


def shipped_model_dir() -> str | None:
    """The shipped run directory, or None when this checkout has no trained weights in it."""
    return SHIPPED_MODEL_DIR if os.path.exists(os.path.join(SHIPPED_MODEL_DIR, MODEL_FILE)) else None


@keras.saving.register_keras_serializable(package="homography")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training step on TensorFlow runs TensorFlow's fused kernel.

    Keras 3 composes BN from moments and elementwise ops, and the gradient keeps each of their outputs:
    +16 MB a 128 px pair in HomographyNet's step and 1.5x its time on a CPU (bench/step_memory.py,
    BUILD_NOTES section 6). The fused kernel keeps its input alone. Same variables, config and results
    (tests/test_model_network.py); the plain layer runs elsewhere (inference, JAX, masks, renorm), and
    run_dir.save_final_model saves a model.keras of plain Keras layers."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and mask is None and not self.renorm and self.center and self.scale
                and keras.backend.backend() == "tensorflow" and len(inputs.shape) == 4
                and self.axis in (-1, 3)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.cast(inputs, "float32")  # as Keras does: statistics in float32 whatever the policy
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, tf.cast(self.gamma, "float32"),
                                                            tf.cast(self.beta, "float32"), epsilon=self.epsilon,
                                                            data_format="NHWC", is_training=True)
        # The kernel's batch variance carries Bessel's correction; Keras's moving variance does not.
        n = tf.cast(tf.size(x) // tf.size(variance), "float32")
        variance = variance * (n - 1.0) / n
        m = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean, "float32") * m + mean * (1.0 - m))
        self.moving_variance.assign(tf.cast(self.moving_variance, "float32") * m + variance * (1.0 - m))
        return tf.cast(y, self.compute_dtype)


FUSED_BN_NAME = keras.saving.get_registered_name(FusedBatchNormalization)


def _batchnorm(fused: bool):
    return FusedBatchNormalization if fused else keras.layers.BatchNormalization


def build_homographynet(patch_size: int = 128, channels: int = 1, dropout: bool = True, batchnorm: bool = True,
                        dtype=None, name: str = "homographynet", bn_momentum: float = 0.99,
                        fused_bn: bool = True) -> keras.Model:
    """Eight 3x3 convs (64,64,64,64,128,128,128,128), each conv -> [BN] -> ReLU; 2x2 max-pool after the
    2nd, 4th and 6th; [dropout 0.5] -> dense 1024 ReLU -> [dropout 0.5] -> dense 8, linear.

    dtype: a Keras dtype policy for every layer ("mixed_bfloat16", "mixed_float16"); the output layer
    always computes in float32 so the regression and its loss stay in full precision.
    bn_momentum: of BN's moving statistics (Keras's 0.99 averages ~100 steps: right for the paper's 90,000
    steps; a run of a few hundred steps needs ~0.9, or its inference-mode statistics lag its weights).
    fused_bn: FusedBatchNormalization (False: Keras's own layer, for bench.train's comparison).
    """
    inputs = keras.Input((patch_size, patch_size, 2 * channels), name="patches")
    x = inputs
    for i, filters in enumerate(CONV_FILTERS, start=1):
        # With BN the conv bias is redundant (BN's beta takes its role).
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm, dtype=dtype, name=f"conv{i}")(x)
        if batchnorm:
            x = _batchnorm(fused_bn)(momentum=bn_momentum, dtype=dtype, name=f"bn{i}")(x)
        x = keras.layers.Activation("relu", dtype=dtype, name=f"relu{i}")(x)
        if i in POOL_AFTER:
            x = keras.layers.MaxPooling2D(2, dtype=dtype, name=f"pool{POOL_AFTER.index(i) + 1}")(x)
    x = keras.layers.Flatten(dtype=dtype, name="flatten")(x)
    if dropout:
        x = keras.layers.Dropout(DROPOUT_RATE, dtype=dtype, name="dropout1")(x)
    x = keras.layers.Dense(DENSE_UNITS, activation="relu", dtype=dtype, name="fc1")(x)
    if dropout:
        x = keras.layers.Dropout(DROPOUT_RATE, dtype=dtype, name="dropout2")(x)
    outputs = keras.layers.Dense(8, activation=None, dtype="float32", name="offsets")(x)
    return keras.Model(inputs, outputs, name=name)


COMPACT_STEM = 4  # conv1: a 4x4 stride-4 conv ("patchify"): 4*4*2 = 32 input values -> `width` features
COMPACT_STAGES = ((1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 1))  # conv2..conv8: (width multiple, stride)


def build_compact(patch_size: int = 128, channels: int = 1, dropout: bool = True, batchnorm: bool = True,
                  dtype=None, name: str = "compact", bn_momentum: float = 0.99, width: int = 32,
                  dropout_rate: float = 0.2, fused_bn: bool = True) -> keras.Model:
    """A compact HomographyNet (~1.2 M parameters at width 32, against the paper's 34 M) that trains fast on
    a CPU as well as on a GPU. Two changes carry the speed (bench.train):
    - no layer works at full resolution: conv1 is a 4x4 stride-4 conv over non-overlapping 4x4 cells of
      the stacked pair (as wide as its input, so it can pass every pixel on), where the paper's first two
      3x3 convs at 128x128 cost most of its compute;
    - 3x3 convs with stride 2 halve the map down to P/32 (4x4x(8 width)), so the paper's 32 M-weight dense
      layer on a 16x16x128 map becomes one 8-output dense layer. It still sees where in the patch each
      feature lies (a global average pool would throw that away).
    Each conv -> [BN] -> ReLU; [dropout(dropout_rate)] before the output layer. fused_bn: as for HomographyNet.
    """
    if patch_size % 32:
        raise ValueError(f"the compact network needs a patch size divisible by 32, got {patch_size}")
    inputs = keras.Input((patch_size, patch_size, 2 * channels), name="patches")
    x = inputs
    layers = [(width, COMPACT_STEM, COMPACT_STEM)] + [(m * width, 3, s) for m, s in COMPACT_STAGES]
    for i, (filters, kernel, stride) in enumerate(layers, start=1):
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=not batchnorm,
                                dtype=dtype, name=f"conv{i}")(x)
        if batchnorm:
            x = _batchnorm(fused_bn)(momentum=bn_momentum, dtype=dtype, name=f"bn{i}")(x)
        x = keras.layers.Activation("relu", dtype=dtype, name=f"relu{i}")(x)
    x = keras.layers.Flatten(dtype=dtype, name="flatten")(x)
    if dropout:
        x = keras.layers.Dropout(dropout_rate, dtype=dtype, name="dropout")(x)
    outputs = keras.layers.Dense(8, activation=None, dtype="float32", name="offsets")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="homography")
class PatchChannels(keras.layers.Layer):
    """Patch `index` (0 = A, 1 = B) of the stacked (P, P, 2C) input as 3 channels (grayscale repeated)."""

    def __init__(self, index: int, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.index, self.channels = int(index), int(channels)

    def call(self, x):
        c = self.channels
        return keras.ops.repeat(x[..., self.index * c:(self.index + 1) * c], 3 // c, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (3,)

    def get_config(self):
        return {**super().get_config(), "index": self.index, "channels": self.channels}


TOWER_FROZEN_LAYERS = 130  # the seed's choice: MobileNetV2's first 130 of 154 layers keep their weights
TOWER_L2 = 0.01


def build_mobilenetv2_towers(patch_size: int = 128, channels: int = 1, dropout: bool = False,
                             batchnorm: bool = True, dtype=None, name: str = "mobilenetv2_towers", *,
                             frozen_layers: int = TOWER_FROZEN_LAYERS, l2: float = TOWER_L2, weights=None,
                             alpha: float = 1.0) -> keras.Model:
    """The seed's transfer model: one headless MobileNetV2 (keras.applications) per patch, each fed its patch
    as 3 channels (grayscale repeated), the first `frozen_layers` layers of each tower frozen, the two
    flattened feature maps concatenated -> [dropout 0.5] -> dense 1024 ReLU with L2(l2) -> [dropout] -> dense 8.

    weights: None (random towers), 'imagenet' (needs the network) or the path of a headless MobileNetV2
    weights file with the same alpha. batchnorm is ignored (MobileNetV2 has its own); dtype applies to the head.
    """
    if patch_size < 32 or channels not in (1, 3):
        raise ValueError(f"MobileNetV2 towers need patch_size >= 32 and 1 or 3 channels, got {patch_size}, {channels}")
    inputs = keras.Input((patch_size, patch_size, 2 * channels), name="patches")
    features = []
    for i, tag in enumerate("ab"):
        tower = keras.applications.MobileNetV2(input_shape=(patch_size, patch_size, 3), alpha=alpha,
                                               include_top=False, weights=weights, name=f"tower_{tag}")
        for layer in tower.layers[:frozen_layers]:
            layer.trainable = False  # frozen BatchNormalization layers also run in inference mode
        x = tower(PatchChannels(i, channels, name=f"patch_{tag}")(inputs))
        features.append(keras.layers.Flatten(name=f"flatten_{tag}")(x))
    x = keras.layers.Concatenate(name="features")(features)
    if dropout:
        x = keras.layers.Dropout(DROPOUT_RATE, dtype=dtype, name="dropout1")(x)
    x = keras.layers.Dense(DENSE_UNITS, activation="relu", kernel_regularizer=keras.regularizers.L2(l2),
                           dtype=dtype, name="fc1")(x)
    if dropout:
        x = keras.layers.Dropout(DROPOUT_RATE, dtype=dtype, name="dropout2")(x)
    outputs = keras.layers.Dense(8, activation=None, dtype="float32", name="offsets")(x)
    return keras.Model(inputs, outputs, name=name)


# Architectures selectable with --architecture; each builder takes (patch_size, channels, dropout,
# batchnorm, dtype, **its own options) and returns a model mapping normalised (P, P, 2C) input to 8 scaled offsets.
ARCHITECTURES = {"homographynet": build_homographynet, "compact": build_compact,
                 "mobilenetv2_towers": build_mobilenetv2_towers}
# Options of build() that only set initial weights: a restore from a checkpoint does not need them.
INIT_ONLY_OPTIONS = ("init_from", "weights")


def build(architecture: str, patch_size: int, channels: int, dropout: bool = True, batchnorm: bool = True,
          dtype=None, options: dict | None = None) -> keras.Model:
    """options: the builder's own keyword options, plus two for any architecture:
    init_from: a training run directory whose weights are copied in, layer by layer (by name);
    freeze: names of layers (of the top-level model) made non-trainable."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{architecture}'; known: {', '.join(sorted(ARCHITECTURES))}")
    options = dict(options or {})
    init_from, freeze = options.pop("init_from", None), options.pop("freeze", ())
    model = ARCHITECTURES[architecture](patch_size=patch_size, channels=channels, dropout=dropout,
                                        batchnorm=batchnorm, dtype=dtype, **options)
    if init_from:
        source, _ = load(init_from)
        names = {layer.name for layer in source.layers}
        copied = [layer.name for layer in model.layers if layer.weights and layer.name in names]
        if not copied:
            raise ValueError(f"no layer of {init_from} matches a layer of the new {architecture} model")
        for name in copied:
            model.get_layer(name).set_weights(source.get_layer(name).get_weights())  # ValueError on a shape mismatch
    for name in freeze:
        model.get_layer(name).trainable = False  # ValueError for an unknown name
    return model


def first_convs(k: int, batchnorm: bool = True) -> list:
    """HomographyNet's layers up to its k-th convolution that hold weights: conv1, bn1, ..., convk, bnk."""
    return [n for i in range(1, k + 1) for n in ([f"conv{i}"] + ([f"bn{i}"] if batchnorm else []))]


class RunConfigError(ValueError):
    """A run directory's config.json that cannot be read as a run's config; the message names it."""


def read_config(model_dir: str) -> dict | None:
    """model_dir/config.json as a dict, None when there is none; RunConfigError (one line) when it is not
    readable JSON of an object (cut short, overwritten, not a run's)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunConfigError(f"{path} cannot be read as a run's config ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise RunConfigError(f"{path} is not a run's config (a JSON object), it holds a {type(config).__name__}")
    return config


def footprint(architecture: str, patch_size: int, channels: int, dropout: bool = True, batchnorm: bool = True,
              options: dict | None = None) -> tuple[int, int]:
    """(values its layers compute for one example, weights) of the network model.train would build: what a
    step holds per pair and per run (model.train's memory bound). Built on the side, never trained."""
    options = {k: v for k, v in (options or {}).items() if k not in ("init_from", "freeze")}
    model = build(architecture, patch_size, channels, dropout, batchnorm, options=options)

    def values(layer) -> int:
        inner = getattr(layer, "layers", None)
        if inner:
            return sum(values(sub) for sub in inner)
        return int(np.prod(layer.output.shape[1:])) if not isinstance(layer, keras.layers.InputLayer) else 0

    return values(model), model.count_params()


# The smallest patch each network takes (and the multiple its patch size must be): the compact network's
# stride-4 stem and three stride-2 stages bring a patch to P/32; HomographyNet's three 2x2 poolings to P/8.
PATCH_NEEDS = {"homographynet": (8, 1), "compact": (32, 32), "mobilenetv2_towers": (32, 1)}


def input_problem(architecture: str, patch_size: int, channels: int) -> str | None:
    """Why `architecture` cannot take (patch_size, channels) patches, in one line; None when it can."""
    smallest, multiple = PATCH_NEEDS.get(architecture, (1, 1))
    if patch_size < smallest or patch_size % multiple:
        return (f"the {architecture} network needs patches of at least {smallest} px"
                + (f" and a multiple of {multiple}" if multiple > 1 else "")
                + f"; this data's patches are {patch_size} px")
    if architecture == "mobilenetv2_towers" and channels not in (1, 3):
        return f"the {architecture} network needs 1 or 3 channels, this data has {channels}"
    return None


def load(model_dir: str):
    """(keras model, run config dict) of a training run: model_dir/model.keras, else its latest checkpoint."""
    config = read_config(model_dir)
    if config is None:
        raise FileNotFoundError(f"no {CONFIG_FILE} in {model_dir}: not a training run directory")
    path = os.path.join(model_dir, MODEL_FILE)
    if os.path.exists(path):
        return keras.models.load_model(path), config
    from model.training import run_dir  # checkpoints: Keras weights files, either backend

    options = {k: v for k, v in (config.get("architecture_options") or {}).items() if k not in INIT_ONLY_OPTIONS}

    def model_for(step):
        return (build(config["architecture"], config["patch_size"], config["channels"], config["dropout"],
                      config["batchnorm"], dtype=dtype_policy(config.get("mixed_precision", "none")), options=options),)
    # the model's weights (the optimizer's are not needed here), from the newest checkpoint that loads
    latest = run_dir.restore_newest(model_dir, model_for)
    if latest is None:
        raise FileNotFoundError(f"{model_dir} holds neither {MODEL_FILE} nor a checkpoint")
    return latest[0][0], config


def dtype_policy(mixed_precision: str):
    """--mixed_precision value -> Keras dtype policy name (None = float32)."""
    policies = {"none": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    if mixed_precision not in policies:
        raise ValueError(f"mixed_precision must be one of {', '.join(policies)}, got '{mixed_precision}'")
    return policies[mixed_precision]


def predict_offsets(model: keras.Model, patch_a: np.ndarray, patch_b: np.ndarray, rho: float,
                    batch_size: int = 64) -> np.ndarray:
    """Offsets in pixels, (N, 8) float32 numpy, from uint8 patches (N, P, P, C) (inference mode)."""
    patch_a, patch_b = np.asarray(patch_a), np.asarray(patch_b)
    if patch_a.shape != patch_b.shape or patch_a.ndim != 4:
        raise ValueError(f"patches must both be (N, P, P, C), got {patch_a.shape} and {patch_b.shape}")
    out = []
    for i in range(0, len(patch_a), batch_size):
        x = data.normalize(patch_a[i:i + batch_size], patch_b[i:i + batch_size])
        out.append(np.asarray(model.predict_on_batch(x), np.float32))
    if not out:
        return np.zeros((0, 8), np.float32)
    return np.concatenate(out) * np.float32(rho)
