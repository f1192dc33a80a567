"""The eye query's own numbers on a checkpoint: what a sentence about "where the eye query looks"
may rest on (the explorer's table averages 64 random queries, not this one).

    python -m experiments.eye_query                          # the showcase model, seed 0 and seeds 0-63

For the explorer's default query (attention.FACE_QUERIES' left eye) in every G attention layer:
on the explorer's image (seed 0, as in its layers figure and film), attention.map_stats (top-10
mass, H/logN, attention-weighted distance and uniform attention's) and where the mass lies: the
side borders (the outer 4 px columns), the top border (the outer 4 px rows), and the other eye
(the 3x3 cells around the right-eye query); and the same over images 0..n-1 as means with 95%
bootstrap intervals over images.
"""
import json

import torch

from attention import attention_layers, face_pixels, key_pixels, map_hw, pixel_queries, run_net, z_for_seeds
from attention_stats import map_stats, mean_distance, uniform_distance
from checkpoint import load_generator
from explorer import SHOWCASE
from cli import Parser, run
from experiments.uncertainty import interval, bootstrap

PROG = "experiments.eye_query"
BORDER_PX = 4


def regions(name, imsize, right_eye_cell):
    """{side, top, other_eye}: (N,) bool masks of a layer's keys."""
    H, W = map_hw(name)
    centres = key_pixels((H, W), (imsize, imsize))             # (N, 2) pixel centres, x then y
    x, y = centres[:, 0], centres[:, 1]
    i, j = divmod(int(right_eye_cell), W)
    ii, jj = torch.arange(H * W) // W, torch.arange(H * W) % W
    return dict(side=(x < BORDER_PX) | (x > imsize - BORDER_PX), top=y < BORDER_PX,
                other_eye=((ii - i).abs() <= 1) & ((jj - j).abs() <= 1))


@torch.no_grad()
def eye_query_numbers(G, n=64):
    faces = face_pixels(G.image_size)
    cells = pixel_queries(G, [faces["left eye"], faces["right eye"]])
    z = z_for_seeds(range(n), G.z_dim)
    queries = {name: c[:1] for name, c in cells.items()}
    _, _, rows = run_net(G, z, queries)                          # {name: (n, 1, N)}
    out = {}
    for name in attention_layers(G):
        r, q, hw = rows[name][:, 0].float(), int(queries[name][0]), map_hw(name)
        m = regions(name, G.image_size, cells[name][1])
        dist = mean_distance(rows[name].float(), [q], hw, (G.image_size,) * 2)[:, 0]   # (n,)
        mass = {k: (r * v.float()).sum(-1) for k, v in m.items()}
        seed0 = map_stats(r[0], q, hw, (G.image_size,) * 2, layer=attention_layers(G)[name])
        seed0.update({f"mass_{k}": float(v[0]) for k, v in mass.items()})
        seed0.update({f"uniform_{k}": float(v.float().mean()) for k, v in m.items()})
        over = dict(dist=float(dist.mean()), dist_ci=interval(bootstrap([dist.numpy()], seed=1)),
                    dist_uniform=float(uniform_distance([q], hw, (G.image_size,) * 2)[0]))
        for k, v in mass.items():
            over[f"mass_{k}"], over[f"mass_{k}_ci"] = float(v.mean()), interval(bootstrap([v.numpy()], seed=2))
        out[name] = dict(query_cell=q, seed0=seed0, images=n, over_images=over)
    return out


def main(argv=None):
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=SHOWCASE)
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args(argv)
    G = load_generator(args.checkpoint, verbose=False)
    print(json.dumps(eye_query_numbers(G, args.images), indent=1))


if __name__ == "__main__":
    run(PROG, main)
