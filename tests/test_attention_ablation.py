"""The attention ablation's measures: its eye-colour score separates real faces from random pairs
and its attention statistic is right on hand-made attention patterns. (The experiment's control
region, causal test, intervals and end-to-end run: tests/test_long_range_experiment.py.)"""
import numpy as np
import pytest
import torch

from attention import cell_to_index, pixel_to_cell
from data_loader import synthetic_face
from experiments.attention_ablation import real_faces
from experiments.eye_metrics import eye_agreement, eye_cells, eye_colours, eye_layout, region_masks, region_ratio


def test_eye_colour_score_reads_real_eyes_and_rejects_random_pairs():
    layout = eye_layout(32, n=300)
    mean = layout["mean"]
    (lx0, lx1, _, _), (rx0, rx1, _, _) = layout["windows"]
    assert lx1 < rx0, "the two eyes' search windows must not share a column"
    assert mean[0, 0] < 16 < mean[1, 0] and mean[0, 1] == pytest.approx(mean[1, 1])

    colours = eye_colours(real_faces(300, 32), layout)
    a = eye_agreement(colours, 0.1)
    real_frac, real_med = a["match"].mean(), np.median(a["dist"])
    rand_frac, rand_med = a["chance"].mean(), np.median(a["chance_dist"])
    assert real_frac > 0.6 and rand_frac < 0.1 and real_med < 0.05 < 0.3 < rand_med

    # where it reads a colour it reads the right one: the true iris colour, for most faces
    truth = np.array([synthetic_face(np.random.default_rng([777, i]), 32)[1]["eye_rgb"] for i in range(300)])
    assert np.median(np.linalg.norm(colours[:, 0] - truth, axis=1)) < 0.3

    # a face whose right iris is repainted another colour fails the rule
    img, meta = synthetic_face(np.random.default_rng([777, 1]), 32)
    img = img.astype(float) / 255
    painted = img.copy()
    rx, ry = (int(v) for v in meta["eyes_xy"][1])
    painted[ry - 1:ry + 2, rx - 1:rx + 2] = 1 - np.array(meta["eye_rgb"])  # the 3x3 pixels of the iris
    c = eye_colours(np.stack([img, painted]), layout)
    d = np.linalg.norm(c[:, 0] - c[:, 1], axis=1)
    assert d[1] > 0.3 and d[1] > d[0]


def rows_on(key, B=3, N=64):
    """Attention rows of both eye queries, (B, 2, N), with all mass on key `key`."""
    rows = torch.zeros(B, 2, N)
    rows[:, :, key] = 1.0
    return rows


def test_attention_statistic_is_one_for_uniform_and_large_when_eyes_attend_each_other():
    layout = eye_layout(32, n=300)
    cells = [cell_to_index(*pixel_to_cell(x, y, (8, 8), (32, 32)), 8) for x, y in layout["mean"]]  # 8x8 layer
    masks = region_masks(cells, (8, 8), eye_cells(layout, (8, 8)))["other"]
    assert region_ratio(torch.full((3, 2, 64), 1 / 64), masks).mean() == pytest.approx(1.0)
    # all mass on a far corner: nothing on the other eye
    assert region_ratio(rows_on(63), masks).mean() == 0.0
    # the right eye's cell: the left-eye query scores 1 / (its region's share), the right-eye query 0
    ratio = region_ratio(rows_on(cells[1]), masks).mean()
    assert ratio > 2.0
