"""Real-browser test: JupyterLab + Debian's chromium driven by Playwright (never `playwright install`).

Runs by default when /usr/bin/chromium, playwright and jupyterlab are present (`bash scripts/browser_setup.sh`
installs them); otherwise it is skipped with the reason. Screenshots go to test-artifacts/.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "browser" / "widgets_demo.ipynb"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser


def _missing() -> str | None:
    if not Path(CHROMIUM).exists(): return f"{CHROMIUM} not found: run `bash scripts/browser_setup.sh` (apt chromium chromium-driver)"
    for mod in ("playwright", "jupyterlab"):
        try: __import__(mod)
        except ImportError: return f"python package {mod!r} missing: run `bash scripts/browser_setup.sh`"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A token-less JupyterLab on 127.0.0.1 serving a temporary copy of the demo notebook; stopped by its PID."
    why = _missing()
    if why: pytest.skip(why)
    root, cfg = tmp_path_factory.mktemp("lab"), tmp_path_factory.mktemp("lab-config")
    shutil.copy(DEMO, root / DEMO.name)
    settings = cfg / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = _free_port()
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(cfg / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(cfg / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(cfg / "runtime"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONWARNINGS": "ignore"}
    log = open(cfg / "jupyterlab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.open_browser=False",
                             "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
                             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             *(["--allow-root"] if os.geteuid() == 0 else [])],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2).read(); break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 90:
                    raise RuntimeError(f"JupyterLab did not start (exit {proc.poll()}): {(cfg / 'jupyterlab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, root
    finally:
        proc.terminate()
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill(); proc.wait(10)
        log.close()


def _button(page, text: str):
    "An ipywidgets button by its label (not JupyterLab's own toolbar buttons)."
    return page.locator("button.jupyter-button", has_text=text).first


def _text(page, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def test_widgets_in_jupyterlab(lab):
    from playwright.sync_api import TimeoutError as PWTimeout
    from playwright.sync_api import sync_playwright
    url, root = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = None
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            console = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(f"{url}/lab/tree/{DEMO.name}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
            accept = page.locator(".jp-Dialog .jp-mod-accept")  # "Select Kernel" dialog of some Lab versions
            try: accept.wait_for(timeout=15_000); accept.click()
            except PWTimeout: pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=False).first.click()
            # all three widgets render (the explorer's plotly figure is the last output)
            _button(page, "Compute heatmap").wait_for()
            page.wait_for_selector(".matseg-readout")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3")
            page.screenshot(path=str(ARTIFACTS / "browser-1-rendered.png"), full_page=True)

            # 1. OOD viewer: move the threshold slider with the keyboard; the readout text changes
            before = _text(page, ".matseg-readout")
            handle = page.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle").first
            handle.click()
            for _ in range(60): page.keyboard.press("ArrowRight")
            page.wait_for_function("(b) => document.querySelector('.matseg-readout').innerText !== b", arg=before)
            after = _text(page, ".matseg-readout")
            assert after != before and "threshold" in after and "AUROC" in after

            # 2. training launcher: one tiny epoch; a plotly trace appears and the status says done
            n_traces = page.locator(".js-plotly-plot .scatterlayer .trace").count()
            _button(page, "Start").click()
            page.get_by_text("done: 1 job(s)").wait_for(timeout=170_000)
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length > {n_traces}")
            page.screenshot(path=str(ARTIFACTS / "browser-2-trained.png"), full_page=True)

            # 3. counterfactual explorer: drag a box on the image (plotly selection -> region A) ...
            plot = page.locator(".js-plotly-plot").last
            plot.scroll_into_view_if_needed()
            drag = plot.locator(".nsewdrag").first.bounding_box()
            x0, y0 = drag["x"] + drag["width"] * 0.3, drag["y"] + drag["height"] * 0.3
            page.mouse.move(x0, y0); page.mouse.down()
            page.mouse.move(x0 + drag["width"] * 0.2, y0 + drag["height"] * 0.2, steps=8); page.mouse.up()
            drawn = True
            try: page.locator(".matseg-region", has_text="drawn selection").wait_for(timeout=15_000)
            except Exception: drawn = False
            if not drawn:  # ... or, if the selection event did not reach the kernel, set a box region with the sliders
                _button(page, "Use box").click()
                page.locator(".matseg-region").wait_for()
            _button(page, "Compute heatmap").click()
            page.wait_for_selector(".matseg-heatmap-done")
            status = _text(page, ".matseg-heatmap-done")
            assert "perturbations" in status and "max influence" in status
            page.wait_for_function("() => { const p = [...document.querySelectorAll('.js-plotly-plot')].pop();"
                                   " return p && p.data && p.data[2].visible === true; }")
            page.screenshot(path=str(ARTIFACTS / "browser-3-heatmap.png"), full_page=True)
            assert drawn, "a box drawn on the plotly figure did not set region A (the slider box was used instead)"
        except Exception:
            if page is None: raise
            (ARTIFACTS / "browser-console.log").write_text("\n".join(console))
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
