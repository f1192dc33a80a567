"""Self-describing checkpoints: one dict per file, written atomically, read without unpickling code.

A checkpoint holds the config, both networks' architecture arguments and weights, the EMA generator
(`G_ema`, when kept), both optimizers, the step and every RNG state, so a Generator can be rebuilt from the file alone and a run resumed
exactly. `latest.pt` is a hard link to the newest complete checkpoint, swapped in by rename.
"""
import os
import pickle
import re
import shutil
import zipfile
from typing import NamedTuple, Optional

import torch

import seed_formats
from cli import UserError
from sagan_models import Discriminator, Generator

CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
TEMP_RE = re.compile(r"^\..+\.tmp(\d+)$")  # atomic_save / point_latest temporaries: .<name>.tmp<pid>


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says which file and why."""


def ckpt_name(step):
    return f"ckpt_{step:07d}.pt"


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, mode, write):
    """write(file) into a temporary file beside `path`, fsync, then rename over `path`.

    A crash or a full disk leaves either the old file or the new one, never half of one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_save(obj, path):
    """torch.save `obj` to `path` atomically."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    """Replace a small text file (metrics, config) so that a kill leaves the old or the new one."""
    _atomic_write(path, "w", lambda f: f.write(text))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(run_dir):
    """Delete temporaries a killed run left behind (each can be a whole checkpoint's worth of disk);
    never those of a live process."""
    for name in os.listdir(run_dir):
        m = TEMP_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(run_dir, name))
            except FileNotFoundError:
                pass


def point_latest(run_dir, path):
    """Make run_dir/latest.pt the file at `path` (hard link, else copy), replaced atomically."""
    latest = os.path.join(run_dir, "latest.pt")
    tmp = os.path.join(run_dir, f".latest.pt.tmp{os.getpid()}")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, latest)
    _fsync_dir(run_dir)
    return latest


def save_checkpoint(state, run_dir, keep_last=0):
    """Write run_dir/ckpt_<step>.pt and point latest.pt at it; keep only the newest `keep_last`
    step files when keep_last > 0, and never the file just written (after resuming from an older
    step, files of later steps from the abandoned run can be 'newer' by name)."""
    path = os.path.join(run_dir, ckpt_name(state["step"]))
    atomic_save(state, path)
    point_latest(run_dir, path)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != path:
                os.remove(old)
    return path


def _step_files(run_dir):
    """(step, file name) of every step checkpoint in run_dir, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted((int(m.group(1)), f) for f in os.listdir(run_dir) if (m := CKPT_RE.match(f)))


def list_checkpoints(run_dir):
    """Step checkpoints in run_dir, oldest first."""
    return [os.path.join(run_dir, f) for _, f in _step_files(run_dir)]


def saved_steps(run_dir):
    """The steps run_dir holds checkpoints of, oldest first."""
    return [step for step, _ in _step_files(run_dir)]


def load_checkpoint(path, map_location="cpu", seed_files=False):
    """Load a checkpoint dict with weights_only=True; every failure is a one-line CheckpointError.
    seed_files: a bare state dict (a seed repository's generator file) is returned too, for
    load_models to map (seed_formats.py)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: exactly what a
        # crafted file wants. Quote only the part that names what the file asked for.
        found = (re.search(p, str(e)) for p in (r"GLOBAL [\w.]+", r"Unsupported [^\n.]+"))
        asked = next((m.group(0) for m in found if m), "not a weights-only file")
        raise CheckpointError(
            f"refusing to load {path!r}: it holds Python objects other than tensors and plain "
            f"containers, which could run code when unpickled ({asked}); nothing in it was run. "
            f"Load only checkpoints written by this project") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if seed_files and seed_formats.is_state_dict(ckpt):
        return ckpt
    if not isinstance(ckpt, dict) or not ("G" in ckpt or "G_ema" in ckpt) or "model_args" not in ckpt:
        raise CheckpointError(f"{path!r} is not a checkpoint of this project (no 'G' / 'model_args'); "
                              f"a seed repository's '<step>_G.pth' / '<step>-G.ckpt' opens with "
                              f"load_models and the explorer, but cannot be resumed or exported")
    return ckpt


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _reason(e):
    """'TypeName: message' on one line and short, as a one-line error quotes an exception (the
    message of load_state_dict puts what does not fit on the lines after its first)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _rebuild(path, ckpt, cls, arch, weights):
    """cls(**ckpt['model_args'][arch]) with the state dict ckpt[weights] loaded, in eval mode."""
    damaged = "the file is damaged or not a checkpoint of this project"
    model_args = ckpt["model_args"]
    if not isinstance(model_args, dict) or arch not in model_args:
        found = f"keys {sorted(map(str, model_args))}" if isinstance(model_args, dict) else type(model_args).__name__
        raise CheckpointError(f"{path!r}: its model_args has no {arch!r} (found {found:.80}); {damaged}")
    args = model_args[arch]
    if not isinstance(args, dict):
        raise CheckpointError(f"{path!r}: model_args[{arch!r}] is {type(args).__name__}, not a dict of "
                              f"architecture arguments; {damaged}")
    # a crafted or damaged file can hold anything here: only ints and lists of ints reach the constructor
    for k, v in args.items():
        if not (isinstance(k, str) and (_is_int(v) or isinstance(v, list) and all(map(_is_int, v)))):
            raise CheckpointError(f"{path!r}: model_args[{arch!r}][{k!r}] is {v!r:.40} ({type(v).__name__}), "
                                  f"not an integer or a list of integers; {damaged}")
    state = ckpt.get(weights)
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path!r}: {weights!r} is not a state dict of tensors; {damaged}")
    try:
        net = cls(**args)
        net.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:  # unknown argument, bad size, weights that don't fit
        raise CheckpointError(f"{path!r}: cannot rebuild {weights} from the stored architecture "
                              f"model_args[{arch!r}] ({_reason(e)})") from None
    return net.eval()


class Models(NamedTuple):
    """The networks of a checkpoint, as load_models rebuilds them."""
    G: Generator
    D: Optional[Discriminator]  # None unless asked for
    step: Optional[int]
    ema: bool                   # G holds the EMA weights (G_ema)
    config: dict                # the run's config, as saved
    source: Optional[str] = None  # the seed repository that saved a seed-format file

    @property
    def generator(self):
        """How messages, figure titles and tables name the G they show."""
        if self.source:
            return f"G of {self.source}"
        return "EMA G" if self.ema else "raw G"


def load_models(path, device="cpu", ema=True, with_d=False, verbose=True):
    """Rebuild the networks of a checkpoint from the file alone, weights loaded, in eval mode: the
    one way every command, the explorer and the experiments open a checkpoint.

    G holds the EMA generator's weights when the checkpoint has them and `ema` is true (the better
    samples, and the generator the run's sample grids and dashboard showed), the raw trained G
    otherwise; says which unless `verbose` is false. D only `with_d`; with_d=None: D when the file
    has one. A generator file of a seed repository opens too, as its G (seed_formats.py). Every
    failure is a one-line CheckpointError naming the file.
    """
    ckpt = load_checkpoint(path, seed_files=True)
    if seed_formats.is_state_dict(ckpt):
        return _seed_models(path, ckpt, device, with_d, verbose)
    config, step = ckpt.get("config", {}), ckpt.get("step")
    if not isinstance(config, dict) or not (step is None or _is_int(step)):
        raise CheckpointError(f"{path!r}: its 'config' is not a dict or its 'step' not an integer; the "
                              f"file is damaged or not a checkpoint of this project")
    use_ema = ema and "G_ema" in ckpt
    if not use_ema and "G" not in ckpt:
        raise CheckpointError(f"{path!r} is an exported model holding only the EMA generator: "
                              f"open it without --raw_g (ema=True)")
    if with_d and "D" not in ckpt:
        raise CheckpointError(f"{path!r} holds no discriminator: open it without the D layers "
                              f"(--with_d / --d_image / with_d=True need a training checkpoint)")
    G = _rebuild(path, ckpt, Generator, "G", "G_ema" if use_ema else "G").to(device)
    with_d = with_d or with_d is None and "D" in ckpt
    D = _rebuild(path, ckpt, Discriminator, "D", "D").to(device) if with_d else None
    if verbose:
        if use_ema:
            print(f"{path}: EMA generator weights (decay {config.get('ema_decay')}); "
                  f"ema=False / --raw_g for the raw G")
        else:
            print(f"{path}: raw generator weights" + ("" if ema else " (EMA not requested)")
                  + ("" if "G_ema" in ckpt else " (no EMA in this checkpoint)"))
    return Models(G, D, step, use_ema, config)


def _seed_models(path, state, device, with_d, verbose):
    """load_models for a seed repository's generator file: its G, spectral norm folded in."""
    try:
        G, source = seed_formats.to_generator(state)
    except seed_formats.NotASeedGenerator as e:
        raise CheckpointError(f"{path!r} is {e}") from None
    if with_d:
        raise CheckpointError(f"{path!r} is a generator saved by {source} and holds no discriminator: "
                              f"open it without the D layers (--with_d / --d_image / with_d=True)")
    if verbose:
        print(f"{path}: the generator of {source} (z_dim {G.z_dim}; its spectral norm folded into the "
              f"weights, no EMA)")
    return Models(G.to(device), None, seed_formats.step_from_name(path), False, {}, source)


def load_generator(path, device="cpu", ema=True, verbose=True):
    """The Generator of a checkpoint, EMA weights unless ema=False: load_models' G."""
    return load_models(path, device, ema=ema, verbose=verbose).G


# ----------------------------------------------------------------------------- sharing a model

ROOT = os.path.dirname(os.path.abspath(__file__))
SHOWCASE = os.path.join(ROOT, "assets", "showcase_celeba64.pt")  # tools/showcase.py makes it


def export_models(path, out, with_d=True):
    """A small copy of a checkpoint for sharing: the EMA generator (the raw G when there is none)
    and, `with_d`, D, in fp16, with the step, config and model_args; no optimizer or RNG state, so
    it can be explored but not resumed. load_models opens it like any checkpoint."""
    def half(state):
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    ckpt = load_checkpoint(path)
    small = dict(step=ckpt.get("step"), config=ckpt.get("config", {}), exported_from=os.path.basename(path),
                 model_args=ckpt["model_args"])
    small["G_ema" if "G_ema" in ckpt else "G"] = half(ckpt.get("G_ema", ckpt.get("G")))
    if with_d:
        small["D"] = half(ckpt["D"])
    atomic_save(small, out)
    return out


def find_checkpoint(path=None, runs="models"):
    """(checkpoint, why) the explorer opens: `path` when given, else $SAGAN_CHECKPOINT, else the
    newest local run's latest.pt under `runs`, else the showcase model shipped in assets/."""
    if path:
        return path, "given"
    if os.environ.get("SAGAN_CHECKPOINT"):
        return os.environ["SAGAN_CHECKPOINT"], "from $SAGAN_CHECKPOINT"
    local = [p for p in (os.path.join(runs, d, "latest.pt") for d in sorted(os.listdir(runs)))
             if os.path.isfile(p)] if os.path.isdir(runs) else []
    if local:
        return max(local, key=os.path.getmtime), f"the newest run under {runs}/"
    if os.path.isfile(SHOWCASE):
        return SHOWCASE, "no --checkpoint and no local run: the showcase model shipped in assets/"
    raise CheckpointError(f"no checkpoint given, no run under {runs!r} and no showcase model at "
                          f"{SHOWCASE!r}: pass --checkpoint (or set SAGAN_CHECKPOINT), or train one "
                          f"with `make demo`")
