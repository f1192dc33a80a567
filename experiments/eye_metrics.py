"""The built-in faces' long-range rule as numbers: do a face's two eyes share one colour, and does
G's attention connect them?

Every built-in face has both irises in one random colour, the eyes mirrored about the face's axis
(centres 12.8 to 16.6 px apart at 64px). On a generated image there is no ground truth, so each
eye's colour is read the same way on real and generated images by the iris reader (read_irises):
each eye is found where a sclera template (white left and right of the iris) fits best inside a
search box around where the dataset's eyes lie, the two eyes chosen together so that both can never
be read off one eye, and its colour is the mean of the iris's core (5 pixels at 64px). The primary
score (pair_score) needs no threshold: the probability that a face's own two irises are closer in
colour than irises of two different faces of the same set, in points above chance (0 = no rule, 50 =
the ceiling), with a bootstrap interval over faces. eye_agreement (eyes within a tolerance, against
random pairs) is the secondary, threshold view.

The reader can fail, and is shown to (attention_ablation --validate_reader, tests/test_iris_reader.py):
built-in faces whose irises are coloured independently, or that have no iris, score at chance; rule
faces score near 50 also with pixel noise, a blur and a shift. (The reader this replaces read one
pixel per eye and scored iris-free faces +45 points above chance: it read skin both eyes share.)

Attention to the other eye means little alone: a query may look as much at any point that far away.
So the mass on the other eye is compared with the mass on a control region at the same distance from
the query that holds no eye in any built-in face (region_masks), both over uniform attention, by
attention weights and by contributions ||gamma a v||.
"""
import numpy as np
import torch

from attention import (attention_layers, attention_share, contribution_rows, face_pixels, map_hw, pixel_queries,
                       run_net)
from data_loader import synthetic_face


def eye_layout(imsize, n=2000, seed=12345):
    """Where eyes lie, from `n` built-in faces: dict(mean=(2 eyes, xy) centres in pixel coordinates,
    windows=[(x0, x1, y0, y1) inclusive per eye] the drawn centres' range (the figures' eye band),
    imsize, centres=(n, 2 eyes, xy) every face's eye centres in continuous image coordinates,
    face_mean=(H, W, 3) the faces' mean image in [0, 1], face_sd=their mean per-pixel sd: drawing()'s
    reference)."""
    total, total_sq, centres = 0.0, 0.0, []
    for i in range(n):
        image, meta = synthetic_face(np.random.default_rng([seed, i]), imsize)
        image = image.astype(np.float64) / 255.0
        total, total_sq = total + image, total_sq + image ** 2
        centres.append(meta["eyes_xy"])
    centres = np.array(centres)
    face_mean = total / n
    face_sd = float(np.sqrt(np.maximum(total_sq / n - face_mean ** 2, 0.0)).mean())
    eyes = centres - 0.5  # (n, 2 eyes, xy) continuous -> pixel-centre coordinates
    mean = eyes.mean(axis=0)  # (2, 2)
    lo, hi = np.floor(eyes.min(axis=0)) - 1, np.ceil(eyes.max(axis=0)) + 1
    lo, hi = np.clip(lo, 0, imsize - 1).astype(int), np.clip(hi, 0, imsize - 1).astype(int)
    # split at the face's mean axis: each window holds one eye
    mid = int(np.floor(mean[:, 0].mean()))
    hi[0, 0], lo[1, 0] = min(hi[0, 0], mid), max(lo[1, 0], mid + 1)
    windows = [tuple(int(v) for v in (lo[e, 0], hi[e, 0], lo[e, 1], hi[e, 1])) for e in range(2)]
    return dict(mean=mean, windows=windows, imsize=imsize, centres=centres, face_mean=face_mean, face_sd=face_sd)


def drawing(images, layout):
    """Whether a set of images (B, H, W, 3) in [0, 1] are faces at all, before any eye is read:
    dict(layout = correlation of the set's mean image with the built-in faces' mean image (1: their
    layout; about 0 for noise or a texture), diversity = the set's mean per-pixel sd over the built-in
    faces' (1: as varied as they are; 0: every image the same, a collapsed G)). A G that draws no faces
    reads at chance on the eye score without having been tested: these say so."""
    mean = images.mean(axis=0)
    corr = np.corrcoef(mean.ravel(), layout["face_mean"].ravel())[0, 1]
    return dict(layout=float(0.0 if np.isnan(corr) else corr),
                diversity=float(images.std(axis=0).mean() / layout["face_sd"]))


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
    """{layer name: dict(other=(B,), control=(B,), other_contrib, control_contrib, share=(B,),
    control_cells)} for each attention layer of G, over the images of G(z): region_ratio of queries
    at the face_pixels eyes on the other eye and on the control region, by attention weights and by
    contributions ||gamma a v|| (a heavy key with a small value vector adds little), and
    attention_share, how much the layer changes its input (a map that looks at the other eye
    matters little when the layer adds almost nothing)."""
    faces = face_pixels(G.image_size)
    queries = pixel_queries(G, [faces["left eye"], faces["right eye"]])
    _, feats, rows = run_net(G, z, queries)  # rows {name: (B, 2, N)}
    layers = attention_layers(G)
    out = {}
    for name, r in rows.items():
        hw = map_hw(name)
        m = region_masks(queries[name], hw, eye_cells(layout, hw))
        c = contribution_rows(layers[name], feats[name], queries[name]).cpu()  # (B, 2, N)
        c = c / c.sum(-1, keepdim=True).clamp_min(1e-30)                        # each query's contributions sum to 1
        out[name] = dict(other=region_ratio(r.cpu(), m["other"]).numpy(),
                         control=region_ratio(r.cpu(), m["control"]).numpy(),
                         other_contrib=region_ratio(c, m["other"]).numpy(),
                         control_contrib=region_ratio(c, m["control"]).numpy(),
                         share=attention_share(layers[name], feats[name]).numpy(),
                         control_cells=m["control_cells"])
    return out


# ============================================================================ the iris reader

# The mean eye radius synthetic_face draws (er ~ U(0.045, 0.06) of the image side): the sclera is an
# ellipse 1.5 er across and 0.8 er down, the iris a disk of 0.75 er in its middle.
EYE_RADIUS = 0.0525
SEARCH_MARGIN = 0.07   # the search box reaches this far (of the side) past every drawn eye centre
MIN_EYE_GAP = 0.16     # the two eyes' centres lie at least this far apart (drawn: 0.2 to 0.26)


def _offsets(imsize):
    """The reader's template around an eye centre, in whole pixels: (side, iris) lists of (dy, dx).
    side: the sclera left and right of the iris (0.9 to 1.25 er out, within 0.3 er of the eye line);
    iris: the iris's core, within 0.35 er of the centre (5 pixels at 64px, 1 at 32px), well inside
    the smallest iris, so an iris read is not mixed with the sclera around it."""
    er = EYE_RADIUS * imsize
    rows = range(-round(0.3 * er), round(0.3 * er) + 1)
    cols = range(round(0.9 * er), max(round(1.25 * er), round(0.9 * er)) + 1)
    side = [(dy, s * dx) for dy in rows for dx in cols for s in (-1, 1)]
    r = int(0.35 * er)
    iris = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= (0.35 * er) ** 2]
    return side, iris


def _shifted_mean(x, offsets, fill):
    """x (B, H, W, ...) -> the mean over `offsets` (dy, dx) of x[:, y + dy, x + dx], `fill` outside."""
    B, H, W = x.shape[:3]
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = np.full((B, H + 2 * p, W + 2 * p) + x.shape[3:], fill, dtype=float)
    padded[:, p:p + H, p:p + W] = x
    return sum(padded[:, p + dy:p + dy + H, p + dx:p + dx + W] for dy, dx in offsets) / len(offsets)


def iris_boxes(layout):
    """[(x0, x1, y0, y1) inclusive] per eye: where the reader looks for that eye's centre, the
    drawn centres' range plus SEARCH_MARGIN (so a face shifted by a few pixels is still found)."""
    S = layout["imsize"]
    eyes = layout["centres"] - 0.5  # pixel-centre coordinates
    m = SEARCH_MARGIN * S
    lo = np.clip(np.floor(eyes.min(axis=0) - m), 0, S - 1).astype(int)
    hi = np.clip(np.ceil(eyes.max(axis=0) + m), 0, S - 1).astype(int)
    return [(lo[e, 0], hi[e, 0], lo[e, 1], hi[e, 1]) for e in range(2)]


def read_irises(images, layout):
    """The iris reader: images float (B, H, W, 3) in [0, 1] -> dict(colours=(B, 2 eyes, 3) the mean
    colour of each eye's iris region, centres=(B, 2, xy) where it was read).

    Each eye is found as the place in its search box (iris_boxes) whose sclera template (_offsets'
    side pixels) is whitest; the two eyes are chosen together, their centres at least MIN_EYE_GAP
    apart, so both can never be read off one eye. An eye without an iris reads as white on every
    face, and skin or background never enters the iris region, so neither can fake a match."""
    S = layout["imsize"]
    side, iris = _offsets(S)
    white = np.linalg.norm(images - 1.0, axis=3)               # (B, H, W): distance to white
    sclera = _shifted_mean(white, side, fill=2.0)              # (B, H, W): lower = more sclera-like
    core = _shifted_mean(images, iris, fill=0.0)               # (B, H, W, 3): mean colour of the iris region
    best_y, best_s, xs = [], [], []
    for x0, x1, y0, y1 in iris_boxes(layout):
        box = sclera[:, y0:y1 + 1, x0:x1 + 1]                  # (B, h, w)
        best_y.append(box.argmin(axis=1) + y0)                 # (B, w): the best row of every column
        best_s.append(box.min(axis=1))                         # (B, w)
        xs.append(np.arange(x0, x1 + 1))
    pair = best_s[0][:, :, None] + best_s[1][:, None, :]       # (B, wL, wR)
    pair[:, xs[1][None, :] - xs[0][:, None] < MIN_EYE_GAP * S] = np.inf
    k = pair.reshape(len(images), -1).argmin(axis=1)
    cl, cr = np.unravel_index(k, pair.shape[1:])               # (B,) column indices into each box
    b = np.arange(len(images))
    centres = np.stack([np.stack([xs[0][cl], best_y[0][b, cl]], 1), np.stack([xs[1][cr], best_y[1][b, cr]], 1)], 1)
    colours = core[b[:, None], centres[:, :, 1], centres[:, :, 0]]  # (B, 2, 3)
    return dict(colours=colours, centres=centres)


def pair_probabilities(colours):
    """(B, B) H, zero diagonal: H[i, j] = how often face i's own two irises are closer in colour
    than a cross pair of faces i and j (i's left with j's right, and j's left with i's right), ties
    counting half. Its mean over i != j is the reader's primary score: the probability that a face's
    eyes agree better than eyes of two different faces of the same set. 0.5 when a face's two irises
    are no more alike than any two eyes of the set (no rule, whatever the colours' spread or any
    colour every face shares), 1 when every face's eyes match more closely than any cross pair."""
    left, right = colours[:, 0], colours[:, 1]
    d = np.linalg.norm(left[:, None] - right[None], axis=2)   # (B, B): left of i, right of j
    own = np.diag(d)[:, None]                                  # (B, 1)
    cmp = lambda cross: (own < cross) + 0.5 * (own == cross)   # noqa: E731
    H = (cmp(d) + cmp(d.T)) / 2
    np.fill_diagonal(H, 0.0)
    return H


def pair_score(colours, reps=2000, seed=0):
    """The primary score with a bootstrap over faces: dict(auc, points=100 (auc - 0.5), ci=(lo, hi)
    in points, replicates=(reps,) auc). A replicate redraws B faces with replacement and scores the
    pairs of distinct draws of the redrawn set (w' H w over B^2 - sum w^2, w the draw counts)."""
    H = pair_probabilities(colours)
    B = len(H)
    w = np.random.default_rng(seed).multinomial(B, np.full(B, 1 / B), size=reps).astype(float)  # (reps, B)
    num = ((w @ H) * w).sum(axis=1)                             # (reps,): H's diagonal is zero
    reps_auc = num / (B * B - (w ** 2).sum(axis=1))
    auc = H.sum() / (B * (B - 1))
    lo, hi = np.percentile(reps_auc, [2.5, 97.5])
    return dict(auc=float(auc), points=100 * (auc - 0.5), ci=(100 * (lo - 0.5), 100 * (hi - 0.5)),
                replicates=reps_auc)
