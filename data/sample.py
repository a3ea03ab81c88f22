"""The embedded default data: scikit-image's bundled photographs materialised as a COCO 2017 layout.

  python -m data.sample --output_dir=data/sample_coco

writes <output_dir>/train2017/*.jpg, val2017/*.jpg|png and annotations/image_info_<split>.json (the
COCO image-list format that test2017 ships), so the default run walks the same path as real COCO.
Nothing here is downloaded: every photograph ships inside the scikit-image wheel.
"""
from __future__ import annotations

import json
import os
import sys

import cv2
import numpy as np
from absl import app, flags

# (split, name, loader): the photographs, not the synthetic test patterns. Ids are 1.. in this order.
_TRAIN = ["astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "cell", "logo"]
_VALIDATION = ["stereo_motorcycle:0", "stereo_motorcycle:1", "colorwheel", "microaneurysms"]
SPLITS = {"train2017": _TRAIN, "val2017": _VALIDATION}


def _load(name: str) -> np.ndarray:
    import skimage.data

    base, _, index = name.partition(":")
    image = getattr(skimage.data, base)()
    if index:
        image = image[int(index)]
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)  # keep alpha: the PNG path must drop it
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return image


def materialize(output_dir: str) -> dict:
    """Writes the sample; returns {coco split: number of images}. Idempotent."""
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    counts, next_id = {}, 1
    for split, names in SPLITS.items():
        os.makedirs(os.path.join(output_dir, split), exist_ok=True)
        entries = []
        for name in names:
            image = _load(name)
            ext = ".png" if image.ndim == 3 and image.shape[2] == 4 else ".jpg"
            file_name = f"{next_id:012d}{ext}"
            cv2.imwrite(os.path.join(output_dir, split, file_name), image,
                        [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else [])
            entries.append({"id": next_id, "file_name": file_name, "height": int(image.shape[0]),
                            "width": int(image.shape[1]), "license": 0, "source": f"skimage.data.{name}"})
            next_id += 1
        info = {"info": {"description": "scikit-image bundled photographs in COCO 2017 layout"},
                "licenses": [{"id": 0, "name": "see scikit-image data/README"}],
                "images": entries, "categories": []}
        with open(os.path.join(output_dir, "annotations", f"image_info_{split}.json"), "w") as f:
            json.dump(info, f, indent=1)
        counts[split] = len(entries)
    return counts


flags.DEFINE_string("output_dir", "data/sample_coco", "Where to write the COCO-layout sample")


def main(argv):
    del argv
    counts = materialize(flags.FLAGS.output_dir)
    print(f"sample COCO layout in {flags.FLAGS.output_dir}: "
          + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
