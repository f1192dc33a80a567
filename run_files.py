"""Run-folder mechanics: atomic file writes, the temporaries a killed run leaves, the one-run lock.

What a file holds is its owner's business (checkpoint.py, metrics.py, config.py); this module only
makes sure that a kill or a full disk leaves the old file or the new one, never half of one, and that
two training runs never write into one run folder.
"""
import fcntl
import os
import re
import socket
import sys
import time

import torch

from cli import UserError

TEMP_RE = re.compile(r"^\..+\.tmp(\d+)$")  # atomic_write / point_latest temporaries: .<name>.tmp<pid>


def fsync_dir(folder):
    """fsync a folder: a rename or a new file in it survives a power cut."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, mode, write):
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
    fsync_dir(folder)


def atomic_save(obj, path):
    """torch.save `obj` to `path` atomically."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    """Replace a small text file (metrics, config) so that a kill leaves the old or the new one."""
    atomic_write(path, "w", lambda f: f.write(text))


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
