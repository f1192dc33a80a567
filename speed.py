"""The performance switches of a run, in one place; each is a no-op when off.

    --precision fp32|bf16|fp16   autocast around the forwards (bf16/fp16 need CUDA); fp16 adds a
                                 GradScaler per network, saved in checkpoints
    --channels_last              models and batches in NHWC memory layout
    --compile                    torch.compile the G and D forwards (opt-in: minutes of compiling)

Always on, because they never change results beyond float rounding: cudnn.benchmark on CUDA (the
input sizes never change, so the fastest convolution algorithms are picked once), and Adam's fused
multi-tensor update instead of a Python loop over parameters.
"""
import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision, device):
    """Raise ValueError when `precision` can't run on `device` (a torch.device)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA GPU; on {device.type} use --precision fp32 "
                         f"(reduced precision is slower than fp32 on most CPUs)")


class Speed:
    def __init__(self, config, device):
        self.device = device
        self.dtype = PRECISIONS[config.precision]
        self.channels_last = config.channels_last
        self.use_compile = config.compile
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self):
        """Disabled (scale/step/update pass through) unless the run is fp16."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)

    def prepare(self, model):
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def layout(self, images):
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def compile(self, model):
        return torch.compile(model) if self.use_compile else model

    def adam(self, params, lr, betas):
        """Adam with its fused kernel (one pass over all parameters; CPU and CUDA since torch 2.4)."""
        params = list(params)
        return torch.optim.Adam(params, lr, betas, fused=True)
