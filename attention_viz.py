"""Figures of SAGAN's self-attention and the Explorer that makes them from a checkpoint;
`visualize_attn.py` (CLI) and `visualize_attn.ipynb` are thin calls into this module. The numbers
and the geometry (layer names, pixel <-> cell, rows, statistics) come from `attention.py`, whose
conventions every figure keeps.
"""
import base64
import io
import math
import os
from functools import lru_cache

import numpy as np
import torch

from attention import (TOPK, attention_layers, attention_rows, cell_to_index, cell_to_pixel, check_layer,
                       check_pixel, contribution_rows, face_pixels, feature_image, format_table, gamma,
                       intervene, key_saliency, layer_statistics, map_hw, map_stats, resolve_query,
                       run_net, stats_text, to_image, topk_cells, upsample_map, z_for_seeds)
from checkpoint import CheckpointError, list_checkpoints, load_models

QUERY_COLORS = ["red", "lime", "cyan", "magenta", "yellow", "orange", "white", "deepskyblue"]


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
        _show_grid(bottom, m, cmap="jet", vmin=0, gid="heat")
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


# ============================================================================ model -> figure
# What the notebook and the CLI call: a network, seeds and a query in, a figure out.

class Explorer:
    """A generator (and optionally a discriminator) with a cache of the runs it has made.

    Queries are image pixels (x, y) or, with `cell=`, feature cells of the named layer. D sees the
    generated image, or a real image passed as `d_image` (3, h, w) in [-1, 1] (see
    attention.load_image). `generator` names the weights G holds ('EMA G', 'raw G'); the
    description, every figure's title and the table say it. Everything lower level (attention.py's
    run_net with any z, attention_rows, the statistics; the plot_* functions) is usable on its own.
    """

    def __init__(self, G, D=None, step=None, generator=None):
        self.G, self.D, self.step, self.generator = G, D, step, generator
        self.imsize = G.image_size
        self.img_hw = (G.image_size, G.image_size)
        self.device = next(G.parameters()).device
        self.layers = dict(attention_layers(G))
        if D is not None:
            self.layers.update(attention_layers(D))
        self._run = lru_cache(maxsize=32)(self._run_uncached)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", with_d=False, ema=True, verbose=True):
        """The EMA generator when the checkpoint has one, the raw G with ema=False (it says which,
        unless `verbose` is false)."""
        m = load_models(path, device, ema=ema, with_d=with_d, verbose=verbose)
        return cls(m.G, m.D, m.step, m.generator)

    def describe(self):
        g = ", ".join(f"{n} {map_hw(n)} gamma {gamma(l):+.4f}" for n, l in self.layers.items())
        at = f" at step {self.step}" if self.step is not None else ""
        weights = f", weights of the {self.generator}" if self.generator else ""
        return f"{self.imsize}px generator{at}, z_dim {self.G.z_dim}{weights}; attention: {g or 'none'}"

    def _title(self, text):
        return f"{self.generator}: {text}" if self.generator else text

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
        """The left eye (image left) of a centred face: attention.FACE_QUERIES."""
        return face_pixels(self.imsize)["left eye"]

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

    def contribution(self, seed, name, pixel=None, cell=None, d_image=None):
        """(cell, weights (H, W), contribution (H, W), ||x||) for one query of one layer: the
        attention row and ||gamma * a_qk * v_k|| per key (attention.contribution_rows) as numpy
        maps, and the norm of the layer's input at the query, the scale they add to."""
        name = check_layer(name, self.layers)
        f = self.features(seed, name, d_image)
        H, W = f.shape[2:]
        cell = resolve_query((H, W), self.img_hw, pixel, cell, name)
        n = torch.tensor([cell_to_index(*cell, W)])
        layer = self.layers[name]
        weights = attention_rows(layer, f, n)[0, 0].reshape(H, W).cpu().numpy()
        contrib = contribution_rows(layer, f, n)[0, 0].reshape(H, W).cpu().numpy()
        return cell, weights, contrib, float(f[0, :, cell[0], cell[1]].norm())

    def intervention(self, seed, name, pixel=None, cell=None, mode="uniform"):
        """(cell, image, changed image), both (h, w, 3) in [0, 1]: seed's image with the attention
        row of one query of G layer `name` replaced (attention.intervene: 'uniform', 'mean_row' or
        'remove'), every other query and layer as trained."""
        name = check_layer(name, self.layers)
        if not name.startswith("G"):
            raise ValueError(f"{name} is a discriminator layer: an intervention there changes D's score, "
                             f"not the image (the table's delta columns measure it); pick a G layer")
        H, W = map_hw(name)
        cell = resolve_query((H, W), self.img_hw, pixel, cell, name)
        z = z_for_seeds([seed], self.G.z_dim).to(self.device)
        with torch.no_grad(), intervene(self.layers[name], mode, queries=[cell_to_index(*cell, W)]):
            changed = self.G(z)[0]
        return cell, self.image(seed), to_image(changed)

    def query_figure(self, seed=0, layer=None, pixel=None, cell=None, k=TOPK, upsample="nearest",
                     channel=None, d_image=None):
        layer = self.pick_layer(layer)
        cell, m, stats = self.query(seed, layer, pixel, cell, d_image)
        feature = feature_image(self.features(seed, layer, d_image)[0], channel)
        src = "real image" if d_image is not None and layer.startswith("D") else f"seed {seed}"
        return plot_query(self.image(seed, layer, d_image), m, cell, feature, k, upsample, stats,
                          title=self._title(f"{layer}, {src}, channel {'mean' if channel is None else channel}"))

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
                           title=self._title(f"seed {seed}{src}: every attention layer, query pixel {tuple(pixel)}"))

    def queries_figure(self, seed=0, layer=None, pixels=None, k=TOPK, upsample="nearest"):
        layer = self.pick_layer(layer)
        s = self.imsize
        pixels = pixels or [(s // 4, s // 3), (3 * s // 4, s // 3), (s // 2, 3 * s // 4), (s // 8, s // 8)]
        entries = []
        for p in pixels:
            cell, m, stats = self.query(seed, layer, pixel=p)
            entries.append(dict(map=m, cell=cell, stats=stats))
        return plot_queries(self.image(seed), entries, k, upsample, title=self._title(f"{layer}, seed {seed}"))

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
                         title=self._title(f"{layer}, query cell ({c[0]}, {c[1]}) across images"))

    def contribution_figure(self, seed=0, layer=None, pixel=None, cell=None, k=TOPK, upsample="nearest",
                            d_image=None):
        layer = self.pick_layer(layer)
        cell, weights, contrib, x_norm = self.contribution(seed, layer, pixel, cell, d_image)
        src = "real image" if d_image is not None and layer.startswith("D") else f"seed {seed}"
        return plot_contribution(self.image(seed, layer, d_image), weights, contrib, cell, k, upsample, x_norm,
                                 title=self._title(f"{layer}, {src}: weights and what each key adds"))

    def intervention_figure(self, seed=0, layer=None, pixel=None, cell=None, mode="uniform"):
        layer = self.pick_layer(layer)
        cell, image, changed = self.intervention(seed, layer, pixel, cell, mode)
        what = dict(uniform="replaced by uniform weights", mean_row="replaced by the mean row",
                    remove="removed")[mode]
        return plot_intervention(image, changed, cell, map_hw(layer),
                                 title=self._title(f"{layer}, seed {seed}: the query's attention {what}"))

    def saliency_figure(self, seed=0, layers=None):
        _, feats = self.run(seed)
        sal = {}
        for name in layers or list(self.layers):
            name = check_layer(name, self.layers)
            sal[name] = key_saliency(self.layers[name], feats[name])[0].cpu().numpy()
        return plot_saliency(self.image(seed), sal, title=self._title(f"key saliency, seed {seed}"))

    def table(self, n_images=16, n_queries=64, k=TOPK, seed0=1000):
        seeds = list(range(seed0, seed0 + n_images))
        t = layer_statistics(self.G, seeds, n_queries, k, self.D)
        return format_table(t, n_images, n_queries, self.generator), t

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


# ============================================================================ through training

def film_checkpoints(path, max_frames=None):
    """The checkpoints a film shows, oldest first: every step checkpoint (list_checkpoints) of the
    run folder `path` is or lies in, at most `max_frames` of them evenly spaced, always the last. A
    file beside no step checkpoint (an exported or seed-format model) makes a film of one frame."""
    if os.path.isdir(path):
        paths = list_checkpoints(path)
        if not paths:
            raise CheckpointError(f"run folder {path!r} holds no step checkpoints (ckpt_*.pt)")
    else:  # a missing file stays, for load_models to say what is wrong with it
        folder = os.path.dirname(os.path.abspath(path))
        paths = (list_checkpoints(folder) if os.path.isfile(path) else []) or [path]
    n = len(paths)
    if max_frames and n > max_frames:
        picks = [round(i * (n - 1) / (max_frames - 1)) for i in range(max_frames)] if max_frames > 1 else [n - 1]
        paths = [paths[i] for i in picks]
    return paths


class Film:
    """The same z (seed) and the same query across the saved checkpoints of a run: how a layer's
    attention formed during training. Each checkpoint opens through Explorer.from_checkpoint (the
    EMA G unless ema=False); frames keep only what the figures draw, so a long run costs one model
    in memory at a time. `path` is a run folder or any checkpoint in one (see film_checkpoints)."""

    def __init__(self, path, seed=0, layer=None, pixel=None, cell=None, max_frames=12, device="cpu",
                 ema=True, with_d=False, d_image=None):
        self.paths = film_checkpoints(path, max_frames)
        self.frames = []
        for i, p in enumerate(self.paths):
            ex = Explorer.from_checkpoint(p, device, with_d=with_d, ema=ema, verbose=i == 0)
            name = ex.pick_layer(layer)
            if pixel is None and cell is None:
                pixel = ex.default_pixel()
            c, m, stats = ex.query(seed, name, pixel, cell, d_image)
            self.frames.append(dict(step=ex.step, image=ex.image(seed, name, d_image), map=m, cell=c,
                                    stats=stats))
        query = f"pixel ({pixel[0]}, {pixel[1]})" if pixel is not None else f"cell ({c[0]}, {c[1]})"
        self.seed, self.layer, self.pixel, self.cell = seed, name, pixel, cell  # what it shows
        self.title = ex._title(f"{name}, seed {seed},\nquery {query} through training")

    @property
    def steps(self):
        return [f["step"] for f in self.frames]

    def figure(self, k=TOPK):
        """The strip: one column per checkpoint (plot_film)."""
        return plot_film(self.frames, k, self.title)

    def save_gif(self, path, k=TOPK, seconds=0.8):
        return save_film_gif(self.frames, path, k, self.title, seconds)

    def explore(self, k=TOPK):
        """A slider over the saved steps showing that checkpoint's column; headless, the last
        step's column as a still image (WidgetWithFallback)."""
        import ipywidgets as w
        slider = w.SelectionSlider(options=[(str(s), i) for i, s in enumerate(self.steps)],
                                   value=len(self.frames) - 1, description="step")
        view = w.Image(format="png")

        def render(_=None):
            view.value = figure_png(plot_film([self.frames[slider.value]], k, self.title)[0])
        slider.observe(render, names="value")
        render()
        return WidgetWithFallback(w.VBox([slider, view]), view)


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

