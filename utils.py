"""Small helpers shared by the training script, the tools and the tests."""
import random

import numpy as np
import torch


def exists(x):
    return x is not None


def default(x, d):
    return x if exists(x) else d


def to_tensor(pixels):
    """uint8 pixels (..., H, W, 3), an array or a PIL image -> float (..., 3, H, W) in [-1, 1]: images
    as the networks see them, from a file or from the image cache, one image or a batch."""
    arr = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # a copy: torch needs a writable array
    return arr.movedim(-1, -3).float().div_(127.5).sub_(1.0)


def denorm(x):
    """[-1, 1] -> [0, 1]."""
    return ((x + 1) / 2).clamp_(0, 1)


def to_image(x):
    """(3, h, w) in [-1, 1] -> (h, w, 3) float numpy in [0, 1], for drawing."""
    return denorm(x.detach().float().cpu().clone()).permute(1, 2, 0).numpy()


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every random source as plain tensors and tuples (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                python=random.getstate())


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
