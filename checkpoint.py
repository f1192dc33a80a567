"""Self-describing checkpoints: one dict per file, written atomically, read without unpickling code.

A checkpoint holds the config, both networks' architecture arguments and weights, the EMA generator
(`G_ema`, when kept), both optimizers, the step and every RNG state, so a Generator can be rebuilt from the file alone and a run resumed
exactly. `latest.pt` is a hard link to the newest complete checkpoint, swapped in by rename. One
training process at a time holds a run folder (`RunLock`).
"""
import fcntl
import inspect
import os
import pickle
import re
import shutil
import socket
import sys
import time
import warnings

import torch

from cli import UserError, reason
from sagan_models import Discriminator, Generator, check_attn, check_imsize

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


class RunLock:
    """`with RunLock(run_dir):` one training run per run folder, or a UserError naming the run that
    holds it. Two runs of one folder would overwrite each other's checkpoints and metrics.

    The lock is a POSIX record lock (fcntl.lockf) on run_dir/run.lock. The kernel drops it when the
    process ends, however it ends, so a run killed with SIGKILL never blocks --resume and there is
    no stale lock to clean up. Not flock: its lock is shared with forked DataLoader workers, which
    outlive a killed run by seconds. The file says who holds it, for the second run's message.
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, "run.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: another process holds it
            holder = self._holder()
            os.close(self.fd)
            raise UserError(f"run folder {run_dir!r} is in use by {holder}: a second run there would "
                            f"overwrite its checkpoints and metrics. Wait for it to finish or stop it "
                            f"(Ctrl-C or kill -INT: it saves first), or pass another --version") from None
        except OSError as e:  # a file system without locks (ENOLCK): train, as before there was a lock
            print(f"run folder {run_dir!r} cannot be locked ({e.strerror}): nothing stops a second run "
                  f"there from overwriting this one's files", file=sys.stderr)
            return
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())

    def _holder(self):
        # read through our own descriptor: the holder writes its line just after locking
        for _ in range(50):
            text = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.01)
        return "another process (it has not written its pid yet)"

    def release(self):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the file no longer names a holder
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


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


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict with weights_only=True and check that it is one this project wrote;
    every failure is a one-line CheckpointError naming the file."""
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
    check_contents(ckpt, path)
    return ckpt


# what every checkpoint of this project holds (Trainer.state) and its readers rely on; also G_ema
# (a dict of tensors) when the run kept an EMA, and the fp16 loss scalers' states
CONTENTS = dict(step=int, config=dict, model_args=dict, G=dict, D=dict, opt_g=dict, opt_d=dict,
                fixed_z=torch.Tensor, rng=dict)
NETWORKS = dict(G=Generator, D=Discriminator)  # model_args key -> the class the arguments rebuild


def check_contents(ckpt, path):
    """Raise CheckpointError unless `ckpt` has the keys and types a checkpoint of this project has,
    and model_args that rebuild both networks: what a reader uses is checked once, here, instead of
    failing with a TypeError half way through rebuilding a network."""
    missing = [k for k in CONTENTS if k not in ckpt] if isinstance(ckpt, dict) else []
    if missing or not isinstance(ckpt, dict):
        what = f"no {' / '.join(map(repr, missing))}" if missing else f"a {type(ckpt).__name__}, not a dict"
        raise CheckpointError(f"{path!r} is not a checkpoint of this project ({what}); seed-repo "
                              f"'*_G.pth' files hold only a state dict of another architecture")
    for key, kind in CONTENTS.items():
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise CheckpointError(f"{path!r} is damaged: its {key!r} is {ckpt[key]!r:.60}, not "
                                  f"{'an integer' if kind is int else 'a ' + kind.__name__}")
    for key in ("G", "D", "G_ema"):
        weights = ckpt.get(key, {})
        if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise CheckpointError(f"{path!r} is damaged: its {key!r} is not a dict of tensors")
    if "G_ema" in ckpt and _shapes(ckpt["G_ema"]) != _shapes(ckpt["G"]):  # two copies of one network
        raise CheckpointError(f"{path!r} is damaged: its 'G_ema' and 'G' weights differ in names or shapes")
    for name in NETWORKS:
        check_model_args(ckpt["model_args"].get(name), name, path)


def _shapes(weights):
    return {k: tuple(t.shape) for k, t in weights.items()}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_model_args(args, name, path):
    """Raise CheckpointError unless `args` are arguments the network `name` ('G' or 'D') takes, of
    the types it needs: positive integers, and attn_res a list of resolutions that fit the image."""
    cls, what = NETWORKS[name], f"{path!r}: model_args[{name!r}]"
    if not isinstance(args, dict):
        raise CheckpointError(f"{what} is a {type(args).__name__}, not the {cls.__name__}'s arguments")
    takes = inspect.signature(cls).parameters
    for arg, value in args.items():
        if arg not in takes:
            raise CheckpointError(f"{what} has {arg!r}, which the {cls.__name__} does not take "
                                  f"(it takes {', '.join(takes)})")
        if arg == "attn_res":
            ok, need = isinstance(value, (list, tuple)) and all(map(_is_int, value)), "a list of integers"
        else:
            ok, need = _is_int(value) and value > 0, "a positive integer"
        if not ok:
            raise CheckpointError(f"{what}[{arg!r}] is {value!r:.60}, not {need}")
    try:
        image_size = args.get("image_size", takes["image_size"].default)
        check_imsize(image_size)
        check_attn(image_size, args.get("attn_res", takes["attn_res"].default), name.lower())
    except ValueError as e:
        raise CheckpointError(f"{what} cannot build a {cls.__name__}: {e}") from None


def restore(apply, ckpt, key, path):
    """apply(ckpt[key]), e.g. G.load_state_dict or set_rng_state; a stored state that does not fit
    what it should restore is a CheckpointError naming the file and the part."""
    try:
        apply(ckpt[key])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path!r}: its {key!r} cannot be restored ({reason(e, 200)}); the file "
                              f"is damaged: use another checkpoint") from None


def load_generator(path, device="cpu", ema=True, verbose=True):
    """Rebuild the Generator of a checkpoint from the file alone, weights loaded, in eval mode.

    Uses the EMA generator's weights when the checkpoint has them and `ema` is true (the better
    samples), the raw trained G otherwise; says which unless `verbose` is false.
    """
    ckpt = load_checkpoint(path)
    use_ema = ema and "G_ema" in ckpt
    G = Generator(**ckpt["model_args"]["G"])
    try:
        G.load_state_dict(ckpt["G_ema"] if use_ema else ckpt["G"])
    except RuntimeError as e:
        raise CheckpointError(f"{path!r}: weights do not fit the stored architecture "
                              f"({str(e).splitlines()[0][:160]})") from None
    if verbose:
        if use_ema:
            print(f"{path}: EMA generator weights (decay {ckpt['config'].get('ema_decay')}); "
                  f"ema=False / --raw_g for the raw G")
        else:
            print(f"{path}: raw generator weights" + ("" if ema else " (EMA not requested)")
                  + ("" if "G_ema" in ckpt else " (no EMA in this checkpoint)"))
    return G.to(device).eval()
