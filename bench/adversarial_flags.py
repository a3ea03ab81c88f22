"""bench.adversarial's flag variants: values out of range, NaN and infinity, names that leave the output
folder, splits and runs that do not exist, files of the wrong kind (5, 6)."""
from __future__ import annotations

import os

from bench.adversarial import COCO_MINI, TRAIN, Variant, copy
from bench.adversarial_variants import A, B, BUILD, E, ER, EVAL, P, PB, R, T, with_, write

IMAGE = os.path.join(os.path.dirname(COCO_MINI), "real_pairs", "boat")


def flag_variants() -> list:
    v = []
    add = lambda *a, **k: v.append(Variant(*a, **k))
    build = with_("coco")
    for flag in ("--rho=-3", "--rho=100", "--patch_size=nan", "--patch_size=0", "--patches_per_image=0",
                 "--patches_per_image=-1", "--max_images=-1", "--num_shards=-1", "--seed=-1", "--image_width=0",
                 "--image_height=9000", "--dataset_name=../evil", "--dataset_name=a/b", "--dataset_name=",
                 "--dataset_name=Bad Name", "--splits=validation=val2017,validation=train2017",
                 "--splits=../x=val2017", "--splits=a/b=val2017", "--splits=validation=nowhere", "--splits=",
                 "--splits=validation", "--workers=-1", "--photometric=sepia"):
        add(f"build {flag}", B, [*BUILD, "--output_dir={out}", flag], build, watch=("root",))
    for flag in ("--dataset_name=../evil", "--splits=../x=val2017", "--seed=-1"):
        add(f"beam build {flag}", PB, [*BUILD, "--output_dir={out}", flag, "--runner=DirectRunner"], build,
            watch=("root",))
    add("build: a COCO folder with no usable image", B, ["--coco_dir={x}", "--output_dir={out}", *BUILD[1:-1],
        "--splits=validation=val2017"], lambda p: (os.makedirs(p["x"] + "/val2017"),
                                                   write("{x}/val2017/000000000001.jpg", "not a jpeg")(p)))
    train = with_("ds")
    targs = ["--data_dir={ds}", "--model_dir={out}"]
    for flag in ("--learning_rate=nan", "--learning_rate=inf", "--learning_rate=-0.1", "--max_minutes=nan",
                 "--max_minutes=inf", "--clip_norm=nan", "--clip_norm=inf", "--momentum=nan",
                 "--photometric_share=1.5", "--photometric_share=nan", "--lr_decay_factor=inf", "--bn_momentum=nan",
                 "--bn_momentum=1.5", "--compact_width=0", "--compact_width=-8", "--train_split=nowhere",
                 "--val_split=nowhere --val_every=1", "--init_from={ds}", "--init_from={run64}", "--steps=1e9",
                 "--reader_workers=-1", "--batch_size=0"):
        add(f"train {flag}", T, [*targs, *TRAIN, *flag.split(" ")],
            lambda p: (copy(p, "ds"), copy(p, "run64")), watch=("root",))
    for flag in ("--split=nowhere", "--split=", "--max_pairs=-1", "--workers=-1", "--batch_size=0",
                 "--model_dir={run64}", "--model_dir={ds}", "--model_dir={x}", "--methods=network",
                 "--methods=", "--methods=identity,identity", "--methods=sift+sift"):
        methods = [] if flag.startswith("--methods") else \
            ["--methods=identity,network"] if flag.startswith("--model_dir") else ["--methods=identity"]
        args = [a for a in EVAL if not a.startswith("--methods")] + methods + [flag]
        add(f"evaluate {flag}", E, args, lambda p: (copy(p, "ds"), copy(p, "run64"), os.mkdir(p["x"])),
            watch=("ds",))
    for name, text in (("config.json", '{"architecture": "comp'), ("config.json", '{"architecture": "compact"}'),
                       ("model.keras", "PK\x03\x04 cut")):
        add(f"evaluate: model_dir with a bad {name} ({len(text)} bytes)", E,
            [*EVAL[:-3], "--methods=identity,network", "--model_dir={run}", *EVAL[-2:]],
            with_("ds", "run", then=write("{run}/" + name, text)), watch=("run",))
    add("audit --residual_threshold=nan", A, ["--data_dir={ds}", "--output_dir={out}", "--residual_threshold=nan"],
        with_("ds"), watch=("ds",))
    add("audit --residual_threshold=-1", A, ["--data_dir={ds}", "--output_dir={out}", "--residual_threshold=-1"],
        with_("ds"), watch=("ds",))
    for share in ("nan", "1.5", "-0.1"):
        add(f"audit --max_residual_share={share}", A, ["--data_dir={ds}", "--output_dir={out}",
            f"--max_residual_share={share}"], with_("ds"), watch=("ds",))
    add("records --split=nowhere", R, ["--data_dir={ds}", "--split=nowhere"], with_("ds"))
    add("records --workers=-1", R, ["--data_dir={ds}", "--workers=-1"], with_("ds"))
    img = os.path.join(IMAGE, "img1.pgm")
    for name, args in (("a 64 px run works (whole photos, its own patch size)", ["--method=network", "--model_dir={run64}"]),
                       ("a dataset as model_dir", ["--method=network", "--model_dir={ds}"]),
                       ("an image that is text", ["--method=orb", "--image_b={x}"]),
                       ("an image that is a folder", ["--method=orb", "--image_b={root}"]),
                       ("--output that is a folder named .png", ["--method=orb", "--output={x}"])):
        def setup(p, name=name):
            copy(p, "run64")
            copy(p, "ds")
            write("{x}", "not an image")(p)
            os.mkdir(p["root"] + "/out.png")
        args = [f"--image_a={img}", *[a.replace("--output={x}", "--output={root}/out.png") for a in args]]
        if not any(a.startswith("--image_b") for a in args):
            args.append(f"--image_b={img}")
        add(f"predict: {name}", P, args, setup, watch=("root",), expect="ok" if "64 px" in name else "refuse")
    add("evaluate_real --pairs_dir=a file", ER, ["--pairs_dir={x}", "--output_dir={out}", "--methods=identity"],
        write("{x}", "x"))
    add("evaluate_real: output_dir = the pairs folder", ER, ["--pairs_dir={x}", "--output_dir={x}",
        "--methods=identity", "--nofigures"], lambda p: __import__("shutil").copytree(IMAGE, p["x"]), watch=("x",))
    return v
