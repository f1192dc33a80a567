"""One run per run folder: a second main.py on a folder in use is refused at start, naming the first;
a run killed with SIGKILL leaves nothing that blocks --resume. Real processes, real signals."""
import json
import os
import signal
import socket
import subprocess

from checkpoint import list_checkpoints, load_checkpoint
from conftest import ROOT, main_command, metrics, one_thread_env, wait_for
from run_files import RunLock

ENV = one_thread_env(PYTHONUNBUFFERED="1")


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_finishes_intact(tmp_path):
    run_dir = tmp_path / "models" / "smoke"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(main_command(tmp_path, "--total_step", "12", "--model_save_step", "4"), cwd=ROOT,
                             env=ENV, stdout=log, stderr=subprocess.STDOUT)
    lock = run_dir / "run.lock"
    wait_for(lambda: lock.exists() and f"pid {first.pid} " in lock.read_text(), 180, "the first run's lock",
             proc=first)
    os.kill(first.pid, signal.SIGSTOP)  # holds the folder for as long as the second run needs to start
    try:
        second = subprocess.run(main_command(tmp_path, "--total_step", "12"), cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"main.py: error: run folder {str(run_dir)!r} is in use by "
                                                   f"pid {first.pid} on {socket.gethostname()} since "), lines
    assert "--version" in lines[0], lines
    assert "step" not in second.stdout.replace("device", "")  # refused before building anything

    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))  # written once each, by the first run only
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(run_dir)] == [4, 8, 12]
    assert load_checkpoint(str(run_dir / "latest.pt"))["step"] == 12
    assert json.loads((run_dir / "config.json").read_text())["total_step"] == 12


def test_a_run_killed_with_sigkill_never_blocks_resume(tmp_path):
    """Its DataLoader worker outlives it for a few seconds: the lock must not be the worker's too."""
    run_dir = tmp_path / "models" / "smoke"
    log = open(tmp_path / "killed.log", "w")
    killed = subprocess.Popen(main_command(tmp_path, "--total_step", "100000", "--model_save_step", "2",
                                    "--num_workers", "1"), cwd=ROOT, env=ENV, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "latest.pt").exists(), 180, "a checkpoint", proc=killed)
        os.kill(killed.pid, signal.SIGKILL)  # the run only: its worker is left to notice by itself
        killed.wait(timeout=60)
        os.killpg(killed.pid, 0)  # the worker is still there (it looks for its parent every 5 s)...
        with RunLock(str(run_dir)):  # ...and the folder is free all the same
            pass
        step = load_checkpoint(str(run_dir / "latest.pt"))["step"]
        resumed = subprocess.run(main_command(tmp_path, "--resume", "--total_step", str(step + 2)), cwd=ROOT,
                                 env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        try:
            os.killpg(killed.pid, signal.SIGKILL)  # the orphaned worker, if it is still there
        except ProcessLookupError:
            pass
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {run_dir / 'latest.pt'} at step {step}" in resumed.stdout
    assert load_checkpoint(str(run_dir / "latest.pt"))["step"] == step + 2
