"""Input-pipeline benchmark: pairs/s from shards to normalised, batched tensors, no model attached.

  python -m bench.input [--data_dir=OUT] [--batch_size=64] [--batches=400]

The default data is coco_mini built at rho 32 (1,780 training pairs, read over and over: after the first
pass the shards are in the page cache, as they are for a GPU box with enough RAM). Variants, measured in
the same run: the project's make_dataset (batch, then parse the whole batch at once), the same with
records parsed one at a time before batching (the usual tutorial pipeline), the same with the two
patches stacked by tf.concat (before the uint16 bitcast of model.training.data), and without shuffling; beside
them the project's TensorFlow-free reader (pipeline.records: shuffled, repeated, full batches, the same
normalised (inputs, labels) through records.model_inputs), in-process and with worker processes.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

from absl import app, flags

from bench.common import dataset_dir, headline

flags.DEFINE_string("data_dir", None, "A built dataset (default: coco_mini built into a temporary folder)")
flags.DEFINE_integer("batch_size", 64, "Batch size")
flags.DEFINE_integer("batches", 400, "Batches timed per variant (after 20 warm-up batches)")
flags.DEFINE_list("reader_workers", ["0", "1", "2"], "Worker-process counts of pipeline.records to time")
FLAGS = flags.FLAGS


def _shuffled_records(cfg):
    import tensorflow as tf

    files = tf.data.Dataset.from_tensor_slices(list(cfg.shard_files))
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(cfg.shard_files), 16),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return ds.shuffle(10000).repeat()


def per_record_dataset(data_dir: str, batch_size: int):
    """A 'before': parse and normalise each record, then batch (one parse_example call per record)."""
    import tensorflow as tf

    from model.training import data
    from pipeline.dataset import schema

    cfg = data.dataset_config(data_dir, "train")

    def parse_one(serialized):
        p = schema.parse_batch(tf.expand_dims(serialized, 0), cfg.patch_size, cfg.channels)
        x = data.normalize(p[schema.PATCH_A], p[schema.PATCH_B])[0]
        return x, data.scale_labels(p[schema.OFFSETS], cfg.rho)[0]

    ds = _shuffled_records(cfg).map(parse_one, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def channel_concat_dataset(data_dir: str, batch_size: int):
    """A 'before': make_dataset with the patches stacked by tf.concat on the channel axis."""
    import tensorflow as tf

    from model.training import data
    from pipeline.dataset import schema

    cfg = data.dataset_config(data_dir, "train")

    def parse(serialized):
        p = schema.parse_batch(serialized, cfg.patch_size, cfg.channels)
        x = tf.cast(tf.concat([p[schema.PATCH_A], p[schema.PATCH_B]], -1), tf.float32) / 127.5 - 1.0
        return x, data.scale_labels(p[schema.OFFSETS], cfg.rho)

    ds = _shuffled_records(cfg).batch(batch_size, drop_remainder=True)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def reader_rate(data_dir: str, batch_size: int, batches: int, workers: int, normalise: bool = True) -> float:
    """pipeline.records (no TensorFlow): shuffle buffer of 10,000 like make_dataset, full batches."""
    from model.training import data
    from pipeline import records

    source = records.open_split(data_dir, "train")
    stream = records.iter_batches(source, batch_size, shuffle=True, seed=0, repeat=True, drop_remainder=True,
                                  workers=workers, shuffle_buffer=10000)
    ds = (records.model_inputs(b, source.rho) if normalise else (b["patch_a"], b["offsets"]) for b in stream)
    try:
        return data.pairs_per_second(ds, batches)
    finally:
        stream.close()  # stops its worker processes


def main(argv):
    del argv
    from model.training import data

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_input_"))
    data_dir = dataset_dir(FLAGS.data_dir, work)
    b, n = FLAGS.batch_size, FLAGS.batches
    print(f"machine: {os.cpu_count()} cores; data: {data_dir}; batch {b}; {n} batches per variant")
    rates = {
        "make_dataset (batch, then parse the batch)": data.pairs_per_second(
            data.make_dataset(data_dir, "train", b, training=True), n),
        "patches stacked with tf.concat": data.pairs_per_second(channel_concat_dataset(data_dir, b), n),
        "parse each record, then batch": data.pairs_per_second(per_record_dataset(data_dir, b), n),
        "make_dataset without shuffle": data.pairs_per_second(
            data.make_dataset(data_dir, "train", b, training=True, shuffle_buffer=0), n),
    }
    for w in map(int, FLAGS.reader_workers):
        rates[f"pipeline.records, {w} worker processes"] = reader_rate(data_dir, b, n, w)
    rates["pipeline.records, 0 workers, uint8 (no normalisation)"] = reader_rate(data_dir, b, n, 0, normalise=False)
    for name, rate in rates.items():
        print(f"  {name:<55} {rate:9.0f} pairs/s")
    main_rate = rates["make_dataset (batch, then parse the batch)"]
    reader = {w: rates[f"pipeline.records, {w} worker processes"] for w in map(int, FLAGS.reader_workers)}
    best = max(reader, key=reader.get)
    headline({"input_pairs_per_s": main_rate,
              "per_record_parse_pairs_per_s": rates["parse each record, then batch"],
              "batch_parse_speedup": main_rate / rates["parse each record, then batch"],
              "concat_pairs_per_s": rates["patches stacked with tf.concat"],
              "bitcast_stack_speedup": main_rate / rates["patches stacked with tf.concat"],
              "input_over_goal_20000": main_rate / 20000,
              "reader_best_workers": best,
              "reader_pairs_per_s": reader[best],
              "reader_over_tf_data": reader[best] / main_rate,
              **{f"reader_{w}_workers_pairs_per_s": r for w, r in reader.items()}})


if __name__ == "__main__":
    app.run(main)
