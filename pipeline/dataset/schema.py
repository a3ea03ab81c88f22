"""The record schema of DESIGN.md: the one module the builder writes with and every reader parses with.

One tf.train.Example per pair:
  patch_a, patch_b : bytes, raw uint8 P*P*C, row-major (H, W, C)
  offsets          : float32 x 8, (dx, dy) for TL, TR, BR, BL, pixels
  corners          : float32 x 8, patch A corners in the resized image
  image_id         : int64, COCO image id
  patch_index      : int64, 0 .. patches_per_image - 1
  photometric_a, photometric_b : float32 x 10, only in `--photometric=camera` builds: the camera parameters
                     each patch was seen through (pipeline/dataset/photometric.py, FIELDS order)

encode/decode need no TensorFlow (pipeline.dataset.tf_example: the Example message in protobuf's runtime, the
same bytes as tf.train.Example); feature_spec/parse_batch, the tf.data path, import it when called.
"""
from __future__ import annotations

import numpy as np

from pipeline.dataset import tf_example

PATCH_A = "patch_a"
PATCH_B = "patch_b"
OFFSETS = "offsets"
CORNERS = "corners"
IMAGE_ID = "image_id"
PATCH_INDEX = "patch_index"
PHOTOMETRIC_A = "photometric_a"
PHOTOMETRIC_B = "photometric_b"

# The record schema's version: a build's TFDS version (dataset_info.json, and the <data_dir>/<name>/<version>
# folder tfds.load looks in). Bump it whenever a feature above is added, removed or changes meaning, and add
# a line to RELEASE_NOTES saying what changed (tests/test_tfds.py pins the features it stands for).
VERSION = "1.0.0"
RELEASE_NOTES = {
    "1.0.0": "The record schema of DESIGN.md (patch_a, patch_b, offsets, corners, image_id, patch_index; "
             "photometric_a, photometric_b in camera builds); the first build readable by TFDS.",
}

# What a build writes beside its shards (DESIGN.md, Output layout):
INDEX = "homography_index.json"           # the project's own index (pipeline/dataset/dataset_info.py)
TFDS_DATASET_INFO = "dataset_info.json"   # TensorFlow Datasets' DatasetInfo (pipeline/dataset/tfds_metadata.py)
TFDS_FEATURES = "features.json"           # TensorFlow Datasets' FeaturesDict (the same module)


def shard_prefix(name: str, split: str) -> str:
    """TFDS-style shard names: <name>-<split>.tfrecord-00000-of-000NN."""
    return f"{name}-{split}.tfrecord"


def shard_file(name: str, split: str, index: int, num_shards: int) -> str:
    """The file of shard `index` of `num_shards` (TFDS's template {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y})."""
    return f"{shard_prefix(name, split)}-{index:05d}-of-{num_shards:05d}"


def failed_images_file(split: str) -> str:
    return f"failed_images-{split}.jsonl"


# Every file a build writes, as glob patterns, in the order --overwrite removes them: the metadata first
# (with the temporary files of its atomic writes), so that from then on nothing claims a complete dataset.
BUILD_OUTPUTS = (INDEX + "*", TFDS_DATASET_INFO + "*", TFDS_FEATURES + "*", failed_images_file("*"),
                 shard_prefix("*", "*") + "-*-of-*")


def feature_spec() -> dict:
    """tf.io parsing spec of one record."""
    import tensorflow as tf

    return {
        PATCH_A: tf.io.FixedLenFeature([], tf.string),
        PATCH_B: tf.io.FixedLenFeature([], tf.string),
        OFFSETS: tf.io.FixedLenFeature([8], tf.float32),
        CORNERS: tf.io.FixedLenFeature([8], tf.float32),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.int64),
        PATCH_INDEX: tf.io.FixedLenFeature([], tf.int64),
    }


def encode(patch_a: np.ndarray, patch_b: np.ndarray, offsets: np.ndarray, corners: np.ndarray,
           image_id: int, patch_index: int, photometric_a=None, photometric_b=None) -> bytes:
    """Serialises one pair; patches are (P, P, C) uint8; camera parameters only when given (camera builds)."""
    if patch_a.dtype != np.uint8 or patch_b.dtype != np.uint8 or patch_a.shape != patch_b.shape:
        raise ValueError(f"patches must be uint8 of one shape, got {patch_a.dtype}{patch_a.shape} "
                         f"and {patch_b.dtype}{patch_b.shape}")
    t = tf_example
    feature = t.Feature
    example = t.Example(features=t.Features(feature={
        PATCH_A: feature(bytes_list=t.BytesList(value=[np.ascontiguousarray(patch_a).tobytes()])),
        PATCH_B: feature(bytes_list=t.BytesList(value=[np.ascontiguousarray(patch_b).tobytes()])),
        OFFSETS: feature(float_list=t.FloatList(value=np.asarray(offsets, np.float32).reshape(8).tolist())),
        CORNERS: feature(float_list=t.FloatList(value=np.asarray(corners, np.float32).reshape(8).tolist())),
        IMAGE_ID: feature(int64_list=t.Int64List(value=[int(image_id)])),
        PATCH_INDEX: feature(int64_list=t.Int64List(value=[int(patch_index)])),
    }))
    for key, params in ((PHOTOMETRIC_A, photometric_a), (PHOTOMETRIC_B, photometric_b)):
        if params is not None:
            values = np.asarray(params, np.float32).ravel().tolist()
            example.features.feature[key].CopyFrom(feature(float_list=t.FloatList(value=values)))
    return example.SerializeToString(deterministic=True)  # map order fixed: same bytes in every process


def decode(serialized: bytes, patch_size: int, channels: int) -> dict:
    """Parses one record in plain numpy (audits, tests, tools); batches: pipeline.records.decode_batch."""
    f = tf_example.Example.FromString(serialized).features.feature
    shape = (patch_size, patch_size, channels)
    return {
        PATCH_A: np.frombuffer(f[PATCH_A].bytes_list.value[0], np.uint8).reshape(shape),
        PATCH_B: np.frombuffer(f[PATCH_B].bytes_list.value[0], np.uint8).reshape(shape),
        OFFSETS: np.asarray(f[OFFSETS].float_list.value, np.float32),
        CORNERS: np.asarray(f[CORNERS].float_list.value, np.float32),
        IMAGE_ID: int(f[IMAGE_ID].int64_list.value[0]),
        PATCH_INDEX: int(f[PATCH_INDEX].int64_list.value[0]),
        **{key: np.asarray(f[key].float_list.value, np.float32) for key in (PHOTOMETRIC_A, PHOTOMETRIC_B)
           if key in f},
    }


def parse_batch(serialized, patch_size: int, channels: int) -> dict:
    """Parses a batch of serialized records at once (tf.io.parse_example) and decodes the raw bytes.

    Returns uint8 patches of shape (N, P, P, C) and float32 offsets/corners (N, 8).
    """
    import tensorflow as tf

    parsed = tf.io.parse_example(serialized, feature_spec())
    for key in (PATCH_A, PATCH_B):  # a record of another patch size fails here, never reshaped into this one
        raw = tf.ensure_shape(tf.io.decode_raw(parsed[key], tf.uint8), [None, patch_size * patch_size * channels])
        parsed[key] = tf.reshape(raw, [-1, patch_size, patch_size, channels])
    return parsed
