"""Where does a pixel of a generated image look? The maths of SAGAN's self-attention: which layers a
network has, pixel <-> feature-cell geometry, the attention rows of chosen queries, what each key
adds, and interventions that change a layer's attention. No statistics and no plotting here:
`attention_stats.py` summarises rows into the table, `attention_figures.py` draws them, and
`explorer.py`, the dashboard's attention panel and `experiments/` read rows and query positions here.

Conventions every attention module keeps:
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
floats per image. Full maps are made only where a statistic needs every row (key saliency, the
mean row), and then in chunks of rows.

Weights alone do not say whether a layer matters: `intervene` changes a layer's attention and
`intervention_deltas` measures what that does to the image (or D's score); `contribution_rows`
weighs each key by the size of what it actually adds to the query's output.
"""
import re
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from sagan_models import Generator

TOPK = 10
LAYER_RE = re.compile(r"^([GgDd])(\d+)$")

# Named query points of a centred face, as fractions of the image side (x to the right, y down;
# "left" is the image's left): the eyes, centre and mouth of the built-in faces and of centre-cropped
# aligned CelebA. The explorer's default query, the dashboard's panel and the ablation's eye
# statistic all read them here (face_pixels).
FACE_QUERIES = (("left eye", 0.38, 0.49), ("right eye", 0.62, 0.49),
                ("centre", 0.50, 0.62), ("mouth", 0.50, 0.74))


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


def map_hw(name):
    """(H, W) of a layer's feature map: square, its resolution ('G16' -> (16, 16))."""
    return (parse_layer(name)[1],) * 2


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


def face_pixels(imsize):
    """{name: (x, y)}: the image pixel holding each FACE_QUERIES point of an imsize x imsize image."""
    return {name: (int(fx * imsize), int(fy * imsize)) for name, fx, fy in FACE_QUERIES}


def pixel_queries(net, pixels):
    """{layer name: LongTensor (Q,)}: for every attention layer of `net`, the flattened index of the
    cell holding each image pixel (x, y) of `pixels`; what run_net takes as `queries`."""
    img_hw = (net.image_size, net.image_size)
    out = {}
    for name in attention_layers(net):
        hw = map_hw(name)
        out[name] = torch.tensor([cell_to_index(*pixel_to_cell(x, y, hw, img_hw), hw[1]) for x, y in pixels])
    return out


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
    saliency sums to N and a key receiving exactly its uniform share scores 1. The layer's own
    weights, also while an intervention is set on it."""
    B, _, H, W = features.shape
    N = H * W
    total = torch.zeros(B, N, dtype=torch.float64, device=features.device)
    for s in range(0, N, chunk):
        idx = torch.arange(s, min(s + chunk, N))
        # .forward, not the call: past intervene's hook, which calls this for the mean row
        total += layer.forward(features, return_attn=True, queries=idx)[1].double().sum(dim=1)
    return total.reshape(B, H, W).float()  # (B, H, W)


@torch.no_grad()
def contribution_rows(layer, features, queries, rows=None):
    """What each key adds to each query's output, ||gamma * a_qk * v_k|| over channels: (B, Q, N)
    for flattened query indices `queries` (Q,); `rows`, those queries' attention rows when the
    caller has them already.

    The layer adds gamma * sum_k a_qk v_k to query q, so a key with a large weight but a small
    value vector adds little, and a light key with a large one can add a lot (Kobayashi et al.
    2020). Norms of the terms, not of the sum: terms pointing different ways partly cancel."""
    if rows is None:
        rows = attention_rows(layer, features, queries)           # (B, Q, N)
    v_norm = layer.project(features)[2].norm(dim=1)               # (B, N)
    return layer.gamma.abs() * rows * v_norm.unsqueeze(1)         # (B, Q, N)


@torch.no_grad()
def attention_share(layer, features):
    """||gamma * attention_output|| / ||x|| per image: how much the layer changes its input. gamma
    alone can mislead, since its effect scales with the attention output's size."""
    out, _ = layer(features, return_attn=False)
    delta = (out - features).flatten(1).norm(dim=1)
    return (delta / features.flatten(1).norm(dim=1).clamp_min(1e-12)).cpu()  # (B,)


def feature_image(features, channel=None):
    """(C, H, W) -> (H, W): the mean over channels, or one channel."""
    if channel is None:
        return features.mean(0).cpu().numpy()
    if not 0 <= channel < features.shape[0]:
        raise ValueError(f"channel {channel} does not exist: this layer has {features.shape[0]} "
                         f"channels (0..{features.shape[0] - 1})")
    return features[channel].cpu().numpy()


# ============================================================================ interventions

INTERVENTIONS = ("remove", "uniform", "mean_row")  # the no-argument ones (the CLI's choices); also "values"


@contextmanager
def intervene(layer, mode, queries=None, values=None, keys=None):
    """Within the block, `layer` (a Self_Attn) runs with its attention term changed:

        'remove'    gamma * o -> 0: the layer passes its input on unchanged (out = x)
        'uniform'   every query weighs every key 1/N: its o is the mean of the value vectors
        'mean_row'  every query uses the mean of all N queries' rows: one map for every query
                    (GCNet's test of whether non-local attention depends on the query)
        'values'    the layer's own weights, but the value vectors at the flattened key indices
                    `keys` replaced by `values` (B, C, N), e.g. another z's: what those keys carry

    `queries` (flattened indices, (Q,)) limits the change to those query positions; the others keep
    the layer's own output. The maps the layer returns are the weights it used ('remove': its own,
    which no longer reach the output). A forward hook, there only inside the block: the training
    path runs no extra code.
    """
    if mode not in (*INTERVENTIONS, "values"):
        raise ValueError(f"intervention {mode!r}: use one of {', '.join(INTERVENTIONS)} or 'values'")
    if (mode == "values") != (values is not None and keys is not None):
        raise ValueError("intervention 'values' takes values (B, C, N) and keys; the others take neither")

    def hook(module, args, kwargs, output):
        x, (out, attention) = args[0], output
        B, C, H, W = x.shape
        N = H * W
        hit = torch.zeros(N, dtype=torch.bool, device=x.device)  # the intervened query positions
        hit[slice(None) if queries is None else torch.as_tensor(queries, device=x.device).long()] = True
        if mode == "remove":
            changed = x
        elif mode == "values":
            q, k, v = module.project(x)                               # (B, C', N), (B, C', N), (B, C, N)
            swap = torch.as_tensor(keys, device=x.device).long()
            v = v.index_copy(2, swap, values.to(v)[:, :, swap])
            rows = hit.nonzero().flatten()                            # only the intervened queries' rows
            a = torch.bmm(q[:, :, rows].transpose(1, 2), k).softmax(dim=-1)  # (B, Q, N)
            changed = x.flatten(2).clone()                            # (B, C, N)
            changed[:, :, rows] += module.gamma * torch.bmm(v, a.transpose(1, 2))
            changed = changed.reshape(B, C, H, W)
        else:
            if mode == "uniform":
                weights = x.new_full((B, N), 1 / N)                   # (B, N), one row for all queries
            else:
                weights = key_saliency(module, x).flatten(1) / N      # (B, N): the mean row
            v = module.project(x)[2]                                  # (B, C, N)
            o = torch.bmm(v, weights.unsqueeze(2))                    # (B, C, 1), the same at every query
            changed = module.gamma * o.reshape(B, C, 1, 1) + x        # (B, C, H, W)
            if attention is not None:
                q = kwargs.get("queries")                             # the returned rows' query indices
                rows = hit if q is None else hit[q.to(x.device)]      # (Q,)
                attention = torch.where(rows[None, :, None], weights[:, None, :], attention)
        return torch.where(hit.reshape(1, 1, H, W), changed, out), attention

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield layer
    finally:
        handle.remove()


@contextmanager
def layers_removed(net, names):
    """Within the block, the attention layers `names` of `net` (e.g. ['G8', 'G16']) add nothing:
    intervene(layer, 'remove') on each, the causal test's 'without this layer'."""
    layers = attention_layers(net)
    with ExitStack() as stack:
        for name in names:
            stack.enter_context(intervene(layers[name], "remove"))
        yield net


@torch.no_grad()
def intervention_deltas(G, z, D=None):
    """{layer: {mode: (B,)}}: per image, the mean absolute change each intervention on each layer
    makes. G layers: of the image G makes from z, in pixel values 0..1. D layers (when D is given):
    of D's score on G's unchanged image. One layer at a time, the rest as trained."""
    img = G(z)
    deltas = {}
    for name, layer in attention_layers(G).items():
        for mode in INTERVENTIONS:
            with intervene(layer, mode):
                # images are in [-1, 1]: half the change is the change in 0..1 pixel values
                deltas.setdefault(name, {})[mode] = ((G(z) - img).abs().flatten(1).mean(1) / 2).cpu()
    if D is not None:
        score = D(img)
        for name, layer in attention_layers(D).items():
            for mode in INTERVENTIONS:
                with intervene(layer, mode):
                    deltas.setdefault(name, {})[mode] = (D(img) - score).abs().cpu()
    return deltas
