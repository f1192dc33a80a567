"""The showcase model: SAGAN trained on real CelebA faces on this project's 2-core CPU, exported small
(fp16 EMA generator + D) to assets/showcase_celeba64.pt, which the explorer opens when it is given no
checkpoint and finds no local run. One command makes it, resuming whatever part is done:

    python -m tools.showcase                     # train (or resume), export, README figures and table
    python -m tools.showcase --steps 20000       # train further, then the same
    python -m tools.showcase --export_only       # only export + figures, from the run's latest.pt

The run is an ordinary main.py run in runs/showcase/models/celeba64 (Ctrl-C saves; running the command
again resumes). The data are the two CelebA folders this project's developers have (../shared/data):
2,000 full-size faces cut at 160 and 9,723 half-size faces cut at 80, the same framing at two
resolutions. Why these settings: see assets/showcase_celeba64.md.
"""
import contextlib
import io
import os
import shutil
import subprocess
import sys

from cli import Parser, UserError, run
from explorer import SHOWCASE, export_models
from metrics import read_records

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
ASSETS = os.path.dirname(SHOWCASE)
# 64px like heykeetae's CelebA setting (the paper reports ImageNet at 128px); widths 32 and batch 32 for 16,000 steps
# are about 55 minutes of the idle 2-core CPU in bf16, the default there (see assets/showcase_celeba64.md)
TRAIN_FLAGS = ["--dataset", "celeb", "--imsize", "64", "--g_conv_dim", "32", "--d_conv_dim", "32",
               "--batch_size", "32", "--num_workers", "0", "--log_step", "50", "--sample_step", "500",
               "--model_save_step", "500", "--no_visdom", "--version", "celeba64"]


def build_parser():
    p = Parser(prog="tools.showcase", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--steps", type=int, default=16000, help="generator updates in all")
    a("--celeba_sample", default=os.path.join(SHARED, "celeba_sample"), help="full-size faces (crop 160)")
    a("--celeba_halfres", default=os.path.join(SHARED, "celeba_halfres"), help="half-size faces (crop 80)")
    a("--out", default=os.path.join("runs", "showcase"), help="the run's folders")
    a("--export_only", action="store_true", help="don't train: export and draw from the run's latest.pt")
    return p


def train(args):
    for folder in (args.celeba_sample, args.celeba_halfres):
        if not os.path.isdir(folder):
            raise UserError(f"{folder!r} is not a folder: pass --celeba_sample / --celeba_halfres")
    models = os.path.join(args.out, "models")
    cmd = [sys.executable, "main.py", *TRAIN_FLAGS, "--image_path", args.celeba_sample, args.celeba_halfres,
           "--center_crop", "160", "80", "--total_step", str(args.steps), "--model_save_path", models,
           "--sample_path", os.path.join(args.out, "samples")]
    if os.path.exists(os.path.join(models, "celeba64", "latest.pt")):
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError("training stopped (see above); run the same command again to resume")


def training_time(metrics_path):
    """Seconds spent in training steps (startup, sampling and saving excluded), from metrics.jsonl."""
    total, last = 0.0, 0
    for r in read_records(metrics_path):
        if "it_s" not in r:  # an FID record (fid.py), not a training one
            continue
        total += (r["step"] - last) / r["it_s"]
        last = r["step"]
    return total, last


def visualize(*argv, checkpoint=SHOWCASE):
    """visualize_attn.py's main on the showcase model (or `checkpoint`); its printed output."""
    import visualize_attn
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        visualize_attn.main(["--checkpoint", checkpoint, *argv])
    return out.getvalue()


def export_and_draw(args):
    run_dir = os.path.join(args.out, "models", "celeba64")
    latest = os.path.join(run_dir, "latest.pt")
    if not os.path.isfile(latest):
        raise UserError(f"no run at {run_dir!r}: train first (python -m tools.showcase)")
    export_models(latest, SHOWCASE)
    seconds, step = training_time(os.path.join(run_dir, "metrics.jsonl"))
    print(f"exported step {step} to {SHOWCASE} ({os.path.getsize(SHOWCASE) / 2**20:.1f} MiB); "
          f"{seconds / 60:.0f} min in training steps")
    samples = sorted(f for f in os.listdir(os.path.join(args.out, "samples", "celeba64")) if f.endswith(".png"))
    shutil.copyfile(os.path.join(args.out, "samples", "celeba64", samples[-1]),
                    os.path.join(ASSETS, "showcase_samples.png"))
    real = os.path.join(args.celeba_sample, "img_align_celeba", "000002.jpg")

    def a(name):
        return os.path.join(ASSETS, name)

    visualize("--out", a("attn_celeb_query.png"))
    visualize("--view", "layers", "--with_d", "--out", a("attn_celeb_layers.png"))
    visualize("--view", "grid", "--seeds", "0-7", "--out", a("attn_celeb_grid.png"))
    if os.path.isfile(real):
        visualize("--view", "layers", "--d_image", real, "--out", a("attn_celeb_layers_real.png"))
    # attention through training: the same face and eye query at the run's checkpoints
    visualize("--view", "film", "--max_frames", "8", "--out", a("showcase_film.png"), checkpoint=run_dir)
    print(visualize("--with_d", "--table", "--table_images", "64", "--table_queries", "64",
                    "--table_out", a("attn_celeb_table.md")))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.export_only:
        train(args)
    export_and_draw(args)


if __name__ == "__main__":
    run("tools.showcase", main)
