"""The audit's verdict and report: checks as pure functions of the Beam job's results, then audit.json,
audit.md and PNG plots, all rendered from one dict.

results (what pipeline.audit's job writes, regrouped): {
  "shards":    {split: [{file, index, expected, read, error}, ...]},
  "stats":     {split: SplitStatsFn output},
  "quantiles": {split: [101 residual percentiles]},
  "images":    {split: ImageCountsFn output},
  "leakage":   {count, examples}, "duplicates": {groups, extra_copies, cross_split_groups, examples}}
"""
from __future__ import annotations

import io
import json

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.dataset import dataset_info

HARD, SOFT = True, False
UNIFORMITY_ALPHA = 1e-3   # family-wise, Bonferroni over the 8 coordinates
MAX_NEAR_CONSTANT_SHARE = 0.05


def check(name: str, hard: bool, passed: bool, summary: str, **numbers) -> dict:
    return {"name": name, "hard": hard, "passed": bool(passed), "summary": summary, "numbers": numbers}


# ---------------------------------------------------------------- checks, one small function each

def check_shard_read(split, shards):
    bad = [{"file": s["file"], "error": s["error"], "records_before_error": s["read"]} for s in shards if s["error"]]
    return check(f"{split}/shard_read", HARD, not bad,
                 f"{len(shards) - len(bad)}/{len(shards)} shards read to the end"
                 + (f"; FAILED: {'; '.join(b['file'] + ': ' + b['error'] for b in bad[:3])}" if bad else ""),
                 shards=len(shards), errors=bad)


def check_shard_counts(split, shards):
    bad = [{"file": s["file"], "listed": s["expected"], "read": s["read"]} for s in shards if s["read"] != s["expected"]]
    return check(f"{split}/shard_counts", HARD, not bad,
                 f"{len(shards) - len(bad)}/{len(shards)} shards hold the records homography_index.json lists"
                 + ("; FAILED: " + ", ".join(f"{b['file']} listed {b['listed']} read {b['read']}" for b in bad[:3])
                    if bad else ""),
                 mismatches=bad)


def check_split_counts(split, split_info, shards, ppi):
    numbers = {"num_examples": int(split_info["num_examples"]),
               "sum_of_listed_shards": sum(s["expected"] for s in shards),
               "records_read": sum(s["read"] for s in shards),
               "images_used_x_patches_per_image": int(split_info["images_used"]) * ppi}
    ok = len(set(numbers.values())) == 1
    return check(f"{split}/split_counts", HARD, ok,
                 ("num_examples, shard list, records read and images_used x patches_per_image agree: "
                  f"{numbers['num_examples']}") if ok else f"counts disagree: {numbers}", **numbers)


def check_pairs_per_image(split, split_info, images):
    images = images or {"images": 0, "pairs_histogram": {}, "wrong_pairs": {"count": 0, "examples": []},
                        "failed_with_pairs": {"count": 0, "examples": []}}
    used = int(split_info["images_used"])
    problems = []
    if images["images"] != used:
        problems.append(f"{images['images']} images have pairs, homography_index.json says {used} used")
    if images["wrong_pairs"]["count"]:
        problems.append(f"{images['wrong_pairs']['count']} images without exactly patch indices "
                        f"0..{images['patches_per_image'] - 1} (e.g. {images['wrong_pairs']['examples'][:2]})")
    if images["failed_with_pairs"]["count"]:
        problems.append(f"{images['failed_with_pairs']['count']} images listed as failed have pairs "
                        f"(e.g. {images['failed_with_pairs']['examples'][:2]})")
    return check(f"{split}/pairs_per_image", HARD, not problems,
                 "; ".join(problems) or f"all {used} images have exactly {images.get('patches_per_image')} pairs, "
                                         f"failed images have none",
                 images_with_pairs=images["images"], images_used=used, pairs_histogram=images["pairs_histogram"],
                 wrong=images["wrong_pairs"], failed_with_pairs=images["failed_with_pairs"])


def check_offset_range(split, stats, rho):
    f = stats["offset_range"]
    off = stats["offsets"]
    return check(f"{split}/offset_range", HARD, f["count"] == 0,
                 f"{f['count']} pairs with an offset outside [-{rho}, {rho}]"
                 + (f" (e.g. {f['examples'][:2]})" if f["count"] else
                    f"; observed [{min(off['min']):.3f}, {max(off['max']):.3f}]"),
                 failures=f, observed_min=min(off["min"]), observed_max=max(off["max"]))


def check_margins(split, stats, config):
    f = stats["margins"]
    tl = stats["top_left"]
    p, r = config.patch_size, config.rho
    return check(f"{split}/margins", HARD, f["count"] == 0,
                 f"{f['count']} pairs whose corners are not a {p}x{p} square at an integer top-left in "
                 f"x in [{r}, {config.image_width - p - r}], y in [{r}, {config.image_height - p - r}]"
                 + (f" (e.g. {f['examples'][:2]})" if f["count"] else
                    f"; observed x [{tl['min'][0]:g}, {tl['max'][0]:g}], y [{tl['min'][1]:g}, {tl['max'][1]:g}]"),
                 failures=f)


def check_label_consistency(split, stats, quantiles, max_share):
    n, f = stats["pairs"], stats["label"]
    share = f["count"] / n if n else 1.0
    q = quantiles or [float("nan")] * 101
    res = stats["residual"]
    return check(f"{split}/label_consistency", HARD, n > 0 and share <= max_share,
                 f"warp(patch_a, H_local) vs patch_b: mean abs residual {res.get('mean', [float('nan')])[0]:.4f} "
                 f"{stats.get('residual_unit', 'grey levels')} (median {q[50]:.4f}, p99 {q[99]:.4f}, max {q[100]:.4f}); "
                 f"{f['count']}/{n} pairs ({100 * share:.2f}%) above {stats['residual_threshold']}, "
                 f"allowed {100 * max_share:.2f}%",
                 pairs=n, above_threshold=f["count"], share_above=share, max_share=max_share,
                 threshold=stats["residual_threshold"], mean=res.get("mean", [None])[0],
                 std=res.get("std", [None])[0], median=q[50], p90=q[90], p99=q[99], max=q[100], examples=f["examples"])


def check_photometric(split, stats, model):
    f = stats.get("photometric") or {"count": 0, "examples": []}
    return check(f"{split}/photometric_parameters", HARD, f["count"] == 0,
                 (f"every pair carries camera parameters within the model's ranges" if model == "camera" else
                  "no pair carries camera parameters (a --photometric=none build)") if not f["count"] else
                 f"{f['count']} pairs with wrong camera parameters (e.g. {f['examples'][:2]})", failures=f)


def uniformity(stats, rho):
    """Chi-square of each coordinate's binned offsets against U[-rho, rho]; (p-values, enough data)."""
    from scipy import stats as st

    counts = np.asarray(stats["offset_hist"]["counts"], np.float64)
    n = counts.sum(axis=1)
    p = [float(st.chisquare(c).pvalue) if total else float("nan") for c, total in zip(counts, n)]
    return p, bool(n.min() >= 5 * counts.shape[1])


def check_offset_uniformity(split, stats, rho):
    p, enough = uniformity(stats, rho)
    off = stats["offsets"]
    family = min(1.0, 8 * min(p))
    return check(f"{split}/offset_uniformity", SOFT, (not enough) or family >= UNIFORMITY_ALPHA,
                 (f"chi-square vs U[-{rho}, {rho}] per coordinate: min p {min(p):.3g} (Bonferroni x8: {family:.3g}, "
                  f"alert below {UNIFORMITY_ALPHA}); mean of means {np.mean(off['mean']):+.3f}, "
                  f"std {np.mean(off['std']):.3f} (uniform: {rho / np.sqrt(3):.3f})")
                 + ("" if enough else "; too few pairs for the test (< 5 a bin), not judged"),
                 p_values=p, enough_data=enough, expected_std=rho / np.sqrt(3))


def check_near_constant(split, stats):
    n = stats["pairs"]
    share_a, share_b = (c / n if n else 0.0 for c in stats["near_constant"])
    return check(f"{split}/near_constant_patches", SOFT, share_a <= MAX_NEAR_CONSTANT_SHARE,
                 f"{100 * share_a:.2f}% of patch_a and {100 * share_b:.2f}% of patch_b have std < "
                 f"{stats['near_constant_std']} grey levels (alert above {100 * MAX_NEAR_CONSTANT_SHARE:.0f}%)",
                 share_a=share_a, share_b=share_b)


def check_leakage(leakage):
    return check("leakage", HARD, leakage["count"] == 0,
                 f"{leakage['count']} image ids in more than one split"
                 + (f" (e.g. {leakage['examples'][:3]})" if leakage["count"] else ""), **leakage)


def check_duplicates(dups):
    return check("duplicates", SOFT, dups["cross_image_groups"] == 0,
                 f"{dups['cross_image_groups']} groups of identical patch_a across images "
                 f"({dups['cross_split_groups']} across splits); {dups['same_image_groups']} same-window redraws "
                 f"within one image (expected now and then); {dups['extra_copies']} extra copies in all", **dups)


def evaluate(results: dict, info: dataset_info.DatasetInfo, max_residual_share: float) -> list:
    """Every check, hard and soft, in a fixed order."""
    config, ppi = info.config, info.config.patches_per_image
    checks = []
    for split in info.splits:
        s_info = info.raw["splits"][split]
        shards = sorted(results["shards"].get(split, []), key=lambda s: s["index"])
        checks += [check_shard_read(split, shards), check_shard_counts(split, shards),
                   check_split_counts(split, s_info, shards, ppi),
                   check_pairs_per_image(split, s_info, results["images"].get(split))]
        stats = results["stats"].get(split)
        if stats is None:  # no record read: right only for a split that homography_index.json says is empty
            empty = int(s_info["num_examples"]) == 0
            checks.append(check(f"{split}/records", HARD, empty, "empty split, as homography_index.json says" if empty
                                else "no record of this split could be read"))
            continue
        checks += [check_offset_range(split, stats, config.rho), check_margins(split, stats, config),
                   check_label_consistency(split, stats, results["quantiles"].get(split), max_residual_share),
                   check_photometric(split, stats, config.photometric),
                   check_offset_uniformity(split, stats, config.rho), check_near_constant(split, stats)]
    checks += [check_leakage(results["leakage"]), check_duplicates(results["duplicates"])]
    return checks


def failed_hard(checks: list) -> list:
    return [c["name"] for c in checks if c["hard"] and not c["passed"]]


# ---------------------------------------------------------------- audit.md

def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    cfg = report["config"]
    verdict = "PASS" if report["passed"] else f"FAIL ({', '.join(report['failed_hard_checks'])})"
    lines = [f"# Dataset audit: {report['data_dir']}", "",
             f"**Verdict: {verdict}**", "",
             f"Config: {cfg['image_width']}x{cfg['image_height']}x{cfg['channels']}, patch {cfg['patch_size']}, "
             f"rho {cfg['rho']}, {cfg['patches_per_image']} pairs/image, seed {cfg['seed']}. "
             f"Audited in {report['seconds']} s with {report['runner']}.", "",
             "## Checks", "", "| status | check | kind | result |", "|---|---|---|---|"]
    for c in report["checks"]:
        status = "pass" if c["passed"] else ("**FAIL**" if c["hard"] else "warn")
        lines.append(f"| {status} | {c['name']} | {'hard' if c['hard'] else 'soft'} | {c['summary']} |")
    for split, st in report["stats"].items():
        off, img, tl = st["offsets"], st["image"], st["top_left"]
        lines += ["", f"## {split}: {st['pairs']} pairs", "",
                  "| offset | min | max | mean | std |", "|---|---|---|---|---|"]
        names = [f"{c}{a}" for c in ("TL", "TR", "BR", "BL") for a in (".dx", ".dy")]
        for i, name in enumerate(names):
            lines.append(f"| {name} | {off['min'][i]:.3f} | {off['max'][i]:.3f} | {off['mean'][i]:+.3f} | {off['std'][i]:.3f} |")
        q = report["residual_quantiles"].get(split) or [float("nan")] * 101
        lines += ["", f"Top-left x in [{tl['min'][0]:g}, {tl['max'][0]:g}] (mean {tl['mean'][0]:.1f}), "
                      f"y in [{tl['min'][1]:g}, {tl['max'][1]:g}] (mean {tl['mean'][1]:.1f}).", "",
                  f"Patch intensity: patch_a mean {img['mean'][0]:.1f} (std over pairs {img['std'][0]:.1f}), "
                  f"mean within-patch std {img['mean'][1]:.1f}; patch_b mean {img['mean'][2]:.1f}, "
                  f"mean within-patch std {img['mean'][3]:.1f}.", "",
                  f"Label residual ({st.get('residual_unit', 'grey levels')}): mean {st['residual']['mean'][0]:.4f}, median {q[50]:.4f}, "
                  f"p90 {q[90]:.4f}, p99 {q[99]:.4f}, max {q[100]:.4f}; valid region share mean "
                  f"{st['valid_share']['mean'][0]:.3f} (min {st['valid_share']['min'][0]:.3f}).", ""]
        for plot in report["plots"].get(split, []):
            lines.append(f"![{plot}]({plot})")
    lines += ["", "## Beam metrics", ""] + [f"- {k}: {v}" for k, v in report.get("metrics", {}).items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots (matplotlib Agg)

def _save(fig, output_dir, name):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    with FileSystems.create(dataset_info.join(output_dir, name)) as f:
        f.write(buf.getvalue())
    return name


def plots(split: str, stats: dict, config, output_dir: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    rho, p = config.rho, config.patch_size
    # offsets: 8 histograms against the uniform expectation
    h = stats["offset_hist"]
    edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"])
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), sharex=True)
    for i, ax in enumerate(axes.T.ravel()):
        ax.bar(edges[:-1], counts[i], width=np.diff(edges), align="edge", color="tab:blue", alpha=0.7)
        ax.axhline(counts[i].sum() / counts.shape[1], color="k", ls="--", lw=1)
        ax.set_title(f"{('TL', 'TR', 'BR', 'BL')[i // 2]} {'dx' if i % 2 == 0 else 'dy'}")
    fig.suptitle(f"{split}: offsets vs U[-{rho}, {rho}] (dashed)")
    names.append(_save(fig, output_dir, f"offsets-{split}.png"))
    plt.close(fig)
    # positions: top-left heat map and the patch coverage it implies
    # (cells of `step` px a side, statistics.MAX_POSITION_CELLS at most: the coverage is drawn at that scale)
    pos, step = np.asarray(stats["positions"]), int(stats.get("positions_step", 1))
    cover = np.zeros((-(-config.image_height // step), -(-config.image_width // step)))
    for (yy, xx) in zip(*np.nonzero(pos)):
        y0, x0 = (yy * step + rho) // step, (xx * step + rho) // step
        cover[y0:(yy * step + rho + p - 1) // step + 1, x0:(xx * step + rho + p - 1) // step + 1] += pos[yy, xx]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    im = axes[0].imshow(pos, origin="upper", cmap="viridis", aspect="auto",
                        extent=(rho - 0.5, rho + pos.shape[1] * step - 0.5, rho + pos.shape[0] * step - 0.5, rho - 0.5))
    axes[0].set_title("top-left (x, y) of patch A: pairs per pixel")
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(cover, cmap="magma", extent=(-0.5, cover.shape[1] * step - 0.5, cover.shape[0] * step - 0.5,
                                                     -0.5))
    axes[1].set_title(f"patch A coverage of the {config.image_width}x{config.image_height} image")
    fig.colorbar(im, ax=axes[1])
    names.append(_save(fig, output_dir, f"positions-{split}.png"))
    plt.close(fig)
    # label residual
    h = stats["residual_hist"]
    edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"][0])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(np.maximum(edges[:-1], 1e-4), counts, width=np.diff(np.maximum(edges, 1e-4)), align="edge")
    ax.set_xscale("log")
    ax.axvline(stats["residual_threshold"], color="r", ls="--", label=f"threshold {stats['residual_threshold']}")
    ax.set_xlabel("mean |warp(A, H_local) - B| on the valid region (grey levels; first bar: < 1e-3)")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.set_title(f"{split}: label residual per pair")
    names.append(_save(fig, output_dir, f"residuals-{split}.png"))
    plt.close(fig)
    # intensities
    pix = np.asarray(stats["pixels"], np.float64)
    fig, ax = plt.subplots(figsize=(8, 4))
    for row, label in zip(pix, ("patch_a", "patch_b")):
        ax.plot(np.arange(256), row / max(row.sum(), 1), label=label)
    ax.set_xlabel("grey level")
    ax.set_ylabel("share of pixels")
    ax.legend()
    ax.set_title(f"{split}: pixel intensities")
    names.append(_save(fig, output_dir, f"intensity-{split}.png"))
    plt.close(fig)
    return names


def write_json(output_dir: str, name: str, obj) -> str:
    path = dataset_info.join(output_dir, name)
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, indent=1, default=_jsonable).encode("utf-8"))
    return path


def _jsonable(o):
    return o.item() if hasattr(o, "item") else sorted(o) if isinstance(o, (set, frozenset)) else str(o)
