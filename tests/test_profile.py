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
SHIPPED = [REPO / "profiles/super1.json", REPO / "profiles/ebc2.json", asset_path("profiles", "sample.json")]


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
    assert "datasets[0]" in errs
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
