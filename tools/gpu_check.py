"""Checks for a CUDA machine, in one command:  python -m tools.gpu_check  (exit status 0 = all passed)

1. Fused vs materialised attention agree in bf16 and fp16 (output and gradients) within a stated
   tolerance, at 32x32 and 64x64 (N = 4096). Spectral norm's power iteration and sigma stay fp32
   under bf16/fp16 autocast (CUDA autocast would run its torch.mv in reduced precision), and
   --precision auto resolves to bf16 on a GPU that supports it.
2. The training path at N = 4096, batch 64 never materialises an N x N map: peak CUDA memory of a
   forward + backward stays far below one (B, N, N) fp32 map (4 GiB).
3. A few training steps of main.py in fp32, bf16, fp16 (+ resume, GradScaler state restored),
   auto, channels_last, and --compile.
4. tools.bench's table (rows fp32, auto, bf16) at 64px and at 128px with attention on the 64x64 map.

Everything runs on the first GPU; the command exits with a message on a machine without one. The
checks that take a device (spectral_norm_stays_fp32) also run on CPU: tests/test_tools.py runs them.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

import precision
from cli import Parser, UserError, run
from sagan_models import Self_Attn
from spectral import SN

PROG = "tools.gpu_check"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # main.py's folder
# bf16 keeps 8 bits of mantissa: relative error ~4e-3 per rounding, a few roundings deep here
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
failures = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        failures.append(name)


def relative_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def attention_agreement(device):
    for H in (32, 64):
        for dtype, tol in TOLERANCE.items():
            torch.manual_seed(0)
            layer = Self_Attn(64).to(device).eval()  # eval: same spectral-norm weights every call
            with torch.no_grad():
                layer.gamma.fill_(1.0)
            x = torch.randn(4, 64, H, H, device=device)
            results = []
            for return_attn in (True, False):
                layer.zero_grad()
                xi = x.clone().requires_grad_(True)
                with torch.autocast("cuda", dtype=dtype):
                    out, _ = layer(xi, return_attn=return_attn)
                out.float().square().mean().backward()
                results.append([out, xi.grad, layer.gamma.grad])
            err = max(relative_error(a, b) for a, b in zip(results[1], results[0]))
            check(f"attention fused == materialised, {H}x{H}, {str(dtype)[6:]}", err < tol,
                  f"max relative error {err:.2e} (tolerance {tol:.0e})")


def spectral_norm_stays_fp32(device):
    """Three training-mode forwards under autocast give bit for bit the u, v and normalized weight of
    three without it: the power iteration and sigma ran in fp32."""
    dtypes = [torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:
        torch.manual_seed(0)
        layer = SN(nn.Conv2d(64, 128, 4, 2, 1)).to(device).train()
        plain = SN(nn.Conv2d(64, 128, 4, 2, 1)).to(device).train()
        plain.load_state_dict(layer.state_dict())
        x = torch.randn(4, 64, 16, 16, device=device)
        for _ in range(3):  # each forward in training mode is one power-iteration update
            with torch.autocast(device.type, dtype=dtype):
                layer(x)
                w = layer.weight  # (and so is reading the weight)
            plain(x)
            w_plain = plain.weight
        same = all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), plain.state_dict().values()))
        check(f"spectral norm in fp32 under {str(dtype)[6:]} autocast on {device.type}",
              same and w.dtype == torch.float32 and torch.equal(w, w_plain),
              f"weight {w.dtype}, u/v/weight identical to an fp32 run: {same}")


def auto_precision(device):
    chosen, why = precision.resolve("auto", device)
    check("--precision auto on this GPU", chosen == ("bf16" if torch.cuda.is_bf16_supported() else "fp32"),
          f"{chosen} ({why})")


def no_n_by_n_at_4096(device):
    torch.manual_seed(0)
    B, C, N = 64, 64, 64 * 64
    layer = Self_Attn(C).to(device).train()
    x = torch.randn(B, C, 64, 64, device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, attention = layer(x, return_attn=False)
    out.square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    one_map = B * N * N * 4
    check("training path at N=4096, batch 64 has no N x N map", attention is None and peak < one_map / 8,
          f"peak {peak / 2**20:.0f} MiB vs one fp32 (B, N, N) map {one_map / 2**20:.0f} MiB")


def run_python(args, name):
    """`python args` from the repository root, checked by its exit status."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    check(name, r.returncode == 0, r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip()
          else r.stderr.strip()[-600:])
    return r


def training_runs(workdir):
    base = ["main.py", "--dataset", "synthetic", "--imsize", "64", "--batch_size", "32",
            "--synthetic_size", "256", "--num_workers", "2", "--no_visdom", "--log_step", "5",
            "--sample_step", "10", "--model_save_step", "5", "--device", "cuda",
            "--model_save_path", os.path.join(workdir, "m"), "--sample_path", os.path.join(workdir, "s")]
    for extra, name in [(["--precision", "fp32"], "fp32"), (["--precision", "bf16"], "bf16"),
                        (["--precision", "fp16"], "fp16"), (["--precision", "auto"], "auto"),
                        (["--precision", "bf16", "--channels_last"], "bf16_cl"),
                        (["--precision", "bf16", "--compile"], "bf16_compile")]:
        run_python(base + extra + ["--total_step", "10", "--version", name],
                   f"main.py trains 10 steps, {' '.join(extra)}")
    ckpt = torch.load(os.path.join(workdir, "m", "fp16", "latest.pt"), weights_only=True)
    check("fp16 checkpoint holds GradScaler state", bool(ckpt.get("scaler_g")) and bool(ckpt.get("scaler_d")),
          f"scale G {ckpt.get('scaler_g', {}).get('scale')}, D {ckpt.get('scaler_d', {}).get('scale')}")
    run_python(base + ["--precision", "fp16", "--total_step", "15", "--version", "fp16", "--resume"],
               "fp16 run resumes from its checkpoint")
    for name in ("fp32", "bf16", "fp16"):
        with open(os.path.join(workdir, "m", name, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        check(f"{name} losses finite", all(map(lambda v: v == v and abs(v) < 1e6,
                                               (last["d_loss"], last["g_loss"]))), str(last["d_loss"]))


def bench_tables():
    for extra in (["--imsize", "64"], ["--imsize", "128", "--g_attn", "64"]):
        r = run_python(["-m", "tools.bench", *extra, "--rows", "fp32,auto,bf16", "--batch_size", "64",
                        "--steps", "10", "--warmup", "3", "--peak_size", "8192", "--device", "cuda"],
                       f"tools.bench {' '.join(extra)}")
        print("\n".join(r.stdout.strip().splitlines()[-9:-1]), flush=True)


def main(argv=None):
    Parser(prog=PROG, description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options: --help only
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU here; run it on a machine with one")
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    attention_agreement(device)
    spectral_norm_stays_fp32(device)
    auto_precision(device)
    no_n_by_n_at_4096(device)
    with tempfile.TemporaryDirectory() as workdir:
        training_runs(workdir)
    bench_tables()
    print(f"{len(failures)} failed: {', '.join(failures)}" if failures else "all GPU checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    run(PROG, main)
