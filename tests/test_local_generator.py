"""The positive control's generator (Generator(local_res=...), main.py --g_local): z laid out as a
noise map, then only 1x1 convs with the pixel coordinates and nearest upsampling. Without attention
every pixel is a function of its coordinates and the one noise cell above it, so two regions in
different cells are drawn from independent noise; the built-in faces' two irises never share a 4x4
block, so only attention can give them one colour. And a local G trains and resumes through main.py."""
import torch

from conftest import smoke_main, trains_and_resumes
from sagan_models import Generator
from test_patch_discriminator import both_irises_in_one_window


def changed_pixels(G, z, cell, delta=1.0):
    """(H, W) bool: the output pixels that move when noise cell (row, col) of z's map moves."""
    r = G.local_res
    moved = z.clone().reshape(1, -1, r, r)
    moved[:, :, cell[0], cell[1]] += delta
    with torch.no_grad():
        return (G(moved.reshape(1, -1)) - G(z)).abs().sum(1)[0] > 0


def test_without_attention_a_noise_cell_draws_only_its_own_block_and_with_attention_everywhere():
    torch.manual_seed(0)
    z = torch.randn(1, 4 * 16 * 16, dtype=torch.float64)
    local = Generator(64, z.shape[1], conv_dim=8, attn_res=[], local_res=16).double().eval()
    moved = changed_pixels(local, z, (6, 5))
    assert moved.any() and not moved[:24].any() and not moved[28:].any()     # rows 24-27: the cell's block
    assert not moved[:, :20].any() and not moved[:, 24:].any()               # columns 20-23
    attn = Generator(64, z.shape[1], conv_dim=8, attn_res=[16, 32], local_res=16).double().eval()
    with torch.no_grad():
        for layer in attn.attn.values():
            layer.gamma.fill_(1.0)  # trained attention is on; a new layer starts at gamma 0
    assert changed_pixels(attn, z, (6, 5))[:, 40:].any()                     # it reaches the other eye's side
    assert local.model_args()["local_res"] == 16
    assert "local_res" not in Generator(64, 128, conv_dim=8).model_args()  # the seed's G keeps its args
    # the two irises never share a 4x4 block at 64px, so without attention nothing can match them
    assert both_irises_in_one_window(4, 4, 0) == 0


def test_main_trains_and_resumes_a_local_g_and_names_bad_sizes(tmp_path):
    local = ["--g_local", "16", "--g_attn", "16", "--z_dim", "512", "--synthetic_eyes", "independent"]
    trains_and_resumes(local, tmp_path)
    for extra, message in ((["--z_dim", "100"], "--z_dim must be a multiple of 256, got 100"),
                           (["--g_attn", "8"], "--g_attn 8 lies below --g_local 16"),
                           (["--g_local", "5"], "--g_local 5 is not possible at image size")):
        bad = smoke_main([*local, *extra, "--version", "q"], tmp_path)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr
