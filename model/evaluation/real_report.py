"""The real-pair report's outputs, all rendered from the one dict that model.evaluate_real builds.

  real_report.json           the dict itself (per pair: every method's H, error, failure, time)
  real_report.md             the same numbers as Markdown: overall, per group, per sequence, per pair
  error_curves.png           share of pairs under each corner error, per method (the AUC's curve)
  figures/<seq>_1-<k>.png    image k with image 1's outline mapped in by the true H and by each method's
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from model.evaluation import real_pairs  # noqa: E402
from model.evaluation.report import colour  # noqa: E402
from model.estimators.estimate import image_corners  # noqa: E402

JSON_FILE, MARKDOWN_FILE, CURVES_FILE, FIGURES_DIR = "real_report.json", "real_report.md", "error_curves.png", "figures"


def write(report: dict, output_dir: str, figures: bool = True) -> None:
    with open(os.path.join(output_dir, JSON_FILE), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(output_dir, MARKDOWN_FILE), "w") as f:
        f.write(markdown(report))
    error_curves(report, os.path.join(output_dir, CURVES_FILE))
    if figures:
        os.makedirs(os.path.join(output_dir, FIGURES_DIR), exist_ok=True)
        for pair in report["pairs"]:
            pair_figure(pair, os.path.join(output_dir, figure_name(pair)))


def figure_name(pair: dict) -> str:
    return os.path.join(FIGURES_DIR, f"{pair['sequence']}_1-{pair['k']}.png")


def _table(summaries: dict) -> list:
    t, a = [str(x) for x in real_pairs.THRESHOLDS], [str(x) for x in real_pairs.AUC_THRESHOLDS]
    lines = ["| method | pairs | mean (px) | median (px) | " + " | ".join(f"< {x} px" for x in t) + " | "
             + " | ".join(f"AUC@{x}" for x in a) + " | failures | s / pair |",
             "|" + "---|" * (6 + len(t) + len(a))]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['num_pairs']} | {s['mean_error']} | {s['median_error']} | "
                     + " | ".join(str(s["accuracy"][x]) for x in t) + " | "
                     + " | ".join(str(s["auc"][x]) for x in a) + f" | {s['failures']} | {s['seconds_per_pair']} |")
    return lines


def markdown(report: dict) -> str:
    """Every number as stored in the dict (no re-rounding)."""
    lines = [f"# Real image pairs: {report['pairs_dir']}", "",
             f"{report['num_pairs']} pairs (1, k) in {report['num_sequences']} sequence(s). Error: mean distance "
             "between image 1's four corners mapped into image k by the estimated and by the true H, in pixels "
             "of image k (HPatches / SuperPoint). `< t px`: share of pairs under t; AUC@t: area under that "
             "curve up to t, over t (SuperGlue / LoFTR). A failed method is scored as the identity and counted.",
             ""]
    if report.get("model"):
        m = report["model"]
        lines += [f"Network: {m['model_dir']} ({m['patch_size']} px input, trained with rho {m['rho']}); both "
                  f"photos are squeezed to {m['patch_size']} x {m['patch_size']} (model.predict).", ""]
    lines += ["## All pairs", ""] + _table(report["overall"]) + [""]
    kept = {n: s["refinement_kept_start"] for n, s in report["overall"].items() if "refinement_kept_start" in s}
    if kept:
        lines += ["Refinement (X+ecc: ECC from X's H at full resolution) kept its start on: "
                  + ", ".join(f"`{n}` {v} of {report['num_pairs']}" for n, v in kept.items())
                  + " pairs (failed, implausible, or a lower correlation; per pair below: '(start kept)').", ""]
    if len(report["groups"]) > 1:
        for group, summaries in report["groups"].items():
            lines += [f"## Group: {group}", ""] + _table(summaries) + [""]
    for name, seq in report["sequences"].items():
        lines += [f"## Sequence {name} ({seq['layout']}, {seq['group']})", ""] + _table(seq["methods"]) + [""]
    names = report["methods"]
    lines += ["## Per pair: corner error (px)", "",
              "| sequence | pair | " + " | ".join(names) + " | direction check (NCC given / best other) |",
              "|" + "---|" * (len(names) + 3)]
    for p in report["pairs"]:
        errs = [f"{p['methods'][n]['error']}" + ("" if p["methods"][n]["ok"] else " (failed)")
                + (" (start kept)" if p["methods"][n].get("kept_start") else "") for n in names]
        check = p["direction_check"]
        if check:
            others = {k: v for k, v in check["scores"].items() if k != "given" and v is not None}
            best = max(others, key=others.get) if others else None
            check_text = (f"{check['verdict']}: {check['scores']['given']} / "
                          + (f"{others[best]} ({best})" if best else "n/a"))
        else:
            check_text = "not run"
        lines.append(f"| {p['sequence']} | 1-{p['k']} | " + " | ".join(errs) + f" | {check_text} |")
    if report["direction_warnings"]:
        lines += ["", "Direction warnings (evaluated as given): " + "; ".join(report["direction_warnings"])]
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def error_curves(report: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    limit = max(real_pairs.THRESHOLDS)
    x = np.linspace(0, limit, 201)
    for name in report["methods"]:
        errors = np.array([p["methods"][name]["error"] for p in report["pairs"]])
        ax.plot(x, [(errors <= t).mean() for t in x], color=colour(name),
                label=f"{name} (AUC@10 {report['overall'][name]['auc']['10']})")
    ax.set_xlabel("corner error (px)")
    ax.set_ylabel("share of pairs")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{report['num_pairs']} real pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


FIGURE_SIDE = 1600  # the long side of image k in a pair's figure (the figure itself is 560 x 480 px)


def pair_figure(pair: dict, path: str) -> None:
    """Image k with image 1's outline mapped in by the truth (dashed green) and by each method."""
    image = real_pairs.read_gray(pair["image_k"])
    c = image_corners(pair["size_1"])
    wk, hk = pair["size_k"]
    fig, ax = plt.subplots(figsize=(7, 6))
    # Shown at most FIGURE_SIDE px long, placed over image k's own pixels (matplotlib makes an RGBA float copy of
    # what it shows: a 100 MP photo shown whole took the command past 5 GB).
    s = min(1.0, FIGURE_SIDE / max(image.shape))
    if s < 1:
        image = cv2.resize(image, (max(1, round(wk * s)), max(1, round(hk * s))), interpolation=cv2.INTER_AREA)
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(-0.5, wk - 0.5, hk - 0.5, -0.5))
    # The truth last and dashed: the estimates that match it show through its gaps.
    outlines = [(n, np.array(r["homography"]), "-", 1.5) for n, r in pair["methods"].items()]
    outlines += [("true", np.array(pair["true_homography"]), "--", 2.0)]
    for name, h, style, width in outlines:
        q = np.c_[c, np.ones(4)] @ h.T
        q = q[:, :2] / q[:, 2:]
        q = np.vstack([q, q[:1]])
        if name == "true":
            label = "true H"
        else:
            r = pair["methods"][name]
            label = f"{name}: {r['error']} px" + ("" if r["ok"] else " (failed: identity)")
        ax.plot(q[:, 0], q[:, 1], style, color=colour(name), lw=width, label=label)
    # The view holds image k and the true outline, within half an image of border (a wild estimate is cut).
    q = np.c_[c, np.ones(4)] @ np.array(pair["true_homography"]).T
    q = q[:, :2] / q[:, 2:]
    lo = np.maximum(np.minimum(q.min(0), 0), [-0.5 * wk, -0.5 * hk]) - 0.05 * np.array([wk, hk])
    hi = np.minimum(np.maximum(q.max(0), [wk, hk]), [1.5 * wk, 1.5 * hk]) + 0.05 * np.array([wk, hk])
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])
    ax.set_title(f"{pair['sequence']}: image 1 outlined in image {pair['k']}", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
