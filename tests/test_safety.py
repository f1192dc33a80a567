"""Nothing lost: kills, signals, exact resume, bad images, divergence, hostile checkpoints, disk.

Real runs of main.py (subprocesses where a signal or an OS limit is the point, in-process
otherwise to save torch's start-up time), real files, real JPEGs; no mocks.
"""
import io
import json
import os
import pickle
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_generator  # noqa: E402
from data_loader import ImageFolderFlat, synthetic_face  # noqa: E402
from utils import rng_state  # noqa: E402

TINY = ["--dataset", "synthetic", "--imsize", "32", "--g_conv_dim", "8", "--d_conv_dim", "8",
        "--batch_size", "4", "--synthetic_size", "64", "--n_samples", "4", "--num_workers", "0",
        "--no_visdom", "--log_step", "1", "--sample_step", "100000"]


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: torch's second spinning thread makes tiny steps 10-50x slower under load
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def out_args(tmp_path, version="run"):
    return ["--model_save_path", str(tmp_path / "models"), "--sample_path", str(tmp_path / "samples"),
            "--version", version]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def spawn(args, log, **kw):
    """main.py in a subprocess, output to the file `log` (a pipe nobody reads would fill and block)."""
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=env(),
                                stdout=f, stderr=subprocess.STDOUT, **kw)


def run_inprocess(args):
    """main.main(args); returns the exit message/code of a SystemExit, else None."""
    try:
        main.main(args)
    except SystemExit as e:
        return e.code
    return None


def metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


LOSSES = ("d_loss_real", "d_loss_fake", "d_loss", "g_loss")


def wait_for(cond, timeout, proc=None, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- 1. SIGKILL

# Importing torch takes seconds on a loaded machine, a tiny training step milliseconds. To kill many
# runs in a test's time, one process imports main.py once and forks a fresh training process per
# run (before any torch op, so no thread pool is forked); it SIGKILLs and reaps them on request.
FORK_SERVER = r"""
import json, os, signal, sys
sys.path.insert(0, os.getcwd())
import main
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd[0] == "run":
        pid = os.fork()
        if pid == 0:
            fd = os.open(cmd[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1), os.dup2(fd, 2)
            code = 0
            try:
                main.main(cmd[1])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        print(pid, flush=True)
    else:
        if cmd[0] == "kill":
            os.kill(cmd[1], signal.SIGKILL)
        _, status = os.waitpid(cmd[1], 0)
        print(status, flush=True)
"""


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=ROOT, env=env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, *cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def run(self, args, log):
        return self._ask("run", args, str(log))

    def kill(self, pid):
        """SIGKILL, then reap: when this returns the process is gone."""
        status = self._ask("kill", pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    def wait(self, pid):
        """The exit code of a run that ends by itself."""
        return os.waitstatus_to_exitcode(self._ask("wait", pid))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


KILL_SECONDS = float(os.environ.get("SAFETY_KILL_SECONDS", 15))  # longer for a report's numbers


def test_sigkill_at_random_moments_latest_always_loads_and_resume_continues(tmp_path):
    """Saves every step; kill -9 at random moments, many times (some land mid-save: a temporary
    is left behind). After every kill latest.pt loads and the next run resumes from it."""
    run_dir = tmp_path / "models" / "run"
    latest = run_dir / "latest.pt"
    args = TINY + out_args(tmp_path) + ["--model_save_step", "1", "--total_step", "100000"]
    rng = random.Random(0)
    tried = survived = mid_save = 0
    step = 0
    server = ForkServer()
    t0 = None
    try:
        while tried < 8 or time.time() - t0 < KILL_SECONDS:
            before = latest.stat().st_ino if latest.exists() else None  # a save = a new inode
            pid = server.run(args + (["--resume"] if tried else []), tmp_path / "log.txt")
            t0 = t0 or time.time()  # the server's one import of torch is not part of the budget
            wait_for(lambda: latest.exists() and latest.stat().st_ino != before, 60, what="a save")
            time.sleep(rng.uniform(0, 0.3))
            server.kill(pid)
            tried += 1
            mid_save += any(".tmp" in n for n in os.listdir(run_dir))
            ckpt = load_checkpoint(str(latest))  # must load after every kill
            assert ckpt["step"] >= step
            step = ckpt["step"]
            load_generator(str(latest))
            survived += 1
        # the last resume runs to the end: every step logged once, in order, no gap
        total = step + 3
        log = tmp_path / "last.txt"
        pid = server.run(args[:-2] + ["--total_step", str(total), "--resume"], log)
        assert server.wait(pid) == 0, log.read_text()
    finally:
        server.close()
    assert f"resumed from {latest} at step {step}" in log.read_text()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, total + 1))
    assert load_checkpoint(str(latest))["step"] == total
    assert not [n for n in os.listdir(run_dir) if ".tmp" in n], "stale temporaries were not cleaned"
    print(f"\nSIGKILL: survived {survived}/{tried} kills ({mid_save} landed inside a save: a "
          f"half-written temporary was left) in {time.time() - t0:.0f} s; went on to step {total}")
