"""Does attention help? Equal-budget runs with and without self-attention on the built-in faces.

    python -m experiments.attention_ablation                 # CPU-sized: 32px, conv_dim 32, 2000 steps
    python -m experiments.attention_ablation --steps 20000   # longer; reuses and extends the runs

(from the repository root, as a module: it imports the project's modules from there).

Both arms are ordinary `main.py` runs (same seed, data, batch and steps; 'attn' has the default
attention at 32px, G at 8 and 16, D at 8 and 4; 'noattn' has none), trained side by side and resumed
when their folders exist. Scores use the raw G (runs are made with --ema_decay 0, so a short budget
isn't judged by an average that still remembers the first steps). It prints a markdown table:
the eye-colour consistency of generated faces against real faces (ceiling) and random pairs (chance),
and how much attention a query at one eye (attention.FACE_QUERIES, the explorer's and the dashboard's
eyes) puts on the other eye against uniform attention.
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import torch

from attention import face_pixels
from checkpoint import ckpt_name, load_generator
from data_loader import synthetic_face
from experiments.eye_metrics import consistency, eye_colours, eye_layout, other_eye_attention
from utils import denorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where main.py is

ARMS = {"attn": [], "noattn": ["--g_attn", "none", "--d_attn", "none"]}


def build_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.attention_ablation", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--steps", type=int, default=2000, help="generator updates per arm")
    a("--imsize", type=int, default=32)
    a("--conv_dim", type=int, default=32, help="g_conv_dim and d_conv_dim")
    a("--batch_size", type=int, default=32)
    a("--z_dim", type=int, default=128)
    a("--synthetic_size", type=int, default=20_000)
    a("--seed", type=int, default=0)
    a("--out", default=os.path.join("runs", "attention_ablation"), help="run folders and logs")
    a("--num_samples", type=int, default=1000, help="generated (and real) faces scored per arm")
    a("--tol", type=float, default=0.1, help="eyes match when their RGB colours (0..1) are this close")
    a("--threads", type=int, default=1, help="torch threads per arm (the arms train in parallel)")
    a("--score_only", action="store_true", help="don't train; score the checkpoints at --steps")
    return p


def train_arms(args):
    """Both arms in parallel as main.py subprocesses; an existing run resumes (and may be extended)."""
    models = os.path.join(args.out, "models")
    procs = {}
    for arm, flags in ARMS.items():
        cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--dataset", "synthetic",
               "--imsize", str(args.imsize), "--g_conv_dim", str(args.conv_dim), "--d_conv_dim", str(args.conv_dim),
               "--z_dim", str(args.z_dim), "--batch_size", str(args.batch_size), "--synthetic_size",
               str(args.synthetic_size), "--seed", str(args.seed), "--num_workers", "0", "--total_step", str(args.steps),
               "--log_step", str(max(args.steps // 40, 1)), "--sample_step", str(max(args.steps // 10, 1)),
               "--model_save_step", str(max(args.steps // 10, 1)), "--ema_decay", "0", "--no_visdom",
               "--version", arm, "--model_save_path", models, "--sample_path", os.path.join(args.out, "samples"),
               *flags]
        if os.path.exists(os.path.join(models, arm, "latest.pt")):
            cmd.append("--resume")
        os.makedirs(args.out, exist_ok=True)
        log = open(os.path.join(args.out, f"{arm}.log"), "a")
        procs[arm] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads))), log)
        print(f"training '{arm}': {' '.join(cmd[1:])}", flush=True)
    for arm, (proc, log) in procs.items():
        if proc.wait() != 0:
            sys.exit(f"experiments.attention_ablation: error: arm '{arm}' failed, see {log.name}")
        log.close()


def real_faces(n, imsize, seed=777):
    """(n, H, W, 3) floats in [0, 1]: held-out built-in faces (a seed the runs never saw)."""
    return np.stack([synthetic_face(np.random.default_rng([seed, i]), imsize)[0] for i in range(n)]) / 255.0


@torch.no_grad()
def generated_faces(G, n, seed, batch=250):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=g)  # (n, z_dim)
    imgs = torch.cat([denorm(G(z[i:i + batch])) for i in range(0, n, batch)])  # (n, 3, H, W)
    return imgs.permute(0, 2, 3, 1).numpy(), z


def score(args):
    layout = eye_layout(args.imsize)
    faces = face_pixels(args.imsize)
    eyes = [faces["left eye"], faces["right eye"]]
    rows = []
    real = eye_colours(real_faces(args.num_samples, args.imsize), layout)
    rows.append(("real built-in faces (ceiling)", *consistency(real, args.tol), "-"))
    rows.append(("random pairs of real eyes (chance)", *consistency(real, args.tol, np.random.default_rng(0)), "-"))
    for arm in ARMS:
        path = os.path.join(args.out, "models", arm, ckpt_name(args.steps))
        G = load_generator(path, ema=False)  # says so: the raw G, see the module's docstring
        torch.manual_seed(args.seed)
        imgs, z = generated_faces(G, args.num_samples, args.seed)
        attn = other_eye_attention(G, z[:256], eyes)
        stat = ", ".join(f"{name}: {v:.2f}x" for name, v in attn.items()) or "n/a (no attention)"
        rows.append((f"G {'with' if G.attn_res else 'without'} attention, step {args.steps}",
                     *consistency(eye_colours(imgs, layout), args.tol), stat))
    return rows


def table(rows, tol):
    lines = [f"| images | eyes match (RGB distance < {tol}) | median eye-colour distance | "
             f"attention on the other eye / uniform |", "|---|---|---|---|"]
    lines += [f"| {name} | {frac:.1%} | {med:.3f} | {stat} |" for name, frac, med, stat in rows]
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.steps <= 0 or args.num_samples < 2:
        sys.exit("experiments.attention_ablation: error: --steps must be positive and --num_samples at least 2")
    if not args.score_only:
        train_arms(args)
    torch.set_num_threads(args.threads)
    print(table(score(args), args.tol))


if __name__ == "__main__":
    main()
