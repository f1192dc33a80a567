"""The standalone HTML explorer page: a planted attention peak is in the page's data as the query's
first top-k cell; in headless Chromium a click on a known pixel shows that query, locks it, and draws
the cross and the markers at the cells attention.py computes; the page asks for nothing but itself;
a 64px page stays under 25 MB; the CLI writes it from a real checkpoint."""
import json
import os
import re
import time

import numpy as np
import pytest
import torch

import attention as at
import attention_page as ap
from attention_stats import map_stats
from conftest import explorer_cli as cli
from explorer import Explorer
from sagan_models import Discriminator, Generator
from test_attention_viz import planted_map, tiny_g
from tools.dashboard_screenshot import CHROMIUM, chromium_page

SEEDS = [0, 3]
PLANTED = "G16"
QUERY_PIXEL = (13, 6)                 # G16 cell (3, 6) of the 32px image
QUERY = (3, 6)
PEAK, SECOND = (12, 2), (0, 15)       # far from the query: not where the cross is


def planted_explorer():
    """tiny_g and a D, with G16's row of query cell QUERY replaced by a planted map (a forward hook on
    the layer: every path that asks the layer for rows, the page's included, gets it)."""
    G = tiny_g()
    torch.manual_seed(0)
    D = Discriminator(32, conv_dim=8, attn_res=[8, 4]).eval()
    row = torch.from_numpy(planted_map(16, 16, PEAK, SECOND)).flatten()  # (256,)
    n = at.cell_to_index(*QUERY, 16)

    def plant(module, args, kwargs, output):
        out, attention = output
        queries = kwargs.get("queries")
        if attention is None or queries is None:
            return output
        hit = (queries == n).to(attention.device)                          # (Q,)
        return out, torch.where(hit[None, :, None], row.to(attention), attention)

    G.attn["16"].register_forward_hook(plant, with_kwargs=True)
    return Explorer(G, D)


@pytest.fixture(scope="module")
def explorer():
    return planted_explorer()


@pytest.fixture(scope="module")
def page(explorer, tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "page.html"
    size, seconds = ap.write_page(explorer, str(path), SEEDS)
    print(f"32px page, {len(SEEDS)} seeds: {size / 1e6:.2f} MB in {seconds:.1f} s")
    return path


def page_json(path):
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def layer_arrays(data, seed_index, name, k=at.TOPK):
    L = next(L for L in data["layers"] if L["name"] == name)
    N = L["H"] * L["W"]
    d = data["seeds"][seed_index]["layers"][name]
    return dict(weights=ap.unpack(d["weights"], "u1", (N, N)), top=ap.unpack(d["top"], "u2", (N, k)),
                top_w=ap.unpack(d["top_w"], "f4", (N, k)), stats=ap.unpack(d["stats"], "f4", (N, 3)),
                ctop=ap.unpack(d["ctop"], "u2", (N, k)))


# ----------------------------------------------------------------------------- the page's data

def test_the_pages_data_holds_a_planted_peak_first_and_the_figures_numbers(explorer, page):
    data = page_json(page)
    assert [L["name"] for L in data["layers"]] == ["G8", "G16", "D8", "D4"]
    assert [s["seed"] for s in data["seeds"]] == SEEDS and data["imsize"] == 32
    planted = planted_map(16, 16, PEAK, SECOND).flatten()
    n = at.cell_to_index(*QUERY, 16)
    for s in range(len(SEEDS)):
        a = layer_arrays(data, s, PLANTED)
        assert at.index_to_cell(a["top"][n, 0], 16) == PEAK
        assert at.index_to_cell(a["top"][n, 1], 16) == SECOND
        assert a["top_w"][n, :2] == pytest.approx(planted[[at.cell_to_index(*PEAK, 16),
                                                           at.cell_to_index(*SECOND, 16)]])
        assert a["weights"][n].argmax() == at.cell_to_index(*PEAK, 16) and a["weights"][n].max() == 255
        # the numbers of the figure for that query (attention.map_stats)
        st = map_stats(planted, n, (16, 16), (32, 32))
        assert a["stats"][n] == pytest.approx([st["top_mass"], st["entropy"], st["dist"]], rel=1e-5)
    # every other layer: the same cells as the explorer's figures mark (attention.topk_cells)
    for name in ("G8", "D8", "D4"):
        H, W = at.map_hw(name)
        a = layer_arrays(data, 1, name)
        for pixel in ((0, 0), QUERY_PIXEL, (31, 17)):
            cell, m, st = explorer.query(SEEDS[1], name, pixel=pixel)
            q = at.cell_to_index(*cell, W)
            assert [at.index_to_cell(t, W) for t in a["top"][q]] == [(i, j) for i, j, _ in at.topk_cells(m)]
            assert a["stats"][q] == pytest.approx([st["top_mass"], st["entropy"], st["dist"]], rel=1e-4)
            assert np.abs(a["weights"][q] / 255 - m.ravel() / m.max()).max() <= 0.5 / 255 + 1e-6


def test_the_page_is_small_at_64px():
    torch.manual_seed(0)
    G = Generator(64, z_dim=16, conv_dim=8).eval()              # attention on 16x16 and 32x32
    D = Discriminator(64, conv_dim=8).eval()                    # on 8x8 and 4x4
    for layer in [*G.attn.values(), *D.attn.values()]:
        layer.gamma.data.fill_(0.5)
    for block in G.blocks:                                      # noisy, nearly uniform maps: the rows
        block[1].weight.data.mul_(4)                            # that compress worst
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sagan_page_64_{os.getpid()}.html")
    try:
        t0 = time.perf_counter()
        size, _ = ap.write_page(Explorer(G, D), path, list(range(8)))
        print(f"64px page, 8 seeds, G16 G32 D8 D4: {size / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
    finally:
        os.remove(path)
    assert size < 25e6


# ----------------------------------------------------------------------------- in Chromium

@pytest.fixture(scope="module")
def browser_page(page):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    pytest.importorskip("playwright", reason="playwright is not installed (requirements.txt)")
    with chromium_page() as (p, urls):
        errors = []
        p.on("pageerror", lambda e: errors.append(str(e)))
        p.goto(page.as_uri())
        p.wait_for_selector("body[data-ready='1']", timeout=30000)
        yield p, urls, errors


def at_pixel(p, panel, pixel):
    """Page coordinates of image pixel (x, y)'s centre on a panel."""
    box = p.locator(f"#panel-{panel} .view").bounding_box()
    return box["x"] + (pixel[0] + 0.5) * box["width"] / 32, box["y"] + (pixel[1] + 0.5) * box["height"] / 32


def shown(p):
    """What the page shows: the query and, per layer, its cell, cross and top-k markers (SVG, image units)."""
    return p.evaluate("""() => ({
      query: document.getElementById('query').textContent,
      locked: document.getElementById('query').dataset.locked,
      image_cross: [...document.querySelectorAll('#panel-image svg .query')].map(g => [+g.dataset.x, +g.dataset.y]),
      layers: Object.fromEntries([...document.querySelectorAll('.panel')].filter(e => e.id !== 'panel-image')
        .map(e => [e.id.slice(6), {cell: e.dataset.cell,
          cross: [...e.querySelectorAll('svg .query')].map(g => [g.dataset.cell, +g.dataset.x, +g.dataset.y]),
          dots: [...e.querySelectorAll('svg circle.topk')].map(c => [c.dataset.cell, +c.getAttribute('cx'),
                                                                     +c.getAttribute('cy'), +c.getAttribute('r')]),
          stats: e.querySelector('.stats').textContent}]))})""")


def settle(p):
    p.evaluate("() => rendering")  # the page's render queue has drawn


def test_a_click_shows_and_locks_that_query_with_markers_at_the_right_cells(explorer, browser_page):
    p, urls, errors = browser_page
    p.mouse.click(*at_pixel(p, "image", QUERY_PIXEL))
    settle(p)
    s = shown(p)
    assert s["query"] == f"query pixel ({QUERY_PIXEL[0]}, {QUERY_PIXEL[1]}) locked" and s["locked"] == "true"
    assert s["image_cross"] == [[QUERY_PIXEL[0] + 0.5, QUERY_PIXEL[1] + 0.5]]
    assert set(s["layers"]) == {"G8", "G16", "D8", "D4"}
    for name, L in s["layers"].items():
        cell, m, st = explorer.query(SEEDS[0], name, pixel=QUERY_PIXEL)
        hw = at.map_hw(name)
        # the page's pixelToCell agrees with attention.pixel_to_cell; the cross at the cell centre
        assert L["cell"] == f"{cell[0]},{cell[1]}"
        assert L["cross"] == [[L["cell"], *at.cell_to_pixel(*cell, hw, (32, 32))]]
        top = at.topk_cells(m)
        assert [d[0] for d in L["dots"]] == [f"{i},{j}" for i, j, _ in top]
        for (_, x, y, r), (i, j, w) in zip(L["dots"], top):
            assert (x, y) == pytest.approx(at.cell_to_pixel(i, j, hw, (32, 32)))
            assert r ** 2 / L["dots"][0][3] ** 2 == pytest.approx(w / top[0][2], rel=1e-4)  # area ~ weight
        assert f"top-10 {st['top_mass']:.1%} (uniform {st['uniform']:.1%})" in L["stats"]
        assert f"H/logN {st['entropy']:.2f}  dist {st['dist']:.1f}px (uniform {st['dist_uniform']:.1f})" in L["stats"]
    assert s["layers"][PLANTED]["cell"] == "3,6"
    assert s["layers"][PLANTED]["dots"][0][:3] == [f"{PEAK[0]},{PEAK[1]}", *at.cell_to_pixel(*PEAK, (16, 16), (32, 32))]

    # locked: hovering elsewhere changes nothing; a second click unlocks, then hovering previews
    p.mouse.move(*at_pixel(p, "G8", (30, 30)))
    settle(p)
    assert shown(p) == s
    p.mouse.click(*at_pixel(p, "G8", (30, 30)))
    p.mouse.move(*at_pixel(p, "D4", (2, 25)))
    settle(p)
    s2 = shown(p)
    assert s2["query"] == "query pixel (2, 25)" and s2["locked"] == "false"
    assert s2["layers"]["D4"]["cell"] == "%d,%d" % at.pixel_to_cell(2, 25, (4, 4), (32, 32))

    # another seed, the contribution map: its own top-k (attention.contribution_rows)
    p.select_option("#seed", "1")
    p.select_option("#mode", "contribution")
    p.mouse.click(*at_pixel(p, "image", QUERY_PIXEL))
    settle(p)
    s3 = shown(p)
    _, _, contrib, _ = explorer.contribution(SEEDS[1], "G8", pixel=QUERY_PIXEL)
    assert [d[0] for d in s3["layers"]["G8"]["dots"]] == [f"{i},{j}" for i, j, _ in at.topk_cells(contrib)]
    assert "sum ||gamma a v||" in s3["layers"]["G8"]["stats"]

    assert not errors
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls  # no network, no server


# ----------------------------------------------------------------------------- the command

def test_cli_writes_the_page_from_a_checkpoint(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "page.html"
    assert cli("--checkpoint", checkpoint, "--view", "html", "--seeds", "0-3", "--out", out) == (0, "")
    said = capsys.readouterr().out
    assert re.search(r"wrote .*page\.html: \d+\.\d\d MB, 4 seeds, built in", said), said
    data = page_json(out)
    # the smoke run's G (attention at 8, 16) and, without --with_d, its D (8, 4): every layer
    assert [L["name"] for L in data["layers"]] == ["G8", "G16", "D8", "D4"]
    assert [s["seed"] for s in data["seeds"]] == [0, 1, 2, 3]
    assert f"weights of the {data['generator']}" in data["describe"]
    code, msg = cli("--checkpoint", checkpoint, "--view", "html", "--out", tmp_path / "page.png")
    assert code == 1 and "--view html writes a .html file" in msg
