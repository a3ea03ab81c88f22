"""Input pipeline: built shards (found through homography_index.json) -> batches for HomographyNet.

Training and evaluation read through here, so there is one normalisation and one label scale:
  inputs = normalize(patch_a, patch_b): the two uint8 patches stacked on channels, x / 127.5 - 1,
           float32 in [-1, 1], shape (B, P, P, 2C) with patch A's channels first;
  labels = offsets / rho: float32 (B, 8), (dx, dy) for TL, TR, BR, BL, in [-1, 1].

Two readers behind one interface (train_batches, eval_batches, parsed_batches): tf.data where TensorFlow
is installed and Keras runs on it; otherwise the project's TensorFlow-free reader (pipeline.records), for
Keras on JAX. TensorFlow is imported only by the tf.data functions, so this module imports without it.
A damaged shard (cut short, or a record whose CRC fails) surfaces as DamagedShardError naming the shard
and the byte offset, whichever reader met it.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np

from pipeline.dataset import dataset_info, schema
from pipeline.dataset.dataset_info import DatasetError  # re-exported: the one "bad dataset" error

# Records in the shuffle buffer by default: 64 MiB at 128 px grayscale, so the paper's HomographyNet at batch
# 64 fits model.train's memory bound (model/train.py).
DEFAULT_SHUFFLE_BUFFER = 2048
MAX_CYCLE_LENGTH = 16  # shards read at once; more only adds open files and memory

__all__ = ["DatasetError", "DamagedShardError", "DataConfig", "dataset_config", "normalize", "scale_labels",
           "make_dataset", "read_batches", "input_throughput", "train_batches", "eval_batches",
           "parsed_batches", "uses_tf_data"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a reader needs to know about a split: geometry from homography_index.json and its shards."""

    patch_size: int
    channels: int
    rho: int
    image_width: int
    image_height: int
    split: str
    num_examples: int
    shard_files: tuple
    shard_counts: tuple = ()  # records per shard, as homography_index.json lists them


def dataset_config(data_dir: str, split: str) -> DataConfig:
    """Reads homography_index.json; raises DatasetError for a missing index, unknown/empty split, lost shards."""
    info = dataset_info.read(data_dir)
    s = info.readable_split(split)  # DatasetError on an unknown or empty split, or a shard not there
    c = info.config
    return DataConfig(c.patch_size, c.channels, c.rho, c.image_width, c.image_height, split,
                      s.num_examples, tuple(s.shard_files), tuple(s.shard_counts))


def normalize(patch_a, patch_b):
    """The one model-input normalisation: concat([a, b], channels) / 127.5 - 1 -> float32 in [-1, 1].

    Accepts uint8 patches (..., P, P, C) as numpy arrays (returns numpy) or tf tensors (returns a tensor).
    """
    if isinstance(patch_a, np.ndarray) and isinstance(patch_b, np.ndarray):
        x = np.concatenate([patch_a, patch_b], axis=-1).astype(np.float32)
        return x / np.float32(127.5) - np.float32(1.0)
    import tensorflow as tf

    x = tf.cast(_stack_channels(tf.convert_to_tensor(patch_a), tf.convert_to_tensor(patch_b)), tf.float32)
    return x / 127.5 - 1.0


def _stack_channels(a, b):
    """tf.concat([a, b], -1), fast for one uint8 channel each: a channel-axis concat of 1-byte elements is a
    strided copy (~10k pairs/s on 2 cores); packing each pixel pair into a uint16 and bitcasting back to
    bytes gives the same (..., P, P, 2) tensor ~6x faster (bench.input)."""
    import tensorflow as tf

    if a.dtype == tf.uint8 and b.dtype == tf.uint8 and a.shape[-1] == 1 and b.shape[-1] == 1 \
            and sys.byteorder == "little":  # little-endian: the low byte (patch A) comes first
        return tf.bitcast(tf.cast(a[..., 0], tf.uint16) + tf.cast(b[..., 0], tf.uint16) * 256, tf.uint8)
    return tf.concat([a, b], axis=-1)


def scale_labels(offsets, rho: float):
    """Offsets in pixels -> regression targets in [-1, 1] (the inverse is `* rho`)."""
    if isinstance(offsets, np.ndarray):
        return offsets.astype(np.float32) / np.float32(rho)
    import tensorflow as tf

    return tf.cast(offsets, tf.float32) / float(rho)


def _to_model_io(config: DataConfig, static_batch: int | None):
    import tensorflow as tf

    def fn(serialized):
        parsed = schema.parse_batch(serialized, config.patch_size, config.channels)
        x = normalize(parsed[schema.PATCH_A], parsed[schema.PATCH_B])
        y = scale_labels(parsed[schema.OFFSETS], config.rho)
        if static_batch:  # full batches only: give XLA and tf.distribute a static batch dimension
            x = tf.ensure_shape(x, [static_batch, config.patch_size, config.patch_size, 2 * config.channels])
            y = tf.ensure_shape(y, [static_batch, 8])
        return x, y
    return fn


def _records(config: DataConfig, training: bool, seed):
    import tensorflow as tf

    from pipeline.reader import verify

    # Before tf.data reads a byte: each shard's record headers against the index's geometry and counts (a
    # record of another patch size, or a header claiming 1 TiB that TFRecordDataset would allocate).
    verify.check_frames(zip(config.shard_files, config.shard_counts), config.patch_size, config.channels,
                        size_of=lambda path: tf.io.gfile.stat(path).length)
    files = tf.data.Dataset.from_tensor_slices((list(config.shard_files),
                                                tf.constant(list(config.shard_counts), tf.int64)))

    def read(path, count):
        # TFRecordDataset ends a shard silently where it was cut inside a record header; the count from
        # homography_index.json turns that into an error (FailedPrecondition "expected to contain N elements").
        return tf.data.TFRecordDataset(path).apply(tf.data.experimental.assert_cardinality(count))

    if not training:
        return files.flat_map(read)  # one file after the other: deterministic order
    # Pairs of one image sit next to each other in a shard: read many shards at once, in a shuffled
    # order, and let the shuffle buffer mix them further.
    files = files.shuffle(len(config.shard_files), seed=seed, reshuffle_each_iteration=True)
    return files.interleave(read, cycle_length=min(len(config.shard_files), MAX_CYCLE_LENGTH),
                            block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)


def make_dataset(data_dir: str, split: str, batch_size: int, *, training: bool,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 repeat: bool | None = None, seed: int | None = None,
                 drop_remainder: bool | None = None):
    """(inputs, labels) batches: inputs float32 (B, P, P, 2C) from `normalize`, labels float32 (B, 8) = offsets/rho.

    training=True: shards interleaved in parallel (non-deterministic), shuffled, repeated forever and
    full batches only (unless repeat / drop_remainder say otherwise). training=False: one pass in
    the order of homography_index.json, last batch kept. Records are parsed a whole batch at a time.
    """
    import tensorflow as tf

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    config = dataset_config(data_dir, split)
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    ds = _records(config, training, seed)
    if training and shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(_to_model_io(config, batch_size if drop_remainder else None), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=not training)
    if training:
        options = tf.data.Options()
        options.deterministic = False
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def read_batches(data_dir: str, split: str, batch_size: int):
    """One deterministic pass of parsed records: dicts with the schema names (uint8 patches (B, P, P, C),
    offsets and corners (B, 8) float32, image_id and patch_index (B,) int64). For evaluation."""
    import tensorflow as tf

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    config = dataset_config(data_dir, split)
    ds = _records(config, training=False, seed=None).batch(batch_size)
    ds = ds.map(lambda s: schema.parse_batch(s, config.patch_size, config.channels),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


class DamagedShardError(DatasetError):
    """A shard that cannot be read to its end (cut short, or a record whose CRC fails): names the shard and
    the byte offset of the damage, and how to check the dataset."""

    def __init__(self, path, offset, detail: str, data_dir: str | None = None, note: str = ""):
        self.path, self.offset, self.detail = path, offset, detail
        audit = f"python -m pipeline.audit --data_dir={data_dir} --output_dir=AUDIT_DIR" if data_dir else \
            "python -m pipeline.audit"
        where = (f"shard {path} is damaged" + (f" at byte {offset}" if offset is not None else "")) if path \
            else "a shard is damaged"
        super().__init__(f"{where} ({detail}); {note + '; ' if note else ''}check the dataset with `{audit}` "
                         f"and rebuild it")


READERS = ("auto", "tf.data", "records")


def uses_tf_data(reader: str = "auto") -> bool:
    """reader 'auto': tf.data when Keras runs on TensorFlow (so TensorFlow is installed), the TensorFlow-free
    reader (pipeline.records) otherwise (Keras on JAX, with or without TensorFlow beside it). 'records'
    forces the reader; 'tf.data' needs Keras on TensorFlow."""
    import keras

    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got '{reader}'")
    on_tf = keras.backend.backend() == "tensorflow"
    if reader == "tf.data" and not on_tf:
        raise ValueError(f"reader 'tf.data' needs Keras on TensorFlow (this is {keras.backend.backend()})")
    return on_tf if reader == "auto" else reader == "tf.data"


def damaged_shard(error: BaseException, data_dir: str, split: str):
    """The DamagedShardError behind a reader's error, or None when the error is not about damaged data.

    The reader's CorruptShardError carries the shard and offset. tf.data's errors name neither: a
    DataLossError ("truncated record at N", "corrupted record at N"), a count that is not the index's
    ("expected to contain N elements"), a record of another patch size (parse_batch's shape check), or the
    reader's errors re-raised from inside a generator; the split's shards are then read as the reader
    reads them to find the shard (pipeline.reader.verify.find_damage)."""
    from pipeline.reader import framing, verify

    if isinstance(error, DamagedShardError):
        return error
    if isinstance(error, framing.CorruptShardError):
        return DamagedShardError(error.path, error.offset, error.problem, data_dir)
    tf = sys.modules.get("tensorflow")
    text = str(error)
    lost = tf is not None and (isinstance(error, tf.errors.DataLossError) or (
        isinstance(error, tf.errors.FailedPreconditionError) and "expected to contain" in text))
    misfit = tf is not None and isinstance(error, tf.errors.InvalidArgumentError) and any(
        m in text for m in _MISFIT)
    if not (lost or misfit or any(m in text for m in _READER_ERRORS)):
        return None
    config = dataset_config(data_dir, split)
    found = verify.find_damage(zip(config.shard_files, config.shard_counts), config.patch_size, config.channels)
    if found:
        return DamagedShardError(*found, data_dir)
    return None if misfit else DamagedShardError(None, None, f"split '{split}': {_first_line(error)}", data_dir)


_READER_ERRORS = ("CorruptShardError", "DatasetError")  # the reader's errors, as TF reports them from a generator
_MISFIT = ("DecodeRaw", "is not compatible with expected shape")  # records of another size than the index's


def _first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _xy(batch: dict, rho: float):
    return normalize(batch[schema.PATCH_A], batch[schema.PATCH_B]), scale_labels(batch[schema.OFFSETS], rho)


def augment_views(batches, seed: int | None = None):
    """Parsed batches, each seen through one of the 8 flips and transposes of the patches (drawn at random),
    its offsets mapped exactly (pipeline.dataset.geometry.view_offsets): 8 pairs from each one the builder wrote."""
    from pipeline.dataset import geometry

    rng = np.random.default_rng(seed)
    for b in batches:
        view = geometry.VIEWS[int(rng.integers(len(geometry.VIEWS)))]
        p = b[schema.PATCH_A].shape[1]
        offsets = geometry.view_offsets(b[schema.OFFSETS], geometry.view_matrix(view, p), p)
        yield dict(b, **{schema.PATCH_A: geometry.view_patches(b[schema.PATCH_A], view),
                         schema.PATCH_B: geometry.view_patches(b[schema.PATCH_B], view),
                         schema.OFFSETS: offsets.reshape(-1, 8)})


def camera_views(batches, seed: int | None = None, share: float = 1.0):
    """Parsed batches with patch A and patch B of a `share` of the pairs (drawn per pair) each through its own
    fresh draw of the camera model (pipeline.dataset.photometric), labels unchanged: two shots of one scene,
    not two copies. The other pairs stay exact, so the network keeps learning pairs without a change too."""
    from pipeline.dataset import photometric

    rng = np.random.default_rng(None if seed is None else [seed, 1])
    for b in batches:
        pick = rng.random(len(b[schema.PATCH_A])) < share
        out = {}
        for key in (schema.PATCH_A, schema.PATCH_B):
            out[key] = b[key].copy()
            if pick.any():
                out[key][pick] = photometric.apply_batch(b[key][pick], rng)
        yield dict(b, **out)


def train_batches(data_dir: str, split: str, batch_size: int, *, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  seed: int | None = None,
                  reader: str = "auto", workers: int = 0, augment: bool = False, photometric: str = "none",
                  photometric_share: float = 1.0):
    """Endless, shuffled, full (inputs, labels) batches for Keras's fit: a tf.data.Dataset (uses_tf_data())
    or a generator of numpy batches from the TensorFlow-free reader (same normalisation and labels), its
    shards decoded in `workers` processes (0: in this one). That reader only: augment (augment_views) and
    photometric='camera' (camera_views)."""
    if uses_tf_data(reader):
        if augment or photometric != "none":
            raise ValueError("augmentation runs on the TensorFlow-free reader: pass --reader=records")
        return make_dataset(data_dir, split, batch_size, training=True, shuffle_buffer=shuffle_buffer, seed=seed)
    from pipeline.reader import batching

    config = dataset_config(data_dir, split)
    stream = batching.batches(data_dir, split, batch_size, shuffle=True, seed=seed, repeat=True,
                              drop_remainder=True, shuffle_buffer=max(shuffle_buffer, 1), workers=workers)
    if augment:
        stream = augment_views(stream, seed)
    if photometric == "camera":
        stream = camera_views(stream, seed, photometric_share)
    return (_xy(b, config.rho) for b in stream)


def eval_batches(data_dir: str, split: str, batch_size: int, max_batches: int = 0, reader: str = "auto"):
    """One deterministic pass of numpy (inputs, labels) batches (the last one may be short); max_batches > 0
    stops early."""
    rho = dataset_config(data_dir, split).rho
    for i, batch in enumerate(parsed_batches(data_dir, split, batch_size, reader)):
        if max_batches and i >= max_batches:
            return
        yield _xy(batch, rho)


def parsed_batches(data_dir: str, split: str, batch_size: int, reader: str = "auto"):
    """One deterministic pass of parsed records as dicts of numpy arrays with the schema's names
    (read_batches through tf.data, or pipeline.records.batches without it)."""
    if uses_tf_data(reader):
        for batch in read_batches(data_dir, split, batch_size):
            yield {k: v.numpy() for k, v in batch.items()}
        return
    from pipeline.reader import batching

    dataset_config(data_dir, split)  # the same DatasetErrors as the tf.data path, before any reading
    yield from batching.batches(data_dir, split, batch_size)


def pairs_per_second(ds, batches: int, warmup: int = 20) -> float:
    """Pairs/s a dataset of (inputs, labels) batches delivers, timed over `batches` after `warmup` batches
    (the shuffle buffer filled, the shards open)."""
    import time

    it = iter(ds)
    for _ in range(warmup):
        next(it)
    pairs, start = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        pairs += int(x.shape[0])
    return pairs / (time.perf_counter() - start)


def input_throughput(data_dir: str, split: str = "train", batch_size: int = 64, batches: int = 200,
                     shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> dict:
    """Pairs/s the training input pipeline delivers alone (no model): compare with the training log's
    ex/s. If training runs at about this rate, the input pipeline is the bottleneck."""
    ds = make_dataset(data_dir, split, batch_size, training=True, shuffle_buffer=shuffle_buffer)
    rate = pairs_per_second(ds, batches, warmup=min(20, batches))
    return {"batches": batches, "batch_size": batch_size, "seconds": round(batches * batch_size / rate, 3),
            "pairs_per_sec": round(rate, 1),
            "batches_per_sec": round(rate / batch_size, 2)}


def _cli():
    """python -m model.training.data --data_dir=OUT [--split=train --batch_size=64 --batches=200]: input
    pipeline speed."""
    import json
    import sys

    from absl import app, flags

    flags.DEFINE_string("data_dir", None, "Built dataset (holds homography_index.json)")
    flags.DEFINE_string("split", "train", "Split to read")
    flags.DEFINE_integer("batch_size", 64, "Pairs per batch")
    flags.DEFINE_integer("batches", 200, "Batches timed (after 20 warm-up batches)")
    flags.DEFINE_integer("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER, "Shuffle buffer, in pairs")
    FLAGS = flags.FLAGS

    def main(argv):
        try:
            if not FLAGS.data_dir:
                raise ValueError("--data_dir is required")
            print(json.dumps(input_throughput(FLAGS.data_dir, FLAGS.split, FLAGS.batch_size, FLAGS.batches,
                                              FLAGS.shuffle_buffer)))
        except ValueError as e:  # DatasetError is a ValueError
            print(f"model.training.data: error: {e}", file=sys.stderr)
            return 2
        return 0

    app.run(main)


if __name__ == "__main__":
    _cli()
