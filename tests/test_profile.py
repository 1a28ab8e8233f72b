"""Profiles: validation errors name path/value/fix, round trips, schema, job grid, CLI exit codes."""
import copy
import json

import jsonschema
import pytest

from conftest import REPO, run_matseg
from matseg.core import MatsegError, asset_path
from matseg.profile import (ProfileError, apply_overrides, compile_profile, load_profile, parse_profile,
                            profile_schema, profile_to_dict, save_profile)

MINI = {"name": "demo", "task": {"objective": "Segment pores"},
        "datasets": [{"name": "pores", "modality": "XCT", "material": "AlSi10Mg", "root": ".",
                      "classes": ["solid", "pore"], "mask_encoding": {"kind": "binary"}}]}
SHIPPED = [REPO / "profiles/super1.json", REPO / "profiles/ebc2.json", REPO / "profiles/meltpool.json",
           asset_path("profiles", "sample.json")]


def errors_of(data):
    with pytest.raises(ProfileError) as ei:
        parse_profile(data, "p.json")
    return {e["path"]: e for e in ei.value.errors}, str(ei.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_profiles_validate_against_code_and_schema(path):
    prof = load_profile(path)
    jsonschema.validate(json.loads(path.read_text()), profile_schema())
    assert len(compile_profile(prof)) == len(prof.datasets) * len(prof.model.encoders) * len(prof.model.decoders) * len(prof.training.seeds)


def test_shipped_schema_is_current():
    assert json.loads(asset_path("profile.schema.json").read_text()) == profile_schema()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_round_trip_is_exact(path, tmp_path):
    prof = load_profile(path)
    out = save_profile(prof, tmp_path / "p.json")
    again = load_profile(out)
    assert again.model_dump() == prof.model_dump()
    assert json.loads(out.read_text()) == json.loads(path.read_text())  # nothing added, nothing lost


def test_wrong_type_names_path_and_value():
    bad = copy.deepcopy(MINI); bad["training"] = {"batch_size": "sixteen"}
    errs, msg = errors_of(bad)
    assert errs["training.batch_size"]["value"] == "sixteen"
    assert "training.batch_size" in msg and "integer" in msg


def test_unknown_key_lists_allowed_keys_and_suggests():
    bad = copy.deepcopy(MINI); bad["datasets"][0]["modalty"] = "SEM"
    errs, msg = errors_of(bad)
    assert errs["datasets[0].modalty"]["value"] == "SEM"
    assert "did you mean 'modality'" in msg and "allowed keys here" in msg


def test_missing_field_is_named():
    bad = copy.deepcopy(MINI); del bad["task"]["objective"]
    errs, _ = errors_of(bad)
    assert errs["task.objective"]["message"] == "required field is missing"


def test_unknown_encoder_and_decoder_list_valid_names():
    bad = copy.deepcopy(MINI); bad["model"] = {"encoders": ["resnet50", "resnet5O"], "decoders": ["unett"]}
    errs, msg = errors_of(bad)
    assert "model.encoders[1]" in errs and "resnet50" in errs["model.encoders[1]"]["message"]
    assert "valid decoders: unet" in errs["model.decoders[0]"]["message"]
    assert "model.encoders[0]" not in errs


def test_palette_must_name_known_classes():
    bad = copy.deepcopy(MINI)
    bad["datasets"][0].update(classes=["a", "b"], mask_encoding={"kind": "palette", "colors": {"c": [0, 0, 255]}})
    _, msg = errors_of(bad)
    assert "['c']" in msg and "not in classes" in msg


def test_colour_out_of_range():
    bad = copy.deepcopy(MINI)
    bad["datasets"][0].update(mask_encoding={"kind": "palette", "colors": {"pore": [0, 0, 256]}, "default_class": "solid"})
    errs, _ = errors_of(bad)
    assert any(p.startswith("datasets[0].mask_encoding.colors.pore") for p in errs)


def test_overrides_are_validated():
    p = parse_profile(MINI)
    assert apply_overrides(p, ["training.seeds=[1,2]"]).training.seeds == [1, 2]
    with pytest.raises(ProfileError, match="training.max_epochs"):
        apply_overrides(p, ["training.max_epochs=0"])
    with pytest.raises(MatsegError, match="section.key=value"):
        apply_overrides(p, ["training.max_epochs"])


# --- trust the numbers: finite, typed, unique, file-system safe, all problems at once ------------

@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_nonfinite_literals_are_refused(tmp_path, literal):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(MINI)[:-1] + f', "training": {{"lr": {literal}}}}}')
    assert json.loads(f.read_text())["training"]["lr"] != 1e-4  # Python's json really accepts the literal
    with pytest.raises(ProfileError) as ei:
        load_profile(f)
    (e,) = ei.value.errors
    assert e["path"] == "training.lr" and literal in e["message"] and "finite" in e["message"]


def test_nonfinite_anywhere_even_in_metadata():
    bad = copy.deepcopy(MINI); bad["datasets"][0]["metadata"] = {"pixel_size_nm": float("nan")}
    errs, _ = errors_of(bad)
    assert list(errs) == ["datasets[0].metadata.pixel_size_nm"]


@pytest.mark.parametrize("key,value", [("patience", True), ("max_epochs", False), ("lr", True), ("batch_size", 16.0),
                                       ("seeds", [True]), ("amp", 1), ("augment", "yes")])
def test_numbers_and_switches_are_taken_literally(key, value):
    bad = copy.deepcopy(MINI); bad["training"] = {key: value}
    errs, _ = errors_of(bad)
    assert [p.startswith(f"training.{key}") for p in errs] == [True]


def test_bool_for_axis_and_palette_values():
    bad = copy.deepcopy(MINI); bad["datasets"][0]["layout"] = {"axis": True}
    errs, _ = errors_of(bad)
    assert "boolean where a number is meant" in errs["datasets[0].layout.axis"]["message"]
    assert parse_profile(MINI | {"datasets": [MINI["datasets"][0] | {"layout": {"axis": 1}}]}).datasets[0].layout.axis == 1


@pytest.mark.parametrize("seed,ok", [(0, True), (2**32 - 1, True), (2**32, False), (2**40, False), (-1, False)])
def test_seed_range(seed, ok):
    d = copy.deepcopy(MINI); d["training"] = {"seeds": [seed]}
    if ok: assert parse_profile(d).training.seeds == [seed]
    else:
        errs, _ = errors_of(d)
        assert "0..4294967295" in errs["training.seeds[0]"]["message"]
    d = copy.deepcopy(MINI); d["datasets"][0]["layout"] = {"kind": "flat", "split_seed": seed}
    if ok: assert parse_profile(d).datasets[0].layout.split_seed == seed
    else: assert "datasets[0].layout.split_seed" in errors_of(d)[0]


def test_duplicate_json_keys_are_named(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"name": "demo", "task": {"objective": "x"}, "training": {"lr": 0.1, "lr": 0.2}, "datasets": '
                 '[{"name": "a", "modality": "XCT", "material": "m", "root": ".", "classes": ["x", "y"], "root": "."}]}')
    with pytest.raises(ProfileError) as ei:
        load_profile(f)
    errs = {e["path"]: e["message"] for e in ei.value.errors}
    assert set(errs) == {"training.lr", "datasets[0].root"}
    assert "duplicate key" in errs["training.lr"] and "2 times" in errs["training.lr"]


def test_every_problem_at_once_nested_and_top_level(tmp_path):
    "A bad training.lr, a bad top-level name, a duplicate key, an unknown key and cross-field rules: one error."
    d = copy.deepcopy(MINI)
    d["name"] = "my profile"  # a space: not a folder-safe name
    d["training"] = {"lr": "fast", "tile_overlap": 600, "batchsz": 2}  # tile_overlap >= crop_size 512
    d["datasets"].append(copy.deepcopy(d["datasets"][0]))  # the same dataset name twice
    d["datasets"][0]["classes"] = ["solid", "solid"]
    text = json.dumps(d)[:-1] + ', "description": "a", "description": "b"}'
    f = tmp_path / "p.json"; f.write_text(text)
    with pytest.raises(ProfileError) as ei:
        load_profile(f)
    paths = [e["path"] for e in ei.value.errors]
    assert set(paths) == {"name", "training.lr", "training.tile_overlap", "training.batchsz", "datasets[1].name",
                          "datasets[0].classes", "description"}
    assert len(paths) == len(set(paths))  # each problem once
    assert str(ei.value).startswith(f"{f}: 7 problems")


def test_duplicate_and_wildcard_models():
    bad = copy.deepcopy(MINI)
    bad["model"] = {"encoders": ["resnet18", "tu-resnet*", "resnet18", "tu-resnet?8"], "decoders": ["unet", "UNet"]}
    errs, _ = errors_of(bad)
    assert set(errs) == {"model.encoders[1]", "model.encoders[2]", "model.encoders[3]", "model.decoders[1]"}
    assert "wildcard" in errs["model.encoders[1]"]["message"] and "listed twice" in errs["model.encoders[2]"]["message"]
    assert "also decoders[0]" in errs["model.decoders[1]"]["message"]


@pytest.mark.parametrize("name", ["con", "NUL.x", "lpt1", "data.", "a/b", "-x", "x y", "é"])
def test_names_are_filesystem_safe(name):
    bad = copy.deepcopy(MINI); bad["datasets"][0]["name"] = name
    assert "datasets[0].name" in errors_of(bad)[0]
    bad = copy.deepcopy(MINI); bad["name"] = name
    assert "name" in errors_of(bad)[0]


def test_job_id_must_fit_a_file_name():
    d = copy.deepcopy(MINI); d["model"] = {"encoders": ["resnet18"], "decoders": ["unet"]}
    # id = name + "__resnet18__unet__s0" (20 bytes): 235 fits 255 exactly, 236 does not
    d["datasets"][0]["name"] = "a" * 235
    (job,) = compile_profile(parse_profile(d))
    assert len(job.id.encode()) == 255
    d["datasets"][0]["name"] = "a" * 236
    errs, _ = errors_of(d)
    assert "256 bytes" in errs["datasets[0].name"]["message"]
    d["datasets"][0]["name"] = "a" * 241
    assert "longer than 240" in errors_of(d)[1]


def test_new_options_defaults_and_validation():
    p = parse_profile(MINI)
    assert p.training.deterministic is False and p.task.boundary_tolerance_rule == "pixels"
    assert p.datasets[0].normalization.nonfinite == "error" and p.datasets[0].layout.gap == 0 and p.datasets[0].layout.group is None
    q = apply_overrides(p, ["training.deterministic=true", "task.boundary_tolerance_rule=diagonal",
                            "datasets.pores.normalization.nonfinite=fill"])
    assert q.training.deterministic and q.task.boundary_tolerance_rule == "diagonal"
    assert q.datasets[0].normalization.nonfinite == "fill"
    for o, path in [("task.boundary_tolerance_rule=csurka", "task.boundary_tolerance_rule"),
                    ("datasets.pores.normalization.nonfinite=zero", "datasets[0].normalization.nonfinite"),
                    ("datasets.pores.layout.group=spot", "datasets[0].layout.group"),  # group needs a flat layout
                    ("datasets.pores.layout.gap=2", "datasets[0].layout.gap"),  # gap needs a volume layout
                    ("datasets.pores.layout.gap=-1", "datasets[0].layout.gap")]:
        with pytest.raises(ProfileError) as ei:
            apply_overrides(p, [o])
        assert [e["path"] for e in ei.value.errors] == [path], o
    flat = apply_overrides(p, ["datasets.pores.layout.kind=flat", r"datasets.pores.layout.group=spot(\d+)_"])
    assert flat.datasets[0].layout.group == r"spot(\d+)_"


@pytest.mark.parametrize("raw", ["inf", "-inf", "Infinity", "NaN", "nan", " +INF "])
def test_nonfinite_overrides_name_the_field(raw):
    with pytest.raises(ProfileError) as ei:
        apply_overrides(parse_profile(MINI), [f"training.lr={raw}"])
    (e,) = ei.value.errors
    assert e["path"] == "training.lr" and "not a finite number" in e["message"]


def test_assignment_still_checks_cross_field_rules():
    p = parse_profile(MINI)
    p.training.max_epochs = 3
    with pytest.raises(Exception, match="smaller than crop_size"):
        p.training.tile_overlap = 999


def test_job_ids_are_stable_unique_and_fs_safe():
    p = apply_overrides(parse_profile(MINI), ["training.seeds=[0,1]", 'model.encoders=["resnet18","tu-resnet18"]'])
    ids = [j.id for j in compile_profile(p)]
    assert len(set(ids)) == len(ids) == 2 * 3 * 2
    assert ids[0] == "pores__resnet18__unet__s0"
    assert all("/" not in i and " " not in i for i in ids)
    assert ids == [j.id for j in compile_profile(p)]


def test_profile_to_dict_keeps_only_what_was_set():
    assert profile_to_dict(parse_profile(MINI)) == MINI


# --- the command line -------------------------------------------------------------------------

def test_cli_validate_ok_and_summary(nasa):
    r = run_matseg("validate", REPO / "profiles/super1.json")
    assert r.returncode == 0, r.stderr
    assert "jobs     18" in r.stdout and "OK" in r.stdout


def test_cli_validate_bad_profile_exit_2(tmp_path):
    bad = copy.deepcopy(MINI); bad["datasets"][0]["modality"] = "TEM"
    f = tmp_path / "bad.json"; f.write_text(json.dumps(bad))
    r = run_matseg("validate", f)
    assert r.returncode == 2
    assert "datasets[0].modality" in r.stderr and "TEM" in r.stderr and "Traceback" not in r.stderr


def test_cli_validate_missing_path_is_named(tmp_path):
    p = copy.deepcopy(MINI); p["datasets"][0]["root"] = "no/such/folder"
    f = tmp_path / "p.json"; f.write_text(json.dumps(p))
    r = run_matseg("validate", f)
    assert r.returncode == 2 and str(tmp_path / "no/such/folder") in r.stderr and "relative to the profile" in r.stderr


def test_cli_validate_invalid_json_points_at_line(tmp_path):
    f = tmp_path / "p.json"; f.write_text('{"name": "x",\n "task": }')
    r = run_matseg("validate", f)
    assert r.returncode == 2 and "p.json:2:" in r.stderr and "not valid JSON" in r.stderr


def test_cli_validate_missing_file():
    r = run_matseg("validate", "nope.json")
    assert r.returncode == 2 and "nope.json" in r.stderr and "does not exist" in r.stderr


def test_cli_jobs_json(tmp_path):
    f = tmp_path / "p.json"; f.write_text(json.dumps(MINI))
    r = run_matseg("jobs", f, "--json", "--set", "training.seeds=[0,1]")
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)
    assert len(jobs) == 2 * 3 * 2 and jobs[0]["id"] == "pores__resnet50__unet__s0"


def test_cli_help_and_unknown_command():
    r = run_matseg("--help")
    assert r.returncode == 0 and "validate" in r.stdout and "bench" in r.stdout
    r = run_matseg("frobnicate")
    assert r.returncode == 2 and "valid commands" in r.stderr


# ---------------------------------------------------------------- COCO encoding and ignore_index
def coco_profile(**ds):
    d = copy.deepcopy(MINI)
    d["datasets"][0].update({"layout": {"kind": "flat"}, "mask_encoding": {"kind": "coco", "annotations": "a.json"}, **ds})
    return d


def test_coco_encoding_parses_with_defaults():
    enc = parse_profile(coco_profile()).datasets[0].mask_encoding
    assert (enc.kind, enc.images, enc.categories, enc.crowd, enc.unannotated, enc.overlap) == \
        ("coco", ".", None, "ignore", "background", "smallest")
    p = parse_profile(coco_profile(ignore_index=255, mask_encoding={
        "kind": "coco", "annotations": {"tr.json": {"train": 0.75, "val": 0.25}, "te.json": "test"}}))
    assert p.datasets[0].ignore_index == 255 and p.datasets[0].mask_encoding.annotations["te.json"] == "test"


def test_coco_and_ignore_errors_name_path_and_fix():
    errs, text = errors_of(coco_profile(layout={"kind": "split_folders"}, ignore_index=1, mask_encoding={
        "kind": "coco", "annotations": {"a.json": {"train": 0.5, "val": 0.6}}, "overlap": "ignore",
        "categories": {"melt pool": "melt"}}))
    assert "set layout.kind to 'flat'" in errs["datasets[0].layout.kind"]["message"]
    assert "ignore_index 1 is the index of class 'pore'" in errs["datasets[0].ignore_index"]["message"]
    assert "must be positive and sum to 1" in errs["datasets[0].mask_encoding.annotations"]["message"]
    assert "'melt pool' -> 'melt'; classes are ['solid', 'pore']" in errs["datasets[0].mask_encoding.categories"]["message"]
    errs, _ = errors_of(coco_profile(mask_encoding={"kind": "coco", "annotations": "a.json", "unannotated": "ignore"}))
    assert '"ignore_index": 255' in errs["datasets[0].ignore_index"]["message"]
    d = copy.deepcopy(MINI); d["datasets"][0]["mask_encoding"] = {"kind": "binary", "ignore_value": 7}
    errs, _ = errors_of(d)
    assert "binary ignore_value makes unlabelled pixels" in errs["datasets[0].ignore_index"]["message"]
    d["datasets"][0]["ignore_index"] = 255
    assert parse_profile(d).datasets[0].mask_encoding.ignore_value == 7


def test_check_paths_names_missing_coco_file(tmp_path):
    from matseg.profile import check_paths
    p = parse_profile(coco_profile(), base_dir=tmp_path)
    (e,) = check_paths(p)
    assert e["path"] == "datasets[0].mask_encoding.annotations" and "a.json does not exist" in e["message"]
