"""Self_Attn is the seed's formula; G and D build at every size and placement; spectral norm holds."""
import pytest
import torch

from sagan_models import Discriminator, Generator, Self_Attn, default_attn, g_resolutions
from spectral import normalized_layers, top_singular_value


def attn_layer(C=16, gamma=0.7, seed=0):
    torch.manual_seed(seed)
    layer = Self_Attn(C).eval()  # eval: spectral norm uses its stored u, v; weights fixed
    with torch.no_grad():
        layer.gamma.fill_(gamma)
    return layer


def seed_formula_float64(layer, x):
    """The seed repo's Self_Attn forward, written out in float64 from the layer's effective weights."""
    x = x.double()
    B, C, H, W = x.shape

    def conv1x1(conv):
        w, b = conv.weight.detach().double()[:, :, 0, 0], conv.bias.detach().double()
        return torch.einsum("oc,bchw->bohw", w, x) + b[None, :, None, None]

    proj_query = conv1x1(layer.query_conv).view(B, -1, H * W).permute(0, 2, 1)  # B x N x C'
    proj_key = conv1x1(layer.key_conv).view(B, -1, H * W)                       # B x C' x N
    energy = torch.bmm(proj_query, proj_key)
    attention = torch.softmax(energy, dim=-1)
    proj_value = conv1x1(layer.value_conv).view(B, -1, H * W)                   # B x C x N
    out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(B, C, H, W)
    return layer.gamma.double() * out + x, attention


@pytest.mark.parametrize("H,W", [(8, 8), (3, 5), (6, 4), (1, 7)])
def test_self_attn_matches_seed_formula(H, W):
    layer = attn_layer()
    x = torch.randn(2, 16, H, W)
    out, attention = layer(x)
    ref_out, ref_attn = seed_formula_float64(layer, x)
    assert attention.shape == (2, H * W, H * W)
    torch.testing.assert_close(attention.double(), ref_attn, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, H * W))  # softmax over keys


def test_attention_is_indexed_row_major_query_by_key():
    """attention[b, i*W + j, k*W + l] is the weight query (i, j) puts on key (k, l)."""
    layer = attn_layer(C=16)
    H, W = 3, 5
    x = torch.randn(1, 16, H, W)
    _, attention = layer(x)
    q, k = layer.query_conv(x)[0], layer.key_conv(x)[0]  # (C', H, W) each
    for (i, j) in [(0, 0), (1, 4), (2, 1)]:
        energy = torch.einsum("c,chw->hw", q[:, i, j], k)  # (H, W) over keys
        expected = energy.flatten().softmax(0).view(H, W)
        for (kk, ll) in [(0, 3), (2, 4), (1, 0)]:
            assert attention[0, i * W + j, kk * W + ll].item() == pytest.approx(expected[kk, ll].item(), rel=1e-4)


def test_fused_path_matches_materialised_and_query_rows():
    layer = attn_layer(C=32)
    x = torch.randn(3, 32, 6, 10)
    out_full, attention = layer(x)
    out_fused, none = layer(x, return_attn=False)
    assert none is None
    torch.testing.assert_close(out_fused, out_full, rtol=1e-5, atol=1e-5)
    queries = torch.tensor([0, 7, 59])
    out_rows, rows = layer(x, queries=queries)
    assert rows.shape == (3, 3, 60)
    torch.testing.assert_close(rows, attention[:, queries], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_rows, out_full, rtol=1e-5, atol=1e-5)


def test_gradients_agree_between_paths():
    layer = attn_layer(C=16)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    grads = []
    for return_attn in (True, False):
        x.grad = None
        layer.zero_grad()
        layer.train(False)
        out, _ = layer(x, return_attn=return_attn)
        (out ** 2).sum().backward()
        grads.append((x.grad.clone(), layer.gamma.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gamma_starts_at_zero_so_attention_starts_as_identity():
    layer = Self_Attn(16)
    x = torch.randn(2, 16, 4, 4)
    assert layer.gamma.item() == 0.0
    torch.testing.assert_close(layer(x)[0], x)
    names = {n.split(".")[0] for n, _ in layer.named_parameters()}
    assert names == {"query_conv", "key_conv", "value_conv", "gamma"}  # the seed's names


@pytest.mark.parametrize("imsize", [32, 64, 128, 256])
def test_shapes_at_every_size_with_default_placement(imsize):
    g_attn, d_attn = default_attn(imsize, "g"), default_attn(imsize, "d")
    G = Generator(imsize, z_dim=16, conv_dim=4, attn_res=g_attn)
    D = Discriminator(imsize, conv_dim=4, attn_res=d_attn)
    img, maps = G(torch.randn(2, 16), return_attn=True)
    assert img.shape == (2, 3, imsize, imsize)
    assert img.abs().max() <= 1
    assert {r: m.shape for r, m in maps.items()} == {r: (2, r * r, r * r) for r in g_attn}
    score, dmaps = D(img, return_attn=True)
    assert score.shape == (2,)
    assert set(dmaps) == set(d_attn)
    assert G(torch.randn(2, 16)).shape == (2, 3, imsize, imsize)  # training path: image only


@pytest.mark.parametrize("g_attn,d_attn", [([], []), ([4], [16]), ([4, 8, 16, 32], [32, 16, 8, 4]), ([32], [])])
def test_placements_at_64(g_attn, d_attn):
    G = Generator(64, z_dim=8, conv_dim=4, attn_res=g_attn)
    D = Discriminator(64, conv_dim=4, attn_res=d_attn)
    img, maps = G(torch.randn(1, 8), return_attn=True)
    assert sorted(maps) == sorted(g_attn)
    assert sorted(D(img, return_attn=True)[1]) == sorted(d_attn)


def test_seed_architecture_at_64px():
    """At 64px with defaults, widths match the seed: G 512@4 ... 64@32, attention on 128 and 64 channels."""
    G = Generator(64, 128, 64, default_attn(64, "g"))
    D = Discriminator(64, 64, default_attn(64, "d"))
    assert G.attn["16"].in_dim == 128 and G.attn["32"].in_dim == 64
    assert D.attn["8"].in_dim == 256 and D.attn["4"].in_dim == 512
    assert G.blocks[0][0].out_channels == 512


def test_impossible_placement_names_valid_resolutions():
    with pytest.raises(ValueError, match=r"valid resolutions are 4,8,16"):
        Generator(32, attn_res=[32])
    with pytest.raises(ValueError, match=r"--d_attn 2 .* 4,8,16,32,64"):
        Discriminator(128, attn_res=[2])
    assert g_resolutions(256) == [4, 8, 16, 32, 64, 128]


def test_spectral_norm_keeps_top_singular_value_at_one():
    torch.manual_seed(0)
    G, D = Generator(32, 16, 8, [16]), Discriminator(32, 8, [8])
    for net in (G, D):
        layers = normalized_layers(net)
        assert len(layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
                                  for m in net.modules())  # every conv, attention and output included
        net.train()
        with torch.no_grad():
            for _ in range(30):  # power iteration converges over training forwards
                for _, m in layers:
                    m.weight  # each access in training mode runs one iteration
        net.eval()
        for name, m in layers:
            assert top_singular_value(m) == pytest.approx(1.0, abs=0.03), name
