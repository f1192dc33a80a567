"""The standalone HTML explorer page: a planted attention peak is in the page's data as the query's
first top-k cell; in headless Chromium a click on a known pixel shows that query, locks it, and draws
the cross and the markers at the cells attention.py computes; the page explains itself (its colour
scale is attention_colors', matplotlib's jet; every number has its meaning on hover; contribution mode
shows the contribution's own numbers); the interventions on it are attention.intervene's; the page
asks for nothing but itself; a 64px page stays under 25 MB; the CLI writes it from a real checkpoint."""
import json
import os
import re
import time

import numpy as np
import pytest
import torch

import attention as at
import attention_colors as ac
import attention_page as ap
from attention_stats import map_stats
from conftest import explorer_cli as cli
from explorer import Explorer, Film
from sagan_models import Discriminator, Generator
from test_attention_viz import planted_map, tiny_g
from utils import to_image
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
    return json.loads(m.group(1))


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


def test_the_page_is_small_at_64px(tmp_path):
    torch.manual_seed(0)
    G = Generator(64, z_dim=16, conv_dim=8).eval()              # attention on 16x16 and 32x32
    D = Discriminator(64, conv_dim=8).eval()                    # on 8x8 and 4x4
    for layer in [*G.attn.values(), *D.attn.values()]:
        layer.gamma.data.fill_(0.5)
    for block in G.blocks:                                      # noisy, nearly uniform maps: the rows
        block[1].weight.data.mul_(4)                            # that compress worst
    t0 = time.perf_counter()
    size, _ = ap.write_page(Explorer(G, D), str(tmp_path / "page.html"), list(range(8)))
    print(f"64px page, 8 seeds, G16 G32 D8 D4: {size / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
    assert size < 25e6


def test_one_colour_scale_matplotlibs_jet_in_the_page_and_the_dashboard(page):
    from matplotlib import colormaps
    jet = colormaps["jet"].resampled(1001)           # its own interpolation at 1001 exact points
    v = np.linspace(0, 1, 1001)
    assert np.abs(ac.colorize(v) - 255 * jet(np.arange(1001))[:, :3]).max() <= 0.5 + 1e-6
    assert colormaps[ac.CMAP].name == "jet"
    assert page_json(page)["lut"] == ac.lut().tolist() == ac.colorize(np.linspace(0, 1, 256)).tolist()


def test_contribution_numbers_are_the_contributions_own(explorer, page):
    """top-k share, H/logN and distance of ||gamma a v|| normalised to sum 1, not of the weights;
    n/a (NaN) where gamma is 0 and the layer adds nothing."""
    data = page_json(page)
    for name in ("G8", "G16", "D8"):
        L = next(L for L in data["layers"] if L["name"] == name)
        N = L["H"] * L["W"]
        d = data["seeds"][0]["layers"][name]
        cstats = ap.unpack(d["cstats"], "f4", (N, 3))
        stats = ap.unpack(d["stats"], "f4", (N, 3))
        for pixel in ((0, 0), QUERY_PIXEL, (31, 17)):
            cell, _, contrib, _ = explorer.contribution(SEEDS[0], name, pixel=pixel)
            q = at.cell_to_index(*cell, L["W"])
            if L["gamma"] == 0:
                assert contrib.sum() == 0 and np.isnan(cstats[q]).all()
                continue
            st = map_stats(contrib / contrib.sum(), q, (L["H"], L["W"]), (32, 32))
            assert cstats[q] == pytest.approx([st["top_mass"], st["entropy"], st["dist"]], rel=1e-4)
            assert not np.allclose(cstats[q], stats[q])  # the weights' numbers are another thing


def test_the_interventions_are_attention_intervene_per_seed(explorer, page):
    """Each G layer's image with its attention removed / uniform: PNGs of G under attention.intervene,
    and the change the table's intervention_deltas measures for that one image."""
    data = page_json(page)
    for s, seed in enumerate(SEEDS):
        z = at.z_for_seeds([seed], explorer.G.z_dim)
        deltas = at.intervention_deltas(explorer.G, z)
        ivs = data["seeds"][s]["interventions"]
        assert sorted(ivs) == ["G16", "G8"]
        original = decode_png(data["seeds"][s]["image"])
        for name, layer in at.attention_layers(explorer.G).items():
            for mode in ("remove", "uniform"):
                iv = ivs[name][mode]
                assert iv["delta"] == pytest.approx(float(deltas[name][mode][0]), rel=1e-4, abs=1e-7)
                with torch.no_grad(), at.intervene(layer, mode):
                    want = np.round(to_image(explorer.G(z)[0]) * 255)
                image = decode_png(iv["image"])
                assert np.abs(image - want).max() <= 1
                assert at.gamma(layer) != 0 and np.abs(image - original).mean() > 1  # it changes the image


def decode_png(uri):
    """A PNG data: URI -> (h, w, 3) float array of 0..255 values."""
    import base64
    import io

    from PIL import Image
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


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


@pytest.fixture
def other_page(browser_page):
    """Another tab of the module's Chromium (one playwright instance per thread): (page, urls)."""
    tab = browser_page[0].context.browser.new_page(viewport=dict(width=1400, height=900), device_scale_factor=1)
    urls = []
    tab.on("request", lambda request: urls.append(request.url))
    yield tab, urls
    tab.close()


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


def lock_at(p, panel, pixel, seed_index=0, mode="weights"):
    """A known state: seed, map mode, the query locked at image pixel `pixel` of `panel`."""
    p.select_option("#seed", str(seed_index))
    p.select_option("#mode", mode)
    settle(p)
    if p.get_attribute("#query", "data-locked") == "true":
        p.mouse.click(*at_pixel(p, panel, pixel))            # unlocks
    p.mouse.click(*at_pixel(p, panel, pixel))                # locks there
    settle(p)
    assert shown(p)["query"] == f"query pixel ({pixel[0]}, {pixel[1]}) locked"


def test_a_second_click_unlocks_and_the_query_is_at_once_where_the_mouse_is(browser_page):
    p, urls, errors = browser_page
    lock_at(p, "image", QUERY_PIXEL)
    p.mouse.click(*at_pixel(p, "G16", (25, 3)))  # no mouse move after it
    settle(p)
    s = shown(p)
    assert s["query"] == "query pixel (25, 3)" and s["locked"] == "false"
    assert s["layers"]["G16"]["cell"] == "%d,%d" % at.pixel_to_cell(25, 3, (16, 16), (32, 32))
    assert not errors


def test_the_page_shows_its_colour_scale_and_the_peak_under_its_ring(page, browser_page):
    """The colour bar is attention_colors' scale, labelled 0 .. row max, each panel's max printed; the
    planted peak's cell is drawn in the scale's top colour and stays visible through its ring."""
    p, urls, errors = browser_page
    lut = np.array(ac.lut(), dtype=np.float64)
    lock_at(p, "image", QUERY_PIXEL)
    bar = np.array(p.evaluate("""() => { const c = document.getElementById('legend-bar');
      return Array.from(c.getContext('2d').getImageData(0, 0, c.width, 1).data); }""")).reshape(-1, 4)
    assert np.array_equal(bar[:, :3], lut)
    legend = p.text_content("#legend")
    assert "0 (no attention)" in legend and "row max" in legend
    data = page_json(page)
    for L in data["layers"]:
        n = at.cell_to_index(*at.pixel_to_cell(*QUERY_PIXEL, (L["H"], L["W"]), (32, 32)), L["W"])
        top_w = layer_arrays(data, 0, L["name"])["top_w"]
        scale = p.locator(f"#panel-{L['name']} .scale")
        assert scale.locator("canvas").count() == 1 and scale.text_content().startswith("0")
        assert float(scale.locator(".max").get_attribute("data-max")) == pytest.approx(top_w[n, 0], rel=1e-6)
        assert f"max a {top_w[n, 0]:.3g}" in scale.locator(".max").text_content()

    # the planted peak: the scale's top colour at 0.6 over the image, under the largest ring
    x, y = at.cell_to_pixel(*PEAK, (16, 16), (32, 32))                    # image coordinates
    cx, cy = int(x * 256 / 32), int(y * 256 / 32)                          # canvas pixel
    canvas = np.array(p.evaluate(f"""() => Array.from(document.querySelector('#panel-{PLANTED} .view canvas')
      .getContext('2d').getImageData({cx}, {cy}, 1, 1).data)""")[:3], dtype=np.float64)
    image = decode_png(data["seeds"][0]["image"])[int(y), int(x)]
    assert np.abs(canvas - (0.6 * lut[255] + 0.4 * image)).max() <= 2
    dots = shown(p)["layers"][PLANTED]["dots"]
    assert dots[0][0] == f"{PEAK[0]},{PEAK[1]}"
    box = p.locator(f"#panel-{PLANTED} .view").bounding_box()
    from PIL import Image
    import io
    shot = np.asarray(Image.open(io.BytesIO(p.screenshot(clip=dict(x=box["x"] + cx, y=box["y"] + cy,
                                                                     width=1, height=1)))).convert("RGB"))
    assert np.abs(shot[0, 0] - canvas).max() <= 2  # what one sees there: the peak, not a marker
    assert not errors


def stat_spans(p, panel):
    return p.evaluate(f"""() => [...document.querySelectorAll('#panel-{panel} .stats span')]
      .map(s => [s.textContent, s.title])""")


def test_every_number_says_what_it_means_and_d_panels_say_they_look_at_the_image(browser_page):
    p, urls, errors = browser_page
    lock_at(p, "image", QUERY_PIXEL)
    for name in ("G8", "G16", "D8", "D4"):
        spans = stat_spans(p, name)
        starts = ["of the weights", "gamma", "top-10", "H/logN", "dist"]
        assert [t for t, _ in spans] and all(t.startswith(s) for (t, _), s in zip(spans, starts)), spans
        assert all(len(title) > 60 for _, title in spans), spans
        heading = p.text_content(f"#panel-{name} h3")
        assert ("D looking at the generated image" if name[0] == "D" else "G drawing the image") in heading
    assert p.get_attribute("#panel-G16 .scale .max", "title")
    assert not errors


def test_contribution_mode_shows_the_contributions_own_numbers(explorer, browser_page):
    p, urls, errors = browser_page
    lock_at(p, "image", QUERY_PIXEL)
    weights = {name: shown(p)["layers"][name]["stats"] for name in ("G8", "G16", "D4")}
    p.select_option("#mode", "contribution")
    settle(p)
    s = shown(p)["layers"]
    for name in ("G8", "G16"):
        _, _, contrib, _ = explorer.contribution(SEEDS[0], name, pixel=QUERY_PIXEL)
        cell = at.pixel_to_cell(*QUERY_PIXEL, at.map_hw(name), (32, 32))
        st = map_stats(contrib / contrib.sum(), at.cell_to_index(*cell, at.map_hw(name)[1]),
                          at.map_hw(name), (32, 32))
        assert s[name]["stats"] != weights[name]
        assert s[name]["stats"].startswith("of the contribution")
        assert f"top-10 {st['top_mass']:.1%} (uniform {st['uniform']:.1%})" in s[name]["stats"]
        assert f"H/logN {st['entropy']:.2f}  dist {st['dist']:.1f}px (uniform {st['dist_uniform']:.1f})" in s[name]["stats"]
        assert f"sum ||gamma a v|| {contrib.sum():.3g}" in s[name]["stats"]
    assert "top-10 n/a" in s["D4"]["stats"] and "H/logN n/a" in s["D4"]["stats"]  # gamma 0: adds nothing
    assert all(title for _, title in stat_spans(p, "G16"))
    assert p.get_attribute("#panel-G16 .scale .max", "title").startswith("The largest contribution")
    assert not errors


def test_the_interventions_are_on_the_page_for_the_selected_seed(page, browser_page):
    p, urls, errors = browser_page
    data = page_json(page)
    for s in range(len(SEEDS)):
        p.select_option("#seed", str(s))
        settle(p)
        figs = p.evaluate("""() => [...document.querySelectorAll('#iv-rows figure')].map(f => {
          const img = f.querySelector('img');
          return [f.dataset.layer, f.dataset.mode, img.src, img.complete && img.naturalWidth,
                  f.dataset.delta === undefined ? null : +f.dataset.delta, f.textContent]; })""")
        ivs = data["seeds"][s]["interventions"]
        assert [(f[0], f[1]) for f in figs] == [(n, m) for n in ("G8", "G16") for m in ("original", "remove", "uniform")]
        for layer, mode, src, width, delta, text in figs:
            assert width == 32
            if mode == "original":
                assert src == data["seeds"][s]["image"] and delta is None
            else:
                assert src == ivs[layer][mode]["image"] and src != data["seeds"][s]["image"]
                assert delta == pytest.approx(ivs[layer][mode]["delta"], rel=1e-6) and delta > 0
                assert f"Δ {delta:.4f}" in text
    assert "gamma" in p.text_content("#interventions .hint") and "intervene" in p.text_content("#interventions")
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


def test_the_film_says_what_it_shows_and_gives_the_command_for_the_selected_query(checkpoint, tmp_path, other_page):
    """The film is precomputed for one seed, layer and query: the page names them, and for another
    selection shows the command that makes its film; that command runs."""
    import shlex
    film = Film(str(checkpoint), seed=0, pixel=(20, 9))
    ex = Explorer.from_checkpoint(str(checkpoint), with_d=True, verbose=False)
    path = tmp_path / "page.html"
    ap.write_page(ex, str(path), [0, 1], film=ap.film_data(film))
    p, urls = other_page
    p.goto(path.as_uri())
    p.wait_for_selector("body[data-ready='1']", timeout=30000)
    assert "seed 0, layer G16, query pixel (20, 9) only" in p.text_content("#film-title")
    lock_at(p, "image", (20, 9))
    assert p.get_attribute("#film-other", "data-same") == "true"
    lock_at(p, "D8", (3, 28), seed_index=1)   # pointing at D8 selects it
    assert p.get_attribute("#film-other", "data-same") == "false"
    command = p.text_content("#film-command")
    assert all(u.startswith(("file:", "data:")) for u in urls)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "visualize_attn.py"]
    assert argv[2:] == ["--checkpoint", os.path.dirname(str(checkpoint)), "--view", "film", "--seed", "1",
                        "--layer", "D8", "--with_d", "--pixel", "3,28", "--out", "film.png"]
    out = tmp_path / "film.png"
    assert cli(*argv[2:-1], out) == (0, "")
    assert out.is_file() and out.with_suffix(".gif").is_file()


def test_text_that_looks_like_markup_stays_text(tmp_path, other_page):
    """A name holding '</script>' or '<!--' can neither end nor hide the page's data or script."""
    name = "G </script> <!-- <script> x"
    ex = Explorer(tiny_g(), generator=name)
    path = tmp_path / "page.html"
    ap.write_page(ex, str(path), [0])
    assert page_json(path)["generator"] == name
    p, _ = other_page
    errors = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(path.as_uri())
    p.wait_for_selector("body[data-ready='1']", timeout=30000)
    assert f"weights of the {name}" in p.text_content("#describe")
    assert not errors
