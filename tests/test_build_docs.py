"""The offline docs site: every notebook and module gets a page with its headings and signatures."""
import importlib.util
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_docs", REPO / "scripts" / "build_docs.py")
build_docs = importlib.util.module_from_spec(spec); spec.loader.exec_module(build_docs)


def _nb(cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "Build the real nbs/ without executing (fast), into a temporary folder."
    out = tmp_path_factory.mktemp("site")
    res = build_docs.build(out, REPO / "nbs", execute=False, log=lambda *a: None)
    return out, res


def test_every_notebook_and_module_has_a_page(site):
    out, res = site
    nbs = build_docs.notebook_order(REPO / "nbs")
    assert {"tutorials-benchmark_real_data.html", "tutorials-ood_quality_control.html", "tutorials-bring_your_own_data.html",
            "tutorials-counterfactual_explanations.html", "index.html", "00_profile.html"} <= set(res["pages"])
    for p in nbs:
        html = (out / build_docs.page_name(p, REPO / "nbs")).read_text()
        title = build_docs.notebook_title(nbformat.read(p, as_version=4), p.stem)
        assert re.sub(r"[^\w ]", "", title) in re.sub(r"<[^>]+>|[^\w <>]", "", html), (p.name, title)
        assert 'src="plotly.min.js"' in html and "matseg-nav" in html and "require.min.js" not in html
    mods = [p.stem for p in (REPO / "matseg").glob("*.py") if not p.stem.startswith("_")]
    assert {f"api_{m}.html" for m in mods} <= set(res["api"])
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    index = (out / "index.html").read_text()
    for p in nbs: assert build_docs.page_name(p, REPO / "nbs") in index
    assert not res["failed"], res["failed"]


def test_api_pages_show_signatures_and_parameter_docs(site):
    out, _ = site
    core = (out / "api_core.html").read_text()
    assert "def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2)" in core.replace("&#x27;", "'")
    assert "JSON-serialisable object" in core  # the inline parameter comment (docments)
    assert "class MatsegError" in core
    w = (out / "api_widgets.html").read_text()
    for name in ("ProfileBuilder", "TrainLauncher", "OODViewer", "CounterfactualExplorer", "selection_to_region",
                 "threshold_readouts", "builder_state_to_profile_dict", "validate_dict"):
        assert f"id='{name}'" in w, name
    assert "ProfileBuilder.save(" in w


def test_sidebar_order_and_config_files():
    import yaml
    order = [p.relative_to(REPO / "nbs").as_posix() for p in build_docs.notebook_order(REPO / "nbs")]
    side = yaml.safe_load((REPO / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    listed = [c for c in side if isinstance(c, str)] + [c for d in side if isinstance(d, dict) for c in d["contents"]]
    assert order == listed  # every notebook is in the sidebar, in its order (numbered modules, then tutorials)
    mods = [o for o in order if o[:2].isdigit()]
    assert order[0] == "index.ipynb" and order[1:1 + len(mods)] == sorted(mods) and "05a_runs.ipynb" in mods
    assert order[-1].startswith("tutorials/")
    q = yaml.safe_load((REPO / "nbs" / "_quarto.yml").read_text())
    for f in q["metadata-files"]: assert (REPO / "nbs" / f).is_file(), f
    ny = yaml.safe_load((REPO / "nbs" / "nbdev.yml").read_text())
    cfg = build_docs.settings(REPO)
    assert ny["website"]["title"] == cfg["title"] and ny["website"]["repo-url"] == cfg["git_url"]
    assert ny["project"]["output-dir"] == cfg["doc_path"]


def test_execute_skips_flagged_cells_and_renders_plotly(tmp_path):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    shutil.copy(REPO / "settings.ini", tmp_path / "settings.ini")
    nbformat.write(_nb(["md:# Plots\n\n> a tutorial", "import plotly.graph_objects as go\ngo.Figure(go.Bar(y=[1, 2, 3])).show()",
                        "#| slow\nraise SystemExit('slow cells must be skipped')", "#| eval: false\n1 / 0",
                        "import ipywidgets\nipywidgets.IntSlider()", "print('made it')"]), nbs / "00_plots.ipynb")
    nbformat.write(_nb(["md:# Broken", "1 / 0"]), nbs / "01_broken.ipynb")
    (nbs / "sidebar.yml").write_text("website:\n  sidebar:\n    contents:\n      - 01_broken.ipynb\n      - 00_plots.ipynb\n")
    out = tmp_path / "site"
    res = build_docs.build(out, nbs, execute=True, timeout=120, log=lambda *a: None)
    assert res["pages"] == ["01_broken.html", "00_plots.html"] and list(res["failed"]) == ["01_broken.ipynb"]
    html = (out / "00_plots.html").read_text()
    start = html.index('Plotly.newPlot("matseg-plot-1", ') + len('Plotly.newPlot("matseg-plot-1", ')
    data, _ = json.JSONDecoder().raw_decode(html[start:])
    assert data[0]["type"] == "bar" and data[0]["y"] == [1, 2, 3]
    assert "made it" in html and "slow cells must be skipped" in html  # source shown, never executed
    assert "Traceback" not in html and "ZeroDivisionError" not in html and "matseg-widget-note" in html
    assert "ZeroDivisionError" in (out / "01_broken.html").read_text()
    assert not (nbs / "00_plots.html").exists() and not list(nbs.glob("*.ipynb.*"))


def test_cli_no_execute(tmp_path):
    (tmp_path / "nbs").mkdir(); shutil.copy(REPO / "settings.ini", tmp_path / "settings.ini")
    nbformat.write(_nb(["md:# Only\n\ntext", "1 / 0"]), tmp_path / "nbs" / "00_only.ipynb")
    assert build_docs.main(["--no-execute", "--nbs", str(tmp_path / "nbs"), "--out", str(tmp_path / "s")]) == 0
    assert "00_only.html" in (tmp_path / "s" / "index.html").read_text() and "ZeroDivisionError" not in (tmp_path / "s" / "00_only.html").read_text()
    assert build_docs.main(["--nbs", str(tmp_path / "nbs"), "--out", str(tmp_path / "s2")]) == 1  # executes by default: fails


def test_recorded_full_run_is_shown_until_the_notebook_changes(tmp_path):
    "--record runs slow cells too (papermill) and the site shows that run; after an edit the recording is stale."
    nbs = tmp_path / "nbs"; (nbs / "tutorials").mkdir(parents=True)
    shutil.copy(REPO / "settings.ini", tmp_path / "settings.ini")
    nb = _nb(["md:# Slow study\n\n> long", "x = 6 * 7", "#| slow\nprint(f'slow result {x}')"])
    path = nbs / "tutorials" / "study.ipynb"; nbformat.write(nb, path)
    rec = tmp_path / "executed"
    assert build_docs.main(["--nbs", str(nbs), "--recorded", str(rec), "--record", "tutorials/study.ipynb"]) == 0
    kept = rec / "tutorials-study.ipynb"
    meta = nbformat.read(kept, as_version=4).metadata["matseg"]
    assert meta["source"] == "tutorials/study.ipynb" and meta["source_sha256"] == build_docs.source_hash(nb)
    assert [f.name for f in rec.iterdir()] == ["tutorials-study.ipynb"] and nbformat.read(path, as_version=4).cells[2].outputs == []  # source untouched
    res = build_docs.build(tmp_path / "site", nbs, execute=True, log=lambda *a: None, recorded=rec)
    assert res["recorded"] == ["tutorials/study.ipynb"] and res["pages"] == ["tutorials-study.html"]
    html = (tmp_path / "site" / "tutorials-study.html").read_text()
    assert "slow result 42" in html and "matseg-recorded" in html
    nb.cells[1].source = "x = 7 * 7"; nbformat.write(nb, path)  # edited: the recording no longer describes it
    logs = []
    res = build_docs.build(tmp_path / "site2", nbs, execute=True, log=logs.append, recorded=rec)
    assert res["recorded"] == [] and any("stale recording" in m for m in logs)
    html = (tmp_path / "site2" / "tutorials-study.html").read_text()
    assert "slow result 4" not in html and "matseg-recorded" not in html  # executed now: the slow cell is skipped
