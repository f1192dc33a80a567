"""Self-describing checkpoints: what one holds, saving and rotating them, loading, checking, rebuilding.

A checkpoint is one dict: the config, both networks' architecture arguments and weights, the EMA
generator (`G_ema`, when kept), both optimizers, the step and every RNG state, so a Generator can be
rebuilt from the file alone and a run resumed exactly. It is written atomically (run_files.py) and
read with weights_only=True (no unpickled code runs). `latest.pt` is a hard link to the newest
complete checkpoint, swapped in by rename.
"""
import os
import pickle
import re
import shutil
import warnings
from typing import NamedTuple, Optional

import torch

import seed_formats
from cli import UserError, reason
from config import flag_text
from run_files import atomic_save, fsync_dir
from sagan_models import Discriminator, Generator

CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says which file and why."""


def ckpt_name(step):
    return f"ckpt_{step:07d}.pt"


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
    fsync_dir(run_dir)
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


def load_checkpoint(path, map_location="cpu", training=False, seed_files=False):
    """Load a checkpoint dict with weights_only=True and check that it is one this project wrote
    (with `training`, one a run can resume from); every failure is a one-line CheckpointError
    naming the file. seed_files: a bare state dict (a seed repository's generator file) is
    returned too, for load_models to map (seed_formats.py)."""
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path!r} {what}")
    try:
        with warnings.catch_warnings():  # the safe unpickler's advice on odd files: our error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: exactly what a
        # crafted file wants. Quote only the part that names what the file asked for.
        if m := re.search(r"GLOBAL [\w.]+", str(e)):
            what = (f"it holds Python objects other than tensors and plain containers, which could "
                    f"run code when unpickled ({m.group(0)})")
        else:  # an opcode the safe unpickler lacks: random bytes as often as another pickle format
            m = re.search(r"Unsupported [^\n.]+", str(e))
            what = (f"it is not a weights-only torch file ({m.group(0) if m else reason(e)}): corrupt, "
                    f"another format, or a pickle of objects that could run code")
        raise CheckpointError(f"refusing to load {path!r}: {what}; nothing in it was run. "
                              f"Load only checkpoints written by this project") from None
    except PermissionError as e:
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({e.strerror}); check its "
                              f"permissions") from None
    except Exception as e:  # on bad bytes torch's readers raise nearly anything (EOFError, OSError,
        # KeyError, UnicodeDecodeError, ...); none of it is a bug of ours, and nothing in the file ran
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated ({reason(e, 120)}); "
                              f"use another checkpoint, e.g. an earlier ckpt_*.pt of the run") from None
    if seed_files and seed_formats.is_state_dict(ckpt):
        return ckpt
    check_contents(ckpt, path, training)
    return ckpt


# what resuming a run needs besides the networks; an exported model (explorer.export_models) holds none of it
TRAINING_STATE = dict(step=int, G=dict, D=dict, opt_g=dict, opt_d=dict, fixed_z=torch.Tensor, rng=dict)
DAMAGED = "the file is damaged or not a checkpoint of this project"


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_contents(ckpt, path, training=False):
    """Raise CheckpointError unless `ckpt` holds what a checkpoint of this project holds, with the
    types every reader relies on (with `training`, all a resumed run needs): checked once, here,
    rather than failing with a TypeError half way through rebuilding a network or resuming."""
    if not isinstance(ckpt, dict) or not ("G" in ckpt or "G_ema" in ckpt) or "model_args" not in ckpt:
        raise CheckpointError(f"{path!r} is not a checkpoint of this project (no 'G' / 'model_args'); "
                              f"a seed repository's '<step>_G.pth' / '<step>-G.ckpt' opens with "
                              f"load_models and the explorer, but cannot be resumed or exported")
    missing = [k for k in TRAINING_STATE if k not in ckpt] if training else []
    if missing:
        raise CheckpointError(f"{path!r} holds no {' / '.join(map(repr, missing))}: it can be explored but "
                              f"not resumed (an exported model?); resume from a ckpt_*.pt of the run")
    step = ckpt.get("step")  # None in a model exported from a checkpoint without one
    if not isinstance(ckpt.get("config", {}), dict) or not (_is_int(step) or step is None and not training):
        raise CheckpointError(f"{path!r}: its 'config' is not a dict or its 'step' not an integer; {DAMAGED}")
    for key, kind in TRAINING_STATE.items():
        if key in ckpt and key != "step" and not isinstance(ckpt[key], kind):
            raise CheckpointError(f"{path!r}: its {key!r} is a {type(ckpt[key]).__name__}, not a "
                                  f"{kind.__name__}; {DAMAGED}")
    for weights in ("G", "G_ema", "D"):
        state = ckpt.get(weights, {})
        if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in state.items())):
            raise CheckpointError(f"{path!r}: {weights!r} is not a state dict of tensors; {DAMAGED}")
    if "G" in ckpt and "G_ema" in ckpt and _shapes(ckpt["G"]) != _shapes(ckpt["G_ema"]):
        raise CheckpointError(f"{path!r}: its 'G' and 'G_ema' (two copies of one network) differ in "
                              f"names or shapes; {DAMAGED}")
    for arch in ("G", "D") if "D" in ckpt else ("G",):
        check_model_args(ckpt["model_args"], arch, path)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def check_model_args(model_args, arch, path):
    """model_args[arch] must be a dict of integers and lists of integers: a crafted or damaged file
    can hold anything there, and only those reach a constructor (which checks the values)."""
    if not isinstance(model_args, dict) or arch not in model_args:
        found = f"keys {sorted(map(str, model_args))}" if isinstance(model_args, dict) else type(model_args).__name__
        raise CheckpointError(f"{path!r}: its model_args has no {arch!r} (found {found:.80}); {DAMAGED}")
    args = model_args[arch]
    if not isinstance(args, dict):
        raise CheckpointError(f"{path!r}: model_args[{arch!r}] is {type(args).__name__}, not a dict of "
                              f"architecture arguments; {DAMAGED}")
    for k, v in args.items():
        if not (isinstance(k, str) and (_is_int(v) or isinstance(v, list) and all(map(_is_int, v)))):
            raise CheckpointError(f"{path!r}: model_args[{arch!r}][{k!r}] is {v!r:.40} ({type(v).__name__}), "
                                  f"not an integer or a list of integers; {DAMAGED}")


def resume_path(run_dir, step=None):
    """The checkpoint a run resumes from: the one saved at `step`, else latest.pt; a CheckpointError
    listing the saved steps when it does not exist."""
    path = os.path.join(run_dir, ckpt_name(step) if step is not None else "latest.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"nothing to resume: {path!r} does not exist (saved steps: "
                              f"{', '.join(map(str, saved_steps(run_dir))) or 'none'}); check --version and "
                              f"--model_save_path, or start without --resume")
    return path


def check_architecture(ckpt, config, path):
    """A CheckpointError naming the flags, with their old and new values, where the architecture a
    checkpoint was trained with (its model_args) differs from `config`'s (a TrainConfig)."""
    differ = config.arch_differences(ckpt["model_args"])
    if differ:
        was = ", ".join(f"--{name} {flag_text(old)}" for name, (old, _) in differ.items())
        now = ", ".join(f"--{name} {flag_text(new)}" for name, (_, new) in differ.items())
        raise CheckpointError(f"{path!r} was trained with {was}; resume with the same architecture "
                              f"flags (now: {now})")


def restore(apply, ckpt, key, path):
    """apply(ckpt[key]), e.g. G.load_state_dict or set_rng_state; a stored state that does not fit
    what it should restore is a CheckpointError naming the file and the part."""
    try:
        apply(ckpt[key])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path!r}: its {key!r} cannot be restored ({reason(e, 200)}); the file "
                              f"is damaged: use another checkpoint") from None


def restore_optimizer(opt, ckpt, key, path):
    """opt.load_state_dict(ckpt[key]), then check that every stored moment has its parameter's shape.

    An optimizer's state is stored by parameter position, not name, so a network whose layers are
    registered in another order than when the file was saved loads without complaint, and the fused
    Adam step then writes past the ends of the misplaced buffers (a crash or corrupted memory, not
    an error). This turns that into a CheckpointError naming the file."""
    restore(opt.load_state_dict, ckpt, key, path)
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            for name, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    raise CheckpointError(
                        f"{path!r}: its {key!r} holds {name} of shape {tuple(value.shape)} for parameter {i}, "
                        f"which has shape {tuple(p.shape)}: the file was saved by code that orders the "
                        f"network's layers differently; resume it with that version of the code")


def _rebuild(path, ckpt, cls, arch, weights):
    """cls(**ckpt['model_args'][arch]) with the state dict ckpt[weights] loaded, in eval mode; the
    types were checked by load_checkpoint, the values are the constructor's to check."""
    try:
        net = cls(**ckpt["model_args"][arch])
        net.load_state_dict(ckpt[weights])
    except (TypeError, ValueError, RuntimeError) as e:  # unknown argument, bad size, weights that don't fit
        raise CheckpointError(f"{path!r}: cannot rebuild {weights} from the stored architecture "
                              f"model_args[{arch!r}] ({reason(e, 200)})") from None
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
