"""The offline visdom server: real subprocess on a free loopback port, no CDN."""
import json
import os
import signal
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest

import visdom_server
from conftest import ROOT, free_port

pytest.importorskip("visdom", reason="visdom is not installed")


@pytest.fixture(scope="module")
def static_installed():
    if visdom_server.missing_static():
        if not visdom_server.npm_available():
            pytest.skip("visdom static files not installed and npm not found; "
                        "run `python visdom_server.py --install_static` where npm is available")
        visdom_server.install_static(quiet=True)
    assert visdom_server.missing_static() == []


@pytest.fixture(scope="module")
def server(static_installed, tmp_path_factory):
    port = free_port()
    proc = visdom_server.start_server(port, env_path=tmp_path_factory.mktemp("visdom_env"))
    try:
        url = visdom_server.wait_until_up(port, timeout=20, proc=proc)
        yield url, port
    finally:
        visdom_server.stop_server(proc)


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


class _Assets(HTMLParser):
    """Collects <script src> and <link rel=stylesheet href>; comments are skipped."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("rel") == "stylesheet":
            self.urls.append(a["href"])


def test_page_and_every_script_and_stylesheet_served_locally(server):
    url, port = server
    status, body = _get(url)
    assert status == 200 and b"<title>visdom</title>" in body
    parser = _Assets()
    parser.feed(body.decode())
    assert len(parser.urls) >= 15, parser.urls  # index.html of visdom 0.2.4 has 18
    for ref in parser.urls:
        full = urljoin(url, ref)  # also resolves /static/../user/style.css
        assert urlparse(full).netloc == f"127.0.0.1:{port}", f"{ref} points off the server"
        status, data = _get(full)
        assert status == 200, ref
        # /user/style.css is visdom's per-user override sheet and legitimately empty.
        assert data or urlparse(full).path == "/user/style.css", f"{ref} is empty"


def test_stock_download_step_finds_everything(static_installed, monkeypatch):
    # If a name or the version marker were wrong, build.py would try the CDN again.
    import urllib.request as ur

    import requests
    from visdom.server.build import download_scripts

    def no_network(*args, **kwargs):
        raise AssertionError(f"download_scripts tried the network: {args[1:]}")

    monkeypatch.setattr(ur.OpenerDirector, "open", no_network)
    monkeypatch.setattr(requests, "get", no_network)
    download_scripts()


def test_line_plot_round_trip(server):
    import visdom

    _, port = server
    vis = visdom.Visdom(server="http://127.0.0.1", port=port, env="test_env",
                        raise_exceptions=True, use_incoming_socket=False)
    assert vis.check_connection()
    win = vis.line(X=[0, 1, 2, 3], Y=[1.0, 0.5, 0.25, 0.125], opts=dict(title="loss"))
    data = json.loads(vis.get_window_data(win, "test_env"))
    trace = data["content"]["data"][0]
    assert trace["x"] == [0, 1, 2, 3]
    assert trace["y"] == [1.0, 0.5, 0.25, 0.125]
    assert data["title"] == "loss"


def test_background_server_starts_once_and_outlives_the_command(static_installed, tmp_path):
    port = free_port()
    cmd = [sys.executable, "visdom_server.py", "--background", "--port", str(port), "--hostname", "127.0.0.1",
           "--env_path", str(tmp_path / "env")]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"dashboard: started at http://127.0.0.1:{port} (pid " in first.stdout, first.stdout
    pid = int(first.stdout.split("(pid ")[1].split(",")[0])
    try:
        assert visdom_server.answering(port)  # the command returned, the server runs on
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)


# ----------------------------------------------------------------------------- a run's panels kept

LINES = {"loss": ("r: losses", ["d_loss", "g_loss"])}


def _windows(port, env):
    import visdom
    vis = visdom.Visdom(server="http://127.0.0.1", port=port, env=env, raise_exceptions=True,
                        use_incoming_socket=False)
    return json.loads(vis.get_window_data(env=env))


def test_run_address_opens_its_env():
    from dashboard import address
    assert address("http://localhost", 8097, "quick") == "http://localhost:8097/env/quick"
    assert address("http://127.0.0.1/", 9000, "a b") == "http://127.0.0.1:9000/env/a%20b"


def test_panels_come_back_after_a_server_restart(static_installed, tmp_path):
    """The dashboard asks the server to save the run's env (visdom's env files under --env_path):
    a server started again on the same folder shows the same curves and image."""
    import torch
    from dashboard import Dashboard

    env_path, port = tmp_path / "envs", free_port()
    proc = visdom_server.start_server(port, env_path=env_path)
    try:
        visdom_server.wait_until_up(port, timeout=20, proc=proc)
        dash = Dashboard("http://127.0.0.1", port, "r", LINES)
        for step in (1, 2, 3):
            dash.scalars("loss", step, {"d_loss": step / 10, "g_loss": -step})
        dash.image("samples", torch.rand(4, 3, 8, 8), caption="fixed z, step 3")
        assert dash.wait_connected(10) and dash.close(flush_timeout=20)
        assert (env_path / "r.json").is_file()
    finally:
        visdom_server.stop_server(proc)
    assert not visdom_server.answering(port)

    port = free_port()  # a new server process, only the folder in common
    proc = visdom_server.start_server(port, env_path=env_path)
    try:
        visdom_server.wait_until_up(port, timeout=20, proc=proc)
        windows = _windows(port, "r")
    finally:
        visdom_server.stop_server(proc)
    assert set(windows) == {"loss", "samples"}
    traces = {t["name"]: t for t in windows["loss"]["content"]["data"]}
    assert traces["d_loss"]["x"] == [1, 2, 3] and traces["g_loss"]["y"] == [-1, -2, -3]
    assert windows["samples"]["content"]["caption"] == "fixed z, step 3"


def test_a_long_run_is_saved_while_it_trains(static_installed, monkeypatch, tmp_path):
    """Saved every SAVE_EVERY_S while the run goes on, not only at its end (a crash, a kill -9)."""
    import time

    import dashboard
    monkeypatch.setattr(dashboard, "SAVE_EVERY_S", 0.0)
    port, saved = free_port(), tmp_path / "envs" / "live.json"
    proc = visdom_server.start_server(port, env_path=tmp_path / "envs")
    try:
        visdom_server.wait_until_up(port, timeout=20, proc=proc)
        dash = dashboard.Dashboard("http://127.0.0.1", port, "live", LINES)
        dash.scalars("loss", 1, {"d_loss": 1.0, "g_loss": 2.0})
        assert dash.wait_connected(10)
        deadline = time.monotonic() + 20
        while not saved.is_file() and time.monotonic() < deadline:  # no close(): the run goes on
            time.sleep(0.1)
        assert saved.is_file() and "loss" in json.loads(saved.read_text())["jsons"]
        dash.close()
    finally:
        visdom_server.stop_server(proc)
