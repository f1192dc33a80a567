"""Which floating-point precision a run computes in, and why: --precision fp32 | bf16 | fp16 | auto.

    fp32  everything in fp32 (the reference)
    bf16  autocast to bfloat16 around the forwards, on CPU or CUDA
    fp16  autocast to float16 plus loss scaling (trainer.py's GradScalers): CUDA only
    auto  bf16 where it is faster, else fp32:
          CUDA: bf16 when the GPU supports it (torch.cuda.is_bf16_supported()), else fp32;
          CPU:  bf16 only when the CPU has bf16 units (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo's
                flags) AND a short probe measures bf16 at least MIN_SPEEDUP x faster than fp32 on
                convolutions and a matmul of this model's size; fp32 otherwise, so auto is never
                knowingly slower than fp32. The probe's result is cached per machine (CPU model,
                flags, torch version, threads) in ~/.cache/sagan/precision_probe.json.

What autocast leaves in fp32 (by design, tested in tests/test_precision.py): the weights and their
gradients, Adam's states, the EMA generator, checkpoints (all parameters stay fp32; autocast casts
copies for each op), spectral norm's power iteration and sigma (spectral.py switches autocast off
inside it), the losses (the trainer takes D's scores .float()), sampling and evaluation (outside
autocast). resolve() gives (precision, reason); the reason is printed and kept in config.json.
"""
import contextlib
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from run_files import atomic_write_text

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = (*DTYPES, "auto")
MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this much in the probe: noise must not pick a slower path
PROBE_VERSION = 1   # bump when the probe's workload changes: old cached results no longer apply
# /proc/cpuinfo flag -> name (x86 "flags"; Arm's "Features" line calls its bf16 dot products "bf16")
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}


def autocast(precision, device):
    """The autocast context for `precision` on `device` (a torch.device); a no-op for fp32."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()


def check(precision, device):
    """Raise ValueError when `precision` (already resolved: not auto) can't run on `device`."""
    if precision not in DTYPES:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(CHOICES)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA GPU (its loss scaling is CUDA's); on {device.type} "
                         f"use --precision bf16 or auto")


# ----------------------------------------------------------------------------- the CPU

def cpu_info(path="/proc/cpuinfo"):
    """(model name, set of flags) of the first CPU in /proc/cpuinfo (x86 'flags', Arm 'Features'); (platform's name, empty set)
    where there is no such file (macOS, Windows)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = set(value.split())
                if key == "" and flags:  # the end of the first CPU's block
                    break
    except OSError:
        pass
    return model, flags


def bf16_units(flags):
    """The CPU's bf16 units by name, best first (['AMX-BF16', 'AVX512-BF16']); [] when it has none."""
    return [name for flag, name in BF16_FLAGS.items() if flag in flags]


# ----------------------------------------------------------------------------- the probe

def _probe_workload(dtype):
    """One forward + backward of convolutions and a matmul shaped like a 64px SAGAN layer at widths
    64 (a D block 128 -> 256 at 16x16, a G block 256 -> 128 at 8 -> 16, an attention-sized bmm)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, 16, 16, generator=g, requires_grad=True)
    w_d = torch.randn(256, 128, 4, 4, generator=g, requires_grad=True)
    h = torch.randn(16, 256, 8, 8, generator=g, requires_grad=True)
    w_g = torch.randn(256, 128, 4, 4, generator=g, requires_grad=True)
    q = torch.randn(16, 256, 128, generator=g, requires_grad=True)

    def step():
        with autocast("bf16" if dtype is torch.bfloat16 else "fp32", torch.device("cpu")):
            a = F.conv2d(x, w_d, stride=2, padding=1)               # (16, 256, 8, 8)
            b = F.conv_transpose2d(h, w_g, stride=2, padding=1)     # (16, 128, 16, 16)
            c = torch.bmm(q, q.transpose(1, 2))                     # (16, 256, 256)
            loss = a.float().square().mean() + b.float().square().mean() + c.float().mean()
        loss.backward()
    return step


def probe(repeats=5):
    """Median seconds of the probe workload in fp32 and in bf16 on this CPU, alternated so load from
    other processes hits both alike: {'fp32': s, 'bf16': s, 'speedup': fp32 / bf16, 'seconds': total}."""
    t0 = time.perf_counter()
    steps = {"fp32": _probe_workload(torch.float32), "bf16": _probe_workload(torch.bfloat16)}
    times = {k: [] for k in steps}
    for step in steps.values():  # warm-up: oneDNN picks and JITs its kernels on the first call
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(fp32=round(med["fp32"], 5), bf16=round(med["bf16"], 5),
                speedup=round(med["fp32"] / med["bf16"], 3), seconds=round(time.perf_counter() - t0, 2),
                load=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0)  # not on Windows


def busy(result):
    """Was the machine busier than its cores while the probe ran? (Such a result is not cached.)"""
    return result.get("load", 0.0) > (os.cpu_count() or 1)


def cache_path():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sagan", "precision_probe.json")


def machine_key():
    """What the probe's answer depends on: CPU model and flags, torch version, threads."""
    model, flags = cpu_info()
    return dict(cpu=model, flags=sorted(flags), torch=torch.__version__, threads=torch.get_num_threads(),
                probe_version=PROBE_VERSION)


def cached_probe(path=None, measure=True, keep_after=1.0):
    """(probe result, 'cached' | 'measured') for this machine; the cache file holds one entry per
    machine key, written when the probe took more than `keep_after` seconds on a machine that was
    not busy (a probe under other processes' load says little about the next run). With
    measure=False, (None, 'not measured') when nothing is cached."""
    path = path or cache_path()
    key = json.dumps(machine_key(), sort_keys=True)
    entries = _cache_entries(path)
    if key in entries:
        return entries[key], "cached"
    if not measure:
        return None, "not measured"
    result = probe()
    if result["seconds"] > keep_after and not busy(result):  # a quicker probe is not worth a file
        store_probe(result, path)
    return result, "measured"


def store_probe(result, path=None):
    """Keep `result` as this machine's probe in the cache file (atomically; other machines' entries
    stay). A read-only home is not an error: the next run probes again."""
    path = path or cache_path()
    entries = _cache_entries(path)
    entries[json.dumps(machine_key(), sort_keys=True)] = result
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=1))
    except OSError:
        pass


def _cache_entries(path):
    """The probe cache file's {machine key: result}; empty when it is missing or unreadable."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


# ----------------------------------------------------------------------------- the choice

def saved_choice(config_json):
    """The precision a run folder's config.json records ('fp32'/'bf16'/'fp16'), or None."""
    try:
        with open(config_json) as f:
            saved = json.load(f).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if saved in DTYPES else None


def resolve(requested, device, cache=None, flags=None, resuming=None):
    """(precision, reason) for --precision `requested` on `device` (a torch.device): 'auto' becomes
    fp32 or bf16; anything that can't run raises ValueError naming the flag. `cache`: the probe's
    cache file (default cache_path()); `flags`: the CPU's flags (default: cpu_info()'s);
    `resuming`: the config.json of the run being resumed, whose choice auto keeps (a probe that
    came out differently today must not change the arithmetic halfway through a run)."""
    flags = cpu_info()[1] if flags is None else flags
    previous = saved_choice(resuming) if requested == "auto" and resuming else None
    if previous:
        check(previous, device)
        return previous, f"auto: kept from the run being resumed ({resuming})"
    if requested != "auto":
        check(requested, device)
        note = ""
        if requested == "bf16" and device.type == "cpu" and not bf16_units(flags):
            note = "; this CPU has no bf16 units (no amx_bf16/avx512_bf16 flag): expect it slower than fp32"
        return requested, f"requested{note}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {name} supports bf16"
        return "fp32", f"auto: {name} has no bf16 support"
    if device.type != "cpu":
        return "fp32", f"auto: bf16 autocast is not chosen automatically on {device.type}"
    units = bf16_units(flags)
    if not units:
        return "fp32", "auto: this CPU has no bf16 units (no amx_bf16/avx512_bf16 flag)"
    # torchrun's processes must agree: they read a cached probe but never race to measure one
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    result, how = cached_probe(cache, measure=not several)
    if result is None:
        return "fp32", (f"auto: {'/'.join(units)}, but no cached probe for {os.environ['WORLD_SIZE']} "
                        f"processes to share; run once without torchrun or pass --precision bf16")
    faster = result["speedup"] >= MIN_SPEEDUP
    verdict = f"{result['speedup']:.2f}x {'faster than' if result['speedup'] >= 1 else 'the speed of'} fp32"
    how += f" under load {result['load']:.1f}" if busy(result) else ""
    why = f"auto: {'/'.join(units)}, probe ({how}) {verdict}"
    if faster:
        return "bf16", why
    return "fp32", f"{why}, under the {MIN_SPEEDUP}x needed"
