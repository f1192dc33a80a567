"""Uncertainty for the experiments' scores: bootstrap intervals over faces, with seeds as strata.

A score of an arm is the mean over its training seeds of each seed's mean over generated faces. Two
kinds of uncertainty are reported apart, because they answer different questions: the bootstrap
interval (faces resampled with replacement within each seed, the seeds held fixed) says how much the
number would move with other faces from the same generators; the seeds' spread (min-max of the
per-seed means) says how much it moves with another training run, which two seeds can only hint at.
"""
import numpy as np

REPS = 2000  # bootstrap replicates: the 2.5% and 97.5% percentiles move by well under 0.1 point


def bootstrap(groups, reps=REPS, seed=0):
    """(reps,) replicates of the mean over `groups` of each group's mean, every group (one seed's
    per-face values, 1-d) resampled with replacement on its own."""
    rng = np.random.default_rng(seed)
    out = np.zeros(reps)
    for g in groups:
        g = np.asarray(g, dtype=float)
        out += g[rng.integers(0, len(g), (reps, len(g)))].mean(axis=1)  # (reps,)
    return out / len(groups)


def interval(replicates, level=0.95):
    """The central `level` percentile interval of bootstrap replicates: (low, high)."""
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(replicates, [tail, 100 - tail])
    return float(lo), float(hi)


def summarise(groups, reps=REPS, seed=0):
    """dict(mean=mean of the groups' means, ci=95% bootstrap interval, seeds=[each group's mean],
    replicates=the bootstrap replicates, for differences between summaries)."""
    groups = [np.asarray(g, dtype=float) for g in groups]
    reps_ = bootstrap(groups, reps, seed)
    return dict(mean=float(np.mean([g.mean() for g in groups])), ci=interval(reps_),
                seeds=[float(g.mean()) for g in groups], replicates=reps_)


def difference(a, b):
    """a - b for two summaries made from independent faces: dict(mean, ci)."""
    return dict(mean=a["mean"] - b["mean"], ci=interval(a["replicates"] - b["replicates"]))


def public(summary):
    """A summary without its replicates: what goes into the results' JSON."""
    return {k: v for k, v in summary.items() if k != "replicates"}
