"""Sharing a model: the fp16 export, the explorer's default checkpoint, and the committed showcase model."""
import os

import pytest
import torch

import explorer
import main
from checkpoint import CheckpointError, load_models
from explorer import export_models, find_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 2-step smoke run's checkpoint."""
    root = tmp_path_factory.mktemp("run")
    main.main(["--preset", "smoke", "--model_save_path", str(root / "models"),
               "--sample_path", str(root / "samples")])
    return str(root / "models" / "smoke" / "latest.pt")


def test_export_is_small_fp16_and_draws_the_same_faces(trained, tmp_path):
    out = export_models(trained, str(tmp_path / "small.pt"))
    assert os.path.getsize(out) < 0.6 * os.path.getsize(trained)
    state = torch.load(out, weights_only=True)
    assert "G" not in state and "opt_g" not in state and state["G_ema"]
    assert all(v.dtype == torch.float16 for v in state["G_ema"].values() if v.is_floating_point())
    full, small = load_models(trained, with_d=True, verbose=False), load_models(out, with_d=True, verbose=False)
    assert small.ema and small.step == full.step
    z = torch.randn(4, full.G.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small.G(z), full.G(z), atol=5e-3, rtol=0)
        x = full.G(z)
        torch.testing.assert_close(small.D(x), full.D(x), atol=5e-3, rtol=1e-2)


def test_export_refuses_what_it_does_not_hold(trained, tmp_path):
    out = export_models(trained, str(tmp_path / "g_only.pt"), with_d=False)
    with pytest.raises(CheckpointError, match="only the EMA generator: open it without --raw_g"):
        load_models(out, ema=False)
    with pytest.raises(CheckpointError, match="holds no discriminator"):
        load_models(out, with_d=True)


def test_default_checkpoint_order(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("SAGAN_CHECKPOINT", raising=False)
    runs = tmp_path / "models"
    assert find_checkpoint("given.pt", str(runs)) == ("given.pt", "given")
    if os.path.isfile(explorer.SHOWCASE):  # no run: the shipped showcase model
        assert find_checkpoint(None, str(runs))[0] == explorer.SHOWCASE
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        (runs / name / "latest.pt").write_bytes(b"x")
    os.utime(runs / "a" / "latest.pt", (1e9, 1e9))  # 'b' is newer
    assert find_checkpoint(None, str(runs))[0] == str(runs / "b" / "latest.pt")
    monkeypatch.setenv("SAGAN_CHECKPOINT", trained)
    assert find_checkpoint(None, str(runs)) == (trained, "from $SAGAN_CHECKPOINT")
    monkeypatch.delenv("SAGAN_CHECKPOINT")
    monkeypatch.setattr(explorer, "SHOWCASE", str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match="no checkpoint given, no run under .* pass --checkpoint"):
        find_checkpoint(None, str(tmp_path / "empty"))


@pytest.mark.skipif(not os.path.isfile(explorer.SHOWCASE), reason="showcase model not committed yet")
def test_committed_showcase_model_opens():
    assert os.path.getsize(explorer.SHOWCASE) < 12 * 2**20
    m = load_models(explorer.SHOWCASE, with_d=True, verbose=False)
    assert m.ema and m.G.image_size == 64 and m.D is not None and m.step > 0
    with torch.no_grad():
        x = m.G(torch.randn(2, m.G.z_dim))
    assert x.shape == (2, 3, 64, 64) and x.std() > 0.1
