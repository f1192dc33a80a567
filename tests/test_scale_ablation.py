"""The attention ablation: its eye-colour score separates real faces from random pairs, its attention
statistic is right on a hand-made attention pattern, and the script runs end to end (2 tiny steps)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attention import cell_to_index, pixel_to_cell  # noqa: E402
from data_loader import synthetic_face  # noqa: E402
from experiments.attention_ablation import real_faces  # noqa: E402
from experiments.eye_metrics import consistency, eye_colours, eye_layout, other_eye_masks, other_eye_ratio  # noqa: E402


def test_eye_colour_score_reads_real_eyes_and_rejects_random_pairs():
    layout = eye_layout(32, n=300)
    mean = layout["mean"]
    (lx0, lx1, _, _), (rx0, rx1, _, _) = layout["windows"]
    assert lx1 < rx0, "the two eyes' search windows must not share a column"
    assert mean[0, 0] < 16 < mean[1, 0] and mean[0, 1] == pytest.approx(mean[1, 1])

    colours = eye_colours(real_faces(300, 32), layout)
    real_frac, real_med = consistency(colours, 0.1)
    rand_frac, rand_med = consistency(colours, 0.1, np.random.default_rng(0))
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
    mean = eye_layout(32, n=300)["mean"]
    cells = [cell_to_index(*pixel_to_cell(x, y, (8, 8), (32, 32)), 8) for x, y in mean]  # 8x8 layer
    masks = other_eye_masks(cells, (8, 8))
    assert other_eye_ratio(torch.full((3, 2, 64), 1 / 64), masks) == pytest.approx(1.0)
    # all mass on a far corner: nothing on the other eye
    assert other_eye_ratio(rows_on(63), masks) == 0.0
    # the right eye's cell: the left-eye query scores 1 / (its region's share), the right-eye query 0
    ratio = other_eye_ratio(rows_on(cells[1]), masks)
    assert ratio > 2.0


def test_ablation_script_runs_both_arms_and_prints_the_table(tmp_path):
    cmd = [sys.executable, "-m", "experiments.attention_ablation", "--steps", "2",
           "--conv_dim", "8", "--z_dim", "16", "--batch_size", "4", "--synthetic_size", "64",
           "--num_samples", "16", "--out", str(tmp_path / "abl")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)  # as its docstring says
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 5, proc.stdout
    assert "G8:" in rows[3] and "G16:" in rows[3] and "n/a" in rows[4]
    assert os.path.isfile(tmp_path / "abl" / "models" / "attn" / "ckpt_0000002.pt")
