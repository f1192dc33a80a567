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
    r = run_tool("tools.bench", *SMOKE, "--steps", "2", "--warmup", "1", "--device", "cpu", "--rows", "fp32,bf16",
                 "--peak_size", "256")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("img_per_s", "s_per_step", "peak_mem_mb", "speedup_vs_naive", "config", "gflop_per_step",
                "matmul_peak_gflops", "cpu_flags", "bf16_units"):
        assert key in result
    assert result["config"]["imsize"] == 32 and result["config"]["g_attn"] == [8, 16]
    assert result["naive"]["img_per_s"] > 0 and result["peak_mem_mb"] > 0
    assert len(result["per_step_s"]["fp32"]) == len(result["per_step_s"]["bf16"]) == 2
    assert any(line.startswith("speed-up of fp32 vs the naive SAGAN") for line in lines)
    assert lines[0].startswith("machine: ") and "bf16 units:" in lines[0]
    # the limit: counted FLOP per step, achieved GFLOP/s and the fraction of the measured peak agree
    assert result["gflop_per_step"] > 0.01 and min(result["matmul_peak_gflops"].values()) > 0
    for name, prec in (("fp32", "fp32"), ("bf16", "bf16")):
        row = result["rows"][name]
        assert row["precision"] == prec
        assert row["gflop_per_s"] == pytest.approx(result["gflop_per_step"] / row["s_per_step"], rel=0.05, abs=0.1)
        assert row["fraction_of_peak"] == pytest.approx(row["gflop_per_s"] / result["matmul_peak_gflops"][prec],
                                                        rel=0.05, abs=1e-3)
    assert "ratio_to_first" in result["rows"]["bf16"] and len(result["rows"]["bf16"]["ratio_range"]) == 2


def test_bench_counts_the_cpu_attention_kernel():
    from tools.bench import SDPA_CPU_FLOPS
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(2, 1, 512, 32, requires_grad=True)  # N = 512: the CPU flash kernel
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=1.0).sum().backward()
    forward = 2 * (2 * 2 * 512 * 512 * 32)  # q.k and attention.v for B = 2, 2 FLOP per multiply-add
    assert counter.get_total_flops() == forward * 7 // 2  # + the backward's 2.5x (torch's formula)


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "tools.bench: error: --steps, --peak_size and --peak_repeats must be positive"),
    (["--rows", "fp32,bf8"], "tools.bench: error: --rows 'bf8': a row is one of fp32, bf16, fp16, auto"),
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


def test_gpu_checks_that_take_a_device_pass_on_cpu(capsys):
    """The CUDA path is the same autocast code: what of tools.gpu_check runs on CPU passes here."""
    from tools import gpu_check
    gpu_check.failures.clear()
    gpu_check.spectral_norm_stays_fp32(torch.device("cpu"))
    out = capsys.readouterr().out
    assert gpu_check.failures == [] and "PASS  spectral norm in fp32 under bfloat16 autocast on cpu" in out


def test_bench_explicit_attn_row_materialises_every_map_then_restores_the_limit():
    import sagan_models
    from tools.bench import explicit_attention
    limit = sagan_models.CPU_EXPLICIT_MAX_N
    q, k, v = torch.randn(2, 4, 1024), torch.randn(2, 4, 1024), torch.randn(2, 32, 1024)  # 32x32 > the limit
    seen = {}

    def step(real):
        seen["limit"] = sagan_models.CPU_EXPLICIT_MAX_N
        seen["out"] = sagan_models.attention_output(q, k, v)
        raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError):
        explicit_attention(step)(None)
    assert seen["limit"] >= 1024 and sagan_models.CPU_EXPLICIT_MAX_N == limit  # restored after a failure too
    explicit = torch.bmm(torch.bmm(q.transpose(1, 2), k).softmax(-1), v.transpose(1, 2))
    torch.testing.assert_close(seen["out"], explicit)
    r = run_tool("tools.bench", *SMOKE, "--steps", "1", "--warmup", "0", "--device", "cpu", "--only", "ours",
                 "--rows", "fp32,fp32+explicit_attn", "--peak_size", "64", "--peak_repeats", "1")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout.strip().splitlines()[-1])["rows"]) == {"fp32", "fp32+explicit_attn"}
