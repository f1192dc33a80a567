"""The attention notebook as a newcomer opens it: real JupyterLab (`jupyter lab`, as `make notebook`
starts it), driven in headless Chromium through playwright. Run > Run All Cells on a checkpoint made
by main.py, then: no cell ends in an error, a click in the explorer page's iframe picks a new query,
the film's image is shown at its own size (not stretched to the notebook's width), the iframe is as
tall as its page (no inner scroll bar).

The notebook runs from a copy in a temporary folder (JupyterLab autosaves: the committed notebook
stays without outputs), with every Jupyter folder (config, data, runtime, settings, workspaces) there
too, so neither the user's settings nor a saved workspace change what is tested.
"""
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, one_thread_env
from tools.dashboard_screenshot import CHROMIUM

JUPYTER = Path(sys.executable).parent / "jupyter"
NOTEBOOK = "visualize_attn.ipynb"
RUN_S = 600  # Run All on a loaded 2-core machine: the table and the film load every checkpoint


@pytest.fixture(scope="module")
def lab(checkpoint, tmp_path_factory):
    """(url of the notebook in JupyterLab, folder it runs in, the server's log), torn down after."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    pytest.importorskip("playwright", reason="playwright is not installed (requirements.txt)")
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (make setup)")
    if not JUPYTER.exists():
        pytest.skip(f"{JUPYTER} not found (make setup)")
    tmp = tmp_path_factory.mktemp("jupyterlab")
    work = tmp / "work"
    work.mkdir()
    shutil.copy(ROOT / NOTEBOOK, work / NOTEBOOK)
    settings = tmp / "settings"
    # every cell in the page at once (JupyterLab 4 may leave off-screen cells out of the DOM), and
    # no news pop-up over the notebook
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false"}}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = one_thread_env(
        SAGAN_CHECKPOINT=checkpoint, PYTHONPATH=str(ROOT),  # the kernel imports the repository's modules
        JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    # what `make notebook` does first: outputs the notebook makes in the page are trusted anyway,
    # the server's "Notebook ... is not trusted" warning is what this silences
    subprocess.run([str(JUPYTER), "trust", str(work / NOTEBOOK)], env=env, check=True,
                   capture_output=True, timeout=120)
    port, token = free_port(), secrets.token_hex(16)
    log_path = tmp / "lab.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(JUPYTER), "lab", "--no-browser", "--allow-root", "--ip", "127.0.0.1", "--port", str(port),
             f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}",
             "--ServerApp.port_retries=0"],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}", work, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PROMPTS_JS = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
  .map(p => p.textContent.trim())"""


def run_all(page, timeout=RUN_S):
    """Run > Run All Cells, through the menu bar, then wait until every code cell has run."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    deadline, prompts = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        prompts = page.evaluate(PROMPTS_JS)
        if prompts and all(p.startswith("[") and p[1:-2].isdigit() for p in prompts):
            return prompts
        page.wait_for_timeout(1000)
    raise AssertionError(f"Run All did not finish in {timeout} s; prompts: {prompts}")


def output_of(page, marker):
    """The output area of the code cell whose source contains `marker`."""
    cell = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text=marker))
    assert cell.count() == 1, f"{cell.count()} cells contain {marker!r}"
    return cell.locator(".jp-OutputArea")


def test_run_all_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, work, log_path = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport=dict(width=1400, height=1000), device_scale_factor=1)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-CodeCell")
            # the kernel started and connected (a Run All clicked before that runs nothing)
            page.wait_for_function("() => (document.getElementById('jp-main-statusbar') || {innerText: ''})"
                                   ".innerText.includes('(ipykernel) | Idle')", timeout=180_000)
            prompts = run_all(page)
            code_cells = sum(c["cell_type"] == "code" for c in json.loads((ROOT / NOTEBOOK).read_text())["cells"])
            assert len(prompts) == code_cells, prompts

            # no cell ended in an error: what the page shows, and what it saves
            tracebacks = page.locator(".jp-OutputArea-output", has_text="Traceback")
            assert tracebacks.count() == 0, tracebacks.first.inner_text()[-3000:]
            page.get_by_role("menuitem", name="File", exact=True).click()
            page.locator(".lm-Menu-item[data-command='docmanager:save']").click()
            page.wait_for_timeout(2000)
            saved = json.loads((work / NOTEBOOK).read_text())
            errors = [o for c in saved["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
            assert not errors, "\n".join(e["ename"] + ": " + e["evalue"] for e in errors)

            # the explorer page: a click on the face picks the query there
            frame_el = output_of(page, "notebook_page(").locator("iframe")
            frame_el.scroll_into_view_if_needed()
            frame = frame_el.element_handle().content_frame()
            frame.wait_for_selector("body[data-ready='1']")
            view = frame.locator(".view").first
            view.scroll_into_view_if_needed()
            before = frame.locator("#query").inner_text()
            box = view.bounding_box()
            page.mouse.click(box["x"] + 0.25 * box["width"], box["y"] + 0.7 * box["height"])
            page.wait_for_timeout(500)
            after = frame.locator("#query").inner_text()
            assert after != before and "locked" in after, (before, after)

            # the iframe is as tall as its page: nothing cut off behind an inner scroll bar
            inner = frame.evaluate("() => document.documentElement.scrollHeight")
            outer = frame_el.evaluate("e => e.clientHeight")
            layout = []  # how the outputs are drawn: both are checked, then reported together
            if inner > outer + 1:
                layout.append(f"the explorer page is {inner} px tall in an iframe of {outer} px (inner scroll)")

            # the film's frame at its own size, not stretched to the notebook's width
            img = output_of(page, "Film(").locator("img").first
            img.scroll_into_view_if_needed()
            shown = img.evaluate("e => [e.getBoundingClientRect().width, 0, e.getBoundingClientRect().height]")
            natural = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            assert natural[0] > 0, "the film's image did not load"
            if shown[0] > natural[0] + 1:
                layout.append(f"the film's {natural[0]}x{natural[1]} PNG is stretched to "
                              f"{shown[0]:.0f}x{shown[2]:.0f}")
        finally:
            browser.close()
    assert "is not trusted" not in log_path.read_text()  # `make notebook` trusts it first, as here
    assert not layout, "; ".join(layout)
