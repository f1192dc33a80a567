"""The built-in faces' long-range rule as numbers: do a face's two eyes share one colour, and does
G's attention connect them?

Every built-in face has both irises in one random colour, the eyes mirrored about the face's axis
two eye-widths apart: a rule a convolution stack must carry across the face, which is what SAGAN's
attention is meant to make easy. On a generated image there is no ground truth, so each eye's colour
is read the same way on real and generated images: in a search window around where the dataset's
eyes lie, the pixel least like both the window's dominant colour (skin) and white (the sclera),
weighted towards the mean eye position so the hair or background at a window's edge rarely wins
(on held-out real faces this reads the true iris colour for about 70% of eyes, and for the rest
mostly reads the same wrong pixel on both sides, which the real-face ceiling includes).
Real faces give the score's ceiling, random pairs of eyes from different real faces its chance level;
a generated set is scored against its own random pairs (eye_agreement's excess).

Attention to the other eye means little alone: a query may look as much at any point that far away.
So the mass on the other eye is compared with the mass on a control region at the same distance from
the query that holds no eye in any built-in face (region_masks), both over uniform attention.
"""
import numpy as np
import torch

from attention import attention_layers, attention_share, face_pixels, map_hw, pixel_queries, run_net
from data_loader import synthetic_face


def eye_layout(imsize, n=2000, seed=12345):
    """Where to look for eyes, from `n` built-in faces: dict(mean=(2 eyes, xy) centres in pixel
    coordinates, windows=[(x0, x1, y0, y1) inclusive per eye], sigma=weighting radius in pixels,
    imsize, centres=(n, 2 eyes, xy) every face's eye centres in continuous image coordinates)."""
    centres = np.array([synthetic_face(np.random.default_rng([seed, i]), imsize)[1]["eyes_xy"] for i in range(n)])
    eyes = centres - 0.5  # (n, 2 eyes, xy) continuous -> pixel-centre coordinates
    mean = eyes.mean(axis=0)  # (2, 2)
    lo, hi = np.floor(eyes.min(axis=0)) - 1, np.ceil(eyes.max(axis=0)) + 1
    lo, hi = np.clip(lo, 0, imsize - 1).astype(int), np.clip(hi, 0, imsize - 1).astype(int)
    # the windows must not share a column: one pixel read as both eyes would be a perfect match
    mid = int(np.floor(mean[:, 0].mean()))
    hi[0, 0], lo[1, 0] = min(hi[0, 0], mid), max(lo[1, 0], mid + 1)
    windows = [tuple(int(v) for v in (lo[e, 0], hi[e, 0], lo[e, 1], hi[e, 1])) for e in range(2)]
    # 2.5 px at 32px: chosen on held-out faces (reads the true colour most often among 1.5 .. 3 px)
    return dict(mean=mean, windows=windows, sigma=2.5 * imsize / 32, imsize=imsize, centres=centres)


def eye_colours(images, layout):
    """images float (B, H, W, 3) in [0, 1] -> (B, 2, 3) the colour read for each eye."""
    out = []
    for (x0, x1, y0, y1), (mx, my) in zip(layout["windows"], layout["mean"]):
        win = images[:, y0:y1 + 1, x0:x1 + 1].reshape(len(images), -1, 3)  # (B, P, 3)
        yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        near = np.exp(-((xx - mx) ** 2 + (yy - my) ** 2) / (2 * layout["sigma"] ** 2)).reshape(-1)  # (P,)
        skin = np.median(win, axis=1, keepdims=True)                         # (B, 1, 3)
        unlike = np.minimum(np.linalg.norm(win - skin, axis=2), np.linalg.norm(win - 1.0, axis=2))  # (B, P)
        out.append(win[np.arange(len(images)), (unlike * near).argmax(axis=1)])  # (B, 3)
    return np.stack(out, axis=1)


def eye_agreement(colours, tol):
    """Per face of a set, from its eye colours (B, 2, 3): dict of (B,) arrays.

    match: 1 where the face's two eyes are within `tol`. chance: the fraction of the other faces
    whose right eye this face's left eye matches, i.e. what pairing eyes at random gives for these
    very colours. excess = match - chance: a generator that paints every iris one colour matches
    often without knowing the rule, and its chance is as high. dist: the face's own eye distance;
    chance_dist: the median distance of its left eye to the other faces' right eyes.
    """
    left, right = colours[:, 0], colours[:, 1]
    B = len(colours)
    d = np.linalg.norm(left[:, None] - right[None], axis=2)  # (B, B): left eye of i, right eye of j
    own = np.eye(B, dtype=bool)
    match = (np.diag(d) < tol).astype(float)
    chance = ((d < tol) & ~own).sum(axis=1) / (B - 1)
    others = d[~own].reshape(B, B - 1)
    return dict(match=match, chance=chance, excess=match - chance, dist=np.diag(d).copy(),
                chance_dist=np.median(others, axis=1))


# ============================================================================ where attention goes

# The largest eye synthetic_face draws, as fractions of the image side: the sclera's radii are
# 1.5 er across and 0.8 er down with er <= 0.06 (tests/test_long_range_experiment.py checks it on
# rendered faces). Every eye lies within these half-sizes of its centre.
SCLERA_HALF = (0.09, 0.048)


def eye_cells(layout, hw):
    """(H, W) bool: the cells of an H x W map whose pixel block holds part of an eye in any of the
    layout's faces (the largest sclera around each eye's centre)."""
    S, (H, W) = layout["imsize"], hw
    c = layout["centres"].reshape(-1, 2)                         # (faces * 2, xy), continuous
    hx, hy = SCLERA_HALF[0] * S, SCLERA_HALF[1] * S
    x0, y0 = np.arange(W) * S / W, np.arange(H) * S / H           # cell blocks [x0, x0 + S/W)
    in_x = (c[:, :1] - hx < x0 + S / W) & (c[:, :1] + hx > x0)   # (eyes, W)
    in_y = (c[:, 1:] - hy < y0 + S / H) & (c[:, 1:] + hy > y0)   # (eyes, H)
    return (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)      # (H, W)


def square(cell, hw):
    """(H, W) bool: the 3x3 cells around `cell` (i, j), clipped to the map."""
    m = np.zeros(hw, dtype=bool)
    i, j = cell
    m[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2] = True
    return m


# the other eye's offset from the query, turned by these angles (degrees) to find a control point:
# across the eye axis first (forehead or cheek), then away from the other eye
CONTROL_TURNS = (90, -90, 180, 135, -135)


def region_masks(cells, hw, blocked):
    """The regions whose attention is compared, for queries at the two eyes of an H x W map.

    cells: the two eyes' flattened cell indices [left, right]; blocked: (H, W) bool of cells that
    may hold an eye (eye_cells). Returns dict of
      other (2, N): for query e, the 3x3 cells around the other eye, never the query's own cell;
      control (2, N): the 3x3 cells around a control cell at the same distance from the query (the
        other eye's offset turned by one of CONTROL_TURNS), less every cell that may hold an eye,
        the query's cell and the other-eye region: of the turns, the one leaving the most cells,
        the upper one on ties (away from the mouth); all zero where every turn lands on an eye
        (e.g. at 8x8 of a 32px face, where the eyes are neighbouring cells);
      control_cells: [(i, j) or None] the control cell of each query.
    """
    H, W = hw
    others, controls, control_cells = [], [], []
    for e in range(2):
        q, o = divmod(int(cells[e]), W), divmod(int(cells[1 - e]), W)
        other = square(o, hw)
        other[q] = False
        off = np.subtract(o, q)  # (di, dj)
        best = (0, None, np.zeros(hw, dtype=bool))
        for turn in CONTROL_TURNS:
            a = np.radians(turn)
            di, dj = np.rint([off[0] * np.cos(a) - off[1] * np.sin(a), off[0] * np.sin(a) + off[1] * np.cos(a)])
            c = (q[0] + int(di), q[1] + int(dj))
            if not (0 <= c[0] < H and 0 <= c[1] < W) or blocked[c] or other[c]:
                continue
            region = square(c, hw) & ~blocked & ~other
            region[q] = False
            size = int(region.sum())
            if size > best[0] or (size == best[0] and best[1] is not None and c[0] < best[1][0]):
                best = (size, c, region)
        others.append(other.flatten())
        controls.append(best[2].flatten())
        control_cells.append(best[1])
    as_t = lambda masks: torch.from_numpy(np.stack(masks)).float()  # noqa: E731
    return dict(other=as_t(others), control=as_t(controls), control_cells=control_cells)


def region_ratio(rows, masks):
    """Per image (B,): the attention mass of each eye query's row (B, 2, N) on its region `masks`
    (2, N), over that region's share under uniform attention (1 = no preference), averaged over
    the queries whose region is not empty; NaN when both are."""
    keep = masks.sum(-1) > 0                                  # (2,)
    if not keep.any():
        return torch.full(rows.shape[:1], float("nan"))
    mass = (rows[:, keep] * masks[keep]).sum(-1)              # (B, kept)
    uniform = masks[keep].sum(-1) / masks.shape[-1]           # (kept,)
    return (mass / uniform).mean(-1)                          # (B,)


@torch.no_grad()
def eye_attention(G, z, layout):
    """{layer name: dict(other=(B,), control=(B,), share=(B,), control_cells)} for each attention
    layer of G, over the images of G(z): region_ratio of queries at the face_pixels eyes on the other
    eye and on the control region, and attention_share, how much the layer changes its input (a
    map that looks at the other eye matters little when the layer adds almost nothing)."""
    faces = face_pixels(G.image_size)
    queries = pixel_queries(G, [faces["left eye"], faces["right eye"]])
    _, feats, rows = run_net(G, z, queries)  # rows {name: (B, 2, N)}
    layers = attention_layers(G)
    out = {}
    for name, r in rows.items():
        hw = map_hw(name)
        m = region_masks(queries[name], hw, eye_cells(layout, hw))
        out[name] = dict(other=region_ratio(r.cpu(), m["other"]).numpy(),
                         control=region_ratio(r.cpu(), m["control"]).numpy(),
                         share=attention_share(layers[name], feats[name]).numpy(),
                         control_cells=m["control_cells"])
    return out
