"""An exponential moving average of the generator's weights (the EMA generator).

Averaging G's weights over the last few thousand updates gives visibly smoother, better-scoring
samples than the latest G (Karras et al. 2018; Brock et al. 2019; Yazici et al. 2019). The EMA copy is
never trained: after every G update its parameters move a fraction (1 - decay) towards G's, and its
buffers (BatchNorm running statistics, spectral-norm power-iteration vectors) are copied from G.

Not torch.optim.swa_utils.AveragedModel: get_ema_multi_avg_fn's decay is fixed (no warm-up below),
use_buffers=True would average the buffers this copies, and its update counter `n_averaged` would be a
second copy of the step kept outside the plain Generator state dict that checkpoints store as `G_ema`
(and read on the host at every update: one GPU sync per step).
"""
import torch

from sagan_models import Generator


class EMA:
    """`decay` per update once `start` updates have been made; before that the copy follows G exactly.

    The effective decay warms up as min(decay, (1 + s) / (10 + s)), s = updates since `start`, so a
    short run is not dominated by its random initial weights (the schedule of TensorFlow's
    ExponentialMovingAverage with num_updates).
    """

    def __init__(self, G, decay, start=0):
        self.decay, self.start = decay, start
        self.model = Generator(**G.model_args()).to(next(G.parameters()).device)
        self.model.load_state_dict(G.state_dict())
        self.model.eval().requires_grad_(False)
        self._pairs(G)

    def _pairs(self, G):
        # parameters and buffers are matched by name: the trained G may hold SyncBatchNorm layers
        ema_p, ema_b = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        self.params = [ema_p[k] for k, _ in G.named_parameters()]
        self.src_params = [p for _, p in G.named_parameters()]
        self.buffers = [ema_b[k] for k, _ in G.named_buffers()]
        self.src_buffers = [b for _, b in G.named_buffers()]

    def decay_at(self, step):
        if step <= self.start:
            return 0.0
        s = step - self.start
        return min(self.decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def update(self, step):
        """Call after the G update that made `step`: one fused lerp over all parameters."""
        torch._foreach_lerp_(self.params, self.src_params, 1.0 - self.decay_at(step))
        torch._foreach_copy_(self.buffers, self.src_buffers)

    @torch.no_grad()
    def recompute_bn_stats(self, num_batches=8, batch=64, seed=0):
        """Set the EMA generator's BatchNorm running statistics to its own: the mean and variance
        its BatchNorm layers see over `num_batches` fixed batches of z (a torch.Generator seeded
        with `seed`, so the global RNG and thus resume stay untouched), averaged with equal weight.

        The statistics `update` copies are the trained G's, measured on G's weights; the averaged
        weights produce other activations, so the EMA G in eval mode normalises with statistics
        that are not its own (Izmailov et al. 2018 recompute them for the same reason in SWA).
        Spectral norm's power iteration runs only in training mode, so only the BatchNorm layers are
        switched to it here: its vectors stay as they are. The next `update` copies G's statistics
        back, so call this where the EMA G is used or saved (sampling, checkpoints)."""
        G = self.model
        bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
            m.train()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        device = next(G.parameters()).device
        try:
            for _ in range(num_batches):
                G(torch.randn(batch, G.z_dim, generator=gen).to(device))
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
                m.eval()

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
