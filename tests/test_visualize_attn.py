"""The attention explorer end to end on a checkpoint made by a real (tiny) main.py run: the CLI's
figures and table, its errors on bad checkpoints, and the notebook executed headless."""
import base64
import io
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import nbformat  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import attention as at  # noqa: E402
from checkpoint import CheckpointError, load_models  # noqa: E402
from conftest import CELEBA_SAMPLE, ROOT, explorer_cli as cli, is_png, one_thread_env  # noqa: E402
from explorer import Explorer  # noqa: E402
from sagan_models import Generator  # noqa: E402
from tools.dashboard_screenshot import CHROMIUM, chromium_page  # noqa: E402

NOTEBOOK = os.path.join(ROOT, "visualize_attn.ipynb")
CELEBA = str(CELEBA_SAMPLE / "img_align_celeba")
ENV = one_thread_env()


def test_cli_writes_every_view_headless(checkpoint, tmp_path, capsys):
    # one real subprocess: no display, nothing but the command line
    out = tmp_path / "query.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "visualize_attn.py"), "--checkpoint",
                        checkpoint, "--out", out, "--pixel", "5,20", "--layer", "g8"],
                       cwd=tmp_path, env=dict(ENV, DISPLAY=""), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert is_png(out) and "G8 (8, 8)" in r.stdout
    views = [("layers", "--pixel", "3,3", "--with_d"), ("queries", "--pixel", "1,1", "--pixel", "30,30"),
             ("grid", "--seeds", "0-3", "--cell", "2,2", "--layer", "G8"), ("saliency",),
             ("query", "--cell", "15,0", "--upsample", "bilinear", "--channel", "3", "--topk", "3"),
             ("contribution", "--pixel", "5,20", "--with_d", "--layer", "D8"),
             ("intervene", "--layer", "G8", "--cell", "2,2"), ("intervene", "--intervention", "mean_row")]
    for view, *extra in views:
        png = tmp_path / f"{view}.png"
        assert cli("--checkpoint", checkpoint, "--out", png, "--view", view, *extra) == (0, ""), view
        assert is_png(png), view


def test_cli_table_lists_every_layer(checkpoint, tmp_path, capsys):
    md = tmp_path / "table.md"
    assert cli("--checkpoint", checkpoint, "--table", "--with_d", "--table_images", "3",
               "--table_queries", "5", "--table_out", md)[0] == 0
    text = md.read_text()
    for name in ("G8", "G16", "D8", "D4"):
        assert f"| {name} |" in text
    assert "3 generated images x 5 query cells" in text and text.strip() in capsys.readouterr().out
    assert "| verdict | Δ remove | Δ uniform | Δ mean row |" in text


def test_cli_table_as_json_lines(checkpoint, capsys):
    assert cli("--checkpoint", checkpoint, "--table", "--json", "--with_d", "--table_images", "2",
               "--table_queries", "4") == (0, "")
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]   # stdout holds nothing else
    assert [r["layer"] for r in rows] == ["G8", "G16", "D8", "D4"]
    for r in rows:
        assert {"gamma", "ablation_delta", "uniform_delta", "mean_row_delta", "delta_of", "verdict"} <= set(r)
        assert r["ablation_delta"] >= 0 and r["n_images"] == 2
    assert "32px generator at step 4" in err                   # what else it says goes to stderr


@pytest.mark.skipif(not os.path.isdir(CELEBA), reason="real CelebA sample not present")
def test_cli_d_attention_on_a_real_image(checkpoint, tmp_path):
    jpg = os.path.join(CELEBA, sorted(os.listdir(CELEBA))[0])
    png = tmp_path / "d.png"
    assert cli("--checkpoint", checkpoint, "--out", png, "--view", "query", "--layer", "D8",
               "--d_image", jpg, "--pixel", "16,12") == (0, "")
    assert is_png(png)


def test_cli_bad_inputs_are_one_line_errors(checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt.pt"  # a real checkpoint cut short, as by a full disk
    data = open(checkpoint, "rb").read()
    corrupt.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    foreign = tmp_path / "seed_G.pt"
    torch.save({"l1.weight": torch.zeros(2, 2)}, foreign)
    wrong = tmp_path / "wrong.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model_args"]["G"]["conv_dim"] = 16  # weights no longer fit the stored architecture
    torch.save(ckpt, wrong)
    out = tmp_path / "x.png"
    cases = [
        (("--checkpoint", tmp_path / "missing.pt", "--out", out), "does not exist"),
        (("--checkpoint", corrupt, "--out", out), "corrupt or truncated"),
        (("--checkpoint", garbage, "--out", out), "garbage.pt"),
        (("--checkpoint", foreign, "--out", out), "not a checkpoint of this project"),
        (("--checkpoint", wrong, "--out", out), "cannot rebuild G"),
        (("--checkpoint", checkpoint, "--out", out, "--layer", "G32"), "its attention layers are G8, G16"),
        (("--checkpoint", checkpoint, "--out", out, "--pixel", "32,0"), "x must be in 0..31"),
        (("--checkpoint", checkpoint, "--out", out, "--layer", "G8", "--cell", "8,0"), "outside the 8x8 map"),
        (("--checkpoint", checkpoint, "--out", tmp_path / "no" / "x.png"), "does not exist"),
        (("--checkpoint", checkpoint), "nothing to do"),
        (("--checkpoint", checkpoint, "--out", out, "--json"), "add --table"),
        (("--checkpoint", checkpoint, "--out", out, "--view", "intervene", "--with_d", "--layer", "D4"),
         "pick a G layer"),
    ]
    for args, expected in cases:
        code, message = cli(*args)
        assert code != 0 and expected in message and "\n" not in message, (args, message)
    assert not out.exists()
    # the same through a real process: one line on stderr, no traceback
    r = subprocess.run([sys.executable, os.path.join(ROOT, "visualize_attn.py"), "--checkpoint",
                        corrupt, "--out", out], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "corrupt" in r.stderr


def test_explorer_shows_the_ema_generator_by_default_and_the_raw_g_on_request(checkpoint, tmp_path, capsys):
    # G_ema planted far from G: every attention gamma at 0.75, which 4 steps of training never reach
    ckpt = torch.load(checkpoint, weights_only=True)
    for key in ckpt["G_ema"]:
        if key.endswith("gamma"):
            ckpt["G_ema"][key] = torch.full_like(ckpt["G_ema"][key], 0.75)
    planted = tmp_path / "planted.pt"
    torch.save(ckpt, planted)

    ema, raw = Explorer.from_checkpoint(planted), Explorer.from_checkpoint(planted, ema=False)
    assert (ema.generator, raw.generator) == ("EMA G", "raw G")
    z = at.z_for_seeds([0], 16)
    for ex, weights in ((ema, "G_ema"), (raw, "G")):  # each draws the images of its own weights
        G = Generator(**ckpt["model_args"]["G"])
        G.load_state_dict(ckpt[weights])
        with torch.no_grad():
            assert torch.allclose(ex.run(0)[0], G.eval()(z)[0], atol=1e-6), weights
    assert "weights of the EMA G" in ema.describe() and "G16 (16, 16) gamma +0.7500" in ema.describe()
    assert "weights of the raw G" in raw.describe() and "+0.7500" not in raw.describe()
    fig, _ = ema.query_figure(0, pixel=ema.default_pixel())
    assert fig._suptitle.get_text().startswith("EMA G: G16, seed 0")
    fig, _ = raw.layers_figure(0)
    assert fig._suptitle.get_text().startswith("raw G: seed 0")

    # the CLI: its printed lines and its table say which generator they show
    capsys.readouterr()
    table = ("--table", "--table_images", "2", "--table_queries", "4")
    assert cli("--checkpoint", planted, *table) == (0, "")
    out = capsys.readouterr().out
    assert "EMA generator weights" in out and "weights of the EMA G" in out and "images by the EMA G" in out
    assert "| G16 | 16x16 | +0.7500 |" in out
    assert cli("--checkpoint", planted, "--raw_g", *table) == (0, "")
    out = capsys.readouterr().out
    assert "raw generator weights (EMA not requested)" in out and "images by the raw G" in out
    assert "+0.7500" not in out


def test_every_way_a_checkpoint_does_not_fit_is_one_line_naming_the_file(checkpoint, tmp_path):
    good = torch.load(checkpoint, weights_only=True)

    def damaged(change):
        ckpt = torch.load(checkpoint, weights_only=True)
        change(ckpt)
        return ckpt

    cases = {
        "args_not_dict": (damaged(lambda c: c.update(model_args=[1, 2])), "its model_args has no 'G' (found list)"),
        "g_args_list": (damaged(lambda c: c["model_args"].update(G=[32, 16])), "model_args['G'] is list, not a dict"),
        "size_str": (damaged(lambda c: c["model_args"]["G"].update(image_size="32")), "['image_size'] is '32' (str), not an integer"),
        "size_float": (damaged(lambda c: c["model_args"]["G"].update(image_size=32.0)), "['image_size'] is 32.0 (float)"),
        "size_bool": (damaged(lambda c: c["model_args"]["G"].update(image_size=True)), "['image_size'] is True (bool)"),
        "attn_float": (damaged(lambda c: c["model_args"]["G"].update(attn_res=[8.0])), "['attn_res'] is [8.0] (list), not an integer or a list"),
        "unknown_arg": (damaged(lambda c: c["model_args"]["G"].update(depth=3)), "cannot rebuild G_ema"),
        "bad_size": (damaged(lambda c: c["model_args"]["G"].update(image_size=48)), "power of two"),
        "negative": (damaged(lambda c: c["model_args"]["G"].update(z_dim=-1)), "cannot rebuild G_ema"),
        "weights_list": (damaged(lambda c: c.update(G_ema=[1, 2])), "'G_ema' is not a state dict"),
        "weights_ints": (damaged(lambda c: c["G_ema"].update({"attn.8.gamma": 3})), "'G_ema' is not a state dict"),
        "config_list": (damaged(lambda c: c.update(config=[1])), "'config' is not a dict"),
        "step_str": (damaged(lambda c: c.update(step="4")), "'step' not an integer"),
        "no_d_args": (damaged(lambda c: c["model_args"].pop("D")), "its model_args has no 'D' (found keys ['G'])"),
    }
    for name, (ckpt, expected) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError) as e:
            load_models(str(path), with_d=True, verbose=False)
        message = str(e.value)
        assert str(path) in message and expected in message and "\n" not in message, (name, message)
    assert load_models(checkpoint, with_d=True, verbose=False).step == good["step"]


def test_committed_notebook_has_no_outputs_and_builds_no_model():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    assert "Generator(" not in source and "load_state_dict" not in source
    assert "SAGAN_CHECKPOINT" in source


def test_notebook_executes_headless(checkpoint, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # a kernel spec of this very interpreter, so the test needs no installed kernel
    spec_dir = tmp_path / "jupyter" / "kernels" / "sagan-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(dict(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="sagan test", language="python")))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SAGAN_CHECKPOINT", checkpoint)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="sagan-test",
                   resources={"metadata": {"path": str(ROOT)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "32px generator at step 4, z_dim 16" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 9  # seven figures and the film's and the explorer's still images
    table = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert table and "| G16 |" in table[0]["data"]["text/markdown"]
    page = next(c for c in nb.cells if c.cell_type == "code" and "notebook_page(" in c.source).outputs
    html = "".join(o.get("data", {}).get("text/html", "") for o in page)
    assert html.startswith("<iframe srcdoc=") and "SAGAN attention explorer" in html  # the clickable page
    film = next(c for c in nb.cells if c.cell_type == "code" and "Film(" in c.source).outputs
    explorer = nb.cells[-1].outputs
    for widget in (film, explorer):  # the slider, and headless its still image
        still = [o for o in widget
                 if {"application/vnd.jupyter.widget-view+json", "image/png"} <= set(o.get("data", {}))]
        assert still
        # shown at the PNG's own pixel size, not stretched to the output's width
        with Image.open(io.BytesIO(base64.b64decode(still[0]["data"]["image/png"]))) as png:
            assert still[0]["metadata"]["image/png"] == dict(width=png.width, height=png.height)
    iframe_fits_its_page(html)


def iframe_fits_its_page(output_html):
    """The notebook's page output in Chromium, in outputs of two widths (its panels wrap
    differently): the iframe is as tall as the page it holds, so nothing scrolls inside it."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    pytest.importorskip("playwright", reason="playwright is not installed (requirements.txt)")
    heights = []
    with chromium_page(width=1400, height=900) as (page, _):
        for width in (1100, 600):
            page.set_content(f'<body style="margin: 0"><div style="width: {width}px">{output_html}</div></body>')
            frame = page.frames[1]
            frame.wait_for_selector("body[data-ready='1']", timeout=30000)
            page.wait_for_timeout(300)  # the ResizeObserver's callback runs after layout
            inner = frame.evaluate("Math.ceil(document.documentElement.getBoundingClientRect().height)")
            outer = page.evaluate("document.querySelector('iframe').getBoundingClientRect().height")
            scroll = frame.evaluate("document.documentElement.scrollHeight - window.innerHeight")
            assert outer == inner and scroll <= 0, (width, outer, inner, scroll)
            heights.append(outer)
    assert heights[1] > heights[0]  # the narrow output wraps the panels into more rows: a taller page
