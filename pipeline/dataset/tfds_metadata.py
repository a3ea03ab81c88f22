"""TensorFlow Datasets' metadata of a build: dataset_info.json and features.json, written from the project's index.

With them beside the shards, the output folder is a TFDS dataset directory:

    tfds.builder_from_directory(OUT).as_dataset(split="train")

yields the records pipeline.records reads, value for value. Both files are plain JSON made here (no
tensorflow-datasets needed to build): the bytes TFDS's own DatasetInfo.write_to_directory writes for the
same metadata (tests/test_tfds.py compares them where TFDS is installed).

  dataset_info.json  TFDS's DatasetInfo proto as JSON: name, version, description, citation, homepage (the
                     paper), release notes, file format, and per split the shard lengths in shard order
                     (empty shards included) and the file name template of the shards, relative to the
                     folder (the files sit beside this one, so it works on object stores too).
  features.json      TFDS's FeaturesDict: patch_a / patch_b as Tensor((P, P, C), uint8, encoding="bytes")
                     (the raw bytes the records store, no re-encoding), offsets / corners Tensor((8,), float32),
                     image_id / patch_index Scalar(int64); in camera builds photometric_a / photometric_b
                     Tensor((10,), float32).

Deterministic: the same index gives the same bytes (no times, no paths).
"""
from __future__ import annotations

import json
import re

from pipeline.dataset import dataset_info, schema

# TFDS's names of datasets (snake_case, as tfds.load takes them); the shard-name template needs a letter first.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
FILE_FORMAT = "tfrecord"
FILEPATH_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # = schema.shard_prefix + -00000-of-000NN
HOMEPAGE = "https://arxiv.org/abs/1606.03798"  # the paper (else TFDS shows a catalog page that does not exist)
CITATION = """@article{detone2016deep,
  title={Deep Image Homography Estimation},
  author={DeTone, Daniel and Malisiewicz, Tomasz and Rabinovich, Andrew},
  journal={arXiv preprint arXiv:1606.03798},
  year={2016}
}"""

_TENSOR = "tensorflow_datasets.core.features.tensor_feature.Tensor"
_SCALAR = "tensorflow_datasets.core.features.scalar.Scalar"
_FEATURES_DICT = "tensorflow_datasets.core.features.features_dict.FeaturesDict"


def check_name(name: str) -> str:
    """name if it is a valid TFDS dataset name, else ValueError in one line."""
    if NAME_PATTERN.match(name or ""):
        return name
    suggestion = re.sub(r"[^a-z0-9_]+", "_", (name or "").lower()).strip("_")
    hint = f", e.g. '{suggestion}'" if NAME_PATTERN.match(suggestion) else ""
    raise ValueError(f"--dataset_name '{name}' is not a TensorFlow Datasets name: use snake_case "
                     f"(lower-case letters, digits and _, a letter first){hint}")


def _tensor(python_class: str, shape: tuple, dtype: str, encoding: str = "none") -> dict:
    dims = {"dimensions": [str(d) for d in shape]} if shape else {}
    return {"pythonClassName": python_class, "tensor": {"dtype": dtype, "encoding": encoding, "shape": dims}}


def features(config: dict) -> dict:
    """features.json's content for an index's config (patch_size, channels, photometric)."""
    from pipeline.dataset import photometric

    p, c = int(config["patch_size"]), int(config["channels"])
    feats = {
        schema.PATCH_A: _tensor(_TENSOR, (p, p, c), "uint8", "bytes"),
        schema.PATCH_B: _tensor(_TENSOR, (p, p, c), "uint8", "bytes"),
        schema.OFFSETS: _tensor(_TENSOR, (8,), "float32"),
        schema.CORNERS: _tensor(_TENSOR, (8,), "float32"),
        schema.IMAGE_ID: _tensor(_SCALAR, (), "int64"),
        schema.PATCH_INDEX: _tensor(_SCALAR, (), "int64"),
    }
    if photometric.model_name(config.get("photometric")) == "camera":
        for key in (schema.PHOTOMETRIC_A, schema.PHOTOMETRIC_B):
            feats[key] = _tensor(_TENSOR, (len(photometric.FIELDS),), "float32")
    return {"featuresDict": {"features": feats}, "pythonClassName": _FEATURES_DICT}


def description(raw: dict) -> str:
    from pipeline.dataset import photometric

    c = raw["config"]
    sources = ", ".join(f"{split} from COCO {s['source_split']}" for split, s in raw["splits"].items())
    return (f"Homography pairs as in Deep Image Homography Estimation (DeTone et al. 2016): per pair two "
            f"{c['patch_size']}x{c['patch_size']}x{c['channels']} uint8 patches of one image resized to "
            f"{c['image_width']}x{c['image_height']}, patch B seen through a random homography whose 4 corner "
            f"offsets (dx, dy for TL, TR, BR, BL, pixels, within +-{c['rho']}) are the label; "
            f"{c['patches_per_image']} pairs per image, seed {c['seed']}, photometric model "
            f"{photometric.model_name(c.get('photometric'))}; "
            f"{sources}. Written by the project's builder (pipeline.build / pipeline.local_build) from its "
            f"index {schema.INDEX}, which holds the full generation config and per-split counts.")


def dataset_info_json(raw: dict) -> dict:
    """TFDS's dataset_info.json content (its DatasetInfo proto as JSON) for an index's content."""
    name = check_name(raw["name"])
    splits = []
    for split, s in raw["splits"].items():
        n = len(s["shards"])
        for i, shard in enumerate(s["shards"]):
            expected = schema.shard_file(name, split, i, n)
            if shard["file"] != expected:  # TFDS finds shards by the template alone
                raise ValueError(f"split '{split}' shard {i} is {shard['file']!r}, not {expected!r}: "
                                 f"TFDS could not find it by the name template")
        splits.append({"filepathTemplate": FILEPATH_TEMPLATE, "name": split,
                       "shardLengths": [str(int(shard["num_examples"])) for shard in s["shards"]]})
    return {"citation": CITATION, "description": description(raw), "fileFormat": FILE_FORMAT,
            "location": {"urls": [HOMEPAGE]}, "name": name, "releaseNotes": dict(schema.RELEASE_NOTES),
            "splits": splits, "version": raw.get("version", schema.VERSION)}


def to_bytes(content: dict, indent: int) -> bytes:
    """JSON as TFDS writes it (sorted keys; dataset_info.json indented 2, features.json 4)."""
    return json.dumps(content, indent=indent, sort_keys=True).encode("utf-8")


def write(output_dir: str, raw: dict) -> list:
    """Writes features.json, then dataset_info.json (TFDS's sign of a complete dataset), each atomically,
    beside the shards; local or remote (Beam's FileSystems). Returns their paths."""
    info_bytes = to_bytes(dataset_info_json(raw), 2)  # checks first: nothing written for a bad index
    return [dataset_info.write_atomic(dataset_info.join(output_dir, schema.TFDS_FEATURES),
                                      to_bytes(features(raw["config"]), 4)),
            dataset_info.write_atomic(dataset_info.join(output_dir, schema.TFDS_DATASET_INFO), info_bytes)]
