"""The dashboard's attention panel: query pixels -> map cells, the rows G gives, the picture drawn;
and a finished run replayed from its folder onto a real visdom server on loopback."""
import json

import numpy as np
import pytest
import torch

from attention import cell_to_index, face_pixels, pixel_queries, pixel_to_cell
from attention_colors import colorize
from dashboard import PANEL_HEAD, PANEL_SIDE, QUERY_MARK, render_attention_panel, sample_attention
from sagan_models import Generator


def query_index(x, y, imsize, H, W):
    """The panel's query: the row-major index of the cell holding image pixel (x, y)."""
    return cell_to_index(*pixel_to_cell(x, y, (H, W), (imsize, imsize)), W)


def test_query_index_is_row_major_cell_of_the_pixel():
    assert query_index(0, 0, 32, 8, 8) == 0
    assert query_index(16, 16, 32, 8, 8) == 4 * 8 + 4
    assert query_index(31.9, 0, 32, 8, 8) == 7          # last column, first row
    assert query_index(0, 31.9, 32, 8, 8) == 7 * 8      # first column, last row
    assert query_index(31, 31, 32, 8, 8) == 63          # the last pixel is the last cell
    with pytest.raises(ValueError, match=r"x must be in 0\.\.31"):  # past the edge: not a pixel
        query_index(32, 32, 32, 8, 8)
    # non-square map: i from y and H, j from x and W, index i * W + j
    assert query_index(x=20, y=12, imsize=32, H=4, W=8) == 1 * 8 + 5


def test_attention_rows_are_the_rows_of_the_full_map():
    torch.manual_seed(0)
    G = Generator(32, 16, 8, [8, 16])
    for _ in range(2):  # move BatchNorm's running stats off their defaults
        G(torch.randn(4, 16))
    G.train()
    bn_mean = G.blocks[1][1].running_mean.clone()
    z = torch.randn(3, 16)
    points = list(face_pixels(32).values())

    image, rows = sample_attention(G, z, points)

    assert G.training and torch.equal(G.blocks[1][1].running_mean, bn_mean)  # restored, untouched
    G.eval()
    with torch.no_grad():
        full_img, full = G(z[:1], return_attn=True)  # full[r]: (1, r*r, r*r)
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 1
    assert torch.allclose(image, (full_img[0] + 1) / 2, atol=1e-6)
    assert list(rows) == ["G8", "G16"]
    queries = pixel_queries(G, points)
    for name, m in rows.items():
        r = int(name[1:])
        assert m.shape == (len(points), r, r)
        idx = [query_index(x, y, 32, r, r) for x, y in points]
        assert queries[name].tolist() == idx
        assert torch.allclose(m.flatten(1), full[r][0, idx], atol=1e-6)
        assert torch.allclose(m.flatten(1).sum(1), torch.ones(len(points)), atol=1e-5)


def test_panel_puts_each_map_under_its_query_with_the_hot_cell_where_it_is():
    S, tile, gap, head, side = 32, 112, 2, PANEL_HEAD, PANEL_SIDE
    image = torch.full((3, S, S), 0.5)
    points = [(4.0, 4.0), (28.0, 20.0)]
    maps = {"G8": torch.full((2, 8, 8), 0.5 / 63), "G16": torch.full((2, 16, 16), 0.5 / 255)}
    maps["G8"][0, 6, 1] = 0.5   # query 0, layer 8: hot cell in row 6, column 1
    maps["G16"][1, 2, 13] = 0.5  # query 1, layer 16: hot cell in row 2, column 13

    panel = render_attention_panel(image, maps, points, ["a", "b"], tile=tile)

    assert panel.shape == (head + 3 * (tile + gap) - gap, side + 2 * (tile + gap) - gap, 3)
    hottest = colorize(np.array(1.0)).astype(np.float32)
    coldest = colorize(np.array(1 / 63)).astype(np.float32)

    def cell_centre(q, row, r, i, j):  # pixel of the panel at the centre of cell (i, j)
        cell = tile / r
        return (head + row * (tile + gap) + int((i + 0.5) * cell),
                side + q * (tile + gap) + int((j + 0.5) * cell))

    def blended(rgb):  # heat over the grey sample (0.5 -> 128)
        return 0.75 * rgb + 0.25 * 128

    for q, row, r, (i, j) in [(0, 1, 8, (6, 1)), (1, 2, 16, (2, 13))]:
        y, x = cell_centre(q, row, r, i, j)
        assert np.abs(panel[y, x] - blended(hottest)).max() <= 1, (q, r)
    y, x = cell_centre(0, 1, 8, 2, 5)  # a cold cell of query 0's 8x8 map
    assert np.abs(panel[y, x] - blended(coldest)).max() <= 1
    # the query mark at the query pixel in the sample row of its column
    y, x = head + int(20.5 * tile / S), side + (tile + gap) + int(28.5 * tile / S)
    assert tuple(panel[y, x]) == QUERY_MARK


# ----------------------------------------------------------------------------- replaying a run's folder

def _replay(run_dir, port, *extra, cwd=None):
    import subprocess
    import sys
    from conftest import ROOT, one_thread_env
    return subprocess.run([sys.executable, str(ROOT / "dashboard.py"), str(run_dir), "--visdom_server",
                           "http://127.0.0.1", "--visdom_port", str(port), *map(str, extra)],
                          cwd=cwd or ROOT, env=one_thread_env(), capture_output=True, text=True, timeout=300)


def test_a_finished_run_is_replayed_from_its_folder(checkpoint, visdom_port):
    """`python dashboard.py models/<run>`: every logged step, the newest sample grid and the attention
    panel of latest.pt, in the run's own env; the printed address opens exactly those panels."""
    import json
    import os

    import importlib.util

    import visdom
    from tools.dashboard_screenshot import CHROMIUM
    run_dir = os.path.dirname(checkpoint)
    steps = [json.loads(l)["step"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert steps == [2, 4]

    out = _replay(run_dir, visdom_port)
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"http://127.0.0.1:{visdom_port}/env/t"
    assert f"into {url}" in out.stdout, out.stdout

    vis = visdom.Visdom(server="http://127.0.0.1", port=visdom_port, env="t", raise_exceptions=True,
                        use_incoming_socket=False)
    windows = json.loads(vis.get_window_data(env="t"))
    assert {w: windows[w]["type"] for w in windows} == dict(loss="plot", gamma="plot", samples="image",
                                                             attention="image")
    traces = {t["name"]: t for t in windows["loss"]["content"]["data"]}
    assert traces["g_loss"]["x"] == steps
    assert windows["samples"]["content"]["caption"].startswith("fixed z, step 4 (")
    assert windows["attention"]["content"]["caption"].startswith("step 4, first fixed z")

    again = _replay(run_dir, visdom_port)  # replaces the windows: the curve is not doubled
    assert again.returncode == 0, again.stderr
    traces = {t["name"]: t for t in json.loads(vis.get_window_data(env="t"))["loss"]["content"]["data"]}
    assert traces["g_loss"]["x"] == steps

    if not os.path.exists(CHROMIUM) or importlib.util.find_spec("playwright") is None:
        return  # the server's side is checked above; the page's needs headless Chromium
    from tools.dashboard_screenshot import chromium_page, wait_for_panes
    with chromium_page() as (page, _):
        page.goto(url)  # the address it printed: the run's panels, not the empty 'main' env
        panes = wait_for_panes(page, lambda p: len(p) == 4 and all(x["traces"] or x["image"] for x in p))
        assert sorted(p["title"] for p in panes) == sorted(["t: losses", "t: attention gamma", "samples",
                                                            "attention"]), panes
        page.goto(f"http://127.0.0.1:{visdom_port}/")
        page.wait_for_timeout(2000)
        assert page.evaluate("document.querySelectorAll('.react-grid-item').length") == 0


def test_replay_errors_are_one_line(tmp_path, visdom_port):
    from conftest import free_port

    def fails(run_dir, port, why):
        out = _replay(run_dir, port)
        assert out.returncode == 1 and why in out.stderr, out.stderr
        assert out.stderr.startswith("dashboard.py: error:") and out.stderr.count("\n") == 1, out.stderr

    fails(tmp_path / "nope", visdom_port, "is not a folder")
    fails(tmp_path, visdom_port, "holds no run (no config.json, no latest.pt)")
    config = dict(version="x", sample_path=str(tmp_path / "s"), adv_loss="hinge", g_attn=[], d_attn=[])
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.jsonl").write_text("")
    fails(tmp_path, visdom_port, "has nothing to show yet")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "d_loss": 1.0, "g_loss": 2.0}\n')
    dead = free_port()
    fails(tmp_path, dead, f"no dashboard answers at http://127.0.0.1:{dead}")
    (tmp_path / "s" / "x").mkdir(parents=True)
    (tmp_path / "s" / "x" / "0000004_fake.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    fails(tmp_path, visdom_port, "0000004_fake.png' is not a readable image")
    (tmp_path / "s" / "x" / "0000004_fake.png").unlink()
    (tmp_path / "latest.pt").write_bytes(b"not a checkpoint")
    fails(tmp_path, visdom_port, "latest.pt")
    (tmp_path / "config.json").write_text('{"version": "x"}')
    fails(tmp_path, visdom_port, "lacks adv_loss, d_attn, g_attn: it was not written by this project")
