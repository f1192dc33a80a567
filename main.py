"""Train SAGAN: check the flags, freeze them into the run's TrainConfig, build the data and the trainer, run.

    python main.py --batch_size 64 --imsize 64 --dataset celeb --adv_loss hinge --version sagan_celeb
    python main.py --preset quick      # built-in data, CPU-sized, a few minutes
    torchrun --nproc_per_node=8 main.py --batch_size 32 ...   # 8 GPUs, global batch 8 x 32 = 256
"""
import contextlib
import os
import shlex
import sys

import torch

import precision
from cli import Parser, UserError, run
from config import PRESETS, TrainConfig, add_flags, flag_text, folder_crops
from data_loader import make_dataset
from distributed import cleanup_distributed, dist_info, setup_distributed
from run_files import RunLock
from sagan_models import check_attn, check_imsize, check_local, check_patch, default_attn
from stopping import Diverged, Interrupted
from trainer import Trainer
from utils import default, pick_device


def build_parser():
    """The command line: one flag per TrainConfig field (config.py), plus --visdom."""
    p = add_flags(Parser(prog="main.py", description="Self-Attention GAN (SAGAN) training."))
    p.add_argument("--visdom", dest="no_visdom", action="store_false",
                   help="talk to it even where a preset says --no_visdom")
    return p


def parse_args(argv=None, **facts):
    """The run's TrainConfig: flags over the preset over the defaults, checked, then resolved and
    frozen (config.py); `facts` are values decided at start-up, e.g. world_size=2 under torchrun."""
    p = build_parser()
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    flags = p.parse_args(argv)
    try:
        check_config(flags)
        # 'auto' decided here, once (precision.resolve: the device, the CPU's bf16 units, a probe);
        # a resumed run keeps the choice its config.json records
        resuming = (os.path.join(flags.model_save_path, flags.version, "config.json")
                    if flags.resume or flags.pretrained_model else None)
        chosen, why = precision.resolve(flags.precision, pick_device(flags.device), resuming=resuming)
    except ValueError as e:
        p.error(str(e))
    # FID while training: on by default only where it is cheap (CelebA on a GPU; minutes per
    # evaluation on a CPU), at an N that suits the device
    cuda = pick_device(flags.device).type == "cuda"
    fid = dict(fid_every=default(flags.fid_every, 5000 if cuda and flags.dataset == "celeb" else 0),
               fid_samples=default(flags.fid_samples, 10_000 if cuda else 500))
    return TrainConfig.from_flags(vars(flags), precision=chosen, precision_reason=why, **fid, **facts)


def check_config(c):
    """Every flag checked before anything heavy starts; raises ValueError naming the flag. Reads
    `c` (the parsed flags) only: the values it leaves to 'auto' are resolved by TrainConfig."""
    for name in ("total_step", "batch_size", "log_step", "sample_step", "model_save_step", "z_dim",
                 "g_conv_dim", "d_conv_dim", "synthetic_size", "n_samples", "visdom_port"):
        if getattr(c, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(c, name)}")
    for name in ("num_workers", "keep_last", "lambda_gp", "beta1", "beta2", "ema_start"):
        if getattr(c, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(c, name)}")
    if min(c.center_crop) < 0:
        raise ValueError(f"--center_crop must not be negative, got {' '.join(map(str, c.center_crop))}")
    folder_crops(c.image_path, c.center_crop)
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
    for net, attn in (("g", c.g_attn), ("d", c.d_attn)):
        if attn is not None:  # None: 'auto', the seed's placement, valid at every image size
            check_attn(c.imsize, attn, net)
    check_patch(c.imsize, c.d_patch, default_attn(c.imsize, "d") if c.d_attn is None else c.d_attn)
    check_local(c.imsize, c.g_local, c.z_dim, default_attn(c.imsize, "g") if c.g_attn is None else c.g_attn)
    if not c.version or os.sep in c.version or c.version in (".", ".."):
        raise ValueError(f"--version {c.version!r} must be a plain folder name")
    for name in ("fid_every", "fid_samples"):  # None: the device's default (parse_args)
        if getattr(c, name) is not None and getattr(c, name) < (0 if name == "fid_every" else 2):
            raise ValueError(f"--{name} must be {'non-negative' if name == 'fid_every' else 'at least 2'}, "
                             f"got {getattr(c, name)}")


def dataset_for(config):
    """The training images a config names: its data flags handed to data_loader.make_dataset."""
    return make_dataset(config.dataset, config.imsize, folders=config.folders(),
                        synthetic_size=config.synthetic_size, synthetic_eyes=config.synthetic_eyes,
                        seed=config.seed,
                        cache_dir=config.cache_dir if config.cache == "auto" else None,
                        num_workers=config.num_workers)


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


def check_data_size(n, config):
    """Every step takes a whole global batch (the epoch's tail is dropped): the data must hold one."""
    world_size = config.world_size
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
        from dashboard import Dashboard, visdom, windows
    except ImportError:
        visdom = None
    if visdom is None:
        print("visdom is not installed: no live dashboard (pip install visdom, or pass --no_visdom)")
        return None
    dash = Dashboard(config.visdom_server, config.visdom_port, config.version, windows(config))
    dash.wait_connected(timeout=3.0)  # it prints the run's address when it connects, now or later
    trainer.attach_dashboard(dash)
    return dash


def main(argv=None):
    """Check every input, hold the run folder (one run per folder), build, train."""
    config = parse_args(argv, world_size=dist_info().world_size)  # the run's one config, from here on read only
    try:
        info, device = setup_distributed(config.device)
    except ValueError as e:  # a --device that torchrun's ranks cannot share
        raise UserError(str(e)) from None
    say = print if info.is_main else (lambda *a, **k: None)  # rank 0 speaks for all
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no CUDA GPU in use"
    ranks = f" | {info.world_size} processes, global batch {config.batch_size * info.world_size}" \
        if info.enabled else ""
    say(f"device: {device} ({where}){ranks}")
    say(f"precision: {config.precision} ({config.precision_reason})")
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
        dataset = dataset_for(config)
        check_data_size(len(dataset), config)
        trainer = Trainer(config, dataset, device, info)
    except (ValueError, FileNotFoundError) as e:  # the data's and the trainer's checks
        raise UserError(str(e)) from None
    say(f"data: {config.dataset}, {len(dataset)} images at {config.imsize}px | "
        f"run folder: {trainer.run_dir} | attention G {flag_text(config.g_attn)}, D {flag_text(config.d_attn)}")
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
    shown = f", dashboard {dashboard.url}" if dashboard and dashboard.connected else ""  # its own env
    say(f"done: step {trainer.step}, checkpoint {last}, samples in {trainer.sample_dir}{shown}")


if __name__ == "__main__":
    run("main.py", main)
