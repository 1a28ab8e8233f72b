"""README's "Uncertainty maps of the shipped sample": its two commands, read from README.md and run at a tiny size."""
import json
import re
import shlex

import xarray as xr
from conftest import REPO, run_matseg

SECTION = "## Uncertainty maps of the shipped sample"
TINY = {"bench": ["--set", "training.max_epochs=1", "--set", "training.crops_per_image=1"],  # later --set wins
        "uncertainty": ["--samples", "3"]}  # argparse: the last --samples wins


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def _blocks(section: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", section, re.S)


def _commands(section: str) -> list[list[str]]:
    "The matseg commands of the section's bash block, continuation lines joined."
    lines = _blocks(section)[0].replace("\\\n", " ").splitlines()
    return [shlex.split(ln) for ln in lines if ln.strip().startswith(".venv/bin/matseg")]


def test_readme_uncertainty_example(tmp_path):
    section = _readme_section()
    cmds = _commands(section)
    assert [c[1] for c in cmds] == ["bench", "uncertainty"], cmds
    out = tmp_path / "u"
    procs = []
    for cmd in cmds:
        args = [str(out) + a[len("runs/u"):] if a.startswith("runs/u") else a for a in cmd[1:]]
        p = run_matseg(*args, *TINY[args[0]], cwd=REPO, timeout=1200)
        assert p.returncode == 0, f"{' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        procs.append(p)
    # the files the README lists are exactly the files written
    listing = _blocks(section)[1].splitlines()
    assert listing[0].strip() == "runs/u/maps/"
    listed = {ln.split()[0] for ln in listing[1:] if ln.strip()}
    maps = out / "maps"
    assert {p.name for p in maps.iterdir()} == listed
    # the variables and dims the README names
    nc = next(n for n in listed if n.endswith(".nc"))
    ds = xr.load_dataset(maps / nc, engine="h5netcdf")
    classes = ["gamma_matrix", "secondary_gamma_prime", "tertiary_gamma_prime"]
    want = {"prediction", "entropy", "mutual_information"} | {f"{k}_{c}" for k in ("mean_prob", "variance") for c in classes}
    assert set(ds.data_vars) == want and dict(ds.sizes) == {"y": 512, "x": 512} and "512 × 512" in section
    for name in ("prediction", "mean_prob_<class>", "entropy", "mutual_information", "variance_<class>", *classes):
        assert f"`{name}`" in section, name
    assert ds.attrs["method"] == "mc" and ds.attrs["samples"] == 3
    assert float(ds["mutual_information"].max()) > 0 and bool((ds["mutual_information"] <= ds["entropy"] + 1e-5).all())
    # the printed line has the README's form
    stem = nc[:-3]
    line = next(ln for ln in procs[1].stdout.splitlines() if ln.startswith("matseg/assets/sample/super1/test/"))
    assert re.fullmatch(rf".*/{stem}\.png: .*/maps/{stem}\.nc \(mean_entropy [0-9.]+, mean_mutual_information [0-9.]+\)", line), line
    summary = json.loads((maps / "uncertainty.json").read_text())
    assert summary["method"] == "mc" and summary["samples"] == 3
