"""The Beam steps of the builder, each a named composite transform that can be tested alone.

  ListedImages      (driver-side listing) -> PCollection[(shard, ImageRecord)]
  GroupByShard      the fusion break: groups the small listing (never pair payloads) by shard
  WriteShards       read + decode + resize + generate + serialise + write one shard per group;
                    one output of (kind, dict): ('shard', result) per shard, ('failed', dict) per skipped image
  FinalizeSplit     failed_images-<split>.jsonl + the split's summary (counts, shards)
  WriteDatasetInfo  dataset_info.json, last, atomically

Only Create, ParDo, GroupByKey and Flatten, one output per ParDo, no side inputs, and every step feeding
the last one: the subset that every runner translates (Beam 2.77's DaskRunner separates no tagged
outputs, recomputes side inputs inside tasks and computes only the graph's last step).

Images are assigned to shards in the driver (round robin over the id-sorted listing) and each shard is
written by one DoFn call from its id-sorted images, so shard files are identical byte for byte whatever
the runner, the worker count or the bundle split, and no runner ever groups pair payloads in memory.
"""
from __future__ import annotations

import json
import logging
import time

import apache_beam as beam
import cv2
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import coco, dataset_info, geometry, schema
# TFRecord framing without TensorFlow; shards still go through FileSystems like all other I/O.
from pipeline.records import write_record

NAMESPACE = "homography"


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
    return f"{schema.shard_prefix(name, split)}-{index:05d}-of-{num_shards:05d}"


def assign_shards(records: list, num_shards: int) -> list:
    """Round robin over the id-sorted listing: balanced and independent of any runner."""
    ordered = sorted(records, key=lambda r: r.image_id)
    return [(i % num_shards, r) for i, r in enumerate(ordered)]


class ListedImages(beam.PTransform):
    """The driver's listing of one split as a PCollection keyed by shard; small (paths only)."""

    def __init__(self, records: list, num_shards: int):
        super().__init__()
        self._keyed = assign_shards(records, num_shards)

    def expand(self, pbegin):
        return pbegin | "Create" >> beam.Create(self._keyed, reshuffle=False)


class GroupByShard(beam.PTransform):
    """Breaks fusion after the listing, so reading images spreads over workers by shard."""

    def expand(self, pcoll):
        return pcoll | "GroupByKey" >> beam.GroupByKey()


class _WriteShardFn(beam.DoFn):
    def __init__(self, output_dir: str, name: str, split: str, num_shards: int, config: geometry.PairConfig,
                 reduced_decode: bool = True):
        self._output_dir = output_dir
        self._name = name
        self._split = split
        self._num_shards = num_shards
        self._config = config
        self._reduced_decode = reduced_decode
        self._images_listed = Metrics.counter(NAMESPACE, f"{split}_images_listed")
        self._images_used = Metrics.counter(NAMESPACE, f"{split}_images_used")
        self._pairs = Metrics.counter(NAMESPACE, f"{split}_pairs_written")
        self._shards = Metrics.counter(NAMESPACE, f"{split}_shards_written")
        self._seconds = Metrics.distribution(NAMESPACE, f"{split}_ms_per_image")

    def setup(self):
        cv2.setNumThreads(1)  # one image per core already; OpenCV's own threads only oversubscribe

    def _failed(self, record, reason: str, detail: str):
        Metrics.counter(NAMESPACE, f"{self._split}_images_failed_{reason}").inc()
        return "failed", {"image_id": record.image_id, "path": record.path, "reason": reason, "detail": detail}

    def process(self, element):
        shard, records = element
        records = sorted(records, key=lambda r: r.image_id)
        cfg = self._config
        file_name = shard_name(self._name, self._split, shard, self._num_shards)
        path = dataset_info.join(self._output_dir, file_name)
        count = used = 0
        t0 = time.time()
        with FileSystems.create(path) as writer:
            for record in records:
                t_image = time.time()
                try:
                    data = coco.read_bytes(record.path)
                    src = (record.width, record.height) if self._reduced_decode else (0, 0)
                    image = coco.decode_resize(data, cfg.image_width, cfg.image_height, cfg.channels, src)
                except coco.ImageError as e:
                    yield self._failed(record, e.reason, e.detail)
                    continue
                except cv2.error as e:
                    yield self._failed(record, "undecodable", f"OpenCV: {str(e).strip()[:200]}")
                    continue
                for pair in geometry.generate_pairs(image, cfg, self._split, record.image_id):
                    write_record(writer, schema.encode(pair.patch_a, pair.patch_b, pair.offsets, pair.corners,
                                               record.image_id, pair.patch_index))
                    count += 1
                used += 1
                self._seconds.update(int(1000 * (time.time() - t_image)))
        self._images_listed.inc(len(records))
        self._images_used.inc(used)
        self._pairs.inc(count)
        self._shards.inc()
        logging.info("%s shard %d/%d: %d images, %d pairs in %.1fs -> %s", self._split, shard + 1,
                     self._num_shards, used, count, time.time() - t0, file_name)
        yield "shard", {"index": shard, "file": file_name, "num_examples": count, "images_used": used}


class WriteShards(beam.PTransform):
    """(shard, [ImageRecord]) -> ('shard', result) per shard and ('failed', dict) per skipped image."""

    def __init__(self, output_dir, name, split, num_shards, config, reduced_decode=True):
        super().__init__()
        self._fn = _WriteShardFn(output_dir, name, split, num_shards, config, reduced_decode)

    def expand(self, pcoll):
        return pcoll | "GenerateAndWrite" >> beam.ParDo(self._fn)


def _finalize_split(keyed, *, output_dir, name, split, source_split, source, images_listed, num_shards):
    _, results = keyed
    results = list(results)
    shards = [r for kind, r in results if kind == "shard"]
    failed = [r for kind, r in results if kind == "failed"]
    by_index = {s["index"]: s for s in shards}
    for i in range(num_shards):  # a shard that got no images still exists, empty, so names stay i-of-N
        if i not in by_index:
            file_name = shard_name(name, split, i, num_shards)
            FileSystems.create(dataset_info.join(output_dir, file_name)).close()
            by_index[i] = {"index": i, "file": file_name, "num_examples": 0, "images_used": 0}
    failed = sorted(failed, key=lambda f: f["image_id"])
    failed_file = schema.failed_images_file(split)
    with FileSystems.create(dataset_info.join(output_dir, failed_file)) as f:
        f.write("".join(json.dumps(x, sort_keys=True) + "\n" for x in failed).encode("utf-8"))
    reasons = {}
    for x in failed:
        reasons[x["reason"]] = reasons.get(x["reason"], 0) + 1
    ordered = [by_index[i] for i in range(num_shards)]
    return {split: {
        "source_split": source_split,
        "source": source,
        "images_listed": images_listed,
        "images_used": sum(s["images_used"] for s in ordered),
        "images_failed": len(failed),
        "failed_by_reason": dict(sorted(reasons.items())),
        "num_examples": sum(s["num_examples"] for s in ordered),
        "failed_images_file": failed_file,
        "shards": [{"file": s["file"], "num_examples": s["num_examples"]} for s in ordered],
    }}


class FinalizeSplit(beam.PTransform):
    """Waits for every shard of the split, writes failed_images-<split>.jsonl, emits the split summary."""

    def __init__(self, **kwargs):
        super().__init__()
        self._kwargs = kwargs

    def expand(self, results):
        # One key, one group: a GroupByKey instead of side inputs, so every runner waits for all shards.
        return (results
                | "Key" >> beam.Map(_keyed, self._kwargs["split"])
                | "Gather" >> beam.GroupByKey()
                | "Summarize" >> beam.Map(_finalize_split, **self._kwargs))


def _keyed(value, key):
    return key, value


def _write_info(keyed, *, output_dir, header):
    summaries = list(keyed[1])
    raw = dict(header)
    raw["splits"] = {}
    for s in sorted(summaries, key=lambda d: list(d)[0]):
        raw["splits"].update(s)
    raw["build"] = dict(header["build"], finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return dataset_info.write(output_dir, raw)


class WriteDatasetInfo(beam.PTransform):
    """Last step: dataset_info.json, written only after every split is complete."""

    def __init__(self, output_dir: str, header: dict):
        super().__init__()
        self._output_dir = output_dir
        self._header = header

    def expand(self, summaries):
        return (summaries
                | "Key" >> beam.Map(_keyed, "dataset")
                | "Gather" >> beam.GroupByKey()
                | "Write" >> beam.Map(_write_info, output_dir=self._output_dir, header=self._header))
