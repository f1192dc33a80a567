"""The mechanism test's parts: attention.intervene 'values' (a layer's queries read other value
vectors at chosen keys) is exact, and the randomised-weights copy changes only what it should."""
import numpy as np
import pytest
import torch

from attention import attention_layers, intervene, run_net
from experiments.eye_metrics import eye_layout
from experiments.mechanism import mechanism, randomised, regions
from sagan_models import Generator


def generator():
    torch.manual_seed(0)
    G = Generator(64, z_dim=16, conv_dim=4, attn_res=[16, 32]).eval()
    with torch.no_grad():
        for layer in attention_layers(G).values():
            layer.gamma.fill_(1.0)
    return G


def test_values_intervention_is_the_layers_formula_with_the_swapped_values():
    G = generator()
    layer = attention_layers(G)["G16"]
    z, donor = torch.randn(3, 16), torch.randn(3, 16)
    _, feats, _ = run_net(G, z)
    _, dfeats, _ = run_net(G, donor)
    x = feats["G16"]
    q, k, v = layer.project(x)
    v_donor = layer.project(dfeats["G16"])[2]
    keys, queries = torch.arange(0, 256, 4), torch.tensor([0, 17, 100])
    with torch.no_grad():
        # its own values back: nothing changes
        with intervene(layer, "values", queries=queries, values=v, keys=keys):
            same = layer(x, return_attn=False)[0]
        torch.testing.assert_close(same, layer(x, return_attn=False)[0], atol=1e-5, rtol=1e-5)
        with intervene(layer, "values", queries=queries, values=v_donor, keys=keys):
            out = layer(x, return_attn=False)[0].flatten(2)
        swapped = v.clone()
        swapped[:, :, keys] = v_donor[:, :, keys]
        a = torch.bmm(q.transpose(1, 2), k).softmax(-1)                      # (B, N, N)
        expected = layer.gamma * torch.bmm(swapped, a.transpose(1, 2)) + x.flatten(2)
        torch.testing.assert_close(out[:, :, queries], expected[:, :, queries], atol=1e-5, rtol=1e-5)
        others = torch.ones(x.shape[2] * x.shape[3], dtype=torch.bool)
        others[queries] = False
        intact = layer(x, return_attn=False)[0].flatten(2)
        assert torch.equal(out[:, :, others], intact[:, :, others])          # other queries untouched
        assert (out[:, :, queries] - intact[:, :, queries]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="takes values"):
        with intervene(layer, "values"):
            pass


def test_randomised_copy_redraws_only_that_layers_queries_and_keys():
    G = generator()
    R = randomised(G, "G32", seed=3)
    changed = {k for k, v in R.state_dict().items() if not torch.equal(v, G.state_dict()[k])}
    assert changed and all(k.startswith(("attn.32.query_conv", "attn.32.key_conv")) for k in changed)


def test_mechanism_runs_on_a_generator_and_its_regions_do_not_overlap():
    G = generator()
    layout = eye_layout(64, n=200)
    for hw in ((16, 16), (32, 32)):
        masks, dist = regions(layout, hw)
        assert not (masks["query"] & masks["other"]).any() and not (masks["control"] & masks["query"]).any()
        assert masks["control"].sum() > 0 and 0.5 < dist["control"] / dist["other"] < 2
    r = mechanism(G, layout, n=6)
    assert set(r) == {"G16", "G32"}
    for part in ("trained", "random_qk"):
        assert np.isfinite(r["G32"][part]["other"]["change"]["mean"])
        assert r["G32"][part]["other_by_weight"]["mean"] > 0 and r["G32"][part]["control_by_contribution"]["mean"] > 0


def test_eye_query_numbers_are_uniform_shares_for_uniform_attention():
    from attention import key_pixels, map_hw
    from experiments.eye_query import eye_query_numbers, regions
    torch.manual_seed(0)
    G = Generator(64, z_dim=16, conv_dim=4, attn_res=[16, 32], spectral_norm=False).eval()
    with torch.no_grad():
        for layer in attention_layers(G).values():
            for conv in (layer.query_conv, layer.key_conv):  # q = k = 0: every row uniform
                conv.weight.zero_()
                conv.bias.zero_()
    r = eye_query_numbers(G, n=4)
    for name in ("G16", "G32"):
        s, o = r[name]["seed0"], r[name]["over_images"]
        assert s["entropy"] == pytest.approx(1.0, abs=1e-5) and s["dist"] == pytest.approx(s["dist_uniform"], abs=1e-3)
        for k in ("side", "top", "other_eye"):
            assert s[f"mass_{k}"] == pytest.approx(s[f"uniform_{k}"], abs=1e-5)
        assert o["dist"] == pytest.approx(o["dist_uniform"], abs=1e-3)
    m = regions("G32", 64, 500)
    assert int(m["side"].sum()) == 4 * 32 and int(m["top"].sum()) == 2 * 32 and int(m["other_eye"].sum()) == 9
    assert key_pixels(map_hw("G32"), (64, 64))[m["side"]][:, 0].min() == 1.0
