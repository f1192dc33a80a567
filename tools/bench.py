"""Time the real training iteration (Trainer.train_step: one D and one G update) against the naive
SAGAN (tools/naive_sagan.py) at the same architecture, in one process.

    python -m tools.bench --imsize 64 --batch_size 64 --g_conv_dim 64 --d_conv_dim 64 --steps 5
    python -m tools.bench --imsize 128 --g_attn 64 --only ours      # memory of one side alone
    python -m tools.bench ... --profile 20                           # torch.profiler table of both steps

Every flag of main.py is accepted (architecture, --device, --precision, --channels_last, --compile,
--reuse_fake...). The two implementations alternate step by step after warm-up, so load from other
processes on the machine hits both alike; the medians and their ratio are printed, and the last line
is one JSON object. Peak memory: CUDA max allocated per step on GPU; on CPU the peak resident set
size sampled during each implementation's steps (with --only, the process's exact ru_maxrss too).
Data loading is not timed: batches are random images already on the device.
"""
import json
import os
import resource
import statistics
import tempfile
import threading
import time

import torch

import main as sagan_main
from cli import Parser, run
from tools.naive_sagan import NaiveTrainer
from trainer import Trainer
from utils import pick_device

PROG = "tools.bench"


def bench_args(argv=None):
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--only", choices=["both", "ours", "naive"], default="both")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, print a torch.profiler table (this many rows) of one step each")
    args, rest = p.parse_known_args(argv)
    if args.steps <= 0 or args.warmup < 0:
        p.error("--steps must be positive and --warmup not negative")
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
    """One implementation under test: a step function, its per-step times and peak memory."""

    def __init__(self, name, step, device, rss):
        self.name, self.step, self.device, self.rss = name, step, device, rss
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
        return dict(s_per_step=round(s, 4), img_per_s=round(batch_size / s, 2),
                    s_per_step_all=[round(t, 4) for t in self.times], peak_mem_mb=round(peak / 2**20, 1))


def build(args, rest, workdir):
    config = sagan_main.parse_args(rest + ["--dataset", "synthetic", "--no_visdom", "--version", "bench",
                                           "--model_save_path", workdir, "--sample_path", workdir])
    device = pick_device(config.device)  # checked by parse_args
    sides, rss = [], RSSPeak()
    if args.only in ("both", "ours"):
        trainer = Trainer(config, dataset=None)
        trainer.G.train(), trainer.D.train()
        sides.append(Side("ours", trainer.train_step, device, rss))
    if args.only in ("both", "naive"):
        naive = NaiveTrainer(config.imsize, config.z_dim, config.g_conv_dim, config.d_conv_dim,
                             config.g_attn, config.d_attn, device, config.g_lr, config.d_lr,
                             (config.beta1, config.beta2))
        sides.append(Side("naive", naive.train_step, device, rss))
    return config, device, sides


def profile_table(side, real, rows):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        side.run(real, timed=False)
    key = "self_cuda_time_total" if side.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv=None):
    args, rest = bench_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        config, device, sides = build(args, rest, workdir)
        real = torch.rand(config.batch_size, 3, config.imsize, config.imsize, device=device) * 2 - 1
        for side in sides:
            for _ in range(args.warmup):
                side.run(real, timed=False)
        for _ in range(args.steps):  # alternate, so both see the same load
            for side in sides:
                side.run(real)
        if args.profile:
            for side in sides:
                print(f"--- profile: {side.name}, one step")
                print(profile_table(side, real, args.profile))

    B = config.batch_size
    result = dict(config={k: getattr(config, k) for k in (
        "imsize", "batch_size", "z_dim", "g_conv_dim", "d_conv_dim", "g_attn", "d_attn", "adv_loss",
        "precision", "channels_last", "compile", "reuse_fake")},
        device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                         else f"cpu, {torch.get_num_threads()} threads"),
        peak_mem_kind="cuda_max_allocated" if device.type == "cuda" else "rss_sampled",
        steps=args.steps, warmup=args.warmup, torch=torch.__version__,
        load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    summaries = {side.name: side.summary(B) for side in sides}
    for name, s in summaries.items():
        print(f"{name:>5}: {s['s_per_step']:.3f} s/step  {s['img_per_s']:8.1f} img/s  "
              f"peak {s['peak_mem_mb']:.0f} MB ({result['peak_mem_kind']})")
    if "ours" in summaries:
        result.update({k: summaries["ours"][k] for k in ("img_per_s", "s_per_step", "peak_mem_mb")})
    if "naive" in summaries:
        result["naive"] = {k: summaries["naive"][k] for k in ("img_per_s", "s_per_step", "peak_mem_mb")}
    if len(summaries) == 2:
        result["speedup_vs_naive"] = round(summaries["naive"]["s_per_step"] / summaries["ours"]["s_per_step"], 3)
        print(f"speed-up vs the naive SAGAN (tools/naive_sagan.py): {result['speedup_vs_naive']:.2f}x "
              f"(medians of {args.steps} alternating steps)")
    if device.type == "cpu":
        result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["per_step_s"] = {name: s["s_per_step_all"] for name, s in summaries.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(PROG, main)
