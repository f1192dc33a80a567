"""Attention through training (--view film, explorer.Film) on a real tiny run that saved
several checkpoints: the strip and the GIF hold one column / frame per checkpoint, in step order,
each drawn from that checkpoint's generator for the same z and query."""
import json
import os
import re
import shutil
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from attention import cell_to_pixel, pixel_to_cell  # noqa: E402
from checkpoint import list_checkpoints, saved_steps  # noqa: E402
from conftest import ROOT, SMOKE, explorer_cli as cli, is_png, one_thread_env  # noqa: E402
from explorer import Explorer, Film, film_checkpoints  # noqa: E402
from tools.dashboard_screenshot import CHROMIUM, chromium_page  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 32px run of 6 steps with a checkpoint every 2: ckpt_2, ckpt_4, ckpt_6 and latest.pt."""
    tmp = tmp_path_factory.mktemp("film")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), *SMOKE, "--total_step", "6", "--model_save_step", "2",
           "--log_step", "2", "--sample_step", "6", "--version", "t",
           "--model_save_path", str(tmp / "models"), "--sample_path", str(tmp / "samples")]
    subprocess.run(cmd, check=True, cwd=tmp, env=one_thread_env(), capture_output=True, timeout=300)
    assert saved_steps(str(tmp / "models" / "t")) == [2, 4, 6]
    return tmp / "models" / "t"


def gif_frames(path):
    """(number of frames, the steps the GIF's comment lists)."""
    with Image.open(path) as gif:
        return gif.n_frames, gif.info["comment"].decode()


def test_cli_writes_the_strip_and_a_gif_frame_per_checkpoint(run_dir, tmp_path, capsys):
    for given in (run_dir, run_dir / "latest.pt"):  # the run folder or a checkpoint in it
        png = tmp_path / "film.png"
        assert cli("--checkpoint", given, "--view", "film", "--out", png, "--pixel", "20,9") == (0, "")
        assert is_png(png) and gif_frames(tmp_path / "film.gif") == (3, "steps 2,4,6")
        assert "steps 2, 4, 6: wrote" in capsys.readouterr().out
    # a real process, headless
    r = subprocess.run([sys.executable, os.path.join(ROOT, "visualize_attn.py"), "--checkpoint", run_dir,
                        "--view", "film", "--out", tmp_path / "sub.png", "--raw_g", "--layer", "G8"],
                       cwd=tmp_path, env=one_thread_env(DISPLAY=""), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert is_png(tmp_path / "sub.png") and gif_frames(tmp_path / "sub.gif") == (3, "steps 2,4,6")
    assert "raw generator weights" in r.stdout


def test_film_columns_are_the_saved_steps_same_z_same_query(run_dir):
    pixel = (20, 9)
    film = Film(str(run_dir), seed=3, pixel=pixel)
    assert film.steps == saved_steps(str(run_dir)) == [2, 4, 6]
    for f, path in zip(film.frames, list_checkpoints(str(run_dir))):
        # each frame is what the explorer of that checkpoint shows for seed 3 (the same z)
        ex = Explorer.from_checkpoint(path, verbose=False)
        np.testing.assert_array_equal(f["image"], ex.image(3))
        cell, m, stats = ex.query(3, "G16", pixel=pixel)
        assert f["cell"] == cell == pixel_to_cell(*pixel, (16, 16), (32, 32))
        np.testing.assert_array_equal(f["map"], m)
        assert f["stats"]["gamma"] == stats["gamma"]
    assert not np.array_equal(film.frames[0]["image"], film.frames[-1]["image"])  # training moved G

    fig, axes = film.figure(k=10)
    assert len(axes["image"]) == len(axes["map"]) == 3
    for ax, f in zip(axes["image"], film.frames):
        assert ax.get_title() == f"step {f['step']}\ngamma {f['stats']['gamma']:+.4f}"
        cross = next(line for line in ax.lines if line.get_gid() == "query")
        assert (cross.get_xdata()[0], cross.get_ydata()[0]) == cell_to_pixel(*f["cell"], (16, 16), (32, 32))
        dots = next(c for c in ax.collections if c.get_gid() == "topk")
        assert len(dots.get_offsets()) == 10
    assert "EMA G: G16, seed 3" in fig._suptitle.get_text()


def test_max_frames_keeps_evenly_spaced_checkpoints_and_the_last(run_dir, tmp_path):
    assert Film(str(run_dir), max_frames=2).steps == [2, 6]
    assert Film(str(run_dir), max_frames=1).steps == [6]
    many = tmp_path / "many"  # the choice depends on the file names only
    many.mkdir()
    for step in range(1, 11):
        (many / f"ckpt_{step:07d}.pt").touch()
    picked = [os.path.basename(p) for p in film_checkpoints(str(many), 4)]
    assert picked == ["ckpt_0000001.pt", "ckpt_0000004.pt", "ckpt_0000007.pt", "ckpt_0000010.pt"]
    assert len(film_checkpoints(str(many), 12)) == 10


def test_one_checkpoint_is_a_film_of_one_frame(run_dir, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(run_dir / "ckpt_0000004.pt", one / "ckpt_0000004.pt")
    alone = tmp_path / "exported.pt"  # a file outside any run
    shutil.copy(run_dir / "ckpt_0000002.pt", alone)
    for given, step in ((one, 4), (alone, 2)):
        png = tmp_path / "one.png"
        assert cli("--checkpoint", given, "--view", "film", "--out", png) == (0, "")
        assert is_png(png, (150, 150)) and gif_frames(tmp_path / "one.gif") == (1, f"steps {step}")


def test_bad_film_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "x.png"
    cases = [(("--max_frames", "0"), "--max_frames must be positive, got 0"),
             (("--checkpoint", empty), "holds no step checkpoints"),
             (("--checkpoint", tmp_path / "missing.pt"), "does not exist"),
             (("--layer", "G32"), "its attention layers are G8, G16")]
    for args, expected in cases:
        full = ("--checkpoint", run_dir, "--view", "film", "--out", out, *args)
        code, message = cli(*full)
        assert code != 0 and expected in message and "\n" not in message.strip(), (args, message)
    capsys.readouterr()
    assert cli("--checkpoint", run_dir, "--view", "film", "--out", out, "--max_frames", "many")[0] == 2
    err = capsys.readouterr().err  # argparse's own error: one line too
    assert "invalid int value: 'many'" in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "x.gif").exists()


def test_the_page_has_a_slider_through_the_runs_checkpoints(run_dir, tmp_path):
    page = tmp_path / "page.html"
    assert cli("--checkpoint", os.path.join(run_dir, "latest.pt"), "--view", "html", "--seeds", "0",
               "--out", page)[0] == 0
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>',
                                page.read_text(), re.S).group(1))
    frames = data["film"]["frames"]
    assert [f["step"] for f in frames] == saved_steps(run_dir) == [2, 4, 6]
    assert "through training" in data["film"]["title"]
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed")
    with chromium_page() as (p, urls):
        p.goto(page.as_uri())
        p.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert p.text_content("#film-label") == "step 6 (3 of 3)"  # opens at the last checkpoint
        p.eval_on_selector("#film-step", "s => { s.value = 0; s.dispatchEvent(new Event('input')); }")
        assert p.text_content("#film-label") == "step 2 (1 of 3)"
        assert p.get_attribute("#film-image", "src") == frames[0]["image"]
        assert all(u.startswith(("file:", "data:")) for u in urls)
    # a file outside a run has no slider
    single = tmp_path / "one"
    single.mkdir()
    shutil.copy(os.path.join(run_dir, "latest.pt"), single / "model.pt")
    assert cli("--checkpoint", single / "model.pt", "--view", "html", "--seeds", "0", "--out", page)[0] == 0
    assert '"film":null' in page.read_text()
