"""The shards without TensorFlow: the reader's public API, and the command that checks a dataset with it.

  python -m pipeline.records --data_dir=OUT [--split=train,validation] [--workers=N]

reads every record of the splits (CRCs, record counts against homography_index.json, schema) and prints the rate.

Needs only numpy, protobuf and google-crc32c (no TensorFlow, no Beam, no OpenCV), so PyTorch, JAX and
plain-numpy users read the shards where TensorFlow is not installed:

    from pipeline import records
    for batch in records.batches("out/coco", "train", 64, shuffle=True, seed=0):
        batch["patch_a"], batch["patch_b"]   # uint8 (64, P, P, C)
        batch["offsets"], batch["corners"]   # float32 (64, 8), pixels
        batch["image_id"], batch["patch_index"]  # int64 (64,)

The code lives in pipeline/reader/: framing.py (TFRecord framing, every CRC checked: damage raises
CorruptShardError with the shard and the byte offset, never garbage; record decoding) and batching.py
(the batching, shuffling reader, in-process or in worker processes). Shards are found only through
homography_index.json, and each shard's record count is checked against it.

Adapters for Keras 3 (any backend) and PyTorch: pipeline.reader.keras_dataset, pipeline.reader.torch_dataset.
"""
from __future__ import annotations

from pipeline.dataset import dataset_info, schema
from pipeline.dataset.dataset_info import DatasetError
from pipeline.reader.batching import (DEFAULT_SHUFFLE_BUFFER, SplitSource, batches, iter_batches, model_inputs,
                                      num_batches, open_split)
from pipeline.reader.framing import CorruptShardError, decode_batch, iter_records, read_framed, write_record

__all__ = ["CorruptShardError", "DatasetError", "SplitSource", "open_split", "write_record", "iter_records", "read_framed",
           "decode_batch", "batches", "iter_batches", "model_inputs", "num_batches", "DEFAULT_SHUFFLE_BUFFER"]


def check_split(data_dir: str, split: str, workers: int = 0) -> dict:
    """Reads every record of a split through the reader (CRCs, counts, schema); returns counts and rate."""
    import time

    source = open_split(data_dir, split)
    t0, n = time.perf_counter(), 0
    for b in iter_batches(source, 256, workers=workers, shuffle_buffer=0):
        n += len(b[schema.IMAGE_ID])
    seconds = time.perf_counter() - t0
    return {"split": split, "records": n, "shards": len(source.shards), "seconds": seconds,
            "pairs_per_s": n / max(seconds, 1e-9)}


def _define_flags():
    from absl import flags

    flags.DEFINE_string("data_dir", None, "A built dataset (the folder holding homography_index.json)", required=True)
    flags.DEFINE_list("split", None, "Splits to read (default: every split in homography_index.json)")
    flags.DEFINE_integer("workers", 0, "Worker processes that read and decode shards")


def _main(argv):
    del argv
    from absl import flags

    from pipeline.runtime import cli

    f = flags.FLAGS
    if f.workers < 0:
        return cli.fail("pipeline.records", f"--workers must be >= 0 (0: this process), got {f.workers}")
    try:
        splits = f.split or dataset_info.read(f.data_dir).splits
        for split in splits:
            r = check_split(f.data_dir, split, f.workers)
            print(f"{split}: {r['records']} records in {r['shards']} shards, every CRC checked "
                  f"({r['seconds']:.1f} s, {r['pairs_per_s']:.0f} pairs/s)")
    except DatasetError as e:
        return cli.fail("pipeline.records", str(e))
    return 0


if __name__ == "__main__":
    from pipeline.runtime import cli as _cli

    _cli.run("pipeline.records", _main, _define_flags)
