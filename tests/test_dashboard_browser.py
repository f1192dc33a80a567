"""End to end: offline visdom server + a short real training run + the dashboard in headless Chromium.

Chromium is Debian's `chromium` package driven by `playwright` (tools/dashboard_screenshot.py opens
the page and reads its panes; the same helpers take the README's screenshot).
"""
import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE, one_thread_env
from tools.dashboard_screenshot import CHROMIUM, chromium_page, screenshot_env, wait_for_panes

LOSSES = ["d_loss_real", "d_loss_fake", "d_loss", "g_loss"]

@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run does "
                    "this when run as root)")
    pytest.importorskip("visdom", reason="visdom is not installed")
    pytest.importorskip("playwright", reason="playwright is not installed (requirements.txt)")


@pytest.fixture(scope="module")
def server(chromium, visdom_port):
    return visdom_port


def test_training_run_shows_on_the_dashboard_in_chromium(server, tmp_path):
    port, version, total = server, "browser_e2e", 12
    run = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *SMOKE, "--n_samples", "16", "--total_step", str(total),
         "--log_step", "2", "--sample_step", "5", "--visdom", "--visdom_port", str(port),
         "--visdom_server", "http://127.0.0.1", "--version", version, "--model_save_path",
         str(tmp_path / "models"), "--sample_path", str(tmp_path / "samples")],
        cwd=tmp_path, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"env '{version}'" in run.stdout  # it did reach the server
    records = [json.loads(l) for l in (tmp_path / "models" / version / "metrics.jsonl").open()]
    steps = [r["step"] for r in records]
    assert steps == list(range(2, total + 1, 2))

    # the server holds the run (visdom's own API)
    import visdom
    vis = visdom.Visdom(server="http://127.0.0.1", port=port, env=version,
                        raise_exceptions=True, use_incoming_socket=False)
    windows = json.loads(vis.get_window_data(env=version))
    assert {w: windows[w]["type"] for w in ("loss", "gamma", "samples", "attention")} == dict(
        loss="plot", gamma="plot", samples="image", attention="image")
    # refreshed at every sample step: the panes hold the last one (the final step)
    assert windows["attention"]["content"]["caption"].startswith(f"step {total}, first fixed z")
    assert windows["samples"]["content"]["caption"] == f"fixed z, EMA G, step {total}"  # EMA on by default

    # the page shows it (the browser's DOM)
    with chromium_page() as (page, urls):
        page.goto(f"http://127.0.0.1:{port}/env/{version}")
        panes = wait_for_panes(page, lambda p: len(p) == 4 and all(
            (x["traces"] and x["svg_paths"]) or x["image"] for x in p))
        page.wait_for_timeout(1000)  # let Plotly finish its first transition
        shot = page.screenshot(full_page=True)
    (tmp_path / "dashboard.png").write_bytes(shot)
    print(f"screenshot: {tmp_path / 'dashboard.png'}")

    by_title = {p["title"]: p for p in panes}
    assert set(by_title) == {f"{version}: losses", f"{version}: attention gamma", "samples",
                             "attention"}, list(by_title)
    loss = {t["name"]: t for t in by_title[f"{version}: losses"]["traces"]}
    assert sorted(loss) == sorted(LOSSES)
    for name in LOSSES:  # every logged point of every loss, at its step
        assert loss[name]["x"] == steps, name
        assert loss[name]["y"] == pytest.approx([r[name] for r in records], rel=1e-6), name
    assert by_title[f"{version}: losses"]["svg_paths"] == len(LOSSES)  # drawn, not just held
    gamma = {t["name"]: t for t in by_title[f"{version}: attention gamma"]["traces"]}
    assert sorted(gamma) == ["gamma/D4", "gamma/D8", "gamma/G16", "gamma/G8"]
    assert gamma["gamma/G16"]["y"] == pytest.approx([r["gamma/G16"] for r in records], rel=1e-6)
    # samples: 16 images of 32px in a 4x4 grid, visdom pads each by 2px on every side
    assert by_title["samples"]["image"] == [4 * 36, 4 * 36]
    # attention: a 112px tile per query (4) for the sample and G's 2 layers, 2px gaps, the labels
    # above and left, visdom's padding
    from dashboard import PANEL_HEAD, PANEL_SIDE
    assert by_title["attention"]["image"] == [PANEL_SIDE + 4 * 114 - 2 + 4, PANEL_HEAD + 3 * 114 - 2 + 4]

    # offline: everything the page asked for came from the local server
    assert urls and all(u.startswith((f"http://127.0.0.1:{port}/", "data:", f"ws://127.0.0.1:{port}/"))
                        for u in urls), [u for u in urls if "127.0.0.1" not in u]

    from PIL import Image
    img = Image.open(io.BytesIO(shot))
    assert img.size[0] == 1400 and img.size[1] >= 900
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 1000  # plots and pictures, not a blank page

    # the README's screenshot command, on the same env
    screenshot_env(port, version, tmp_path / "readme.png", width=1340, height=820)
    with Image.open(tmp_path / "readme.png") as img:
        assert img.format == "PNG" and img.size[0] == 1340 and img.size[1] >= 820

