"""The experiment sweep's report: report.json, report.md and its figures (MACE against rho, the ablation's
bars, the transfer runs' training curves), from the variants' result.json rows (model/experiments.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import time

from model.training import run_dir

CLASSICAL_METHODS = ("identity", "orb", "sift", "ecc")
REPORT_JSON, REPORT_MD = "report.json", "report.md"
RHO_PLOT, ABLATION_PLOT, TRANSFER_PLOT = "mace_vs_rho.png", "ablation.png", "transfer_curves.png"
ABLATION = ("rho32", "no_dropout", "no_batchnorm", "no_dropout_no_batchnorm")


def _fmt(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def write_report(s, results: list, classical: dict, notes: list) -> dict:
    """report.json, report.md and the figures of a sweep; s: the sweep's experiments.Settings."""
    figures = {}
    if plot_mace_vs_rho(results, classical, os.path.join(s.output_dir, RHO_PLOT)):
        figures["mace_vs_rho"] = RHO_PLOT
    if plot_ablation(results, os.path.join(s.output_dir, ABLATION_PLOT)):
        figures["ablation"] = ABLATION_PLOT
    if plot_transfer_curves(results, os.path.join(s.output_dir, TRANSFER_PLOT)):
        figures["transfer_curves"] = TRANSFER_PLOT
    rows = [{k: r[k] for k in ("variant", "group", "description", "paper_rho", "rho", "channels", "input_channels",
                               "architecture", "dropout", "batchnorm", "steps", "batch_size", "parameters",
                               "trainable_parameters", "train_seconds", "num_pairs")}
            | {"mace_mean": r["mace"]["mean_mace"], "mace_median": r["mace"]["median_mace"],
               "identity_mean": r["classical"].get("identity", {}).get("mean_mace"),
               "identity_median": r["classical"].get("identity", {}).get("median_mace"),
               "orb_mean": r["classical"].get("orb", {}).get("mean_mace"),
               "orb_median": r["classical"].get("orb", {}).get("median_mace"),
               **({"tower_weights": r["tower_weights"]} if "tower_weights" in r else {})}
            for r in results]
    report = {"scale": s.scale_name, "scale_settings": dataclasses.asdict(s.scale), "coco_dir": s.coco_dir,
              "variants": rows,
              "classical": {d: {m: {"mean_mace": v["mean_mace"], "median_mace": v["median_mace"],
                                    "failure_rate": v["failure_rate"]} for m, v in ms.items()}
                            for d, ms in classical.items()},
              "figures": figures, "notes": notes, "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run_dir.write_json(os.path.join(s.output_dir, REPORT_JSON), report)
    with open(os.path.join(s.output_dir, REPORT_MD), "w") as f:
        f.write(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Experiments ({report['scale']} scale)", "",
             "MACE in pixels on the validation split of each variant's dataset; identity and ORB + RANSAC on the "
             "same pairs beside it. Train time: the training loop's seconds (history.json).", "",
             "| variant | rho | input | architecture | parameters (trainable) | steps | train time (s) | "
             "MACE mean | MACE median | identity mean / median | ORB + RANSAC mean / median |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        arch = r["architecture"] + ("" if r["dropout"] else ", no dropout") + \
            ("" if r["batchnorm"] or r["architecture"] == "mobilenetv2_towers" else ", no BN")
        lines.append(f"| {r['variant']} | {r['rho']} (paper {r['paper_rho']}) | {r['input_channels']} ch | {arch} | "
                     f"{r['parameters']:,} ({r['trainable_parameters']:,}) | {r['steps']} | {_fmt(r['train_seconds'], 1)} | "
                     f"{_fmt(r['mace_mean'])} | {_fmt(r['mace_median'])} | "
                     f"{_fmt(r['identity_mean'])} / {_fmt(r['identity_median'])} | "
                     f"{_fmt(r['orb_mean'])} / {_fmt(r['orb_median'])} |")
    lines += ["", "## Classical methods per dataset", "", "| dataset | method | MACE mean | MACE median | failures |",
              "|---|---|---|---|---|"]
    for d, ms in report["classical"].items():
        for m, v in ms.items():
            lines.append(f"| {d} | {m} | {_fmt(v['mean_mace'])} | {_fmt(v['median_mace'])} | "
                         f"{100 * v['failure_rate']:.1f}% |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report["figures"]:
        lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in report["figures"].items()]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log_scale_if_wide(ax, values) -> None:
    values = [v for v in values if v and v > 0]
    if values and max(values) > 20 * min(values):
        ax.set_yscale("log")


def plot_mace_vs_rho(results: list, classical: dict, path: str) -> bool:
    """The network's MACE against rho (the rho variants) with the classical methods on the same datasets."""
    sweep = sorted((r["rho"], r["mace"]["mean_mace"]) for r in results if r["group"] == "rho")
    if not sweep:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*sweep), "o-", lw=2, label="HomographyNet")
    ys = [m for _, m in sweep]
    dataset = {r["rho"]: os.path.basename(r["data_dir"]) for r in results if r["group"] == "rho"}
    for method in CLASSICAL_METHODS:
        pts = sorted((rho, classical[dataset[rho]][method]["mean_mace"]) for rho, _ in sweep
                     if method in classical.get(dataset[rho], {}))
        if pts:
            ax.plot(*zip(*pts), "s--", lw=1, label=method)
            ys += [m for _, m in pts]
    _log_scale_if_wide(ax, ys)
    ax.set_xlabel("rho (pixels)")
    ax.set_ylabel("mean MACE (pixels)")
    ax.set_title("MACE against rho")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_ablation(results: list, path: str) -> bool:
    by_name = {r["variant"]: r for r in results}
    names = [n for n in ABLATION if n in by_name]
    if len(names) < 2:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"rho32": "full network", "no_dropout": "no dropout", "no_batchnorm": "no batch norm",
              "no_dropout_no_batchnorm": "neither"}
    means = [by_name[n]["mace"]["mean_mace"] for n in names]
    bars = ax.bar([labels[n] for n in names], means, color="tab:blue")
    _log_scale_if_wide(ax, means)
    ax.bar_label(bars, fmt="%.2f")
    ident = by_name[names[0]]["classical"].get("identity", {}).get("mean_mace")
    if ident is not None:
        ax.axhline(ident, color="gray", ls="--", lw=1, label=f"identity {ident:.2f} px")
        ax.legend()
    ax.set_ylabel("mean MACE (pixels)")
    ax.set_title(f"Ablation at rho {by_name[names[0]]['rho']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_transfer_curves(results: list, path: str) -> bool:
    """Training (dashed) and validation (solid) MACE against steps of the transfer variants (and rho32 for reference)."""
    runs = [r for r in results if r["group"] == "transfer"]
    if not runs:
        return False
    runs += [r for r in results if r["variant"] == "rho32"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(runs):
        with open(os.path.join(r["run_dir"], "history.json")) as f:
            history = json.load(f)
        color = f"C{i}"
        tr = [(h["step"], h["train_mace"]) for h in history if h.get("train_mace") is not None]
        va = [(h["step"], h["val_mace"]) for h in history if h.get("val_mace") is not None]
        if tr:
            ax.plot(*zip(*tr), "--", color=color, lw=1, label=f"{r['variant']} training")
        if va:
            ax.plot(*zip(*va), "o-", color=color, lw=1.5, ms=3, label=f"{r['variant']} validation")
    ax.set_yscale("log")  # early validation MACE of batch-norm networks can be orders of magnitude above the rest
    ax.set_xlabel("step")
    ax.set_ylabel("MACE (pixels, log scale)")
    ax.set_title("Transfer learning: training and validation MACE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
