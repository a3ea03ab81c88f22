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
"""
from __future__ import annotations

import dataclasses
import json
import posixpath

from apache_beam.io.filesystems import FileSystems

from pipeline import schema
from pipeline.geometry import PairConfig

FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A data_dir that cannot be read as a built dataset; the message names the problem."""


def join(directory: str, name: str) -> str:
    return FileSystems.join(directory, name) if "://" in directory else posixpath.join(directory, name)


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
    config: PairConfig
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
        shards = s.get("shards", [])
        info = SplitInfo(name, int(s["num_examples"]), [join(self.data_dir, sh["file"]) for sh in shards],
                         [int(sh["num_examples"]) for sh in shards], s)
        if info.num_examples == 0 and not allow_empty:
            raise DatasetError(f"split '{name}' of {self.data_dir} holds no examples")
        return info


def read(data_dir: str) -> DatasetInfo:
    """Loads and checks data_dir/dataset_info.json; raises DatasetError with a clear message."""
    path = join(data_dir, schema.DATASET_INFO)
    if not FileSystems.exists(path):
        raise DatasetError(f"no {schema.DATASET_INFO} in {data_dir}: not a built dataset "
                           f"(build one with: python -m pipeline.build --coco_dir=... --output_dir={data_dir})")
    try:
        with FileSystems.open(path) as f:
            raw = json.loads(f.read().decode("utf-8"))
        config = PairConfig(**{k: int(raw["config"][k]) for k in
                               ("patch_size", "rho", "image_width", "image_height", "channels",
                                "patches_per_image", "seed")})
        for name, s in raw["splits"].items():
            int(s["num_examples"])
            for sh in s["shards"]:
                str(sh["file"]), int(sh["num_examples"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path} is malformed ({type(e).__name__}: {e})") from e
    return DatasetInfo(data_dir, config, raw)


def write(data_dir: str, raw: dict) -> str:
    """Writes dataset_info.json atomically (temporary file, then rename): it exists only when complete."""
    path = join(data_dir, schema.DATASET_INFO)
    tmp = path + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(json.dumps(raw, indent=2, sort_keys=False).encode("utf-8"))
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])
    return path
