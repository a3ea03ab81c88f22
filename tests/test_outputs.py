"""Issue 24, output locations and builds that produce nothing: every command that writes checks its output
folder in one place (pipeline/runtime/outputs.py): a file, a non-empty folder without --overwrite (a lone
sub-folder counts; the COCO root is one), a read-only filesystem, a disk too small for the build; one line
naming the path and the cause, exit status 2, and what was there before untouched. A build in which every
image of a split fails exits 2 too, keeping failed_images-<split>.jsonl."""
import json
import os
import shutil

import numpy as np
import pytest

from pipeline.dataset import schema
from pipeline.runtime import outputs
from tests.conftest import COCO_MINI, make_coco_layout, textured_image
from tests.test_model_train_failures import error_line, run_cli

TINY_BUILD = ["--patch_size=32", "--rho=8", "--image_width=80", "--image_height=60", "--patches_per_image=2",
              "--max_images=4", "--num_shards=2", "--splits=validation=val2017"]


def snapshot(folder):
    """Every path below folder with its bytes (a file) or None (a folder): what must stay untouched."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def test_check_output_dir_refuses_files_non_empty_folders_and_unwritable_ones(tmp_path, small_fs):
    (tmp_path / "empty").mkdir()
    outputs.check_output_dir(str(tmp_path / "empty"))
    outputs.check_output_dir(str(tmp_path / "new" / "deeper"))  # made later, below a writable folder
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "only_sub" / "sub").mkdir(parents=True)
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".keep").write_text("")
    cases = {str(tmp_path / "a_file"): "exists and is not a folder",
             str(tmp_path / "a_file" / "below"): "is not a folder",
             str(tmp_path / "only_sub"): r"is not empty \(1 entry: sub/\); pass --overwrite",
             str(tmp_path / "hidden"): r"is not empty \(1 entry: \.keep\)"}
    for path, cause in cases.items():
        with pytest.raises(outputs.OutputError, match=cause):
            outputs.check_output_dir(path)
    outputs.check_output_dir(str(tmp_path / "only_sub"), overwrite=True)
    outputs.check_output_dir(str(tmp_path / "only_sub"), must_be_empty=False)
    read_only = small_fs(read_only=True)
    for path in (read_only, read_only / "new"):
        with pytest.raises(outputs.OutputError, match=f"{read_only} cannot be written: Read-only file system"):
            outputs.check_output_dir(str(path), must_be_empty=False)
    assert [n for n in os.listdir(tmp_path / "empty")] == []  # the probe left nothing behind
    with pytest.raises(SystemExit) as e:
        outputs.prepare_output_dir(str(tmp_path / "a_file"), prog="model.evaluate")
    assert e.value.code == 2


@pytest.mark.parametrize("module", ["pipeline.build", "pipeline.local_build"])
def test_builders_refuse_a_coco_root_a_lone_sub_folder_and_a_file(module, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(COCO_MINI / "annotations", coco / "annotations")
    shutil.copytree(COCO_MINI / "val2017", coco / "val2017")
    (tmp_path / "holds_a_folder" / "sub").mkdir(parents=True)
    (tmp_path / "a_file").write_text("mine")
    before = snapshot(tmp_path)
    for out, cause in ((coco, f"is the coco_dir {coco} this command reads"),  # refused before its emptiness
                       (tmp_path / "holds_a_folder", "is not empty (1 entry: sub/)"),
                       (tmp_path / "a_file", "exists and is not a folder")):
        proc = run_cli(module, f"--coco_dir={coco}", f"--output_dir={out}", *TINY_BUILD)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = error_line(proc, module)
        assert f"output_dir {out} {cause}" in line, line
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_builders_audit_and_train_refuse_a_read_only_filesystem(tiny_dataset, small_fs):
    read_only = small_fs(read_only=True)
    for module, args in (("pipeline.build", [f"--coco_dir={COCO_MINI}", *TINY_BUILD]),
                         ("pipeline.local_build", [f"--coco_dir={COCO_MINI}", *TINY_BUILD]),
                         ("pipeline.audit", [f"--data_dir={tiny_dataset}"])):
        proc = run_cli(module, *args, f"--output_dir={read_only / 'out'}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"output_dir {read_only} cannot be written: Read-only file system" in error_line(proc, module)
    proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={read_only}", "--steps=2",
                   "--batch_size=8", "--architecture=compact")
    assert proc.returncode == 2
    assert f"model_dir {read_only} cannot be written: Read-only file system" in error_line(proc, "model.train")


def test_audit_needs_an_empty_report_folder_or_overwrite(tiny_dataset, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "notes.md").write_text("mine")
    (report / "audit.json").write_text("{}")  # an earlier report
    proc = run_cli("pipeline.audit", f"--data_dir={tiny_dataset}", f"--output_dir={report}")
    assert proc.returncode == 2
    assert f"output_dir {report} is not empty (2 entries: audit.json, notes.md)" in error_line(proc, "pipeline.audit")
    assert (report / "audit.json").read_text() == "{}"
    proc = run_cli("pipeline.audit", f"--data_dir={tiny_dataset}", f"--output_dir={report}", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((report / "audit.json").read_text())["passed"]
    assert (report / "notes.md").read_text() == "mine"  # not the audit's: left alone


def test_a_build_that_cannot_fit_is_refused_before_it_starts(small_fs):
    small = small_fs("2m")
    for module in ("pipeline.local_build", "pipeline.build"):
        out = small / module
        proc = run_cli(module, f"--coco_dir={COCO_MINI}", f"--output_dir={out}", "--max_images=20",
                       "--splits=validation=val2017")
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = error_line(proc, module)
        assert f"cannot write 200 pairs in {out}: No space left on device" in line, line
        assert os.listdir(out) == []


def test_model_dir_that_is_a_file_is_one_line(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.write_text("not a folder")
    proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={run}", "--steps=2")
    assert proc.returncode == 2
    assert f"model_dir {run} exists and is not a folder" in error_line(proc, "model.train")
    assert run.read_text() == "not a folder"


@pytest.fixture(scope="module")
def dead_coco(tmp_path_factory):
    """A COCO layout whose images all fail: two undecodable files and one missing."""
    root = tmp_path_factory.mktemp("dead_coco")
    make_coco_layout(root, "val2017", {"000000000001.jpg": b"not an image", "000000000002.jpg": b"",
                                       "000000000003.jpg": textured_image(np.random.default_rng(0))})
    (root / "val2017" / "000000000003.jpg").unlink()
    return root


@pytest.mark.parametrize("module", ["pipeline.build", "pipeline.local_build"])
def test_a_build_in_which_every_image_fails_exits_2(module, dead_coco, tmp_path):
    out = tmp_path / "ds"
    proc = run_cli(module, f"--coco_dir={dead_coco}", f"--output_dir={out}", "--splits=validation=val2017")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = error_line(proc, module)
    failed = out / schema.failed_images_file("validation")
    assert ("split 'validation': none of its 3 images could be used (empty 1, missing 1, undecodable 1); "
            f"see {failed}") in line, line
    assert [json.loads(x)["reason"] for x in failed.read_text().splitlines()] == ["undecodable", "empty", "missing"]
    assert not (out / schema.INDEX).exists()  # nothing claims a dataset


def test_outputs_are_never_the_inputs_nor_a_folder_of_another_kind(tmp_path):
    """Issue 24, second round: an output folder that is an input, lies inside one or links to one is refused
    even with --overwrite; a reused folder (a run, a report) must hold what its command writes there."""
    source = tmp_path / "coco"
    (source / "val2017").mkdir(parents=True)
    (source / "val2017" / "1.jpg").write_bytes(b"jpeg")
    (tmp_path / "link").symlink_to(source / "val2017")
    for path, says in ((source, "is the coco_dir"), (source / "val2017", "is inside the coco_dir"),
                       (source / "new", "is inside the coco_dir"), (tmp_path / "link", "is inside the coco_dir")):
        with pytest.raises(outputs.OutputError, match=says):
            outputs.check_output_dir(str(path), overwrite=True, inputs={"coco_dir": str(source)})
    with pytest.raises(outputs.OutputError, match=r"holds none of config.json: it is not this command's folder"):
        outputs.check_output_dir(str(source), must_be_empty=False, reuse_if=("config.json",))
    outputs.check_output_dir(str(source), must_be_empty=False, reuse_if=("*/1.jpg",))  # one level down too
    (source / "config.json").write_text("{}")
    outputs.check_output_dir(str(source), must_be_empty=False, reuse_if=("config.json",))
    outputs.check_output_dir(str(tmp_path / "elsewhere"), overwrite=True, inputs={"coco_dir": str(source)})
    coco = tmp_path / "real"
    shutil.copytree(COCO_MINI, coco, ignore=shutil.ignore_patterns("train2017", "instances_train2017.json"))
    before = snapshot(coco)
    for module in ("pipeline.local_build", "pipeline.build"):
        proc = run_cli(module, f"--coco_dir={coco}", f"--output_dir={coco / 'val2017'}", "--overwrite", *TINY_BUILD)
        assert proc.returncode == 2 and "is inside the coco_dir" in error_line(proc, module)
    assert snapshot(coco) == before
