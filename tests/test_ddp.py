"""DDP under torchrun on CPU (gloo, 2 processes): the same run as one process on the same global batch.

Real `torchrun --standalone --nproc_per_node=2 main.py` subprocesses. With --sync_bn the two runs do
the same arithmetic in a different order, so losses and weights agree to float precision, except the
conv biases that feed a BatchNorm: BatchNorm subtracts them again, so their true gradient is exactly
zero and Adam turns the float noise left in it into steps of about lr; those biases (and the running
means they shift) are compared loosely, everything else tightly.
"""
import os
import shutil
import subprocess

import pytest
import torch

from conftest import main_command, metrics, one_thread_env

# fp32: the comparison is "the same arithmetic in another order", to float precision
ARGS = ["--total_step", "5", "--sample_step", "5", "--model_save_step", "1", "--sync_bn", "--ema_decay", "0.9",
        "--precision", "fp32"]
GLOBAL_BATCH = 8


def train(tmp_path, version, nproc, *extra):
    python, *main = main_command(tmp_path, *ARGS, "--batch_size", GLOBAL_BATCH // nproc, "--version", version, *extra)
    launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [python]
    proc = subprocess.run(launcher + main, cwd=tmp_path, env=one_thread_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def ckpt(tmp_path, version, step):
    return torch.load(tmp_path / "models" / version / f"ckpt_{step:07d}.pt", weights_only=True)


def pre_bn_bias(name):
    # blocks.<i>.0.bias is the transposed conv's bias, followed by BatchNorm in blocks.<i>.1
    parts = name.split(".")
    return name.startswith("blocks.") and ((parts[2] == "0" and parts[-1] == "bias")
                                           or parts[-1] == "running_mean")


def assert_same_run(a, b, where):
    assert a["step"] == b["step"]
    for net in ("G", "D", "G_ema"):
        for name, t in a[net].items():
            u = b[net][name]
            if t.is_floating_point():
                atol = 1e-3 if net != "D" and pre_bn_bias(name) else 2e-5
                assert torch.allclose(t, u, atol=atol, rtol=1e-4), \
                    f"{where}: {net}.{name} differs by {(t - u).abs().max().item():.3g}"
            else:
                assert torch.equal(t, u), f"{where}: {net}.{name}"


def assert_same_losses(ma, mb, where):
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ("d_loss_real", "d_loss_fake", "g_loss"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), f"{where} step {ra['step']} {k}"


def copy_run_at(tmp_path, src, dst, step):
    """A run folder holding src's checkpoint `step` as latest.pt, as if dst had stopped there."""
    folder = tmp_path / "models" / dst
    folder.mkdir(parents=True)
    name = f"ckpt_{step:07d}.pt"
    shutil.copy(tmp_path / "models" / src / name, folder / name)
    shutil.copy(tmp_path / "models" / src / name, folder / "latest.pt")
    shutil.copy(tmp_path / "models" / src / "metrics.jsonl", folder / "metrics.jsonl")


def test_two_gloo_processes_train_like_one_and_resume_each_other(tmp_path):
    # A: two processes from scratch. B: one process resumes A at step 2 -> steps 3..5 must equal A's.
    # C: two processes resume B at step 4 -> step 5 must equal A's again.
    out_a = train(tmp_path, "A", 2)
    copy_run_at(tmp_path, "A", "B", 2)
    out_b = train(tmp_path, "B", 1, "--resume")
    copy_run_at(tmp_path, "B", "C", 4)
    out_c = train(tmp_path, "C", 2, "--resume")

    # rank 0 alone speaks and writes: one status line per step, one sample grid, its checkpoints
    assert out_a.count("done: step 5") == 1 and out_a.count("step 3/5 |") == 1, out_a
    assert "2 processes, global batch 8" in out_a and "global batch" not in out_b
    assert sorted(os.listdir(tmp_path / "samples" / "A")) == ["0000005_fake.png"]
    saved = sorted(f for f in os.listdir(tmp_path / "models" / "A") if f.endswith(".pt"))
    assert saved == [f"ckpt_{s:07d}.pt" for s in range(1, 6)] + ["latest.pt"]
    a5 = ckpt(tmp_path, "A", 5)
    assert a5["config"]["world_size"] == 2 and a5["config"]["batch_size"] == 4
    # saved unwrapped: plain names (no DDP 'module.' prefix) that load into a plain Generator
    assert not any(k.startswith("module.") for k in a5["G"]) and "G_ema" in a5

    # the same global batches, noise and averaged gradients: the same run on 1 and 2 processes
    assert out_b.count("resumed from") == 1 and out_c.count("resumed from") == 1
    assert_same_losses(metrics(tmp_path / "models" / "A"), metrics(tmp_path / "models" / "B"), "2 then 1 process")
    for step in (3, 4, 5):
        assert_same_run(ckpt(tmp_path, "A", step), ckpt(tmp_path, "B", step), f"2 -> 1 process, step {step}")
    assert_same_run(a5, ckpt(tmp_path, "C", 5), "1 -> 2 processes, step 5")
    assert_same_losses(metrics(tmp_path / "models" / "A"), metrics(tmp_path / "models" / "C"), "1 then 2 processes")
