"""Issue 24, model.train's bounds and one-liners: a batch the split cannot fill or memory cannot hold, rho 0
builds, a corrupt config.json, a cut-short newest checkpoint (the one before it is taken), --init_from
weights of other patches, a network too large for the patches, and a disk that fills up or goes
read-only while a run writes: one line naming the file and the cause, never a traceback or a crash."""
import os
import re
import subprocess
import sys

import pytest

from model import network, train
from model.training import run_dir
from pipeline.dataset.geometry import PairConfig
from tests.conftest import COCO_MINI
from tests.test_model_train_failures import FAST, REPO, error_line, run_cli

SHIPPED = os.path.join(REPO, "data", "weights", "compact_rho32")
RUN = ["--batch_size=8", "--architecture=compact", "--steps_per_loop=1", "--log_every=1", "--val_every=0"]


def test_batches_and_buffers_are_bounded_before_any_work(tiny_dataset, tmp_path, monkeypatch):
    proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={tmp_path / 'run'}", "--steps=2",
                   "--batch_size=1000000", "--architecture=compact")
    assert proc.returncode == 2
    assert "--batch_size 1000000 (x 1 replicas) is larger than the 32 pairs of split 'train'" in \
        error_line(proc, "model.train")
    with pytest.raises(train.TrainError, match="--shuffle_buffer 100000000 of 32 px pairs needs more than 1 GiB; "
                                               "at most 524288"):
        train.train(tiny_dataset, str(tmp_path / "run"), steps=2, **dict(FAST, shuffle_buffer=10**8))
    assert not os.path.exists(tmp_path / "run")
    monkeypatch.setattr(train, "MAX_BATCH_BYTES", 8 * 32 * 32 * 2 * 4)  # room for 8 pairs a step, not 16
    with pytest.raises(train.TrainError, match="--batch_size 16 of 32 px pairs .* at most 8 at this patch size"):
        train.train(tiny_dataset, str(tmp_path / "run"), steps=2, **dict(FAST, batch_size=16))


def test_a_step_whose_activations_memory_cannot_hold_is_refused(tiny_dataset, tmp_path, monkeypatch):
    """Issue 24: --batch_size=8192 of 128 px pairs passed the input bound yet its activations passed 8 GiB
    (bench/peak_memory.py); the estimate counts what the network computes per pair and the shuffle buffer."""
    values, weights = network.footprint("compact", 32, 1)
    assert network.footprint("compact", 256, 1)[0] > 60 * values  # what a pair costs grows with its area
    assert network.footprint("homographynet", 128, 1)[0] > 20 * network.footprint("compact", 128, 1)[0]
    per_pair = train.VALUE_BYTES * values + train.INPUT_BYTES * 32 * 32 * 2
    assert train.memory_estimate(values, weights, 32 * 32 * 2, 8, 10) == pytest.approx(
        train.RUNTIME_BYTES + train.WEIGHT_BYTES * weights + train.RECORD_BYTES * 10 * 32 * 32 * 2 + 8 * per_pair)
    room = int(train.memory_estimate(values, weights, 32 * 32 * 2, 8, 10)) + 1 + train.ESTIMATE_MARGIN
    monkeypatch.setattr(train, "MAX_TRAIN_BYTES", room)  # 8 pairs a step fit beside 10 buffered, 16 do not
    with pytest.raises(train.TrainError, match=r"--batch_size 16 of 32 px pairs on the compact network .* "
                                               r"with --shuffle_buffer 10 needs about .* at most 8 pairs a step"):
        train.train(tiny_dataset, str(tmp_path / "run"), steps=2, **dict(FAST, batch_size=16, shuffle_buffer=10))
    assert not os.path.exists(tmp_path / "run")
    train.train(tiny_dataset, str(tmp_path / "run"), steps=1, **dict(FAST, batch_size=8, shuffle_buffer=10))
    assert os.path.exists(tmp_path / "run" / "config.json")


def test_the_papers_recipe_fits_the_bound_and_largest_batch_is_its_edge():
    """HomographyNet at batch 64 with the default buffer is accepted (a buffer of 10,000 measured 4.07 GiB over
    30 steps and is not); largest_batch is the last batch the estimate accepts."""
    from model.training import data

    values, weights = network.footprint("homographynet", 128, 1)
    pair, room = 128 * 128 * 2, train.MAX_TRAIN_BYTES - train.ESTIMATE_MARGIN
    assert train.memory_estimate(values, weights, pair, 64, data.DEFAULT_SHUFFLE_BUFFER) <= room
    assert train.memory_estimate(values, weights, pair, 64, 10000) > room
    for buffer in (1, data.DEFAULT_SHUFFLE_BUFFER, 32768):
        most = train.largest_batch(values, weights, pair, buffer)
        assert train.memory_estimate(values, weights, pair, most, buffer) <= room
        assert train.memory_estimate(values, weights, pair, most + 1, buffer) > room


def test_rho_0_and_out_of_bounds_geometry_are_refused_at_build_time(tmp_path):
    for flag, says in (("--rho=0", "rho must be at least 1, got 0"),
                       ("--patch_size=2048", "patch_size 2048 is larger than the 1024 px allowed"),
                       ("--patches_per_image=100000", "at most 16384 pairs an image at this size"),
                       # second round: both used to end in a worker's traceback
                       ("--seed=-1", "seed must be >= 0, got -1"),
                       ("--splits=../x=val2017", "split name '../x' is not letters, digits and _")):
        proc = run_cli("pipeline.local_build", f"--coco_dir={COCO_MINI}", f"--output_dir={tmp_path / 'ds'}", flag)
        assert proc.returncode == 2
        assert says in error_line(proc, "pipeline.local_build")
        assert not os.path.exists(tmp_path / "ds")
    with pytest.raises(ValueError, match="rho must be at least 1"):
        PairConfig(rho=0).validate()


def test_networks_refuse_patches_they_cannot_take_and_weights_of_other_patches(tiny_dataset, tmp_path):
    assert network.input_problem("compact", 16, 1) == ("the compact network needs patches of at least 32 px "
                                                      "and a multiple of 32; this data's patches are 16 px")
    assert network.input_problem("homographynet", 8, 1) is None and network.input_problem("compact", 64, 3) is None
    for arch in ("compact", "homographynet"):  # every network named builds at its smallest patch
        smallest = network.PATCH_NEEDS[arch][0]
        assert network.build(arch, smallest, 1).output_shape == (None, 8)
    proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={tmp_path / 'run'}", "--steps=2",
                   f"--init_from={SHIPPED}", *RUN)
    assert proc.returncode == 2
    assert (f"--init_from {SHIPPED} holds a compact network for 128 px patches with 1 channel(s); this run trains a "
            f"compact network on 32 px patches with 1") in error_line(proc, "model.train")
    assert not os.path.exists(tmp_path / "run")


def test_compact_network_on_16_px_patches_is_one_line(tmp_path):
    from pipeline import local_build

    ds = str(tmp_path / "ds16")
    local_build.build(str(COCO_MINI), ds, {"train": "train2017"},
                      PairConfig(patch_size=16, rho=8, image_width=80, image_height=60, patches_per_image=4),
                      max_images=4, num_shards=1, workers=1, log=None)
    proc = run_cli("model.train", f"--data_dir={ds}", f"--model_dir={tmp_path / 'run'}", "--steps=2", *RUN)
    assert proc.returncode == 2
    assert "the compact network needs patches of at least 32 px and a multiple of 32; this data's patches are 16 px" \
        in error_line(proc, "model.train")


def test_corrupt_config_json_is_one_line_and_left_as_it_was(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for content in ('{"architecture": "comp', "[1, 2]"):
        (run / "config.json").write_text(content)
        proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={run}", "--steps=2", *RUN)
        assert proc.returncode == 2
        assert f"{run / 'config.json'} " in error_line(proc, "model.train")
        assert (run / "config.json").read_text() == content and os.listdir(run) == ["config.json"]
    with pytest.raises(network.RunConfigError, match="is not a run's config"):
        network.read_config(str(run))


def test_a_cut_short_newest_checkpoint_falls_back_to_the_one_before(tiny_dataset, tmp_path):
    model_dir = str(tmp_path / "run")
    train.train(tiny_dataset, model_dir, steps=4, checkpoint_every=2, **FAST)
    newest = run_dir.latest_checkpoint(model_dir)
    assert newest[0] == 4
    os.truncate(newest[1], os.path.getsize(newest[1]) // 3)  # what a full disk leaves
    os.remove(os.path.join(model_dir, "model.keras"))  # network.load then takes a checkpoint, the same way
    assert network.load(model_dir)[0].count_params() > 0
    proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={model_dir}", "--steps=6",
                   "--checkpoint_every=2", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and f"checkpoint {newest[1]} cannot be read" in warnings[0]
    assert "resumed from" in proc.stderr and "ckpt-2.weights.h5 at step 2" in proc.stderr
    assert "trained 2 -> 6 steps" in proc.stdout
    assert [s for s, _ in run_dir.checkpoints(model_dir)] == [2, 4, 6]  # ckpt-4 written again, whole
    for _, path in run_dir.checkpoints(model_dir)[:-1]:
        os.truncate(path, 100)
    os.truncate(run_dir.checkpoints(model_dir)[-1][1], 100)
    proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={model_dir}", "--steps=8", *RUN)
    assert proc.returncode == 2
    assert "none of the 3 checkpoints in" in error_line(proc, "model.train")


def test_a_disk_that_fills_up_ends_the_run_in_one_line(tiny_dataset, small_fs):
    disk = small_fs("25m")  # room for two checkpoints of the compact network (9.5 MB each), not three
    proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={disk / 'run'}", "--steps=30",
                   "--checkpoint_every=1", *RUN)
    assert proc.returncode == 2, proc.stderr[-3000:]  # not 139 (a crash in HDF5 at exit)
    line = error_line(proc, "model.train")
    assert (f"cannot write the checkpoint of step 3 in {disk / 'run' / 'checkpoints'}: No space left on device"
            in line and "the checkpoint of step 2 is where the same command resumes" in line), line
    assert [s for s, _ in run_dir.checkpoints(str(disk / "run"))] == [1, 2]
    assert not [n for n in os.listdir(disk / "run" / "checkpoints") if not n.startswith("ckpt-")]


def test_a_write_hdf5_fails_is_one_line_and_no_crash(tiny_dataset, small_fs, tmp_path):
    """Room reserved, then taken by someone else before HDF5 writes: HDF5's own failure, cleaned up."""
    disk = small_fs("4m")
    script = tmp_path / "full.py"
    script.write_text("import sys\nfrom pipeline.runtime import outputs\n"
                      "outputs.reserve_space = lambda *a, **k: None\n"
                      f"sys.argv = ['model.train', '--data_dir={tiny_dataset}', '--model_dir={disk / 'run'}', "
                      f"'--steps=4', '--checkpoint_every=1', {', '.join(repr(a) for a in RUN)}]\n"
                      "from model import train\ntrain.run()\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc, "model.train")
    assert f"cannot write {disk / 'run' / 'checkpoints' / 'ckpt-1.weights.h5'}: No space left on device" in line
    assert "h5py" not in proc.stderr and os.listdir(disk / "run" / "checkpoints") == []


def test_non_finite_flags_and_run_dirs_that_are_not_runs_are_one_line(tiny_dataset, tmp_path):
    """Issue 24, second round: NaN passes every comparison, so every float flag is checked finite; a
    model_dir that is the dataset, inside it, or a folder of other files is refused before any work."""
    for flag, value in (("learning_rate", float("nan")), ("learning_rate", float("inf")),
                        ("max_minutes", float("nan")), ("clip_norm", float("inf"))):
        with pytest.raises(train.TrainError, match=f"--{flag} must be a finite number"):
            train.train(tiny_dataset, str(tmp_path / "run"), steps=2, **dict(FAST, **{flag: value}))
    with pytest.raises(train.TrainError, match="--bn_momentum must be in"):
        train.train(tiny_dataset, str(tmp_path / "run"), steps=2, architecture_options={"bn_momentum": 1.5}, **FAST)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    for where, says in ((tiny_dataset, "is the data_dir"), (os.path.join(tiny_dataset, "run"), "is inside the data_dir"),
                        (str(other), "is not empty and holds none of .lock, config.json")):
        proc = run_cli("model.train", f"--data_dir={tiny_dataset}", f"--model_dir={where}", "--steps=2",
                       "--architecture=compact", "--batch_size=8")
        assert proc.returncode == 2 and re.search(says, error_line(proc, "model.train")), proc.stderr[-500:]
    assert os.listdir(other) == ["mine.txt"] and not os.path.exists(os.path.join(tiny_dataset, "run"))
