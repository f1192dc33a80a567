"""Live visdom dashboard that never slows or stops training, and a finished run's replay.

The training loop only records (`scalars`, `image`): cheap, in memory, no network. A daemon thread
mirrors that record to the visdom server. Each line window remembers how many points the server has;
after any failure (server down, restarted, slow) everything is marked unsent and the next successful
pass redraws whole windows, so a dashboard that comes back fills again with the full curves. The
thread also asks the server to save the run's env to its --env_path (visdom's own env files, at most
every SAVE_EVERY_S and once at the end), so a restarted server shows the run again.

Besides the curves and the fixed-z grid, `attention` draws an attention panel at every sample step:
for the first fixed z and the face pixels of attention.FACE_QUERIES, the attention row of every G layer.

A run's own address is <server>:<port>/env/<version> (`address`); the server's front page opens the
empty 'main' env. A finished or older run goes back on the dashboard from its folder:

    python dashboard.py models/quick      # curves (metrics.jsonl), latest samples, attention panel
"""
import functools
import json
import logging
import math
import os
import sys
import threading
import time
from urllib.parse import quote, urlparse

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from attention import face_pixels, map_hw, pixel_queries, run_net
from attention_colors import colorize
from cli import Parser, UserError, run
from utils import denorm

try:
    import visdom
except ImportError:  # the dashboard is optional; main.py says so when asked for one
    visdom = None

POST_TIMEOUT_S = 5.0
RETRY_S = 2.0
# At most one pass per MIN_SYNC_S: each append makes visdom's server deep-copy and diff the whole
# window (O(points)), so a pass per log step costs a CPU core on the server as curves grow.
MIN_SYNC_S = 2.0
# The server rewrites the whole env file (images included) on each save: often enough that a
# restart loses at most this much, rarely enough to cost nothing.
SAVE_EVERY_S = 30.0


def address(server, port, env):
    """The URL that opens one env (a run's panels) directly: visdom serves /env/<name>."""
    return f"{server.rstrip('/')}:{port}/env/{quote(env)}"


def windows(config):
    """The line windows of a run, {window: (title, [series])}, from its config (a dict, as in
    config.json, or the parsed arguments): the losses, each attention layer's gamma and FID if measured."""
    c = config if isinstance(config, dict) else vars(config)
    series = ["d_loss_real", "d_loss_fake", "d_loss", "g_loss"] + (["d_gp"] if c["adv_loss"] == "wgan-gp" else [])
    layers = [f"gamma/G{r}" for r in c["g_attn"]] + [f"gamma/D{r}" for r in c["d_attn"]]
    lines = {"loss": (f"{c['version']}: losses", series)}
    if layers:
        lines["gamma"] = (f"{c['version']}: attention gamma", layers)
    if c.get("fid_every"):  # fid.py's records: {step, fid, kid, fid_n, ...}
        lines["fid"] = (f"{c['version']}: FID (N = {c['fid_samples']})", ["fid"])
    return lines


# ----------------------------------------------------------------------------- attention panel

PANEL_HEAD, PANEL_SIDE = 16, 48  # px above the tiles (query names), left of them (row names)

QUERY_MARK = (255, 0, 255)  # magenta: a colour the attention scale (jet) never takes


@torch.no_grad()
def sample_attention(G, z, points):
    """G(z[:1]) in eval mode, keeping only the attention rows of the image pixels `points` [(x, y)].

    Returns (image (3, S, S) in [0, 1], {layer name: (Q, H, W)}), both on the CPU.
    """
    was_training = G.training
    G.eval()  # BatchNorm running stats, as the sample grid uses
    img, _, rows = run_net(G, z[:1], pixel_queries(G, points))  # rows[name]: (1, Q, H*W)
    G.train(was_training)
    maps = {name: r[0].float().reshape(len(points), *map_hw(name)).cpu() for name, r in rows.items()}
    return denorm(img[0].float()).cpu(), maps


@functools.lru_cache(maxsize=1)
def _font():
    return ImageFont.load_default(size=11)


def render_attention_panel(image, maps, points, names, tile=112):
    """One picture: a column per query pixel; rows = the sample, then each G layer's heatmap.

    image (3, S, S) in [0, 1]; maps {layer name: (Q, H, W)}; points [(x, y)] image pixels; names per
    query. Heatmaps are upsampled without smoothing, so each attention cell stays a visible block,
    and drawn over a faint grey copy of the sample so the features they land on are recognisable.
    The colours are the figures' and the page's (attention_colors: dark blue 0, dark red the map's
    maximum). The query pixel is marked (magenta +) in every tile. Returns uint8 (H, W, 3).
    """
    S = image.shape[-1]
    font, head, side, gap = _font(), PANEL_HEAD, PANEL_SIDE, 2
    sample = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    sample = sample.resize((tile, tile), Image.NEAREST if tile >= S else Image.BILINEAR)
    grey = np.asarray(sample.convert("L"), np.float32)[..., None]  # (tile, tile, 1)
    n_rows = 1 + len(maps)
    panel = Image.new("RGB", (side + (tile + gap) * len(points) - gap,
                              head + (tile + gap) * n_rows - gap), "white")
    draw = ImageDraw.Draw(panel)
    # text is most of the drawing time: labels go once per row and column, no outlined text
    for row, label in enumerate(["sample"] + [f"{name}\n{m.shape[1]}x{m.shape[2]}" for name, m in maps.items()]):
        draw.multiline_text((3, head + row * (tile + gap) + 3), label, fill="black", font=font)
    for q, ((x, y), name) in enumerate(zip(points, names)):
        left = side + q * (tile + gap)
        draw.text((left + 3, 2), f"query: {name}", fill="black", font=font)
        panel.paste(sample, (left, head))
        for row, rows in enumerate(maps.values(), start=1):
            top = head + row * (tile + gap)
            m = rows[q].numpy()
            heat = colorize(m / max(m.max(), 1e-12))  # (H, W, 3), the figures' colour scale
            heat = np.asarray(Image.fromarray(heat).resize((tile, tile), Image.NEAREST), np.float32)
            panel.paste(Image.fromarray((0.75 * heat + 0.25 * grey).round().astype(np.uint8)),
                        (left, top))
            # the peak in units of the uniform weight 1/N: 1.0x means the layer looks everywhere
            draw.rectangle((left, top + tile - 14, left + 62, top + tile - 1), fill="black")
            draw.text((left + 3, top + tile - 14), f"peak {m.max() * m.size:.1f}x", fill="white",
                      font=font)
        for row in range(n_rows):
            cx, cy = left + (x + 0.5) * tile / S, head + row * (tile + gap) + (y + 0.5) * tile / S
            draw.line((cx - 5, cy, cx + 5, cy), fill=QUERY_MARK, width=2)
            draw.line((cx, cy - 5, cx, cy + 5), fill=QUERY_MARK, width=2)
    return np.array(panel)  # writable: torch.from_numpy warns on read-only arrays


# ----------------------------------------------------------------------------- the dashboard

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
        self.url = address(server, port, env)
        self.lines = {win: _Line(title, names) for win, (title, names) in lines.items()}
        self.images = {}  # win -> [tensor (B, 3, H, W) in [0, 1], caption, sent]
        self.connected = None  # None until the first attempt
        self._client = None
        self._unsaved = False  # the server has panels of this env that its env file lacks
        self._saved_at = time.monotonic()
        self._closing = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="visdom-dashboard", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by the training loop
    def scalars(self, win, step, values):
        if win not in self.lines:  # e.g. 'gamma' in a run without attention layers
            return
        with self._lock:
            self.lines[win].add(step, values)
        self._wake.set()

    def image(self, win, images, caption=""):
        with self._lock:
            self.images[win] = [images.detach().float().cpu(), caption, False]
        self._wake.set()

    def attention(self, G, z, step):
        """Show where each G attention layer looks from the face pixels (eyes, centre, mouth) of G(z[:1]).

        Runs on the training thread (G must not change under it): one forward pass of one sample
        that computes only the asked rows, plus drawing; tens of milliseconds, at sample steps.
        """
        if not G.attn_res:
            return
        faces = face_pixels(G.image_size)
        points = list(faces.values())
        image, maps = sample_attention(G, z, points)
        panel = render_attention_panel(image, maps, points, list(faces))
        caption = f"step {step}, first fixed z; peak = max weight x N (1x: uniform)"  # one line
        self.image("attention", torch.from_numpy(panel).permute(2, 0, 1)[None] / 255.0, caption)

    def wait_connected(self, timeout):
        """Block until the first connection attempt is decided; True when a server answered."""
        end = time.time() + timeout
        while self.connected is None and time.time() < end:
            time.sleep(0.05)
        return bool(self.connected)

    def close(self, flush_timeout=10.0):
        """Push what is still unsent and save the env (when a server answers), then stop the thread.
        True when the server has, and has saved, everything."""
        self._closing = True  # the thread saves now instead of waiting for SAVE_EVERY_S
        end = time.time() + flush_timeout
        while self.connected and (self._pending() or self._unsaved) and time.time() < end:
            self._wake.set()
            time.sleep(0.05)
        done = bool(self.connected) and not (self._pending() or self._unsaved)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=1.0)
        return done

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
                self._unsaved |= self._sync()
                if self._unsaved and (self._closing or time.monotonic() - self._saved_at >= SAVE_EVERY_S):
                    self._client.save([self.env])  # the server writes <env_path>/<env>.json
                    self._unsaved, self._saved_at = False, time.monotonic()
                if not self.connected:  # the first connection, or back after an outage
                    print(f"dashboard: {self.url}  (visdom env '{self.env}')", flush=True)
                self.connected = True
                warned = False
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                if not (self._stop or self._closing):
                    time.sleep(MIN_SYNC_S)  # let values pile up: one request carries them all
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
        """Send what the server lacks; True when anything was sent."""
        sent = False
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
            line.sent, sent = end, True
        for win, im in list(self.images.items()):
            if im[2]:
                continue
            images, caption = im[0], im[1]
            B, _, h, w = images.shape
            ncol = int(B ** 0.5) or 1
            grid_h, grid_w = math.ceil(B / ncol) * (h + 4), ncol * (w + 4)  # visdom pads 2px a side
            # visdom sizes an image pane from these; its title bar and the caption (drawn above and
            # below the image) would otherwise crop the picture
            self._client.images(images.numpy(), nrow=ncol, win=win,
                                opts=dict(title=win, caption=caption, width=grid_w + 16,
                                          height=grid_h + (60 if caption else 30)))
            im[2], sent = True, True
        return sent


# ----------------------------------------------------------------------------- replaying a run

def latest_grid(sample_dir):
    """(step, path) of the newest fixed-z grid (<step>_fake.png) in `sample_dir`, or None."""
    grids = sorted(f for f in os.listdir(sample_dir) if f.endswith("_fake.png") and f[:-9].isdigit()) \
        if os.path.isdir(sample_dir) else []
    return (int(grids[-1][:-9]), os.path.join(sample_dir, grids[-1])) if grids else None


def _run_config(run_dir):
    """The run's config.json, else the one inside its latest.pt; None when the folder has neither."""
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path!r} is not a readable config ({type(e).__name__}); "
                            f"it is written by main.py at the start of a run") from None
    latest = os.path.join(run_dir, "latest.pt")
    if os.path.isfile(latest):
        from checkpoint import load_checkpoint
        return load_checkpoint(latest).get("config")
    return None


def replay(run_dir, server="http://localhost", port=8097, env=None, sample_dir=None, timeout=30.0):
    """Draw a run from its folder on the dashboard: every logged value of metrics.jsonl, the newest
    sample grid, the attention panel of latest.pt. Replaces the env's windows of the same name (a
    replay twice shows the run once) and saves the env on the server. Returns the env's address."""
    from checkpoint import load_checkpoint, load_models
    from metrics import read_records
    from visdom_server import answering

    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir!r} is not a folder: pass a run folder, models/<version> "
                        f"(make demo leaves models/quick)")
    config = _run_config(run_dir)
    if not config:
        raise UserError(f"{run_dir!r} holds no run (no config.json, no latest.pt): pass the folder "
                        f"main.py saved a run in, models/<version>")
    missing = {"version", "adv_loss", "g_attn", "d_attn"} - set(config)
    if missing:
        raise UserError(f"the config of {run_dir!r} lacks {', '.join(sorted(missing))}: it was not written "
                        f"by this project's main.py")
    env = env or config["version"]
    records = [r for r in read_records(os.path.join(run_dir, "metrics.jsonl")) if isinstance(r, dict) and "step" in r]
    if sample_dir is None:  # where main.py wrote them, relative to where it ran (usually here)
        sample_dir = os.path.join(config.get("sample_path", "samples"), config["version"])
    grid = latest_grid(sample_dir)
    latest = os.path.join(run_dir, "latest.pt")
    if not (records or grid or os.path.isfile(latest)):
        raise UserError(f"{run_dir!r} has nothing to show yet (no logged step in metrics.jsonl, no "
                        f"sample grid in {sample_dir!r}, no latest.pt)")
    host = urlparse(server).hostname or server
    if not visdom or not answering(port, host):
        raise UserError(f"no dashboard answers at {server}:{port}: start one with `python "
                        f"visdom_server.py --background` (or pass --visdom_server/--visdom_port)"
                        if visdom else "visdom is not installed (pip install -r requirements.txt)")

    dash = Dashboard(server, port, env, windows(config))
    for r in records:
        for win in (("fid",) if "fid" in r else ("loss", "gamma")):  # as the trainer logs them
            dash.scalars(win, r["step"], r)
    shown = [f"{len(records)} logged steps"]
    if grid:
        step, path = grid
        try:
            with Image.open(path) as img:
                pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None] / 255.0
        except (OSError, ValueError) as e:  # PIL's errors for a cut-short or foreign file
            raise UserError(f"sample grid {path!r} is not a readable image ({type(e).__name__}); "
                            f"delete it or pass --samples with another folder") from None
        dash.image("samples", pixels, caption=f"fixed z, step {step} ({path})")
        shown.append(f"samples of step {step}")
    if os.path.isfile(latest):
        models = load_models(latest, verbose=False)
        z = load_checkpoint(latest).get("fixed_z")
        if z is not None and models.G.attn_res:
            dash.attention(models.G, z[:1], models.step)
            shown.append(f"attention of step {models.step}")
    if not (dash.wait_connected(timeout) and dash.close(flush_timeout=timeout)):
        dash.close(flush_timeout=0)
        raise UserError(f"the dashboard at {server}:{port} stopped answering before {run_dir!r} was "
                        f"sent; run the command again when it is up")
    print(f"replayed {run_dir} ({', '.join(shown)}) into {dash.url}")
    return dash.url


def main(argv=None):
    p = Parser(prog="dashboard.py", description="Draw a finished or older run on the visdom dashboard "
                                                "from its folder (metrics.jsonl, samples, latest.pt).")
    p.add_argument("run_dir", help="the run's folder, models/<version>")
    p.add_argument("--env", default=None, help="visdom env to draw it in (default: the run's --version)")
    p.add_argument("--samples", default=None, metavar="DIR",
                   help="the run's sample grids (default: <sample_path>/<version> from its config.json)")
    p.add_argument("--visdom_server", default="http://localhost")
    p.add_argument("--visdom_port", type=int, default=8097)
    args = p.parse_args(argv)
    replay(args.run_dir, args.visdom_server, args.visdom_port, args.env, args.samples)


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


if __name__ == "__main__":
    run("dashboard.py", main)
