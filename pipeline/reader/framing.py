"""The shards' bytes without TensorFlow: TFRecord framing (written and read, every CRC checked) and the
decoding of serialized records to numpy arrays keyed by the schema's names.

TFRecord framing, per record: uint64 length, masked crc32c of those 8 bytes, the data, masked crc32c of
the data (all little-endian): what tf.io.TFRecordWriter and Beam's _TFRecordUtil write. Every CRC is
checked on reading; damage raises CorruptShardError (the shard and the byte offset), never garbage.
The builder writes with write_record, the audit and the reader read with read_framed / iter_records.
"""
from __future__ import annotations

import os
import struct
from typing import Iterator

import numpy as np

try:
    import google_crc32c  # C implementation (the package falls back to its own pure Python without it)
except ImportError as _e:  # no CRC32C in the standard library: a reader that cannot check CRCs must not read
    raise ImportError("pipeline.records needs google-crc32c to check the shards' CRCs: "
                      "pip install google-crc32c") from _e

from pipeline.dataset import dataset_info, schema, tf_example
from pipeline.dataset.dataset_info import DatasetError

_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


class CorruptShardError(DatasetError):
    """A shard whose framing or CRCs do not check out; .path and .offset say where, .truncated whether
    the file ends early (else a CRC does not match)."""

    def __init__(self, path: str, offset: int, problem: str):
        self.path, self.offset, self.problem = path, offset, problem
        self.truncated = "ends inside" in problem
        super().__init__(f"{path}: {problem} at byte offset {offset}: the shard is truncated or corrupt "
                         f"(check the dataset with: python -m pipeline.audit --data_dir=... --output_dir=...)")

    def __reduce__(self):  # raised in worker processes: must cross a pickle with its attributes
        return type(self), (self.path, self.offset, self.problem)


def masked_crc32c(data) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def write_record(fileobj, data: bytes) -> None:
    """Appends one TFRecord-framed record (byte-identical to Beam's _TFRecordUtil.write_record)."""
    length = struct.pack("<Q", len(data))
    # Four writes, no joined copy: the writers here are buffered (pipeline.builder.shards.create_shard).
    fileobj.write(length)
    fileobj.write(_CRC.pack(masked_crc32c(length)))
    fileobj.write(data)
    fileobj.write(_CRC.pack(masked_crc32c(data)))


def iter_records(path: str, lengths: tuple | None = None) -> Iterator[bytes]:
    """The records of one TFRecord file, every length and data CRC checked; CorruptShardError on damage.

    lengths: (shortest, longest) a record may be (pipeline.dataset.index_checks.record_bounds): a header
    claiming another length is refused before that many bytes are read (a 1 TiB length with a valid CRC)."""
    remote = dataset_info.is_remote(path)
    with (dataset_info.open_read(path) if remote else open(path, "rb", buffering=1 << 20)) as f:
        yield from read_framed(f, path, lengths)


def _length(header: bytes, path: str, offset: int, lengths) -> int:
    """The record length a 12-byte header holds, its CRC and (lengths) its bounds checked."""
    if len(header) < 12:
        raise CorruptShardError(path, offset, f"file ends inside a record header ({len(header)} of 12 bytes)")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise CorruptShardError(path, offset, "record length fails its CRC")
    if lengths and not lengths[0] <= length <= lengths[1]:
        raise CorruptShardError(path, offset, f"a record of {length} bytes where this dataset's geometry makes "
                                              f"records of {lengths[0]} to {lengths[1]} bytes (another patch "
                                              f"size, or a corrupt length)")
    return length


def read_framed(f, path: str = "<stream>", lengths: tuple | None = None) -> Iterator[bytes]:
    """iter_records on an open binary file object (path only names it in errors)."""
    offset = 0
    while True:
        header = f.read(12)
        if not header:
            return
        length = _length(header, path, offset, lengths)
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4:
            raise CorruptShardError(path, offset, f"file ends inside a record of {length} bytes")
        if masked_crc32c(data) != _CRC.unpack(footer)[0]:
            raise CorruptShardError(path, offset, "record data fails its CRC")
        yield data
        offset += length + 16


def scan_frames(path: str, lengths: tuple) -> int:
    """The number of records of a local TFRecord file, from its headers alone (a seek past each record's
    data): every header's CRC and length bounds checked, and the file must end where a record ends.
    Reads 12 bytes a record; the data CRCs are left to the reader that reads the data."""
    size, offset, count = os.path.getsize(path), 0, 0
    with open(path, "rb", buffering=0) as f:
        while offset < size:
            f.seek(offset)
            length = _length(f.read(12), path, offset, lengths)
            if offset + length + 16 > size:
                raise CorruptShardError(path, offset, f"file ends inside a record of {length} bytes")
            offset += length + 16
            count += 1
    return count


def empty_batch(n: int, patch_size: int, channels: int) -> dict:
    shape = (n, patch_size, patch_size, channels)
    return {schema.PATCH_A: np.empty(shape, np.uint8), schema.PATCH_B: np.empty(shape, np.uint8),
            schema.OFFSETS: np.empty((n, 8), np.float32), schema.CORNERS: np.empty((n, 8), np.float32),
            schema.IMAGE_ID: np.empty((n,), np.int64), schema.PATCH_INDEX: np.empty((n,), np.int64)}


def decode_batch(serialized: list, patch_size: int, channels: int) -> dict:
    """Serialized records -> numpy arrays keyed by the schema names.

    patch_a / patch_b: uint8 (N, P, P, C); offsets / corners: float32 (N, 8); image_id / patch_index:
    int64 (N,). A record that does not fit the schema (missing feature, wrong size) raises DatasetError.
    """
    n = len(serialized)
    out = empty_batch(n, patch_size, channels)
    flat = {k: out[k].reshape(n, -1) for k in (schema.PATCH_A, schema.PATCH_B)}
    patch_bytes = patch_size * patch_size * channels
    example = tf_example.Example()
    for i, data in enumerate(serialized):
        example.ParseFromString(data)
        f = example.features.feature
        try:
            for key in (schema.PATCH_A, schema.PATCH_B):
                (value,) = f[key].bytes_list.value
                if len(value) != patch_bytes:
                    raise ValueError(f"'{key}' holds {len(value)} bytes, expected {patch_bytes} "
                                     f"({patch_size}x{patch_size}x{channels})")
                flat[key][i] = np.frombuffer(value, np.uint8)
            for key in (schema.OFFSETS, schema.CORNERS):
                value = f[key].float_list.value
                if len(value) != 8:
                    raise ValueError(f"'{key}' holds {len(value)} floats, expected 8")
                out[key][i] = value
            for key in (schema.IMAGE_ID, schema.PATCH_INDEX):
                (out[key][i],) = f[key].int64_list.value
        except ValueError as e:  # also the unpacking of a list that is not exactly one value
            raise DatasetError(f"record {i} of the batch does not fit the schema: {e}") from None
    return out
