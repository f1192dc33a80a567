"""Spectral normalization (Miyato et al. 2018), the one place deciding how it is applied.

SAGAN normalizes every convolution of both networks, the 1x1 attention projections and the output
layers included (as the paper's official implementation does). We use torch's own parametrization
rather than the seed repos' hand-written power iteration: it keeps `weight` a plain attribute,
updates u/v only in training mode, and its state (`parametrizations.weight.original`, `_u`, `_v`)
is an ordinary part of the state dict.

The power iteration and sigma always run in fp32, also inside a bf16/fp16 autocast region: CUDA
autocast runs torch.mv in reduced precision, and 8 bits of mantissa in u, v and sigma would make the
normalized weight (and the u/v vectors carried from step to step) drift with the precision. Only the
convolution that then uses the normalized weight is autocast.
"""
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm


class FP32SpectralNorm(_SpectralNorm):
    """torch's spectral-norm parametrization with autocast switched off inside it: the same state
    dict keys and buffers, the same numbers as without autocast (the weight is the fp32 parameter, or
    float64 where a test builds the network in double)."""

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight)


def SN(layer, n_power_iterations=1, eps=1e-12):
    """Return `layer` (Conv2d, ConvTranspose2d or Linear) with spectral norm on its weight.

    What torch.nn.utils.parametrizations.spectral_norm does (dim=1 for transposed convolutions, the
    dimension torch picks), with the fp32 parametrization.
    """
    dim = 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(layer, "weight", FP32SpectralNorm(layer.weight, n_power_iterations, dim, eps))
    return layer


def top_singular_value(layer):
    """Largest singular value of a layer's (effective) weight seen as the matrix spectral_norm uses.

    Conv weights are (out, in, kh, kw) -> (out, in*kh*kw); a transposed conv's are (in, out, kh, kw),
    so its output dimension 1 is moved to the front first, as spectral_norm does.
    """
    dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    w = layer.weight.detach().double().movedim(dim, 0)
    return torch.linalg.matrix_norm(w.flatten(1), ord=2).item()


def normalized_layers(model):
    """(name, module) for every layer of `model` carrying spectral norm."""
    return [(name, m) for name, m in model.named_modules()
            if nn.utils.parametrize.is_parametrized(m, "weight")]
