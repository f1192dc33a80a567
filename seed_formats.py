"""Generators saved by the seed repositories, opened as this project's Generator.

heykeetae/Self-Attention-GAN saves `<step>_G.pth` and houze-liu/Attention-Visualization-GAN
`<step>-G.ckpt`: each the bare state dict of a 64px generator with our layers (transposed convs
512-256-128-64 with BatchNorm + ReLU, Self_Attn with our formula after the 16x16 and 32x32 blocks, a
tanh output), under other names and with their hand-written spectral norm. A layer wrapped in it keeps
`weight_bar`, `weight_u` and `weight_v`, and every forward call, eval included, first runs one power
iteration from the stored u (v = W^T u / |W^T u|, u = W v / |W v|; the stored v is never read), then
uses weight_bar / sigma with sigma = u . W v, W being weight_bar seen as (weight_bar.shape[0], -1):
(in_channels, ...) for a transposed conv, where torch's spectral norm uses the output dimension.
Their attention projections and output layer are not normalised.

`to_generator` runs that power iteration once, here, and loads the effective weights into a
Generator(spectral_norm=False): the same images their code draws for the same z right after loading
the file (in eval mode: BatchNorm's running statistics). Their own later calls start from the updated
u, so their images drift slightly from call to call; ours are those of the first call.
"""
import re

import torch

from sagan_models import Generator

HEYKEETAE = "heykeetae/Self-Attention-GAN"
HOUZE = "houze-liu/Attention-Visualization-GAN"
IMAGE_SIZE, CONV_DIM = 64, 64  # heykeetae's G runs only at these (its l4 and attention widths are fixed)
FILE_RE = re.compile(r"(\d+)[_-]G\.(?:pth|ckpt)$")
SUPPORTED = (f"supported: this project's checkpoints and the {IMAGE_SIZE}px, conv_dim {CONV_DIM} generators "
             f"'<step>_G.pth' of {HEYKEETAE} and '<step>-G.ckpt' of {HOUZE}")

# Their layer -> our layer, in forward order. 'sn': wrapped in their SpectralNorm, so the layer's
# tensors sit under '<name>.module.' as bias, weight_bar, weight_u, weight_v.
LAYOUTS = {
    HEYKEETAE: [("l1.0", "blocks.0.0", "sn"), ("l1.1", "blocks.0.1", ""),
                ("l2.0", "blocks.1.0", "sn"), ("l2.1", "blocks.1.1", ""),
                ("l3.0", "blocks.2.0", "sn"), ("l3.1", "blocks.2.1", ""),
                ("attn1", "attn.16", ""),
                ("l4.0", "blocks.3.0", "sn"), ("l4.1", "blocks.3.1", ""),
                ("attn2", "attn.32", ""),
                ("last.0", "last.0", "")],
    # one nn.Sequential `main` (ReLUs and Tanh at the indices skipped); its attention layers are also
    # attributes, so the file holds them twice: attn2.* = main.9.*, attn1.* = main.13.*
    HOUZE: [("main.0", "blocks.0.0", "sn"), ("main.1", "blocks.0.1", ""),
            ("main.3", "blocks.1.0", "sn"), ("main.4", "blocks.1.1", ""),
            ("main.6", "blocks.2.0", "sn"), ("main.7", "blocks.2.1", ""),
            ("main.9", "attn.16", ""), ("attn2", "attn.16", "copy"),
            ("main.10", "blocks.3.0", "sn"), ("main.11", "blocks.3.1", ""),
            ("main.13", "attn.32", ""), ("attn1", "attn.32", "copy"),
            ("main.14", "last.0", "")],
}
FIRST_LAYER = {source: layout[0][0] + ".module.weight_bar" for source, layout in LAYOUTS.items()}


class NotASeedGenerator(ValueError):
    """A state dict that is not a seed repository's 64px generator; the message says what was found."""


def is_state_dict(obj):
    """A bare state dict (names -> tensors), as the seed repositories save; never this project's
    checkpoint, whose model_args and config are not tensors."""
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def step_from_name(path):
    """The step a seed repository's file name carries (`<step>_G.pth`, `<step>-G.ckpt`), else None."""
    m = FILE_RE.search(path)
    return int(m.group(1)) if m else None


def _shape(t):
    return tuple(t.shape)


def _l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)  # their eps placement, not F.normalize's max(norm, eps)


def effective_weight(weight_bar, u):
    """weight_bar / sigma after the one power iteration their SpectralNorm.forward runs from the
    stored u, computed in float64 (their code does the same in float32)."""
    w = weight_bar.double()
    W = w.reshape(w.shape[0], -1)  # (w.shape[0], rest): (in, out*kh*kw) for a transposed conv
    v = _l2normalize(W.t() @ u.double())
    u = _l2normalize(W @ v)
    sigma = u @ (W @ v)
    return (w / sigma).to(weight_bar.dtype)


def _expected(source, ours):
    """{their key: (our key, shape, optional)} for the generator `ours` (a Generator without spectral
    norm); our key is None for what only has to be present (u's, v's and houze's duplicates)."""
    want = {}
    for theirs, mine, kind in LAYOUTS[source]:
        for name, tensor in ours.items():
            if not name.startswith(mine + "."):
                continue
            suffix, shape = name[len(mine) + 1:], _shape(tensor)
            optional = suffix == "num_batches_tracked"  # BatchNorm has it since PyTorch 0.4.1 only
            if kind == "sn" and suffix == "weight":
                rows = shape[0]
                want[f"{theirs}.module.weight_bar"] = (name, shape, False)
                want[f"{theirs}.module.weight_u"] = (None, (rows,), False)
                want[f"{theirs}.module.weight_v"] = (None, (tensor.numel() // rows,), False)
            elif kind == "sn":
                want[f"{theirs}.module.{suffix}"] = (name, shape, optional)
            else:
                want[f"{theirs}.{suffix}"] = (None if kind == "copy" else name, shape, optional)
    return want


def _listing(keys, n=3):
    keys = list(keys)  # in forward order, so the first named is the first layer that does not fit
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _source(state):
    """Which repository's layout `state` uses, by the module its first layer sits in (heykeetae's
    `l1`, houze's `main`, whichever networks they are); None when neither."""
    for source, first in FIRST_LAYER.items():
        module = first.split(".")[0] + "."
        if any(k.startswith(module) for k in state):
            return source
    return None


def to_generator(state):
    """(Generator(spectral_norm=False) in eval mode drawing what theirs draws, source repository)
    from a state dict a seed repository saved; NotASeedGenerator, one line naming what did not
    match and what is supported, for anything else."""
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel (heykeetae --parallel)
        state = {k[len("module."):]: v for k, v in state.items()}
    source = _source(state)
    if source is None:
        raise NotASeedGenerator(f"not a checkpoint of this project, nor a seed repository's generator "
                                f"(found a state dict of {len(state)} tensors: {_listing(state)}); {SUPPORTED}")
    claim = f"not a checkpoint of this project, nor the {IMAGE_SIZE}px generator of {source} it resembles"
    first = state.get(FIRST_LAYER[source])
    if first is None or first.dim() != 4:
        found = "missing" if first is None else f"of shape {_shape(first)}"
        raise NotASeedGenerator(f"{claim} ({FIRST_LAYER[source]} {found}); {SUPPORTED}")
    if first.shape[1] == 3:  # a conv taking RGB images: the discriminator saved beside G
        raise NotASeedGenerator(f"{claim}: it is the discriminator ({FIRST_LAYER[source]} takes 3-channel "
                                f"images, shape {_shape(first)}); open the generator file saved beside it")
    if first.shape[1] != 8 * CONV_DIM:  # their first layer is ConvTranspose2d(z_dim, 8 * conv_dim, 4)
        raise NotASeedGenerator(f"{claim} ({FIRST_LAYER[source]} has shape {_shape(first)}: {first.shape[1]} "
                                f"channels at 4x4, where the {IMAGE_SIZE}px, conv_dim {CONV_DIM} generator has "
                                f"{8 * CONV_DIM}: another image size or conv_dim); {SUPPORTED}")
    z_dim = first.shape[0]
    G = Generator(IMAGE_SIZE, z_dim, CONV_DIM, (16, 32), spectral_norm=False)
    ours = G.state_dict()
    want = _expected(source, ours)

    missing = [k for k, (_, _, optional) in want.items() if k not in state and not optional]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} {_shape(state[k])} (expected {shape})" for k, (_, shape, _) in want.items()
             if k in state and _shape(state[k]) != shape]
    if missing or unexpected or wrong:
        found = "; ".join(f"{what} {_listing(keys)}" for what, keys in
                          (("shape", wrong), ("missing", missing), ("unexpected", unexpected)) if keys)
        raise NotASeedGenerator(f"{claim} (z_dim {z_dim}; {found}); {SUPPORTED}")

    loaded = dict(ours)  # num_batches_tracked stays ours where an old file has none
    for theirs, (mine, _, _) in want.items():
        if mine is not None and theirs in state:
            t = state[theirs]
            if theirs.endswith(".weight_bar"):
                t = effective_weight(t, state[theirs[:-len("bar")] + "u"])
            loaded[mine] = t
    G.load_state_dict(loaded)
    return G.eval(), source
