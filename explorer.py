"""The attention explorer session: which checkpoint to open, an `Explorer` over its generator (and
discriminator) that turns a seed and a query into rows, numbers and figures, a `Film` of one query
through a run's saved checkpoints, and their notebook widgets. `visualize_attn.py` (the command line)
and `visualize_attn.ipynb` (the notebook) are thin calls into this module.

The maths comes from `attention.py`, the numbers from `attention_stats.py`, the drawing from
`attention_figures.py`; the standalone page from `attention_page.py`.
"""
import base64
import html
import io
import os
import warnings
from functools import lru_cache

import torch
from PIL import Image

from attention import (TOPK, attention_layers, attention_rows, cell_to_index, check_layer, check_pixel,
                       contribution_rows, face_pixels, feature_image, gamma, intervene, key_saliency,
                       map_hw, resolve_query, run_net, z_for_seeds)
from attention_figures import (figure_png, plot_contribution, plot_film, plot_grid, plot_intervention,
                               plot_layers, plot_queries, plot_query, plot_saliency, save_figure,
                               save_film_gif)
from attention_page import build_page
from attention_stats import format_table, layer_statistics, map_stats
from checkpoint import (CheckpointError, atomic_save, list_checkpoints, load_checkpoint, load_models,
                        saved_steps)
from utils import to_image

ROOT = os.path.dirname(os.path.abspath(__file__))

# ============================================================================ which checkpoint

SHOWCASE = os.path.join(ROOT, "assets", "showcase_celeba64.pt")  # tools/showcase.py makes it


def export_models(path, out, with_d=True):
    """A small copy of a checkpoint for sharing: the EMA generator (the raw G when there is none)
    and, `with_d`, D, in fp16, with the step, config and model_args; no optimizer or RNG state, so
    it can be explored but not resumed. load_models opens it like any checkpoint."""
    def half(state):
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    ckpt = load_checkpoint(path)
    small = dict(step=ckpt.get("step"), config=ckpt.get("config", {}), exported_from=os.path.basename(path),
                 model_args=ckpt["model_args"])
    small["G_ema" if "G_ema" in ckpt else "G"] = half(ckpt.get("G_ema", ckpt.get("G")))
    if with_d:
        small["D"] = half(ckpt["D"])
    atomic_save(small, out)
    return out


def find_checkpoint(path=None, runs="models"):
    """(checkpoint, why) the explorer opens: `path` when given, else $SAGAN_CHECKPOINT, else the
    newest local run's latest.pt under `runs`, else the showcase model shipped in assets/."""
    if path:
        return path, "given"
    if os.environ.get("SAGAN_CHECKPOINT"):
        return os.environ["SAGAN_CHECKPOINT"], "from $SAGAN_CHECKPOINT"
    local = [p for p in (os.path.join(runs, d, "latest.pt") for d in sorted(os.listdir(runs)))
             if os.path.isfile(p)] if os.path.isdir(runs) else []
    if local:
        return max(local, key=os.path.getmtime), f"the newest run under {runs}/"
    if os.path.isfile(SHOWCASE):
        return SHOWCASE, "no --checkpoint and no local run: the showcase model shipped in assets/"
    raise CheckpointError(f"no checkpoint given, no run under {runs!r} and no showcase model at "
                          f"{SHOWCASE!r}: pass --checkpoint (or set SAGAN_CHECKPOINT), or train one "
                          f"with `make demo`")


# ============================================================================ model -> figure
# What the notebook and the CLI call: a network, seeds and a query in, a figure out.

class Explorer:
    """A generator (and optionally a discriminator) with a cache of the runs it has made.

    Queries are image pixels (x, y) or, with `cell=`, feature cells of the named layer. D sees the
    generated image, or a real image passed as `d_image` (3, h, w) in [-1, 1] (see
    data_loader.load_image). `generator` names the weights G holds ('EMA G', 'raw G'); the
    description, every figure's title and the table say it. Everything lower level (attention.py's
    run_net with any z and attention_rows, attention_stats, attention_figures' plot_* functions) is
    usable on its own.
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
            show_png(view, figure_png(fig))
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


def run_film(checkpoint, seed=0, layer=None, pixel=None, cell=None, max_frames=12, device="cpu", ema=True):
    """The Film of `checkpoint`'s run when the run folder holds at least two saved steps, else None
    (one frame is no film): what the page's slider through training shows."""
    if len(saved_steps(os.path.dirname(os.path.abspath(checkpoint)))) < 2:
        return None
    return Film(checkpoint, seed, layer, pixel, cell, max_frames, device, ema=ema)


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

    def save(self, path, k=TOPK, dpi=100):
        """The strip at `path` and the animated GIF beside it (same name, .gif): (strip, gif)."""
        gif = self.save_gif(os.path.splitext(path)[0] + ".gif", k)
        save_figure(self.figure(k)[0], path, dpi=dpi)
        return path, gif

    def explore(self, k=TOPK):
        """A slider over the saved steps showing that checkpoint's column; headless, the last
        step's column as a still image (WidgetWithFallback)."""
        import ipywidgets as w
        slider = w.SelectionSlider(options=[(str(s), i) for i, s in enumerate(self.steps)],
                                   value=len(self.frames) - 1, description="step")
        view = w.Image(format="png")

        def render(_=None):
            show_png(view, figure_png(plot_film([self.frames[slider.value]], k, self.title)[0]))
        slider.observe(render, names="value")
        render()
        return WidgetWithFallback(w.VBox([slider, view]), view)


# ============================================================================ notebook

def png_size(png):
    """(width, height) in pixels of PNG bytes, from its header."""
    with Image.open(io.BytesIO(png)) as im:
        return im.size


def show_png(view, png):
    """Put PNG bytes in an ipywidgets Image at the PNG's own pixel size: without a size, JupyterLab
    stretches the image to the output's width (a 252 px film column became 1064 px, blurred). An
    output narrower than the image shrinks it, keeping its proportions."""
    width, _ = png_size(png)
    view.value = png
    view.width = str(width)
    view.layout.width, view.layout.height, view.layout.max_width = f"{width}px", "auto", "100%"


class WidgetWithFallback:
    """Displays as the widget where widgets run, else as the PNG the widget is showing, at its own
    pixel size: the mimebundle carries both, and front ends pick the richest type they can render."""

    def __init__(self, widget, image):
        self.widget, self.image = widget, image

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        bundle = dict(bundle)
        bundle["image/png"] = base64.b64encode(self.image.value).decode("ascii")  # as Jupyter stores it
        bundle["text/plain"] = "attention explorer (run the notebook in Jupyter for the sliders)"
        width, height = png_size(self.image.value)
        return bundle, {"image/png": dict(width=width, height=height)}


# the page's own height, read by the notebook's iframe: once loaded and whenever the page's content
# changes size (its panels are built after the data is inflated, asynchronously)
FIT_TO_PAGE = ("const f = this, d = f.contentDocument; "
               "const fit = () => { f.style.height = Math.ceil(d.documentElement.getBoundingClientRect().height) + 'px'; }; "
               "fit(); new ResizeObserver(fit).observe(d.documentElement);")


def notebook_page(ex, seeds=range(4), k=TOPK):
    """The standalone page (attention_page.build_page) as a notebook output: an iframe holding it
    (srcdoc), so a click on the image picks the query in JupyterLab and VS Code as in the file, as
    tall as the page (FIT_TO_PAGE: no inner scroll bar). A static render of the notebook shows no
    page (the notebook's figure cells are its still images)."""
    from IPython.display import HTML
    srcdoc = html.escape(build_page(ex, list(seeds), k), quote=True)
    fit = html.escape(FIT_TO_PAGE, quote=True)
    with warnings.catch_warnings():  # IPython suggests IFrame, which takes a URL: the page has none
        warnings.simplefilter("ignore", UserWarning)
        return HTML(f'<iframe srcdoc="{srcdoc}" onload="{fit}" '
                    f'style="width: 100%; height: 720px; border: 0"></iframe>')
