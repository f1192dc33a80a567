"""evaluate.py (FID/KID) and the FID during training with the stand-in feature network, and the EMA
generator in checkpoints. (The real Inception: tests/test_fid_network.py.)

evaluate.py runs as a real subprocess on a real folder of PNGs and a real checkpoint; its numbers are
checked against FID and KID computed here directly with numpy/scipy on the same images' features, and
the numbers training writes to metrics.jsonl against evaluate.py's on the same checkpoint.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from checkpoint import load_checkpoint, load_generator
from cli import UserError
from conftest import ROOT, SMOKE, free_port, one_thread_env
from dashboard import Dashboard
from data_loader import SyntheticFaces
from ema import EMA
from fid import RandomConvFeatures, folder_source, generated_batches, real_features
from main import dataset_for, parse_args
from sagan_models import Generator
from trainer import Trainer

N = 40  # generated and real images (> the 16 stand-in features); KID's subset is all of them


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run on the built-in data (EMA on) and a folder of real built-in faces as PNG files."""
    tmp = tmp_path_factory.mktemp("eval")
    config = parse_args([*SMOKE, "--synthetic_size", "32", "--total_step", "3", "--sample_step", "3",
                         "--model_save_step", "3", "--ema_decay", "0.5", "--version", "ev", "--model_save_path", str(tmp / "models"), "--sample_path", str(tmp / "samples")])
    trainer = Trainer(config, dataset_for(config))
    ckpt = trainer.train()
    real = tmp / "real" / "nested"
    real.mkdir(parents=True)
    faces = SyntheticFaces(N, 32, seed=7)
    for i in range(N):
        Image.fromarray(faces.face(i)[0]).save(real / f"{i:03d}.png")
    return tmp, ckpt, trainer


def evaluate(tmp, ckpt, *extra):
    out = tmp / "scores.json"
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", ckpt, "--real", str(tmp / "real"),
           "--num_samples", str(N), "--batch_size", "10", "--features", "randconv", "--kid_subset_size", str(N),
           "--center_crop", "0",
           "--kid_subsets", "3", "--cache_dir", str(tmp / "cache"), "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=120,
                          env=one_thread_env())
    return proc, (json.loads(out.read_text()) if proc.returncode == 0 else None)


def numpy_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def numpy_kid(a, b):
    """Unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3, all samples (Binkowski et al. 2018)."""
    d, m = a.shape[1], len(a)
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fid_and_kid_match_a_direct_numpy_computation_and_real_features_are_cached(run):
    tmp, ckpt, _ = run
    proc, scores = evaluate(tmp, ckpt)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "EMA generator weights" in proc.stdout and scores["generator"] == "EMA"
    assert "NOT comparable to published FID" in proc.stdout and "real: 40 images" in proc.stdout
    assert "N = 40 generated, 40 real | random-conv-16" in proc.stdout
    assert scores["num_real"] == scores["num_fake"] == N and scores["network"] == "random-conv-16"

    # the same images through the same stand-in network, scored by numpy/scipy
    feats = RandomConvFeatures()
    real = np.stack([feats(torch.from_numpy(np.array(Image.open(tmp / "real" / "nested" / f"{i:03d}.png")))
                           .permute(2, 0, 1)[None])[0].double().numpy() for i in range(N)])
    G = load_generator(ckpt, verbose=False)
    with torch.no_grad():
        fake = torch.cat([feats(x) for x in generated_batches(G, N, 10, 0, "cpu")]).double().numpy()
    assert scores["fid"] == pytest.approx(numpy_fid(real, fake), rel=1e-5)
    assert scores["fid"] > 1.0  # a 3-step generator is far from the data
    assert scores["kid"] == pytest.approx(numpy_kid(real, fake), rel=1e-5, abs=1e-9)
    assert scores["kid_std"] < 1e-6 * abs(scores["kid"]) + 1e-10  # every subset is the whole set

    # second run: real features from the cache, same numbers; the raw G scores differently
    proc2, again = evaluate(tmp, ckpt, "--raw_g")
    assert "cached" in proc2.stdout and "raw generator weights" in proc2.stdout
    assert again["generator"] == "raw" and again["fid"] != pytest.approx(scores["fid"], rel=1e-6)
    # a changed folder is a new set of statistics; the same folder at another crop too
    Image.fromarray(SyntheticFaces(1, 32, seed=8).face(0)[0]).save(tmp / "real" / "extra.png")
    def features(crop):
        return real_features(*folder_source(str(tmp / "real"), 32, crop), N + 1, feats, 10, "cpu", str(tmp / "cache"))
    changed, how = features(0)
    assert how.startswith("computed") and len(changed) == N + 1
    assert features(0)[1].startswith("cached")
    assert features(32)[1].startswith("computed")  # another crop: another key


@pytest.mark.parametrize("case", ["missing weights", "unreadable weights", "too few real", "crop too big",
                                  "images too small"])
def test_bad_inputs_are_one_line_naming_the_input(run, case):
    tmp, ckpt, _ = run
    if case == "images too small":  # 16px faces can't serve a 32px model without upsampling
        small = tmp / "small"
        small.mkdir(exist_ok=True)
        Image.fromarray(SyntheticFaces(1, 16, seed=1).face(0)[0]).save(small / "a.png")
    junk = tmp / "junk.pt"
    junk.write_bytes(b"not a network" * 100)
    extra, expect = {
        "missing weights": (["--features", "inception", "--feature_weights", str(tmp / "nope.pth")],
                            ["--feature_weights", "nope.pth", "does not exist", "default_1.pt"]),
        "unreadable weights": (["--features", "inception", "--feature_weights", str(junk)],
                               ["junk.pt", "unreadable", "default_1.pt"]),
        "too few real": (["--num_real", "1000"], ["images, fewer than N = 1000"]),
        "crop too big": (["--center_crop", "48"], ["is 32x32, smaller than the crop 48", "--center_crop"]),
        "images too small": (["--real", str(tmp / "small")], ["cut at 16 is smaller than the model's 32px"]),
    }[case]
    proc, _ = evaluate(tmp, ckpt, *extra)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("evaluate.py: error: ")
    for text in expect:
        assert text in proc.stderr


def test_fid_while_training_is_in_metrics_and_equals_evaluate_on_the_same_checkpoint(tmp_path):
    """--fid_every: records {step, fid, kid, ...} in metrics.jsonl, each the number evaluate.py
    gives the checkpoint of that step against the same built-in faces at the same N."""
    n = 24
    config = parse_args([*SMOKE, "--total_step", "4", "--model_save_step", "2", "--fid_every", "2",
                         "--fid_samples", str(n), "--fid_network", "randconv", "--version", "f",
                         "--model_save_path", str(tmp_path / "m"), "--sample_path", str(tmp_path / "s")])
    trainer = Trainer(config, dataset_for(config))
    # a real Dashboard with no server behind it: what the training loop hands it, window by window
    dash = Dashboard("http://127.0.0.1", free_port(), "f", {"loss": ("losses", ["d_loss"]), "fid": ("FID", ["fid"])})
    trainer.attach_dashboard(dash)
    trainer.train()
    dash.close(flush_timeout=0)
    assert dash.lines["fid"].x == [2, 4] and dash.lines["loss"].x == [1, 2, 3, 4]  # no FID rows among losses
    records = [json.loads(line) for line in (tmp_path / "m" / "f" / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in records if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4]
    assert all(r["fid_n"] == n and r["fid_network"] == "random-conv-16" and r["fid_s"] > 0 for r in fids)
    assert fids[0]["fid"] != fids[1]["fid"]  # the generator moved
    assert [r[0] for r in dash.lines["fid"].y] == [r["fid"] for r in fids]
    out = tmp_path / "e.json"
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(tmp_path / "m" / "f" / "latest.pt"),
           "--num_samples", str(n), "--num_real", str(n), "--features", "randconv", "--kid_subsets", "10",
           "--cache_dir", str(tmp_path / "cache"), "--json", str(out)]  # --real: the run's own data
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(out.read_text())
    assert "built-in faces" in scores["real"]
    assert scores["fid"] == pytest.approx(fids[1]["fid"], rel=1e-6)
    assert scores["kid"] == pytest.approx(fids[1]["kid"], rel=1e-6)

    # too few real images for N: one line at the start, before any step
    bad = parse_args([*SMOKE, "--fid_every", "2", "--fid_samples", "65", "--fid_network", "randconv",
                      "--model_save_path", str(tmp_path / "m2")])
    with pytest.raises(UserError, match="has 64 images, fewer than N = 65"):
        Trainer(bad, dataset_for(bad))


def test_ema_is_saved_used_by_default_and_follows_the_lerp(run, capsys):
    tmp, ckpt, trainer = run
    state = load_checkpoint(ckpt)
    assert state["config"]["ema_decay"] == 0.5 and "G_ema" in state
    G_ema = load_generator(ckpt)
    assert "EMA generator weights" in capsys.readouterr().out
    G_raw = load_generator(ckpt, ema=False)
    z = torch.randn(2, 16)
    with torch.no_grad():
        assert not torch.allclose(G_ema(z), G_raw(z))  # after 3 updates the average is not G
        assert torch.allclose(G_ema(z), trainer.ema.model(z))

    # one update: ema <- ema + (1 - d) (g - ema) for parameters, buffers copied
    G = Generator(32, 16, 8, [16])
    ema = EMA(G, decay=0.9, start=2)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G.blocks[0][1].running_mean.fill_(3.0)
    ema.update(step=2)  # not past ema_start: copies G
    assert torch.equal(ema.model.blocks[0][1].running_mean, G.blocks[0][1].running_mean)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), G.parameters()))
    ema.load_state_dict(before)
    d = ema.decay_at(50)
    assert d == pytest.approx(min(0.9, 49 / 58))
    ema.update(step=50)
    for (name, p), q in zip(ema.model.named_parameters(), G.parameters()):
        assert torch.allclose(p, before[name] + (1 - d) * (q - before[name]), atol=1e-6), name
