"""The attention ablation's attention statistic is right on hand-made attention patterns. (The iris
reader: tests/test_iris_reader.py; the experiment's control region, causal test, intervals, verdicts
and end-to-end run: tests/test_long_range_experiment.py.)"""
import pytest
import torch

from attention import cell_to_index, pixel_to_cell
from experiments.eye_metrics import eye_cells, eye_layout, region_masks, region_ratio


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
