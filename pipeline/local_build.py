"""The builder without Beam: the same shards, byte for byte, from a pool of local processes.

  python -m pipeline.local_build --coco_dir=DIR --output_dir=OUT [--splits=train=train2017,validation=val2017]
                                 [--rho=32 --patch_size=128 --patches_per_image=10 --seed=0 --workers=0 ...]

For a machine that has numpy, OpenCV and protobuf but not Apache Beam (a bare GPU box, a laptop that only
needs a small build): every shard is written by pipeline.builder.shards.write_shard, as pipeline.build's Beam step
writes it, so the records, their order, the shard names and the index's counts are the same as
pipeline.build's for the same flags (tests/test_gpu_recipe.py compares them). Local folders only; use
pipeline.build for gs:// or a cluster. The index (homography_index.json) and TFDS's dataset_info.json and
features.json are written last, atomically, as there.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time

from pipeline.builder import shards
from pipeline.dataset import dataset_info, schema
from pipeline.dataset.geometry import PairConfig
from pipeline.runtime import outputs

class LocalBuildError(ValueError):
    """A build that must not start; the message names the problem."""


def _prepare_output_dir(output_dir: str, overwrite: bool, listings: dict, config: PairConfig, coco_dir: str) -> None:
    if dataset_info.is_remote(output_dir):
        raise LocalBuildError(f"the local builder writes local folders only, not {output_dir}: use pipeline.build")
    try:  # a file, a non-empty folder without overwrite, a folder that cannot be written: one line
        outputs.prepare_output_dir(output_dir, overwrite=overwrite, ours=schema.BUILD_OUTPUTS,
                                   inputs={"coco_dir": coco_dir})
        shards.require_room(output_dir, listings, config)
    except outputs.OutputError as e:
        raise LocalBuildError(str(e)) from None


def _write_one(task) -> tuple[dict, list]:
    """One shard, in a worker process: (shard result, failures)."""
    output_dir, name, split, index, num_shards, images, config, reduced_decode = task
    file_name = shards.shard_name(name, split, index, num_shards)
    with shards.create_shard(os.path.join(output_dir, file_name)) as writer:
        count, used, failed = shards.write_shard(writer, images, config, split, reduced_decode)
    return {"index": index, "file": file_name, "num_examples": count, "images_used": used}, failed


def _init_worker(driver_pid: int):
    import cv2

    from pipeline.runtime.sdk_worker import exit_without_driver

    exit_without_driver(driver_pid)  # a SIGKILLed driver must not leave workers writing shards

    cv2.setNumThreads(1)  # one shard per process already


def build(coco_dir: str, output_dir: str, splits: dict, config: PairConfig, *, num_shards: int = 0,
          max_images: int = 0, overwrite: bool = False, name: str = "homography", reduced_decode: bool = True,
          workers: int = 0, log=print) -> dict:
    """Builds every split; returns the index's content. workers: processes (0 = one per core)."""
    if workers < 0:
        raise LocalBuildError("--workers must be >= 0")
    try:
        listings = shards.list_splits(coco_dir, splits, config, num_shards, max_images, name)
    except ValueError as e:
        raise LocalBuildError(str(e)) from e
    _prepare_output_dir(output_dir, overwrite, listings, config, coco_dir)
    workers = workers or os.cpu_count() or 1
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time()
    raw = shards.header(config, name, f"local ({workers} processes)", sys.argv, reduced_decode, started)
    raw["splits"] = {}
    # fork would copy a parent that may hold threads (a Keras/JAX process): spawn is the safe start.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        for split, (listing, source, source_split) in listings.items():
            n = num_shards or shards.auto_num_shards(len(listing), config)
            by_shard = [[] for _ in range(n)]
            for index, record in shards.assign_shards(listing, n):
                by_shard[index].append(record)
            tasks = [(output_dir, name, split, i, n, images, config, reduced_decode)
                     for i, images in enumerate(by_shard) if images]
            results, failed = [], []
            for done, (result, bad) in enumerate(pool.imap_unordered(_write_one, tasks), start=1):
                results.append(result)
                failed.extend(bad)
                if log and (done % max(1, len(tasks) // 10) == 0 or done == len(tasks)):
                    log(f"{split}: {done}/{len(tasks)} shards, {sum(r['num_examples'] for r in results)} pairs, "
                        f"{time.time() - t0:.1f} s")
            summary, empty = shards.split_summary(results, failed, name=name, split=split,
                                                  source_split=source_split, source=source,
                                                  images_listed=len(listing), num_shards=n)
            for file_name in empty:
                open(os.path.join(output_dir, file_name), "wb").close()
            with open(os.path.join(output_dir, schema.failed_images_file(split)), "wb") as f:
                f.write(shards.failed_lines(failed))
            raw["splits"][split] = summary
    failed = shards.no_images_used(raw["splits"], output_dir)
    if failed:  # no index; the shards (empty) and failed_images-*.jsonl stay to look at
        raise LocalBuildError(failed)
    raw["build"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    raw["build"]["seconds"] = round(time.time() - t0, 1)
    shards.write_metadata(output_dir, raw)
    return raw


def _define_flags():
    from absl import flags

    from pipeline.runtime import cli

    cli.define_dataset_flags("COCO 2017 root (images in <split>/, annotations/ beside); local",
                             f"Local folder for the shards, failed_images-*.jsonl, {schema.INDEX} and TFDS's "
                             f"{schema.TFDS_DATASET_INFO} and {schema.TFDS_FEATURES}")
    flags.DEFINE_integer("workers", 0, "Worker processes; 0 = one per core")


def parse_splits(text: str) -> dict:
    try:
        return shards.parse_splits(text)
    except ValueError as e:
        raise LocalBuildError(str(e)) from e


def main(argv):
    from absl import flags

    from pipeline.runtime import cli

    f = flags.FLAGS
    if len(argv) > 1:
        return cli.fail("pipeline.local_build", f"unexpected arguments: {' '.join(argv[1:])}")
    if not f.coco_dir or not f.output_dir:
        return cli.fail("pipeline.local_build", "--coco_dir and --output_dir are required")
    try:
        info = build(f.coco_dir, f.output_dir, parse_splits(f.splits), cli.pair_config_from_flags(),
                     num_shards=f.num_shards, max_images=f.max_images, overwrite=f.overwrite, name=f.dataset_name,
                     reduced_decode=f.reduced_decode, workers=f.workers)
    except (LocalBuildError, dataset_info.DatasetError) as e:
        return cli.fail("pipeline.local_build", str(e))
    except OSError as e:  # a disk that filled up (or went read-only) while shards were written
        if outputs.write_failure(e) is None:
            raise
        return cli.fail("pipeline.local_build", outputs.dataset_write_failure(f.output_dir, e))
    total = sum(s["num_examples"] for s in info["splits"].values())
    per_split = ", ".join(f"{k} {v['num_examples']}" for k, v in info["splits"].items())
    print(f"built {total} pairs ({per_split}) in "
          f"{info['build']['seconds']} s with {info['build']['runner']}; index: "
          f"{os.path.join(f.output_dir, schema.INDEX)}; TFDS: tfds.builder_from_directory({f.output_dir!r})")
    return 0


def run():
    from pipeline.runtime import cli

    cli.run("pipeline.local_build", main, _define_flags)


if __name__ == "__main__":
    run()
