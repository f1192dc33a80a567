"""The SAGAN training loop: batch -> D step -> G step -> log -> sample -> save.

`step` counts finished generator updates; checkpoint N holds the state after N of them.
"""
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from checkpoint import CheckpointError, ckpt_name, list_checkpoints, load_checkpoint, save_checkpoint
from data_loader import training_batches
from sagan_models import Discriminator, Generator
from speed import Speed
from utils import denorm, exists, pick_device, rng_state, seed_everything, set_rng_state

ARCH_KEYS = ("imsize", "z_dim", "g_conv_dim", "d_conv_dim", "g_attn", "d_attn")


# ----------------------------------------------------------------------------- objectives

def d_hinge(real_out, fake_out):
    return F.relu(1.0 - real_out).mean(), F.relu(1.0 + fake_out).mean()


def d_wasserstein(real_out, fake_out):
    return -real_out.mean(), fake_out.mean()


def g_adversarial(fake_out):
    # the generator loss of both hinge and wgan-gp
    return -fake_out.mean()


def gradient_penalty(D, real, fake):
    """WGAN-GP: (||grad_x D(x)||_2 - 1)^2 at random points between real and fake images."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


D_LOSSES = {"hinge": d_hinge, "wgan-gp": d_wasserstein}


def gammas(G, D):
    """{'gamma/G16': ..., 'gamma/D8': ...}: how much each attention layer contributes."""
    out = {f"gamma/G{r}": m.gamma.item() for r, m in G.attn.items()}
    out.update({f"gamma/D{r}": m.gamma.item() for r, m in D.attn.items()})
    return out


class Trainer:
    def __init__(self, config, dataset):
        self.config, self.dataset = config, dataset
        self.device = pick_device(config.device)
        self.run_dir = os.path.join(config.model_save_path, config.version)
        self.sample_dir = os.path.join(config.sample_path, config.version)
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        seed_everything(config.seed)

        self.G = Generator(config.imsize, config.z_dim, config.g_conv_dim, config.g_attn).to(self.device)
        self.D = Discriminator(config.imsize, config.d_conv_dim, config.d_attn).to(self.device)
        self.speed = Speed(config, self.device)
        self.G, self.D = self.speed.prepare(self.G), self.speed.prepare(self.D)
        # what the step calls: the compiled wrappers with --compile, else the modules themselves;
        # checkpoints always save self.G / self.D, never a wrapper
        self.G_fwd, self.D_fwd = self.speed.compile(self.G), self.speed.compile(self.D)
        betas = (config.beta1, config.beta2)
        self.opt_g = self.speed.adam(self.G.parameters(), config.g_lr, betas)
        self.opt_d = self.speed.adam(self.D.parameters(), config.d_lr, betas)
        # loss scaling for fp16, one per network (their gradients have unrelated ranges); with
        # fp32/bf16 these are disabled and pass everything through unchanged
        self.scaler_g, self.scaler_d = self.speed.grad_scaler(), self.speed.grad_scaler()
        g = torch.Generator().manual_seed(config.seed)
        self.fixed_z = torch.randn(config.n_samples, config.z_dim, generator=g).to(self.device)
        self.step = 0

        if config.resume or exists(config.pretrained_model):
            self.resume()
        else:
            self._start_metrics()
        self.dashboard = None

    # ------------------------------------------------------------------ checkpoints
    def state(self):
        return dict(step=self.step, config=dict(vars(self.config)),
                    model_args=dict(G=self.G.model_args(), D=self.D.model_args()),
                    G=self.G.state_dict(), D=self.D.state_dict(),
                    opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(),
                    scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict(),
                    fixed_z=self.fixed_z.cpu(), rng=rng_state())

    def save(self):
        return save_checkpoint(self.state(), self.run_dir, self.config.keep_last)

    def resume(self):
        cfg = self.config
        if exists(cfg.pretrained_model):
            path = os.path.join(self.run_dir, ckpt_name(cfg.pretrained_model))
        else:
            path = os.path.join(self.run_dir, "latest.pt")
        if not os.path.isfile(path):
            steps = [int(os.path.basename(p)[5:12]) for p in list_checkpoints(self.run_dir)]
            raise CheckpointError(f"nothing to resume: {path!r} does not exist (saved steps: "
                                  f"{', '.join(map(str, steps)) or 'none'}); check --version and "
                                  f"--model_save_path, or start without --resume")
        ckpt = load_checkpoint(path)
        saved = ckpt["config"]
        differ = [k for k in ARCH_KEYS if saved.get(k) != getattr(cfg, k)]
        if differ:
            raise CheckpointError(
                f"{path!r} was trained with " + ", ".join(f"--{k} {saved[k]}" for k in differ)
                + "; resume with the same architecture flags (now: "
                + ", ".join(f"--{k} {getattr(cfg, k)}" for k in differ) + ")")
        self.G.load_state_dict(ckpt["G"])
        self.D.load_state_dict(ckpt["D"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        for name in ("scaler_g", "scaler_d"):
            # empty when saved by an fp32/bf16 run (or absent in older checkpoints): an fp16 run
            # resumed from it starts its loss scale afresh
            if ckpt.get(name) and getattr(self, name).is_enabled():
                getattr(self, name).load_state_dict(ckpt[name])
        self.fixed_z = ckpt["fixed_z"].to(self.device)
        self.step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        self._start_metrics(keep_until=self.step)
        print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ logging
    def _start_metrics(self, keep_until=None):
        """Open metrics.jsonl; on resume drop lines past the checkpoint (those steps run again)."""
        os.makedirs(self.run_dir, exist_ok=True)
        self.history = []
        if exists(keep_until) and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                self.history = [r for r in map(json.loads, f) if r["step"] <= keep_until]
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(vars(self.config), f, indent=2)

    def attach_dashboard(self, dashboard):
        """Show the run so far (a resumed run's whole curve) on a Dashboard, then every new value."""
        self.dashboard = dashboard
        for record in self.history:
            self._to_dashboard(record)

    def _to_dashboard(self, record):
        if self.dashboard:
            self.dashboard.scalars("loss", record["step"], record)
            self.dashboard.scalars("gamma", record["step"], record)

    def log(self, record):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_dashboard(record)

    @torch.no_grad()
    def sample(self):
        self.G.eval()
        images = denorm(self.G(self.fixed_z))
        self.G.train()
        os.makedirs(self.sample_dir, exist_ok=True)
        path = os.path.join(self.sample_dir, f"{self.step:07d}_fake.png")
        save_image(images, path, nrow=int(math.sqrt(len(images))))
        if self.dashboard:
            self.dashboard.image("samples", images, caption=f"fixed z, step {self.step}")
        return path

    # ------------------------------------------------------------------ one iteration
    def train_step(self, real):
        """One D update then one G update on a batch `real` already on the device.

        Returns the losses as 0-dim tensors, left on the device: reading them would wait for the
        GPU, so the loop only does that at log steps.
        """
        cfg, G, D, device = self.config, self.G_fwd, self.D_fwd, self.device
        B = real.shape[0]
        real = self.speed.layout(real)

        # ================== D step: push D(real) up, D(G(z)) down ================== #
        z = torch.randn(B, cfg.z_dim, device=device)
        if cfg.reuse_fake:
            with self.speed.autocast():
                fake_for_g = G(z)  # graph kept: the G step backpropagates through these images
            fake = fake_for_g.detach()
        else:
            with torch.no_grad(), self.speed.autocast():
                fake = G(z)
        with self.speed.autocast():
            # real and fake in one forward: D has no batch-dependent layers, so the scores are the
            # same as from two forwards, and spectral norm runs one power iteration per D update
            # (Miyato et al.'s Algorithm 1) instead of one per forward
            scores = D(torch.cat([real, fake])).float()
        d_loss_real, d_loss_fake = D_LOSSES[cfg.adv_loss](scores[:B], scores[B:])
        d_loss = d_loss_real + d_loss_fake
        losses = dict(d_loss_real=d_loss_real, d_loss_fake=d_loss_fake)
        if cfg.adv_loss == "wgan-gp":
            with self.speed.autocast():
                losses["d_gp"] = gradient_penalty(D, real, fake).float()
            d_loss = d_loss + cfg.lambda_gp * losses["d_gp"]
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(d_loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()

        # ================== G step: fresh z, push D(G(z)) up ================== #
        self.D.requires_grad_(False)  # D's gradients here would be thrown away
        with self.speed.autocast():
            fake = fake_for_g if cfg.reuse_fake else G(torch.randn(B, cfg.z_dim, device=device))
            g_loss = g_adversarial(D(fake).float())
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(g_loss).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.D.requires_grad_(True)

        losses.update(d_loss=d_loss.detach(), g_loss=g_loss.detach())
        return losses

    # ------------------------------------------------------------------ the loop
    def train(self):
        cfg, G, D, device = self.config, self.G, self.D, self.device
        batches = training_batches(self.dataset, cfg, start_step=self.step)
        G.train(), D.train()
        sums, n_sums, tick = {}, 0, time.time()
        last_saved = None

        while self.step < cfg.total_step:
            real = next(batches).to(device, non_blocking=True)
            losses = self.train_step(real)
            self.step += 1

            # ================== log / sample / save ================== #
            for k, v in losses.items():  # summed on device: no sync until a log step
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_sums += 1
            if self.step % cfg.log_step == 0 or self.step == cfg.total_step:
                now = time.time()
                record = {"step": self.step, **{k: (v / n_sums).item() for k, v in sums.items()},
                          **gammas(G, D), "it_s": n_sums / (now - tick), "time": now}
                self.log(record)
                print(status_line(record, cfg.total_step), flush=True)
                sums, n_sums, tick = {}, 0, time.time()
            if self.step % cfg.sample_step == 0 or self.step == cfg.total_step:
                self.sample()
            if self.step % cfg.model_save_step == 0 or self.step == cfg.total_step:
                last_saved = self.save()
        return last_saved


def status_line(r, total):
    gam = " ".join(f"{k[6:]} {v:+.3f}" for k, v in r.items() if k.startswith("gamma/"))
    gp = f" gp {r['d_gp']:.3f}" if "d_gp" in r else ""
    return (f"step {r['step']}/{total} | {r['it_s']:.2f} it/s | D {r['d_loss']:.4f} "
            f"(real {r['d_loss_real']:.4f} fake {r['d_loss_fake']:.4f}{gp}) | G {r['g_loss']:.4f} | "
            f"gamma {gam or '(no attention)'}")
