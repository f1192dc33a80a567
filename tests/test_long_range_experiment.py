"""The long-range experiment (experiments/attention_ablation.py): the control region is as far from
the eye query as the other eye and never on an eye, at 32 and 64px; removing a layer's attention at
inference is exactly a G without that layer's term; the bootstrap intervals are right on planted
data; the verdicts can say yes, no and "cannot tell" on planted differences; and the whole script
runs end to end on tiny runs (2 seeds x 3 arms, 2 steps each) and resumes them with more steps."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from attention import attention_layers, face_pixels, gamma, layers_removed, pixel_queries
from data_loader import synthetic_face
from experiments.attention_ablation import (COMPARISONS, NEGATIVE, NEGATIVE_NONE, NET, POSITIVE, build_parser,
                                           check_args, decide, endpoint_steps, headline, sensitivity, t_quantile)
from experiments.eye_metrics import SCLERA_HALF, eye_agreement, eye_cells, eye_layout, region_masks, region_ratio
from experiments.uncertainty import bootstrap, difference, interval, summarise
from sagan_models import Generator, default_attn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================ control region

def eye_pixels(seed, i, imsize, scale=4):
    """(imsize, imsize) bool: the pixels of built-in face (seed, i) that an eye covers, found on the
    same face drawn `scale` times larger (its geometry does not depend on the size): there, every
    pixel of exactly white (the sclera) or exactly the iris colour belongs to an eye."""
    img, meta = synthetic_face(np.random.default_rng([seed, i]), imsize * scale)
    eye = (img == 255).all(-1) | (img == np.rint(np.array(meta["eye_rgb"]) * 255)).all(-1)
    return eye.reshape(imsize, scale, imsize, scale).any(axis=(1, 3))


def test_sclera_half_size_bounds_every_drawn_eye_and_is_tight():
    S, far_x, far_y = 128, 0.0, 0.0
    for i in range(200):
        img, meta = synthetic_face(np.random.default_rng([99, i]), S)
        ys, xs = np.nonzero((img == 255).all(-1) | (img == np.rint(np.array(meta["eye_rgb"]) * 255)).all(-1))
        c = np.array(meta["eyes_xy"])  # (2, xy)
        dx = np.abs(xs[:, None] + 0.5 - c[None, :, 0]).min(axis=1)
        dy = np.abs(ys + 0.5 - c[0, 1])
        far_x, far_y = max(far_x, dx.max()), max(far_y, dy.max())
    # every eye pixel's block meets the box; and the box is no more than 2 pixels too large
    assert far_x < SCLERA_HALF[0] * S + 0.5 and far_y < SCLERA_HALF[1] * S + 0.5
    assert far_x > SCLERA_HALF[0] * S - 2 and far_y > SCLERA_HALF[1] * S - 2


def query_cells(imsize, layer):
    G = Generator(imsize, z_dim=8, conv_dim=4, attn_res=[int(layer[1:])])
    faces = face_pixels(imsize)
    return pixel_queries(G, [faces["left eye"], faces["right eye"]])[layer]


@pytest.mark.parametrize("imsize", [32, 64])
def test_control_region_is_as_far_as_the_other_eye_and_never_on_an_eye(imsize):
    layout = eye_layout(imsize, n=500)
    held_out = np.stack([eye_pixels(31, i, imsize) for i in range(100)]).any(axis=0)  # (S, S): any face's eyes
    for res in default_attn(imsize, "g"):
        layer, hw = f"G{res}", (res, res)
        H, W = hw
        cells = query_cells(imsize, layer)
        blocked = eye_cells(layout, hw)
        m = region_masks(cells, hw, blocked)
        if res == 8:  # the eyes are neighbouring 8x8 cells: nothing as far is free of eyes
            assert m["control_cells"] == [None, None] and m["control"].sum() == 0
            continue
        sx = imsize // W
        for e in range(2):
            q, o, c = divmod(int(cells[e]), W), divmod(int(cells[1 - e]), W), m["control_cells"][e]
            assert c is not None
            assert np.hypot(*np.subtract(c, q)) == pytest.approx(np.hypot(*np.subtract(o, q)), abs=0.5)
            control = m["control"][e].reshape(hw).bool().numpy()
            other = m["other"][e].reshape(hw).bool().numpy()
            assert control.sum() >= 6 and not (control & other).any() and not control[q]
            # its cells, on average, no more than a cell further than the other eye's region
            dist = lambda mask: np.hypot(*(np.argwhere(mask).mean(axis=0) - q))  # noqa: E731
            assert abs(dist(control) - dist(other)) <= 1.0
            # no eye in it: by the layout's boxes, and on 100 faces drawn fresh at 4x the size
            assert not (control & blocked).any()
            pixels = np.kron(control, np.ones((sx, sx), dtype=bool))  # (S, S): the region's pixel blocks
            assert not (pixels & held_out).any()
            # the other eye's region does hold eyes: the control differs where it should
            assert (np.kron(other, np.ones((sx, sx), dtype=bool)) & held_out).any()


def test_region_ratio_compares_the_other_eye_with_the_control():
    layout = eye_layout(64, n=300)
    cells = query_cells(64, "G32")
    m = region_masks(cells, (32, 32), eye_cells(layout, (32, 32)))
    N = 32 * 32
    uniform = torch.full((4, 2, N), 1 / N)
    assert region_ratio(uniform, m["other"]).numpy() == pytest.approx(np.ones(4))
    assert region_ratio(uniform, m["control"]).numpy() == pytest.approx(np.ones(4))
    rows = torch.zeros(4, 2, N)
    rows[:, 0, int(m["control"][0].nonzero()[0])] = 1.0  # the left-eye query: all on its control
    rows[:, 1, int(m["other"][1].nonzero()[0])] = 1.0     # the right-eye query: all on the other eye
    share_c, share_o = float(m["control"][0].sum()) / N, float(m["other"][1].sum()) / N
    assert region_ratio(rows, m["control"]).numpy() == pytest.approx(np.full(4, (1 / share_c + 0) / 2))
    assert region_ratio(rows, m["other"]).numpy() == pytest.approx(np.full(4, (0 + 1 / share_o) / 2))
    # a layer without a control region gives NaN, never a number that looks like a control
    assert np.isnan(region_ratio(rows, torch.zeros(2, N)).numpy()).all()


# ============================================================================ causal test

def test_removing_a_layer_is_exactly_a_generator_without_its_attention_term():
    torch.manual_seed(0)
    G = Generator(32, z_dim=16, conv_dim=8, attn_res=[8, 16]).eval()
    with torch.no_grad():
        G.attn["8"].gamma.fill_(0.8)
        G.attn["16"].gamma.fill_(-0.6)
    z = torch.randn(6, 16)
    with torch.no_grad():
        intact = G(z)
        for removed, keep in ((["G16"], [8]), (["G8"], [16]), (["G8", "G16"], [])):
            plain = Generator(32, z_dim=16, conv_dim=8, attn_res=keep).eval()
            gone = tuple(f"attn.{n[1:]}." for n in removed)
            plain.load_state_dict({k: v for k, v in G.state_dict().items() if not k.startswith(gone)})
            with layers_removed(G, removed):
                out = G(z)
            assert torch.allclose(out, plain(z), atol=1e-6), removed
            assert (out - intact).abs().max() > 1e-3, f"removing {removed} changed nothing: not a real test"
    # G itself keeps its attention
    assert {n: gamma(l) for n, l in attention_layers(G).items()} == pytest.approx({"G8": 0.8, "G16": -0.6})


# ============================================================================ intervals

def test_bootstrap_interval_matches_theory_and_covers_planted_means():
    rng = np.random.default_rng(0)
    x = rng.random(2000) < 0.3
    lo, hi = interval(bootstrap([x], reps=4000, seed=1))
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert lo < x.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # 95% intervals from 300 planted samples hold the true mean about 95% of the time
    covered = sum(lo <= 0.3 <= hi for lo, hi in
                  (interval(bootstrap([rng.random(100) < 0.3], reps=400, seed=s)) for s in range(300)))
    assert 0.89 <= covered / 300 <= 0.99


def test_seeds_are_strata_and_differences_separate_planted_arms():
    rng = np.random.default_rng(1)
    a = summarise([rng.random(1000) < 0.2, rng.random(1000) < 0.4], seed=1)
    assert a["mean"] == pytest.approx(np.mean(a["seeds"])) and a["seeds"][0] < 0.25 < 0.35 < a["seeds"][1]
    # the interval is the faces' noise with the seeds held fixed, not the seeds' spread
    half = 1.96 * np.sqrt(0.2 * 0.8 / 1000 + 0.4 * 0.6 / 1000) / 2
    assert (a["ci"][1] - a["ci"][0]) / 2 == pytest.approx(half, rel=0.2)
    b = summarise([rng.random(1000) < 0.5, rng.random(1000) < 0.5], seed=2)
    d = difference(b, a)
    assert d["ci"][0] > 0.1 and d["ci"][0] < 0.2 < d["ci"][1]
    same = difference(summarise([rng.random(1000) < 0.3], seed=3), summarise([rng.random(1000) < 0.3], seed=4))
    assert same["ci"][0] < 0 < same["ci"][1]


def test_eye_agreement_counts_a_generator_with_one_iris_colour_as_chance():
    rng = np.random.default_rng(2)
    own = rng.random((50, 3))
    rule = eye_agreement(np.stack([own, own], axis=1), 0.1)   # every face's eyes alike, faces differ
    assert rule["match"].mean() == 1 and rule["chance"].mean() < 0.1 and rule["excess"].mean() > 0.9
    one = eye_agreement(np.full((50, 2, 3), 0.5), 0.1)        # every iris one colour: no rule needed
    assert one["match"].mean() == 1 and one["chance"].mean() == 1 and one["excess"].mean() == 0


# ============================================================================ end to end

def test_decide_can_say_yes_no_and_cannot_tell_on_planted_differences():
    assert decide([20.0, 22.0, 25.0])[0] == "helps"            # a clear yes
    assert decide([-20.0, -22.0, -25.0])[0] == "hurts"
    assert decide([0.5, -0.3, 0.2])[0] == "no difference"      # a clear no: within +-MARGIN
    assert decide([15.0, -10.0, 2.0])[0] == "cannot tell"      # seeds disagree: uninformative
    assert decide([30.0])[0] == "cannot tell"                  # one seed has no spread to measure
    verdict, s = decide([1.0, 2.0, 3.0])
    # the t interval over seeds: mean 2, sd 1, t(2) = 4.303
    assert s["ci"] == pytest.approx([2 - 4.303 / np.sqrt(3), 2 + 4.303 / np.sqrt(3)], abs=1e-3)
    assert t_quantile(30) == pytest.approx(2.042, abs=2e-3) and t_quantile(1000) == pytest.approx(1.962, abs=2e-3)


def test_the_answer_is_the_net_difference_and_its_winner_must_have_learned_the_rule():
    pos, pos2 = POSITIVE  # the patch D's and the local G's
    null, yes, no, unclear = (dict(verdict=v) for v in ("no difference", "helps", "hurts", "cannot tell"))
    # a null stands only with a working positive control and a rule learned by at least one arm
    assert headline({NET: null, pos: yes, NEGATIVE: yes}) == ("no difference", "")
    assert headline({NET: null, pos2: yes, NEGATIVE_NONE: yes}) == ("no difference", "")  # either control, either arm
    verdict, why = headline({NET: null, pos: unclear, pos2: unclear, NEGATIVE: yes, NEGATIVE_NONE: yes})
    assert verdict == "cannot tell" and "positive control" in why
    verdict, why = headline({NET: null, pos: yes, NEGATIVE: unclear, NEGATIVE_NONE: unclear})
    assert verdict == "cannot tell" and "rule-free" in why
    # a benefit needs no positive control, but the attention arm must beat its rule-free twin
    assert headline({NET: yes, NEGATIVE: yes, NEGATIVE_NONE: unclear}) == ("helps", "")
    verdict, why = headline({NET: yes, pos: yes, NEGATIVE: unclear, NEGATIVE_NONE: yes})
    assert verdict == "cannot tell" and "G+D arm" in why
    # a harm: the arm without attention must beat its own rule-free twin
    assert headline({NET: no, NEGATIVE: unclear, NEGATIVE_NONE: yes}) == ("hurts", "")
    verdict, why = headline({NET: no, NEGATIVE: yes, NEGATIVE_NONE: unclear})
    assert verdict == "cannot tell" and "no-attention arm" in why
    # the raw gd - none difference alone answers nothing: each arm's images share colour of their own
    main = COMPARISONS[0][0]
    for v in (yes, no, null):
        verdict, why = headline({main: v, pos: yes, NEGATIVE: yes, NEGATIVE_NONE: yes})
        assert verdict == "cannot tell" and "none_norule" in why
    assert headline({})[0] == "cannot tell"


def test_a_stopped_runs_extra_checkpoint_stays_out_of_endpoints_and_windows(tmp_path):
    args = check_args(build_parser().parse_args(["--steps", "10000", "--out", str(tmp_path), "--seeds", "0,1",
                                                 "--last", "3"]))
    run = tmp_path / "models" / "gd_seed0"
    run.mkdir(parents=True)
    for step in (1000, 2000, 6000, 6700, 7000, 8000, 9000, 10000):  # stopped at 6700, resumed
        (run / f"ckpt_{step:07d}.pt").write_bytes(b"")
    steps, last = endpoint_steps(args, "gd", 0)
    assert 6700 in steps and last == [8000, 9000, 10000]
    args.last = 4
    assert endpoint_steps(args, "gd", 0)[1] == [7000, 8000, 9000, 10000]  # not 6700

    # the windows: every run's last k grid checkpoints; run gd seed 0's 6700 would shift its k = 4 window
    def series(points, extra=None):
        out = [dict(step=1000 * (i + 1), points=float(v)) for i, v in enumerate(points)]
        return sorted(out + ([dict(step=6700, points=extra)] if extra is not None else []), key=lambda p: p["step"])
    base = [0.0] * 6 + [1.0, 2.0, 3.0, 4.0]   # steps 1000..10000
    scored = {(a, s): dict(series=series(base)) for a in ("gd", "gd_norule", "none", "none_norule") for s in (0, 1)}
    scored[("gd", 0)] = dict(series=series([v + 10 for v in base], extra=-100.0))
    rows = sensitivity(args, scored)
    assert [r["last"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:  # gd seed 0 is +10 over every other run at every grid step, whatever the window
        assert r["comparisons"][NET]["values"] == pytest.approx([10.0, 0.0])
        assert r["comparisons"][NEGATIVE]["values"] == pytest.approx([10.0, 0.0])


def test_experiment_runs_end_to_end_resumes_and_writes_tables_json_and_figures(tmp_path):
    out = tmp_path / "lr"
    cmd = [sys.executable, "-m", "experiments.attention_ablation", "--imsize", "32", "--conv_dim", "8",
           "--z_dim", "16", "--batch_size", "4", "--synthetic_size", "64", "--seeds", "0,1", "--arms",
           "gd,none,gd_norule,none_norule", "--num_samples", "16", "--jobs", "4", "--last", "2", "--out", str(out)]
    proc = subprocess.run([*cmd, "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| gd | G+D attention |") and "(seeds" in r for r in rows)
    assert any(r.startswith("| none | no attention in G or D |") for r in rows)
    assert any(r.startswith("| attention in G and D | gd - none |") for r in rows)
    assert any(r.startswith("| rule learned") and "gd - gd_norule" in r for r in rows)
    assert any(r.startswith("| rule learned") and "none - none_norule" in r for r in rows)
    assert any(r.startswith(f"| {NET} | (gd - gd_norule) - (none - none_norule) |") for r in rows)
    assert "The iris reader on known faces" in text and "Answer:" in text
    for label in ("G8", "G16", "all layers"):  # the causal test per layer and all at once
        assert any(r.startswith(f"| gd | {label} |") for r in rows), label
    assert any(r.startswith("| gd | G16 | trained |") for r in rows)
    assert any(r.startswith("| gd | G16 | random_qk |") for r in rows)
    assert not any(r.startswith("| none | G") for r in rows)
    assert "wall time:" in text.splitlines()[-1]
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seeds"] == [0, 1] and res["headline"]["verdict"] in ("helps", "hurts", "cannot tell",
                                                                                "no difference")
    assert set(res["reader"]["cases"]) >= {"rule", "no_rule", "no_iris"}
    e = {arm: np.array(a["endpoint"]["values"]) for arm, a in res["arms"].items()}
    net = res["comparisons"][NET]
    assert net["values"] == pytest.approx(list((e["gd"] - e["gd_norule"]) - (e["none"] - e["none_norule"])))
    assert res["headline"]["verdict"] == headline(res["comparisons"])[0]
    # the endpoint's sensitivity: --last 1 is each run's last score alone, --last 2 the experiment's own
    assert [r["last"] for r in res["sensitivity"]] == [1, 2]
    last = {arm: np.array([a["series"][s][-1]["points"] for s in ("0", "1")]) for arm, a in res["arms"].items()}
    assert res["sensitivity"][0]["comparisons"][NET]["values"] == pytest.approx(
        list((last["gd"] - last["gd_norule"]) - (last["none"] - last["none_norule"])))
    assert res["sensitivity"][0]["comparisons"][NEGATIVE_NONE]["values"] == pytest.approx(
        list(last["none"] - last["none_norule"]))
    assert res["sensitivity"][1]["comparisons"][NET]["values"] == pytest.approx(net["values"])
    assert res["sensitivity"][1]["answer"] == res["headline"]["verdict"]
    at = rows.index("| last k | net | gd - gd_norule | none - none_norule | answer |")
    assert rows[at + 1].startswith("| 1 | ") and rows[at + 2].startswith("| 2 | ")
    assert rows[at + 2].endswith(f"| {res['headline']['verdict']} |")
    assert "k = 1 " in res["summary"][-2] and "k = 2 " in res["summary"][-2]
    assert res["arms"]["gd"]["endpoint_steps"] == [1, 2]
    assert len(res["arms"]["gd"]["endpoint"]["values"]) == 2
    assert res["summary"] == [line for line in text.splitlines() if line in res["summary"]]
    for fig in res["figures"]:
        assert os.path.getsize(fig) > 1000
    assert res["figures"][-2].endswith("scores_along_training.png") and res["figures"][-1].endswith("irises_seed0.png")
    kept = sorted((out / "scores" / "gd_seed0").iterdir())
    assert [p.name for p in kept] == ["step1_n16.json", "step2_n16.json"]

    # more steps: every run resumes from its last checkpoint (not from scratch); kept scores are reused
    stamp = kept[0].stat().st_mtime_ns
    proc = subprocess.run([*cmd, "--steps", "3", "--no_mechanism"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--resume" in proc.stdout and "--total_step 3" in proc.stdout
    assert (out / "models" / "gd_seed1" / "ckpt_0000003.pt").is_file()
    assert kept[0].stat().st_mtime_ns == stamp
    res = json.loads((out / "results.json").read_text())
    assert res["arms"]["none"]["endpoint_steps"] == [2, 3]
