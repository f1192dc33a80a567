"""What the test files share: the repository root, the tiny training run, a free port, one-thread
subprocesses. (The repository root is importable through pytest.ini's `pythonpath = .`.)"""
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tiny run every test trains: main.py's smoke preset (built-in faces, 32px, widths 8, z_dim 16,
# batch 4, 2 steps, no dashboard). Flags after it win over the preset's values.
SMOKE = ["--preset", "smoke"]


def free_port():
    """A loopback TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env(**extra):
    """The environment for a subprocess that trains: the CI box has 2 cores, and torch's spinning
    threads only fight over them (tiny steps get 10-50x slower under load)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
