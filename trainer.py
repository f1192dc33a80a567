"""The SAGAN training loop: batch -> D step -> G step -> log -> sample -> save.

`step` counts finished generator updates; checkpoint N holds the state after N of them.

The speed switches are no-ops when off:
    --precision fp32|bf16|fp16   autocast around the forwards (bf16/fp16 need CUDA); fp16 adds a
                                 GradScaler per network, saved in checkpoints
    --channels_last              models and batches in NHWC memory layout
    --compile                    torch.compile G and D in place (opt-in: minutes of compiling)
Always on, because they never change results beyond float rounding: cudnn.benchmark on CUDA (the
input sizes never change, so the fastest convolution algorithms are picked once), and Adam's fused
multi-tensor update instead of a Python loop over parameters.
"""
import contextlib
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from checkpoint import (CheckpointError, atomic_write_text, ckpt_name, load_checkpoint, remove_stale_temps,
                        restore, save_checkpoint, saved_steps)
from cli import reason
from data_loader import training_batches
from distributed import DistInfo, max_over_ranks, mean_over_ranks, sync_batchnorm, wrap
from ema import EMA
from fid import status as fid_status, training_fid
from sagan_models import Discriminator, Generator
from stopping import Diverged, FiniteWatch, Interrupted, StopSignals, params_finite
from utils import default, denorm, exists, pick_device, rng_state, seed_everything, set_rng_state

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# each network's architecture arguments and the flags they come from: a checkpoint stores the
# arguments (model_args), resume compares them and names the flags that differ
ARCH_FLAGS = {"G": dict(image_size="imsize", z_dim="z_dim", conv_dim="g_conv_dim", attn_res="g_attn"),
              "D": dict(image_size="imsize", conv_dim="d_conv_dim", attn_res="d_attn")}


def check_precision(precision, device):
    """Raise ValueError when `precision` can't run on `device` (a torch.device)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA GPU; on {device.type} use --precision fp32 "
                         f"(reduced precision is slower than fp32 on most CPUs)")


def model_args(config):
    """{'G': {...}, 'D': {...}}: the networks' architecture arguments from the flags."""
    return {net: {arg: getattr(config, flag) for arg, flag in args.items()} for net, args in ARCH_FLAGS.items()}


def arch_differences(stored, current):
    """{flag: (stored value, current value)} where a checkpoint's model_args differ from the current."""
    differ = {}
    for net, args in ARCH_FLAGS.items():
        saved = stored.get(net) if isinstance(stored, dict) else None
        for arg, flag in args.items():
            old, new = saved.get(arg) if isinstance(saved, dict) else None, current[net][arg]
            if type(old) is not type(new) or old != new:
                differ.setdefault(flag, (old, new))
    return differ


def flag_value(value):
    """A model argument as its flag is written: [16, 32] -> '16,32', [] -> 'none'."""
    return ",".join(map(str, value)) or "none" if isinstance(value, list) else value


# ----------------------------------------------------------------------------- objectives

def d_hinge(real_out, fake_out):
    return F.relu(1.0 - real_out).mean(), F.relu(1.0 + fake_out).mean()


def d_wasserstein(real_out, fake_out):
    return -real_out.mean(), fake_out.mean()


def g_adversarial(fake_out):
    # the generator loss of both hinge and wgan-gp
    return -fake_out.mean()


def gradient_penalty(D, real, fake, alpha=None):
    """WGAN-GP: (||grad_x D(x)||_2 - 1)^2 at random points between real and fake images;
    alpha (B, 1, 1, 1) in [0, 1] says where, drawn here when not given."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


D_LOSSES = {"hinge": d_hinge, "wgan-gp": d_wasserstein}


def parse_record(line):
    """One metrics.jsonl line as a dict; None for the half-written last line a kill can leave."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def gammas(G, D):
    """{'gamma/G16': ..., 'gamma/D8': ...}: how much each attention layer contributes."""
    out = {f"gamma/G{r}": m.gamma.item() for r, m in G.attn.items()}
    out.update({f"gamma/D{r}": m.gamma.item() for r, m in D.attn.items()})
    return out


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

        args = model_args(config)
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
        self.autocast = torch.autocast(self.device.type, dtype) if dtype else contextlib.nullcontext()
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
        return dict(step=self.step, config=dict(vars(self.config)),
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
        cfg = self.config
        if exists(cfg.pretrained_model):
            path = os.path.join(self.run_dir, ckpt_name(cfg.pretrained_model))
        else:
            path = os.path.join(self.run_dir, "latest.pt")
        if not os.path.isfile(path):
            steps = saved_steps(self.run_dir)
            raise CheckpointError(f"nothing to resume: {path!r} does not exist (saved steps: "
                                  f"{', '.join(map(str, steps)) or 'none'}); check --version and "
                                  f"--model_save_path, or start without --resume")
        ckpt = load_checkpoint(path, training=True)
        differ = arch_differences(ckpt["model_args"], dict(G=self.G.model_args(), D=self.D.model_args()))
        if differ:
            raise CheckpointError(
                f"{path!r} was trained with " + ", ".join(f"--{k} {flag_value(old)}" for k, (old, _) in differ.items())
                + "; resume with the same architecture flags (now: "
                + ", ".join(f"--{k} {flag_value(new)}" for k, (_, new) in differ.items()) + ")")
        restore(self.G.load_state_dict, ckpt, "G", path)
        restore(self.D.load_state_dict, ckpt, "D", path)
        restore(self.opt_g.load_state_dict, ckpt, "opt_g", path)
        restore(self.opt_d.load_state_dict, ckpt, "opt_d", path)
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
        """Open metrics.jsonl; on resume drop lines past the checkpoint (those steps run again)."""
        self.history = []
        if not self.dist.is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        remove_stale_temps(self.run_dir)
        if exists(keep_until) and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                self.history = [r for r in map(parse_record, f) if r and r["step"] <= keep_until]
        # rewritten by rename: a kill in the middle must not lose the history
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        atomic_write_text(os.path.join(self.run_dir, "config.json"), json.dumps(vars(self.config), indent=2))

    def attach_dashboard(self, dashboard):
        """Show the run so far (a resumed run's whole curve) on a Dashboard, then every new value."""
        self.dashboard = dashboard
        for record in self.history:
            self._to_dashboard(record)

    def _to_dashboard(self, record):
        if self.dashboard and "fid" in record:
            self.dashboard.scalars("fid", record["step"], record)
        elif self.dashboard:
            self.dashboard.scalars("loss", record["step"], record)
            self.dashboard.scalars("gamma", record["step"], record)

    def log(self, record):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_dashboard(record)

    @torch.no_grad()
    def sample(self):
        """The fixed-z grid, drawn by the EMA generator when there is one."""
        G = self.ema.model if self.ema else self.G
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
        """One D update then one G update on a batch `real` already on the device.

        Returns the losses as 0-dim tensors, left on the device: reading them would wait for the
        GPU, so the loop only does that at log steps.
        """
        cfg = self.config
        B = real.shape[0]
        if cfg.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)

        # ================== D step: push D(real) up, D(G(z)) down ================== #
        z = self.noise((B, cfg.z_dim))
        if cfg.reuse_fake:
            with self.autocast:
                fake_for_g = self.G_ddp(z)  # graph kept: the G step backpropagates through these images
            fake = fake_for_g.detach()
        else:
            with torch.no_grad(), self.autocast:
                fake = self.G(z)  # no gradients: nothing for DDP to average
        with self.autocast:
            # real and fake in one forward: D has no batch-dependent layers, so the scores are the
            # same as from two forwards, and spectral norm runs one power iteration per D update
            # (Miyato et al.'s Algorithm 1) instead of one per forward
            scores = self.D_ddp(torch.cat([real, fake])).float()
        d_loss_real, d_loss_fake = D_LOSSES[cfg.adv_loss](scores[:B], scores[B:])
        d_loss = d_loss_real + d_loss_fake
        losses = dict(d_loss_real=d_loss_real, d_loss_fake=d_loss_fake)
        if cfg.adv_loss == "wgan-gp":
            with self.autocast:
                # the plain D: the penalty's parameter gradients reach DDP's hooks in d_loss.backward()
                losses["d_gp"] = gradient_penalty(self.D, real, fake, self.uniform((B, 1, 1, 1))).float()
            d_loss = d_loss + cfg.lambda_gp * losses["d_gp"]
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(d_loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()

        # ================== G step: fresh z, push D(G(z)) up ================== #
        # the plain D: its gradients here would be thrown away, so DDP must not wait for them
        self.D.requires_grad_(False)
        with self.autocast:
            fake = fake_for_g if cfg.reuse_fake else self.G_ddp(self.noise((B, cfg.z_dim)))
            g_loss = g_adversarial(self.D(fake).float())
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(g_loss).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.D.requires_grad_(True)

        losses.update(d_loss=d_loss.detach(), g_loss=g_loss.detach())
        return losses

    # ------------------------------------------------------------------ the loop
    def train(self):
        """Train to --total_step; Ctrl-C / SIGTERM stop it at a step boundary, saved (Interrupted)."""
        with StopSignals() as self.stop:  # the handlers only raise a flag, read between steps
            return self._train()

    def _train(self):
        cfg, G, D, device = self.config, self.G, self.D, self.device
        batches = training_batches(self.dataset, cfg, self.step, self.dist.rank, self.dist.world_size)
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
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_sums += 1
            self.watch.update(self.step, losses)  # also on device; read at log and save
            if self.step % cfg.log_step == 0 or self.step == cfg.total_step:
                now = time.time()
                means = mean_over_ranks({k: v / n_sums for k, v in sums.items()})  # the global batch's
                record = {"step": self.step, **{k: v.item() for k, v in means.items()},
                          **gammas(G, D), "it_s": n_sums / (now - tick), "time": now}
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
                    self.log(record := self.fid.measure(self.ema.model if self.ema else G, self.step))
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


def status_line(r, total):
    gam = " ".join(f"{k[6:]} {v:+.3f}" for k, v in r.items() if k.startswith("gamma/"))
    gp = f" gp {r['d_gp']:.3f}" if "d_gp" in r else ""
    return (f"step {r['step']}/{total} | {r['it_s']:.2f} it/s | D {r['d_loss']:.4f} "
            f"(real {r['d_loss_real']:.4f} fake {r['d_loss_fake']:.4f}{gp}) | G {r['g_loss']:.4f} | "
            f"gamma {gam or '(no attention)'}")
