"""What the experiment sweep runs (model/experiments.py): its scales, its variants (the seed's experiments)
and one sweep's settings."""
from __future__ import annotations

import dataclasses

from model import network


class ExperimentError(ValueError):
    """A sweep that cannot go on; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one sweep. Rho values are the paper's (at 128 px patches) times rho_factor."""

    patch_size: int
    image_width: int
    image_height: int
    rho_factor: float
    patches_per_image: int
    max_images: int          # per split; 0 = all
    train: dict              # model.train keyword arguments
    tower_alpha: float       # MobileNetV2 width multiplier
    eval_max_pairs: int      # pairs of the validation split scored per method; 0 = all
    num_visualizations: int
    splits: dict = dataclasses.field(default_factory=lambda: {"train": "train2017", "validation": "val2017"})

    def rho(self, paper_rho: int) -> int:
        return max(1, round(paper_rho * self.rho_factor))


SCALES = {
    # The paper's schedule: 128 px patches of 320x240 images, 90,000 steps of 64, lr 0.005 divided by 10
    # every 30,000 steps. For a GPU machine (BUILD_NOTES.md has the cost).
    "full": Scale(128, 320, 240, 1.0, 10, 0,
                  dict(steps=90000, batch_size=64, lr_decay_steps=30000, val_every=1000, val_batches=100,
                       log_every=100, checkpoint_every=1000, steps_per_loop=50),
                  # the seed's recipe: test2017's 40,670 images x 10 = 406,700 training pairs
                  1.0, 5000, 6, {"train": "test2017", "validation": "val2017"}),
    # Everything divided by 4 (32 px patches of 80x60 images, rho 5 / 8 / 10): the same geometry, a few
    # hundred pairs, 120 steps. It checks that the whole sweep runs; its MACE says nothing about quality.
    # Learning rate 0.001: at the paper's 0.005 with batches of 16 the rho 20 and rho 40 runs diverged.
    "smoke": Scale(32, 80, 60, 0.25, 4, 24,
                   dict(steps=120, batch_size=16, learning_rate=0.001, lr_decay_steps=40, val_every=20, val_batches=0, log_every=10,
                        checkpoint_every=120, steps_per_loop=10, shuffle_buffer=256),
                   0.35, 0, 0),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    group: str            # rho | ablation | transfer | colour
    description: str
    rho: int              # the paper's rho (128 px patches); the data's is Scale.rho(rho)
    channels: int = 1
    architecture: str = "homographynet"
    dropout: bool = True
    batchnorm: bool = True
    init_from: str = ""   # another variant whose trained network starts this one


VARIANTS = (
    Variant("rho20", "rho", "HomographyNet, rho 20", 20),
    Variant("rho32", "rho", "HomographyNet, rho 32 (the paper's setting; the ablation's reference)", 32),
    Variant("rho40", "rho", "HomographyNet, rho 40", 40),
    Variant("no_dropout", "ablation", "without dropout", 32, dropout=False),
    Variant("no_batchnorm", "ablation", "without batch norm", 32, batchnorm=False),
    Variant("no_dropout_no_batchnorm", "ablation", "without dropout and batch norm", 32, dropout=False,
            batchnorm=False),
    Variant("mobilenetv2_towers", "transfer", "two MobileNetV2 towers, first layers frozen, dense 1024 + L2", 32,
            architecture="mobilenetv2_towers", dropout=False),
    Variant("finetune_from_rho20", "transfer", "HomographyNet trained at rho 20, first convs frozen, fine-tuned "
            "at rho 32", 32, init_from="rho20"),
    Variant("colour", "colour", "HomographyNet on 3-channel (BGR) patches: 6-channel input", 32, channels=3),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


@dataclasses.dataclass
class Settings:
    """One sweep's inputs besides the variants."""

    coco_dir: str
    output_dir: str
    scale: Scale
    scale_name: str = "smoke"
    tower_weights: str = ""           # "" (random towers), "imagenet" or a weights file
    tower_frozen_layers: int = network.TOWER_FROZEN_LAYERS
    tower_l2: float = network.TOWER_L2
    finetune_frozen_convs: int = 4
    beam_args: list = dataclasses.field(default_factory=list)
    architecture: str = "homographynet"  # the network of every HomographyNet variant (--architecture)
    bn_momentum: float = 0.99

    def network_of(self, v: "Variant") -> str:
        """A variant's architecture: the sweep's --architecture for the HomographyNet family."""
        return self.architecture if v.architecture == "homographynet" else v.architecture


def select(names) -> list:
    """Variants by name, in the sweep's order, with the variants they start from added."""
    names = list(names) if names else [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in VARIANTS_BY_NAME]
    if unknown:
        raise ExperimentError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS_BY_NAME)}")
    wanted = set(names)
    for n in names:
        if VARIANTS_BY_NAME[n].init_from:
            wanted.add(VARIANTS_BY_NAME[n].init_from)
    return [v for v in VARIANTS if v.name in wanted]
