"""data.training_split: the shipped network's image split, as links; the hold-out rule is fixed by the id."""
import os

import pytest

from data import training_split


def _jpegs(folder, ids):
    os.makedirs(folder)
    for i in ids:
        open(os.path.join(folder, f"{i:012d}.jpg"), "wb").close()


def test_split_is_a_fixed_rule_on_ids_and_refuses_a_used_folder(tmp_path):
    ids = list(range(1, 200))
    _jpegs(tmp_path / "more" / "images", ids)
    _jpegs(tmp_path / "mini" / "train2017", [1001, 1002])
    _jpegs(tmp_path / "mini" / "val2017", [2001])
    out = tmp_path / "out"
    counts = training_split.make_split(str(tmp_path / "more"), str(tmp_path / "mini"), str(out))
    held = sorted(int(n[:12]) for n in os.listdir(out / "holdout"))
    assert held == [i for i in ids if training_split.is_holdout(i)] and 3 <= len(held) <= 30
    train = {int(n[:12]) for n in os.listdir(out / "train2017")}
    assert train == (set(ids) - set(held)) | {1001, 1002} and counts == {"train2017": len(train), "val2017": 1,
                                                                      "holdout": len(held)}
    assert os.path.islink(out / "val2017" / "000000002001.jpg")
    with pytest.raises(ValueError, match="not empty"):
        training_split.make_split(str(tmp_path / "more"), str(tmp_path / "mini"), str(out))
