"""The one check of a dataset index (the project's index file, schema.INDEX) that every reader relies
on: pipeline.reader (and the Keras / PyTorch adapters through it), model.training.data's tf.data path and
the audit all read the index through dataset_info.read, which calls check_index; DatasetInfo.split adds
check_split_total (the audit reports a disagreeing total as its split_counts check instead).

  geometry   whole numbers (never truncated), PairConfig.validate's bounds: patch_size 1..1024, channels 1
             or 3, rho >= 1, the patch and
             its margins inside an image of sides up to 8192
  counts     every split's num_examples and every shard's count a whole number >= 0, and a split's
             num_examples the sum of its shards' counts
  shards     file names relative to the dataset folder (no absolute path, no '..', nothing unprintable),
             each listed once in the whole index (else its records are counted twice, or train is validated on)
  records    record_bounds: the byte lengths a record of the index's geometry can have; a TFRecord header
             claiming another length is refused before anything that size is allocated
"""
from __future__ import annotations

import functools
import posixpath

import numpy as np

from pipeline.dataset import photometric, schema
from pipeline.dataset.dataset_info import DatasetError

RECORD_SLACK = 1024  # bytes a record may hold beyond the schema's features (DESIGN.md: more may be added)


def _count(value, what: str, where: str) -> int:
    if type(value) is not int or value < 0:  # not bool, not 3.0, not "3"
        raise DatasetError(f"{where}: {what} is {value!r}, not a whole number >= 0")
    return value


def check_index(raw: dict, config, path: str) -> None:
    """DatasetError (one line naming the index and the problem) for an index no reader may trust."""
    for key in ("patch_size", "rho", "image_width", "image_height", "channels", "patches_per_image", "seed"):
        value = raw["config"][key]  # dataset_info.read's int() would have made 8.5 into 8, "8" and true too
        if type(value) is not int:
            raise DatasetError(f"{path}: config '{key}' is {value!r}, not a whole number")
    try:
        config.validate()
    except ValueError as e:
        raise DatasetError(f"{path}: the generation config is out of bounds: {e}") from None
    splits = raw.get("splits")
    if not isinstance(splits, dict):
        raise DatasetError(f"{path}: 'splits' is not a mapping of split names")
    listed = {}  # normalised shard name -> the split listing it: no shard read twice, or by two splits
    for name, s in splits.items():
        where = f"{path}, split '{name}'"
        _count(s.get("num_examples"), "num_examples", where)
        if not isinstance(s.get("shards"), list):
            raise DatasetError(f"{where}: 'shards' is not a list")
        for sh in s["shards"]:
            file = sh.get("file") if isinstance(sh, dict) else None
            if not isinstance(file, str) or not file or posixpath.isabs(file) or ".." in file.split("/") \
                    or not file.isprintable():  # a NUL byte would crash open() instead
                raise DatasetError(f"{where}: shard file {file!r} is not a file name inside the dataset folder")
            key = posixpath.normpath(file)
            if key in listed:
                raise DatasetError(f"{where}: shard file {file!r} is listed twice (also in split '{listed[key]}'): "
                                   f"its records would be read twice")
            listed[key] = name
            _count(sh.get("num_examples"), f"the record count of shard {file}", where)


def check_split_total(raw_split: dict, name: str, path: str) -> None:
    """A split's num_examples must be the sum of its shards' counts (else a reader would stop short or
    report a wrong number of pairs)."""
    total = sum(sh["num_examples"] for sh in raw_split["shards"])
    if raw_split["num_examples"] != total:
        raise DatasetError(f"{path}, split '{name}': num_examples is {raw_split['num_examples']} but its "
                           f"{len(raw_split['shards'])} shards list {total} records: the index was changed "
                           f"after the build")


def count_error(path: str, found: int, listed: int) -> DatasetError:
    """The error of a shard that holds another number of records than the index lists."""
    return DatasetError(f"{path} holds {found} records but {schema.INDEX} lists {listed}: "
                        f"the shard or the index was changed after the build")


@functools.lru_cache(maxsize=64)
def record_bounds(patch_size: int, channels: int) -> tuple:
    """(shortest, longest) byte length of one serialized record of this geometry: the schema's features
    with the smallest and the largest values they can hold (camera parameters included), plus RECORD_SLACK."""
    patch = np.zeros((patch_size, patch_size, channels), np.uint8)
    zeros = np.zeros(8, np.float32)
    shortest = len(schema.encode(patch, patch, zeros, zeros, 0, 0))
    camera = np.zeros(len(photometric.FIELDS), np.float32)
    longest = len(schema.encode(patch, patch, zeros, zeros, -1, -1, camera, camera))  # 10-byte varints
    return shortest, longest + RECORD_SLACK
