"""Does an eye query's attention carry the other eye's colour? A test at inference, on one generator.

Where a layer looks says nothing about what it takes from there. So, per attention layer of G:

- swap: the layer's queries at the left eye read the value vectors of another face (another z) at
  the right eye, everything else as is (attention.intervene 'values', restricted to those queries):
  if the layer carries the other eye's colour, the left iris changes colour, towards the donor's.
- control: the same swap at the mouth, a region as far from the eye with as much contrast (a
  feature with its own colour, not flat skin); the value vectors' change there is reported beside
  the other eye's, so a difference is not just a larger perturbation.
- randomised query/key weights (Adebayo et al. 2018, "Sanity checks for saliency maps"): the same
  numbers with the layer's query and key projections redrawn at random. What survives this does not
  come from the learned attention pattern.
- where the mass goes, by weights and by contributions ||gamma a v|| (attention.contribution_rows):
  the other eye's region and the mouth's over uniform, for the trained and the randomised layer.

Colours are read by the iris reader (eye_metrics.read_irises) on the image before and after; the
statistics are means over images with 95% bootstrap intervals (uncertainty.summarise).
"""
import copy

import numpy as np
import torch

from attention import attention_layers, contribution_rows, intervene, map_hw, run_net
from experiments.eye_metrics import EYE_RADIUS, read_irises, region_ratio
from experiments.uncertainty import public, summarise
from utils import denorm

MOUTH_Y = 0.72  # the mouth's mean centre (x = 0.5), as a fraction of the side: cy + 0.17, cy ~ 0.55


def cell_box(hw, imsize, x0, x1, y0, y1):
    """(H, W) bool: the cells of an H x W map whose pixel block meets the pixel box [x0, x1] x [y0, y1]."""
    H, W = hw
    xs, ys = np.arange(W) * imsize / W, np.arange(H) * imsize / H
    in_x = (xs + imsize / W > x0) & (xs < x1 + 1)
    in_y = (ys + imsize / H > y0) & (ys < y1 + 1)
    return in_y[:, None] & in_x[None, :]


def regions(layout, hw):
    """{query, other, control}: (H, W) bool masks of a layer's cells: where the left iris can be
    (its drawn centres' range plus an iris radius), the right iris likewise, and the mouth box less
    both eyes' cells. Returns the masks and their centroids' distances from the query's, in cells."""
    S = layout["imsize"]
    c = layout["centres"] - 0.5
    r = 0.75 * EYE_RADIUS * S
    eye = [cell_box(hw, S, c[:, e, 0].min() - r, c[:, e, 0].max() + r, c[:, e, 1].min() - r, c[:, e, 1].max() + r)
           for e in range(2)]
    mouth = cell_box(hw, S, 0.39 * S, 0.61 * S, (MOUTH_Y - 0.06) * S, (MOUTH_Y + 0.06) * S) & ~eye[0] & ~eye[1]
    masks = dict(query=eye[0], other=eye[1] & ~eye[0], control=mouth)
    centre = lambda m: np.argwhere(m).mean(axis=0)  # noqa: E731
    dist = {k: float(np.hypot(*(centre(masks[k]) - centre(masks["query"])))) for k in ("other", "control")}
    return masks, dist


def randomised(G, name, seed=0):
    """A copy of G whose layer `name` has its query and key projections redrawn (normal, each
    weight tensor's own spread), spectral norm's vectors re-estimated for them."""
    G = copy.deepcopy(G)
    layer = attention_layers(G)[name]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (layer.query_conv, layer.key_conv):
            w = conv.parametrizations.weight.original
            w.copy_(torch.randn(w.shape, generator=gen) * w.std())
            conv.train()
            for _ in range(30):  # power iteration for the new weight's largest singular value
                conv.weight
            conv.eval()
    return G


@torch.no_grad()
def swap_colour_change(G, name, z, donor, layout, keys, queries):
    """Per image: (change, pull) of the left iris when the layer's `queries` read the donor z's value
    vectors at `keys`: change = ||colour after - before||, pull = how much closer it moved to the
    donor image's right iris. And the value vectors' mean change at those keys, (B,)."""
    layer = attention_layers(G)[name]
    before = read_irises(denorm(G(z)).permute(0, 2, 3, 1).numpy(), layout)["colours"]
    donor_img, feats, _ = run_net(G, donor)
    donor_right = read_irises(denorm(donor_img).permute(0, 2, 3, 1).numpy(), layout)["colours"][:, 1]
    values = layer.project(feats[name])[2]                                 # (B, C, N) the donor's
    _, own, _ = run_net(G, z)
    v_change = (values - layer.project(own[name])[2])[:, :, keys].norm(dim=1).mean(1).numpy()  # (B,)
    with intervene(layer, "values", queries=queries, values=values, keys=keys):
        after = read_irises(denorm(G(z)).permute(0, 2, 3, 1).numpy(), layout)["colours"]
    change = np.linalg.norm(after[:, 0] - before[:, 0], axis=1)
    pull = np.linalg.norm(before[:, 0] - donor_right, axis=1) - np.linalg.norm(after[:, 0] - donor_right, axis=1)
    return change, pull, v_change


@torch.no_grad()
def mass_ratios(G, name, z, masks):
    """Per image: the query region's attention on the other eye's region and on the mouth's, over
    uniform, by weights and by contributions (each query's contributions normalised to sum 1),
    averaged over queries: {other_by_weight, other_by_contribution, control_by_...}: (B,) each."""
    layer = attention_layers(G)[name]
    q = torch.from_numpy(np.flatnonzero(masks["query"]))
    _, feats, rows = run_net(G, z, {name: q})
    contrib = contribution_rows(layer, feats[name], q)                      # (B, Q, N)
    contrib = contrib / contrib.sum(-1, keepdim=True).clamp_min(1e-30)
    out = {}
    for region in ("other", "control"):
        m = torch.from_numpy(masks[region].flatten()).float()
        # region_ratio takes rows (B, Q, N) and masks (Q, N): one mask for every query here
        for by, r in (("weight", rows[name]), ("contribution", contrib)):
            out[f"{region}_by_{by}"] = region_ratio(r, m[None].expand(r.shape[1], -1)).numpy()
    return out


def mechanism(G, layout, n=128, seed=0):
    """{layer: dict(...)} for every attention layer of G, on n faces (z from `seed`) and as many
    donors (the same z shifted by one: every face's donor is another face of the set)."""
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    donor = z.roll(1, dims=0)
    out = {}
    for name in attention_layers(G):
        masks, dist = regions(layout, map_hw(name))
        queries = torch.from_numpy(np.flatnonzero(masks["query"]))
        res = dict(distance_cells=dist)
        for label, net in (("trained", G), ("random_qk", randomised(G, name, seed))):
            part = {}
            for region in ("other", "control"):
                keys = torch.from_numpy(np.flatnonzero(masks[region]))
                change, pull, v_change = swap_colour_change(net, name, z, donor, layout, keys, queries)
                part[region] = dict(change=public(summarise([change], seed=1)), pull=public(summarise([pull], seed=2)),
                                    value_change=float(v_change.mean()))
            for k, (key, values) in enumerate(mass_ratios(net, name, z, masks).items()):
                part[key] = public(summarise([values], seed=3 + k))
            res[label] = part
        out[name] = res
    return out
