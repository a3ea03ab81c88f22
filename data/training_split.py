"""The shipped network's image split, as folders of links the builders read like a COCO root.

  python -m data.training_split --coco_more=../shared/data/coco_more --coco_mini=../shared/data/coco_mini \
                                --output_dir=out/training_images

OUTPUT_DIR/train2017  coco_more's photographs outside the hold-out + coco_mini's train2017 (training pairs)
OUTPUT_DIR/val2017    coco_mini's val2017 (the standard validation pairs: val2017 x 10, seed 0)
OUTPUT_DIR/holdout    coco_more's hold-out: about 1 image in 16, chosen by a fixed rule on the COCO id
                      (crc32 of the id's decimal text % 16 == 0), never trained on, never used to choose
                      anything: the "photographs no one tuned for" figure

Links, not copies (nothing from ../shared is duplicated or committed); the folders hold only file names the
builders list, so `pipeline.local_build --coco_dir=OUTPUT_DIR --splits=train=train2017,validation=val2017`
and `--splits=validation=holdout` build the training and hold-out pairs.
"""
from __future__ import annotations

import glob
import os
import sys
import zlib

HOLDOUT_MODULUS = 16


def is_holdout(image_id: int) -> bool:
    return zlib.crc32(str(int(image_id)).encode()) % HOLDOUT_MODULUS == 0


def _images(folder: str) -> list:
    return sorted(p for p in glob.glob(os.path.join(folder, "*.jpg")) if os.path.isfile(p))


def make_split(coco_more: str, coco_mini: str, output_dir: str) -> dict:
    """Creates the three folders of links; returns the number of images in each. Refuses a non-empty output."""
    more = _images(os.path.join(coco_more, "images"))
    mini_train = _images(os.path.join(coco_mini, "train2017"))
    mini_val = _images(os.path.join(coco_mini, "val2017"))
    if not more or not mini_train or not mini_val:
        raise ValueError(f"expected JPEGs in {coco_more}/images, {coco_mini}/train2017 and {coco_mini}/val2017")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir} is not empty")
    plan = {"train2017": mini_train, "val2017": mini_val, "holdout": []}
    for path in more:
        image_id = int(os.path.splitext(os.path.basename(path))[0])
        plan["holdout" if is_holdout(image_id) else "train2017"].append(path)
    for folder, paths in plan.items():
        os.makedirs(os.path.join(output_dir, folder))
        for path in paths:
            os.symlink(os.path.abspath(path), os.path.join(output_dir, folder, os.path.basename(path)))
    return {k: len(v) for k, v in plan.items()}


def main(argv):
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1 or not (f.coco_more and f.coco_mini and f.output_dir):
        print("data.training_split: error: --coco_more, --coco_mini and --output_dir are required", file=sys.stderr)
        return 2
    try:
        counts = make_split(f.coco_more, f.coco_mini, f.output_dir)
    except (ValueError, OSError) as e:
        print(f"data.training_split: error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}: {v} images" for k, v in counts.items()) + f" (links under {f.output_dir})")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("coco_more", None, "../shared/data/coco_more (images/ of 320x240 COCO photographs)")
    flags.DEFINE_string("coco_mini", None, "../shared/data/coco_mini (train2017/, val2017/)")
    flags.DEFINE_string("output_dir", None, "A new or empty folder for the links")
    app.run(main)
