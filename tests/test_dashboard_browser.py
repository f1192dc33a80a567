"""End to end: offline visdom server + a short real training run + the dashboard in headless Chromium.

The browser is driven over the Chrome DevTools protocol (websocket-client comes with visdom), so the
only system dependency is Debian's `chromium` package. Also a small tool that screenshots any env:

    python tests/test_dashboard_browser.py --port 8097 --env quick --out assets/dashboard.png
"""
import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import visdom_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0"]
LOSSES = ["d_loss_real", "d_loss_fake", "d_loss", "g_loss"]


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, width=1400, height=900, timeout=60.0):
        import websocket  # a visdom dependency

        self.profile = tempfile.mkdtemp(prefix="chromium_profile_")
        # its own process group: Chromium's helper processes end with it
        self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            port = self._devtools_port(timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            # no Origin header: Chromium refuses DevTools websockets from unlisted origins
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                                  suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self.events, self._id = [], 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Network.enable")

    def _devtools_port(self, timeout):
        path = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{CHROMIUM} exited with {self.proc.returncode} at start")
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"{CHROMIUM} opened no DevTools port in {timeout}s")

    def call(self, method, **params):
        self._id += 1
        self.ws.send(json.dumps(dict(id=self._id, method=method, params=params)))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)  # e.g. Network.requestWillBeSent

    def evaluate(self, js):
        res = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def requested_urls(self):
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self):
        """The whole page as PNG bytes."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png",
                                          captureBeyondViewport=True)["data"])

    def close(self):
        if getattr(self, "ws", None):
            self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# What the page shows, read from the live DOM: every pane's title, each Plotly plot's traces (the
# graph div keeps the data it draws), each image pane's decoded image size.
PANES_JS = """JSON.stringify([...document.querySelectorAll('.react-grid-item')].map(item => {
  const bar = item.querySelector('.bar .pull-right:last-child') || item.querySelector('.bar');
  const plot = item.querySelector('.js-plotly-plot');
  const img = item.querySelector('.content img');
  return {title: bar ? bar.innerText.trim() : '',
          traces: plot && plot.data ? plot.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)})) : null,
          svg_paths: plot ? plot.querySelectorAll('.scatterlayer path.js-line').length : 0,
          image: img && img.complete ? [img.naturalWidth, img.naturalHeight] : null};
}))"""


def wait_for_panes(browser, ready, timeout=60.0):
    """Poll the page until `ready(panes)`; returns the panes, or fails showing the last state."""
    deadline, panes = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        panes = json.loads(browser.evaluate(PANES_JS))
        if ready(panes):
            return panes
        time.sleep(0.5)
    raise AssertionError(f"the dashboard did not render in {timeout}s; panes: "
                         f"{json.dumps(panes)[:2000]}")


def screenshot_env(port, env, out, host="127.0.0.1", n_panes=4, width=1400, height=900):
    """Open env `env` of the visdom server at host:port, wait for `n_panes` panes, save a PNG."""
    browser = Chromium(width, height)
    try:
        browser.call("Page.navigate", url=f"http://{host}:{port}/env/{env}")
        wait_for_panes(browser, lambda p: len(p) >= n_panes
                       and all(x["traces"] is not None or x["image"] for x in p))
        time.sleep(1.0)  # let Plotly finish its first transition
        Path(out).write_bytes(browser.screenshot())
    finally:
        browser.close()


# ----------------------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run does "
                    "this when run as root)")
    pytest.importorskip("visdom", reason="visdom is not installed")
    pytest.importorskip("websocket", reason="websocket-client (a visdom dependency) is not installed")


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    if visdom_server.missing_static():
        if not visdom_server.npm_available():
            pytest.skip("visdom static files not installed and npm not found; "
                        "run `python visdom_server.py --install_static` where npm is available")
        visdom_server.install_static(quiet=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = visdom_server.start_server(port, env_path=tmp_path_factory.mktemp("visdom_env"))
    try:
        visdom_server.wait_until_up(port, timeout=30, proc=proc)
        yield port
    finally:
        visdom_server.stop_server(proc)


def test_training_run_shows_on_the_dashboard_in_chromium(server, tmp_path):
    port, version, total = server, "browser_e2e", 12
    # one thread: the CI box has 2 cores and torch's spinning threads only fight over them
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--dataset", "synthetic", "--imsize", "32",
         "--g_conv_dim", "8", "--d_conv_dim", "8", "--batch_size", "4", "--synthetic_size", "64",
         "--num_workers", "0", "--n_samples", "16", "--total_step", str(total), "--log_step", "2",
         "--sample_step", "5", "--visdom_port", str(port), "--visdom_server", "http://127.0.0.1",
         "--version", version, "--model_save_path", str(tmp_path / "models"),
         "--sample_path", str(tmp_path / "samples")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
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
    browser = Chromium()
    try:
        browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/env/{version}")
        panes = wait_for_panes(browser, lambda p: len(p) == 4 and all(
            (x["traces"] and x["svg_paths"]) or x["image"] for x in p))
        time.sleep(1.0)
        shot = browser.screenshot()
        urls = browser.requested_urls()
    finally:
        browser.close()
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Screenshot a visdom env in headless Chromium.")
    p.add_argument("--port", type=int, default=visdom_server.DEFAULT_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--env", required=True, help="the run's --version")
    p.add_argument("--out", default="dashboard.png")
    p.add_argument("--panes", type=int, default=4, help="wait until this many panes have rendered")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)
    screenshot_env(args.port, args.env, args.out, args.host, args.panes, args.width, args.height)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
