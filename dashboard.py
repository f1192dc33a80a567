"""Live visdom dashboard that never slows or stops training.

The training loop only records (`scalars`, `image`): cheap, in memory, no network. A daemon thread
mirrors that record to the visdom server. Each line window remembers how many points the server has;
after any failure (server down, restarted, slow) everything is marked unsent and the next successful
pass redraws whole windows, so a dashboard that comes back fills again with the full curves.
"""
import logging
import sys
import threading
import time

import numpy as np

try:
    import visdom
except ImportError:  # the dashboard is optional; main.py says so when asked for one
    visdom = None

POST_TIMEOUT_S = 5.0
RETRY_S = 2.0


class _Line:
    def __init__(self, title, names):
        self.title, self.names = title, list(names)
        self.x, self.y = [], []  # y rows follow names; NaN where a series had no value
        self.sent = 0

    def add(self, step, values):
        self.x.append(step)
        self.y.append([values.get(n, np.nan) for n in self.names])


class Dashboard:
    """One visdom env per run. `server` like 'http://localhost', `env` usually the run's version."""

    def __init__(self, server, port, env, lines):
        """`lines`: {window: (title, [series names])}, e.g. {'loss': ('losses', ['d_loss', 'g_loss'])}."""
        self.server, self.port, self.env = server, port, env
        self.lines = {win: _Line(title, names) for win, (title, names) in lines.items()}
        self.images = {}  # win -> [tensor (B, 3, H, W) in [0, 1], caption, sent]
        self.connected = None  # None until the first attempt
        self._client = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="visdom-dashboard", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by the training loop
    def scalars(self, win, step, values):
        with self._lock:
            self.lines[win].add(step, values)
        self._wake.set()

    def image(self, win, images, caption=""):
        with self._lock:
            self.images[win] = [images.detach().float().cpu(), caption, False]
        self._wake.set()

    def wait_connected(self, timeout):
        """Block until the first connection attempt is decided; True when a server answered."""
        end = time.time() + timeout
        while self.connected is None and time.time() < end:
            time.sleep(0.05)
        return bool(self.connected)

    def close(self, flush_timeout=10.0):
        """Push what is still unsent (when a server answers) and stop the thread."""
        end = time.time() + flush_timeout
        while self.connected and self._pending() and time.time() < end:
            self._wake.set()
            time.sleep(0.05)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=1.0)

    # ------------------------------------------------------------------ the sync thread
    def _pending(self):
        with self._lock:
            return (any(l.sent < len(l.x) for l in self.lines.values())
                    or any(not im[2] for im in self.images.values()))

    def _run(self):
        warned = False
        while not self._stop:
            try:
                if self._client is None:
                    self._client = _Client(server=self.server, port=self.port, env=self.env,
                                           raise_exceptions=True, use_incoming_socket=False)
                self._sync()
                self.connected = True
                warned = False
                self._wake.wait(timeout=1.0)
                self._wake.clear()
            except Exception as e:  # any failure: redraw everything once the server is back
                if not warned:  # once per outage, on one line
                    print(f"visdom: no dashboard at {self.server}:{self.port} ({type(e).__name__}); "
                          f"training goes on, metrics.jsonl has every value, and the dashboard "
                          f"fills when a server answers there", file=sys.stderr, flush=True)
                    warned = True
                self.connected = False
                self._client = None
                with self._lock:
                    for line in self.lines.values():
                        line.sent = 0
                    for im in self.images.values():
                        im[2] = False
                self._wake.wait(timeout=RETRY_S)
                self._wake.clear()

    def _sync(self):
        for win, line in self.lines.items():
            with self._lock:
                start, end = line.sent, len(line.x)
                x = np.asarray(line.x[start:end], dtype=np.float64)
                y = np.asarray(line.y[start:end], dtype=np.float64)
            if end == start:
                continue
            X = np.repeat(x[:, None], len(line.names), axis=1)  # (T, series)
            self._client.line(Y=y, X=X, win=win, update="append" if start else None,
                              opts=dict(title=line.title, legend=line.names, xlabel="step"))
            line.sent = end
        for win, im in list(self.images.items()):
            if im[2]:
                continue
            images, caption = im[0], im[1]
            self._client.images(images.numpy(), nrow=int(len(images) ** 0.5) or 1, win=win,
                                opts=dict(title=win, caption=caption))
            im[2] = True


if visdom is not None:
    logging.getLogger("visdom").setLevel(logging.ERROR)  # it logs every new HTTP session

    class _Client(visdom.Visdom):
        """visdom's client posts with no timeout: a hung server would hang the sync thread forever."""

        def _handle_post(self, url, data=None):
            r = self.session.post(url, data=data or {}, timeout=POST_TIMEOUT_S)
            r.raise_for_status()
            return r.text
else:
    _Client = None
