"""Spectral normalization (Miyato et al. 2018), the one place deciding how it is applied.

SAGAN normalizes every convolution of both networks, the 1x1 attention projections and the output
layers included (as the paper's official implementation does). We use torch's own parametrization
rather than the seed repos' hand-written power iteration: it keeps `weight` a plain attribute,
updates u/v only in training mode, and its state (`parametrizations.weight.original`, `_u`, `_v`)
is an ordinary part of the state dict.
"""
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def SN(layer, n_power_iterations=1, eps=1e-12):
    """Return `layer` (Conv2d, ConvTranspose2d or Linear) with spectral norm on its weight.

    torch picks the right matrix dimension itself (dim=1 for transposed convolutions).
    """
    return spectral_norm(layer, n_power_iterations=n_power_iterations, eps=eps)


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
