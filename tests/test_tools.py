"""The developers' tools run as modules from the repository root: the benchmark reports both
implementations, bad flags end in one line, the GPU check says plainly that it needs a GPU."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMOKE


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_bench_prints_both_implementations_and_a_json_last_line():
    r = run_tool("tools.bench", *SMOKE, "--steps", "2", "--warmup", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("img_per_s", "s_per_step", "peak_mem_mb", "speedup_vs_naive", "config"):
        assert key in result
    assert result["config"]["imsize"] == 32 and result["config"]["g_attn"] == [8, 16]
    assert result["naive"]["img_per_s"] > 0 and result["peak_mem_mb"] > 0
    assert len(result["per_step_s"]["ours"]) == 2
    assert any(line.startswith("speed-up vs the naive SAGAN") for line in lines)


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "tools.bench: error: --steps must be positive"),
    (["--imsize", "48"], "main.py: error: image size must be a power of two"),  # main.py's flags, main.py's check
])
def test_bench_bad_flags_are_one_line(args, message):
    r = run_tool("tools.bench", *args, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert message in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run python -m tools.gpu_check itself")
def test_gpu_check_says_plainly_that_it_needs_a_gpu():
    r = run_tool("tools.gpu_check", timeout=120)
    assert r.returncode == 1 and "no CUDA GPU here" in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
