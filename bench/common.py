"""Shared bits of the benchmarks: peak RSS of a process tree, a COCO layout of repeated real images,
and the closing `name=value` lines."""
from __future__ import annotations

import json
import os
import pathlib
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"


def _tree_rss_bytes(root_pid: int) -> int:
    """Sum of the resident set sizes of root_pid and all its descendants (from /proc)."""
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakRss:
    """Samples the RSS of a process tree (default: this process and its children) until stopped."""

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid or os.getpid(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(self.pid))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(self.pid))


def repeated_coco(root: pathlib.Path, num_images: int, source: pathlib.Path = COCO_MINI,
                  source_split: str = "train2017", split: str = "train2017") -> pathlib.Path:
    """A COCO layout of num_images entries cycling over the real images of source (symlinks, new ids)."""
    with open(source / "annotations" / f"instances_{source_split}.json") as f:
        images = sorted(json.load(f)["images"], key=lambda im: im["id"])
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for i in range(num_images):
        im = images[i % len(images)]
        name = f"{i + 1:012d}.jpg"
        link = root / split / name
        if not link.exists():
            link.symlink_to(source / source_split / im["file_name"])
        entries.append({"id": i + 1, "file_name": name, "width": im["width"], "height": im["height"]})
    with open(root / "annotations" / f"image_info_{split}.json", "w") as f:
        json.dump({"images": entries}, f)
    return root


def headline(figures: dict) -> None:
    """The closing lines every benchmark ends with: one name=value per headline figure."""
    print()
    for name, value in figures.items():
        if isinstance(value, float):
            print(f"{name}={value:.0f}" if abs(value) >= 1000 else f"{name}={value:.4g}")
        else:
            print(f"{name}={value}")


def dataset_dir(data_dir: str | None, workdir: pathlib.Path) -> str:
    """data_dir if given, else coco_mini (1,780 train + 500 validation pairs) built into workdir."""
    if data_dir:
        return data_dir
    from pipeline.build import build
    from pipeline.dataset import schema
    from pipeline.dataset.geometry import PairConfig

    out = workdir / "coco_mini_rho32"
    if not (out / schema.INDEX).exists():
        build(str(COCO_MINI), str(out), {"train": "train2017", "validation": "val2017"}, PairConfig(),
              overwrite=True, beam_args=["--runner=DirectRunner"])
    return str(out)
