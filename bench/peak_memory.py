"""Peak memory of every command on worst-case-but-allowed inputs (issue 24: under 4 GiB on any input).

  python -m bench.peak_memory [--workdir=DIR] [--cases=build,predict_sift,...] [--repeat=1] [--cap_gib=8]

Each command runs as its own subprocess (python -m ..., a new session) while this process samples the
resident set of its whole process tree (bench.common.PeakRss: the command, its pool workers, Beam's
workers) every 0.1 s; the peak is the largest sum seen. A sum counts pages that forked workers share
once per process, so it errs high. A tree above --cap_gib is killed (this machine's safety cap) and
reported as `killed`. Inputs are generated once in --workdir (kept, so a rerun starts at once):
  photos     two 10000 x 10000 textured JPEGs (100 MP, the largest model.predict / evaluate_real accept),
             B a shifted copy of A; an Oxford sequence of them (img1, img2, H1to2p)
  bigcoco    COCO files (no annotation: decoded whole) of 10000 x 10000 and 8192 x 8192, built at the
             largest geometry: 8192 x 8192 colour images, 1024 px patches, 85 pairs an image (512 MiB)
  many       coco_mini train2017 at 128 px gray with --patches_per_image=512: enough pairs for the
             largest batch and shuffle buffer model.train accepts
  tib        a copy of a clean validation set whose first record's header claims 1 TiB (valid CRC)
Prints the table (command, input, exit, peak GiB, wall s, under the limit) and name=value lines.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from bench.common import COCO_MINI, REPO, PeakRss, headline

flags.DEFINE_string("workdir", "/tmp/bench_peak_memory", "Where the inputs are generated and the commands write")
flags.DEFINE_list("cases", None, "Cases to run (default: all; names in the table's first column)")
flags.DEFINE_float("cap_gib", 8.0, "Kill a command whose process tree passes this (safety, not the limit)")
flags.DEFINE_float("limit_gib", 4.0, "The issue's limit: each row says whether the peak is under it")
flags.DEFINE_integer("timeout", 900, "Seconds a command may run before it is killed")
flags.DEFINE_integer("train_steps", 2, "Steps of the model.train cases at the edge of its estimate (a peak can "
                     "creep up over the first steps)")
flags.DEFINE_integer("repeat", 1, "Runs of each case (peaks vary between runs); the headline takes the largest")
flags.DEFINE_string("val_clean", "out/val_clean", "A built clean validation set (val2017 x 10)")
flags.DEFINE_string("val_camera", "out/val_camera", "The same with --photometric=camera")
FLAGS = flags.FLAGS

SHIPPED = REPO / "data" / "weights" / "compact_rho32"
SIDE = 10_000  # 10000 x 10000 = 100 MP: photos.MAX_PIXELS exactly (refused only above it)
BIG = ["--image_width=8192", "--image_height=8192", "--patch_size=1024", "--color", "--patches_per_image=85"]
MANY_TRAIN_IMAGES = 128  # x 512 pairs = 65,536 pairs: the shuffle buffer README allowed at 128 px gray


# model.train at the edge of its memory estimate: the largest batch it accepts for each network and buffer.
EDGES = (("train_batch", "compact", 1), ("train_batch_hnet", "homographynet", 1),
         ("train_shuffle", "compact", 32768), ("train_shuffle_hnet", "homographynet", 32768),
         ("train_batch_hnet_2k", "homographynet", 2048))


def train_edge(w, name: str, architecture: str, shuffle_buffer: int, patch_size: int = 128, channels: int = 1,
               data: str = "many") -> tuple:
    """A bench row: model.train at the largest --batch_size it accepts for these pairs, --train_steps steps."""
    from model import network, train

    values, weights = network.footprint(architecture, patch_size, channels)
    batch = train.largest_batch(values, weights, patch_size * patch_size * 2 * channels, shuffle_buffer)
    pairs = f"{patch_size} px {'colour' if channels == 3 else 'grayscale'}"
    return (name, f"{pairs}, largest --batch_size accepted ({batch:,}), {architecture}, "
                  f"--shuffle_buffer={shuffle_buffer}",
            None, py("model.train", f"--data_dir={w(data)}", f"--model_dir={w('run_' + name)}",
                     f"--steps={FLAGS.train_steps}",
                     f"--batch_size={batch}", f"--architecture={architecture}", "--steps_per_loop=1",
                     "--log_every=1", "--val_every=0", f"--shuffle_buffer={shuffle_buffer}"))


def textured(h: int, w: int, seed: int):
    """A photo-like colour texture (smooth blobs plus fine grain): SIFT and ORB find features on it."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8), (w, h),
                       interpolation=cv2.INTER_CUBIC)
    grain = rng.integers(0, 48, (509, 509, 3), dtype=np.uint8)
    reps = (h // 509 + 1, w // 509 + 1, 1)
    return cv2.add(image, np.tile(grain, reps)[:h, :w])


def make_photos(work: pathlib.Path) -> pathlib.Path:
    import cv2
    import numpy as np

    seq = work / "photos" / "boatlike"
    if (seq / "H1to2p").exists():
        return seq
    seq.mkdir(parents=True, exist_ok=True)
    a = textured(SIDE, SIDE, 1)
    cv2.imwrite(str(seq / "img1.jpg"), a, [cv2.IMWRITE_JPEG_QUALITY, 90])
    shift = np.float64([[1, 0, 40], [0, 1, 25], [0, 0, 1]])  # H_1_2: a pixel of image 1 -> image 2
    b = cv2.warpPerspective(a, shift, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT)
    del a
    cv2.imwrite(str(seq / "img2.jpg"), b, [cv2.IMWRITE_JPEG_QUALITY, 90])
    np.savetxt(seq / "H1to2p", shift)
    return seq


def make_bigcoco(work: pathlib.Path) -> pathlib.Path:
    import cv2

    root = work / "bigcoco"
    if (root / "train2017" / "000000000002.jpg").exists():
        return root
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    for i, side in ((1, SIDE), (2, 8192)):
        cv2.imwrite(str(root / "train2017" / f"{i:012d}.jpg"), textured(side, side, 10 + i),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def make_tib(work: pathlib.Path) -> pathlib.Path:
    """A copy of the clean validation set whose first record claims 2**40 bytes (its header's CRC valid)."""
    import json
    import struct

    from pipeline.reader import framing

    out = work / "tib"
    if out.exists():
        return out
    shutil.copytree(FLAGS.val_clean, out)
    with open(out / "homography_index.json") as f:
        shard = json.load(f)["splits"]["validation"]["shards"][0]
    name = shard["file"] if isinstance(shard, dict) else shard
    with open(out / name, "r+b") as f:
        length = struct.pack("<Q", 1 << 40)
        f.write(length + struct.pack("<I", framing.masked_crc32c(length)))
    return out


def py(*args) -> list:
    return [sys.executable, "-m", *map(str, args)]


def cases(work: pathlib.Path) -> list:
    """(name, input, prepare(), argv) in the order they run; later cases use what earlier ones wrote."""
    w = lambda *p: work.joinpath(*p)  # noqa: E731
    seq = lambda: make_photos(work)  # noqa: E731
    photo_a, photo_b = w("photos", "boatlike", "img1.jpg"), w("photos", "boatlike", "img2.jpg")
    many_coco = f"--coco_dir={COCO_MINI}"
    shipped_run = w("run_shipped")
    rows = [
        ("build", "2 COCO files 100/67 MP -> 8192 px colour, 1024 px patches, 85 pairs/image (DirectRunner)",
         lambda: make_bigcoco(work),
         py("pipeline.build", f"--coco_dir={w('bigcoco')}", f"--output_dir={w('big_beam')}", "--overwrite",
            "--splits=train=train2017", *BIG, "--runner=DirectRunner")),
        ("local_build", "the same inputs and geometry, pipeline.local_build",
         lambda: make_bigcoco(work),
         py("pipeline.local_build", f"--coco_dir={w('bigcoco')}", f"--output_dir={w('big_local')}", "--overwrite",
            "--splits=train=train2017", *BIG)),
        ("local_build_many", f"coco_mini {MANY_TRAIN_IMAGES}+10 images x 512 pairs, 128 px gray", None,
         py("pipeline.local_build", many_coco, f"--output_dir={w('many')}", "--overwrite",
            f"--max_images={MANY_TRAIN_IMAGES}", "--patches_per_image=512")),
        ("audit", "the 1024 px colour build (170 pairs of 6 MiB)", None,
         py("pipeline.audit", f"--data_dir={w('big_local')}", f"--output_dir={w('audit_big')}", "--overwrite")),
        ("audit_tib", "a record header claiming 1 TiB", lambda: make_tib(work),
         py("pipeline.audit", f"--data_dir={w('tib')}", f"--output_dir={w('audit_tib')}", "--overwrite")),
        ("records", "the 1024 px colour build", None, py("pipeline.records", f"--data_dir={w('big_local')}")),
        ("records_many", "65,536 + 5,120 pairs of 128 px", None, py("pipeline.records", f"--data_dir={w('many')}")),
        ("records_tib", "a record header claiming 1 TiB", lambda: make_tib(work),
         py("pipeline.records", f"--data_dir={w('tib')}")),
        *(train_edge(w, name, arch, buffer) for name, arch, buffer in EDGES),
        ("train_default", "the paper's recipe: homographynet, batch 64, the default --shuffle_buffer (2,048)", None,
         py("model.train", f"--data_dir={w('many')}", f"--model_dir={w('run_default')}", f"--steps={FLAGS.train_steps}",
            "--steps_per_loop=1", "--log_every=1", "--val_every=0")),
        ("train_shuffle_records", "compact, batch 64, --shuffle_buffer=32768 (the most), --reader=records", None,
         py("model.train", f"--data_dir={w('many')}", f"--model_dir={w('run_shuffle_r')}", "--steps=2",
            "--batch_size=64", "--architecture=compact", "--steps_per_loop=1", "--log_every=1", "--val_every=0",
            "--shuffle_buffer=32768", "--reader=records")),
        ("train_batch_over", "--batch_size=8192 (the old bound), compact: refused", None,
         py("model.train", f"--data_dir={w('many')}", f"--model_dir={w('run_over')}", "--steps=2",
            "--batch_size=8192", "--architecture=compact", "--shuffle_buffer=1")),
        ("evaluate_batch_over", "--batch_size=1000000 (before: every pair read at once): refused", None,
         py("model.evaluate", f"--data_dir={w('many')}", "--split=train", f"--output_dir={w('eval_over')}",
            "--methods=identity", "--batch_size=1000000")),
        train_edge(w, "train_big_patches", "compact", 170, patch_size=1024, channels=3, data="big_local"),
        ("train_tib", "a record header claiming 1 TiB", lambda: make_tib(work),
         py("model.train", f"--data_dir={w('tib')}", f"--model_dir={w('run_tib')}", "--steps=2",
            "--train_split=validation", "--architecture=compact", "--val_every=0")),
        ("evaluate", "clean validation, shipped network + sift,orb,ecc,auto, --batch_size=128 (largest)",
         lambda: shutil.copytree(SHIPPED, shipped_run, dirs_exist_ok=True),
         py("model.evaluate", f"--data_dir={FLAGS.val_clean}", f"--model_dir={shipped_run}",
            f"--output_dir={w('eval_clean')}", "--methods=identity,orb,sift,ecc,network,auto",
            "--batch_size=128")),
        ("evaluate_many", "65,536 pairs, --batch_size=128 (largest), identity", None,
         py("model.evaluate", f"--data_dir={w('many')}", "--split=train", f"--output_dir={w('eval_many')}",
            "--methods=identity", "--batch_size=128")),
        ("evaluate_big", "1024 px colour pairs, sift,orb,ecc,sift+ecc", None,
         py("model.evaluate", f"--data_dir={w('big_local')}", "--split=train", f"--output_dir={w('eval_big')}",
            "--methods=sift,orb,ecc,sift+ecc", "--max_pairs=16", "--batch_size=10")),
        ("evaluate_camera", "camera validation, shipped network (for ship)", None,
         py("model.evaluate", f"--data_dir={FLAGS.val_camera}", f"--model_dir={shipped_run}",
            f"--output_dir={w('eval_camera')}", "--methods=identity,orb,sift,ecc,network")),
        ("evaluate_tib", "a record header claiming 1 TiB", lambda: make_tib(work),
         py("model.evaluate", f"--data_dir={w('tib')}", f"--output_dir={w('eval_tib')}", "--methods=identity")),
        ("evaluate_real", "Oxford layout, two 100 MP photos; identity,orb,sift,ecc,network,auto,sift+ecc", seq,
         py("model.evaluate_real", f"--pairs_dir={w('photos')}", f"--output_dir={w('real')}",
            "--methods=identity,orb,sift,ecc,network,auto,sift+ecc")),
    ]
    for method in ("sift", "orb", "ecc", "network+ecc", "auto"):
        rows.append((f"predict_{method}", f"two 100 MP photos, --method={method}", seq,
                     py("model.predict", f"--image_a={photo_a}", f"--image_b={photo_b}", f"--method={method}")))
    rows.append(("predict_output", "two 100 MP photos, --method=sift --output=vis.jpg", seq,
                 py("model.predict", f"--image_a={photo_a}", f"--image_b={photo_b}", "--method=sift", f"--output={w('vis.jpg')}")))
    rows.append(("ship", "scratch copies of the shipped run and ship_dir, both reports", None,
                 py("model.ship", f"--model_dir={shipped_run}", f"--report_dir={w('eval_clean')}",
                    f"--camera_report_dir={w('eval_camera')}", f"--ship_dir={w('ship_dir')}")))
    return rows


def measure(argv: list, cap: float, timeout: int) -> tuple:
    """(exit status or 'killed'/'timeout', peak bytes of the process tree, seconds, last stderr line)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    with open(os.devnull, "w") as out, subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.PIPE,
                                                        start_new_session=True, env=env) as proc:
        status = None
        with PeakRss(proc.pid, interval=0.1) as rss:
            err = []
            t = threading.Thread(target=lambda: err.extend(proc.stderr.read().decode(errors="replace").splitlines()))
            t.start()
            while proc.poll() is None:
                if rss.peak > cap:
                    status = "killed"
                elif time.perf_counter() - start > timeout:
                    status = "timeout"
                if status:
                    os.killpg(proc.pid, signal.SIGKILL)  # this command's own session
                    break
                time.sleep(0.1)
            proc.wait()
            t.join()
        last = next((line for line in reversed(err) if line.strip()), "")
        return status or proc.returncode, rss.peak, time.perf_counter() - start, last


def main(argv):
    del argv
    work = pathlib.Path(FLAGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "ship_dir", ignore_errors=True)
    shutil.copytree(SHIPPED, work / "ship_dir")
    chosen = [c for c in cases(work) if not FLAGS.cases or c[0] in FLAGS.cases]
    rows, gib = [], 2 ** 30
    print(f"{'command':<22} {'exit':>7} {'peak GiB':>9} {'wall s':>7}  under {FLAGS.limit_gib:g}  input")
    for name, what, prepare, command in chosen:
        if prepare:
            prepare()
        for _ in range(FLAGS.repeat):
            for old in (p for p in work.glob("run_*") if p.name != "run_shipped"):
                shutil.rmtree(old, ignore_errors=True)  # a run folder left from before would resume, not train
            status, peak, seconds, last = measure(command, FLAGS.cap_gib * gib, FLAGS.timeout)
            under = peak < FLAGS.limit_gib * gib and status not in ("killed", "timeout")
            rows.append((name, status, peak / gib, under))
            print(f"{name:<22} {status!s:>7} {peak / gib:9.2f} {seconds:7.1f}  {'yes' if under else 'NO':<5}  {what}",
                  flush=True)
            if status not in (0, "killed", "timeout") and last:
                print(f"{'':<22} -> {last[:160]}", flush=True)
    peaks = {}
    for n, _, p, _ in rows:
        peaks[n] = max(peaks.get(n, 0.0), p)
    headline({f"{n}_peak_gib": round(p, 2) for n, p in peaks.items()} |
             {"commands_over_limit": len({n for n, *_, u in rows if not u})})


if __name__ == "__main__":
    app.run(main)
