"""The positive control's discriminator (Discriminator(patch_res=...), main.py --d_patch): without
attention its score is a sum of local terms, so it cannot relate two eyes farther apart than its
receptive field (what the long-range experiment's positive control rests on, with the receptive
fields measured on built-in faces); with attention it can. And a patch D trains and resumes through
main.py like any other."""
import numpy as np
import torch

from conftest import smoke_main, trains_and_resumes
from data_loader import synthetic_face
from sagan_models import Discriminator


def interaction(D, x, a, b, delta=0.5):
    """D(x + da + db) - D(x + da) - D(x + db) + D(x): zero when D's score adds up a term that
    sees region a and another that sees region b, never both."""
    da, db = torch.zeros_like(x), torch.zeros_like(x)  # D in eval mode: spectral norm's vectors stay put
    da[:, :, a[0]:a[0] + 4, a[1]:a[1] + 4] = delta
    db[:, :, b[0]:b[0] + 4, b[1]:b[1] + 4] = delta
    with torch.no_grad():
        return (D(x + da + db) - D(x + da) - D(x + db) + D(x)).abs().max().item()


def test_patch_d_without_attention_cannot_relate_two_eyes_and_with_attention_can():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64) * 0.3  # float64: float32's rounding is 1e-6
    left, right = (24, 18), (24, 38)  # 4x4 blocks 16 px apart: the eyes' distance at 64px
    whole = Discriminator(64, conv_dim=8, attn_res=[]).double().eval()
    patch = Discriminator(64, conv_dim=8, attn_res=[], patch_res=32).double().eval()
    attn = Discriminator(64, conv_dim=8, attn_res=[32], patch_res=32).double().eval()
    with torch.no_grad():
        attn.attn["32"].gamma.fill_(1.0)  # trained attention is on; a new layer starts at gamma 0
    blind = interaction(patch, x, left, right)
    assert blind < 1e-13                                             # 4-pixel patches: blind to the pair
    assert interaction(whole, x, left, right) > 1e-6                 # the seed's D sees the whole image
    # attention relates them (weakly at initialisation: its rows are near uniform over 1024 keys)
    assert interaction(attn, x, left, right) > max(1e-9, 1e4 * blind)
    assert patch.model_args()["patch_res"] == 32 and "patch_res" not in whole.model_args()


def test_main_trains_and_resumes_a_patch_d_on_rule_free_faces(tmp_path):
    trains_and_resumes(["--d_patch", "16", "--d_attn", "16", "--synthetic_eyes", "independent"], tmp_path)
    bad = smoke_main(["--d_patch", "16", "--d_attn", "8", "--version", "q"], tmp_path)
    assert bad.returncode != 0 and "--d_attn 8 lies below --d_patch 16" in bad.stderr


def both_irises_in_one_window(stride, size, offset, n=200, S=64):
    """The fraction of n built-in faces where some unit of a D layer (windows of `size` pixels every
    `stride`, starting at `offset`) sees pixels of both irises: the iris pixels are those where the
    face differs from its iris-free twin."""
    hits = 0
    for i in range(n):
        rule, meta = synthetic_face(np.random.default_rng([5, i]), S)
        bare, _ = synthetic_face(np.random.default_rng([5, i]), S, eyes="none")
        iris = (rule != bare).any(axis=2)                                     # (S, S)
        mid = int(np.mean([x for x, _ in meta["eyes_xy"]]))
        left, right = iris.copy(), iris.copy()
        left[:, mid:], right[:, :mid] = False, False
        starts = range(offset, S, stride)
        window = lambda m, y, x: m[max(y, 0):y + size, max(x, 0):x + size].any()  # noqa: E731
        hits += any(window(left, y, x) and window(right, y, x) for y in starts for x in starts)
    return hits / n


def test_receptive_fields_the_positive_control_rests_on():
    # D's convs (4x4, stride 2, padding 1) at 64px: a 32x32 unit sees pixels [2i-1, 2i+2] (4 px), a 16x16
    # unit [4j-3, 4j+6] (10 px), an 8x8 unit [8k-7, 8k+14] (22 px)
    assert both_irises_in_one_window(2, 4, -1) == 0        # the patch D at 32: never both irises
    assert 0 < both_irises_in_one_window(4, 10, -3) < 0.3  # at 16 some faces leak (51 of 500)
    assert both_irises_in_one_window(8, 22, -7) == 1       # the seed's D sees both by 8x8, in every face
