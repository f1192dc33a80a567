"""Where does a pixel of a generated image look? Extraction, geometry, statistics and figures for
SAGAN's self-attention layers; `visualize_attn.py` (CLI) and `visualize_attn.ipynb` are thin calls
into this module.

Conventions every function here keeps:
- A layer is named by network and feature-map resolution: 'G16' is the generator's attention on its
  16x16 features, 'D8' the discriminator's on 8x8.
- An H x W layer has N = H*W positions flattened row-major: index n = i*W + j is feature cell
  (i, j), row i from the top, column j from the left. A row of attention is one query's weights over
  the N keys (it sums to 1); a *map* is that row reshaped to (H, W).
- Image coordinates are continuous, x to the right and y down, pixel (x, y) covering
  [x, x+1) x [y, y+1); images are drawn with extent (0, width, height, 0). Feature cell (i, j) is
  the block of pixels centred at ((j + 0.5) * sx, (i + 0.5) * sy), sx = width / W, sy = height / H.
  Grid panels are drawn in cell units: cell (i, j) is centred at (j + 0.5, i + 0.5).

Only the query rows that are asked for are computed: a full map of a 64x64 layer is N*N = 16.7 M
floats per image. Full maps are made only where a statistic needs every row (key saliency), and
then in chunks of rows.
"""
import base64
import io
import math
import re
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, load_checkpoint
from sagan_models import Discriminator, Generator
from utils import denorm

TOPK = 10
QUERY_COLORS = ["red", "lime", "cyan", "magenta", "yellow", "orange", "white", "deepskyblue"]
LAYER_RE = re.compile(r"^([GgDd])(\d+)$")


# ============================================================================ loading

def load_models(path, device="cpu", with_d=False):
    """(G, D or None, step) rebuilt from a checkpoint file alone (weights_only=True), in eval mode.

    Every failure (missing, corrupt, foreign file, weights that do not fit) is a CheckpointError
    with a one-line message naming the file.
    """
    ckpt = load_checkpoint(path)
    nets = [("G", Generator)] + ([("D", Discriminator)] if with_d else [])
    built = []
    for key, cls in nets:
        try:
            net = cls(**ckpt["model_args"][key])
            net.load_state_dict(ckpt[key])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path!r}: cannot rebuild {key} from the stored architecture "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        built.append(net.to(device).eval())
    return built[0], (built[1] if with_d else None), ckpt.get("step")


def load_generator(path, device="cpu"):
    return load_models(path, device)[0]


def load_image(path, imsize, crop=160):
    """A real image for D, prepared as in training: centre crop, resize, (3, imsize, imsize) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    from data_loader import center_crop_resize
    from utils import to_tensor
    try:
        with Image.open(path) as img:
            return to_tensor(center_crop_resize(img.convert("RGB"), imsize, crop))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"image {path!r} cannot be read ({e}); pass a JPEG or PNG file") from None


# ============================================================================ layers

def attention_layers(net):
    """{'G8': Self_Attn, 'G16': ...} for a Generator, {'D8': ..., 'D4': ...} for a Discriminator,
    in the order the network applies them."""
    prefix = "G" if isinstance(net, Generator) else "D"
    return {f"{prefix}{r}": net.attn[str(r)] for r in net.attn_res}


def parse_layer(name):
    """'G16' -> ('G', 16); a clear ValueError for anything else."""
    m = LAYER_RE.match(str(name).strip())
    if not m:
        raise ValueError(f"layer {name!r} is not a layer name: write the network and resolution, "
                         f"e.g. G16 or D8")
    return m.group(1).upper(), int(m.group(2))


def check_layer(name, available):
    net, res = parse_layer(name)
    canon = f"{net}{res}"
    if canon not in available:
        raise ValueError(f"layer {name} is not in this checkpoint: its attention layers are "
                         f"{', '.join(available) or 'none'}")
    return canon


def gamma(layer):
    """The learned residual weight: out = gamma * attention_output + x. Zero at initialisation."""
    return float(layer.gamma.detach())


# ============================================================================ geometry

def index_to_cell(n, W):
    """Flattened row-major index -> (row i, column j)."""
    return int(n) // W, int(n) % W


def cell_to_index(i, j, W):
    return int(i) * W + int(j)


def cell_to_pixel(i, j, map_hw, img_hw):
    """Centre (x, y), in continuous image coordinates, of the pixel block of feature cell (i, j)."""
    (H, W), (h, w) = map_hw, img_hw
    return (j + 0.5) * w / W, (i + 0.5) * h / H


def pixel_to_cell(x, y, map_hw, img_hw):
    """The feature cell whose pixel block holds image point (x, y); pixel (x, y) means its centre."""
    (H, W), (h, w) = map_hw, img_hw
    check_pixel(x, y, img_hw)
    return min(int((y + 0.5) * H / h), H - 1), min(int((x + 0.5) * W / w), W - 1)


def check_pixel(x, y, img_hw):
    h, w = img_hw
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"query pixel (x={x}, y={y}) is outside the {w}x{h} image: "
                         f"x must be in 0..{w - 1}, y in 0..{h - 1}")


def check_cell(i, j, map_hw, layer=""):
    H, W = map_hw
    if not (0 <= i < H and 0 <= j < W):
        raise ValueError(f"query cell (row {i}, col {j}) is outside the {H}x{W} map{' of ' + layer if layer else ''}: "
                         f"row must be in 0..{H - 1}, col in 0..{W - 1}")


def resolve_query(map_hw, img_hw, pixel=None, cell=None, layer=""):
    """A query given either as an image pixel (x, y) or as a feature cell (row, col) -> cell."""
    if (pixel is None) == (cell is None):
        raise ValueError("give the query either as an image pixel (x, y) or as a feature cell (row, col)")
    if pixel is not None:
        return pixel_to_cell(pixel[0], pixel[1], map_hw, img_hw)
    check_cell(cell[0], cell[1], map_hw, layer)
    return int(cell[0]), int(cell[1])


def key_pixels(map_hw, img_hw):
    """(N, 2) centres (x, y) of every key cell, row-major."""
    H, W = map_hw
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    x, y = cell_to_pixel(ii.flatten().double(), jj.flatten().double(), map_hw, img_hw)
    return torch.stack([x, y], dim=1)


def upsample_map(attn_map, img_hw, mode="nearest"):
    """(H, W) map -> (h, w) over the image. 'nearest' gives each cell's weight to its whole pixel
    block (what the layer actually resolves); 'bilinear' (align_corners=False) keeps every cell's value
    at its block centre and is smoother than the layer's resolution."""
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"upsample mode {mode!r}: use 'nearest' or 'bilinear'")
    t = torch.as_tensor(np.asarray(attn_map, dtype=np.float32))[None, None]  # (1, 1, H, W)
    kw = {} if mode == "nearest" else dict(align_corners=False)
    return F.interpolate(t, size=tuple(img_hw), mode=mode, **kw)[0, 0].numpy()


def topk_cells(attn_map, k=TOPK):
    """The k most attended cells of an (H, W) map: [(i, j, weight)], heaviest first."""
    a = np.asarray(attn_map)
    W = a.shape[1]
    flat = a.ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    return [(*index_to_cell(n, W), float(flat[n])) for n in order]


# ============================================================================ extraction

def z_for_seeds(seeds, z_dim):
    """One z per seed, each a pure function of its seed (not of the batch it is in): (B, z_dim)."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def run_net(net, x, queries=None):
    """Run G (x = z) or D (x = images in [-1, 1]) once, capturing each attention layer's input.

    queries: {layer name: LongTensor (Q,) of flattened query indices}; those rows come from the
    network's own return_attn/queries interface. Layers not named there give no map (the fused path,
    no N x N matrix). Returns (output, features {name: (B, C, H, W)}, rows {name: (B, Q, N)}).
    """
    layers = attention_layers(net)
    feats, hooks = {}, []
    for name, layer in layers.items():
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, name=name: feats.__setitem__(name, args[0].detach())))
    queries = queries or {}
    res_q = {parse_layer(n)[1]: q.long() for n, q in queries.items()}
    try:
        if res_q:
            out, maps = net(x, return_attn=True, queries=res_q)
        else:
            out, maps = net(x), {}
    finally:
        for h in hooks:
            h.remove()
    prefix = "G" if isinstance(net, Generator) else "D"
    rows = {f"{prefix}{r}": maps[r] for r in res_q}
    return out, feats, rows


@torch.no_grad()
def attention_rows(layer, features, queries=None, chunk=None):
    """Rows of `layer`'s attention on captured input `features` (B, C, H, W), by the layer's own
    forward: (B, Q, N) for flattened query indices `queries` (Q,), all N rows when None. `chunk`
    bounds the rows computed at once."""
    N = features.shape[2] * features.shape[3]
    idx = torch.arange(N) if queries is None else torch.as_tensor(queries).long()
    chunk = chunk or len(idx)
    parts = [layer(features, return_attn=True, queries=idx[s:s + chunk])[1]
             for s in range(0, len(idx), chunk)]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def key_saliency(layer, features, chunk=1024):
    """Attention each key receives, summed over all N queries: (B, H, W). Rows sum to 1, so the
    saliency sums to N and a key receiving exactly its uniform share scores 1."""
    B, _, H, W = features.shape
    N = H * W
    total = torch.zeros(B, N, dtype=torch.float64, device=features.device)
    for s in range(0, N, chunk):
        idx = torch.arange(s, min(s + chunk, N))
        total += layer(features, return_attn=True, queries=idx)[1].double().sum(dim=1)
    return total.reshape(B, H, W).float()  # (B, H, W)


@torch.no_grad()
def attention_share(layer, features):
    """||gamma * attention_output|| / ||x|| per image: how much the layer changes its input. gamma
    alone can mislead, since its effect scales with the attention output's size."""
    out, _ = layer(features, return_attn=False)
    delta = (out - features).flatten(1).norm(dim=1)
    return (delta / features.flatten(1).norm(dim=1).clamp_min(1e-12)).cpu()  # (B,)


def to_image(x):
    """(3, h, w) in [-1, 1] -> (h, w, 3) float numpy in [0, 1]."""
    return denorm(x.detach().float().cpu().clone()).permute(1, 2, 0).numpy()


def feature_image(features, channel=None):
    """(C, H, W) -> (H, W): the mean over channels, or one channel."""
    if channel is None:
        return features.mean(0).cpu().numpy()
    if not 0 <= channel < features.shape[0]:
        raise ValueError(f"channel {channel} does not exist: this layer has {features.shape[0]} "
                         f"channels (0..{features.shape[0] - 1})")
    return features[channel].cpu().numpy()


# ============================================================================ statistics

def topk_mass(rows, k=TOPK):
    """Share of each row's attention on its k heaviest keys; a uniform row gives k/N."""
    return rows.topk(min(k, rows.shape[-1]), dim=-1).values.sum(-1)


def entropy_norm(rows):
    """H / log N per row: 1 for uniform attention, 0 for attention on a single key."""
    N = rows.shape[-1]
    return -torch.special.xlogy(rows.double(), rows.double()).sum(-1).float() / math.log(N)


def mean_distance(rows, queries, map_hw, img_hw):
    """Expected image distance in pixels from each query's cell centre to the keys it attends to:
    (..., Q). `queries` are the flattened query indices of the rows' Q axis."""
    keys = key_pixels(map_hw, img_hw)                  # (N, 2)
    q = keys[torch.as_tensor(queries).long()]           # (Q, 2)
    dist = torch.cdist(q, keys)                        # (Q, N)
    return (rows.double() * dist.to(rows.device)).sum(-1).float()


def uniform_distance(queries, map_hw, img_hw):
    """mean_distance for uniform attention: the baseline 'long-range' is compared with."""
    keys = key_pixels(map_hw, img_hw)
    return torch.cdist(keys[torch.as_tensor(queries).long()], keys).mean(-1).float()


def query_independence(rows):
    """How alike the maps of different queries are, per image: 1 - mean Jensen-Shannon divergence
    (in bits, so in [0, 1]) over all pairs of distinct query rows of (B, Q, N).

    1: every query has the same map (non-local attention often collapses to one map for all
    queries; near-uniform maps score near 1 too, which the entropy tells apart); 0: pairwise
    disjoint maps. Needs Q >= 2.
    """
    B, Q, N = rows.shape
    if Q < 2:
        raise ValueError("query independence needs at least 2 query rows")
    p = rows.double()
    plogp = torch.special.xlogy(p, p).sum(-1)            # (B, Q)
    total, pairs = torch.zeros(B, dtype=torch.float64, device=rows.device), 0
    for a in range(Q - 1):
        m = (p[:, a:a + 1] + p[:, a + 1:]) / 2           # (B, Q-a-1, N)
        mlogm = torch.special.xlogy(m, m).sum(-1)
        js = 0.5 * (plogp[:, a:a + 1] + plogp[:, a + 1:]) - mlogm
        total += js.sum(-1)
        pairs += Q - a - 1
    return (1 - total / pairs / math.log(2)).float().cpu()  # (B,)


def map_stats(row, query, map_hw, img_hw, layer=None, k=TOPK):
    """Numbers for one attention row (N,) of query index `query`: dict for a figure's caption."""
    row = torch.as_tensor(row).reshape(1, -1)
    N = row.shape[1]
    return dict(gamma=gamma(layer) if layer is not None else None,
                top_mass=float(topk_mass(row, k)[0]), uniform=min(k, N) / N, k=k,
                entropy=float(entropy_norm(row)[0]),
                dist=float(mean_distance(row, [query], map_hw, img_hw)[0]),
                dist_uniform=float(uniform_distance([query], map_hw, img_hw)[0]))


def stats_text(s):
    g = "" if s.get("gamma") is None else f"gamma {s['gamma']:+.3f}  "
    return (f"{g}top-{s['k']} {s['top_mass']:.1%} (uniform {s['uniform']:.1%})\n"
            f"H/logN {s['entropy']:.2f}  dist {s['dist']:.1f}px (uniform {s['dist_uniform']:.1f})")


# rules of thumb for the table's verdict; the numbers beside it are what counts
INERT_SHARE = 0.01        # attention changes its layer's input by under 1%
NEAR_UNIFORM_H = 0.97     # entropy this close to uniform: the layer averages everything
SHARED_MAP_QI = 0.9       # different queries' maps nearly identical
LOCAL_DIST = 0.6          # attends closer than 60% of the uniform-attention distance


def verdict(r):
    if r["share"] < INERT_SHARE:
        return "inert"
    if r["entropy"] > NEAR_UNIFORM_H:
        return "near-uniform"
    if r["qi"] > SHARED_MAP_QI:
        return "one map for all queries"
    return "local" if r["dist"] < LOCAL_DIST * r["dist_uniform"] else "long-range"


def layer_statistics(G, seeds, n_queries=64, k=TOPK, D=None, query_seed=0, batch=16):
    """Per-layer statistics over the images of `seeds` and a random subset of n_queries query cells
    per layer (all cells when the layer has fewer). D, when given, sees the generated images.

    Returns one dict per layer: name, hw, N, gamma, share (attention_share), top_mass, uniform,
    entropy, dist, dist_uniform, qi, verdict; means over images x queries.
    """
    img_hw = (G.image_size, G.image_size)
    acc = {}
    for s in range(0, len(seeds), batch):
        z = z_for_seeds(seeds[s:s + batch], G.z_dim).to(next(G.parameters()).device)
        img, feats, _ = run_net(G, z)
        nets = [(G, feats)]
        if D is not None:
            nets.append((D, run_net(D, img)[1]))
        for net, fts in nets:
            for name, layer in attention_layers(net).items():
                f = fts[name]
                H, W = f.shape[2:]
                N = H * W
                g = torch.Generator().manual_seed(query_seed * 1009 + N)
                q = torch.randperm(N, generator=g)[:n_queries] if n_queries < N else torch.arange(N)
                rows = attention_rows(layer, f, q).cpu()   # (B, Q, N)
                a = acc.setdefault(name, dict(name=name, hw=(H, W), N=N, gamma=gamma(layer),
                                              share=[], top_mass=[], entropy=[], dist=[], qi=[],
                                              dist_uniform=float(uniform_distance(q, (H, W), img_hw).mean())))
                a["share"].append(attention_share(layer, f))
                a["top_mass"].append(topk_mass(rows, k).flatten())
                a["entropy"].append(entropy_norm(rows).flatten())
                a["dist"].append(mean_distance(rows, q, (H, W), img_hw).flatten())
                a["qi"].append(query_independence(rows))
    table = []
    for a in acc.values():
        row = dict(a, uniform=min(k, a["N"]) / a["N"], k=k,
                   **{key: float(torch.cat(a[key]).mean()) for key in ("share", "top_mass", "entropy", "dist", "qi")})
        row["verdict"] = verdict(row)
        table.append(row)
    return table


def format_table(table, n_images=None, n_queries=None):
    """Markdown table of layer_statistics."""
    k = table[0]["k"] if table else TOPK
    head = ("| layer | map | gamma | attn share | top-%d mass (uniform) | H/logN | mean dist px (uniform) "
            "| query indep. | verdict |\n|---|---|---|---|---|---|---|---|---|\n" % k)
    lines = [f"| {r['name']} | {r['hw'][0]}x{r['hw'][1]} | {r['gamma']:+.4f} | {r['share']:.2%} | "
             f"{r['top_mass']:.1%} ({r['uniform']:.1%}) | {r['entropy']:.3f} | "
             f"{r['dist']:.1f} ({r['dist_uniform']:.1f}) | {r['qi']:.3f} | {r['verdict']} |"
             for r in table]
    note = ""
    if n_images:
        note = f"\n\n{n_images} generated images x {n_queries or 'all'} query cells per layer."
    return head + "\n".join(lines) + note


# ============================================================================ figures
# Pure functions of arrays: each returns (fig, axes) so that tests can read where things are drawn.
# Markers: the query is a Line2D with gid 'query'; the top-k dots are a PathCollection with gid
# 'topk' whose areas are proportional to the weights (largest dot = the map's largest weight).

def _plt():
    # imported on first use: the statistics need no matplotlib, and the CLI picks Agg before this
    import matplotlib.pyplot as plt
    return plt


def draw_query(ax, xy, color="red", size=12):
    return ax.plot([xy[0]], [xy[1]], marker="x", ms=size, mew=2.5, color=color, ls="none",
                   gid="query", zorder=4)[0]


def draw_topk(ax, xys, weights, color="blue", max_area=220.0):
    w = np.asarray(weights, dtype=float)
    xy = np.asarray(xys, dtype=float).reshape(-1, 2)
    area = max_area * w / max(w.max(), 1e-12)
    return ax.scatter(xy[:, 0], xy[:, 1], s=area, c=color, edgecolors="white", linewidths=0.6,
                      alpha=0.85, gid="topk", zorder=3)


def _show_image(ax, image):
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w), ax.set_ylim(h, 0)


def _show_grid(ax, values, cmap="viridis", **kw):
    H, W = values.shape
    im = ax.imshow(values, extent=(0, W, H, 0), interpolation="nearest", cmap=cmap, **kw)
    ax.set_xlim(0, W), ax.set_ylim(H, 0)
    return im


def _overlay(ax, image, attn_map, upsample, alpha=0.6, cmap="jet"):
    """Image with the attention map upsampled over it; returns the heat AxesImage."""
    h, w = image.shape[:2]
    _show_image(ax, image)
    up = upsample_map(attn_map, (h, w), upsample)
    # vmin 0: a near-uniform map looks flat instead of having its tiny differences stretched
    return ax.imshow(up, extent=(0, w, h, 0), interpolation="nearest", cmap=cmap, alpha=alpha,
                     vmin=0, vmax=max(float(up.max()), 1e-12), gid="heat")


def _mark(ax, attn_map, cell, img_hw, k, color="red", dots=True):
    """Cross at the query cell's centre and dots on the k most attended cells, in the axes'
    coordinates: image pixels when img_hw is given, cell units when it is None."""
    H, W = attn_map.shape
    units = img_hw if img_hw is not None else (H, W)
    draw_query(ax, cell_to_pixel(*cell, (H, W), units), color=color)
    if dots and k:
        top = topk_cells(attn_map, k)
        draw_topk(ax, [cell_to_pixel(i, j, (H, W), units) for i, j, _ in top], [w for *_, w in top])



def _finish(fig, axes, title):
    """Small tick labels, the figure's title, a tight layout: (fig, axes) as every plot returns."""
    for ax in axes.values():
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, axes

def plot_query(image, attn_map, cell, feature=None, k=TOPK, upsample="nearest", stats=None,
               title=None):
    """The seed README's figure, right, for one query cell of one layer.

    Panels: the layer's feature map (if given; cell units) and the image, each with a red cross at
    the query and blue dots on the top-k attended cells (area proportional to weight); the
    attention map over the feature grid and upsampled over the image.
    Returns (fig, {'feature', 'image', 'heat_grid', 'heat_image'}).
    """
    plt = _plt()
    attn_map = np.asarray(attn_map, dtype=np.float32)
    H, W = attn_map.shape
    img_hw = image.shape[:2]
    names = (["feature"] if feature is not None else []) + ["image", "heat_grid", "heat_image"]
    fig, row = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.9), squeeze=False)
    axes = dict(zip(names, row[0]))
    if feature is not None:
        _show_grid(axes["feature"], np.asarray(feature), cmap="gray")
        _mark(axes["feature"], attn_map, cell, None, k)
        axes["feature"].set_title("features (cells)", fontsize=9)
    _show_image(axes["image"], image)
    _mark(axes["image"], attn_map, cell, img_hw, k)
    axes["image"].set_title(f"image, query cell row {cell[0]} col {cell[1]}", fontsize=9)
    im = _show_grid(axes["heat_grid"], attn_map, cmap="jet", vmin=0, gid="heat")
    _mark(axes["heat_grid"], attn_map, cell, None, 0)
    fig.colorbar(im, ax=axes["heat_grid"], fraction=0.046, pad=0.02)
    axes["heat_grid"].set_title(f"attention {H}x{W} (cells)", fontsize=9)
    _overlay(axes["heat_image"], image, attn_map, upsample)
    _mark(axes["heat_image"], attn_map, cell, img_hw, 0)
    axes["heat_image"].set_title(f"over the image ({upsample})", fontsize=9)
    for ax in axes.values():
        ax.tick_params(labelsize=7)
    if stats:
        fig.text(0.5, 0.02, stats_text(stats), ha="center", va="bottom", fontsize=9, family="monospace")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if stats else 0, 1, 0.95 if title else 1))
    return fig, axes


def plot_layers(image, entries, pixel=None, k=TOPK, upsample="nearest", title=None):
    """One query across every attention layer: entries = [dict(name, map (H, W), cell, stats,
    image and label optional: what that layer looked at (default `image`), its panel title)].

    First panel: the image with the query pixel; then per layer its map over the image, a cross at
    the query's cell in that layer and the top-k dots. Returns (fig, {'image', name: ax, ...}).
    """
    plt = _plt()
    img_hw = image.shape[:2]
    n = len(entries) + 1
    fig, row = plt.subplots(1, n, figsize=(3.0 * n, 3.9), squeeze=False)
    axes = {"image": row[0][0]}
    _show_image(axes["image"], image)
    if pixel is not None:
        draw_query(axes["image"], (pixel[0] + 0.5, pixel[1] + 0.5))
        axes["image"].set_title(f"query pixel ({pixel[0]}, {pixel[1]})", fontsize=9)
    for ax, e in zip(row[0][1:], entries):
        axes[e["name"]] = ax
        m = np.asarray(e["map"], dtype=np.float32)
        _overlay(ax, e.get("image", image), m, upsample)  # D may look at another (real) image
        _mark(ax, m, e["cell"], img_hw, k)
        H, W = m.shape
        ax.set_title(f"{e.get('label', e['name'])} ({H}x{W}), cell ({e['cell'][0]}, {e['cell'][1]})",
                     fontsize=9)
        if e.get("stats"):
            ax.set_xlabel(stats_text(e["stats"]), fontsize=7, family="monospace")
    return _finish(fig, axes, title)


def plot_queries(image, entries, k=TOPK, upsample="nearest", title=None):
    """Several queries on one image, colour-coded (the SAGAN paper's Figure 1): the image with every
    query's cross in its colour, then each query's map over the image with its cross and top-k dots.
    entries = [dict(map (H, W), cell, stats optional)]. Returns (fig, {'image', 'q0', 'q1', ...})."""
    plt = _plt()
    img_hw = image.shape[:2]
    n = len(entries) + 1
    fig, row = plt.subplots(1, n, figsize=(3.0 * n, 3.7), squeeze=False)
    axes = {"image": row[0][0]}
    _show_image(axes["image"], image)
    axes["image"].set_title("queries", fontsize=9)
    for q, (ax, e) in enumerate(zip(row[0][1:], entries)):
        color = QUERY_COLORS[q % len(QUERY_COLORS)]
        m = np.asarray(e["map"], dtype=np.float32)
        draw_query(axes["image"], cell_to_pixel(*e["cell"], m.shape, img_hw), color=color)
        axes[f"q{q}"] = ax
        _overlay(ax, image, m, upsample, cmap="gray", alpha=0.7)
        _mark(ax, m, e["cell"], img_hw, k, color=color)
        ax.set_title(f"query {q}: cell ({e['cell'][0]}, {e['cell'][1]})", fontsize=9, color="black")
        for side in ax.spines.values():
            side.set_edgecolor(color), side.set_linewidth(3)
        if e.get("stats"):
            ax.set_xlabel(stats_text(e["stats"]), fontsize=7, family="monospace")
    return _finish(fig, axes, title)


def plot_grid(images, maps, cell, k=TOPK, ncols=4, show_map=True, upsample="nearest", titles=None,
              title=None):
    """One query cell across many images (the heykeetae README figure): per image its map (when
    show_map), the query cross and the top-k dots. Returns (fig, [ax per image])."""
    plt = _plt()
    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.5 * nrows + 0.4), squeeze=False)
    axes = []
    for idx, ax in enumerate(grid.ravel()):
        if idx >= n:
            ax.axis("off")
            continue
        m = np.asarray(maps[idx], dtype=np.float32)
        img_hw = images[idx].shape[:2]
        if show_map:
            _overlay(ax, images[idx], m, upsample, alpha=0.35)
        else:
            _show_image(ax, images[idx])
        _mark(ax, m, cell, img_hw, k)
        ax.set_xticks([]), ax.set_yticks([])
        if titles:
            ax.set_title(titles[idx], fontsize=8)
        axes.append(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, axes


def plot_saliency(image, saliency, title=None):
    """Key saliency per layer over the image: {name: (H, W) attention received per key, summed over
    queries (1 = the uniform share)}. Returns (fig, {'image', name: ax})."""
    plt = _plt()
    h, w = image.shape[:2]
    n = len(saliency) + 1
    fig, row = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    axes = {"image": row[0][0]}
    _show_image(axes["image"], image)
    for ax, (name, sal) in zip(row[0][1:], saliency.items()):
        axes[name] = ax
        _show_image(ax, image)
        im = ax.imshow(np.asarray(sal), extent=(0, w, h, 0), interpolation="nearest", cmap="magma",
                       alpha=0.7, gid="heat")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        s = np.asarray(sal)
        ax.set_title(f"{name}: attention received\nmax {s.max():.1f}x uniform", fontsize=9)
    return _finish(fig, axes, title)


def save_figure(fig, path, dpi=100):
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return path


def figure_png(fig, dpi=90):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


# ============================================================================ model -> figure
# What the notebook and the CLI call: a network, seeds and a query in, a figure out.

class Explorer:
    """A generator (and optionally a discriminator) with a cache of the runs it has made.

    Queries are image pixels (x, y) or, with `cell=`, feature cells of the named layer. D sees the
    generated image, or a real image passed as `d_image` (3, h, w) in [-1, 1] (see load_image).
    Everything lower level (run_net with any z, attention_rows, the statistics, the plot_*
    functions) is usable on its own.
    """

    def __init__(self, G, D=None, step=None):
        self.G, self.D, self.step = G, D, step
        self.imsize = G.image_size
        self.img_hw = (G.image_size, G.image_size)
        self.device = next(G.parameters()).device
        self.layers = dict(attention_layers(G))
        if D is not None:
            self.layers.update(attention_layers(D))
        self._run = lru_cache(maxsize=32)(self._run_uncached)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", with_d=False):
        return cls(*load_models(path, device, with_d))

    def describe(self):
        g = ", ".join(f"{n} {tuple(self.feature_hw(n))} gamma {gamma(l):+.4f}" for n, l in self.layers.items())
        at = f" at step {self.step}" if self.step is not None else ""
        return f"{self.imsize}px generator{at}, z_dim {self.G.z_dim}; attention: {g or 'none'}"

    def pick_layer(self, name=None):
        """`name` checked, or by default the generator's largest attention layer."""
        if name is None:
            g = [n for n in self.layers if n.startswith("G")]
            if not g:
                raise ValueError("this generator has no attention layer (trained with --g_attn none); "
                                 "name a D layer")
            return g[-1]
        return check_layer(name, self.layers)

    def default_pixel(self):
        """About the left eye (image left) of a centred face: built-in faces and CelebA's 160px crop."""
        return round(0.38 * self.imsize), round(0.48 * self.imsize)

    def feature_hw(self, name):
        return (parse_layer(name)[1],) * 2

    def _run_uncached(self, seed):
        z = z_for_seeds([seed], self.G.z_dim).to(self.device)
        img, feats, _ = run_net(self.G, z)
        if self.D is not None:
            feats.update(run_net(self.D, img)[1])  # D looks at the image G just made
        return img[0], feats

    def run(self, seed):
        """(image (3, h, w) in [-1, 1], {layer: features (1, C, H, W)}) for one seed, cached."""
        return self._run(int(seed))

    def features(self, seed, name, d_image=None):
        """The input of layer `name` for seed's image, or for D on a real image `d_image`."""
        if d_image is not None and name.startswith("D"):
            x = d_image.to(self.device).reshape(1, 3, *self.img_hw)
            return run_net(self.D, x)[1][name]
        return self.run(seed)[1][name]

    def image(self, seed, name=None, d_image=None):
        """The image layer `name` looked at, (h, w, 3) in [0, 1]."""
        if d_image is not None and name and name.startswith("D"):
            return to_image(d_image.reshape(3, *self.img_hw))
        return to_image(self.run(seed)[0])

    def query(self, seed, name, pixel=None, cell=None, d_image=None):
        """(cell, map (H, W) numpy, stats) for one query of one layer."""
        name = check_layer(name, self.layers)
        f = self.features(seed, name, d_image)
        H, W = f.shape[2:]
        cell = resolve_query((H, W), self.img_hw, pixel, cell, name)
        n = cell_to_index(*cell, W)
        row = attention_rows(self.layers[name], f, torch.tensor([n]))[0, 0].cpu()  # (N,)
        stats = map_stats(row, n, (H, W), self.img_hw, self.layers[name])
        return cell, row.reshape(H, W).numpy(), stats

    def query_figure(self, seed=0, layer=None, pixel=None, cell=None, k=TOPK, upsample="nearest",
                     channel=None, d_image=None):
        layer = self.pick_layer(layer)
        cell, m, stats = self.query(seed, layer, pixel, cell, d_image)
        feature = feature_image(self.features(seed, layer, d_image)[0], channel)
        src = "real image" if d_image is not None and layer.startswith("D") else f"seed {seed}"
        return plot_query(self.image(seed, layer, d_image), m, cell, feature, k, upsample, stats,
                          title=f"{layer}, {src}, channel {'mean' if channel is None else channel}")

    def layers_figure(self, seed=0, pixel=None, layers=None, k=TOPK, upsample="nearest", d_image=None):
        pixel = pixel if pixel is not None else self.default_pixel()
        check_pixel(*pixel, self.img_hw)
        entries = []
        for name in layers or list(self.layers):
            name = check_layer(name, self.layers)
            cell, m, stats = self.query(seed, name, pixel=pixel, d_image=d_image)
            real = d_image is not None and name.startswith("D")
            entries.append(dict(name=name, map=m, cell=cell, stats=stats,
                                image=self.image(seed, name, d_image),
                                label=f"{name} on the real image" if real else name))
        src = ", D on a real image" if d_image is not None else ""
        return plot_layers(self.image(seed), entries, pixel, k, upsample,
                           title=f"seed {seed}{src}: every attention layer, query pixel {tuple(pixel)}")

    def queries_figure(self, seed=0, layer=None, pixels=None, k=TOPK, upsample="nearest"):
        layer = self.pick_layer(layer)
        s = self.imsize
        pixels = pixels or [(s // 4, s // 3), (3 * s // 4, s // 3), (s // 2, 3 * s // 4), (s // 8, s // 8)]
        entries = []
        for p in pixels:
            cell, m, stats = self.query(seed, layer, pixel=p)
            entries.append(dict(map=m, cell=cell, stats=stats))
        return plot_queries(self.image(seed), entries, k, upsample, title=f"{layer}, seed {seed}")

    def grid_figure(self, seeds=range(8), layer=None, pixel=None, cell=None, k=TOPK, ncols=4,
                    upsample="nearest"):
        layer = self.pick_layer(layer)
        images, maps = [], []
        for s in seeds:
            c, m, _ = self.query(s, layer, pixel, cell)
            images.append(self.image(s))
            maps.append(m)
        return plot_grid(images, maps, c, k, ncols, upsample=upsample,
                         titles=[f"seed {s}" for s in seeds],
                         title=f"{layer}, query cell ({c[0]}, {c[1]}) across images")

    def saliency_figure(self, seed=0, layers=None):
        _, feats = self.run(seed)
        sal = {}
        for name in layers or list(self.layers):
            name = check_layer(name, self.layers)
            sal[name] = key_saliency(self.layers[name], feats[name])[0].cpu().numpy()
        return plot_saliency(self.image(seed), sal, title=f"key saliency, seed {seed}")

    def table(self, n_images=16, n_queries=64, k=TOPK, seed0=1000):
        seeds = list(range(seed0, seed0 + n_images))
        t = layer_statistics(self.G, seeds, n_queries, k, self.D)
        return format_table(t, n_images, n_queries), t

    # ------------------------------------------------------------------ interaction
    def explore(self, seed=0, layer=None, pixel=None, k=TOPK, upsample="nearest", max_seed=999):
        """Sliders for seed, query pixel, layer, top-k and upsampling over the query figure.

        Displayed with the figure as a PNG beside the widget: a front end that runs widgets shows the
        live widget, one that does not (nbclient, nbconvert, GitHub) shows the same figure, static.
        """
        import ipywidgets as w
        layer = self.pick_layer(layer)
        px = pixel or self.default_pixel()
        ctl = dict(
            seed=w.IntSlider(value=seed, min=0, max=max_seed, description="seed"),
            x=w.IntSlider(value=px[0], min=0, max=self.imsize - 1, description="query x"),
            y=w.IntSlider(value=px[1], min=0, max=self.imsize - 1, description="query y"),
            layer=w.Dropdown(options=list(self.layers), value=layer, description="layer"),
            k=w.IntSlider(value=k, min=0, max=50, description="top-k"),
            upsample=w.ToggleButtons(options=["nearest", "bilinear"], value=upsample,
                                     description="upsample"))
        view = w.Image(format="png")

        def render(_=None):
            v = {n: c.value for n, c in ctl.items()}
            fig, _ = self.query_figure(v["seed"], v["layer"], (v["x"], v["y"]), k=v["k"],
                                       upsample=v["upsample"])
            view.value = figure_png(fig)
        for c in ctl.values():
            c.observe(render, names="value")
        render()
        box = w.VBox([w.HBox([ctl["seed"], ctl["layer"]]), w.HBox([ctl["x"], ctl["y"]]),
                      w.HBox([ctl["k"], ctl["upsample"]]), view])
        return WidgetWithFallback(box, view)


class WidgetWithFallback:
    """Displays as the widget where widgets run, else as the PNG the widget is showing: the
    mimebundle carries both, and front ends pick the richest type they can render."""

    def __init__(self, widget, image):
        self.widget, self.image = widget, image

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        bundle = dict(bundle)
        bundle["image/png"] = base64.b64encode(self.image.value).decode("ascii")  # as Jupyter stores it
        bundle["text/plain"] = "attention explorer (run the notebook in Jupyter for the sliders)"
        return bundle
