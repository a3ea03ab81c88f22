"""What one shard of a split holds, without Beam: the runner-independent half of the builder.

The Beam builder (pipeline.build, through pipeline.builder.transforms) and the local builder (pipeline.local_build,
for machines without Beam) both go through these functions, so they write the same bytes:
  assign_shards   which images go to which shard (round robin over the id-sorted listing)
  image_pairs     one image -> its serialised records, in patch order
  write_shard     one shard file from its images; the images that must be skipped, with their reasons
  split_summary   the split's entry of the index (homography_index.json) from its shard results and skipped images
  write_metadata  the index, then TFDS's dataset_info.json and features.json: a build's last writes
"""
from __future__ import annotations

import math

import cv2

from pipeline.builder import coco
from pipeline.dataset import dataset_info, geometry, photometric, schema, tfds_metadata
from pipeline.reader import framing

MIN_SHARDS = 8
TARGET_SHARD_BYTES = 64 * 2**20  # ~64 MiB a shard: enough files to interleave, few enough to list


def parse_splits(text: str) -> dict:
    """'train=train2017,validation=val2017' -> {'train': 'train2017', 'validation': 'val2017'}; ValueError."""
    splits = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        split, sep, source = (s.strip() for s in item.partition("="))
        if not sep or not split or not source:
            raise ValueError(f"--splits item '{item}' is not NAME=COCO_SPLIT (e.g. train=train2017)")
        if not split.replace("_", "a").isalnum() or not split.isascii():  # it becomes part of the shard names
            raise ValueError(f"--splits: split name '{split}' is not letters, digits and _ (it names the shard "
                             f"files: '/' or '..' would put them outside output_dir)")
        if split in splits:
            raise ValueError(f"--splits names split '{split}' twice")
        splits[split] = source
    if not splits:
        raise ValueError("--splits is empty")
    return splits


def list_splits(coco_dir: str, splits: dict, config: geometry.PairConfig, num_shards: int = 0,
                max_images: int = 0, name: str = "homography") -> dict:
    """What every build checks and lists before it writes anything: {split: (images, source, COCO split)}.
    ValueError (coco.ListingError among them) names the problem; name must be a TFDS dataset name."""
    tfds_metadata.check_name(name)
    config.validate()
    if num_shards < 0 or max_images < 0:
        raise ValueError("--num_shards and --max_images must be >= 0")
    listings = {}
    for split, source_split in splits.items():
        images, source = coco.list_split(coco_dir, source_split)
        listings[split] = (images[:max_images] if max_images else images, source, source_split)
    return listings


shard_name = schema.shard_file


def auto_num_shards(num_images: int, config: geometry.PairConfig) -> int:
    """About TARGET_SHARD_BYTES a shard, a multiple of MIN_SHARDS, never more shards than images.

    A multiple of 8: equal shards then split evenly over 1, 2, 4 or 8 workers (27 shards on 2 workers
    leave one worker idle for the last shard's time); the count depends on the dataset only, never on
    the runner, so the files stay the same whatever runs the build."""
    record_bytes = 2 * config.patch_size ** 2 * config.channels + 200
    total = num_images * config.patches_per_image * record_bytes
    by_size = max(MIN_SHARDS, math.ceil(total / TARGET_SHARD_BYTES))
    return max(1, min(num_images, MIN_SHARDS * math.ceil(by_size / MIN_SHARDS)))


def assign_shards(listing: list, num_shards: int) -> list:
    """Round robin over the id-sorted listing: balanced and independent of any runner."""
    ordered = sorted(listing, key=lambda r: r.image_id)
    return [(i % num_shards, r) for i, r in enumerate(ordered)]


def image_pairs(record: coco.ImageRecord, config: geometry.PairConfig, split: str,
                reduced_decode: bool = True) -> list:
    """The serialised records of one image's pairs; raises coco.ImageError for an image to skip."""
    data = coco.read_bytes(record.path)
    src = (record.width, record.height) if reduced_decode else (0, 0)
    try:
        image = coco.decode_resize(data, config.image_width, config.image_height, config.channels, src)
    except cv2.error as e:
        raise coco.ImageError("undecodable", f"OpenCV: {str(e).strip()[:200]}") from e
    return [schema.encode(p.patch_a, p.patch_b, p.offsets, p.corners, record.image_id, p.patch_index,
                          p.photometric_a, p.photometric_b)
            for p in geometry.generate_pairs(image, config, split, record.image_id)]


def failure(record: coco.ImageRecord, error: coco.ImageError) -> dict:
    """One line of failed_images-<split>.jsonl."""
    return {"image_id": record.image_id, "path": record.path, "reason": error.reason, "detail": error.detail}


WRITE_BUFFER_BYTES = 1 << 20  # ~30 records a write(2) instead of one each


def create_shard(path: str):
    """A binary writer for one shard: a local file with a 1 MiB buffer (Python's default of 4 KiB makes a
    system call per 32 KiB record), else Beam's FileSystems (gs://: buffered by the filesystem)."""
    if dataset_info.is_remote(path):
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.create(path)
    return open(path, "wb", buffering=WRITE_BUFFER_BYTES)


def write_shard(writer, images: list, config: geometry.PairConfig, split: str, reduced_decode: bool = True,
                on_image=None) -> tuple[int, int, list]:
    """Writes the pairs of `images` (in id order) to the open binary file `writer`, TFRecord-framed.

    Returns (pairs written, images used, failures). on_image(record, error or None), if given, is called
    after each image (the Beam step counts metrics there)."""
    count = used = 0
    failed = []
    for record in sorted(images, key=lambda r: r.image_id):
        try:
            serialized = image_pairs(record, config, split, reduced_decode)
        except coco.ImageError as e:
            failed.append(failure(record, e))
            if on_image:
                on_image(record, e)
            continue
        for s in serialized:
            framing.write_record(writer, s)
        count += len(serialized)
        used += 1
        if on_image:
            on_image(record, None)
    return count, used, failed


def split_summary(shards: list, failed: list, *, name: str, split: str, source_split: str, source: str,
                  images_listed: int, num_shards: int) -> tuple[dict, list]:
    """(the split's entry of the index, names of the shards that got no image and must exist empty).

    shards: one {"index", "file", "num_examples", "images_used"} per shard written."""
    by_index = {s["index"]: s for s in shards}
    empty = []
    for i in range(num_shards):  # a shard that got no images still exists, empty, so names stay i-of-N
        if i not in by_index:
            empty.append(shard_name(name, split, i, num_shards))
            by_index[i] = {"index": i, "file": empty[-1], "num_examples": 0, "images_used": 0}
    reasons = {}
    for x in failed:
        reasons[x["reason"]] = reasons.get(x["reason"], 0) + 1
    ordered = [by_index[i] for i in range(num_shards)]
    return {
        "source_split": source_split,
        "source": source,
        "images_listed": images_listed,
        "images_used": sum(s["images_used"] for s in ordered),
        "images_failed": len(failed),
        "failed_by_reason": dict(sorted(reasons.items())),
        "num_examples": sum(s["num_examples"] for s in ordered),
        "failed_images_file": schema.failed_images_file(split),
        "shards": [{"file": s["file"], "num_examples": s["num_examples"]} for s in ordered],
    }, empty


def require_room(output_dir: str, listings: dict, config: geometry.PairConfig) -> None:
    """outputs.OutputError when a local output_dir's filesystem has less room than the records of every
    listed image could take (the largest record the geometry allows, index_checks.record_bounds): a build
    that cannot fit is refused before its job, not stopped by a full disk halfway."""
    if dataset_info.is_remote(output_dir):
        return
    from pipeline.dataset import index_checks
    from pipeline.runtime import outputs

    record = index_checks.record_bounds(config.patch_size, config.channels)[1] + 16
    pairs = sum(len(listing) for listing, _, _ in listings.values()) * config.patches_per_image
    outputs.require_space(output_dir, pairs * record + (1 << 20), f"{pairs} pairs")


def no_images_used(splits: dict, output_dir: str) -> str | None:
    """The one-line error of a build in which every image of a split failed (missing, undecodable, ...),
    naming its failed_images file; None when every split has pairs."""
    for split, s in splits.items():
        if s["images_listed"] and not s["images_used"]:
            reasons = ", ".join(f"{k} {v}" for k, v in s["failed_by_reason"].items())
            return (f"split '{split}': none of its {s['images_listed']} images could be used ({reasons}); "
                    f"see {dataset_info.join(output_dir, schema.failed_images_file(split))}")
    return None


def failed_lines(failed: list) -> bytes:
    """failed_images-<split>.jsonl's content: one JSON object a line, by image id."""
    import json

    return "".join(json.dumps(x, sort_keys=True) + "\n" for x in sorted(failed, key=lambda f: f["image_id"])).encode()


def header(config: geometry.PairConfig, name: str, runner: str, argv: list, reduced_decode: bool, started: str) -> dict:
    """The index without its splits: the generation config and how the build ran."""
    return {"name": name, "format_version": dataset_info.FORMAT_VERSION, "version": schema.VERSION,
            "config": {**{k: getattr(config, k) for k in ("patch_size", "rho", "image_width", "image_height",
                                                             "channels", "patches_per_image", "seed")},
                       "photometric": photometric.describe(config.photometric)},
            "build": {"runner": runner, "argv": list(argv), "reduced_decode": reduced_decode, "started": started}}


def write_metadata(output_dir: str, raw: dict) -> str:
    """A build's last writes, each atomic: the index, then TFDS's features.json and dataset_info.json
    from it (so the folder is a TFDS dataset directory). Returns the index's path."""
    path = dataset_info.write(output_dir, raw)
    tfds_metadata.write(output_dir, raw)
    return path
