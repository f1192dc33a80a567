"""Time the real training iteration (Trainer.train_step: one D and one G update) in several
precisions, against the machine's own matmul peak and against the naive SAGAN (tools/naive_sagan.py,
heykeetae's code) at the same architecture, all in one process.

    python -m tools.bench                                   # 64px, widths 64, batch 64: fp32, auto, naive
    python -m tools.bench --rows fp32,bf16,bf16+channels_last --only ours   # A/B of variants
    python -m tools.bench --imsize 128 --g_attn 64 --only ours              # memory of one side alone
    python -m tools.bench ... --profile 20                  # torch.profiler table of one step per row
    python -m tools.bench --precision bf16                  # main.py's --precision alone: that one row

Rows (--rows, comma-separated): a precision (fp32, bf16, fp16, auto) with optional '+channels_last',
'+compile', '+reuse_fake', '+explicit_attn' (every attention map materialised on CPU, not only
those up to sagan_models.CPU_EXPLICIT_MAX_N); every other flag of main.py applies to all rows. The rows and the naive
SAGAN alternate step by step after warm-up, so load from other processes hits all alike: the medians
are printed with each row's ratio to the first row as the median and range of the per-round ratios
(a wide range means the machine was busy: trust an idle machine's run).

The limit: the model's FLOP per step are counted once (torch.utils.flop_counter on one step of the
first row, the same count in any precision; the CPU flash-attention kernel counted by torch's SDPA
formulas), achieved GFLOP/s = that / s per step, and the same run measures the machine's fp32 and
bf16 matmul peak (--peak_size square matmul, best of --peak_repeats and one more per timed round):
each row reports the fraction of its precision's peak. The peak is the faster of that matmul and a
3x3 convolution of the same order (oneDNN; on CPUs where MKL's fp32 matmul is slow, e.g. AMD, the
convolution shows the machine's fp32 ceiling better). The CPU model and its bf16 flags are printed.
Peak memory: CUDA max allocated on GPU; on CPU the peak resident set size sampled during each row's
steps. Data loading is not timed: batches are random images on the device.
The last line is one JSON object.
"""
import json
import os
import resource
import statistics
import tempfile
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import main as sagan_main
import precision
import sagan_models
from cli import Parser, run
from tools.naive_sagan import NaiveTrainer
from trainer import Trainer
from utils import pick_device

PROG = "tools.bench"
# main.py's defaults are the 64px, widths 64, batch 64 model; the bench times that unless told
DEFAULT_ROWS = "fp32,auto"
MODIFIERS = {"channels_last": "--channels_last", "compile": "--compile", "reuse_fake": "--reuse_fake",
             "explicit_attn": None}  # no flag: the row's steps compute every CPU attention map explicitly


def explicit_attention(step):
    """`step` with sagan_models.CPU_EXPLICIT_MAX_N raised to any size while it runs: the candidate of
    materialising the map (bmm + softmax) instead of the flash kernel at every resolution on CPU."""
    def run(real):
        saved, sagan_models.CPU_EXPLICIT_MAX_N = sagan_models.CPU_EXPLICIT_MAX_N, 1 << 62
        try:
            return step(real)
        finally:
            sagan_models.CPU_EXPLICIT_MAX_N = saved
    return run


def bench_args(argv=None):
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--rows", default=None,
                   help="comma-separated precisions to time, each optionally +channels_last, +compile, "
                        f"+reuse_fake, +explicit_attn (default {DEFAULT_ROWS}); the first row is the ratios' reference")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--only", choices=["both", "ours", "naive"], default="both",
                   help="ours: the rows only; naive: the naive SAGAN only; both (default)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--peak_size", type=int, default=2048, help="side of the square matmul timed for the peak")
    p.add_argument("--peak_repeats", type=int, default=5,
                   help="matmuls per precision before the timed steps (and one more per round); the best counts")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, print a torch.profiler table (this many rows) of one step each")
    args, rest = p.parse_known_args(argv)
    if args.rows is None:  # main.py's --precision P alone (the older spelling) times the one row P
        given = [a.split("=", 1)[1] if "=" in a else rest[i + 1] for i, a in enumerate(rest)
                 if a.split("=")[0] == "--precision" and ("=" in a or i + 1 < len(rest))]
        args.rows = given[-1] if given else DEFAULT_ROWS
    if args.steps <= 0 or args.warmup < 0 or args.peak_size <= 0 or args.peak_repeats <= 0:
        p.error("--steps, --peak_size and --peak_repeats must be positive and --warmup not negative")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for row in rows:
        prec, *mods = row.split("+")
        if prec not in precision.CHOICES or any(m not in MODIFIERS for m in mods):
            p.error(f"--rows {row!r}: a row is one of {', '.join(precision.CHOICES)} with optional "
                    f"{', '.join('+' + m for m in MODIFIERS)}")
    if len(set(rows)) != len(rows) or not rows:
        p.error(f"--rows {args.rows!r}: name each row once")
    args.rows = rows
    return args, rest


class RSSPeak:
    """Highest resident set size seen while a label is active (sampled every 2 ms in a thread)."""

    def __init__(self):
        self.label, self.peak = None, {}
        self.page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while True:
            if self.label:
                self.peak[self.label] = max(self.peak.get(self.label, 0), self.rss())
            time.sleep(0.002)


class Side:
    """One thing under test (a row, or the naive SAGAN): a step function, its times and peak memory."""

    def __init__(self, name, step, device, rss, precision="fp32", why=""):
        self.name, self.step, self.device, self.rss = name, step, device, rss
        self.precision, self.why = precision, why
        self.times, self.peak_cuda = [], 0

    def run(self, real, timed=True):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss.label = self.name
        t = time.perf_counter()
        self.step(real)
        if cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t
        self.rss.label = None
        if cuda:
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated(self.device))
        if timed:
            self.times.append(elapsed)

    def summary(self, batch_size):
        s = statistics.median(self.times)
        peak = self.peak_cuda if self.device.type == "cuda" else self.rss.peak.get(self.name, 0)
        return dict(precision=self.precision, s_per_step=round(s, 4), img_per_s=round(batch_size / s, 2),
                    s_per_step_all=[round(t, 4) for t in self.times], peak_mem_mb=round(peak / 2**20, 1))


def row_config(row, rest, workdir):
    prec, *mods = row.split("+")
    return sagan_main.parse_args(rest + ["--precision", prec, *(MODIFIERS[m] for m in mods if MODIFIERS[m]),
                                         "--dataset", "synthetic", "--no_visdom", "--version", "bench",
                                         "--model_save_path", workdir, "--sample_path", workdir])


def build(args, rest, workdir):
    """(the first row's config, device, sides, the first row's trainer or None, aliases): a row that
    resolves to an earlier one (auto -> fp32) is not timed twice; aliases maps it to (that row, why)."""
    rss, sides, first, aliases, seen = RSSPeak(), [], None, {}, {}
    config = row_config(args.rows[0], rest, workdir)
    device = pick_device(config.device)  # checked by parse_args
    if args.only in ("both", "ours"):
        for row in args.rows:
            c = row_config(row, rest, workdir)
            mods = row.split("+")[1:]
            key = (c.precision, *mods)
            if key in seen:
                aliases[row] = (seen[key], c.precision_reason)
                continue
            seen[key] = row
            trainer = Trainer(c, dataset=None)
            trainer.G.train(), trainer.D.train()
            first = first or trainer
            step = explicit_attention(trainer.train_step) if "explicit_attn" in mods else trainer.train_step
            sides.append(Side(row, step, device, rss, c.precision, c.precision_reason))
    if args.only in ("both", "naive"):
        naive = NaiveTrainer(config.imsize, config.z_dim, config.g_conv_dim, config.d_conv_dim,
                             config.g_attn, config.d_attn, device, config.g_lr, config.d_lr,
                             (config.beta1, config.beta2))
        sides.append(Side("naive", naive.train_step, device, rss))
    return config, device, sides, first, aliases


# ----------------------------------------------------------------------------- the limit

def _flash_cpu(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _flash_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel the CPU path runs
SDPA_CPU_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward}


def flops_per_step(trainer, real):
    """FLOP of one training step as executed (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        trainer.train_step(real)
    return counter.get_total_flops()


class MatmulPeak:
    """Best GFLOP/s per precision on `device` of two kernels: an n x n matmul (BLAS: MKL for fp32 on
    x86) and a 3x3 convolution of the same order (oneDNN on CPU, which the model's convolutions use;
    on some CPUs it is the faster of the two in fp32); the peak of a precision is its faster kernel.
    Measured a few times up front and once more in every timed round, so the best is taken over the
    same stretch of time (and load) as the steps."""

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def __init__(self, device, n):
        self.device = device
        g = torch.Generator(device=device).manual_seed(0)
        c = max(n // 4, 8)
        shapes = {"matmul": ((n, n), (n, n)), "conv3x3": ((16, c, 16, 16), (c, c, 3, 3))}
        self.flop = {"matmul": 2 * n ** 3, "conv3x3": 2 * 16 * 16 * 16 * c * c * 9}
        self.ops = {"matmul": torch.mm, "conv3x3": lambda x, w: F.conv2d(x, w, padding=1)}
        base = {k: [torch.randn(shape, device=device, generator=g) for shape in v] for k, v in shapes.items()}
        self.operands = {(p, k): [t.to(dt) for t in base[k]] for p, dt in self.DTYPES.items() for k in shapes}
        self.best = {key: float("inf") for key in self.operands}
        for (p, k), args in self.operands.items():
            self.ops[k](*args)  # warm-up: the library picks its kernel

    def measure(self):
        for (p, k), args in self.operands.items():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            self.ops[k](*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.best[p, k] = min(self.best[p, k], time.perf_counter() - t)

    def by_kernel(self):
        return {p: {k: round(self.flop[k] / self.best[p, k] / 1e9, 1) for k in self.flop} for p in self.DTYPES}

    def gflops(self):
        return {p: max(kernels.values()) for p, kernels in self.by_kernel().items()}


def machine(device):
    if device.type == "cuda":
        return dict(name=torch.cuda.get_device_name(device), bf16_units=[], flags=[])
    model, flags = precision.cpu_info()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "bf16", "asimd", "sve"))
    return dict(name=model, bf16_units=precision.bf16_units(flags), flags=simd)


def profile_table(side, real, rows):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        side.run(real, timed=False)
    key = "self_cuda_time_total" if side.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def ratio_spread(ref, other):
    """Median and range of ref/other over the alternating rounds (paired: same round, same load)."""
    ratios = [a / b for a, b in zip(ref, other)]
    return round(statistics.median(ratios), 3), [round(min(ratios), 3), round(max(ratios), 3)]


def main(argv=None):
    args, rest = bench_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        config, device, sides, first, aliases = build(args, rest, workdir)
        B = config.batch_size
        real = torch.rand(B, 3, config.imsize, config.imsize, device=device) * 2 - 1
        box = machine(device)
        print(f"machine: {box['name']} | {torch.get_num_threads()} threads | bf16 units: "
              f"{', '.join(box['bf16_units']) or 'none'} | torch {torch.__version__} | "
              f"load {load_before:.2f} (1-min average before the run)", flush=True)
        print(f"model: {config.imsize}px, widths G {config.g_conv_dim} D {config.d_conv_dim}, batch {B}, "
              f"attention G {config.g_attn or 'none'} D {config.d_attn or 'none'}", flush=True)
        for side in sides:
            if side.name != "naive":
                print(f"row {side.name}: {side.precision} ({side.why})", flush=True)
            for _ in range(args.warmup):
                side.run(real, timed=False)
        for row, (same, why) in aliases.items():
            print(f"row {row}: {why} -> the same as row {same}, not timed twice", flush=True)
        flops = flops_per_step(first, real) if first else None  # untimed; after warm-up
        peak = MatmulPeak(device, args.peak_size)
        for _ in range(args.peak_repeats):
            peak.measure()
        for _ in range(args.steps):  # alternate, so all see the same load
            for side in sides:
                side.run(real)
            peak.measure()
        peaks = peak.gflops()
        if args.profile:
            for side in sides:
                print(f"--- profile: {side.name}, one step")
                print(profile_table(side, real, args.profile))
        load_after = os.getloadavg()[0]

    result = dict(config={k: getattr(config, k) for k in (
        "imsize", "batch_size", "z_dim", "g_conv_dim", "d_conv_dim", "g_attn", "d_attn", "adv_loss",
        "precision", "channels_last", "compile", "reuse_fake")},
        device=str(device), device_name=box["name"] + ("" if device.type == "cuda" else
                                                         f", {torch.get_num_threads()} threads"),
        cpu_flags=box["flags"], bf16_units=box["bf16_units"], threads=torch.get_num_threads(),
        peak_mem_kind="cuda_max_allocated" if device.type == "cuda" else "rss_sampled",
        steps=args.steps, warmup=args.warmup, torch=torch.__version__,
        load_avg_1min=[round(load_before, 2), round(load_after, 2)],
        matmul_peak_gflops={p: round(v, 1) for p, v in peaks.items()}, matmul_peak_size=args.peak_size,
        peak_by_kernel=peak.by_kernel())
    kernels = " | ".join(f"{p}: " + ", ".join(f"{k} {v:.0f}" for k, v in ks.items()) for p, ks in peak.by_kernel().items())
    print(f"peak (best of {args.peak_repeats + args.steps}, matmul {args.peak_size}x{args.peak_size} and a 3x3 "
          f"conv of that order): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s ({kernels})")
    if flops:
        result["gflop_per_step"] = float(f"{flops / 1e9:.4g}")
        print(f"model: {flops / 1e9:.1f} GFLOP per step (counted on one step: convolutions, matmuls, "
              f"attention; forward and backward)")
    summaries = {side.name: side.summary(B) for side in sides}
    ref = sides[0]
    for side in sides:
        s = summaries[side.name]
        line = f"{side.name:>22}: {s['s_per_step']:.3f} s/step {s['img_per_s']:7.1f} img/s"
        if flops and side.name != "naive":
            gflops = flops / 1e9 / s["s_per_step"]
            s["gflop_per_s"] = float(f"{gflops:.4g}")
            s["fraction_of_peak"] = round(gflops / peaks["fp32" if s["precision"] == "fp32" else "bf16"], 3)
            line += f" {gflops:6.0f} GFLOP/s = {100 * s['fraction_of_peak']:4.1f}% of the {s['precision']} peak"
        if side is not ref and side.name != "naive":
            s["ratio_to_first"], s["ratio_range"] = ratio_spread(ref.times, side.times)
            line += f" | {ref.name}/{side.name} {s['ratio_to_first']:.2f}x [{s['ratio_range'][0]:.2f}-{s['ratio_range'][1]:.2f}]"
        print(line + f" | peak {s['peak_mem_mb']:.0f} MB")
    rows = {name: s for name, s in summaries.items() if name != "naive"}
    rows.update({row: dict(rows[same], same_as=same) for row, (same, _) in aliases.items()})
    result["rows"] = {name: {k: v for k, v in s.items() if k != "s_per_step_all"} for name, s in rows.items()}
    for row, (same, why) in aliases.items():
        result["rows"][row]["why"] = why
    for side in sides:
        if side.name in result["rows"]:
            result["rows"][side.name]["why"] = side.why
    if rows:
        top = rows[ref.name]
        result.update({k: top[k] for k in ("img_per_s", "s_per_step", "peak_mem_mb")})
    if "naive" in summaries:
        result["naive"] = {k: summaries["naive"][k] for k in ("img_per_s", "s_per_step", "peak_mem_mb")}
        for name in rows:
            if name in aliases:
                result["rows"][name]["speedup_vs_naive"] = result["rows"][aliases[name][0]]["speedup_vs_naive"]
                continue
            speedup = ratio_spread(summaries["naive"]["s_per_step_all"], summaries[name]["s_per_step_all"])
            result["rows"][name]["speedup_vs_naive"] = speedup[0]
            print(f"speed-up of {name} vs the naive SAGAN (tools/naive_sagan.py): {speedup[0]:.2f}x "
                  f"[{speedup[1][0]:.2f}-{speedup[1][1]:.2f}] (median [range] of {args.steps} alternating rounds)")
        if rows:
            result["speedup_vs_naive"] = result["rows"][ref.name]["speedup_vs_naive"]
    if device.type == "cpu":
        result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["per_step_s"] = {name: s["s_per_step_all"] for name, s in summaries.items()}
    if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1):
        print(f"note: the machine was busy (load {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} "
              f"cores): timings are under load; rerun on an idle machine for numbers to quote")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(PROG, main)
