"""Shards checked against the index without decoding them for training: what a reader other than this
project's own (tf.data) needs before it starts, and what finds the shard behind an error it raised.

  check_frames   every record header of each local shard (its CRC, a length the index's geometry allows:
                 pipeline.dataset.index_checks.record_bounds) and the record count against the index; reads
                 12 bytes a record. Remote shards: their byte size against what their counts allow.
  find_damage    reads and decodes every record of a split's shards as the reader does, and returns the
                 first shard's error (CRC, length, count, a record of another patch size), or None.
"""
from __future__ import annotations

import os

from pipeline.dataset import index_checks
from pipeline.dataset.dataset_info import DatasetError
from pipeline.reader import batching, framing

_CHECKED = set()  # (path, size, mtime) of local shards whose frames passed: validation re-reads a split often


def check_frames(shards, patch_size: int, channels: int, size_of=None) -> None:
    """shards: (path, records listed) pairs. Raises CorruptShardError (the shard and the byte offset) or
    DatasetError (the shard, its count or its size) naming the first shard that does not fit the index.
    size_of(path): the byte size of a remote shard (without it, remote shards are not checked)."""
    lengths = index_checks.record_bounds(patch_size, channels)
    for path, expected in shards:
        if "://" in path:
            if size_of is not None:
                _check_size(path, size_of(path), expected, lengths)
            continue
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key in _CHECKED:
            continue
        found = framing.scan_frames(path, lengths)
        if found != expected:
            raise index_checks.count_error(path, found, expected)
        _CHECKED.add(key)


def _check_size(path: str, size: int, expected: int, lengths: tuple) -> None:
    low, high = expected * (lengths[0] + 16), expected * (lengths[1] + 16)  # 16 bytes of framing a record
    if not low <= size <= high:
        raise DatasetError(f"{path} holds {size} bytes where the {expected} records the index lists take "
                           f"{low} to {high} bytes at this dataset's geometry: another patch size, or a damaged "
                           f"shard")


def find_damage(shards, patch_size: int, channels: int):
    """(path, byte offset or None, what is wrong) of the first shard the reader refuses, or None."""
    for path, expected in shards:
        try:
            batching.verify_shard(path, expected, patch_size, channels)
        except framing.CorruptShardError as e:
            return e.path, e.offset, e.problem
        except DatasetError as e:
            return path, None, str(e).removeprefix(path).lstrip(",: ")
    return None
