"""Screenshot a run's dashboard: open a visdom env in headless Chromium, wait until its panes have
rendered, save the whole page as a PNG (how assets/dashboard.png is made).

    python -m tools.dashboard_screenshot --port 8097 --env quick --out assets/dashboard.png

Chromium is Debian's `chromium` package, driven by the `playwright` package; playwright's own browser
download is never needed. tests/test_dashboard_browser.py reads the page through the same helpers.
"""
import os
import shutil
import time
from contextlib import contextmanager

from cli import Parser, UserError, run
from visdom_server import DEFAULT_PORT

PROG = "tools.dashboard_screenshot"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# What the page shows, read from the live DOM: every pane's title, each Plotly plot's traces (the
# graph div keeps the data it draws), each image pane's decoded image size.
PANES_JS = """() => [...document.querySelectorAll('.react-grid-item')].map(item => {
  const bar = item.querySelector('.bar .pull-right:last-child') || item.querySelector('.bar');
  const plot = item.querySelector('.js-plotly-plot');
  const img = item.querySelector('.content img');
  return {title: bar ? bar.innerText.trim() : '',
          traces: plot && plot.data ? plot.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)})) : null,
          svg_paths: plot ? plot.querySelectorAll('.scatterlayer path.js-line').length : 0,
          image: img && img.complete ? [img.naturalWidth, img.naturalHeight] : null};
})"""


@contextmanager
def chromium_page(width=1400, height=900):
    """(page, urls): a playwright page in headless Chromium; `urls` collects every URL the page
    requests, websockets included."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # no GPU, no QUIC probes, /tmp instead of a small /dev/shm (containers)
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--disable-gpu", "--disable-quic", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport=dict(width=width, height=height), device_scale_factor=1)
            urls = []
            page.on("request", lambda request: urls.append(request.url))
            page.on("websocket", lambda ws: urls.append(ws.url))
            yield page, urls
        finally:
            browser.close()


def wait_for_panes(page, ready, timeout=60.0):
    """Read the panes (PANES_JS) until `ready(panes)`; returns them, or raises TimeoutError
    showing the last state."""
    deadline, panes = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        panes = page.evaluate(PANES_JS)
        if ready(panes):
            return panes
        page.wait_for_timeout(500)
    raise TimeoutError(f"the dashboard did not render in {timeout}s; panes: {str(panes)[:2000]}")


def screenshot_env(port, env, out, host="127.0.0.1", n_panes=4, width=1400, height=900):
    """Open env `env` of the visdom server at host:port, wait for `n_panes` panes, save a PNG."""
    from playwright.sync_api import Error as PlaywrightError

    url = f"http://{host}:{port}/env/{env}"
    with chromium_page(width, height) as (page, _):
        try:
            page.goto(url)
        except PlaywrightError as e:
            raise UserError(f"could not open {url} ({e.message.splitlines()[0]}): is the visdom server "
                            f"running there (python visdom_server.py --port {port})?") from None
        try:
            wait_for_panes(page, lambda p: len(p) >= n_panes
                           and all(x["traces"] is not None or x["image"] for x in p))
        except TimeoutError:
            raise UserError(f"{url} did not show {n_panes} rendered panes in 60 s: check --env (the "
                            f"run's --version) and --panes") from None
        page.wait_for_timeout(1000)  # let Plotly finish its first transition
        page.screenshot(path=out, full_page=True)


def main(argv=None):
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--env", required=True, help="the run's --version")
    p.add_argument("--out", default="dashboard.png")
    p.add_argument("--panes", type=int, default=4, help="wait until this many panes have rendered")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        raise UserError("chromium is not installed (Debian: apt-get install -y chromium)")
    screenshot_env(args.port, args.env, args.out, args.host, args.panes, args.width, args.height)
    print(f"saved {args.out}")


if __name__ == "__main__":
    run(PROG, main)
