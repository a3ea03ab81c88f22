"""The MACE report's outputs, all rendered from the one report dict that evaluate.py builds.

  mace_report.json      the dict itself
  mace_report.md        the same numbers as a Markdown table (markdown() reads only the dict)
  mace_bar.png          mean MACE per method (the seed's figure 7 shape)
  mace_histograms.png   one MACE histogram panel per method
  pair_<i>.png          patch A with the true and every predicted quadrilateral, beside patch B
"""
from __future__ import annotations

import itertools
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.dataset import geometry  # noqa: E402

JSON_FILE = "mace_report.json"
MARKDOWN_FILE = "mace_report.md"
BAR_FILE = "mace_bar.png"
HISTOGRAM_FILE = "mace_histograms.png"

# The table's columns: (header, key in a method's entry). The test parses the table back with these.
COLUMNS = (("method", None), ("pairs", "num_pairs"), ("mean MACE (px)", "mean_mace"),
           ("median MACE (px)", "median_mace"), ("p90 MACE (px)", "p90_mace"), ("under 1 px", "under_1px"),
           ("failure rate", "failure_rate"), ("seconds / pair", "seconds_per_pair"))

COLOURS = {"true": "#2ca02c", "identity": "#7f7f7f", "orb": "#1f77b4", "orb_default": "#17becf",
           "sift": "#ff7f0e", "ecc": "#9467bd", "network": "#d62728", "sift_or_network": "#e377c2",
           "network_tta": "#bcbd22", "auto": "#000000"}


def colour(method: str) -> str:
    """A method's colour; a refined method (X+ecc) has X's."""
    return COLOURS.get(method, COLOURS.get(method.split("+")[0], "#8c564b"))


SEAL = "report_sha256"


def seal(report: dict) -> str:
    """A digest of the report's content (all but the seal itself): model.ship refuses a report edited after
    model.evaluate wrote it (hand-edited figures, another run's numbers pasted in). It detects edits, it
    does not authenticate: whoever recomputes it can forge it."""
    import hashlib

    body = json.dumps({k: v for k, v in report.items() if k != SEAL}, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def write_json(report: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, JSON_FILE)
    report[SEAL] = seal(report)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path


def markdown(report: dict) -> str:
    """The report as Markdown; every number comes from the dict, printed as stored (no re-rounding)."""
    d = report["dataset"]
    c = d["config"]
    lines = [f"# MACE report: {d['split']} split of {d['data_dir']}", "",
             f"{report['num_pairs']} pairs; patch {c['patch_size']} px, rho {c['rho']}, "
             f"{c['image_width']}x{c['image_height']}, {c['channels']} channel(s), seed {c['seed']}.", ""]
    if report.get("model"):
        m = report["model"]
        lines += [f"Network: {m['model_dir']} (trained with rho {m['rho']}).", ""]
    lines += ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, entry in report["methods"].items():
        lines.append("| " + " | ".join([name] + [str(entry[k]) for _, k in COLUMNS[1:]]) + " |")
    lines += _chain_notes(report["methods"]) + side_by_side(report["methods"])
    ident = report["identity_check"]
    lines += ["", f"Identity sanity line: expected MACE 0.765 * rho = {ident['expected_mace']} px, "
              f"measured {ident['measured_mace']} px.", "",
              "MACE: mean over the 4 corners of the Euclidean error of the predicted corner offsets, in pixels "
              "of the resized image. A failed method (too few matches, degenerate H, no convergence) falls "
              "back to the identity; its pair is still scored and counted in the failure rate. Seconds per "
              "pair: wall time on this machine (the network's is batched).", ""]
    figures = report.get("figures", {})
    if figures.get("bar"):
        lines += [f"![mean MACE per method]({figures['bar']})", ""]
    if figures.get("histograms"):
        lines += [f"![MACE histograms]({figures['histograms']})", ""]
    for path in figures.get("pairs", []):
        lines += [f"![{path}]({path})"]
    return "\n".join(lines).rstrip() + "\n"


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.items())


def _chain_notes(methods: dict) -> list:
    """How often each refined method kept its start (and why), and which member of a chain answered."""
    lines = []
    for name, entry in methods.items():
        if "refinement_kept_start" in entry:
            why = entry["refinement_kept_reasons"]
            lines.append(f"- `{name}`: refinement kept its start on {entry['refinement_kept_start']} of "
                         f"{entry['num_pairs']} pairs" + (f" ({_counts(why)})" if why else ""))
        if "answered_by" in entry:
            lines.append(f"- `{name}` answered by: {_counts(entry['answered_by'])}")
    return ["", "Refinement and chains (X+ecc: ECC from X's H; the start is kept when ECC fails, gives an "
            "implausible H or a lower correlation):", ""] + lines if lines else []


def side_by_side(methods: dict) -> list:
    """Each method X beside its refined variant X+ecc (and any best-of chain in the refined columns): the
    Markdown table the README and BUILD_NOTES quote, from the report dict alone."""
    rows = []  # (X or None, the refined method)
    for name, entry in methods.items():
        if name.endswith("+ecc"):
            if name[:-len("+ecc")] not in methods:
                rows.append((None, name))
        elif name + "+ecc" in methods:
            rows.append((name, name + "+ecc"))
        elif "refinement_kept_start" in entry:  # a best-of chain of refined members
            rows.append((None, name))
    if not rows:
        return []
    cells = ("mean_mace", "median_mace", "p90_mace", "under_1px", "failures")

    def row(entry):
        return [str(entry[k]) for k in cells] if entry else ["—"] * len(cells)

    lines = ["", "Each method beside its refined variant (MACE in px; `< 1 px`: share of pairs; ms / pair: "
             "alone, its parts included):", "",
             "| method | mean | median | p90 | < 1 px | failures | + ecc: mean | median | p90 | < 1 px | failures "
             "| start kept | ms / pair (X, X+ecc) |", "|" + "---|" * 13]
    for name, r in rows:
        x, y = methods.get(name), methods[r]
        ms = ", ".join(f"{1000 * e['seconds_per_pair']:.1f}" for e in (x, y) if e)
        lines.append("| " + " | ".join([name or f"**{r}**"] + row(x) + row(y)
                                       + [str(y.get("refinement_kept_start", "")), ms]) + " |")
    return lines


def write_markdown(report: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, MARKDOWN_FILE)
    with open(path, "w") as f:
        f.write(markdown(report))
    return path


def parse_markdown_table(text: str) -> dict:
    """{method: {key: float}} from mace_report.md's (first) table (for checking it against the JSON)."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[first:])]
    header = [h.strip() for h in rows[0].strip("|").split("|")]
    keys = {h: k for h, k in COLUMNS}
    table = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0]] = {keys[h]: float(v) for h, v in zip(header[1:], cells[1:])}
    return table


def bar_chart(report: dict, path: str) -> None:
    names = list(report["methods"])
    means = [report["methods"][n]["mean_mace"] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
    bars = ax.bar(names, means, color=[colour(n) for n in names])
    ax.bar_label(bars, labels=[f"{m:.2f}" for m in means])
    ax.axhline(report["identity_check"]["expected_mace"], color="k", ls="--", lw=0.8,
               label=f"0.765 rho = {report['identity_check']['expected_mace']} px")
    ax.set_ylabel("mean average corner error (px)")
    ax.set_title(f"MACE on {report['num_pairs']} {report['dataset']['split']} pairs (rho {report['dataset']['config']['rho']})")
    top = max(means + [report["identity_check"]["expected_mace"]])
    ax.set_ylim(0, 1.3 * top if np.isfinite(top) and top > 0 else 1)  # headroom: labels and legend clear of bars
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histograms(report: dict, errors: dict, path: str) -> None:
    """errors: {method: (N,) MACE per pair}; one panel per method on shared bins."""
    names = list(errors)
    top = max(float(np.percentile(e, 99)) for e in errors.values()) if names else 1.0
    bins = np.linspace(0, max(top, 1.0), 41)
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 1.8 * len(names) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        e = np.clip(errors[name], 0, bins[-1])  # the last bin also holds the tail beyond the 99th percentile
        ax.hist(e, bins=bins, color=colour(name))
        ax.set_ylabel("pairs")
        ax.set_title(f"{name}: mean {report['methods'][name]['mean_mace']}, "
                     f"median {report['methods'][name]['median_mace']} px", fontsize=9)
    axes[-1, 0].set_xlabel("MACE (px); last bin holds everything beyond it")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _show(ax, patch: np.ndarray) -> None:
    if patch.shape[-1] == 3:
        ax.imshow(patch[..., ::-1])  # BGR (OpenCV's order) -> RGB
    else:
        ax.imshow(patch[..., 0], cmap="gray", vmin=0, vmax=255)


def pair_figure(patch_a: np.ndarray, patch_b: np.ndarray, true_offsets: np.ndarray, predictions: dict,
                title: str, path: str) -> None:
    """Patch A with where B's corners land in A: the truth and each method's (c + offsets), beside patch B.

    predictions: {method: (offsets (4, 2), mace float)}. The axes extend beyond A since corners may fall
    outside it (up to rho away).
    """
    p = patch_a.shape[0]
    c = geometry.patch_corners(0, 0, p)
    quads = {"true": c + np.asarray(true_offsets).reshape(4, 2)}
    quads.update({m: c + np.asarray(o).reshape(4, 2) for m, (o, _) in predictions.items()})
    lo = min(0.0, min(q.min() for q in quads.values())) - 4
    hi = max(float(p), max(q.max() for q in quads.values())) + 4
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 5.2))
    _show(ax_a, patch_a)
    for name, q in quads.items():
        closed = np.vstack([q, q[:1]])
        label = "true" if name == "true" else f"{name} ({predictions[name][1]:.1f} px)"
        ax_a.plot(closed[:, 0], closed[:, 1], color=colour(name), lw=2.5 if name == "true" else 1.5,
                  ls="-" if name == "true" else "--", label=label)
    ax_a.set_xlim(lo, hi)
    ax_a.set_ylim(hi, lo)
    ax_a.set_title("patch A: where patch B's corners land")
    ax_a.legend(loc="lower left", fontsize=8, framealpha=0.8)
    _show(ax_b, patch_b)
    ax_b.set_title("patch B")
    fig.suptitle(title + "\nMACE: " + ", ".join(f"{m} {e:.2f}" for m, (_, e) in predictions.items()), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
