"""Audits a built dataset with Apache Beam (DirectRunner locally, Dataflow at scale): counts, label
distributions, patch positions, image statistics, duplicates, leakage and, per pair, that the label
really describes the warp (patch_B(v) = patch_A(H_local v)).

  python -m pipeline.audit --data_dir=OUT --output_dir=REPORT [--residual_threshold=1.0]
                           [--max_residual_share=0.001] [any Beam flag: --runner, --project, ...]

Writes REPORT/audit.json, REPORT/audit.md and PNG plots. Exit status: 0 when every hard check passes
(counts, ranges, margins, label consistency, leakage), 1 when one fails (named on stderr), 2 on bad
usage (bad flags, no homography_index.json).
"""
from __future__ import annotations

import json
import sys
import time

import apache_beam as beam
from absl import flags
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from pipeline.auditing import measure, statistics
from pipeline.auditing import report as audit_report
from pipeline.dataset import dataset_info, schema
from pipeline.runtime import cli, outputs, runners

RAW_RESULTS = "audit_raw.json"  # the job's output; the driver turns it into audit.json, then removes it


class AuditError(ValueError):
    """An audit that cannot start; the message names the problem."""


def shard_specs(info: dataset_info.DatasetInfo) -> list:
    """One spec per shard named in homography_index.json (the only way shards are found). The index was checked
    when read (pipeline.dataset.index_checks); a split total that disagrees with its shards is not refused
    here but reported (the split_counts check), as is every count that disagrees with the shards."""
    specs = []
    for split in info.splits:
        for i, sh in enumerate(info.raw["splits"][split]["shards"]):
            specs.append({"split": split, "index": i, "file": sh["file"],
                          "path": dataset_info.join(info.data_dir, sh["file"]), "expected": sh["num_examples"]})
    return specs


def failed_image_ids(info: dataset_info.DatasetInfo) -> set:
    """{(split, image_id)} from each split's failed_images-<split>.jsonl (small: skipped inputs only)."""
    ids = set()
    for split in info.splits:
        path = dataset_info.join(info.data_dir, info.raw["splits"][split].get(
            "failed_images_file", schema.failed_images_file(split)))
        if not FileSystems.exists(path):
            continue
        with FileSystems.open(path) as f:
            for line in f.read().decode("utf-8").splitlines():
                if line.strip():
                    ids.add((split, int(json.loads(line)["image_id"])))
    return ids


def _tag(section):
    return lambda kv: (section, kv[0], kv[1])


def _write_raw(sections: list, path: str) -> str:
    with FileSystems.create(path) as f:
        f.write(json.dumps(sections, default=audit_report._jsonable).encode("utf-8"))
    return path


def build_pipeline(pipeline, info: dataset_info.DatasetInfo, output_dir: str, residual_threshold: float):
    """Adds the audit to pipeline; its last step writes output_dir/audit_raw.json."""
    cfg = info.config
    read = pipeline | "ReadShards" >> measure.ReadShards(shard_specs(info), cfg)
    pairs = read.records | "MeasurePairs" >> measure.MeasurePairs(cfg)
    per_image = pairs | "PairsPerImage" >> statistics.PairsPerImage(cfg.patches_per_image, failed_image_ids(info))
    sections = [
        read.shards | "TagShards" >> beam.Map(lambda s: ("shards", s["split"], s)),
        pairs | "SplitStatistics" >> statistics.SplitStatistics(cfg, residual_threshold)
        | "TagStats" >> beam.Map(_tag("stats")),
        pairs | "ResidualQuantiles" >> statistics.ResidualQuantiles() | "TagQuantiles" >> beam.Map(_tag("quantiles")),
        per_image["report"] | "TagImages" >> beam.Map(_tag("images")),
        per_image["images"] | "Leakage" >> statistics.Leakage() | "TagLeakage" >> beam.Map(lambda v: ("leakage", None, v)),
        pairs | "Duplicates" >> statistics.Duplicates() | "TagDuplicates" >> beam.Map(lambda v: ("duplicates", None, v)),
    ]
    return (sections
            | "AllSections" >> beam.Flatten()
            # a few small dicts per split: safe to gather; without defaults = no side input (DaskRunner)
            | "Collect" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
            | "WriteRaw" >> beam.Map(_write_raw, dataset_info.join(output_dir, RAW_RESULTS)))


def regroup(sections: list) -> dict:
    """[(section, split, value)] -> the results dict of audit_report."""
    out = {"shards": {}, "stats": {}, "quantiles": {}, "images": {}, "leakage": None, "duplicates": None}
    for section, split, value in sections:
        if section == "shards":
            out["shards"].setdefault(split, []).append(value)
        elif split is None:
            out[section] = value
        else:
            out[section][split] = value
    for statuses in out["shards"].values():  # arrival order is the runner's; the report's is the index's
        statuses.sort(key=lambda st: st["index"])
    # Leakage and Duplicates combine without defaults (portable): no input, no element; fill the empty result.
    for section, fn in (("leakage", statistics.CountAndExamplesFn()), ("duplicates", statistics.DuplicateGroupsFn())):
        if out[section] is None:
            out[section] = fn.extract_output(fn.create_accumulator())
    return out


# What an audit writes in its output_dir: what --overwrite replaces there (the rest is left alone).
REPORT_FILES = ("audit.json", "audit.md", RAW_RESULTS, "offsets-*.png", "positions-*.png", "residuals-*.png",
                "intensity-*.png")



def default_residual_threshold(photometric: str) -> float:
    """1 grey level for exact pairs; for camera pairs the relative residual of auditing.measure."""
    return measure.CAMERA_RESIDUAL_THRESHOLD if photometric == "camera" else 1.0


def audit(data_dir: str, output_dir: str, *, residual_threshold: float | None = None, max_residual_share: float = 0.001,
          beam_args: list | None = None, overwrite: bool = False) -> dict:
    """Runs the audit job, writes audit.json, audit.md and the plots; returns the report dict.

    output_dir: a new or empty folder, or (overwrite) one whose earlier report is replaced.
    residual_threshold None: default_residual_threshold of the build's photometric model."""
    info = dataset_info.read(data_dir)
    if residual_threshold is None:
        residual_threshold = default_residual_threshold(info.config.photometric)
    if not residual_threshold > 0 or not 0 <= max_residual_share < 1:
        raise AuditError(f"--residual_threshold must be > 0 (got {residual_threshold}) and --max_residual_share "
                         f"in [0, 1) (got {max_residual_share})")
    options = PipelineOptions(beam_args or [])
    runners.set_default_runner(options)  # DirectRunner unless named (run on Beam's FnApiRunner, never Prism)
    dry_run = options.view_as(TestOptions).dry_run
    if not dry_run:  # a file, a non-empty folder, one that cannot be written: refused before anything is touched
        outputs.check_output_dir(output_dir, overwrite=overwrite, inputs={"data_dir": data_dir})
    started = time.time()
    try:
        with runners.session(options, worker_paths=[p for p in (data_dir, outputs.nearest_existing(output_dir))
                                                   if "://" not in p],
                             # equal shards, split evenly: 4 tasks a thread balance them; each
                             # CombinePerKey's task shuffle grows with the partitions (DaskRunner)
                             partitions=lambda threads: min(len(shard_specs(info)), 4 * threads)):
            if not dry_run:  # the cluster is there: an earlier report goes (with overwrite), the folder is made
                outputs.prepare_output_dir(output_dir, overwrite=overwrite, ours=REPORT_FILES)
            pipeline = beam.Pipeline(runner=runners.pipeline_runner(options), options=options)
            build_pipeline(pipeline, info, output_dir, residual_threshold)
            result = pipeline.run()
            if dry_run:  # job graph built (and, on Dataflow, checked), nothing ran
                return {"dry_run": True, "job": getattr(result, "job", None)}
            runners.wait(result)  # and closes a DaskRunner's client
    except runners.RunnerError as e:
        raise AuditError(str(e)) from e
    raw_path = dataset_info.join(output_dir, RAW_RESULTS)
    with FileSystems.open(raw_path) as f:
        results = regroup(json.loads(f.read().decode("utf-8")))
    FileSystems.delete([raw_path])

    checks = audit_report.evaluate(results, info, max_residual_share)
    failed = audit_report.failed_hard(checks)
    report = {
        "data_dir": data_dir, "passed": not failed, "failed_hard_checks": failed,
        "failed_soft_checks": [c["name"] for c in checks if not c["hard"] and not c["passed"]],
        "seconds": round(time.time() - started, 1), "runner": str(options.view_as(StandardOptions).runner),
        "params": {"residual_threshold": residual_threshold, "max_residual_share": max_residual_share},
        "config": info.raw["config"], "checks": checks, "stats": results["stats"],
        "residual_quantiles": results["quantiles"], "pairs_per_image": results["images"],
        "shards": results["shards"], "leakage": results["leakage"], "duplicates": results["duplicates"],
        "metrics": runners.counters(result, measure.NAMESPACE) or {}, "plots": {},
    }
    for split, stats in results["stats"].items():
        report["plots"][split] = audit_report.plots(split, stats, info.config, output_dir)
    audit_report.write_json(output_dir, "audit.json", report)
    with FileSystems.create(dataset_info.join(output_dir, "audit.md")) as f:
        f.write(audit_report.markdown(report).encode("utf-8"))
    return report


def summary_text(report: dict, output_dir: str) -> str:
    lines = [f"audit of {report['data_dir']}: {'PASS' if report['passed'] else 'FAIL'} in {report['seconds']} s"]
    for c in report["checks"]:
        status = "ok  " if c["passed"] else ("FAIL" if c["hard"] else "warn")
        lines.append(f"  {status} {c['name']}: {c['summary']}")
    lines.append(f"  report: {dataset_info.join(output_dir, 'audit.md')}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags():
    """Defined when the CLI runs, not at import: other modules (pipeline.build) use the same flag names."""
    flags.DEFINE_string("data_dir", None, "A built dataset (holds homography_index.json); local or gs://")
    flags.DEFINE_string("output_dir", None, "Where audit.json, audit.md and the plots go")
    flags.DEFINE_float("residual_threshold", None,
                       "A pair whose mean |warp(A, H_local) - B| exceeds this has a wrong label; default 1.0 grey "
                       f"level, or {measure.CAMERA_RESIDUAL_THRESHOLD} (relative, tone undone) for a camera build")
    flags.DEFINE_float("max_residual_share", 0.001, "Largest share of pairs above the threshold that still passes")
    flags.DEFINE_bool("overwrite", False, "Replace an earlier audit report in output_dir (else it must be empty)")


def main(argv):
    if not FLAGS.data_dir or not FLAGS.output_dir:
        print("pipeline.audit: error: --data_dir and --output_dir are required", file=sys.stderr)
        return 2
    try:
        report = audit(FLAGS.data_dir, FLAGS.output_dir, residual_threshold=FLAGS.residual_threshold,
                       max_residual_share=FLAGS.max_residual_share, beam_args=argv[1:], overwrite=FLAGS.overwrite)
    except (AuditError, dataset_info.DatasetError, outputs.OutputError) as e:
        print(f"pipeline.audit: error: {e}", file=sys.stderr)
        return 2
    if report.get("dry_run"):
        print("dry run: job graph built, nothing submitted")
        return 0
    print(summary_text(report, FLAGS.output_dir))
    if not report["passed"]:
        print(f"pipeline.audit: FAILED hard checks: {', '.join(report['failed_hard_checks'])}", file=sys.stderr)
        return 1
    return 0


def run():
    cli.run("pipeline.audit", main, _define_flags, beam_args=True)


if __name__ == "__main__":
    run()
