#!/usr/bin/env python
"""Build matseg's documentation as a static, offline site (Quarto / `nbdev_docs` need the network).

    python scripts/build_docs.py [--no-execute] [--out site/] [--nbs nbs/] [--timeout 600]
    python scripts/build_docs.py --record tutorials/ood_quality_control.ipynb   # full run, kept in docs/executed/

* one HTML page per notebook of `nbs/` and its sub-folders (nbconvert, lab template), in `nbs/sidebar.yml`
  order (notebooks it does not list follow by path). By default each notebook is executed in its own
  folder first, like `nbdev_test` (in memory: the source files are not changed) — cells flagged `#| slow`, `#| gpu`, `#| browser` (settings.ini `tst_flags`)
  or `#| eval: false` are skipped, as `nbdev_test` does — so tutorials show their figures;
  `--no-execute` converts the committed notebooks as they are (no outputs).
* plotly figures work offline: they are rendered from their JSON with one local copy of
  `plotly.min.js` (copied from the plotly package into the site). Interactive widgets need a kernel
  and are replaced by a note.
* one API page per module of the library with the signature, docstring and documented parameters
  (nbdev docments) of every exported function and class;
* notebooks recorded with `--record` (every cell run by papermill, `#| slow` ones included, kept in
  `docs/executed/` with the hash of the source they ran) are shown as recorded instead of executed,
  as long as the notebook has not changed since; a stale recording is ignored (and said so);
* `index.html` with the navigation. Exit status 1 when a notebook failed to execute (its page is
  still written, with the error at the top and outputs up to the failing cell).
"""
from __future__ import annotations

import argparse
import configparser
import copy
import html
import importlib
import inspect
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLAG = re.compile(r"^\s*#\s*\|\s*(\S+)(.*)$")


def settings(repo: Path = REPO) -> dict:
    "The [DEFAULT] section of settings.ini."
    cp = configparser.ConfigParser(delimiters=["="], interpolation=None)
    cp.read(repo / "settings.ini")
    return dict(cp["DEFAULT"])


def _rel(p: Path, nbs: Path) -> str: return p.relative_to(nbs).as_posix()


def _kernel_env():
    "Kernels started from here emit plotly figures as JSON (rendered offline by the site) and use a headless matplotlib."
    os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")
    os.environ.setdefault("MPLBACKEND", "Agg")


def notebook_order(nbs: Path) -> list[Path]:
    "Notebooks of `nbs` and its sub-folders (tutorials/) in sidebar.yml order, then any others by path ('_'/'.' names skipped)."
    found = {_rel(p, nbs): p for p in sorted(nbs.rglob("*.ipynb"))
             if not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts)}
    listed: list[str] = []
    sb = nbs / "sidebar.yml"
    if sb.is_file():
        import yaml

        def walk(items):
            for it in items or []:
                if isinstance(it, str): listed.append(Path(it).as_posix())
                elif isinstance(it, dict): walk(it.get("contents") or ([it["href"]] if "href" in it else []))
        walk(((yaml.safe_load(sb.read_text()) or {}).get("website", {}).get("sidebar", {}) or {}).get("contents"))
    order = [found[n] for n in dict.fromkeys(listed) if n in found]
    return order + [p for n, p in found.items() if p not in order]


def page_name(p: Path, nbs: Path) -> str:
    "Flat HTML file name of a notebook: `tutorials/ood.ipynb` -> `tutorials-ood.html`."
    return _rel(p, nbs).removesuffix(".ipynb").replace("/", "-") + ".html"


def source_hash(nb: nbformat.NotebookNode) -> str:
    "sha256 of a notebook's cell types and sources (outputs and metadata ignored): what a recording was made from."
    import hashlib
    return hashlib.sha256(json.dumps([(c.cell_type, c.source) for c in nb.cells]).encode()).hexdigest()


def recording_path(p: Path, nbs: Path, recorded: Path) -> Path:
    "Where the full (slow cells included) execution of notebook `p` is kept."
    return recorded / (_rel(p, nbs).replace("/", "-"))


def record(p: Path, nbs: Path = REPO / "nbs", recorded: Path = REPO / "docs" / "executed", timeout: int = 7200, log=print) -> Path:
    "Execute every cell of notebook `p` (slow ones too) with papermill in its own folder; keep it, with its source hash, in `recorded`."
    import platform
    import papermill as pm
    from matseg.core import atomic_write_text
    p = Path(p).resolve(); nbs = Path(nbs).resolve()
    _kernel_env()
    src_hash, t0 = source_hash(nbformat.read(p, as_version=4)), time.time()  # the source as it was run
    nb = pm.execute_notebook(str(p), None, cwd=str(p.parent), kernel_name="python3", progress_bar=False,
                             execution_timeout=timeout, log_output=False)  # None: returned, not written
    nb.metadata.pop("widgets", None)
    nb.metadata["matseg"] = {"source": _rel(p, nbs), "source_sha256": src_hash,
                             "seconds": round(time.time() - t0, 1), "recorded": time.strftime("%Y-%m-%d %H:%M"),
                             "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                             "command": f"python scripts/build_docs.py --record {_rel(p, nbs)}"}
    dest = atomic_write_text(recording_path(p, nbs, Path(recorded)), nbformat.writes(nb))
    log(f"recorded {_rel(p, nbs)} -> {dest} ({nb.metadata['matseg']['seconds']}s)")
    return dest


def load_recording(p: Path, nbs: Path, recorded: Path | None):
    "(recorded run of `p`, None) if one was made from the current source; else (None, a note when it is stale)."
    r = recording_path(p, nbs, recorded) if recorded is not None else None
    if r is None or not r.is_file(): return None, None
    nb = nbformat.read(r, as_version=4)
    if nb.metadata.get("matseg", {}).get("source_sha256") != source_hash(nbformat.read(p, as_version=4)):
        return None, f"stale recording {r.name} (the notebook changed since; rerun --record)"
    return nb, None


def _cell_flags(source: str) -> list[tuple[str, str]]:
    return [(m.group(1).rstrip(":"), m.group(2).strip()) for line in source.splitlines()
            if (m := _FLAG.match(line))]


def skip_cell(cell, flags: set[str]) -> bool:
    "Whether nbdev_test would skip this code cell (a test flag, or `#| eval: false`)."
    if cell.cell_type != "code": return False
    for k, v in _cell_flags(cell.source):
        if k in flags: return True
        if k == "eval" and v.lower().startswith("false"): return True
    return False


def execute_notebook(path: Path, workdir: Path, flags: set[str], timeout: int = 600) -> tuple[nbformat.NotebookNode, str | None]:
    "Execute a notebook in `workdir`, flagged cells skipped (kept, without outputs); return it and the error (None when it ran)."
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.read(path, as_version=4)
    keep = [i for i, c in enumerate(nb.cells) if not skip_cell(c, flags)]
    run = copy.deepcopy(nb); run.cells = [run.cells[i] for i in keep]
    client = NotebookClient(run, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    err = None
    try: client.execute()
    except CellExecutionError as e: err = str(e)
    except Exception as e: err = f"{type(e).__name__}: {e}"  # kernel died, timeout ...
    for i, c in zip(keep, run.cells): nb.cells[i] = c
    nb.metadata.update({k: v for k, v in run.metadata.items() if k != "widgets"})
    return nb, err


class _Anno:
    "An annotation shown as written (with `from __future__ import annotations` they are strings)."
    def __init__(self, s): self.s = s
    def __repr__(self): return self.s


_WIDGET = "application/vnd.jupyter.widget-view+json"
_PLOTLY = "application/vnd.plotly.v1+json"


def static_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    "Turn plotly JSON outputs into offline `Plotly.newPlot` snippets and widget outputs into a note."
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)  # no widget manager from a CDN: widgets are replaced by a note
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data")
            if not data: continue
            if _PLOTLY in data:
                fig = data[_PLOTLY]; n += 1
                div = f"matseg-plot-{n}"
                js = json.dumps(fig.get("data", [])), json.dumps(fig.get("layout", {})), json.dumps(fig.get("config", {"responsive": True}))
                out["data"] = {"text/html": f'<div id="{div}" class="matseg-plotly"></div>\n<script>Plotly.newPlot("{div}", '
                                            f"{js[0]}, {js[1]}, {js[2]});</script>"}
            elif _WIDGET in data:
                out["data"] = {"text/html": '<div class="matseg-widget-note"><i>Interactive widget: open this notebook in '
                                            "Jupyter to use it.</i></div>"}
    return nb


_CSS = """
body.matseg-site { margin: 0; }
nav.matseg-nav { position: fixed; top: 0; left: 0; bottom: 0; width: 220px; overflow-y: auto; padding: 12px;
  background: #f5f6f8; border-right: 1px solid #ddd; font: 14px/1.5 system-ui, sans-serif; z-index: 10; }
nav.matseg-nav a { display: block; color: #1f5fa8; text-decoration: none; padding: 1px 0; }
nav.matseg-nav a.current { font-weight: bold; color: #000; }
nav.matseg-nav h3 { margin: 10px 0 4px; font-size: 13px; text-transform: uppercase; color: #555; }
main.matseg-main { margin-left: 250px; padding: 16px 24px; max-width: 1100px; }
.matseg-api h3 code { font-size: 1.05em; } .matseg-api pre { background: #f7f7f7; padding: 6px; overflow-x: auto; }
.matseg-api table { border-collapse: collapse; } .matseg-api td, .matseg-api th { border: 1px solid #ddd; padding: 2px 6px; }
.matseg-exec-error { border: 1px solid #c22; background: #fee; padding: 6px; white-space: pre-wrap; }
.matseg-recorded { border-left: 3px solid #2a7; background: #efe; padding: 4px 8px; font-size: 90%; }
"""


def nav_html(site: dict, current: str) -> str:
    "The navigation sidebar: notebooks, then API pages."
    def link(href, title): return f'<a href="{href}"{" class=current" if href == current else ""}>{html.escape(title)}</a>'
    parts = [f'<nav class="matseg-nav"><a href="index.html"><b>{html.escape(site["title"])}</b></a><h3>Notebooks</h3>']
    parts += [link(p["href"], p["title"]) for p in site["pages"]]
    parts += ["<h3>API</h3>"] + [link(p["href"], p["title"]) for p in site["api"]]
    return "".join(parts) + "</nav>"


def wrap_page(body_html: str, site: dict, current: str) -> str:
    "Put the navigation around an nbconvert page (or a bare body)."
    nav = nav_html(site, current)
    head = '<script src="plotly.min.js"></script><link rel="stylesheet" href="matseg-site.css">'
    if "<body" in body_html:
        # require.js would make plotly.min.js register as an AMD module instead of `window.Plotly`
        body_html = re.sub(r'<script[^>]*src="[^"]*require(\.min)?\.js"[^>]*>\s*</script>', "", body_html)
        body_html = body_html.replace("</head>", head + "</head>", 1)
        body_html = re.sub(r"<body([^>]*)>", lambda m: f'<body{m.group(1)}>{nav}<main class="matseg-main">', body_html, count=1)
        body_html = body_html.replace("<body", '<body data-matseg-site="1"', 1)
        return body_html.replace("</body>", "</main></body>", 1)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(site["title"])}</title>{head}</head>'
            f'<body class="matseg-site">{nav}<main class="matseg-main">{body_html}</main></body></html>')


def notebook_title(nb: nbformat.NotebookNode, default: str) -> str:
    "The first markdown '# heading' of a notebook."
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m: return m.group(1).strip()
    return default


def notebook_html(nb: nbformat.NotebookNode, title: str) -> str:
    "nbconvert HTML (lab template) of a notebook; code cells stay, directives included."
    from nbconvert import HTMLExporter
    exp = HTMLExporter(template_name="lab")
    exp.exclude_input_prompt = exp.exclude_output_prompt = True
    body, _ = exp.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return body


def _default_exp(nb: nbformat.NotebookNode) -> str | None:
    for c in nb.cells:
        if c.cell_type == "code":
            for k, v in _cell_flags(c.source):
                if k == "default_exp": return v.split()[0]
    return None


def _param_table(obj) -> str:
    try:
        from fastcore.docments import docments
        d = docments(obj, full=True)
    except Exception:
        return ""
    rows = []
    for name, info in d.items():
        if name in ("self", "cls"): continue
        anno, default, doc = info.get("anno"), info.get("default"), info.get("docment")
        a = "" if anno is inspect._empty else (anno if isinstance(anno, str) else getattr(anno, "__name__", str(anno)))
        dv = "" if default is inspect._empty else repr(default)
        rows.append(f"<tr><td><code>{html.escape(name)}</code></td><td><code>{html.escape(str(a))}</code></td>"
                    f"<td><code>{html.escape(dv)}</code></td><td>{html.escape(doc or '')}</td></tr>")
    if not rows: return ""
    return "<table><tr><th>parameter</th><th>type</th><th>default</th><th>meaning</th></tr>" + "".join(rows) + "</table>"


def _signature(obj, name: str) -> str:
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return name
    fix = lambda a: _Anno(a) if isinstance(a, str) else a  # noqa: E731
    sig = sig.replace(parameters=[p.replace(annotation=fix(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=fix(sig.return_annotation))
    return f"{name}{sig}"


def api_html(module_name: str) -> tuple[str, list[str]]:
    "HTML documenting every exported name of a module; also the list of documented names."
    mod = importlib.import_module(module_name)
    names = list(getattr(mod, "__all__", [n for n in vars(mod) if not n.startswith("_")]))
    doc = inspect.getdoc(mod) or ""
    parts = [f"<div class='matseg-api'><h1>{html.escape(module_name)}</h1><p>{html.escape(doc)}</p>"]
    for n in names:
        obj = getattr(mod, n, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            parts.append(f"<h3 id='{n}'><code>{html.escape(n)}</code></h3><pre>{html.escape(repr(obj)[:300])}</pre>")
            continue
        kind = "class" if inspect.isclass(obj) else "def"
        parts.append(f"<h3 id='{n}'><code>{kind} {html.escape(_signature(obj, n))}</code></h3>"
                     f"<p>{html.escape(inspect.getdoc(obj) or '')}</p>{_param_table(obj)}")
        if inspect.isclass(obj):
            for mn, m in vars(obj).items():
                if mn.startswith("_") or not (inspect.isfunction(m) or isinstance(m, property)): continue
                if isinstance(m, property):
                    parts.append(f"<h4><code>{n}.{mn}</code> (property)</h4><p>{html.escape(inspect.getdoc(m) or '')}</p>")
                else:
                    parts.append(f"<h4><code>{n}.{html.escape(_signature(m, mn))}</code></h4>"
                                 f"<p>{html.escape(inspect.getdoc(m) or '')}</p>{_param_table(m)}")
    return "".join(parts) + "</div>", names


def build(out: Path, nbs: Path = REPO / "nbs", execute: bool = True, timeout: int = 600, log=print,
          recorded: Path | None = REPO / "docs" / "executed") -> dict:
    "Build the site into `out`; return a summary {pages, api, failed, recorded}."
    _kernel_env()
    cfg = settings(nbs.parent)
    lib = cfg.get("lib_name", "matseg")
    flags = set(cfg.get("tst_flags", "").split())
    out.mkdir(parents=True, exist_ok=True)
    import plotly
    js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    shutil.copyfile(js, out / "plotly.min.js")
    (out / "matseg-site.css").write_text(_CSS)
    if str(nbs.parent) not in sys.path: sys.path.insert(0, str(nbs.parent))
    order = notebook_order(nbs)
    nbooks, failed, used = [], {}, []
    for p in order:
        t0 = time.time()
        rel = _rel(p, nbs)
        nb, stale = load_recording(p, nbs, recorded)
        if nb is not None:
            m = nb.metadata["matseg"]
            used.append(rel); how = f"recorded {m.get('recorded', '')}"
            nb.cells.insert(1, nbformat.v4.new_markdown_cell(
                f"<div class='matseg-recorded'>Outputs of a full run (slow cells included) recorded "
                f"{html.escape(m.get('recorded', '?'))} on {html.escape(m.get('machine', '?'))} in {m.get('seconds', '?')} s.</div>"))
        elif execute:  # in the notebook's own folder, like nbdev_test: relative paths (../../profiles) resolve
            nb, err = execute_notebook(p, p.parent, flags, timeout)
            how = "executed" + (f"; {stale}" if stale else "")
            if err:
                failed[rel] = err
                nb.cells.insert(0, nbformat.v4.new_markdown_cell(
                    f"<div class='matseg-exec-error'>This notebook failed to execute while building the docs:\n\n"
                    f"{html.escape(_ANSI.sub('', err)[-3000:])}</div>"))
        else:
            nb, how = nbformat.read(p, as_version=4), "read"
        title = notebook_title(nb, p.stem)
        nbooks.append(dict(src=p, nb=nb, title=f"{p.stem.split('_')[0]} · {title}" if p.stem[:2].isdigit() else title,
                           href=page_name(p, nbs), module=_default_exp(nb)))
        log(f"{how} {rel} ({time.time() - t0:.1f}s)" + (" FAILED" if rel in failed else ""))
    mods = sorted({n["module"] for n in nbooks if n["module"]}
                  | {f.stem for f in (nbs.parent / lib).glob("*.py") if not f.stem.startswith("_")})
    site = dict(title=cfg.get("title", lib), pages=nbooks,
                api=[dict(title=f"{lib}.{m}", href=f"api_{m}.html", module=f"{lib}.{m}") for m in mods])
    for n in nbooks:
        body = notebook_html(static_outputs(n["nb"]), n["title"])
        (out / n["href"]).write_text(wrap_page(body, site, n["href"]), encoding="utf-8")
    for a in site["api"]:
        try: body, a["names"] = api_html(a["module"])
        except Exception as e:
            body, a["names"] = f"<h1>{a['module']}</h1><p class='matseg-exec-error'>import failed: {html.escape(repr(e))}</p>", []
            failed[a["href"]] = repr(e)
        (out / a["href"]).write_text(wrap_page(body, site, a["href"]), encoding="utf-8")
    items = "".join(f"<li><a href='{n['href']}'>{html.escape(n['title'])}</a>"
                    + (f" — API: <a href='api_{n['module']}.html'>{lib}.{n['module']}</a>" if n["module"] else "") + "</li>"
                    for n in nbooks)
    index = (f"<h1>{html.escape(site['title'])}</h1><p>{html.escape(cfg.get('description', ''))}</p>"
             f"<h2>Notebooks</h2><ol>{items}</ol><h2>API</h2><ul>"
             + "".join(f"<li><a href='{a['href']}'>{a['title']}</a></li>" for a in site["api"]) + "</ul>"
             + f"<p><small>built {time.strftime('%Y-%m-%d %H:%M')} {'with' if execute else 'without'} executing the notebooks</small></p>")
    (out / "index.html").write_text(wrap_page(index, site, "index.html"), encoding="utf-8")
    log(f"site: {out / 'index.html'} ({len(nbooks)} notebooks, {len(site['api'])} API pages"
        + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else "") + ")")
    return dict(pages=[n["href"] for n in nbooks], api=[a["href"] for a in site["api"]], failed=failed, recorded=used)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build_docs.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "site"), help="output folder (default: site/)")
    ap.add_argument("--nbs", default=str(REPO / "nbs"), help="notebook folder (default: nbs/)")
    ex = ap.add_mutually_exclusive_group()
    ex.add_argument("--execute", dest="execute", action="store_true", default=True,
                    help="execute the fast cells of every notebook first (default)")
    ex.add_argument("--no-execute", dest="execute", action="store_false", help="convert the notebooks as committed")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell when executing")
    ap.add_argument("--recorded", default=str(REPO / "docs" / "executed"),
                    help="folder of full recorded runs used instead of executing, when made from the current source")
    ap.add_argument("--record", nargs="+", metavar="NOTEBOOK",
                    help="instead of building: run these notebooks (paths relative to --nbs) completely, slow cells "
                         "included, with papermill, and keep them in --recorded for the site")
    a = ap.parse_args(argv)
    if a.record:
        for rel in a.record: record(Path(a.nbs) / rel, Path(a.nbs), Path(a.recorded), timeout=max(a.timeout, 7200))
        return 0
    res = build(Path(a.out), Path(a.nbs), a.execute, a.timeout, recorded=Path(a.recorded))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
