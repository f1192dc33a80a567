"""What the test files share: the repository root, the tiny training run, a free port, one-thread
subprocesses, a fork server for many fast command runs. (The repository root is importable through
pytest.ini's `pythonpath = .`.)"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# real CelebA faces, where the developers' shared data sits beside the checkout; tests skip without it
CELEBA_SAMPLE = ROOT.parent / "shared" / "data" / "celeba_sample"

# The tiny run every test trains: main.py's smoke preset (built-in faces, 32px, widths 8, z_dim 16,
# batch 4, 2 steps, no dashboard). Flags after it win over the preset's values.
SMOKE = ["--preset", "smoke"]


# the smoke run logging every step and drawing no sample grids: what in-process runs train
TINY = SMOKE + ["--sample_step", "100000"]


@pytest.fixture(scope="session", autouse=True)
def one_precision_probe(tmp_path_factory):
    """--precision auto (the default) probes bf16 against fp32 at every start unless a probe is cached,
    and a probe under load is never cached: two runs of one test could then choose differently (a
    resumed run and its uninterrupted twin must agree). So the session measures the probe once, for
    the in-process runs' thread count and for the subprocesses' one thread, and caches it in a cache
    folder of its own: every run of the session takes the real auto path and chooses the same."""
    import precision
    import torch
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    before = torch.get_num_threads()
    try:
        for threads in sorted({before, 1}):
            torch.set_num_threads(threads)
            precision.store_probe(precision.probe())
    finally:
        torch.set_num_threads(before)


def out_args(tmp_path, version="run"):
    """Flags that put a run's folders under tmp_path, as run `version`."""
    return ["--model_save_path", str(tmp_path / "models"), "--sample_path", str(tmp_path / "samples"),
            "--version", version]


def run_inprocess(args):
    """main.main(args) as `python main.py` ends it; returns the exit message/code of a SystemExit, else None."""
    import main
    from cli import run
    try:
        run("main.py", main.main, args)
    except SystemExit as e:
        return e.code
    return None


def whole_and_resumed(tmp_path, base, K, before_resume=None):
    """Train `base` (flags) 2K steps in one run ('whole') and as K steps, then --resume to 2K
    ('split'), in process; `before_resume()` runs between. Returns both runs' metrics records."""
    assert run_inprocess(base + out_args(tmp_path, "whole") + ["--total_step", str(2 * K)]) is None
    assert run_inprocess(base + out_args(tmp_path, "split") + ["--total_step", str(K)]) is None
    if before_resume:
        before_resume()
    assert run_inprocess(base + out_args(tmp_path, "split") + ["--total_step", str(2 * K), "--resume"]) is None
    return metrics(tmp_path / "models" / "whole"), metrics(tmp_path / "models" / "split")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (2 shared cores: a second spinning thread slows tiny steps)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def visdom_port(tmp_path_factory):
    """A real visdom server (the project's visdom_server) on a free loopback port for the module."""
    pytest.importorskip("visdom", reason="visdom is not installed")
    import visdom_server
    if visdom_server.missing_static():
        if not visdom_server.npm_available():
            pytest.skip("visdom static files not installed and npm not found; "
                        "run `python visdom_server.py --install_static` where npm is available")
        visdom_server.install_static(quiet=True)
    port = free_port()
    proc = visdom_server.start_server(port, env_path=tmp_path_factory.mktemp("visdom_env"))
    try:
        visdom_server.wait_until_up(port, timeout=30, proc=proc)
        yield port
    finally:
        visdom_server.stop_server(proc)


def main_command(tmp_path, *args):
    """`python main.py --preset smoke <args>`, run folders under tmp_path/models, samples under
    tmp_path/samples (later flags win, so `args` can move them)."""
    return [sys.executable, str(ROOT / "main.py"), *SMOKE, "--model_save_path", str(tmp_path / "models"),
            "--sample_path", str(tmp_path / "samples"), *map(str, args)]


def run_main(tmp_path, *args, check=True, timeout=300):
    """main_command run to its end in a real process (cwd tmp_path); the CompletedProcess, text
    output. check: fail unless it exits 0."""
    proc = subprocess.run(main_command(tmp_path, *args), cwd=tmp_path, env=one_thread_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(run_dir):
    """A run folder's metrics.jsonl, every line parsed (a half-written line fails the test)."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def wait_for(cond, timeout, what="condition", proc=None):
    """Poll cond() until it is true; fail after `timeout` seconds, or as soon as `proc` (a Popen)
    has ended, since then it never will be."""
    end = time.time() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def free_port():
    """A loopback TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env(**extra):
    """The environment for a subprocess that trains: the CI box has 2 cores, and torch's spinning
    threads only fight over them (tiny steps get 10-50x slower under load)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def smoke_main(flags, tmp_path):
    """main.py's smoke run with `flags`, its run folders under tmp_path, as a 1-thread subprocess:
    the CompletedProcess (text output captured)."""
    return subprocess.run([sys.executable, "main.py", *SMOKE, "--model_save_path", str(tmp_path / "m"),
                           "--sample_path", str(tmp_path / "s"), *flags], cwd=ROOT, env=one_thread_env(),
                          capture_output=True, text=True, timeout=300)


def trains_and_resumes(flags, tmp_path):
    """Assert that a smoke run with `flags` trains 2 steps, and resumes from them to step 3."""
    first = smoke_main([*flags, "--total_step", "2", "--model_save_step", "2", "--version", "p"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    more = smoke_main([*flags, "--total_step", "3", "--model_save_step", "1", "--version", "p", "--resume"], tmp_path)
    assert more.returncode == 0, more.stdout + more.stderr


# ----------------------------------------------------------------------------- a fork server

# Importing torch and the commands takes seconds on a loaded machine, a tiny run milliseconds. To
# start many real command processes in a test's time, one process imports the commands once and
# forks a fresh process per run (before any torch op, so no thread pool is forked). The child runs
# the command's file as __main__ with its arguments, so the command's own `run(PROG, main)` ends it,
# and exits with the status the interpreter would give. Each run is its own session (signals can go
# to its whole process group, DataLoader workers included) and may get an OS file-size limit.
FORK_SERVER = r"""
import json, os, resource, runpy, signal, sys, traceback
import main, visualize_attn, evaluate  # the imports every run would repeat (cwd, the root, is on sys.path)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd[0] == "run":
        _, script, args, out, err, fsize = cmd
        pid = os.fork()
        if pid == 0:
            os.setsid()
            for fd, log in ((1, out), (2, err)):
                os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
            if fsize:  # past it, write() fails with EFBIG, as on a full disk, instead of a SIGXFSZ kill
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            sys.argv = [script, *args]
            code = 0
            try:  # what `python script args` runs, then how the interpreter ends it
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                code = 0 if e.code is None else e.code
                if not isinstance(code, int):  # a message: printed, status 1
                    print(code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    else:  # kill and/or reap one run, or (pid -1) wait for any: its pid and wait status
        _, pid = cmd
        if cmd[0] == "kill":
            os.kill(pid, signal.SIGKILL)
        print(*os.waitpid(pid, 0), flush=True)
"""


class ForkServer:
    """Starts `python <command> args` runs fast (see FORK_SERVER); kills, reaps and waits for them."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=ROOT,
                                     env=one_thread_env(PYTHONUNBUFFERED="1"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.live = set()  # started runs not yet reaped: close() kills them (a failed test leaves none)

    def _ask(self, *cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return [int(x) for x in self.proc.stdout.readline().split()]

    def run(self, script, args, out, err=None, fsize=0):
        """Start `python script args`, stdout appended to the file `out`, stderr to `err` (default:
        `out` too; a pipe nobody reads would fill and block), at most `fsize` bytes per file written
        if given. Its pid, which is also its process group."""
        out = str(out)
        pid = self._ask("run", script, [str(a) for a in args], out, str(err or out), fsize)[0]
        self.live.add(pid)
        return pid

    def kill(self, pid):
        """SIGKILL, then reap: when this returns the process is gone."""
        _, status = self._ask("kill", pid)
        self.live.discard(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    def wait(self, pid):
        """The exit code of a run that ends by itself (-N: killed by signal N)."""
        status = self._ask("wait", pid)[1]
        self.live.discard(pid)
        return os.waitstatus_to_exitcode(status)

    def wait_any(self):
        """(pid, exit code) of the next run to end."""
        pid, status = self._ask("wait", -1)
        self.live.discard(pid)
        return pid, os.waitstatus_to_exitcode(status)

    def close(self):
        for pid in self.live:  # runs a failed test left going (e.g. a 100,000-step outage run)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fork_server():
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A real 32px checkpoint: 4 steps of main.py on the built-in data (the explorer's tests)."""
    tmp = tmp_path_factory.mktemp("explorer")
    run_main(tmp, "--total_step", "4", "--log_step", "2", "--sample_step", "4", "--model_save_step", "4",
             "--version", "t")
    path = tmp / "models" / "t" / "latest.pt"
    assert path.is_file()
    return str(path)


def explorer_cli(*args):
    """visualize_attn.main in this process, ended as the command ends it: (exit code, message)."""
    import visualize_attn
    from cli import run
    try:
        run("visualize_attn.py", visualize_attn.main, [str(a) for a in args])
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), str(e.code)
    return 0, ""


def is_png(path, min_wh=(200, 150)):
    """A PNG file of at least min_wh pixels (a figure, not an empty canvas)."""
    from PIL import Image
    with Image.open(path) as img:
        return img.format == "PNG" and img.size[0] >= min_wh[0] and img.size[1] >= min_wh[1]
