"""The SAGAN training loop: batch -> D step -> G step -> log -> sample -> save.

`step` counts finished generator updates; checkpoint N holds the state after N of them. The
objectives are in losses.py, the metrics record in metrics.py, what a checkpoint holds in
checkpoint.py; the run's options arrive as one frozen TrainConfig (config.py).

The speed switches are no-ops when off:
    --precision fp32|bf16|fp16   autocast around the forwards (precision.py; fp16 needs CUDA and adds
                                 a GradScaler per network, saved in checkpoints)
    --channels_last              models and batches in NHWC memory layout
    --compile                    torch.compile G and D in place (opt-in: minutes of compiling)
Always on, because they never change results beyond float rounding: cudnn.benchmark on CUDA (the
input sizes never change, so the fastest convolution algorithms are picked once), and Adam's fused
multi-tensor update instead of a Python loop over parameters.
"""
import math
import os
import shutil
import time

import torch
from torchvision.utils import save_image

from checkpoint import (CheckpointError, check_architecture, ckpt_name, load_checkpoint, restore, restore_optimizer,
                        resume_path, save_checkpoint)
from cli import reason
from data_loader import training_batches
from distributed import DistInfo, max_over_ranks, mean_over_ranks, sync_batchnorm, wrap
from ema import EMA
from fid import status as fid_status, training_fid
from losses import D_LOSSES, g_adversarial, gradient_penalty
from metrics import append_record, make_record, read_records, status_line, write_records
import precision
from run_files import remove_stale_temps
from sagan_models import Discriminator, Generator
from stopping import Diverged, FiniteWatch, Interrupted, StopSignals, params_finite
from utils import default, denorm, exists, pick_device, rng_state, seed_everything, set_rng_state

PRECISIONS = precision.DTYPES


def update(opt, scaler, loss):
    """One optimizer step on `loss`: clear the gradients, backward (scaled under fp16), step, and let
    the scaler adjust its scale (with fp32/bf16 the scaler passes everything through)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


class Trainer:
    """One process of training. self.G / self.D are the networks (saved, sampled, averaged into the
    EMA); under torchrun (`dist`, `device` from distributed.setup_distributed) self.G_ddp / self.D_ddp
    wrap them in DDP for the forwards whose gradients are averaged over ranks, and are the networks
    themselves in one process."""

    def __init__(self, config, dataset, device=None, dist=None):
        self.config, self.dataset = config, dataset
        self.device = device or pick_device(config.device)
        self.dist = dist or DistInfo()
        self.run_dir = os.path.join(config.model_save_path, config.version)
        self.sample_dir = os.path.join(config.sample_path, config.version)
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        seed_everything(config.seed)

        args = config.model_args()
        self.G = Generator(**args["G"]).to(self.device)
        self.D = Discriminator(**args["D"]).to(self.device)
        if config.sync_bn and self.dist.enabled:
            self.G = sync_batchnorm(self.G, self.device)  # before the optimizer sees G's parameters
        if config.channels_last:  # in place, as every Module.to
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        betas = (config.beta1, config.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), config.g_lr, betas, fused=True)
        self.opt_d = torch.optim.Adam(self.D.parameters(), config.d_lr, betas, fused=True)
        dtype = PRECISIONS[config.precision]
        self.autocast = precision.autocast(config.precision, self.device)
        # loss scaling for fp16, one per network (their gradients have unrelated ranges); with
        # fp32/bf16 these are disabled and pass everything through unchanged
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=dtype is torch.float16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=dtype is torch.float16)
        g = torch.Generator().manual_seed(config.seed)
        self.fixed_z = torch.randn(config.n_samples, config.z_dim, generator=g).to(self.device)
        self.step = 0
        self.watch = FiniteWatch(self.device)
        self.last_saved = None  # (step, path) of the newest checkpoint known to be good
        self.ema = EMA(self.G, config.ema_decay, config.ema_start) if config.ema_decay > 0 else None
        self._bn_step = None  # the step the EMA G's BatchNorm statistics were last made its own
        self.fid = training_fid(config, dataset, self.device) if self.dist.is_main else None

        if config.resume or exists(config.pretrained_model):
            self.resume()
        else:
            self._start_metrics()
        if config.compile:  # in place: the state dicts keep their names, every forward is compiled
            self.G.compile()
            self.D.compile()
        self.G_ddp, self.D_ddp = wrap(self.G, self.device, self.dist), wrap(self.D, self.device, self.dist)
        self.dashboard = None

    def say(self, *args):
        if self.dist.is_main:
            print(*args, flush=True)

    def _rank_slice(self, draw, shape):
        """This rank's slice of noise drawn for the whole global batch.

        Every rank draws the global batch's noise from the same stream and keeps its slice:
        (B * world_size, ...) -> (B, ...). The run is then the same computation at any world size,
        and one RNG state (rank 0's, in the checkpoint) resumes every rank.
        """
        B = shape[0]
        full = draw(B * self.dist.world_size, *shape[1:], device=self.device)
        return full[self.dist.rank * B:(self.dist.rank + 1) * B]

    def noise(self, shape):
        return self._rank_slice(torch.randn, shape)

    def uniform(self, shape):
        return self._rank_slice(torch.rand, shape)

    # ------------------------------------------------------------------ checkpoints
    def state(self):
        return dict(step=self.step, config=self.config.to_dict(),
                    model_args=dict(G=self.G.model_args(), D=self.D.model_args()),
                    G=self.G.state_dict(), D=self.D.state_dict(),
                    opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(),
                    scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict(),
                    fixed_z=self.fixed_z.cpu(), rng=rng_state(),
                    **({"G_ema": self.ema.state_dict()} if self.ema else {}))

    def save(self):
        """Save the current step, unless a loss or a weight went NaN/Inf: a diverged state never
        replaces a good checkpoint. A failed write (full disk) leaves latest.pt as it was."""
        bad = self.watch.bad_step()
        if exists(bad) or not params_finite(self.G, self.D):
            raise self.diverged(default(bad, self.step))
        if self.ema:
            self.ema_generator()  # the saved EMA G normalises with its own statistics
        try:
            path = save_checkpoint(self.state(), self.run_dir, self.config.keep_last)
        except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as RuntimeError
            kept = (f"{self.run_dir}/latest.pt still holds step {self.last_saved[0]}"
                    if self.last_saved else "no earlier checkpoint of this run")
            free = shutil.disk_usage(self.run_dir).free / 2**20  # torch's error hides the errno
            raise CheckpointError(
                f"could not write the step-{self.step} checkpoint in {self.run_dir!r} "
                f"({reason(e, 160)}; {free:.0f} MiB free there); "
                f"{kept}. Free disk space (or use --keep_last) and continue with --resume") from None
        self.last_saved = (self.step, path)
        return path

    def diverged(self, step):
        good = (f"the last good checkpoint is {self.last_saved[1]} (step {self.last_saved[0]})"
                if self.last_saved else "no checkpoint of this run was saved before it")
        return Diverged(f"training diverged: a loss or weight became NaN/Inf at step {step}; "
                        f"nothing was saved after it, {good}")

    def resume(self):
        """Continue from --pretrained_model's checkpoint, else latest.pt: everything the file holds is
        restored (the architecture must match), except the learning rates, which the flags set."""
        cfg = self.config
        path = resume_path(self.run_dir, cfg.pretrained_model)
        ckpt = load_checkpoint(path, training=True)
        check_architecture(ckpt, cfg, path)
        restore(self.G.load_state_dict, ckpt, "G", path)
        restore(self.D.load_state_dict, ckpt, "D", path)
        restore_optimizer(self.opt_g, ckpt, "opt_g", path)
        restore_optimizer(self.opt_d, ckpt, "opt_d", path)
        for opt, lr in ((self.opt_g, cfg.g_lr), (self.opt_d, cfg.d_lr)):
            for group in opt.param_groups:  # the command line wins: a lower lr after a divergence
                group["lr"] = lr
        for name in ("scaler_g", "scaler_d"):
            # empty when saved by an fp32/bf16 run (or absent in older checkpoints): an fp16 run
            # resumed from it starts its loss scale afresh
            if ckpt.get(name) and getattr(self, name).is_enabled():
                restore(getattr(self, name).load_state_dict, ckpt, name, path)
        self.fixed_z = ckpt["fixed_z"].to(self.device)
        self.step = ckpt["step"]
        restore(set_rng_state, ckpt, "rng", path)
        own_file = os.path.join(self.run_dir, ckpt_name(self.step))  # what latest.pt links to
        self.last_saved = (self.step, own_file if os.path.isfile(own_file) else path)
        if self.ema:
            restore(self.ema.load_state_dict, ckpt, "G_ema" if "G_ema" in ckpt else "G", path)
            if "G_ema" not in ckpt:  # a run without the EMA until now
                self.say(f"{path} has no EMA generator: the EMA starts from its G at step {self.step}")
        self._start_metrics(keep_until=self.step)
        self.say(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ logging
    def _start_metrics(self, keep_until=None):
        """Write config.json and open metrics.jsonl; on resume drop the records past the checkpoint
        (those steps run again)."""
        self.history = []
        if not self.dist.is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        remove_stale_temps(self.run_dir)
        if exists(keep_until):
            self.history = read_records(self.metrics_path, until=keep_until)
        write_records(self.metrics_path, self.history)
        self.config.write_json(os.path.join(self.run_dir, "config.json"))

    def attach_dashboard(self, dashboard):
        """Show the run so far (a resumed run's whole curve) on a Dashboard, then every new value."""
        self.dashboard = dashboard
        for record in self.history:
            self._to_dashboard(record)

    def _to_dashboard(self, record):
        if self.dashboard:  # an FID record (fid.py) has its own window; a training record the others
            for win in (("fid",) if "fid" in record else ("loss", "gamma")):
                self.dashboard.scalars(win, record["step"], record)

    def log(self, record):
        append_record(self.metrics_path, record)
        self._to_dashboard(record)

    def ema_generator(self):
        """The EMA G with BatchNorm statistics of its own (EMA.recompute_bn_stats: the copied ones
        are the trained G's), recomputed once per step at which it is sampled or saved."""
        if self._bn_step != self.step:
            self.ema.recompute_bn_stats(num_batches=4, batch=64, seed=self.config.seed)
            self._bn_step = self.step
        return self.ema.model

    @torch.no_grad()
    def sample(self):
        """The fixed-z grid, drawn by the EMA generator when there is one."""
        G = self.ema_generator() if self.ema else self.G
        was_training = G.training
        G.eval()
        images = denorm(G(self.fixed_z))
        if self.dashboard:  # watch attention form: a few face pixels' rows, every layer of G
            self.dashboard.attention(G, self.fixed_z[:1], self.step)
        G.train(was_training)
        os.makedirs(self.sample_dir, exist_ok=True)
        path = os.path.join(self.sample_dir, f"{self.step:07d}_fake.png")
        save_image(images, path, nrow=int(math.sqrt(len(images))))
        if self.dashboard:
            who = "EMA G" if self.ema else "G"
            self.dashboard.image("samples", images, caption=f"fixed z, {who}, step {self.step}")
        return path

    # ------------------------------------------------------------------ one iteration
    def train_step(self, real):
        """The paper's update on a batch `real` already on the device: one D step on G(z) drawn
        without gradients, then one G step on a fresh z (--reuse_fake: `step_reusing_fake`).

        Returns the losses as 0-dim tensors, left on the device: reading them would wait for the
        GPU, so the loop only does that at log steps.
        """
        B, z_dim = real.shape[0], self.config.z_dim
        if self.config.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        if self.config.reuse_fake:
            return self.step_reusing_fake(real)

        # ================== D step: push D(real) up, D(G(z)) down ================== #
        with torch.no_grad(), self.autocast:
            fake = self.G(self.noise((B, z_dim)))  # no gradients: nothing for DDP to average
        losses = self.d_step(real, fake)

        # ================== G step: fresh z, push D(G(z)) up ================== #
        with self.autocast:
            fake = self.G_ddp(self.noise((B, z_dim)))
        losses["g_loss"] = self.g_step(fake)
        return losses

    def step_reusing_fake(self, real):
        """--reuse_fake, NOT the paper's update: one z and one G forward serve both steps (the G
        step backpropagates through the images D was just trained on), saving a G forward."""
        with self.autocast:
            fake = self.G_ddp(self.noise((real.shape[0], self.config.z_dim)))  # graph kept for the G step
        losses = self.d_step(real, fake.detach())
        losses["g_loss"] = self.g_step(fake)
        return losses

    def d_step(self, real, fake):
        """One D update on real and fake images (no graph back to G); D's losses, detached."""
        cfg, B = self.config, real.shape[0]
        with self.autocast:
            # real and fake in one forward: D has no batch-dependent layers, so the scores are the
            # same as from two forwards, and spectral norm runs one power iteration per D update
            # (Miyato et al.'s Algorithm 1) instead of one per forward
            scores = self.D_ddp(torch.cat([real, fake])).float()  # (2B,)
        d_loss_real, d_loss_fake = D_LOSSES[cfg.adv_loss](scores[:B], scores[B:])
        d_loss = d_loss_real + d_loss_fake
        losses = dict(d_loss_real=d_loss_real.detach(), d_loss_fake=d_loss_fake.detach())
        if cfg.adv_loss == "wgan-gp":
            with self.autocast:
                # the plain D: the penalty's parameter gradients reach DDP's hooks in d_loss.backward()
                gp = gradient_penalty(self.D, real, fake, self.uniform((B, 1, 1, 1))).float()
            d_loss = d_loss + cfg.lambda_gp * gp
            losses["d_gp"] = gp.detach()
        update(self.opt_d, self.scaler_d, d_loss)
        return dict(losses, d_loss=d_loss.detach())

    def g_step(self, fake):
        """One G update on `fake` = G(z) with its graph, scored by D held fixed; G's loss, detached."""
        # the plain D, frozen: its gradients here would be thrown away, so DDP must not wait for them
        self.D.requires_grad_(False)
        with self.autocast:
            g_loss = g_adversarial(self.D(fake).float())
        update(self.opt_g, self.scaler_g, g_loss)
        self.D.requires_grad_(True)
        return g_loss.detach()

    # ------------------------------------------------------------------ the loop
    def train(self):
        """Train to --total_step; Ctrl-C / SIGTERM stop it at a step boundary, saved (Interrupted)."""
        with StopSignals() as self.stop:  # the handlers only raise a flag, read between steps
            return self._train()

    def _train(self):
        cfg, G, D, device = self.config, self.G, self.D, self.device
        batches = training_batches(self.dataset, cfg.batch_size, cfg.seed, self.step, self.dist.rank,
                                   self.dist.world_size, cfg.num_workers)
        G.train(), D.train()
        sums, n_sums, tick = {}, 0, time.time()
        if self.ema:
            self.say(f"EMA generator: decay {self.ema.decay} from step {self.ema.start}; "
                     f"samples and checkpoints' default generator use it")

        while self.step < cfg.total_step:
            real = next(batches).to(device, non_blocking=True)
            losses = self.train_step(real)
            self.step += 1
            if self.ema:
                self.ema.update(self.step)

            # ================== log / sample / save ================== #
            for k, v in losses.items():  # summed on device: no sync until a log step
                sums[k] = sums.get(k, 0.0) + v
            n_sums += 1
            self.watch.update(self.step, losses)  # also on device; read at log and save
            if self.step % cfg.log_step == 0 or self.step == cfg.total_step:
                means = mean_over_ranks({k: v / n_sums for k, v in sums.items()})  # the global batch's
                record = make_record(self.step, {k: v.item() for k, v in means.items()}, G, D, n_sums, tick)
                if self.dist.is_main:
                    self.log(record)
                    print(status_line(record, cfg.total_step), flush=True)
                sums, n_sums, tick = {}, 0, time.time()
                if exists(bad := self.watch.bad_step()):  # no extra sync: the record just synced
                    raise self.diverged(bad)
            if self.dist.is_main:
                if self.step % cfg.sample_step == 0 or self.step == cfg.total_step:
                    self.sample()
                if self.fid and self.step % cfg.fid_every == 0:  # the EMA G, as samples use it
                    self.log(record := self.fid.measure(self.ema_generator() if self.ema else G, self.step))
                    print(fid_status(record), flush=True)
                if self.step % cfg.model_save_step == 0 or self.step == cfg.total_step:
                    self.save()
            # every rank stops at the same step, or the others would wait in a collective forever
            signum = max_over_ranks(self.stop.signum or 0) if self.dist.enabled else self.stop.signum
            if signum and self.step < cfg.total_step:
                if self.dist.is_main and not (self.last_saved and self.last_saved[0] == self.step):
                    self.save()
                raise Interrupted(signum, self.step, self.last_saved[1] if self.last_saved else None)
        return self.last_saved[1] if self.last_saved else None
