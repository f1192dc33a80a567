"""The fast training path computes the paper's numbers: attention routes agree, no N x N map is
created at large N (in a layer or a whole training step), one D forward on real+fake equals two, the
speed flags run."""
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import SMOKE, metrics, run_main
from sagan_models import CPU_EXPLICIT_MAX_N, Discriminator, Self_Attn, attention_output, fused_attention


class Created(TorchDispatchMode):
    """While active, records the shape of every tensor any op returns, forward and backward: a map
    of N x N attention weights cannot exist without some op returning it (or a bigger tensor)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def largest(self):
        """(elements, shape) of the largest tensor created."""
        return max((math.prod(s), s) for s in self.shapes)


def explicit(q, k, v):
    """The seed's maths, written out: (B, C', N), (B, C', N), (B, C, N) -> (B, N, C)."""
    attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N)
    return attention @ v.transpose(1, 2)


@pytest.mark.parametrize("H", [4, 16, 32])  # explicit CPU route (N <= 256) and the flash route
def test_attention_routes_agree_with_the_explicit_map(H):
    torch.manual_seed(0)
    B, C, N = 2, 32, H * H
    q, k, v = torch.randn(B, 4, N), torch.randn(B, 4, N), torch.randn(B, C, N)
    ref = explicit(q.double(), k.double(), v.double()).float()
    for fn in (fused_attention, attention_output):
        out = fn(q, k, v)
        assert out.shape == (B, N, C)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("H", [8, 32])
def test_self_attn_training_path_matches_materialised_path_with_gradients(H):
    torch.manual_seed(0)
    layer = Self_Attn(16)
    with torch.no_grad():
        layer.gamma.fill_(0.7)  # gamma starts at 0, which would hide the attention output
    layer.eval()  # no power-iteration update between the two calls
    x = torch.randn(2, 16, H, H)
    grads = []
    for return_attn in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out, attention = layer(xi, return_attn=return_attn)
        assert (attention is not None) == return_attn
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([out.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_path_at_n_4096_never_creates_an_n_by_n_map():
    """The 128px configuration's G layer at 64x64, forward and backward: no tensor of N x N elements
    is created, and no allocation comes near one (N, N) float map. The map the explorer asks for
    (return_attn=True) is seen by the same measurement, so the measurement can fail."""
    torch.manual_seed(0)
    N = 64 * 64
    layer = Self_Attn(16)
    x = torch.randn(1, 16, 64, 64, requires_grad=True)
    assert N > CPU_EXPLICIT_MAX_N
    with Created() as created, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, attention = layer(x, return_attn=False)
        out.sum().backward()
    assert attention is None
    elements, shape = created.largest()
    assert elements < N * N / 16, f"a tensor of shape {shape} was created"
    biggest = max(e.cpu_memory_usage / max(e.count, 1) for e in prof.key_averages())
    assert biggest < N * N * 4 / 16, f"an op allocated {biggest / 2**20:.1f} MiB at once"

    with Created() as created, torch.no_grad():
        layer(x, return_attn=True)
    assert created.largest()[0] >= N * N  # the map, when it is asked for


def test_a_whole_training_step_at_128px_never_creates_an_n_by_n_map(tmp_path):
    """Trainer.train_step (both updates, forward and backward) with attention at the 64x64 feature
    maps of G and D (N = 4096): the largest tensor any op creates stays below one N x N map."""
    import main
    from trainer import Trainer
    torch.manual_seed(0)
    N = 64 * 64
    config = main.parse_args([*SMOKE, "--imsize", "128", "--g_attn", "64", "--d_attn", "64",
                              "--batch_size", "2", "--g_conv_dim", "2", "--d_conv_dim", "2",
                              "--model_save_path", str(tmp_path / "models"), "--sample_path", str(tmp_path)])
    trainer = Trainer(config, dataset=None)
    real = torch.rand(2, 3, 128, 128) * 2 - 1
    with Created() as created:
        losses = trainer.train_step(real)
    assert all(torch.isfinite(v) for v in losses.values())
    elements, shape = created.largest()
    assert elements < N * N, f"a tensor of shape {shape} was created"


def test_one_d_forward_on_real_and_fake_equals_two():
    torch.manual_seed(0)
    D = Discriminator(32, conv_dim=8, attn_res=(8, 4)).eval()
    for m in D.attn.values():
        m.gamma.data.fill_(0.5)
    real, fake = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        both = D(torch.cat([real, fake]))
        torch.testing.assert_close(both, torch.cat([D(real), D(fake)]), atol=1e-5, rtol=1e-5)


def test_reduced_precision_on_cpu_is_a_one_line_error(tmp_path):
    r = run_main(tmp_path, "--device", "cpu", "--precision", "fp16", check=False)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "--precision fp16 needs a CUDA GPU" in err


def test_reuse_fake_flag_trains_and_checkpoint_keeps_scalers(tmp_path):
    run_main(tmp_path, "--reuse_fake", "--channels_last", "--total_step", "3", "--log_step", "1",
             "--sample_step", "3", "--model_save_step", "3", "--version", "rf")
    lines = metrics(tmp_path / "models" / "rf")
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([l["d_loss"], l["g_loss"]])).all() for l in lines)
    ckpt = torch.load(tmp_path / "models" / "rf" / "latest.pt", weights_only=True)
    assert "scaler_g" in ckpt and "scaler_d" in ckpt  # empty dicts: fp32 runs don't scale losses
    assert ckpt["config"]["reuse_fake"] is True

