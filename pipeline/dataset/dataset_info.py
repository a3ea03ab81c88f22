"""dataset_info.json: the index of a built dataset. Readers find shards through it, never by names.

Layout (format_version 1):
{
  "name": "homography", "format_version": 1,
  "config": {"patch_size", "rho", "image_width", "image_height", "channels", "patches_per_image", "seed"},
  "splits": {
    "<split>": {"source_split", "images_listed", "images_used", "images_failed", "failed_by_reason",
                "num_examples", "failed_images_file",
                "shards": [{"file": "<name>-<split>.tfrecord-00000-of-000NN", "num_examples": int}, ...]}
  },
  "build": {"runner", "argv", "started", "finished", "seconds"}
}
Shard file names are relative to the folder holding dataset_info.json.

No Beam needed to read a dataset: local paths go through open/os; only remote ones (gs://...) go through
Beam's FileSystems, imported when such a path shows up, so readers run where only numpy and protobuf are.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath

from pipeline.dataset import schema

FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A data_dir that cannot be read as a built dataset; the message names the problem."""


def _filesystems():
    """Beam's FileSystems, for remote paths only; a reader without Beam gets a clear error."""
    try:
        from apache_beam.io.filesystems import FileSystems
    except ImportError as e:
        raise DatasetError("reading a remote path (gs://...) needs apache-beam[gcp]; "
                           "copy the dataset to a local folder or install it") from e
    return FileSystems


def is_remote(path: str) -> bool:
    return "://" in path


def join(directory: str, name: str) -> str:
    return _filesystems().join(directory, name) if is_remote(directory) else posixpath.join(directory, name)


def exists(path: str) -> bool:
    return _filesystems().exists(path) if is_remote(path) else os.path.exists(path)


def open_read(path: str):
    """A binary file object for reading: local through open, remote through Beam's FileSystems."""
    return _filesystems().open(path) if is_remote(path) else open(path, "rb")


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    name: str
    num_examples: int
    shard_files: list  # absolute paths
    shard_counts: list
    raw: dict


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    data_dir: str
    config: "PairConfig"  # pipeline.dataset.geometry's, imported when an index is read (it loads OpenCV)
    raw: dict

    @property
    def splits(self) -> list:
        return list(self.raw["splits"])

    def split(self, name: str, allow_empty: bool = False) -> SplitInfo:
        splits = self.raw["splits"]
        if name not in splits:
            raise DatasetError(f"split '{name}' is not in {join(self.data_dir, schema.DATASET_INFO)}; "
                               f"it has: {', '.join(splits) or 'none'}")
        s = splits[name]
        from pipeline.dataset import index_checks

        index_checks.check_split_total(s, name, join(self.data_dir, schema.DATASET_INFO))
        shards = s.get("shards", [])
        info = SplitInfo(name, int(s["num_examples"]), [join(self.data_dir, sh["file"]) for sh in shards],
                         [int(sh["num_examples"]) for sh in shards], s)
        if info.num_examples == 0 and not allow_empty:
            raise DatasetError(f"split '{name}' of {self.data_dir} holds no examples")
        return info


def read(data_dir: str) -> DatasetInfo:
    """Loads and checks data_dir/dataset_info.json; raises DatasetError with a clear message."""
    path = join(data_dir, schema.DATASET_INFO)
    if not exists(path):
        raise DatasetError(f"no {schema.DATASET_INFO} in {data_dir}: not a built dataset "
                           f"(build one with: python -m pipeline.build --coco_dir=... --output_dir={data_dir})")
    from pipeline.dataset import photometric
    from pipeline.dataset.geometry import PairConfig

    try:
        with open_read(path) as f:
            raw = json.loads(f.read().decode("utf-8"))
        config = PairConfig(**{k: int(raw["config"][k]) for k in
                               ("patch_size", "rho", "image_width", "image_height", "channels",
                                "patches_per_image", "seed")},
                            photometric=photometric.model_name(raw["config"].get("photometric")))
        for name, s in raw["splits"].items():
            int(s["num_examples"])
            for sh in s["shards"]:
                str(sh["file"]), int(sh["num_examples"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path} is malformed ({type(e).__name__}: {e})") from e
    from pipeline.dataset import index_checks

    index_checks.check_index(raw, config, path)  # bounds and counts every reader relies on
    return DatasetInfo(data_dir, config, raw)


def write(data_dir: str, raw: dict) -> str:
    """Writes dataset_info.json atomically (temporary file, then rename): it exists only when complete."""
    path = join(data_dir, schema.DATASET_INFO)
    tmp = path + ".tmp"
    text = json.dumps(raw, indent=2, sort_keys=False).encode("utf-8")
    if not is_remote(path):
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
        return path
    FileSystems = _filesystems()
    with FileSystems.create(tmp) as f:
        f.write(text)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])
    return path
