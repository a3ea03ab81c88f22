"""How well the audit's camera label check separates right labels from wrong ones, on a camera build.

  python -m bench.camera_residual --data_dir=OUT [--split=train]

For every pair of the split: the relative residual (pipeline.auditing.measure.camera_label_residual) with
its own label, with the offsets' signs flipped, and with the next-but-six pair's patch B (and its
parameters); prints percentiles of each and the share above the audit's threshold. BUILD_NOTES.md §2.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def residuals(data_dir: str, split: str) -> dict:
    from pipeline import records
    from pipeline.auditing import measure
    from pipeline.dataset import dataset_info, schema

    info = dataset_info.read(data_dir)
    if info.config.photometric != "camera":
        raise SystemExit(f"bench.camera_residual: error: {data_dir} is not a --photometric=camera build")
    p, c = info.config.patch_size, info.config.channels
    recs = [schema.decode(data, p, c) for path in info.split(split).shard_files  # one pass, camera parameters kept
            for data in records.iter_records(path)]
    out = {"right": [], "flipped": [], "other_b": []}
    for i, r in enumerate(recs):
        o = recs[(i + 7) % len(recs)]
        a, b, off = r[schema.PATCH_A], r[schema.PATCH_B], r[schema.OFFSETS]
        pa, pb = r[schema.PHOTOMETRIC_A], r[schema.PHOTOMETRIC_B]
        out["right"].append(measure.camera_label_residual(a, b, off, pa, pb, p)[0])
        out["flipped"].append(measure.camera_label_residual(a, b, -off, pa, pb, p)[0])
        out["other_b"].append(measure.camera_label_residual(a, o[schema.PATCH_B], off, pa, o[schema.PHOTOMETRIC_B], p)[0])
    return {k: np.asarray(v) for k, v in out.items()}


def main(argv):
    from absl import flags

    from pipeline.auditing import measure

    f = flags.FLAGS
    res = residuals(f.data_dir, f.split)
    t = measure.CAMERA_RESIDUAL_THRESHOLD
    summary = {k: {"pairs": len(v), "percentiles_0_1_50_99_100": np.percentile(v, [0, 1, 50, 99, 100]).round(3).tolist(),
                   f"share_above_{t}": round(float((v > t).mean()), 4)} for k, v in res.items()}
    for k, v in summary.items():
        print(f"{k}: {json.dumps(v)}")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("data_dir", None, "A --photometric=camera build", required=True)
    flags.DEFINE_string("split", "train", "Split to measure")
    sys.exit(app.run(main))
