"""The EMA generator's BatchNorm statistics, recomputed: they are the EMA G's own batch statistics
on the fixed z (not the trained G's, which `update` copies), and recomputing touches neither the
global RNG (resume stays exact) nor spectral norm's vectors."""
import copy

import torch

from ema import EMA
from sagan_models import Generator


def batch_statistics(G, zs):
    """{BatchNorm name: (mean, unbiased var)} of the inputs each BatchNorm of `G` meets over the
    batches `zs` with every BatchNorm in training mode, each batch weighing the same."""
    G = copy.deepcopy(G)
    seen, hooks = {}, []
    for name, m in G.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(
                    (args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=True)))))
    with torch.no_grad():
        for z in zs:
            G(z)
    return {k: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
            for k, v in seen.items()}


def test_recomputed_bn_statistics_are_the_ema_generators_own():
    torch.manual_seed(0)
    G = Generator(32, z_dim=16, conv_dim=8, attn_res=[16])
    ema = EMA(G, decay=0.5)
    opt = torch.optim.SGD(G.parameters(), lr=0.5)
    for step in range(1, 4):  # the raw G moves, its statistics too: the EMA's copied ones are G's
        G.train()
        opt.zero_grad()
        G(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        ema.update(step)
    copied = {k: v.clone() for k, v in ema.model.state_dict().items() if "running" in k}
    u_before = {k: v.clone() for k, v in ema.model.state_dict().items() if k.endswith("_u")}
    rng = torch.get_rng_state()

    ema.recompute_bn_stats(num_batches=3, batch=16, seed=5)

    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must not move (exact resume)"
    state = ema.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in u_before.items()), "spectral norm's vectors stay"
    assert not ema.model.training and not any(m.training for m in ema.model.modules())
    gen = torch.Generator().manual_seed(5)
    zs = [torch.randn(16, 16, generator=gen) for _ in range(3)]
    expected = batch_statistics(ema.model, zs)
    assert expected
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(state[f"{name}.running_mean"], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[f"{name}.running_var"], var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(copied[f"{name}.running_mean"], mean, atol=1e-3), "they were G's, not its own"
    # the same call again gives the same numbers: a checkpoint written after it is reproducible
    again = copy.deepcopy(ema)
    again.recompute_bn_stats(num_batches=3, batch=16, seed=5)
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in state.items())
