"""The statistics of SAGAN's attention: numbers of a row (top-k mass, entropy, attention-weighted
distance, query independence), the per-layer table over many images and queries with its verdict,
and the table as markdown or JSON lines. The rows and the geometry come from `attention.py`.
"""
import json
import math

import torch

from attention import (TOPK, attention_layers, attention_rows, attention_share, contribution_rows, gamma,
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


def row_measures(rows, queries, map_hw, img_hw, k=TOPK, with_qi=True):
    """The numbers of rows (B, Q, N) of flattened query indices `queries` (Q,), per image and query:
    dict(top_mass, entropy, dist) each (B, Q), and qi (B,) (query_independence, when Q >= 2 and
    `with_qi`: it costs O(Q^2 N), too much for every query of a large map)."""
    out = dict(top_mass=topk_mass(rows, k), entropy=entropy_norm(rows),
               dist=mean_distance(rows, queries, map_hw, img_hw))
    if with_qi and rows.shape[1] >= 2:
        out["qi"] = query_independence(rows)
    return out


def normalise(contributions):
    """Contribution rows (B, Q, N) -> each row's share per key, summing to 1 like attention weights:
    the statistics of weights then read what is added instead of what is looked at. A row adding
    nothing (gamma 0, zero values) has no shares: NaN."""
    c = contributions.double()
    total = c.sum(-1, keepdim=True)
    return torch.where(total > 0, c / total.clamp_min(1e-300), torch.nan).float()


@torch.no_grad()
def query_statistics(layer, features, queries, img_hw, k=TOPK):
    """One layer's numbers per image and query, weighted two ways: {'weights': row_measures of the
    attention rows, 'contribution': row_measures of the normalised contributions ||gamma a_qk v_k||
    (attention.contribution_rows), 'dist_uniform': (Q,) uniform attention's distance}; features
    (B, C, H, W), queries (Q,) flattened indices. What the table averages, per query for a page."""
    map_hw = tuple(features.shape[2:])
    queries = torch.as_tensor(queries).long()
    rows = attention_rows(layer, features, queries)                      # (B, Q, N)
    contrib = contribution_rows(layer, features, queries, rows=rows)     # (B, Q, N)
    return dict(weights=row_measures(rows.cpu(), queries, map_hw, img_hw, k),
                contribution=row_measures(normalise(contrib).cpu(), queries, map_hw, img_hw, k),
                dist_uniform=uniform_distance(queries, map_hw, img_hw))


def mean_interval(values, level=0.95, n_boot=2000, seed=0):
    """(lo, hi): bootstrap percentile interval of the mean of values (B, Q), images x queries,
    resampling images and queries independently (both are samples: other images and other query
    cells would give another mean). One image or one query: only the other axis varies."""
    v = torch.as_tensor(values).double()
    B, Q = v.shape
    g = torch.Generator().manual_seed(seed)

    def draws(n):  # (n_boot, n): how often each of n items is drawn in each resample
        idx = torch.randint(n, (n_boot, n), generator=g)
        return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    means = torch.einsum("rb,bq,rq->r", draws(B), v, draws(Q)) / (B * Q)   # (n_boot,)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


# rules of thumb for the table's verdict; the numbers beside it are what counts
INERT_SHARE = 0.01        # attention changes its layer's input by under 1%
NEAR_UNIFORM_H = 0.97     # entropy this close to uniform: the layer averages everything
SHARED_MAP_QI = 0.9       # different queries' maps nearly identical
LOCAL_DIST = 0.6          # attends closer than 60% of the uniform-attention distance
LONG_DIST = 1.2           # attends a fifth farther than uniform attention (its maximum is about 1.85x)
VERDICTS = ("inert", "near-uniform", "one map for all queries", "long-range", "slightly long-range", "local",
            "slightly local", "no distance preference")


def verdict(r):
    """What a layer's numbers r (a layer_statistics row) support, in words (one of VERDICTS).

    The distance verdicts rest on the interval of the attention-weighted distance minus uniform
    attention's (dist_excess_ci, over images x queries): above 0, 'long-range' when the distance is
    over LONG_DIST of uniform's, else 'slightly long-range'; below 0, 'local' when it is under
    LOCAL_DIST of uniform's, else 'slightly local'; an interval holding 0: 'no distance preference'."""
    if r["share"] < INERT_SHARE:
        return "inert"
    if r["entropy"] > NEAR_UNIFORM_H:
        return "near-uniform"
    if r["qi"] > SHARED_MAP_QI:
        return "one map for all queries"
    lo, hi = r["dist_excess_ci"]
    if lo > 0:
        return "long-range" if r["dist"] > LONG_DIST * r["dist_uniform"] else "slightly long-range"
    if hi < 0:
        return "local" if r["dist"] < LOCAL_DIST * r["dist_uniform"] else "slightly local"
    return "no distance preference"


def summarise(name, hw, share, weights, contribution, dist_uniform, k=TOPK, level=0.95):
    """A layer_statistics row (without the deltas and verdict) from per-image/query numbers:
    share (B,); weights and contribution as row_measures gives them, over the same images and
    queries; dist_uniform (Q,)."""
    N = hw[0] * hw[1]
    excess = weights["dist"].double() - dist_uniform.double()            # (B, Q)

    def mean(t):
        return float(torch.as_tensor(t).double().mean())
    return dict(name=name, hw=tuple(hw), N=N, k=k, uniform=min(k, N) / N, share=mean(share),
                top_mass=mean(weights["top_mass"]), entropy=mean(weights["entropy"]),
                dist=mean(weights["dist"]), dist_uniform=mean(dist_uniform), qi=mean(weights["qi"]),
                dist_excess=mean(excess), dist_excess_ci=mean_interval(excess, level),
                contribution_top_mass=mean(contribution["top_mass"]),
                contribution_entropy=mean(contribution["entropy"]),
                contribution_dist=mean(contribution["dist"]))


def layer_statistics(G, seeds, n_queries=64, k=TOPK, D=None, query_seed=0, batch=16):
    """Per-layer statistics over the images of `seeds` and a random subset of n_queries query cells
    per layer (all cells when the layer has fewer). D, when given, sees the generated images.

    Returns one dict per layer (summarise): name, hw, N, gamma, share (attention_share), top_mass,
    uniform, entropy, dist, dist_uniform, qi, means over images x queries; dist_excess (dist minus
    uniform attention's) with dist_excess_ci, its 95% interval over images x queries (mean_interval);
    contribution_top_mass, contribution_entropy, contribution_dist, the same numbers of the
    normalised contributions (query_statistics); verdict. And what the layer's interventions change
    (intervention_deltas), means over images: ablation_delta ('remove'), uniform_delta,
    mean_row_delta, and delta_of, what they measure ('image' or 'D score').
    """
    img_hw = (G.image_size, G.image_size)
    acc = {}
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
                N = f.shape[2] * f.shape[3]
                g = torch.Generator().manual_seed(query_seed * 1009 + N)
                q = torch.randperm(N, generator=g)[:n_queries] if n_queries < N else torch.arange(N)
                a = acc.setdefault(name, dict(hw=tuple(f.shape[2:]), layer=layer, q=q, share=[],
                                              weights=[], contribution=[], deltas=[],
                                              delta_of="image" if net is G else "D score"))
                a["share"].append(attention_share(layer, f))
                qs = query_statistics(layer, f, q, img_hw, k)
                a["weights"].append(qs["weights"])
                a["contribution"].append(qs["contribution"])
                a["dist_uniform"] = qs["dist_uniform"]
                a["deltas"].append(deltas[name])
    def cat(parts):  # the batches' row_measures joined along images
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    table = []
    for name, a in acc.items():
        row = summarise(name, a["hw"], torch.cat(a["share"]), cat(a["weights"]), cat(a["contribution"]),
                        a["dist_uniform"], k)
        row.update(gamma=gamma(a["layer"]), delta_of=a["delta_of"],
                   **{key: float(torch.cat([d[mode] for d in a["deltas"]]).mean())
                      for mode, key in DELTA_KEYS.items()})
        row["verdict"] = verdict(row)
        table.append(row)
    return table


def format_table(table, n_images=None, n_queries=None, generator=None):
    """Markdown table of layer_statistics; `generator` names the G that made the images (e.g. 'EMA G')."""
    k = table[0]["k"] if table else TOPK
    head = ("| layer | map | gamma | attn share | top-%d mass (uniform) | H/logN | mean dist px (uniform) "
            "| dist − uniform [95%%] | query indep. | contrib. top-%d | contrib. H/logN | contrib. dist px "
            "| verdict | Δ remove | Δ uniform | Δ mean row |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" % (k, k))

    def num(v, fmt):  # a contribution of a layer that adds nothing has no shares
        return "—" if v is None or math.isnan(v) else format(v, fmt)
    lines = [f"| {r['name']} | {r['hw'][0]}x{r['hw'][1]} | {r['gamma']:+.4f} | {r['share']:.2%} | "
             f"{r['top_mass']:.1%} ({r['uniform']:.1%}) | {r['entropy']:.3f} | "
             f"{r['dist']:.1f} ({r['dist_uniform']:.1f}) | "
             f"{r['dist_excess']:+.1f} [{r['dist_excess_ci'][0]:+.1f}, {r['dist_excess_ci'][1]:+.1f}] | "
             f"{r['qi']:.3f} | {num(r['contribution_top_mass'], '.1%')} | "
             f"{num(r['contribution_entropy'], '.3f')} | {num(r['contribution_dist'], '.1f')} | {r['verdict']} | "
             f"{r['ablation_delta']:.4f} | {r['uniform_delta']:.4f} | {r['mean_row_delta']:.4f} |"
             for r in table]
    note = ("\n\nmean dist: the attention-weighted distance from the query to the keys, next to uniform "
            "attention's; dist − uniform: their difference with its 95% bootstrap interval over images x "
            f"queries. 'long-range' needs that interval above 0 and the distance over {LONG_DIST:.0%} of "
            f"uniform's ('slightly long-range' when above 0 but not that far), 'local' below 0 and under "
            f"{LOCAL_DIST:.0%} of uniform's ('slightly local' when not that close); an interval holding 0 "
            "reads 'no distance preference'. contrib.: the same numbers with each key weighted by what "
            "it adds to the query's output, ||gamma·a_qk·v_k||, instead of its weight."
            "\n\nΔ: mean absolute change when the layer's attention term is removed (gamma·o → 0), its "
            "weights made uniform, or every query given the mean of all rows; of the generated image "
            "(pixel values 0..1) for G layers, of D's score on the same images for D layers.")
    if n_images:
        by = f", images by the {generator}" if generator else ""
        note += f"\n\n{n_images} generated images x {n_queries or 'all'} query cells per layer{by}."
    return head + "\n".join(lines) + note


def format_json(table, n_images=None, n_queries=None, generator=None):
    """layer_statistics as JSON lines, one object per layer: `layer` (its name), `map` [H, W] and
    every other number of the table under its layer_statistics key (a number that does not exist,
    the contribution of a layer adding nothing, as null)."""
    meta = dict(n_images=n_images, n_queries=n_queries, generator=generator)

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return list(v) if isinstance(v, tuple) else v
    return "\n".join(json.dumps(dict(layer=r["name"], map=list(r["hw"]),
                                      **{key: clean(v) for key, v in r.items() if key not in ("name", "hw")},
                                      **meta))
                     for r in table)
