"""main.py end to end, as a user runs it: a real subprocess, real files, a real visdom server."""
import json
import os

import pytest
import torch

from checkpoint import load_checkpoint, load_generator
from conftest import CELEBA_SAMPLE, SMOKE, free_port, metrics, run_main


def test_short_run_writes_samples_metrics_checkpoint_and_resumes(tmp_path):
    out = run_main(tmp_path, "--total_step", "6", "--log_step", "2", "--sample_step", "3",
                   "--model_save_step", "3", "--version", "t", "--no_visdom").stdout
    assert "device: cpu" in out and "step 6/6" in out and "gamma G8" in out
    run = tmp_path / "models" / "t"
    assert sorted(p.name for p in (tmp_path / "samples" / "t").iterdir()) == ["0000003_fake.png", "0000006_fake.png"]
    assert [r["step"] for r in metrics(run)] == [2, 4, 6]
    assert {"d_loss_real", "d_loss_fake", "d_loss", "g_loss", "gamma/G8", "gamma/D4", "it_s"} <= set(metrics(run)[0])
    assert json.loads((run / "config.json").read_text())["total_step"] == 6

    ckpt = torch.load(run / "latest.pt", weights_only=True)  # self-describing, safe to load
    assert ckpt["step"] == 6 and ckpt["config"]["version"] == "t"
    assert {"G", "D", "opt_g", "opt_d", "rng", "fixed_z", "model_args"} <= set(ckpt)
    assert os.path.samefile(run / "latest.pt", run / "ckpt_0000006.pt")

    G = load_generator(str(run / "latest.pt"))  # from the file alone, no flags
    assert G(torch.randn(2, 16)).shape == (2, 3, 32, 32)

    out = run_main(tmp_path, "--total_step", "10", "--log_step", "2", "--sample_step", "3",
                   "--model_save_step", "5", "--version", "t", "--no_visdom", "--resume").stdout
    assert "resumed from" in out and "at step 6" in out
    assert [r["step"] for r in metrics(run)] == [2, 4, 6, 8, 10]  # the loss curve continues
    assert load_checkpoint(str(run / "latest.pt"))["step"] == 10

    out = run_main(tmp_path, "--total_step", "8", "--log_step", "2", "--version", "t", "--no_visdom",
                   "--pretrained_model", "3").stdout
    assert "at step 3" in out
    assert [r["step"] for r in metrics(run)] == [2, 4, 6, 8]  # steps past 3 were run again


def test_visdom_server_receives_losses_gamma_and_samples(tmp_path):
    visdom_server = pytest.importorskip("visdom_server")
    if visdom_server.missing_static() and not visdom_server.npm_available():
        pytest.skip("visdom front end not installed and no npm to install it")
    import visdom
    port = free_port()
    server = visdom_server.start_server(port, env_path=str(tmp_path / "env"))
    try:
        visdom_server.wait_until_up(port, proc=server)
        out = run_main(tmp_path, "--total_step", "6", "--log_step", "2", "--sample_step", "3",
                       "--version", "dash", "--visdom", "--visdom_server", "http://127.0.0.1",
                       "--visdom_port", str(port)).stdout
        assert f"dashboard: http://127.0.0.1:{port}/env/dash " in out  # the run's own env, not the server's front page
        vis = visdom.Visdom(server="http://127.0.0.1", port=port, env="dash",
                            use_incoming_socket=False, raise_exceptions=True)
        loss = json.loads(vis.get_window_data("loss", env="dash"))
        names = [trace["name"] for trace in loss["content"]["data"]]
        assert names == ["d_loss_real", "d_loss_fake", "d_loss", "g_loss"]
        assert list(loss["content"]["data"][3]["x"]) == [2, 4, 6]
        logged = [r["g_loss"] for r in metrics(tmp_path / "models" / "dash")]
        assert loss["content"]["data"][3]["y"] == pytest.approx(logged)
        gamma = json.loads(vis.get_window_data("gamma", env="dash"))
        assert [t["name"] for t in gamma["content"]["data"]] == ["gamma/G8", "gamma/G16", "gamma/D8", "gamma/D4"]
        assert json.loads(vis.get_window_data("samples", env="dash"))["type"] == "image"
    finally:
        visdom_server.stop_server(server)


def test_no_visdom_server_warns_once_and_trains_on(tmp_path):
    proc = run_main(tmp_path, "--total_step", "4", "--log_step", "2", "--version", "nodash", "--visdom",
                    "--visdom_port", str(free_port()))
    assert proc.stderr.count("visdom: no dashboard") == 1
    assert "step 4/4" in proc.stdout


@pytest.mark.skipif(not CELEBA_SAMPLE.is_dir(), reason="real CelebA sample (../shared/data/celeba_sample) not here")
def test_trains_on_the_real_celeba_sample(tmp_path):
    out = run_main(tmp_path, "--dataset", "celeb", "--image_path", str(CELEBA_SAMPLE), "--total_step", "2",
                   "--log_step", "1", "--version", "celeb", "--no_visdom").stdout
    assert "data: celeb, 2000 images at 32px" in out and "step 2/2" in out


CLI_ERRORS = [
    (["--total_step", "0"], "--total_step must be positive, got 0"),
    (["--log_step", "-5"], "--log_step must be positive"),
    (["--imsize", "48"], "image size must be a power of two from 32 to 256, got 48"),
    (["--imsize", "512"], "power of two from 32 to 256, got 512"),
    (["--dataset", "lsun"], "argument --dataset: invalid choice: 'lsun'"),
    (["--g_attn", "64"], "--g_attn 64 is not possible at image size 32: valid resolutions are 4,8,16"),
    (["--d_attn", "8,x"], "is not a comma-separated list"),
    (["--g_lr", "0"], "--g_lr must be positive"),
    (["--version", "a/b"], "must be a plain folder name"),
    (["--resume", "--version", "never_trained"], "nothing to resume"),
    (["--pretrained_model", "7", "--version", "never_trained"], "nothing to resume"),
]
if not torch.cuda.is_available():
    CLI_ERRORS.append((["--device", "cuda"], "CUDA is not available on this machine; use --device cpu"))


@pytest.mark.parametrize("args,message", CLI_ERRORS)
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    import main
    from cli import run
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        run("main.py", main.main, [*SMOKE, "--model_save_path", str(tmp_path / "m"), *args])
    code = exit.value.code  # argparse prints and exits 2; later checks exit with the message
    assert code not in (0, None)
    lines = (code if isinstance(code, str) else capsys.readouterr().err).strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("args,message", [
    (["--batch_size", "abc"], "argument --batch_size: invalid int value: 'abc'"),
    (["--dataset", "celeb", "--image_path", "/nonexistent/celeba"], "'/nonexistent/celeba' does not exist: get CelebA"),
])
def test_cli_errors_from_the_real_command(tmp_path, args, message):
    proc = run_main(tmp_path, "--no_visdom", *args, check=False, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr


def test_unwritable_save_path_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    proc = run_main(tmp_path, "--no_visdom", "--total_step", "2", "--model_save_path", str(blocker / "models"),
                    check=False)
    assert proc.returncode != 0 and "--model_save_path" in proc.stderr and "not writable" in proc.stderr
    assert "step" not in proc.stdout.replace("device", "")
