"""The batching reader: one split of a built dataset as batches of numpy arrays, in dataset order or
shuffled (shard order permuted each epoch, then a shuffle buffer), decoded in this process or in worker
processes. Shards are found only through homography_index.json, and each shard's record count is checked
against it. Needs only numpy, protobuf and google-crc32c (pipeline/reader/framing.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import multiprocessing
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np

from pipeline.dataset import dataset_info, index_checks, schema
from pipeline.dataset.dataset_info import DatasetError
from pipeline.reader.framing import decode_batch, empty_batch, iter_records

# tf.data's usual 10,000-record buffer is 330 MB at P=128 grayscale; 8,192 spans ~4 shards of ~2,000
# records, on top of a shard order reshuffled every epoch.
DEFAULT_SHUFFLE_BUFFER = 8192
_CHUNK = 512  # records decoded at a time in-process: big enough to amortise, small enough to stay in cache
_KEYS = (schema.PATCH_A, schema.PATCH_B, schema.OFFSETS, schema.CORNERS, schema.IMAGE_ID, schema.PATCH_INDEX)


class SplitSource:
    """One split of a built dataset as the reader sees it: geometry, shard paths and their record counts.

    Checks up front that the index is readable and every shard it lists exists.
    """

    def __init__(self, data_dir: str, split: str):
        info = dataset_info.read(data_dir)
        s = info.readable_split(split)
        c = info.config
        self.data_dir, self.split = data_dir, split
        self.patch_size, self.channels, self.rho = c.patch_size, c.channels, c.rho
        self.image_width, self.image_height = c.image_width, c.image_height
        self.num_examples = s.num_examples
        self.shards = list(zip(s.shard_files, s.shard_counts))

    def subset(self, index: int, count: int) -> "SplitSource":
        """Shards index, index + count, ...: one of `count` disjoint parts (data-loader workers, hosts)."""
        if not 0 <= index < count:
            raise ValueError(f"part {index} of {count} does not exist")
        if count > len(self.shards):
            raise DatasetError(f"split '{self.split}' of {self.data_dir} has {len(self.shards)} shards: too few "
                               f"to feed {count} readers apart (rebuild with --num_shards >= {count})")
        part = copy.copy(self)
        part.shards = self.shards[index::count]
        part.num_examples = sum(n for _, n in part.shards)
        return part


def open_split(data_dir: str, split: str) -> SplitSource:
    return SplitSource(data_dir, split)


def _decode_shard(path: str, expected: int, patch_size: int, channels: int, chunk: int) -> Iterator[dict]:
    """A shard's records decoded `chunk` at a time; the count is checked against homography_index.json, every
    record's length against the geometry (index_checks.record_bounds) before it is read."""
    pending, n = [], 0
    for data in iter_records(path, index_checks.record_bounds(patch_size, channels)):
        pending.append(data)
        n += 1
        if len(pending) == chunk:
            yield _decode_in_shard(pending, path, n - len(pending), patch_size, channels)
            pending = []
    if n != expected:
        raise index_checks.count_error(path, n, expected)
    if pending:
        yield _decode_in_shard(pending, path, n - len(pending), patch_size, channels)


def verify_shard(path: str, expected: int, patch_size: int, channels: int) -> None:
    """Reads and decodes every record of one shard as the reader does (CRCs, lengths, count, schema) and
    raises what the reader would raise there (DatasetError, CorruptShardError), naming the shard."""
    for _ in _decode_shard(path, expected, patch_size, channels, _CHUNK):
        pass


def _decode_in_shard(serialized, path, first, patch_size, channels) -> dict:
    try:
        return decode_batch(serialized, patch_size, channels)
    except DatasetError as e:
        raise DatasetError(f"{path}, records {first}..{first + len(serialized) - 1}: {e}") from None


def _decode_whole_shard(path: str, expected: int, patch_size: int, channels: int, spool: str | None = None):
    """Worker-process task: one shard decoded at once. With `spool` (a folder in RAM), the arrays go to a
    file there and only its name comes back: one copy each way instead of pickling through a pipe (which
    cost the main process ~35 us a record, as much as decoding it)."""
    decoded = _concat(list(_decode_shard(path, expected, patch_size, channels, 1 << 30)) or
                      [empty_batch(0, patch_size, channels)])
    if spool is None:
        return decoded
    fd, name = tempfile.mkstemp(dir=spool, suffix=".bin")
    with os.fdopen(fd, "wb") as f:
        for key in _KEYS:  # each array padded to 8 bytes, so every view read back is aligned
            array = np.ascontiguousarray(decoded[key])
            f.write(array)
            f.write(b"\0" * (-array.nbytes % 8))
    return name, len(decoded[schema.IMAGE_ID])


def _read_spooled(name: str, n: int, patch_size: int, channels: int) -> dict:
    """The arrays a worker spooled, read back with one copy; the file is gone afterwards."""
    try:
        buf = np.fromfile(name, np.uint8)
    finally:
        os.unlink(name)
    out, pos, templates = {}, 0, empty_batch(0, patch_size, channels)
    for key in _KEYS:
        template = templates[key]
        size = n * int(np.prod(template.shape[1:], dtype=np.int64)) * template.itemsize
        out[key] = buf[pos:pos + size].view(template.dtype).reshape((n,) + template.shape[1:])
        pos += size + (-size % 8)
    return out


def _concat(parts: list) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(part: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in part.items()}


def _shard_order(source: SplitSource, shuffle: bool, rng, repeat: bool):
    while True:
        order = rng.permutation(len(source.shards)) if shuffle else range(len(source.shards))
        yield from (source.shards[i] for i in order)
        if not repeat:
            return


def _chunks(source: SplitSource, shards, workers: int, mp_context) -> Iterator[dict]:
    """Decoded records in dataset order (of the shard sequence given), in-process or in worker processes."""
    p, c = source.patch_size, source.channels
    if workers <= 0:
        for path, expected in shards:
            yield from _decode_shard(path, expected, p, c, _CHUNK)
        return
    # Whole shards per task, at most workers + 1 in flight (bounded memory), results taken in order,
    # spooled through a private folder in RAM (/dev/shm) where there is one, else pickled back.
    ctx = multiprocessing.get_context(mp_context)
    spool = tempfile.mkdtemp(prefix="records-", dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending = collections.deque()
        shards = iter(shards)
        try:
            while True:
                while len(pending) <= workers:
                    nxt = next(shards, None)
                    if nxt is None:
                        break
                    pending.append(pool.submit(_decode_whole_shard, nxt[0], nxt[1], p, c, spool))
                if not pending:
                    return
                result = pending.popleft().result()
                yield _read_spooled(*result, p, c) if spool else result
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)  # before the spool goes: no worker still writing into it
            if spool:
                shutil.rmtree(spool, ignore_errors=True)


def _shuffled(chunks, capacity: int, rng, unit: int) -> Iterator[dict]:
    """A shuffle buffer of `capacity` records, as tf.data's: each record out is a uniform pick from the
    buffer, its slot refilled by the next record in. Vectorised: `unit` slots are swapped at a time."""
    buf, m = None, 0
    for chunk in chunks:
        k = len(chunk[schema.IMAGE_ID])
        if buf is None:
            buf = {key: np.empty((capacity,) + v.shape[1:], v.dtype) for key, v in chunk.items()}
        pos = 0
        while pos < k:
            if m < capacity:
                take = min(capacity - m, k - pos)
                for key, v in chunk.items():
                    buf[key][m:m + take] = v[pos:pos + take]
                m, pos = m + take, pos + take
                continue
            take = min(unit, capacity, k - pos)
            idx = rng.choice(capacity, take, replace=False)
            yield {key: v[idx] for key, v in buf.items()}
            for key, v in chunk.items():
                buf[key][idx] = v[pos:pos + take]
            pos += take
    if m:
        perm = rng.permutation(m)
        for start in range(0, m, unit):
            yield {key: v[perm[start:start + unit]] for key, v in buf.items()}


def _rebatch(parts, batch_size: int, drop_remainder: bool) -> Iterator[dict]:
    """Record groups of any size -> batches of exactly batch_size (the last one smaller unless dropped)."""
    held, n = [], 0
    for part in parts:
        k = len(part[schema.IMAGE_ID])
        pos = 0
        while pos < k:
            if not held and k - pos >= batch_size:  # the common case: a view, no copy
                yield _take(part, pos, pos + batch_size)
                pos += batch_size
                continue
            take = min(batch_size - n, k - pos)
            held.append(_take(part, pos, pos + take))
            n, pos = n + take, pos + take
            if n == batch_size:
                yield _concat(held)
                held, n = [], 0
    if held and not drop_remainder:
        yield _concat(held)


def batches(data_dir: str, split: str, batch_size: int, *, shuffle: bool = False, seed: int | None = None,
            repeat: bool = False, drop_remainder: bool = False, workers: int = 0,
            shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, mp_context: str = "spawn") -> Iterator[dict]:
    """Batches of a split as numpy dicts (decode_batch's keys, dtypes and shapes).

    shuffle=False: records in the order of homography_index.json (shard by shard, file order).
    shuffle=True: shard order permuted every epoch, then a shuffle buffer of `shuffle_buffer` records
    (memory: that many records, ~33 KB each at P=128 grayscale); the same seed gives the same order.
    repeat: epochs without end (batches then run across epoch boundaries, so none is partial).
    workers > 0: shards are read and decoded in that many worker processes ('spawn': safe beside JAX,
    PyTorch or TensorFlow threads; a script using it needs the usual `if __name__ == "__main__":`).

    Raises DatasetError (missing index, missing shard, a shard's record count not the index's, a record
    outside the schema) and CorruptShardError (bad framing or CRC: shard path and byte offset).
    """
    return iter_batches(open_split(data_dir, split), batch_size, shuffle=shuffle, seed=seed, repeat=repeat,
                        drop_remainder=drop_remainder, workers=workers, shuffle_buffer=shuffle_buffer,
                        mp_context=mp_context)


def iter_batches(source: SplitSource, batch_size: int, *, shuffle: bool = False, seed=None, repeat: bool = False,
                 drop_remainder: bool = False, workers: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 mp_context: str = "spawn") -> Iterator[dict]:
    """batches() over an opened (possibly subset) split; seed may also be a sequence of ints."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _batches(source, batch_size, shuffle, seed, repeat, drop_remainder, workers, shuffle_buffer, mp_context)


def _batches(source, batch_size, shuffle, seed, repeat, drop_remainder, workers, shuffle_buffer, mp_context):
    rng = np.random.default_rng(seed)
    records = _chunks(source, _shard_order(source, shuffle, rng, repeat), workers, mp_context)
    if shuffle and shuffle_buffer > 1:
        capacity = shuffle_buffer if repeat else min(shuffle_buffer, max(source.num_examples, 2))
        records = _shuffled(records, capacity, rng, batch_size)
    yield from _rebatch(records, batch_size, drop_remainder)


def model_inputs(batch: dict, rho: float) -> tuple:
    """(inputs, labels) as HomographyNet takes them, in numpy: the same numbers as model.training.data's
    normalize (concat([a, b], channels) / 127.5 - 1, float32) and scale_labels (offsets / rho)."""
    x = np.concatenate([batch[schema.PATCH_A], batch[schema.PATCH_B]], axis=-1).astype(np.float32)
    x /= np.float32(127.5)  # in place; plain float32 arithmetic vectorises (a lookup table is 3x slower)
    x -= np.float32(1.0)
    return x, batch[schema.OFFSETS].astype(np.float32) / np.float32(rho)


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
