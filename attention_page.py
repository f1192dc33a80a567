"""The explorer as one standalone HTML page: a generated image (several seeds) and every attention
layer of G and D side by side for the query under the mouse (hover previews, a click locks, a
second click unlocks); per layer the map over the image, the red cross at the query's cell, the
top-k markers (blue dots, area proportional to weight) and the numbers the figures show. A switch
shows the contribution map ||gamma a_qk v_k|| (attention.contribution_rows) instead of the weights.

No server and no network: the script, the style, the images (PNG data: URIs) and the data (inline
JSON) are in the file. The data is precomputed here for every query cell of every layer and seed,
so the page only looks things up:

- each attention row is quantised to uint8, scaled by its own maximum (the heat map's colour scale
  is 0..row max, as in the figures), then the arrays are zlib-compressed and base64-encoded; the
  page inflates them with the browser's own DecompressionStream('deflate'). The contribution map
  ||gamma a_qk v_k|| = |gamma| a_qk ||v_k|| is drawn from the same row times the value norms
  ||v_k|| (N per layer), so it costs no second N x N array: at 64px (maps 32x32, 16x16, 8x8, 4x4)
  a seed's arrays are 1.3 MB before compression, so 8 seeds stay under 14 MB even if nothing
  compressed (near-uniform noisy maps, the worst case, come close; peaked maps compress well);
- the top-k cells of both maps with their values, and the statistics (top-k mass, H/logN, mean distance and the
  uniform distance), are computed from the exact float rows, by attention.py's functions.

Geometry: the page maps a mouse pixel to a feature cell with the same formula as
attention.pixel_to_cell (the JS function pixelToCell mirrors it; the browser test checks they agree)
and draws cell (i, j) at its block centre, attention.cell_to_pixel.
"""
import base64
import io
import json
import time
import zlib

import numpy as np
import torch

from attention import TOPK, attention_rows, contribution_rows, gamma
from attention_stats import entropy_norm, mean_distance, topk_mass, uniform_distance


def pack(array, dtype):
    """A numpy array as the page stores it: little-endian `dtype`, zlib-compressed, base64 text."""
    raw = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def unpack(text, dtype, shape):
    """pack's inverse (what the page's JS does): the tests read the page's data with it."""
    raw = zlib.decompress(base64.b64decode(text))
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def quantise_rows(rows):
    """(Q, N) float rows -> uint8, each row scaled by its own maximum (an all-zero row stays 0)."""
    top = rows.max(axis=1, keepdims=True)
    return np.round(255 * rows / np.maximum(top, 1e-30)).astype(np.uint8)


def topk_rows(rows, k):
    """(Q, N) -> indices (Q, k) and weights (Q, k) of each row's k largest entries, heaviest first,
    ties in index order: attention.topk_cells for every row at once."""
    idx = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(rows, idx, axis=1)


def png_data_uri(image):
    """(h, w, 3) in [0, 1] -> a PNG data: URI."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@torch.no_grad()
def layer_data(layer, features, img_hw, k=TOPK):
    """Everything the page shows for one layer of one image, every query cell: packed arrays."""
    H, W = features.shape[2:]
    N = H * W
    queries = torch.arange(N)
    rows = attention_rows(layer, features, queries)                     # (1, N, N)
    contrib = contribution_rows(layer, features, queries)[0].cpu().numpy()  # (N, N)
    v_norm = layer.project(features)[2].norm(dim=1)[0]                  # (N,): ||v_k||, for the page's
                                                                        # contribution map
    stats = torch.stack([topk_mass(rows[0], k), entropy_norm(rows[0]),
                         mean_distance(rows[0], queries, (H, W), img_hw)], dim=1)  # (N, 3)
    rows = rows[0].cpu().numpy()
    top, top_w = topk_rows(rows, k)
    ctop, ctop_w = topk_rows(contrib, k)
    return dict(weights=pack(quantise_rows(rows), "u1"), v_norm=pack(v_norm.cpu().numpy(), "f4"),
                top=pack(top, "u2"), top_w=pack(top_w, "f4"), ctop=pack(ctop, "u2"), ctop_w=pack(ctop_w, "f4"),
                stats=pack(stats.cpu().numpy(), "f4"), csum=pack(contrib.sum(axis=1), "f4"))


def page_data(ex, seeds, k=TOPK):
    """The page's inline JSON for Explorer `ex` (G and, when it has one, D on the generated image)."""
    if not ex.layers:
        raise ValueError("this model has no attention layers: the page has nothing to show")
    img_hw = ex.img_hw
    layers = []
    for name, layer in ex.layers.items():
        H, W = ex.features(seeds[0], name).shape[2:]
        layers.append(dict(name=name, H=H, W=W, gamma=gamma(layer),
                           dist_uniform=pack(uniform_distance(torch.arange(H * W), (H, W), img_hw).numpy(), "f4")))
    per_seed = []
    for seed in seeds:
        _, feats = ex.run(seed)
        per_seed.append(dict(seed=int(seed), image=png_data_uri(ex.image(seed)),
                             layers={name: layer_data(layer, feats[name], img_hw, k)
                                     for name, layer in ex.layers.items()}))
    return dict(describe=ex.describe(), generator=ex.generator, step=ex.step, imsize=ex.imsize, k=k,
                default_pixel=list(ex.default_pixel()), layers=layers, seeds=per_seed)


def film_data(film, k=TOPK):
    """The page's 'through training' slider from an explorer.Film: its title and, per saved
    checkpoint, the step and the film's column for it (plot_film) as a PNG data: URI."""
    from attention_figures import figure_png, plot_film
    frames = [dict(step=f["step"], image="data:image/png;base64," + base64.b64encode(
        figure_png(plot_film([f], k)[0])).decode("ascii")) for f in film.frames]
    return dict(title=film.title.replace("\n", " "), frames=frames)


def build_page(ex, seeds, k=TOPK, film=None):
    """The page's HTML text; `film` (film_data) adds the slider through the run's checkpoints."""
    data = json.dumps(dict(page_data(ex, seeds, k), film=film), separators=(",", ":"))
    # '</' inside the JSON would end the script element early
    return PAGE.replace("/*DATA*/", data.replace("</", "<\\/"))


def write_page(ex, path, seeds, k=TOPK, film=None):
    """Write the page to `path`; returns (size in bytes, seconds it took to build)."""
    t0 = time.perf_counter()
    html = build_page(ex, seeds, k, film)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)
    return len(html.encode("utf-8")), time.perf_counter() - t0


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>SAGAN attention explorer</title>
<style>
body { font-family: sans-serif; margin: 12px; background: #fafafa; color: #222; }
#bar { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
#query { font-family: monospace; }
#query.locked { color: #b00; font-weight: bold; }
#panels { display: flex; gap: 10px; flex-wrap: wrap; }
.panel { background: white; border: 1px solid #ccc; padding: 6px; min-width: 256px; }
.panel h3 { font-size: 13px; margin: 0 0 4px 0; }
.view { position: relative; width: 256px; height: 256px; cursor: crosshair; }
.view canvas, .view svg { position: absolute; left: 0; top: 0; width: 256px; height: 256px; }
.view canvas { image-rendering: pixelated; }
.stats { font-family: monospace; font-size: 11px; white-space: pre; margin-top: 4px; }
.hint { color: #666; font-size: 12px; }
</style></head>
<body>
<div id="bar">
  <b>SAGAN attention explorer</b>
  <label>seed <select id="seed"></select></label>
  <label>map <select id="mode"><option value="weights">attention weights a_qk</option>
    <option value="contribution">contribution ||gamma a_qk v_k||</option></select></label>
  <span id="query"></span>
  <span class="hint">hover: preview a query; click: lock it; click again: unlock</span>
</div>
<div id="describe" class="hint"></div>
<div id="panels"></div>
<div id="film" hidden><h3 id="film-title"></h3>
  <input type="range" id="film-step" min="0" value="0"> <span id="film-label"></span><br>
  <img id="film-image" alt="the query at this checkpoint"></div>
<script type="application/json" id="data">/*DATA*/</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const S = DATA.imsize, K = DATA.k, SIDE = 256, NS = "http://www.w3.org/2000/svg";
const state = {seed: 0, pixel: DATA.default_pixel, locked: false, mode: "weights"};
const cache = {};

// attention.pixel_to_cell: the cell whose pixel block holds pixel (x, y), the pixel meaning its centre
function pixelToCell(x, y, H, W, h, w) {
  return [Math.min(Math.floor((y + 0.5) * H / h), H - 1), Math.min(Math.floor((x + 0.5) * W / w), W - 1)];
}
// attention.cell_to_pixel: the centre of cell (i, j)'s pixel block, in image coordinates
function cellToPixel(i, j, H, W, h, w) { return [(j + 0.5) * w / W, (i + 0.5) * h / H]; }

// attention_page.unpack: base64 -> zlib inflate (the browser's own) -> typed array
async function unpack(text, Type) {
  const bytes = Uint8Array.from(atob(text), c => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Type(await new Response(stream).arrayBuffer());
}

async function seedData(s) {
  if (!cache[s]) {
    const src = DATA.seeds[s], out = {layers: {}};
    out.image = await new Promise(ok => { const im = new Image(); im.onload = () => ok(im); im.src = src.image; });
    for (const L of DATA.layers) {
      const d = src.layers[L.name];
      out.layers[L.name] = {
        weights: await unpack(d.weights, Uint8Array), v_norm: await unpack(d.v_norm, Float32Array),
        top: await unpack(d.top, Uint16Array), top_w: await unpack(d.top_w, Float32Array),
        ctop: await unpack(d.ctop, Uint16Array), ctop_w: await unpack(d.ctop_w, Float32Array),
        stats: await unpack(d.stats, Float32Array), csum: await unpack(d.csum, Float32Array)};
    }
    cache[s] = out;
  }
  return cache[s];
}
const distUniform = {};

// matplotlib's 'jet', piecewise linear
function jet(v) {
  const c = x => Math.round(255 * Math.max(0, Math.min(1, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function cross(x, y, cell) {
  const a = S / 20, g = svgEl("g", {class: "query", "data-x": x, "data-y": y});
  if (cell) g.setAttribute("data-cell", cell.join(","));
  for (const [x1, y1, x2, y2] of [[x - a, y - a, x + a, y + a], [x - a, y + a, x + a, y - a]])
    g.appendChild(svgEl("line", {x1, y1, x2, y2, stroke: "red", "stroke-width": 2.5, "vector-effect": "non-scaling-stroke"}));
  return g;
}

function makePanel(id, title) {
  const p = document.createElement("div");
  p.className = "panel"; p.id = "panel-" + id;
  p.innerHTML = `<h3></h3><div class="view"><canvas width="${SIDE}" height="${SIDE}"></canvas>` +
    `<svg viewBox="0 0 ${S} ${S}" preserveAspectRatio="none"></svg></div><div class="stats"></div>`;
  p.querySelector("h3").textContent = title;
  const view = p.querySelector(".view");
  const pixelAt = e => {
    const r = view.getBoundingClientRect();
    const f = v => Math.max(0, Math.min(S - 1, Math.floor(v)));
    return [f((e.clientX - r.left) / r.width * S), f((e.clientY - r.top) / r.height * S)];
  };
  view.addEventListener("mousemove", e => { if (!state.locked) { state.pixel = pixelAt(e); render(); } });
  view.addEventListener("click", e => {
    state.locked = !state.locked;
    if (state.locked) state.pixel = pixelAt(e);
    render();
  });
  document.getElementById("panels").appendChild(p);
  return p;
}

let rendering = Promise.resolve();
function render() { rendering = rendering.then(draw); return rendering; }

async function draw() {
  const sd = await seedData(state.seed), [x, y] = state.pixel, mode = state.mode;
  const q = document.getElementById("query");
  q.textContent = `query pixel (${x}, ${y})` + (state.locked ? " locked" : "");
  q.className = state.locked ? "locked" : "";
  q.dataset.x = x; q.dataset.y = y; q.dataset.locked = state.locked;
  const img = document.getElementById("panel-image");
  const ictx = img.querySelector("canvas").getContext("2d");
  ictx.imageSmoothingEnabled = false;
  ictx.drawImage(sd.image, 0, 0, SIDE, SIDE);
  img.querySelector("svg").replaceChildren(cross(x + 0.5, y + 0.5, null));
  img.querySelector(".stats").textContent = `seed ${DATA.seeds[state.seed].seed}\npixel (${x}, ${y})`;
  for (const L of DATA.layers) {
    const {H, W, name} = L, N = H * W, d = sd.layers[name];
    const [i, j] = pixelToCell(x, y, H, W, S, S), n = i * W + j;
    const panel = document.getElementById("panel-" + name);
    panel.querySelector("h3").textContent = `${name} (${H}x${W}), cell (${i}, ${j})`;
    panel.dataset.cell = `${i},${j}`;
    // the map over the image, nearest (each cell's weight on its whole pixel block), alpha 0.6
    const heat = document.createElement("canvas"); heat.width = W; heat.height = H;
    const hctx = heat.getContext("2d"), px = hctx.createImageData(W, H);
    // contribution |gamma| a_qk ||v_k||: the weights times the value norms, on its own 0..max scale
    const row = Float32Array.from({length: N}, (_, m) => d.weights[n * N + m] * (mode === "weights" ? 1 : d.v_norm[m]));
    const vmax = Math.max(...row, 1e-30);
    for (let m = 0; m < N; m++) px.data.set([...jet(row[m] / vmax), 255], 4 * m);
    hctx.putImageData(px, 0, 0);
    const ctx = panel.querySelector("canvas").getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1; ctx.drawImage(sd.image, 0, 0, SIDE, SIDE);
    ctx.globalAlpha = 0.6; ctx.drawImage(heat, 0, 0, SIDE, SIDE);
    // top-k markers: area proportional to weight, the largest dot for the row's largest weight
    const top = mode === "weights" ? d.top : d.ctop, tw = mode === "weights" ? d.top_w : d.ctop_w;
    const svg = panel.querySelector("svg"), marks = [], rmax = S / 18;
    const wmax = Math.max(tw[n * K], 1e-30);
    for (let t = 0; t < K && t < N; t++) {
      const m = top[n * K + t], [cx, cy] = cellToPixel(Math.floor(m / W), m % W, H, W, S, S);
      marks.push(svgEl("circle", {class: "topk", cx, cy, r: rmax * Math.sqrt(tw[n * K + t] / wmax),
        fill: "blue", "fill-opacity": 0.85, stroke: "white", "stroke-width": 0.6,
        "vector-effect": "non-scaling-stroke", "data-cell": `${Math.floor(m / W)},${m % W}`,
        "data-weight": tw[n * K + t]}));
    }
    const [qx, qy] = cellToPixel(i, j, H, W, S, S);
    svg.replaceChildren(...marks, cross(qx, qy, [i, j]));
    // the numbers of attention.stats_text, of the weights (the contribution's sum in that mode)
    const st = d.stats, f = (v, p) => v.toFixed(p), pc = v => (100 * v).toFixed(1) + "%";
    const g = L.gamma >= 0 ? "+" + f(L.gamma, 3) : f(L.gamma, 3);
    let text = `gamma ${g}  top-${K} ${pc(st[3 * n])} (uniform ${pc(Math.min(K, N) / N)})\n` +
      `H/logN ${f(st[3 * n + 1], 2)}  dist ${f(st[3 * n + 2], 1)}px (uniform ${f(distUniform[name][n], 1)})`;
    if (mode === "contribution") text += `\nsum ||gamma a v|| ${d.csum[n].toPrecision(3)}`;
    panel.querySelector(".stats").textContent = text;
  }
  document.body.dataset.ready = "1";
}

(async () => {
  document.getElementById("describe").textContent = DATA.describe;
  const sel = document.getElementById("seed");
  DATA.seeds.forEach((s, idx) => sel.add(new Option(`seed ${s.seed}`, idx)));
  sel.addEventListener("change", () => { state.seed = +sel.value; render(); });
  const mode = document.getElementById("mode");
  mode.addEventListener("change", () => { state.mode = mode.value; render(); });
  makePanel("image", "image");
  for (const L of DATA.layers) {
    makePanel(L.name, L.name);
    distUniform[L.name] = await unpack(L.dist_uniform, Float32Array);
  }
  render();
})();
if (DATA.film) {  // the same image and query at each saved checkpoint of the run
  const F = DATA.film.frames, slider = document.getElementById("film-step");
  const show = i => {
    document.getElementById("film-image").src = F[i].image;
    document.getElementById("film-label").textContent = `step ${F[i].step} (${i + 1} of ${F.length})`;
  };
  document.getElementById("film-title").textContent = DATA.film.title;
  slider.max = F.length - 1;
  slider.value = F.length - 1;
  slider.addEventListener("input", () => show(+slider.value));
  show(F.length - 1);
  document.getElementById("film").hidden = false;
}
</script></body></html>
"""
