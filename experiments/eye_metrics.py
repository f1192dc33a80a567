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
Real faces give the score's ceiling, random pairs of eyes from different real faces its chance level.
"""
import numpy as np
import torch

from attention import map_hw, pixel_queries, run_net
from data_loader import synthetic_face


def eye_layout(imsize, n=2000, seed=12345):
    """Where to look for eyes, from `n` built-in faces: dict(mean=(2 eyes, xy) centres in pixel
    coordinates, windows=[(x0, x1, y0, y1) inclusive per eye], sigma=weighting radius in pixels)."""
    eyes = np.array([synthetic_face(np.random.default_rng([seed, i]), imsize)[1]["eyes_xy"] for i in range(n)])
    eyes = eyes - 0.5  # (n, 2 eyes, xy) pixel units -> pixel-centre coordinates
    mean = eyes.mean(axis=0)  # (2, 2)
    lo, hi = np.floor(eyes.min(axis=0)) - 1, np.ceil(eyes.max(axis=0)) + 1
    lo, hi = np.clip(lo, 0, imsize - 1).astype(int), np.clip(hi, 0, imsize - 1).astype(int)
    # the windows must not share a column: one pixel read as both eyes would be a perfect match
    mid = int(np.floor(mean[:, 0].mean()))
    hi[0, 0], lo[1, 0] = min(hi[0, 0], mid), max(lo[1, 0], mid + 1)
    windows = [tuple(int(v) for v in (lo[e, 0], hi[e, 0], lo[e, 1], hi[e, 1])) for e in range(2)]
    # 2.5 px at 32px: chosen on held-out faces (reads the true colour most often among 1.5 .. 3 px)
    return dict(mean=mean, windows=windows, sigma=2.5 * imsize / 32)


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


def consistency(colours, tol, rng=None):
    """(fraction of faces whose eye colours are within `tol`, median distance); with `rng`, the same for
    random pairs: the left eye of one face against the right eye of another."""
    left, right = colours[:, 0], colours[:, 1]
    if rng is not None:
        right = right[rng.permutation(len(right))]
    d = np.linalg.norm(left - right, axis=1)
    return float((d < tol).mean()), float(np.median(d))


def other_eye_masks(cells, hw):
    """(2, N) masks over the keys of an H x W map for query cells `cells` (the two eyes' flattened
    indices): the 3x3 cells around the other eye, never the query's own cell (at coarse resolutions
    the regions touch)."""
    H, W = hw
    masks = []
    for e in range(2):
        oy, ox = divmod(int(cells[1 - e]), W)
        m = torch.zeros(H, W)
        m[max(oy - 1, 0):oy + 2, max(ox - 1, 0):ox + 2] = 1
        m = m.flatten()  # (N,)
        m[int(cells[e])] = 0
        masks.append(m)
    return torch.stack(masks)


def other_eye_ratio(rows, masks):
    """Attention mass of each eye's query row (B, 2, N) on its other-eye region `masks` (2, N), over
    that region's share under uniform attention (1 = no preference), averaged over images and eyes."""
    mass = (rows * masks).sum(-1)              # (B, 2)
    uniform = masks.sum(-1) / masks.shape[-1]  # (2,)
    return float((mass / uniform).mean())


@torch.no_grad()
def other_eye_attention(G, z, eyes):
    """{layer name: other_eye_ratio} for each attention layer of G, with queries at the image pixels
    `eyes` [(x, y) of the left eye, of the right eye], over the images of G(z)."""
    queries = pixel_queries(G, eyes)
    _, _, rows = run_net(G, z, queries)  # {name: (B, 2, N)}
    return {name: other_eye_ratio(r.cpu(), other_eye_masks(queries[name], map_hw(name)))
            for name, r in rows.items()}
