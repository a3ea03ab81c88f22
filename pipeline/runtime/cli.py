"""What every command shares: absl flags defined when the command runs (not at import, so one process
can import several commands' libraries), and errors as one line on stderr with exit status 2."""
from __future__ import annotations

import sys

from absl import app, flags


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def run(prog: str, main, define_flags, beam_args: bool = False) -> None:
    """app.run(main) with prog's flags; beam_args=True leaves the flags absl does not know (--runner,
    --project, ...) in main's argv for Beam, as pipeline.build does."""
    define_flags()

    def parse(argv):
        try:
            return flags.FLAGS(argv, known_only=beam_args)
        except flags.Error as e:  # a bad or unknown flag: one line, exit 2, like every other error
            sys.exit(fail(prog, str(e)))

    app.run(main, flags_parser=parse)


DEFAULT_SPLITS = "train=train2017,validation=val2017"


def define_dataset_flags(coco_dir_help: str, output_dir_help: str) -> None:
    """The flags of a build (pipeline.build, pipeline.local_build): same names, defaults and meaning."""
    flags.DEFINE_string("coco_dir", None, coco_dir_help)
    flags.DEFINE_string("output_dir", None, output_dir_help)
    flags.DEFINE_string("splits", DEFAULT_SPLITS, "Comma list of OUTPUT_SPLIT=COCO_SPLIT")
    flags.DEFINE_integer("rho", 32, "Maximum corner perturbation in pixels")
    flags.DEFINE_integer("patch_size", 128, "Patch side P in pixels")
    flags.DEFINE_integer("image_width", 320, "Width the images are resized to")
    flags.DEFINE_integer("image_height", 240, "Height the images are resized to")
    flags.DEFINE_integer("patches_per_image", 10, "Pairs generated per image")
    flags.DEFINE_integer("seed", 0, "Seed; each image's draws come from (seed, split, image id)")
    flags.DEFINE_integer("max_images", 0, "Use only the first N images (by id) of each split; 0 = all")
    flags.DEFINE_integer("num_shards", 0, "Shards per split; 0 = automatic (~64 MiB each, at least 8)")
    flags.DEFINE_bool("color", False, "3-channel (BGR) patches instead of grayscale")
    flags.DEFINE_string("dataset_name", "homography", "TFDS dataset name (snake_case): the shard files' prefix and "
                        "the name tfds.load finds the build by")
    flags.DEFINE_bool("overwrite", False, "Replace a dataset already in output_dir")
    flags.DEFINE_enum("photometric", "none", ["none", "camera"], "none: patch B is an exact warp of patch A's "
                      "image; camera: each patch gets its own shade, blur, exposure, gamma and noise (labels "
                      "unchanged; parameters stored in each record, ranges in homography_index.json)")
    flags.DEFINE_bool("reduced_decode", True, "Decode large JPEGs at 1/2, 1/4 or 1/8 size (needs sizes from the annotations)")


def pair_config_from_flags():
    """The PairConfig that define_dataset_flags' flags describe."""
    from pipeline.dataset.geometry import PairConfig

    f = flags.FLAGS
    return PairConfig(patch_size=f.patch_size, rho=f.rho, image_width=f.image_width, image_height=f.image_height,
                      channels=3 if f.color else 1, patches_per_image=f.patches_per_image, seed=f.seed,
                      photometric=f.photometric)
