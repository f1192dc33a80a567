"""bf16 on CPU: what must stay fp32 stays fp32, resume is exact in bf16 too, fp16 stays CUDA-only,
and --precision auto chooses by the CPU's flags and a measured probe, saying why."""
import json
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import main
import precision
from checkpoint import load_checkpoint
from conftest import TINY, metrics, out_args, run_inprocess, whole_and_resumed
from spectral import SN

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- spectral norm

@pytest.mark.parametrize("layer", [lambda: nn.Conv2d(32, 64, 4, 2, 1), lambda: nn.ConvTranspose2d(64, 32, 4, 2, 1)])
def test_spectral_norm_is_torchs_and_runs_in_fp32_under_bf16_autocast(layer):
    torch.manual_seed(0)
    ours = SN(layer()).train()
    torch.manual_seed(0)
    theirs = spectral_norm(layer()).train()
    # the same parametrization as torch's: same state dict keys and values (checkpoints load both ways)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))

    plain = SN(layer()).train()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, ours.in_channels, 8, 8)
    for _ in range(3):  # three power-iteration updates, each under autocast for `ours`
        with torch.autocast("cpu", torch.bfloat16):
            y = ours(x)
            w_ours = ours.weight
        y_plain, w_plain = plain(x), plain.weight
    assert y.dtype == torch.bfloat16 and w_ours.dtype == torch.float32
    # u, v and sigma (hence the normalized weight) bit for bit those of an fp32 run
    for a, b in zip(ours.state_dict().values(), plain.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(w_ours, w_plain)
    assert (y.float() - y_plain).abs().max() < 0.05 * y_plain.abs().max()  # bf16 rounding, not a bug


# ----------------------------------------------------------------------------- bf16 training

def test_bf16_run_keeps_weights_optimizer_ema_and_checkpoint_in_fp32(tmp_path, capsys):
    assert run_inprocess(TINY + out_args(tmp_path, "b") + ["--precision", "bf16", "--total_step", "3"]) is None
    out = capsys.readouterr().out
    assert "precision: bf16 (requested" in out.splitlines()[1]  # the run's second line, after device
    run_dir = tmp_path / "models" / "b"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["precision"] == "bf16" and config["precision_reason"].startswith("requested")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(abs(r[k]) < 1e3 for r in rows for k in ("d_loss", "g_loss"))  # finite
    ckpt = load_checkpoint(str(run_dir / "latest.pt"))
    floats = [(f"{part}.{k}", v) for part in ("G", "D", "G_ema") for k, v in ckpt[part].items()
              if v.is_floating_point()]
    floats += [(f"{opt}.{i}.{k}", v) for opt in ("opt_g", "opt_d") for i, s in ckpt[opt]["state"].items()
               for k, v in s.items() if k != "step"]
    assert len(floats) > 50 and all(v.dtype == torch.float32 for _, v in floats), \
        [name for name, v in floats if v.dtype != torch.float32]


def test_bf16_k_steps_resume_k_steps_equals_2k_steps_bitwise(tmp_path):
    """test_safety's exact-resume test, in bf16 on CPU: K mid-epoch, 2K across one."""
    K = 10  # 64 images / batch 4 = 16 steps per epoch
    base = TINY + ["--precision", "bf16", "--model_save_step", str(K)]
    whole, split = whole_and_resumed(tmp_path, base, K)
    assert [r["step"] for r in whole] == [r["step"] for r in split] == list(range(1, 2 * K + 1))
    keys = [k for k in whole[0] if k.endswith("loss") or k.startswith(("d_loss", "gamma/"))]
    assert max(abs(a[k] - b[k]) for a, b in zip(whole, split) for k in keys) == 0.0
    a = load_checkpoint(str(tmp_path / "models" / "whole" / "latest.pt"))
    b = load_checkpoint(str(tmp_path / "models" / "split" / "latest.pt"))
    for part in ("G", "D", "G_ema", "opt_g", "opt_d"):
        sa, sb = a[part], b[part]
        if part.startswith("opt"):
            sa = {f"{i}.{k}": v for i, s in sa["state"].items() for k, v in s.items()}
            sb = {f"{i}.{k}": v for i, s in sb["state"].items() for k, v in s.items()}
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    # and bf16 did compute something else than fp32 (the test would pass vacuously otherwise)
    assert run_inprocess(TINY + out_args(tmp_path, "fp32") + ["--precision", "fp32", "--total_step", "2"]) is None
    fp32 = metrics(tmp_path / "models" / "fp32")
    assert any(fp32[i][k] != whole[i][k] for i in range(2) for k in ("d_loss", "g_loss"))


def test_fp16_on_cpu_is_a_one_line_error(capsys):
    code = run_inprocess(TINY + ["--device", "cpu", "--precision", "fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--precision fp16 needs a CUDA GPU" in err and "bf16 or auto" in err


# ----------------------------------------------------------------------------- --precision auto

def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f amx_bf16 avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu\n\n")
    model, flags = precision.cpu_info(str(info))
    assert model == "Some Xeon" and {"amx_bf16", "avx512_bf16"} <= flags and "fpu" in flags
    assert precision.bf16_units(flags) == ["AMX-BF16", "AVX512-BF16"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n\n")
    assert precision.bf16_units(precision.cpu_info(str(arm))[1]) == ["Arm BF16"]
    assert precision.cpu_info(str(tmp_path / "missing"))[1] == set()


def test_auto_without_bf16_units_is_fp32_and_measures_nothing(tmp_path):
    cache = tmp_path / "probe.json"
    chosen, why = precision.resolve("auto", CPU, cache=str(cache), flags={"avx2", "avx512f"})
    assert chosen == "fp32" and why == "auto: this CPU has no bf16 units (no amx_bf16/avx512_bf16 flag)"
    assert not cache.exists()
    chosen, why = precision.resolve("bf16", CPU, flags={"avx2"})  # asked for: allowed, with a warning
    assert chosen == "bf16" and "expect it slower than fp32" in why


@pytest.mark.parametrize("speedup,expected", [(2.0, "bf16"), (1.05, "fp32"), (0.4, "fp32")])
def test_auto_follows_a_cached_probe(tmp_path, speedup, expected):
    cache = tmp_path / "probe.json"
    key = json.dumps(precision.machine_key(), sort_keys=True)
    cache.write_text(json.dumps({key: dict(fp32=1.0, bf16=1.0 / speedup, speedup=speedup, seconds=3.0)}))
    chosen, why = precision.resolve("auto", CPU, cache=str(cache), flags={"avx512_bf16"})
    assert chosen == expected, why
    assert why.startswith(f"auto: AVX512-BF16, probe (cached) {speedup:.2f}x")
    assert ("under the 1.15x needed" in why) == (expected == "fp32")


def test_auto_measures_on_this_cpu_and_keeps_a_slow_probe(tmp_path, monkeypatch):
    cache = tmp_path / "sub" / "probe.json"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the test machine is shared: read it idle
    result, how = precision.cached_probe(str(cache), keep_after=0.0)  # the real probe, kept
    assert how == "measured" and result["fp32"] > 0 and result["bf16"] > 0
    assert result["speedup"] == pytest.approx(result["fp32"] / result["bf16"], rel=1e-2)
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [result]
    assert json.loads(next(iter(stored)))["threads"] == torch.get_num_threads()
    assert precision.cached_probe(str(cache)) == (result, "cached")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    # torchrun's processes never race to measure: without a cached probe, fp32 and why
    monkeypatch.setenv("WORLD_SIZE", "2")
    chosen, why = precision.resolve("auto", CPU, flags={"amx_bf16"})
    assert chosen == "fp32" and "no cached probe for 2 processes" in why
    monkeypatch.setenv("WORLD_SIZE", "1")
    chosen, why = precision.resolve("auto", CPU, cache=str(cache), flags={"amx_bf16"})
    assert chosen == ("bf16" if result["speedup"] >= precision.MIN_SPEEDUP else "fp32"), why
    # a probe measured while the machine is busier than its cores is used once, never cached
    monkeypatch.setattr(os, "getloadavg", lambda: (1e3, 1e3, 1e3))
    busy_cache = tmp_path / "busy.json"
    result, how = precision.cached_probe(str(busy_cache), keep_after=0.0)
    assert how == "measured" and not busy_cache.exists()
    chosen, why = precision.resolve("auto", CPU, cache=str(busy_cache), flags={"amx_bf16"})
    assert "probe (measured under load" in why and not busy_cache.exists()


def test_auto_resume_keeps_the_runs_choice_and_is_bitwise_exact(tmp_path, monkeypatch):
    """A resumed auto run computes in the precision it started in, even when today's probe says
    otherwise: K steps (probe says bf16) + resume (probe now says fp32) + K steps == 2K steps."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "sagan" / "precision_probe.json"
    cache.parent.mkdir(parents=True)
    key = json.dumps(precision.machine_key(), sort_keys=True)

    def probe_says(speedup):
        cache.write_text(json.dumps({key: dict(fp32=1.0, bf16=1.0 / speedup, speedup=speedup, seconds=3.0)}))

    if not precision.bf16_units(precision.cpu_info()[1]):
        pytest.skip("this CPU has no bf16 units: auto is fp32 whatever the probe says")
    K = 3
    base = TINY + ["--precision", "auto", "--model_save_step", str(K)]
    probe_says(2.0)
    whole, split = whole_and_resumed(tmp_path, base, K, before_resume=lambda: probe_says(0.5))
    config = json.loads((tmp_path / "models" / "split" / "config.json").read_text())
    assert config["precision"] == "bf16" and config["precision_reason"].startswith("auto: kept from the run")
    assert [(r["d_loss"], r["g_loss"]) for r in whole] == [(r["d_loss"], r["g_loss"]) for r in split]
    # a fresh auto run today follows today's probe
    fresh = main.parse_args(base + out_args(tmp_path, "fresh"))
    assert fresh.precision == "fp32" and "under the 1.15x needed" in fresh.precision_reason


def test_auto_is_resolved_in_the_saved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = main.parse_args(TINY + out_args(tmp_path, "a") + ["--precision", "auto", "--device", "cpu"])
    assert config.precision in ("fp32", "bf16") and config.precision_reason.startswith("auto: ")


# ----------------------------------------------------------------------------- quality parity

def test_parity_script_trains_both_precisions_and_compares_fid_and_curves(tmp_path, capsys):
    """tools.precision_parity at smoke size with evaluate.py's stand-in features: 2 precisions x 2
    seeds of real main.py runs, FID/KID of each, the curves' gaps, a table and parity.json; a second
    call keeps the finished runs."""
    from PIL import Image
    from data_loader import SyntheticFaces
    from tools import precision_parity
    real = tmp_path / "real"
    real.mkdir()
    faces = SyntheticFaces(24, 32, seed=7)
    for i in range(24):
        Image.fromarray(faces.face(i)[0]).save(real / f"{i:03d}.png")
    argv = ["--seeds", "0,1", "--real", str(real), "--features", "randconv", "--num_samples", "24",
            "--num_real", "24", "--kid_subset_size", "12", "--eval_batch_size", "12", "--out", str(tmp_path / "p"),
            "--", *TINY, "--total_step", "3", "--log_step", "1"]
    report = precision_parity.main(argv)
    out = capsys.readouterr().out
    runs = report["runs"]
    assert set(runs) == {"fp32", "bf16"} and all(set(r) == {"0", "1"} for r in runs.values())
    assert all(r["step"] == 3 and r["fid"] > 0 for p in runs.values() for r in p.values())
    assert runs["fp32"]["0"]["fid"] != runs["fp32"]["1"]["fid"]  # the seeds trained different models
    for prec in ("fp32", "bf16"):
        config = json.loads((tmp_path / "p" / "models" / f"{prec}_seed1" / "config.json").read_text())
        assert config["precision"] == prec and config["seed"] == 1
    gaps = report["curve_gaps"]
    assert {"d_loss", "g_loss", "|gamma/G8|", "|gamma/D4|"} <= set(gaps)  # gammas by magnitude: the sign is arbitrary
    final = runs["fp32"]["0"]["final"]  # the table's last values keep the sign
    last = [r for r in metrics(tmp_path / "p" / "models" / "fp32_seed0") if "gamma/G8" in r][-1]
    assert final["gamma/G8"] == last["gamma/G8"] and final["d_loss"] == last["d_loss"]
    assert all(v >= 0 for g in gaps.values() for v in g.values())
    assert gaps["d_loss"]["bf16"] > 0  # bf16 did not train bit-identically to fp32
    assert "bf16 FID" in report["verdicts"]["bf16"] and "seeds' spread" in report["verdicts"]["bf16"]
    assert "NOT comparable to published numbers" in out and "precision seed" in out
    assert json.loads((tmp_path / "p" / "parity.json").read_text())["verdicts"] == report["verdicts"]
    # run again: every run is finished, so nothing trains further and the numbers are the same
    again = precision_parity.main(argv)
    assert again["runs"] == report["runs"]


def test_the_default_is_auto_and_the_run_says_what_it_chose(tmp_path):
    """No --precision: auto decides (here from the session's one cached probe, tests/conftest.py) and
    config.json records the resolved precision, never 'auto', with the reason."""
    assert run_inprocess(TINY + out_args(tmp_path, "default") + ["--total_step", "1"]) is None
    saved = json.loads((tmp_path / "models" / "default" / "config.json").read_text())
    assert saved["precision"] in ("fp32", "bf16") and saved["precision_reason"].startswith("auto: ")
    units = precision.bf16_units(precision.cpu_info()[1])
    if units:
        assert "probe (cached" in saved["precision_reason"], saved["precision_reason"]  # "(cached under load …)" too
    else:
        assert saved["precision"] == "fp32"
