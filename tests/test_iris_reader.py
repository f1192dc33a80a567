"""The iris reader (experiments/eye_metrics.read_irises, pair_score) can fail: on built-in faces
without the rule or without irises it scores at chance, with the rule it scores near its ceiling
also with noise, a blur and a shift. The command prints these scores as one JSON line; this test runs
it, so the reader cannot quietly become unspecific again (as the one-pixel reader was: faces with no
iris scored +45 points on it)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from data_loader import synthetic_face
from experiments.attention_ablation import real_faces
from experiments.eye_metrics import MIN_EYE_GAP, eye_layout, pair_probabilities, pair_score, read_irises
from conftest import ROOT, one_thread_env


def test_validate_reader_separates_rule_faces_from_rule_free_and_iris_free_ones():
    out = subprocess.run([sys.executable, "-m", "experiments.attention_ablation", "--validate_reader",
                          "--num_samples", "400"], cwd=ROOT, env=one_thread_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, "one JSON line"
    r = json.loads(lines[0])
    assert set(r) >= {"rule", "no_rule", "no_iris", "rule_noise_0.05", "rule_blur_sd1", "rule_shift_4px"}
    for case in ("no_rule", "no_iris"):  # no rule to read: within 3 points of chance
        assert abs(r[case]["points"]) <= 3, (case, r[case])
    for case in ("rule", "rule_noise_0.05", "rule_blur_sd1", "rule_shift_4px"):  # 50 is the ceiling
        lo, hi = r[case]["ci"]
        assert lo > 40 and lo <= r[case]["points"] <= hi, (case, r[case])


def test_reader_finds_each_eye_and_reads_its_iris_colour():
    S, n = 64, 100
    layout = eye_layout(S, n=500)
    metas = [synthetic_face(np.random.default_rng([777, i]), S, eyes="independent")[1] for i in range(n)]
    r = read_irises(real_faces(n, S, eyes="independent"), layout)
    truth = np.array([m["iris_rgb"] for m in metas])                  # (n, 2, 3): each eye its own colour
    centres = np.array([m["eyes_xy"] for m in metas]) - 0.5           # pixel-centre coordinates
    assert np.median(np.abs(r["centres"] - centres)) <= 0.5
    assert np.median(np.linalg.norm(r["colours"] - truth, axis=2)) < 0.02
    assert (r["centres"][:, 1, 0] - r["centres"][:, 0, 0] >= MIN_EYE_GAP * S).all()


def test_reader_never_reads_one_eye_twice_on_a_face_with_one_eye():
    S = 64
    layout = eye_layout(S, n=500)
    img, meta = synthetic_face(np.random.default_rng([777, 3]), S)
    img = img / 255.0
    (lx, ly), (rx, ry) = (np.array(meta["eyes_xy"]) + 0.5).astype(int)
    one_eye = img.copy()
    one_eye[ly - 4:ly + 4, rx - 7:rx + 7] = img[ly + 8, rx]             # the right eye painted over with skin
    c = read_irises(one_eye[None], layout)["centres"][0]
    assert abs(c[0, 0] - (lx - 1)) <= 1 and c[1, 0] - c[0, 0] >= MIN_EYE_GAP * S


def test_pair_score_is_chance_without_a_rule_and_ceiling_with_one():
    rng = np.random.default_rng(0)
    same = np.repeat(rng.uniform(0, 1, (300, 1, 3)), 2, axis=1)
    assert pair_score(same)["points"] == pytest.approx(50)
    s = pair_score(rng.uniform(0, 1, (300, 2, 3)))
    assert s["ci"][0] < 0 < s["ci"][1] and abs(s["points"]) < 3
    # a tint the whole set shares does not make eyes agree (one a face shares would: hence iris
    # regions, which hold no skin)
    tinted = rng.uniform(0, 1, (300, 2, 3)) * 0.2 + rng.uniform(0, 1, (1, 1, 3)) * 0.8
    assert abs(pair_score(tinted)["points"]) < 3
    # all reads equal (white eyes): every comparison is a tie, exactly chance
    assert pair_score(np.ones((50, 2, 3)))["points"] == 0
    H = pair_probabilities(same)
    assert (np.diag(H) == 0).all() and H.shape == (300, 300)


def test_drawing_tells_faces_from_a_collapsed_g_a_texture_and_noise():
    """drawing(): the check that a G draws faces at all before its eyes are scored. Known answers:
    built-in faces (layout and diversity near 1), one face repeated (diversity 0), a tiled texture
    like the collapsed patch-D generator's (neither), noise (no layout)."""
    from experiments.eye_metrics import drawing
    S = 64
    layout = eye_layout(S, n=500)
    faces = real_faces(200, S)
    d = drawing(faces, layout)
    assert d["layout"] > 0.9 and 0.8 < d["diversity"] < 1.2, d
    one = drawing(np.repeat(faces[:1], 200, axis=0), layout)
    assert one["diversity"] < 1e-6, one  # (its layout is one face's, not the mean face's)
    rng = np.random.default_rng(0)
    tile = np.tile(rng.random((1, 4, 4, 3)), (200, S // 4, S // 4, 1))  # one 4x4 texture, every image alike
    t = drawing(tile, layout)
    assert abs(t["layout"]) < 0.3 and t["diversity"] < 1e-6, t
    assert abs(drawing(rng.random((200, S, S, 3)), layout)["layout"]) < 0.3
