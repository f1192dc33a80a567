"""The statistics of SAGAN's attention: numbers of a row (top-k mass, entropy, attention-weighted
distance, query independence), the per-layer table over many images and queries with its verdict,
and the table as markdown or JSON lines. The rows and the geometry come from `attention.py`.
"""
import json
import math

import torch

from attention import (INTERVENTIONS, TOPK, attention_layers, attention_rows, attention_share, gamma,
                       intervention_deltas, key_pixels, run_net, z_for_seeds)

DELTA_KEYS = dict(remove="ablation_delta", uniform="uniform_delta", mean_row="mean_row_delta")


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
    entropy, dist, dist_uniform, qi, verdict; means over images x queries. And what the layer's
    interventions change (intervention_deltas), means over images: ablation_delta ('remove'),
    uniform_delta, mean_row_delta, and delta_of, what they measure ('image' or 'D score').
    """
    img_hw = (G.image_size, G.image_size)
    acc = {}
    stats = ("share", "top_mass", "entropy", "dist", "qi", *DELTA_KEYS.values())
    for s in range(0, len(seeds), batch):
        z = z_for_seeds(seeds[s:s + batch], G.z_dim).to(next(G.parameters()).device)
        img, feats, _ = run_net(G, z)
        nets = [(G, feats)]
        if D is not None:
            nets.append((D, run_net(D, img)[1]))
        deltas = intervention_deltas(G, z, D)
        for net, fts in nets:
            for name, layer in attention_layers(net).items():
                f = fts[name]
                H, W = f.shape[2:]
                N = H * W
                g = torch.Generator().manual_seed(query_seed * 1009 + N)
                q = torch.randperm(N, generator=g)[:n_queries] if n_queries < N else torch.arange(N)
                rows = attention_rows(layer, f, q).cpu()   # (B, Q, N)
                a = acc.setdefault(name, dict(name=name, hw=(H, W), N=N, gamma=gamma(layer),
                                              dist_uniform=float(uniform_distance(q, (H, W), img_hw).mean()),
                                              delta_of="image" if net is G else "D score",
                                              **{key: [] for key in stats}))
                a["share"].append(attention_share(layer, f))
                a["top_mass"].append(topk_mass(rows, k).flatten())
                a["entropy"].append(entropy_norm(rows).flatten())
                a["dist"].append(mean_distance(rows, q, (H, W), img_hw).flatten())
                a["qi"].append(query_independence(rows))
                for mode, key in DELTA_KEYS.items():
                    a[key].append(deltas[name][mode])
    table = []
    for a in acc.values():
        row = dict(a, uniform=min(k, a["N"]) / a["N"], k=k,
                   **{key: float(torch.cat(a[key]).mean()) for key in stats})
        row["verdict"] = verdict(row)
        table.append(row)
    return table


def format_table(table, n_images=None, n_queries=None, generator=None):
    """Markdown table of layer_statistics; `generator` names the G that made the images (e.g. 'EMA G')."""
    k = table[0]["k"] if table else TOPK
    head = ("| layer | map | gamma | attn share | top-%d mass (uniform) | H/logN | mean dist px (uniform) "
            "| query indep. | verdict | Δ remove | Δ uniform | Δ mean row |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n" % k)
    lines = [f"| {r['name']} | {r['hw'][0]}x{r['hw'][1]} | {r['gamma']:+.4f} | {r['share']:.2%} | "
             f"{r['top_mass']:.1%} ({r['uniform']:.1%}) | {r['entropy']:.3f} | "
             f"{r['dist']:.1f} ({r['dist_uniform']:.1f}) | {r['qi']:.3f} | {r['verdict']} | "
             f"{r['ablation_delta']:.4f} | {r['uniform_delta']:.4f} | {r['mean_row_delta']:.4f} |"
             for r in table]
    note = ("\n\nΔ: mean absolute change when the layer's attention term is removed (gamma·o → 0), its "
            "weights made uniform, or every query given the mean of all rows; of the generated image "
            "(pixel values 0..1) for G layers, of D's score on the same images for D layers.")
    if n_images:
        by = f", images by the {generator}" if generator else ""
        note += f"\n\n{n_images} generated images x {n_queries or 'all'} query cells per layer{by}."
    return head + "\n".join(lines) + note


def format_json(table, n_images=None, n_queries=None, generator=None):
    """layer_statistics as JSON lines, one object per layer: `layer` (its name), `map` [H, W] and
    every other number of the table under its layer_statistics key."""
    meta = dict(n_images=n_images, n_queries=n_queries, generator=generator)
    return "\n".join(json.dumps(dict(layer=r["name"], map=list(r["hw"]),
                                      **{key: v for key, v in r.items() if key not in ("name", "hw")},
                                      **meta))
                     for r in table)
