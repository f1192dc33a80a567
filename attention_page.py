"""The explorer as one standalone HTML page: a generated image (several seeds) and every attention
layer of G and D side by side for the query under the mouse (hover previews, a click locks, a
second click unlocks); per layer the map over the image in the one colour scale (attention_colors,
with its bar), the red cross at the query's cell, the top-k markers (hollow blue rings, area
proportional to weight, so a peak's colour shows through) and the numbers the figures show, each
with its meaning on hover. A switch shows the contribution map ||gamma a_qk v_k||
(attention.contribution_rows) and the contribution's own numbers instead of the weights'. Below:
each G layer's image with its attention removed and made uniform (attention.intervene), and, for a
run with several checkpoints, the film of one query through training.

The page's markup, style and script are attention_page.html/.css/.js beside this file; this module
builds the data and writes the page with all three and the data inline (fill_template). No server
and no network: the script, the style, the images (PNG data: URIs) and the data (inline JSON) are in
the file. The data is precomputed here for every query cell of every layer and seed, so the page
only looks things up:

- each attention row is quantised to uint8, scaled by its own maximum (the heat map's colour scale
  is 0..row max, as in the figures), then the arrays are zlib-compressed and base64-encoded; the
  page inflates them with the browser's own DecompressionStream('deflate'). The contribution map
  ||gamma a_qk v_k|| = |gamma| a_qk ||v_k|| is drawn from the same row times the value norms
  ||v_k|| (N per layer), so it costs no second N x N array: at 64px (maps 32x32, 16x16, 8x8, 4x4)
  a seed's arrays are 1.3 MB before compression, so 8 seeds stay under 14 MB even if nothing
  compressed (near-uniform noisy maps, the worst case, come close; peaked maps compress well);
- the top-k cells of both maps with their values, and the statistics (top-k mass, H/logN, mean
  distance and the uniform distance) of the weights and of the normalised contribution are computed
  from the exact float rows by the table's own functions (attention_stats.row_measures, normalise);
- the interventions are two PNGs per G layer and seed, with their mean absolute pixel change.

Geometry: the page maps a mouse pixel to a feature cell with the same formula as
attention.pixel_to_cell (the JS function pixelToCell mirrors it; the browser test checks they agree)
and draws cell (i, j) at its block centre, attention.cell_to_pixel.
"""
import base64
import io
import json
import os
import time
import zlib

import numpy as np
import torch

from attention import TOPK, attention_layers, attention_rows, contribution_rows, gamma, intervene, z_for_seeds
from attention_colors import lut
from attention_stats import normalise, row_measures, uniform_distance
from utils import to_image

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE, STYLE, SCRIPT = "attention_page.html", "attention_page.css", "attention_page.js"
# the template's tags that fill_template replaces by what they point to
STYLE_TAG = f'<link rel="stylesheet" href="{STYLE}">'
SCRIPT_TAG = f'<script src="{SCRIPT}"></script>'
DATA_TAG = '<script type="application/json" id="data"></script>'


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
    rows = attention_rows(layer, features, queries)                      # (1, N, N)
    contrib = contribution_rows(layer, features, queries, rows=rows)     # (1, N, N)
    v_norm = layer.project(features)[2].norm(dim=1)[0]                  # (N,): ||v_k||, for the page's
                                                                        # contribution map

    def measures(p):  # the table's numbers (attention_stats.row_measures) of every query: (N, 3)
        m = row_measures(p.cpu(), queries, (H, W), img_hw, k, with_qi=False)
        return torch.stack([m["top_mass"][0], m["entropy"][0], m["dist"][0]], dim=1)

    stats, cstats = measures(rows), measures(normalise(contrib))  # NaN where a row adds nothing
    rows, contrib = rows[0].cpu().numpy(), contrib[0].cpu().numpy()
    top, top_w = topk_rows(rows, k)
    ctop, ctop_w = topk_rows(contrib, k)
    return dict(weights=pack(quantise_rows(rows), "u1"), v_norm=pack(v_norm.cpu().numpy(), "f4"),
                top=pack(top, "u2"), top_w=pack(top_w, "f4"), ctop=pack(ctop, "u2"), ctop_w=pack(ctop_w, "f4"),
                stats=pack(stats.cpu().numpy(), "f4"), cstats=pack(cstats.cpu().numpy(), "f4"),
                csum=pack(contrib.sum(axis=1), "f4"))


PAGE_INTERVENTIONS = ("remove", "uniform")


@torch.no_grad()
def intervention_data(ex, seed):
    """{G layer: {mode: {image: PNG data: URI, delta}}}: seed's image made with that layer's attention
    changed at every query (attention.intervene, 'remove' and 'uniform', the rest as trained), and
    delta, the mean absolute change of its pixel values (0..1) against the original: the value
    attention.intervention_deltas gives for this one image."""
    z = z_for_seeds([seed], ex.G.z_dim).to(ex.device)
    original = ex.image(seed)
    out = {}
    for name, layer in attention_layers(ex.G).items():
        for mode in PAGE_INTERVENTIONS:
            with intervene(layer, mode):
                changed = to_image(ex.G(z)[0])
            out.setdefault(name, {})[mode] = dict(image=png_data_uri(changed),
                                                  delta=float(np.abs(changed - original).mean()))
    return out


def page_data(ex, seeds, k=TOPK):
    """The page's inline JSON for Explorer `ex` (G and, when it has one, D on the generated image)."""
    if not ex.layers:
        raise ValueError("this model has no attention layers: the page has nothing to show")
    img_hw = ex.img_hw
    layers = []
    for name, layer in ex.layers.items():
        H, W = ex.features(seeds[0], name).shape[2:]
        layers.append(dict(name=name, H=H, W=W, gamma=gamma(layer), net=name[0],
                           dist_uniform=pack(uniform_distance(torch.arange(H * W), (H, W), img_hw).numpy(), "f4")))
    per_seed = []
    for seed in seeds:
        _, feats = ex.run(seed)
        per_seed.append(dict(seed=int(seed), image=png_data_uri(ex.image(seed)),
                             layers={name: layer_data(layer, feats[name], img_hw, k)
                                     for name, layer in ex.layers.items()},
                             interventions=intervention_data(ex, seed)))
    return dict(describe=ex.describe(), generator=ex.generator, step=ex.step, imsize=ex.imsize, k=k,
                default_pixel=list(ex.default_pixel()), layers=layers, seeds=per_seed,
                lut=lut().tolist())


def film_data(film, k=TOPK):
    """The page's 'through training' slider from an explorer.Film: its title, what it shows
    (seed, layer, query: the page names them and writes the command for another query), the run
    folder and, per saved checkpoint, the step and the film's column for it (plot_film) as a PNG
    data: URI."""
    from attention_figures import figure_png, plot_film
    frames = [dict(step=f["step"], image="data:image/png;base64," + base64.b64encode(
        figure_png(plot_film([f], k)[0])).decode("ascii")) for f in film.frames]
    return dict(title=film.title.replace("\n", " "), frames=frames, seed=film.seed, layer=film.layer,
                pixel=film.pixel and list(film.pixel), cell=film.cell and list(film.cell),
                run=os.path.dirname(film.paths[-1]))


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def fill_template(data_json):
    """The template with its style sheet, its script and the data inline: one self-contained file."""
    page, style, script = _read(TEMPLATE), _read(STYLE), _read(SCRIPT)
    for text, end in ((style, "</style"), (script, "</script"), (script, "<!--")):
        if end in text.lower():  # inline, it would end (or hide) the element early
            raise RuntimeError(f"{STYLE if text is style else SCRIPT} must not contain {end!r}")
    for tag, inline in ((STYLE_TAG, f"<style>\n{style}</style>"),
                        (SCRIPT_TAG, f"<script>\n{script}</script>"),
                        (DATA_TAG, DATA_TAG.replace("></", f">{data_json}</"))):
        if page.count(tag) != 1:
            raise RuntimeError(f"{TEMPLATE} must hold {tag} exactly once (found {page.count(tag)})")
        page = page.replace(tag, inline)
    return page


def build_page(ex, seeds, k=TOPK, film=None):
    """The page's HTML text; `film` (film_data) adds the slider through the run's checkpoints."""
    data = json.dumps(dict(page_data(ex, seeds, k), film=film), separators=(",", ":"))
    # '</script' or '<!--' inside the JSON would end or hide the script element: no '<' at all
    return fill_template(data.replace("<", "\\u003c"))


def write_page(ex, path, seeds, k=TOPK, film=None):
    """Write the page to `path`; returns (size in bytes, seconds it took to build)."""
    t0 = time.perf_counter()
    html = build_page(ex, seeds, k, film)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)
    return len(html.encode("utf-8")), time.perf_counter() - t0


