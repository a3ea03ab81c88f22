"""The variants of bench.adversarial: (1) model.ship's gate, (2) output locations, (3) indexes and shards,
(5) corrupt files and bad flags, (6) builds that produce nothing. Paths are str.format'ed per variant."""
from __future__ import annotations

import json
import os
import shutil

from bench.adversarial import SMALL, TRAIN, Variant, copy, edit_json, index, link

B, PB, A, T, E, S, R, P, ER = ("pipeline.local_build", "pipeline.build", "pipeline.audit", "model.train",
                               "model.evaluate", "model.ship", "pipeline.records", "model.predict",
                               "model.evaluate_real")
BUILD = ["--coco_dir={coco}", *SMALL]
EVAL = ["--data_dir={ds}", "--output_dir={out}", "--methods=identity", "--num_visualizations=0", "--workers=1"]
SHIP = ["--model_dir={run}", "--report_dir={rep_clean}", "--camera_report_dir={rep_cam}", "--ship_dir={ship}"]
REPORT = "mace_report.json"


def with_(*keys, then=None):
    """A setup that copies the base fixtures named, then calls then(p)."""
    def setup(p):
        for k in keys:
            copy(p, k)
        if then:
            then(p)
    return setup


def index_edit(change, key="ds"):
    return lambda p: edit_json(index(p, key), change)


def split(raw, name="validation"):
    return raw["splits"][name]


def dup_shard(raw):  # the first validation shard listed twice, the total made to agree
    s = split(raw)
    s["shards"].append(dict(s["shards"][0]))
    s["num_examples"] = sum(x["num_examples"] for x in s["shards"])


def cross_split(raw):  # validation lists train's shards: validating on the training pairs
    split(raw)["shards"] = [dict(x) for x in split(raw, "train")["shards"]]
    split(raw)["num_examples"] = split(raw, "train")["num_examples"]


def dot_dup(raw):  # the same shard twice under two spellings
    s = split(raw)
    s["shards"].append(dict(s["shards"][0], file="./" + s["shards"][0]["file"]))
    s["num_examples"] = sum(x["num_examples"] for x in s["shards"])


def shard_file(raw, name):
    split(raw)["shards"][0]["file"] = name


def set_config(key, value):
    return index_edit(lambda raw: raw["config"].__setitem__(key, value))


def zero_shard(p):
    name = json.load(open(index(p)))["splits"]["validation"]["shards"][0]["file"]
    open(os.path.join(p["ds"], name), "wb").close()


def dir_shard(p):
    name = json.load(open(index(p)))["splits"]["validation"]["shards"][0]["file"]
    os.remove(os.path.join(p["ds"], name))
    os.mkdir(os.path.join(p["ds"], name))


def index_is_dir(p):
    os.remove(index(p))
    os.mkdir(index(p))


def write(path, text):
    def setup(p):
        with open(path.format(**p), "w") as f:
            f.write(text)
    return setup


def run_edit(name, text):
    return with_("run", then=write("{run}/" + name, text))


def report_edit(key, change):
    return with_("run", "rep_clean", "rep_cam", then=lambda p: edit_json(os.path.join(p[key], REPORT), change))


def network_mace(value):
    return lambda r: r["methods"]["network"].__setitem__("mean_mace", value)


def shipped(change=None):
    """The run shipped once into {ship} (its own reports), then change(p) applied."""
    def setup(p):
        for k in ("run", "rep_clean", "rep_cam"):
            copy(p, k)
        os.makedirs(p["ship"])
        for kind, name in (("rep_clean", "evaluation.json"), ("rep_cam", "evaluation_camera.json")):
            r = json.load(open(os.path.join(p[kind], REPORT)))
            r["methods"]["network"]["mean_mace"] = 100.0
            json.dump(r, open(os.path.join(p["ship"], name), "w"))
        if change:
            change(p)
    return setup


def evaluated(key, *flags):
    """Copies the run and reports, then replaces the clean report with model.evaluate's on key's data."""
    def setup(p):
        from bench.adversarial import sh
        for k in ("run", "rep_clean", "rep_cam", "ds"):
            copy(p, k)
        shutil.rmtree(p["rep_clean"])
        done = sh(E, f"--data_dir={p[key]}", f"--model_dir={p['run']}", f"--output_dir={p['rep_clean']}",
                  "--methods=identity,network", "--num_visualizations=0", "--workers=1", *flags)
        assert done.returncode == 0, done.stderr[-2000:]
    return setup


def counted(expected):
    """check: records prints the split's pair count."""
    return lambda p, out: None if f"{expected} records" in out or f" {expected} " in out else f"said: {out[-200:]}"


def variants() -> list:
    v = []
    add = lambda *a, **k: v.append(Variant(*a, **k))
    # (2) output locations: the inputs themselves, through links, inside them
    add("build: output_dir = the COCO root, --overwrite", B, [*BUILD, "--output_dir={coco}", "--overwrite"],
        with_("coco"), watch=("coco",))
    add("build: output_dir = the COCO image folder, --overwrite", B, [*BUILD, "--output_dir={coco}/val2017",
        "--overwrite"], with_("coco"), watch=("coco",))
    add("build: output_dir = a new folder inside the COCO root", B, [*BUILD, "--output_dir={coco}/out"],
        with_("coco"), watch=("coco",))
    add("build: output_dir = a link to the COCO root, --overwrite", B, [*BUILD, "--output_dir={link}", "--overwrite"],
        with_("coco", then=lambda p: link(p["coco"], p["link"])), watch=("coco",))
    add("build: output_dir = a link to the COCO image folder", B, [*BUILD, "--output_dir={link}"],
        with_("coco", then=lambda p: link(p["coco"] + "/val2017", p["link"])), watch=("coco",))
    add("build: output_dir = a dangling link", B, [*BUILD, "--output_dir={link}"],
        with_("coco", then=lambda p: link(p["root"] + "/nowhere", p["link"])), watch=("coco",))
    add("build: coco_dir = a file", B, ["--coco_dir={x}", *SMALL[:-1], "--output_dir={out}"], write("{x}", "x"))
    add("beam build: output_dir = the COCO image folder, --overwrite", PB, [*BUILD, "--output_dir={coco}/val2017",
        "--overwrite", "--runner=DirectRunner"], with_("coco"), watch=("coco",))
    add("beam build: output_dir = a link into the COCO root", PB, [*BUILD, "--output_dir={link}", "--overwrite",
        "--runner=DirectRunner"], with_("coco", then=lambda p: link(p["coco"], p["link"])), watch=("coco",))
    add("build: output_dir with spaces and unicode works", B, [*BUILD, "--output_dir={root}/dé jà vu/ø ut"],
        with_("coco"), expect="ok",
        check=lambda p, out: None if os.path.exists(os.path.join(p["root"], "dé jà vu/ø ut/homography_index.json"))
        else "no index")
    add("audit: output_dir = data_dir, --overwrite", A, ["--data_dir={ds}", "--output_dir={ds}", "--overwrite"],
        with_("ds"), watch=("ds",))
    add("audit: output_dir = a link to data_dir, --overwrite", A, ["--data_dir={ds}", "--output_dir={link}",
        "--overwrite"], with_("ds", then=lambda p: link(p["ds"], p["link"])), watch=("ds",))
    add("audit: output_dir inside data_dir", A, ["--data_dir={ds}", "--output_dir={ds}/audit"], with_("ds"),
        watch=("ds",))
    add("train: model_dir = data_dir", T, ["--data_dir={ds}", "--model_dir={ds}", *TRAIN], with_("ds"), watch=("ds",))
    add("train: model_dir = a link to the COCO image folder", T, ["--data_dir={ds}", "--model_dir={link}", *TRAIN],
        with_("ds", "coco", then=lambda p: link(p["coco"] + "/val2017", p["link"])), watch=("coco",))
    add("train: model_dir = a folder of other files", T, ["--data_dir={ds}", "--model_dir={x}", *TRAIN],
        with_("ds", then=lambda p: (os.mkdir(p["x"]), write("{x}/notes.txt", "mine")(p))), watch=("x",))
    add("train: model_dir inside data_dir", T, ["--data_dir={ds}", "--model_dir={ds}/run", *TRAIN], with_("ds"),
        watch=("ds",))
    add("evaluate: output_dir = data_dir", E, EVAL[:1] + ["--output_dir={ds}"] + EVAL[2:], with_("ds"), watch=("ds",))
    add("evaluate: output_dir = a link to the COCO image folder", E, EVAL[:1] + ["--output_dir={link}"] + EVAL[2:],
        with_("ds", "coco", then=lambda p: link(p["coco"] + "/val2017", p["link"])), watch=("coco",))
    add("evaluate: output_dir = the run's folder", E, [*EVAL[:1], "--output_dir={run}", *EVAL[2:]],
        with_("ds", "run"), watch=("run",))
    add("evaluate: output_dir = a folder of other files", E, [*EVAL[:1], "--output_dir={x}", *EVAL[2:]],
        with_("ds", then=lambda p: (os.mkdir(p["x"]), write("{x}/notes.txt", "mine")(p))), watch=("x",))
    add("evaluate: output_dir = an earlier report works", E, [*EVAL[:1], "--output_dir={rep_clean}", *EVAL[2:]],
        with_("ds", "rep_clean"), expect="ok")
    add("ship: ship_dir = the COCO image folder", S, [*SHIP[:3], "--ship_dir={coco}/val2017"],
        with_("run", "rep_clean", "rep_cam", "coco"), watch=("coco",))
    add("ship: ship_dir = data_dir", S, [*SHIP[:3], "--ship_dir={ds}"], with_("run", "rep_clean", "rep_cam", "ds"),
        watch=("ds",))
    add("ship: ship_dir = a link to a folder", S, [*SHIP[:3], "--ship_dir={link}"],
        with_("run", "rep_clean", "rep_cam", "ds", then=lambda p: link(p["ds"], p["link"])), watch=("ds",))
    add("ship: ship_dir = model_dir", S, [*SHIP[:3], "--ship_dir={run}"], with_("run", "rep_clean", "rep_cam"),
        watch=("run",))
    add("ship: ship_dir = ''", S, [*SHIP[:3], "--ship_dir="], with_("run", "rep_clean", "rep_cam"))
    # (1) the ship gate
    add("ship: the camera report given as the clean one (nothing shipped)", S, ["--model_dir={run}",
        "--report_dir={rep_cam}", "--camera_report_dir={rep_cam}", "--ship_dir={ship}"],
        with_("run", "rep_cam"), watch=("root",))
    add("ship: clean and camera reports swapped (nothing shipped)", S, ["--model_dir={run}", "--report_dir={rep_cam}",
        "--camera_report_dir={rep_clean}", "--ship_dir={ship}"], with_("run", "rep_clean", "rep_cam"), watch=("root",))
    add("ship: the clean report given as the camera one", S, ["--model_dir={run}", "--report_dir={rep_clean}",
        "--camera_report_dir={rep_clean}", "--ship_dir={ship}"], with_("run", "rep_clean"), watch=("root",))
    add("ship: network MACE edited lower, fingerprint intact", S, SHIP,
        shipped(lambda p: edit_json(os.path.join(p["rep_clean"], REPORT), network_mace(0.5))), watch=("ship",))
    add("ship: negative network MACE (nothing shipped)", S, SHIP, report_edit("rep_clean", network_mace(-1.0)),
        watch=("root",))
    add("ship: NaN network MACE (nothing shipped)", S, SHIP, report_edit("rep_clean", network_mace(float("nan"))),
        watch=("root",))
    add("ship: network MACE a string", S, SHIP, shipped(lambda p: edit_json(os.path.join(p["rep_clean"], REPORT),
                                                                          network_mace("1.0"))), watch=("ship",))
    add("ship: shipped evaluation.json with a string MACE", S, SHIP,
        shipped(lambda p: edit_json(os.path.join(p["ship"], "evaluation.json"), network_mace("abc"))),
        watch=("ship",))
    add("ship: shipped evaluation.json with a negative MACE, --force", S, [*SHIP, "--force"],
        shipped(lambda p: edit_json(os.path.join(p["ship"], "evaluation.json"), network_mace(-5))), watch=("ship",))
    add("ship: num_pairs edited", S, SHIP, report_edit("rep_clean", lambda r: r.__setitem__("num_pairs", 5000)),
        watch=("root",))
    add("ship: the clean report scored on the training split", S, SHIP, evaluated("ds", "--split=train"),
        watch=("root",))
    add("ship: a report of only the first 4 pairs", S, SHIP, evaluated("ds", "--max_pairs=4"), watch=("root",))
    add("ship: a report without the network method", S, SHIP,
        report_edit("rep_clean", lambda r: r["methods"].pop("network")), watch=("root",))
    add("ship: a report that is a JSON list", S, SHIP, with_("run", "rep_clean", "rep_cam",
        then=write("{rep_clean}/" + REPORT, "[]")), watch=("root",))
    add("ship: a corrupt config.json in the run", S, SHIP, with_("rep_clean", "rep_cam",
        then=lambda p: (copy(p, "run"), write("{run}/config.json", '{"architecture": "comp')(p))), watch=("root",))
    add("ship: a corrupt history.json in the run", S, SHIP, with_("rep_clean", "rep_cam",
        then=lambda p: (copy(p, "run"), write("{run}/history.json", "[{")(p))), watch=("root",))
    add("ship: config.json a JSON list", S, SHIP, with_("rep_clean", "rep_cam",
        then=lambda p: (copy(p, "run"), write("{run}/config.json", "[1]")(p))), watch=("root",))
    # (3) indexes and shards, every reader
    for module, args in ((R, ["--data_dir={ds}", "--split=validation"]), (E, EVAL),
                         (T, ["--data_dir={ds}", "--model_dir={out}", *TRAIN, "--train_split=validation",
                              "--reader=records"]),
                         (T, ["--data_dir={ds}", "--model_dir={out}", *TRAIN, "--train_split=validation"])):
        tag = f"{module.split('.')[1]}{' (records)' if '--reader=records' in args else ''}"
        add(f"{tag}: a shard listed twice", module, args, with_("ds", then=index_edit(dup_shard)), watch=("ds",))
        add(f"{tag}: a shard listed as ./name and name", module, args, with_("ds", then=index_edit(dot_dup)),
            watch=("ds",))
        add(f"{tag}: validation lists train's shards", module, args, with_("ds", then=index_edit(cross_split)),
            watch=("ds",))
    for module, args in ((R, ["--data_dir={ds}", "--split=validation"]), (E, EVAL), (A, ["--data_dir={ds}",
                                                                                        "--output_dir={out}"])):
        tag = module.split(".")[1]
        add(f"{tag}: shard name with a NUL byte", module, args,
            with_("ds", then=index_edit(lambda raw: shard_file(raw, "a\u0000b"))), watch=("ds",))
        add(f"{tag}: shard name 'sub/../name'", module, args,
            with_("ds", then=index_edit(lambda raw: shard_file(raw, "sub/../" + split(raw)["shards"][0]["file"]))),
            watch=("ds",))
        add(f"{tag}: a shard that is a folder", module, args, with_("ds", then=dir_shard), watch=("ds",))
        add(f"{tag}: a zero-byte shard", module, args, with_("ds", then=zero_shard), watch=("ds",))
        add(f"{tag}: the index is a folder", module, args, with_("ds", then=index_is_dir), watch=("ds",))
        add(f"{tag}: config rho 8.5", module, args, with_("ds", then=set_config("rho", 8.5)), watch=("ds",))
        add(f"{tag}: config patch_size true", module, args, with_("ds", then=set_config("patch_size", True)),
            watch=("ds",))
        add(f"{tag}: config seed '0'", module, args, with_("ds", then=set_config("seed", "0")), watch=("ds",))
        add(f"{tag}: a shard of 64 px under a 32 px name", module, args, with_("ds", "ds64", then=lambda p: shutil.copy(
            os.path.join(p["ds64"], json.load(open(index(p, "ds64")))["splits"]["validation"]["shards"][0]["file"]),
            os.path.join(p["ds"], json.load(open(index(p)))["splits"]["validation"]["shards"][0]["file"]))),
            watch=("ds",))
    add("records: features.json truncated still reads (not its file)", R, ["--data_dir={ds}", "--split=validation"],
        with_("ds", then=write("{ds}/features.json", "{")), expect="ok")
    add("audit: features.json truncated (not read: TFDS's file)", A, ["--data_dir={ds}", "--output_dir={out}"],
        with_("ds", then=write("{ds}/features.json", '{"a": ')), expect="ok")
    add("audit: dataset_info.json a JSON list", A, ["--data_dir={ds}", "--output_dir={out}"],
        with_("ds", then=write("{ds}/dataset_info.json", "[]")), expect="ok")
    add("audit: features.json a folder", A, ["--data_dir={ds}", "--output_dir={out}"],
        with_("ds", then=lambda p: (os.remove(p["ds"] + "/features.json"), os.mkdir(p["ds"] + "/features.json"))),
        expect="ok")
    from bench.adversarial_flags import flag_variants
    v += flag_variants()
    return v
