"""A naive SAGAN, kept only as the yardstick `python -m tools.bench` measures against.

This is how the repository this project started from (heykeetae/Self-Attention-GAN) trains, at the
same architecture as `sagan_models.py` (same widths, same attention placement, spectral norm on the
same layers):

- attention materialised: energy = bmm(q^T, k) (B, N, N), softmax, out = bmm(v, attention^T), with
  the permutes of that repository's `Self_Attn`, and every layer returns its (B, N, N) map;
- spectral norm by a hand-written power iteration (that repository's `spectral.py`): a wrapper
  module that recomputes w / sigma on every forward call;
- fp32, plain `torch.optim.Adam` defaults;
- D step: G(z) with grad (not detached), D(real) and D(fake) as two forwards;
- G step: a fresh z and a fresh G forward, D's parameter gradients computed and thrown away.

Not used for training; nothing in the library imports it.
"""
import torch
import torch.nn.functional as F
from torch import nn

from sagan_models import _channels, d_resolutions, g_resolutions


def l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
    """The original spectral norm: one power iteration per forward, weight = w_bar / sigma."""

    def __init__(self, module, dim=0):
        super().__init__()
        self.module, self.dim = module, dim
        w = module.weight
        height = w.shape[dim]
        width = w.numel() // height
        self.u = nn.Parameter(l2normalize(w.new_empty(height).normal_(0, 1)), requires_grad=False)
        self.v = nn.Parameter(l2normalize(w.new_empty(width).normal_(0, 1)), requires_grad=False)
        self.w_bar = nn.Parameter(w.data)
        del module._parameters["weight"]

    def forward(self, *args):
        w = self.w_bar
        w_mat = w.movedim(self.dim, 0).reshape(w.shape[self.dim], -1)  # (height, width)
        self.v.data = l2normalize(torch.mv(w_mat.data.t(), self.u.data))
        self.u.data = l2normalize(torch.mv(w_mat.data, self.v.data))
        sigma = self.u.dot(w_mat.mv(self.v))
        self.module.weight = w / sigma
        return self.module(*args)


def SN(layer):
    return SpectralNorm(layer, dim=1 if isinstance(layer, nn.ConvTranspose2d) else 0)


class NaiveSelfAttn(nn.Module):
    """The original Self_Attn: permute, bmm, softmax over the full (B, N, N) energy, bmm back."""

    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = SN(nn.Conv2d(in_dim, max(in_dim // 8, 1), 1))
        self.key_conv = SN(nn.Conv2d(in_dim, max(in_dim // 8, 1), 1))
        self.value_conv = SN(nn.Conv2d(in_dim, in_dim, 1))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, C, H, W = x.shape
        proj_query = self.query_conv(x).view(B, -1, H * W).permute(0, 2, 1)  # (B, N, C')
        proj_key = self.key_conv(x).view(B, -1, H * W)                       # (B, C', N)
        energy = torch.bmm(proj_query, proj_key)                               # (B, N, N)
        attention = F.softmax(energy, dim=-1)
        proj_value = self.value_conv(x).view(B, -1, H * W)                   # (B, C, N)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(B, C, H, W)
        return self.gamma * out + x, attention


class NaiveGenerator(nn.Module):
    def __init__(self, image_size=64, z_dim=128, conv_dim=64, attn_res=(16, 32)):
        super().__init__()
        self.z_dim = z_dim
        self.resolutions = g_resolutions(image_size)
        ch = [_channels(conv_dim, image_size, r) for r in self.resolutions]
        layers = [nn.Sequential(SN(nn.ConvTranspose2d(z_dim, ch[0], 4)), nn.BatchNorm2d(ch[0]), nn.ReLU())]
        for c_in, c_out in zip(ch, ch[1:]):
            layers.append(nn.Sequential(SN(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)),
                                        nn.BatchNorm2d(c_out), nn.ReLU()))
        self.blocks = nn.ModuleList(layers)
        self.attn = nn.ModuleDict({str(r): NaiveSelfAttn(c) for r, c in zip(self.resolutions, ch)
                                   if r in attn_res})
        self.last = nn.Sequential(SN(nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1)), nn.Tanh())

    def forward(self, z):
        x = z.view(z.shape[0], self.z_dim, 1, 1)
        maps = []
        for res, block in zip(self.resolutions, self.blocks):
            x = block(x)
            if str(res) in self.attn:
                x, a = self.attn[str(res)](x)
                maps.append(a)
        return self.last(x), maps


class NaiveDiscriminator(nn.Module):
    def __init__(self, image_size=64, conv_dim=64, attn_res=(8, 4)):
        super().__init__()
        self.resolutions = d_resolutions(image_size)
        ch = [_channels(conv_dim, image_size, r) for r in self.resolutions]
        layers = [nn.Sequential(SN(nn.Conv2d(3, ch[0], 4, 2, 1)), nn.LeakyReLU(0.1))]
        for c_in, c_out in zip(ch, ch[1:]):
            layers.append(nn.Sequential(SN(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.1)))
        self.blocks = nn.ModuleList(layers)
        self.attn = nn.ModuleDict({str(r): NaiveSelfAttn(c) for r, c in zip(self.resolutions, ch)
                                   if r in attn_res})
        self.last = SN(nn.Conv2d(ch[-1], 1, 4))

    def forward(self, x):
        maps = []
        for res, block in zip(self.resolutions, self.blocks):
            x = block(x)
            if str(res) in self.attn:
                x, a = self.attn[str(res)](x)
                maps.append(a)
        return self.last(x).squeeze(), maps


class NaiveTrainer:
    """The original hinge-loss iteration, one call = one D update then one G update."""

    def __init__(self, imsize, z_dim, g_conv_dim, d_conv_dim, g_attn, d_attn, device="cpu",
                 g_lr=1e-4, d_lr=4e-4, betas=(0.0, 0.9)):
        self.z_dim, self.device = z_dim, device
        self.G = NaiveGenerator(imsize, z_dim, g_conv_dim, g_attn).to(device)
        self.D = NaiveDiscriminator(imsize, d_conv_dim, d_attn).to(device)
        self.g_optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, self.G.parameters()), g_lr, betas)
        self.d_optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, self.D.parameters()), d_lr, betas)

    def reset_grad(self):
        self.d_optimizer.zero_grad()
        self.g_optimizer.zero_grad()

    def train_step(self, real_images):
        B = real_images.shape[0]
        # ================== Train D ================== #
        d_out_real, _ = self.D(real_images)
        d_loss_real = F.relu(1.0 - d_out_real).mean()
        z = torch.randn(B, self.z_dim, device=self.device)
        fake_images, _ = self.G(z)
        d_out_fake, _ = self.D(fake_images)
        d_loss_fake = F.relu(1.0 + d_out_fake).mean()
        d_loss = d_loss_real + d_loss_fake
        self.reset_grad()
        d_loss.backward()
        self.d_optimizer.step()
        # ================== Train G ================== #
        z = torch.randn(B, self.z_dim, device=self.device)
        fake_images, _ = self.G(z)
        g_out_fake, _ = self.D(fake_images)
        g_loss_fake = -g_out_fake.mean()
        self.reset_grad()
        g_loss_fake.backward()
        self.g_optimizer.step()
        return dict(d_loss=d_loss.detach(), g_loss=g_loss_fake.detach())
