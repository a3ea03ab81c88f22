"""homography_index.json (schema.INDEX): the project's index of a built dataset. Readers find shards through
it, never by names. TFDS's own dataset_info.json and features.json beside it are written from it
(pipeline/dataset/tfds_metadata.py).

Layout (format_version 2; 1 was the same content under the name dataset_info.json, which TFDS owns):
{
  "name": "homography", "format_version": 2, "version": "1.0.0" (schema.VERSION, the TFDS version),
  "config": {"patch_size", "rho", "image_width", "image_height", "channels", "patches_per_image", "seed",
             "photometric"},
  "splits": {
    "<split>": {"source_split", "images_listed", "images_used", "images_failed", "failed_by_reason",
                "num_examples", "failed_images_file",
                "shards": [{"file": "<name>-<split>.tfrecord-00000-of-000NN", "num_examples": int}, ...]}
  },
  "build": {"runner", "argv", "started", "finished", "seconds"}
}
Shard file names are relative to the folder holding the index. A build from before the move (its
dataset_info.json holds the project's "format_version") is refused with one line saying to rebuild it.

No Beam needed to read a dataset: local paths go through open/os; only remote ones (gs://...) go through
Beam's FileSystems, imported when such a path shows up, so readers run where only numpy and protobuf are.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath

from pipeline.dataset import schema

FORMAT_VERSION = 2


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


def is_file(path: str) -> bool:
    """exists(path), and locally a file: a folder under a shard's name is as good as missing."""
    return exists(path) if is_remote(path) else os.path.isfile(path)


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
            raise DatasetError(f"split '{name}' is not in {join(self.data_dir, schema.INDEX)}; "
                               f"it has: {', '.join(splits) or 'none'}")
        s = splits[name]
        from pipeline.dataset import index_checks

        index_checks.check_split_total(s, name, join(self.data_dir, schema.INDEX))
        shards = s.get("shards", [])
        info = SplitInfo(name, int(s["num_examples"]), [join(self.data_dir, sh["file"]) for sh in shards],
                         [int(sh["num_examples"]) for sh in shards], s)
        if info.num_examples == 0 and not allow_empty:
            raise DatasetError(f"split '{name}' of {self.data_dir} holds no examples")
        return info

    def readable_split(self, name: str) -> SplitInfo:
        """split(name), refused (DatasetError) unless every shard it lists is there as a file: what a
        reader of the records needs before it starts."""
        info = self.split(name)
        missing = [f for f in info.shard_files if not is_file(f)]
        if missing:
            raise DatasetError(f"split '{name}' of {self.data_dir}: {len(missing)} shard file(s) listed in "
                               f"{schema.INDEX} are missing (or not files), e.g. {missing[0]}")
        return info


def read(data_dir: str) -> DatasetInfo:
    """Loads and checks data_dir's index (schema.INDEX); raises DatasetError with a clear message."""
    path = join(data_dir, schema.INDEX)
    if not exists(path):
        if _is_old_build(data_dir):
            raise DatasetError(f"{data_dir} was built before the project's index moved from "
                               f"{schema.TFDS_DATASET_INFO} to {schema.INDEX}: rebuild it (python -m pipeline.build "
                               f"--coco_dir=... --output_dir={data_dir} --overwrite, with the flags it was built with)")
        raise DatasetError(f"no {schema.INDEX} in {data_dir}: not a built dataset "
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
    except OSError as e:  # a folder under the index's name, no permission
        raise DatasetError(f"{path} cannot be read: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path} is malformed ({type(e).__name__}: {e})") from e
    from pipeline.dataset import index_checks

    index_checks.check_index(raw, config, path)  # bounds and counts every reader relies on
    return DatasetInfo(data_dir, config, raw)


def _is_old_build(data_dir: str) -> bool:
    """Whether data_dir's dataset_info.json is the project's index of format 1 (TFDS's has no format_version)."""
    old = join(data_dir, schema.TFDS_DATASET_INFO)
    try:
        with open_read(old) as f:
            content = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # absent or not JSON: not an old build either
        return False
    return isinstance(content, dict) and "format_version" in content


def write(data_dir: str, raw: dict) -> str:
    """Writes the index atomically (temporary file, then rename): it exists only when complete."""
    return write_atomic(join(data_dir, schema.INDEX), json.dumps(raw, indent=2, sort_keys=False).encode("utf-8"))


def write_atomic(path: str, data: bytes) -> str:
    """Writes path through a temporary file beside it and a rename, locally or through Beam's FileSystems."""
    tmp = path + ".tmp"
    if not is_remote(path):
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path
    FileSystems = _filesystems()
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])
    return path
