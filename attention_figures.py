"""Figures of SAGAN's self-attention, pure functions of arrays (maps, images, cells) that return
(fig, axes): one query in one layer, every layer, several queries, many images, key saliency,
weights beside contributions, an intervention's change and the film through training. Every heat map
of attention uses the one colour scale of `attention_colors.py`, from 0 (so a near-uniform map looks
flat) to the map's maximum. Geometry and conventions: `attention.py`; the captions' numbers:
`attention_stats.py`; a checkpoint in, a figure out: `explorer.py`.
"""
import io
import math

import numpy as np

from attention import TOPK, cell_to_pixel, topk_cells, upsample_map
from attention_colors import CMAP
from attention_stats import stats_text

QUERY_COLORS = ["red", "lime", "cyan", "magenta", "yellow", "orange", "white", "deepskyblue"]


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


def _show_grid(ax, values, cmap=CMAP, **kw):
    H, W = values.shape
    im = ax.imshow(values, extent=(0, W, H, 0), interpolation="nearest", cmap=cmap, **kw)
    ax.set_xlim(0, W), ax.set_ylim(H, 0)
    return im


def _overlay(ax, image, attn_map, upsample, alpha=0.6):
    """Image with the attention map upsampled over it; returns the heat AxesImage."""
    h, w = image.shape[:2]
    _show_image(ax, image)
    up = upsample_map(attn_map, (h, w), upsample)
    # vmin 0: a near-uniform map looks flat instead of having its tiny differences stretched
    return ax.imshow(up, extent=(0, w, h, 0), interpolation="nearest", cmap=CMAP, alpha=alpha,
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
    im = _show_grid(axes["heat_grid"], attn_map, vmin=0, gid="heat")
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
        _overlay(ax, image, m, upsample, alpha=0.7)
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
        im = ax.imshow(np.asarray(sal), extent=(0, w, h, 0), interpolation="nearest", cmap=CMAP,
                       alpha=0.7, vmin=0, gid="heat")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        s = np.asarray(sal)
        ax.set_title(f"{name}: attention received\nmax {s.max():.1f}x uniform", fontsize=9)
    return _finish(fig, axes, title)


def plot_contribution(image, attn_map, contribution, cell, k=TOPK, upsample="nearest", input_norm=None,
                      title=None):
    """The raw weights next to what each key adds: for one query cell, the attention map and the
    contribution map ||gamma * a_qk * v_k|| (attention.contribution_rows), both (H, W), over the
    image with the query cross and each map's own top-k dots. `input_norm`, the norm of the layer's
    input at the query, gives the contributions a scale. Returns (fig, {'weights', 'contribution'})."""
    plt = _plt()
    img_hw = image.shape[:2]
    fig, row = plt.subplots(1, 2, figsize=(6.8, 3.9), squeeze=False)
    axes = dict(zip(("weights", "contribution"), row[0]))
    total = float(np.sum(contribution))
    scale = "" if input_norm is None else f"\n(||x|| at the query: {input_norm:.3g})"
    for name, m, label in (("weights", attn_map, f"attention weights a_qk\nquery cell ({cell[0]}, {cell[1]})"),
                           ("contribution", contribution, f"||gamma a_qk v_k||, sum {total:.3g}{scale}")):
        m = np.asarray(m, dtype=np.float32)
        im = _overlay(axes[name], image, m, upsample)
        _mark(axes[name], m, cell, img_hw, k)
        fig.colorbar(im, ax=axes[name], fraction=0.046, pad=0.02)
        axes[name].set_title(label, fontsize=9)
    return _finish(fig, axes, title)


def plot_intervention(image, changed, cell, map_hw, title=None):
    """What an intervention at one query cell changes in the image: the image, the changed image
    (both (h, w, 3) in [0, 1]) and |changed - image| averaged over colour channels, each with the
    cross at the query cell's centre. Returns (fig, {'image', 'changed', 'diff'})."""
    plt = _plt()
    img_hw = image.shape[:2]
    diff = np.abs(np.asarray(changed, dtype=np.float32) - np.asarray(image, dtype=np.float32)).mean(-1)
    fig, row = plt.subplots(1, 3, figsize=(9.6, 3.7), squeeze=False)
    axes = dict(zip(("image", "changed", "diff"), row[0]))
    _show_image(axes["image"], image)
    _show_image(axes["changed"], changed)
    h, w = img_hw
    # a change of pixel values, not attention: its own scale (magma), so it is not read as a map;
    # vmin 0: an intervention that changes nothing shows as black, not as stretched noise
    im = axes["diff"].imshow(diff, extent=(0, w, h, 0), interpolation="nearest", cmap="magma", vmin=0,
                             vmax=max(float(diff.max()), 1e-12), gid="heat")
    axes["diff"].set_xlim(0, w), axes["diff"].set_ylim(h, 0)
    fig.colorbar(im, ax=axes["diff"], fraction=0.046, pad=0.02)
    for ax in axes.values():
        draw_query(ax, cell_to_pixel(*cell, map_hw, img_hw))
    axes["image"].set_title(f"image, query cell ({cell[0]}, {cell[1]})", fontsize=9)
    axes["changed"].set_title("with the intervention", fontsize=9)
    axes["diff"].set_title(f"|change|: mean {diff.mean():.2g}, max {diff.max():.2g}", fontsize=9)
    return _finish(fig, axes, title)


def plot_film(frames, k=TOPK, title=None):
    """One query through training: a column per checkpoint, the image with the query cross and the
    top-k dots above the layer's map (cell units) with the cross, the step and gamma in the column's
    title. frames = [dict(step, image (h, w, 3), map (H, W), cell, stats)], as film_frames makes
    them. Returns (fig, {'image': [ax per frame], 'map': [ax per frame]})."""
    plt = _plt()
    fig, grid = plt.subplots(2, len(frames), figsize=(max(2.4 * len(frames), 3.4), 5.2), squeeze=False)
    for f, top, bottom in zip(frames, grid[0], grid[1]):
        m = np.asarray(f["map"], dtype=np.float32)
        _show_image(top, f["image"])
        _mark(top, m, f["cell"], f["image"].shape[:2], k)
        top.set_title(f"step {f['step']}\ngamma {f['stats']['gamma']:+.4f}", fontsize=9)
        _show_grid(bottom, m, vmin=0, gid="heat")
        _mark(bottom, m, f["cell"], None, 0)
        s = f["stats"]
        bottom.set_xlabel(f"top-{s['k']} {s['top_mass']:.0%}\nH/logN {s['entropy']:.2f}", fontsize=8)
    for ax in grid.ravel():
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, dict(image=list(grid[0]), map=list(grid[1]))


def figure_rgb(fig, dpi=90):
    """The whole figure as an (h, w, 3) uint8 array at its own size (no tight crop: frames of
    equal figures come out equally large, as an animation needs)."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _plt().close(fig)
    return rgb


def save_film_gif(frames, path, k=TOPK, title=None, seconds=0.8, dpi=90):
    """An animated GIF with one frame per checkpoint, each plot_film's column of that checkpoint,
    looping; the GIF's comment lists the frames' steps."""
    from PIL import Image
    pictures = [Image.fromarray(figure_rgb(plot_film([f], k, title)[0], dpi)) for f in frames]
    steps = ",".join(str(f["step"]) for f in frames)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=int(seconds * 1000),
                     loop=0, comment=f"steps {steps}".encode())
    return path


def save_figure(fig, path, dpi=100):
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return path


def figure_png(fig, dpi=90):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()
