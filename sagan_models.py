"""SAGAN generator, discriminator and self-attention layer (Zhang et al. 2018, arXiv 1805.08318).

Pure modules: architecture arguments in, tensors out. No I/O, no config object, no device moves.

Both networks are DCGAN-style ladders between 4x4 and the image size; a `Self_Attn` layer can sit
after any block, chosen by the resolution of the feature map it sees (`attn_res`). At 64px with the
defaults this is exactly the seed's architecture (G attends at 16x16 and 32x32, D at 8x8 and 4x4).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from spectral import SN

MIN_IMSIZE, MAX_IMSIZE = 32, 256
MAX_CHANNEL_MULT = 16  # caps the widest block at 16 * conv_dim, so 256px stays trainable


def check_imsize(imsize):
    if imsize < MIN_IMSIZE or imsize > MAX_IMSIZE or imsize & (imsize - 1):
        raise ValueError(f"image size must be a power of two from {MIN_IMSIZE} to {MAX_IMSIZE}, "
                         f"got {imsize}")


def g_resolutions(imsize):
    """Feature-map sizes after each generator block: 4, 8, ..., imsize/2 (the last conv makes the image)."""
    check_imsize(imsize)
    return [2 ** k for k in range(2, int(math.log2(imsize)))]


def d_resolutions(imsize):
    """Feature-map sizes after each discriminator block: imsize/2, ..., 8, 4."""
    return g_resolutions(imsize)[::-1]


def default_attn(imsize, net):
    """The seed's placement at 64px (G: 16, 32; D: 8, 4), kept where it fits at other sizes."""
    valid = g_resolutions(imsize)
    if net == "g":
        return [r for r in valid if r <= 32][-2:]
    return [8, 4]


def check_attn(imsize, attn_res, net):
    valid = g_resolutions(imsize)
    bad = [r for r in attn_res if r not in valid]
    if bad or len(set(attn_res)) != len(attn_res):
        name = "--g_attn" if net == "g" else "--d_attn"
        raise ValueError(f"{name} {','.join(map(str, attn_res))} is not possible at image size {imsize}: "
                         f"valid resolutions are {','.join(map(str, valid))} (each at most once) or 'none'")


def check_patch(imsize, patch_res, attn_res):
    """A patch discriminator stops at a resolution of its ladder above 4x4 (0: the whole-image D);
    its attention layers must sit at or above it."""
    if not patch_res:
        return
    if patch_res not in d_resolutions(imsize)[:-1]:
        raise ValueError(f"--d_patch {patch_res} is not possible at image size {imsize}: use one of "
                         f"{','.join(map(str, d_resolutions(imsize)[:-1]))} or 0 (the whole-image D)")
    if any(r < patch_res for r in attn_res):
        raise ValueError(f"--d_attn {','.join(map(str, attn_res))} lies below --d_patch {patch_res}: "
                         f"put D's attention at {patch_res} or above")


def check_local(imsize, local_res, z_dim, attn_res):
    """A local generator starts from z laid out as a noise map at local_res (0: the seed's dense
    start); z must fill that map, and attention must sit at or above it to see it."""
    if not local_res:
        return
    valid = g_resolutions(imsize)[1:]
    if local_res not in valid:
        raise ValueError(f"--g_local {local_res} is not possible at image size {imsize}: use one of "
                         f"{','.join(map(str, valid))} or 0 (the seed's dense start)")
    if z_dim % (local_res * local_res):
        raise ValueError(f"--g_local {local_res} lays z out on a {local_res}x{local_res} map: --z_dim must be "
                         f"a multiple of {local_res * local_res}, got {z_dim}")
    if any(r < local_res for r in attn_res):
        raise ValueError(f"--g_attn {','.join(map(str, attn_res))} lies below --g_local {local_res}: "
                         f"put G's attention at {local_res} or above")


def _channels(conv_dim, imsize, res):
    # the seed's widths: conv_dim at imsize/2, doubling for every halving of the feature map
    return conv_dim * min(imsize // (2 * res), MAX_CHANNEL_MULT)


# On CPU, maps up to this many positions (16x16; 256 KiB per image) are computed explicitly: the map
# stays in cache and bmm + softmax run ~2x faster than the flash kernel. Larger maps always go fused.
CPU_EXPLICIT_MAX_N = 256


def fused_attention(q, k, v):
    """softmax(q^T k) over keys applied to v, without an N x N map in memory.

    q, k: (B, C', N), v: (B, C, N) -> (B, N, C). Unscaled energy, as in the seed (scale=1.0).

    On CPU, torch's only fused kernel (flash attention) needs one head size for q, k and v, and
    without it SDPA silently falls back to a math path that materialises (B, N, N) and is slower
    than the seed's bmm. Zero-padding q and k from C' to C channels leaves every dot product q.k
    unchanged and makes the flash kernel apply: measured on a 2-core Xeon at 32x32, B=64, C=64 it
    runs forward ~3x and backward ~1.4x faster than bmm + softmax, despite 8x the q.k multiplies.
    On CUDA the memory-efficient kernel takes C' != C directly, so nothing is padded there.
    """
    C_qk, C = q.shape[1], v.shape[1]
    q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))      # (B, 1, N, C') / (B, 1, N, C)
    if q.device.type == "cpu" and C_qk != C:
        q, k = F.pad(q, (0, C - C_qk)), F.pad(k, (0, C - C_qk))        # (B, 1, N, C)
    # the fused kernels want the feature dimension contiguous (a no-op when it already is)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)  # (B, N, C)


def attention_output(q, k, v):
    """The training path's attention: the same numbers as the explicit map, by the fastest exact
    route for the device and map size. q, k: (B, C', N), v: (B, C, N) -> (B, N, C)."""
    if q.device.type == "cpu" and q.shape[-1] <= CPU_EXPLICIT_MAX_N:
        attention = torch.bmm(q.transpose(1, 2), k).softmax(dim=-1)  # (B, N, N), small
        return torch.bmm(attention, v.transpose(1, 2))                # (B, N, C)
    return fused_attention(q, k, v)


class Self_Attn(nn.Module):
    """Self-attention layer of SAGAN, the seed's formula.

    x (B, C, H, W) -> (out, attention):
        q = query_conv(x), k = key_conv(x): (B, C//8, N), v = value_conv(x): (B, C, N), N = H*W
        attention = softmax over keys of q^T k (no scaling): (B, N, N), every row sums to 1
        out = gamma * (v @ attention^T) + x, gamma initialised to 0

    Rows are queries, columns keys, both flattened row-major: attention[b, i*W + j, k*W + l] is the
    weight query position (i, j) puts on key position (k, l).

    With spectral_norm=False the three projections are plain convolutions (a seed repository's
    generator, whose attention was never normalised; see seed_formats.py).

    Training calls it with return_attn=False: the output then comes from a fused kernel and the N x N
    map is never materialised (except on CPU for maps of at most CPU_EXPLICIT_MAX_N positions, where
    the explicit map is small and faster; see attention_output). `queries` (a LongTensor of flattened query indices, shape (Q,)) asks
    for just those rows, (B, Q, N), next to the fused output.
    """

    def __init__(self, in_dim, spectral_norm=True):
        super().__init__()
        self.in_dim = in_dim
        sn = SN if spectral_norm else _plain
        self.query_conv = sn(nn.Conv2d(in_dim, max(in_dim // 8, 1), 1))
        self.key_conv = sn(nn.Conv2d(in_dim, max(in_dim // 8, 1), 1))
        self.value_conv = sn(nn.Conv2d(in_dim, in_dim, 1))
        self.gamma = nn.Parameter(torch.zeros(1))

    def project(self, x):
        """q, k: (B, C', N) and v: (B, C, N), from one 1x1 convolution with the three (effective,
        spectrally normalised where they are) weights stacked: one pass over x instead of three."""
        convs = (self.query_conv, self.key_conv, self.value_conv)
        weight = torch.cat([c.weight for c in convs])  # (2C' + C, C, 1, 1)
        bias = torch.cat([c.bias for c in convs])
        qkv = F.conv2d(x, weight, bias).flatten(2)     # (B, 2C' + C, N)
        return qkv.split([c.out_channels for c in convs], dim=1)

    def forward(self, x, return_attn=True, queries=None):
        B, C, H, W = x.shape
        q, k, v = self.project(x)

        if return_attn and queries is None:
            attention = torch.bmm(q.transpose(1, 2), k).softmax(dim=-1)  # (B, N, N), rows = queries
            out = torch.bmm(v, attention.transpose(1, 2))                 # (B, C, N)
        else:
            out = attention_output(q, k, v).transpose(1, 2)              # (B, C, N)
            attention = None
            if return_attn:
                rows = q[:, :, queries.to(q.device)].transpose(1, 2)      # (B, Q, C')
                attention = torch.bmm(rows, k).softmax(dim=-1)            # (B, Q, N)

        out = self.gamma * out.reshape(B, C, H, W) + x
        return out, attention


def _plain(layer):
    """`layer` as it is: what SN is replaced by where a network has no spectral norm."""
    return layer


def _ladder(net, x, return_attn, queries):
    """Run `net`'s blocks, each followed by its attention layer where it has one: (x, {res: map})."""
    maps = {}
    for res, block in zip(net.resolutions, net.blocks):
        x = block(x)  # (B, C, res, res)
        if str(res) in net.attn:
            q = queries.get(res) if queries else None
            x, maps[res] = net.attn[str(res)](x, return_attn=return_attn, queries=q)
    return x, maps


class Generator(nn.Module):
    """z (B, z_dim) -> image (B, 3, imsize, imsize) in [-1, 1].

    Transposed convs with BatchNorm + ReLU from 4x4 up, a tanh output; Self_Attn after the blocks
    whose output resolution is in `attn_res`. spectral_norm=False builds every layer without it:
    the form a seed repository's generator is loaded into, its normalisation folded into the
    weights (seed_formats.py); this project trains with it on. local_res > 0 builds the long-range
    experiment's local generator instead (LocalBlock): z is a noise map at that resolution and only
    attention mixes positions.
    """

    def __init__(self, image_size=64, z_dim=128, conv_dim=64, attn_res=(16, 32), spectral_norm=True,
                 local_res=0):
        super().__init__()
        self.image_size, self.z_dim, self.conv_dim = image_size, z_dim, conv_dim
        self.spectral_norm, self.local_res = spectral_norm, local_res
        sn = SN if spectral_norm else _plain
        self.attn_res = sorted(attn_res)
        check_attn(image_size, self.attn_res, "g")
        check_local(image_size, local_res, z_dim, self.attn_res)
        self.resolutions = [r for r in g_resolutions(image_size) if r >= local_res]
        ch = [_channels(conv_dim, image_size, r) for r in self.resolutions]

        if local_res:
            blocks = [LocalBlock(z_dim // local_res ** 2, ch[0], sn, local_res, upsample=False)]
            blocks += [LocalBlock(c_in, c_out, sn, r) for c_in, c_out, r in zip(ch, ch[1:], self.resolutions[1:])]
            last = nn.Sequential(LocalBlock(ch[-1], 3, sn, image_size, norm=False), nn.Tanh())
        else:
            blocks = [nn.Sequential(sn(nn.ConvTranspose2d(z_dim, ch[0], 4)),       # 1x1 -> 4x4
                                    nn.BatchNorm2d(ch[0]), nn.ReLU())]
            for c_in, c_out in zip(ch, ch[1:]):
                blocks.append(nn.Sequential(sn(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)),  # r -> 2r
                                            nn.BatchNorm2d(c_out), nn.ReLU()))
            last = nn.Sequential(sn(nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1)), nn.Tanh())
        # registered in this order (blocks, attn, last): parameters() follows it, and the optimizer
        # states in checkpoints are stored by that position
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleDict({str(r): Self_Attn(c, spectral_norm)
                                   for r, c in zip(self.resolutions, ch) if r in self.attn_res})
        self.last = last

    def model_args(self):
        """The arguments that rebuild this network: Generator(**g.model_args()). spectral_norm and
        local_res are named only when not the default, so the trained architecture's checkpoints
        keep their old model_args."""
        args = dict(image_size=self.image_size, z_dim=self.z_dim, conv_dim=self.conv_dim,
                    attn_res=list(self.attn_res))
        if not self.spectral_norm:
            args["spectral_norm"] = False
        if self.local_res:
            args["local_res"] = self.local_res
        return args

    def forward(self, z, return_attn=False, queries=None):
        """With return_attn, returns (image, {resolution: attention}); `queries` maps a resolution
        to the flattened query indices wanted there (see Self_Attn), other layers give full maps."""
        r = self.local_res or 1
        x = z.reshape(z.shape[0], self.z_dim // (r * r), r, r)  # (B, z_dim, 1, 1), or z's own noise map
        x, maps = _ladder(self, x, return_attn, queries)
        img = self.last(x)  # (B, 3, imsize, imsize)
        return (img, maps) if return_attn else img


NOISE_GAIN = 0.1


class LocalBlock(nn.Module):
    """A local generator's block: (nearest x2 upsampling,) the pixel coordinates appended (raw and as
    sines and cosines, so a per-pixel network can draw a layout), two 1x1 convs with BatchNorm + ReLU
    (the image's block: one 1x1 conv). Nothing in it mixes positions, so without attention every output pixel of
    a local generator is a function of its coordinates and the one noise cell above it (BatchNorm's
    batch statistics aside: one image moves them by 1/(batch x positions))."""

    def __init__(self, c_in, c_out, sn, res, upsample=True, norm=True):
        super().__init__()
        self.upsample = upsample
        # the coordinates enter as (y, x) and sin, cos of pi * k * (y, x) for k = 1, 2, 4, ... up to
        # 4 samples per period at this resolution: higher ones alias into a checkerboard
        self.frequencies = [2 ** i for i in range(8) if 4 * 2 ** i <= res - 1]
        # the first block reads the noise map through a learned per-channel gain that starts small, so
        # G first learns the layout from the coordinates and then how much noise to let in (StyleGAN's
        # noise inputs start at zero for the same reason)
        self.gain = None if upsample else nn.Parameter(torch.full((1, c_in, 1, 1), NOISE_GAIN))
        c_xy = 2 + 4 * len(self.frequencies)
        if norm:  # two 1x1 layers: a per-pixel MLP
            self.net = nn.Sequential(sn(nn.Conv2d(c_in + c_xy, c_out, 1)), nn.BatchNorm2d(c_out), nn.ReLU(),
                                     sn(nn.Conv2d(c_out, c_out, 1)), nn.BatchNorm2d(c_out), nn.ReLU())
        else:
            self.net = sn(nn.Conv2d(c_in + c_xy, c_out, 1))

    def forward(self, x):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = x * self.gain
        B, _, H, W = x.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype),
                                torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype), indexing="ij")
        yx = torch.stack([ys, xs])                                   # (2, H, W)
        waves = [f(math.pi * k * yx) for k in self.frequencies for f in (torch.sin, torch.cos)]
        coords = torch.cat([yx, *waves]).expand(B, -1, H, W)
        return self.net(torch.cat([x, coords], 1))


class Discriminator(nn.Module):
    """image (B, 3, imsize, imsize) -> score (B,).

    Strided convs with LeakyReLU(0.1) from imsize/2 down to 4x4, a 4x4 conv to one score; Self_Attn
    after the blocks whose output resolution is in `attn_res`. No batch-dependent layers, so real
    and fake images may share one forward pass.
    """

    def __init__(self, image_size=64, conv_dim=64, attn_res=(8, 4), patch_res=0):
        super().__init__()
        self.image_size, self.conv_dim, self.patch_res = image_size, conv_dim, patch_res
        self.attn_res = sorted(attn_res, reverse=True)
        check_attn(image_size, self.attn_res, "d")
        check_patch(image_size, patch_res, self.attn_res)
        # patch_res: stop at that resolution and score every position by a 1x1 conv, the image's score
        # their mean: a patch discriminator whose only view wider than its receptive field is attention
        self.resolutions = [r for r in d_resolutions(image_size) if r >= (patch_res or 0)]
        ch = [_channels(conv_dim, image_size, r) for r in self.resolutions]

        blocks = [nn.Sequential(SN(nn.Conv2d(3, ch[0], 4, 2, 1)), nn.LeakyReLU(0.1))]  # S -> S/2
        for c_in, c_out in zip(ch, ch[1:]):
            blocks.append(nn.Sequential(SN(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.1)))
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleDict({str(r): Self_Attn(c) for r, c in zip(self.resolutions, ch)
                                   if r in self.attn_res})
        self.last = SN(nn.Conv2d(ch[-1], 1, 1 if patch_res else 4))  # 4x4 -> 1x1, or a score per patch

    def model_args(self):
        """patch_res is named only when set, so the checkpoints of the seed's D keep their model_args."""
        args = dict(image_size=self.image_size, conv_dim=self.conv_dim, attn_res=list(self.attn_res))
        return dict(args, patch_res=self.patch_res) if self.patch_res else args

    def forward(self, x, return_attn=False, queries=None):
        x, maps = _ladder(self, x, return_attn, queries)
        score = self.last(x).flatten(1).mean(1) if self.patch_res else self.last(x).flatten()  # (B,)
        return (score, maps) if return_attn else score
