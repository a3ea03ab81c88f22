"""Builds the homography dataset from COCO 2017 with Apache Beam (DirectRunner locally, Dataflow at scale).

  python -m pipeline.build --coco_dir=DIR --output_dir=OUT [--splits=train=train2017,validation=val2017]
                           [--rho=32 --patch_size=128 --patches_per_image=10 --seed=0 ...]
                           [any Beam flag: --runner, --direct_num_workers, --project, --setup_file ...]
                           [--runner=DaskRunner [--dask_client_address=tcp://HOST:8786 | --dask_local_workers=N]]
"""
from __future__ import annotations

import sys
import time

import apache_beam as beam
from absl import flags, logging
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from pipeline.builder import shards, transforms
from pipeline.dataset import dataset_info, schema
from pipeline.dataset.geometry import PairConfig
from pipeline.runtime import cli, outputs, runners



class BuildError(ValueError):
    """A build that must not start; the message names the problem."""


def parse_splits(text: str) -> dict:
    """'train=train2017,validation=val2017' -> {'train': 'train2017', 'validation': 'val2017'}."""
    try:
        return shards.parse_splits(text)
    except ValueError as e:
        raise BuildError(str(e)) from e


auto_num_shards = shards.auto_num_shards


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses an output_dir that cannot take the dataset (pipeline.runtime.outputs: a file, a non-empty
    folder without overwrite, one that cannot be written); then removes every file a build writes
    (schema.BUILD_OUTPUTS, the index and TFDS's metadata first), leaving others' files alone."""
    if not dataset_info.is_remote(output_dir):
        try:
            outputs.prepare_output_dir(output_dir, overwrite=overwrite, ours=schema.BUILD_OUTPUTS)
        except outputs.OutputError as e:
            raise BuildError(str(e)) from None
        return
    existing = FileSystems.match([dataset_info.join(output_dir, "*")])[0].metadata_list \
        if FileSystems.exists(output_dir) else []
    if existing and not overwrite:
        names = ", ".join(sorted(m.path.rsplit("/", 1)[-1] for m in existing)[:5])
        raise BuildError(f"output_dir {output_dir} is not empty ({len(existing)} files: {names}...); "
                         f"pass --overwrite to replace the dataset there")
    if existing:
        for pattern in schema.BUILD_OUTPUTS:
            paths = [m.path for m in FileSystems.match([dataset_info.join(output_dir, pattern)])[0].metadata_list]
            if paths:
                FileSystems.delete(paths)


def build(coco_dir: str, output_dir: str, splits: dict, config: PairConfig, *, num_shards: int = 0,
          max_images: int = 0, overwrite: bool = False, name: str = "homography", reduced_decode: bool = True,
          beam_args: list | None = None) -> dict:
    """Builds every split in one pipeline; returns the summary (the index's content, or the dry run's)."""
    try:
        listings = shards.list_splits(coco_dir, splits, config, num_shards, max_images, name)
    except ValueError as e:
        raise BuildError(str(e)) from e
    for split, (records, source, _) in listings.items():
        logging.info("split %s: %d images from %s", split, len(records), source)

    options = PipelineOptions(beam_args or [])
    runners.set_default_runner(options)  # DirectRunner unless named (run on Beam's FnApiRunner, never Prism)
    dry_run = options.view_as(TestOptions).dry_run
    if not dry_run and not dataset_info.is_remote(output_dir):
        try:  # refused before the job and before anything there is touched (removals come in _run)
            outputs.check_output_dir(output_dir, overwrite=overwrite, inputs={"coco_dir": coco_dir})
        except outputs.OutputError as e:
            raise BuildError(str(e)) from None
    shard_counts = {split: num_shards or auto_num_shards(len(records), config)
                    for split, (records, _, _) in listings.items()}
    # Workers must see the images and the output folder (or the folder it will be made in); local paths only.
    seen = [p for p in (coco_dir, outputs.nearest_existing(output_dir)) if "://" not in p]
    try:
        # DaskRunner: one partition per shard, so one task writes one shard and dask balances them.
        with runners.session(options, worker_paths=seen, partitions=max(shard_counts.values())):
            return _run(listings, shard_counts, output_dir, config, name, reduced_decode, overwrite, options, dry_run)
    except runners.RunnerError as e:
        raise BuildError(str(e)) from e


def _run(listings, shard_counts, output_dir, config, name, reduced_decode, overwrite, options, dry_run) -> dict:
    if not dry_run:
        prepare_output_dir(output_dir, overwrite)
        try:
            shards.require_room(output_dir, listings, config)
        except outputs.OutputError as e:
            raise BuildError(str(e)) from None
    started = time.time()
    header = shards.header(config, name, str(options.view_as(StandardOptions).runner), sys.argv, reduced_decode,
                           time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    pipeline = beam.Pipeline(runner=runners.pipeline_runner(options), options=options)
    summaries = []
    for split, (records, source, source_split) in listings.items():
        n = shard_counts[split]
        written = (pipeline
                   | f"{split}/ListImages" >> transforms.ListedImages(records, n)
                   | f"{split}/GroupByShard" >> transforms.GroupByShard()
                   | f"{split}/WriteShards" >> transforms.WriteShards(output_dir, name, split, n, config, reduced_decode))
        summaries.append(written | f"{split}/Finalize" >> transforms.FinalizeSplit(
            output_dir=output_dir, name=name, split=split, source_split=source_split,
            source=source, images_listed=len(records), num_shards=n))
    (summaries | "AllSplits" >> beam.Flatten()
     | "WriteDatasetInfo" >> transforms.WriteDatasetInfo(output_dir, header))

    result = pipeline.run()
    if dry_run:
        return {"dry_run": True, "job": getattr(result, "job", None), "pipeline": pipeline}
    runners.wait(result)  # and closes a DaskRunner's client
    info = dataset_info.read(output_dir).raw
    failed = shards.no_images_used(info["splits"], output_dir)
    if failed:  # no index claims a dataset; the shards (empty) and failed_images-*.jsonl stay to look at
        FileSystems.delete([p for p in (dataset_info.join(output_dir, name) for name in
                                         (schema.INDEX, schema.TFDS_DATASET_INFO, schema.TFDS_FEATURES))
                            if FileSystems.exists(p)])
        raise BuildError(failed)
    info["build"]["seconds"] = round(time.time() - started, 1)
    counters = runners.counters(result, transforms.NAMESPACE)
    if counters is None:
        info["build"]["metrics_unavailable"] = f"{type(result).__name__} collects no Beam metrics"
    else:
        info["build"]["metrics"] = counters
    shards.write_metadata(output_dir, info)  # the index with the metrics, TFDS's files (the same bytes) after it
    return info


def summary_text(info: dict, output_dir: str) -> str:
    c = info["config"]
    lines = [f"dataset '{info['name']}' in {output_dir}",
             f"  config: {c['image_width']}x{c['image_height']}x{c['channels']}, patch {c['patch_size']}, "
             f"rho {c['rho']}, {c['patches_per_image']} pairs/image, seed {c['seed']}"]
    for split, s in info["splits"].items():
        failed = f" ({', '.join(f'{k}: {v}' for k, v in s['failed_by_reason'].items())})" if s["images_failed"] else ""
        lines.append(f"  {split:<11} from {s['source_split']}: {s['num_examples']} pairs in {len(s['shards'])} shards; "
                     f"images listed {s['images_listed']}, used {s['images_used']}, failed {s['images_failed']}{failed}")
    if "seconds" in info.get("build", {}):
        total = sum(s["num_examples"] for s in info["splits"].values())
        lines.append(f"  built in {info['build']['seconds']} s ({total / max(info['build']['seconds'], 1e-9):.0f} pairs/s) "
                     f"with {info['build']['runner']}")
    lines.append(f"  index: {dataset_info.join(output_dir, schema.INDEX)}; TFDS: tfds.builder_from_directory"
                 f"({output_dir!r}) ({schema.TFDS_DATASET_INFO}, {schema.TFDS_FEATURES})")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags():
    """Defined when the CLI runs, not at import: other commands import build() and define their own flags."""
    cli.define_dataset_flags("COCO 2017 root (images in <split>/, annotations/ beside); local or gs://",
                             f"Where the shards, failed_images-*.jsonl, {schema.INDEX} and TFDS's "
                             f"{schema.TFDS_DATASET_INFO} and {schema.TFDS_FEATURES} go")


def main(argv):
    if not FLAGS.coco_dir or not FLAGS.output_dir:
        return cli.fail("pipeline.build", "--coco_dir and --output_dir are required")
    config = cli.pair_config_from_flags()
    try:
        info = build(FLAGS.coco_dir, FLAGS.output_dir, parse_splits(FLAGS.splits), config,
                     num_shards=FLAGS.num_shards, max_images=FLAGS.max_images, overwrite=FLAGS.overwrite,
                     name=FLAGS.dataset_name, reduced_decode=FLAGS.reduced_decode, beam_args=argv[1:])
    except (BuildError, dataset_info.DatasetError) as e:
        return cli.fail("pipeline.build", str(e))
    except Exception as e:  # a disk that filled up (or went read-only) while the workers wrote shards
        if outputs.write_failure(e) is None:
            raise
        return cli.fail("pipeline.build", outputs.dataset_write_failure(FLAGS.output_dir, e))
    if info.get("dry_run"):
        print("dry run: job graph built, nothing submitted")
        return 0
    print(summary_text(info, FLAGS.output_dir))
    return 0


def run():
    cli.run("pipeline.build", main, _define_flags, beam_args=True)


if __name__ == "__main__":
    run()
