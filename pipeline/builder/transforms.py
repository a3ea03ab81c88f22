"""The Beam steps of the builder, each a named composite transform that can be tested alone.

  ListedImages      (driver-side listing, grouped by shard in the driver) -> PCollection[(shard, [ImageRecord])]
  GroupByShard      the fusion break (a Reshuffle of the small listing, never pair payloads)
  WriteShards       read + decode + resize + generate + serialise + write one shard per group;
                    one output of (kind, dict): ('shard', result) per shard, ('failed', dict) per skipped image
  FinalizeSplit     failed_images-<split>.jsonl + the split's summary (counts, shards)
  WriteDatasetInfo  the index (homography_index.json), then TFDS's features.json and dataset_info.json: last, atomically

Only Create, ParDo, GroupByKey and Flatten, one output per ParDo, no side inputs, and every step feeding
the last one: the subset that every runner translates (Beam 2.77's DaskRunner separates no tagged
outputs, recomputes side inputs inside tasks and computes only the graph's last step).

Images are assigned to shards in the driver (round robin over the id-sorted listing) and each shard is
written by one DoFn call from its id-sorted images, so shard files are identical byte for byte whatever
the runner, the worker count or the bundle split, and no runner ever groups pair payloads in memory.
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
import cv2
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.builder import shards
from pipeline.builder.shards import assign_shards, shard_name  # noqa: F401 (the steps' vocabulary, used by tests)
from pipeline.dataset import dataset_info, geometry

NAMESPACE = "homography"


class ListedImages(beam.PTransform):
    """The driver's listing of one split, one element per shard: (shard, its images); small (paths only).

    Grouped here rather than by a GroupByKey: DaskRunner hashes GroupByKey keys into partitions (several
    shards in one task, others idle) at a cost in tasks that grows with the square of the partitions;
    a Create of one element per shard is one task per shard there."""

    def __init__(self, records: list, num_shards: int):
        super().__init__()
        groups = {}
        for shard, record in assign_shards(records, num_shards):
            groups.setdefault(shard, []).append(record)
        self._groups = sorted(groups.items())

    def expand(self, pbegin):
        return pbegin | "Create" >> beam.Create(self._groups, reshuffle=False)


class GroupByShard(beam.PTransform):
    """Breaks fusion after the listing, so reading images spreads over workers by shard (DaskRunner
    needs no break: it keeps the Create's partitions, one shard each)."""

    def expand(self, pcoll):
        return pcoll | "Reshuffle" >> beam.Reshuffle()


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

    def process(self, element):
        shard, records = element
        file_name = shard_name(self._name, self._split, shard, self._num_shards)
        t0 = t_image = time.time()

        def on_image(record, error):  # Beam metrics per image; the shard itself is pipeline.builder.shards' work
            nonlocal t_image
            if error:
                Metrics.counter(NAMESPACE, f"{self._split}_images_failed_{error.reason}").inc()
            else:
                self._seconds.update(int(1000 * (time.time() - t_image)))
            t_image = time.time()

        # Local files buffered by 1 MiB, gs:// (Dataflow) through FileSystems like all other I/O.
        with shards.create_shard(dataset_info.join(self._output_dir, file_name)) as writer:
            count, used, failed = shards.write_shard(writer, records, self._config, self._split,
                                                     self._reduced_decode, on_image)
        for f in failed:
            yield "failed", f
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
    written = [r for kind, r in results if kind == "shard"]
    failed = [r for kind, r in results if kind == "failed"]
    summary, empty = shards.split_summary(written, failed, name=name, split=split, source_split=source_split,
                                          source=source, images_listed=images_listed, num_shards=num_shards)
    for file_name in empty:
        FileSystems.create(dataset_info.join(output_dir, file_name)).close()
    with FileSystems.create(dataset_info.join(output_dir, summary["failed_images_file"])) as f:
        f.write(shards.failed_lines(failed))
    return {split: summary}


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
    return shards.write_metadata(output_dir, raw)


class WriteDatasetInfo(beam.PTransform):
    """Last step: the index and TFDS's metadata, written only after every split is complete."""

    def __init__(self, output_dir: str, header: dict):
        super().__init__()
        self._output_dir = output_dir
        self._header = header

    def expand(self, summaries):
        return (summaries
                | "Key" >> beam.Map(_keyed, "dataset")
                | "Gather" >> beam.GroupByKey()
                | "Write" >> beam.Map(_write_info, output_dir=self._output_dir, header=self._header))
