"""attention.py, attention_stats.py, attention_figures.py: geometry, extraction and statistics against
the model's own full maps, and planted attention peaks that every figure must mark at the right pixel
(non-square maps included)."""
import json
import math

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import attention as at  # noqa: E402
import attention_figures as af  # noqa: E402
import attention_stats as st  # noqa: E402
from explorer import Explorer  # noqa: E402
from sagan_models import Discriminator, Generator, Self_Attn  # noqa: E402



# ----------------------------------------------------------------------------- helpers

def planted_map(H, W, peak, second=None):
    """A map with most weight on `peak` (row, col), some on `second`, the rest spread thinly."""
    m = np.full((H, W), 0.1 / (H * W), dtype=np.float32)
    m[peak] += 0.6
    if second:
        m[second] += 0.3
    return m / m.sum()


def query_xy(ax, color=None):
    lines = [l for l in ax.get_lines() if l.get_gid() == "query"
             and (color is None or matplotlib.colors.same_color(l.get_color(), color))]
    assert len(lines) == 1, f"expected one query cross, found {len(lines)}"
    return float(lines[0].get_xdata()[0]), float(lines[0].get_ydata()[0])


def topk_dots(ax):
    dots = [c for c in ax.collections if c.get_gid() == "topk"]
    assert len(dots) == 1
    return dots[0].get_offsets().data, dots[0].get_sizes()


def heat(ax):
    ims = [im for im in ax.get_images() if im.get_gid() == "heat"]
    assert len(ims) == 1
    return ims[0]


def block_centre(arr, extent):
    """Where in axes coordinates the weight of an array drawn by imshow (origin 'upper': row 0 at
    the top) with extent (left, right, bottom, top) is centred."""
    a = np.asarray(arr, dtype=float)
    left, right, bottom, top = extent
    h, w = a.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cx = left + (xs + 0.5) * (right - left) / w
    cy = top + (ys + 0.5) * (bottom - top) / h
    return (a * cx).sum() / a.sum(), (a * cy).sum() / a.sum()


def tiny_g(gamma=0.5, attn=(8, 16), seed=0):
    torch.manual_seed(seed)
    G = Generator(32, z_dim=16, conv_dim=8, attn_res=list(attn)).eval()
    for layer in G.attn.values():
        layer.gamma.data.fill_(gamma)
    # larger features than at initialisation give sharper maps that differ between queries (the
    # attention convs are spectrally normalised, so scaling their weights would change nothing)
    for block in G.blocks:
        block[1].weight.data.mul_(6)
    return G


# ----------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("map_hw,img_hw", [((4, 8), (32, 32)), ((8, 8), (32, 32)), ((4, 8), (48, 64)),
                                           ((16, 16), (64, 64))])
def test_every_pixel_of_a_block_maps_to_its_cell_and_the_cell_centre_is_the_block_centre(map_hw, img_hw):
    (H, W), (h, w) = map_hw, img_hw
    sy, sx = h / H, w / W
    for i in range(H):
        for j in range(W):
            x, y = at.cell_to_pixel(i, j, map_hw, img_hw)
            assert (x, y) == ((j + 0.5) * sx, (i + 0.5) * sy)
            for py in range(int(i * sy), int((i + 1) * sy)):
                for px in range(int(j * sx), int((j + 1) * sx)):
                    assert at.pixel_to_cell(px, py, map_hw, img_hw) == (i, j)
    n = at.cell_to_index(2, 5, W)
    assert n == 2 * W + 5 and at.index_to_cell(n, W) == (2, 5)


def test_queries_out_of_range_are_clear_errors():
    with pytest.raises(ValueError, match=r"x must be in 0\.\.31"):
        at.pixel_to_cell(32, 0, (8, 8), (32, 32))
    with pytest.raises(ValueError, match=r"outside the 4x8 map of G16"):
        at.resolve_query((4, 8), (32, 32), cell=(4, 0), layer="G16")
    with pytest.raises(ValueError, match="either"):
        at.resolve_query((4, 8), (32, 32), pixel=(1, 1), cell=(0, 0))
    with pytest.raises(ValueError, match="G16 or D8"):
        at.parse_layer("16")
    with pytest.raises(ValueError, match="its attention layers are G8, G16"):
        at.check_layer("G32", ["G8", "G16"])


def test_one_face_layout_for_the_explorer_the_dashboard_and_the_ablation():
    faces = at.face_pixels(32)
    assert list(faces) == ["left eye", "right eye", "centre", "mouth"]  # the dashboard's panel columns
    assert Explorer(tiny_g()).default_pixel() == faces["left eye"] == (12, 15)
    # pixel_queries puts each pixel in its cell of every layer: the queries of the panel and the ablation
    q = at.pixel_queries(tiny_g(), [faces["left eye"], faces["right eye"]])
    assert {name: idx.tolist() for name, idx in q.items()} == {"G8": [3 * 8 + 3, 3 * 8 + 4],
                                                               "G16": [7 * 16 + 6, 7 * 16 + 9]}


def test_topk_cells_read_non_square_maps_row_major():
    m = planted_map(4, 8, (3, 1), (0, 7))
    top = at.topk_cells(m, 3)
    assert [(i, j) for i, j, _ in top[:2]] == [(3, 1), (0, 7)]
    assert top[0][2] > top[1][2] > top[2][2]


@pytest.mark.parametrize("peak", [(0, 0), (3, 7), (1, 6), (2, 3)])
def test_nearest_upsampling_puts_a_cell_on_its_pixel_block(peak):
    m = np.zeros((4, 8), np.float32)
    m[peak] = 1
    up = at.upsample_map(m, (32, 32), "nearest")
    ys, xs = np.nonzero(up)
    i, j = peak
    assert set(ys) == set(range(i * 8, i * 8 + 8)) and set(xs) == set(range(j * 4, j * 4 + 4))
    assert block_centre(up, (0, 32, 32, 0)) == pytest.approx(at.cell_to_pixel(i, j, (4, 8), (32, 32)))


def test_bilinear_upsampling_keeps_an_interior_peak_centred_on_its_block():
    m = np.zeros((4, 8), np.float32)
    m[1, 5] = 1
    up = at.upsample_map(m, (32, 32), "bilinear")
    assert block_centre(up, (0, 32, 32, 0)) == pytest.approx(at.cell_to_pixel(1, 5, (4, 8), (32, 32)))
    with pytest.raises(ValueError, match="nearest"):
        at.upsample_map(m, (32, 32), "bicubic")


# ----------------------------------------------------------------------------- planted-peak figures

IMG = np.random.default_rng(0).uniform(0, 1, (32, 32, 3)).astype(np.float32)
MAP_HW = (4, 8)           # non-square: a transposed plot or attn[row*col] indexing is caught
PEAK, SECOND = (1, 6), (3, 2)
QUERY = (2, 1)


def expect_marks(ax, m, img_hw, k):
    """Cross at the query cell's centre and the heaviest dot on the peak, in the axes' units."""
    units = img_hw or MAP_HW
    # whatever is drawn first (image or feature grid) spans the same units as the markers: pixel x
    # covers [x, x+1), not imshow's default [x-0.5, x+0.5)
    assert tuple(ax.get_images()[0].get_extent()) == (0, units[1], units[0], 0)
    assert query_xy(ax) == pytest.approx(at.cell_to_pixel(*QUERY, MAP_HW, units))
    if k:
        offsets, sizes = topk_dots(ax)
        assert len(offsets) == k
        assert tuple(offsets[0]) == pytest.approx(at.cell_to_pixel(*PEAK, MAP_HW, units))
        assert tuple(offsets[1]) == pytest.approx(at.cell_to_pixel(*SECOND, MAP_HW, units))
        # dot area proportional to weight
        weights = np.array([w for *_, w in at.topk_cells(m, k)])
        assert sizes / sizes[0] == pytest.approx(weights / weights[0], rel=1e-5)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_query_figure_marks_a_planted_peak_at_the_right_pixel_in_every_panel(upsample):
    m = planted_map(*MAP_HW, PEAK, SECOND)
    feature = np.arange(32, dtype=np.float32).reshape(MAP_HW)
    fig, axes = af.plot_query(IMG, m, QUERY, feature=feature, k=5, upsample=upsample)
    assert set(axes) == {"feature", "image", "heat_grid", "heat_image"}
    expect_marks(axes["feature"], m, None, 5)
    expect_marks(axes["image"], m, (32, 32), 5)
    expect_marks(axes["heat_grid"], m, None, 0)
    expect_marks(axes["heat_image"], m, (32, 32), 0)
    # the feature panel is drawn in cell units, the map's (row, col) not transposed
    fimg = axes["feature"].get_images()[0]
    assert tuple(fimg.get_extent()) == (0, 8, 4, 0) and fimg.get_array().shape == MAP_HW
    grid = heat(axes["heat_grid"])
    assert tuple(grid.get_extent()) == (0, 8, 4, 0)
    assert np.unravel_index(np.argmax(grid.get_array()), MAP_HW) == PEAK
    over = heat(axes["heat_image"])
    assert tuple(over.get_extent()) == (0, 32, 32, 0) and over.get_array().shape == (32, 32)
    only_peak = np.where(np.asarray(over.get_array()) >= 0.75 * np.max(over.get_array()),
                         np.asarray(over.get_array()), 0)
    assert block_centre(only_peak, over.get_extent()) == pytest.approx(
        at.cell_to_pixel(*PEAK, MAP_HW, (32, 32)), abs=0.01)
    matplotlib.pyplot.close(fig)


def test_layers_queries_grid_and_saliency_figures_mark_planted_peaks():
    m = planted_map(*MAP_HW, PEAK, SECOND)
    fig, axes = af.plot_layers(IMG, [dict(name="G16", map=m, cell=QUERY, stats=None),
                                     dict(name="G8", map=m.T.copy(), cell=QUERY[::-1], stats=None)],
                               pixel=(5, 20), k=4)
    expect_marks(axes["G16"], m, (32, 32), 4)
    # the transposed 8x4 map: its peak is at (6, 1), its query at (1, 2)
    assert query_xy(axes["G8"]) == pytest.approx(at.cell_to_pixel(1, 2, (8, 4), (32, 32)))
    assert tuple(topk_dots(axes["G8"])[0][0]) == pytest.approx(at.cell_to_pixel(6, 1, (8, 4), (32, 32)))
    assert query_xy(axes["image"]) == (5.5, 20.5)  # the query pixel's centre
    matplotlib.pyplot.close(fig)

    other = planted_map(*MAP_HW, (0, 0))
    fig, axes = af.plot_queries(IMG, [dict(map=m, cell=QUERY), dict(map=other, cell=(3, 7))], k=3)
    assert query_xy(axes["image"], "red") == pytest.approx(at.cell_to_pixel(*QUERY, MAP_HW, (32, 32)))
    assert query_xy(axes["image"], "lime") == pytest.approx(at.cell_to_pixel(3, 7, MAP_HW, (32, 32)))
    expect_marks(axes["q0"], m, (32, 32), 3)
    assert query_xy(axes["q1"], "lime") == pytest.approx(at.cell_to_pixel(3, 7, MAP_HW, (32, 32)))
    assert tuple(topk_dots(axes["q1"])[0][0]) == pytest.approx(at.cell_to_pixel(0, 0, MAP_HW, (32, 32)))
    matplotlib.pyplot.close(fig)

    fig, axes = af.plot_grid([IMG] * 3, [m] * 3, QUERY, k=2, ncols=2)
    assert len(axes) == 3
    for ax in axes:
        expect_marks(ax, m, (32, 32), 2)
    matplotlib.pyplot.close(fig)

    sal = np.zeros(MAP_HW, np.float32)
    sal[PEAK] = 32
    fig, axes = af.plot_saliency(IMG, {"G16": sal})
    s = heat(axes["G16"])
    assert tuple(s.get_extent()) == (0, 32, 32, 0)
    assert block_centre(s.get_array(), s.get_extent()) == pytest.approx(
        at.cell_to_pixel(*PEAK, MAP_HW, (32, 32)))
    matplotlib.pyplot.close(fig)


# ----------------------------------------------------------------------------- extraction

def test_query_rows_equal_the_full_maps_rows_by_every_path():
    G = tiny_g()
    z = at.z_for_seeds([3, 4], G.z_dim)
    with torch.no_grad():
        img_full, full = G(z, return_attn=True)                 # {res: (B, N, N)}
    q = {"G8": torch.tensor([0, 9, 63]), "G16": torch.tensor([255, 17])}
    img, feats, rows = at.run_net(G, z, q)
    assert torch.allclose(img, img_full, atol=1e-6)
    for name, idx in q.items():
        res = int(name[1:])
        ref = full[res][:, idx]                                  # (B, Q, N)
        assert rows[name].shape == ref.shape
        assert torch.allclose(rows[name], ref, atol=1e-6)
        again = at.attention_rows(G.attn[str(res)], feats[name], idx, chunk=1)
        assert torch.allclose(again, ref, atol=1e-6)
        assert torch.allclose(ref.sum(-1), torch.ones(ref.shape[:2]), atol=1e-5)
        sal = at.key_saliency(G.attn[str(res)], feats[name], chunk=50)
        assert torch.allclose(sal, full[res].sum(1).reshape(sal.shape), atol=1e-4)
        assert sal.sum().item() == pytest.approx(2 * res * res, rel=1e-5)
    # the maps are not uniform here, so the comparisons above could fail
    assert full[16].max() > 5 / 256


def test_z_for_a_seed_does_not_depend_on_its_batch():
    a = at.z_for_seeds([5], 16)
    b = at.z_for_seeds([1, 5, 9], 16)
    assert torch.equal(a[0], b[1]) and not torch.equal(b[0], b[1])


def test_discriminator_layers_are_captured_on_images():
    torch.manual_seed(0)
    D = Discriminator(32, conv_dim=8, attn_res=[8, 4]).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _, full = D(x, return_attn=True)
    _, feats, rows = at.run_net(D, x, {"D4": torch.tensor([5])})
    assert set(feats) == {"D8", "D4"} and list(at.attention_layers(D)) == ["D8", "D4"]
    assert torch.allclose(rows["D4"], full[4][:, [5]], atol=1e-6)


# ----------------------------------------------------------------------------- statistics

def test_statistics_on_known_rows():
    N = 16
    uniform = torch.full((1, 1, N), 1 / N)
    onehot = torch.zeros(1, 1, N)
    onehot[0, 0, 15] = 1
    assert st.topk_mass(uniform, 10).item() == pytest.approx(10 / N)
    assert st.entropy_norm(uniform).item() == pytest.approx(1)
    assert st.entropy_norm(onehot).item() == pytest.approx(0, abs=1e-6)
    # 4x4 map on a 32px image: query cell (0, 0) at (4, 4), key cell (3, 3) at (28, 28)
    d = st.mean_distance(onehot, [0], (4, 4), (32, 32))
    assert d.item() == pytest.approx(math.hypot(24, 24))
    assert st.uniform_distance([0], (4, 4), (32, 32)).item() == pytest.approx(
        st.mean_distance(uniform, [0], (4, 4), (32, 32)).item())
    # query independence: identical maps 1, disjoint maps 0, half-overlapping in between
    same = torch.stack([onehot[0, 0]] * 3)[None]
    eye = torch.eye(N)[None, :4]
    assert st.query_independence(same).item() == pytest.approx(1)
    assert st.query_independence(eye).item() == pytest.approx(0, abs=1e-6)
    half = torch.tensor([[[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]]])
    assert st.query_independence(half).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2"):
        st.query_independence(onehot)


def test_layer_table_sees_inert_and_active_attention():
    inert = st.layer_statistics(tiny_g(gamma=0.0), [0, 1], n_queries=8)
    assert [r["name"] for r in inert] == ["G8", "G16"]
    assert all(r["verdict"] == "inert" and r["share"] == 0 for r in inert)
    active = st.layer_statistics(tiny_g(gamma=0.5), [0, 1], n_queries=8)
    for r in active:
        assert r["share"] > 0.01 and r["verdict"] != "inert"
        assert r["top_mass"] > r["uniform"] and r["entropy"] < 0.97
        assert 0 <= r["qi"] <= 1 and r["dist"] > 0
    text = st.format_table(active, 2, 8)
    assert text.count("\n| G") == 2 and "top-10 mass (uniform)" in text


# the verdict on hand-built rows whose answer is known: an 8x8 map over a 32px image (the quick
# preset's G8), every query cell, 6 images that differ by a little noise

G8_HW, G8_IMG = (8, 8), (32, 32)
ALL_Q = torch.arange(64)


def dist_px():
    keys = at.key_pixels(G8_HW, G8_IMG)
    return torch.cdist(keys, keys)                                  # (N, N) query -> key, pixels


def verdict_of(make_row, images=6, seed=0):
    """The table's verdict and row (summarise) for rows made by make_row(query, rng) -> (N,)
    weights, an active layer (share 0.1)."""
    rng = np.random.default_rng(seed)
    rows = torch.tensor(np.stack([[make_row(q, rng) for q in range(64)] for _ in range(images)]),
                        dtype=torch.float32)
    rows = rows / rows.sum(-1, keepdim=True)                        # (B, Q, N)
    measures = st.row_measures(rows, ALL_Q, G8_HW, G8_IMG)
    r = st.summarise("G8", G8_HW, torch.full((images,), 0.1), measures, measures,
                     st.uniform_distance(ALL_Q, G8_HW, G8_IMG))
    return st.verdict(r), r


def noise(rng):
    return rng.uniform(0, 0.002, 64)


def test_a_planted_far_peak_reads_long_range():
    far = dist_px().argmax(1)                                       # each query's farthest key
    v, r = verdict_of(lambda q, rng: np.eye(64)[far[q]] * 0.8 + 0.2 / 64 + noise(rng))
    assert v == "long-range" and r["dist_excess_ci"][0] > 0


def test_a_slightly_far_peak_is_measured_but_not_called_long_range():
    """Peaks at random keys plus a little weight on the farthest: measurably farther than uniform,
    but by less than a fifth, as the step-8,000 showcase model's G16 was (35.8 against 34.0 px)."""
    far = dist_px().argmax(1)
    v, r = verdict_of(lambda q, rng: np.eye(64)[rng.integers(64)] * 0.5 + np.eye(64)[far[q]] * 0.15
                      + 0.35 / 64 + noise(rng))
    assert r["dist_excess_ci"][0] > 0 and r["dist"] < st.LONG_DIST * r["dist_uniform"]
    assert v == "slightly long-range"


def test_uniform_rows_read_near_uniform_and_show_no_distance_preference():
    v, r = verdict_of(lambda q, rng: np.full(64, 1 / 64) + noise(rng))
    assert v == "near-uniform"
    lo, hi = r["dist_excess_ci"]
    assert lo < 0 < hi and abs(r["dist_excess"]) < 0.1              # no distance preference either


def test_a_planted_local_peak_reads_local():
    v, r = verdict_of(lambda q, rng: np.eye(64)[q] * 0.8 + 0.2 / 64 + noise(rng))
    assert v == "local" and r["dist_excess_ci"][1] < 0 and r["dist"] < st.LOCAL_DIST * r["dist_uniform"]


def test_one_row_for_every_query_reads_shared():
    shared = np.eye(64)[27] * 0.8 + 0.2 / 64
    v, r = verdict_of(lambda q, rng: shared + noise(rng))
    assert v == "one map for all queries" and r["qi"] > 0.99


def test_peaks_at_random_keys_read_no_distance_preference():
    v, r = verdict_of(lambda q, rng: np.eye(64)[rng.integers(64)] * 0.8 + 0.2 / 64 + noise(rng))
    assert r["entropy"] < st.NEAR_UNIFORM_H and r["qi"] < st.SHARED_MAP_QI
    assert v == "no distance preference", r["dist_excess_ci"]


def test_the_quick_presets_g8_distance_below_uniforms_is_not_long_range():
    """The issue's case: 15.6 px against uniform's 16.5, which the old verdict called long-range
    because it was not under 60% of uniform's; peaks at random keys with a little weight at home."""
    def row(q, rng):
        return np.eye(64)[rng.integers(64)] * 0.65 + np.eye(64)[q] * 0.05 + 0.3 / 64 + noise(rng)
    v, r = verdict_of(row)
    assert r["dist"] / r["dist_uniform"] == pytest.approx(15.6 / 16.5, abs=0.03)
    assert r["dist"] > st.LOCAL_DIST * r["dist_uniform"]            # the old rule's "long-range"
    assert v in ("slightly local", "no distance preference") and r["dist_excess_ci"][0] < 0


def test_mean_interval_covers_the_spread_of_images_and_queries():
    assert st.mean_interval(torch.full((4, 5), 3.0)) == pytest.approx((3.0, 3.0))
    rng = np.random.default_rng(0)
    per_image = torch.tensor(rng.normal(0, 1, (20, 1))) + torch.zeros(20, 30)  # images differ, queries not
    lo, hi = st.mean_interval(per_image)
    sem = float(per_image[:, 0].std()) / math.sqrt(20)
    assert lo < float(per_image.mean()) < hi and hi - lo == pytest.approx(2 * 1.96 * sem, rel=0.25)


def test_contribution_statistics_follow_a_planted_value_that_the_weights_ignore():
    """query_statistics' two weightings: a key made to add a large value (a direction q and k ignore,
    so no weight changes) pulls the contribution numbers to it and leaves the weight numbers."""
    layer = self_attn(gamma=0.6)
    x = torch.randn(1, 16, 8, 8)
    qk = torch.cat([layer.query_conv.weight, layer.key_conv.weight])[:, :, 0, 0]
    blind = torch.linalg.svd(qk).Vh[-1]
    planted = x.clone()
    planted[0, :, 7, 7] += 1e5 * blind                              # key 63, the bottom-right corner
    queries = torch.tensor([0, 9, 18])                              # near the top-left corner
    before = st.query_statistics(layer, x, queries, G8_IMG)
    after = st.query_statistics(layer, planted, queries, G8_IMG)
    for key in ("top_mass", "entropy", "dist"):
        assert torch.allclose(after["weights"][key], before["weights"][key], atol=2e-3), key
    far = dist_px()[queries, 63].float()                            # (Q,) pixels to the planted key
    assert torch.allclose(after["contribution"]["dist"][0], far, rtol=0.02)
    assert (after["contribution"]["top_mass"] > 0.99).all() and (after["contribution"]["entropy"] < 0.05).all()
    assert torch.equal(after["dist_uniform"], st.uniform_distance(queries, G8_HW, G8_IMG))


def test_the_table_and_json_carry_the_interval_and_the_contribution_numbers():
    table = st.layer_statistics(tiny_g(gamma=0.5), [0, 1, 2], n_queries=8)
    for r in table:
        lo, hi = r["dist_excess_ci"]
        assert lo <= r["dist_excess"] <= hi
        assert r["dist_excess"] == pytest.approx(r["dist"] - r["dist_uniform"], abs=1e-4)
        assert 0 < r["contribution_top_mass"] <= 1 and 0 <= r["contribution_entropy"] <= 1
        assert r["verdict"] in st.VERDICTS
    text = st.format_table(table, 3, 8)
    assert "| dist − uniform [95%] |" in text and "| contrib. top-10 |" in text
    rows = [json.loads(line) for line in st.format_json(table, 3, 8).splitlines()]
    assert rows[0]["dist_excess_ci"] == list(table[0]["dist_excess_ci"])
    assert rows[0]["contribution_dist"] == table[0]["contribution_dist"]
    inert = st.layer_statistics(tiny_g(gamma=0.0), [0], n_queries=4)  # nothing added: no shares
    assert math.isnan(inert[0]["contribution_dist"]) and "| — |" in st.format_table(inert)
    assert json.loads(st.format_json(inert).splitlines()[0])["contribution_dist"] is None


def test_explorer_takes_queries_as_pixels_or_cells_and_agrees():
    ex = Explorer(tiny_g())
    cell_a, map_a, stats = ex.query(0, "G16", pixel=(13, 6))
    cell_b, map_b, _ = ex.query(0, "G16", cell=(3, 6))
    assert cell_a == cell_b == (3, 6) and np.array_equal(map_a, map_b)
    assert map_a.shape == (16, 16) and stats["gamma"] == 0.5
    with pytest.raises(ValueError, match="its attention layers are G8, G16"):
        ex.query(0, "D4", pixel=(0, 0))
    with pytest.raises(ValueError, match="channel 99"):
        ex.query_figure(0, "G16", pixel=(1, 1), channel=99)
    torch.manual_seed(0)
    with_d = Explorer(tiny_g(), Discriminator(32, conv_dim=8, attn_res=[8, 4]).eval())
    assert list(with_d.layers) == ["G8", "G16", "D8", "D4"] and with_d.pick_layer() == "G16"


# ----------------------------------------------------------------------------- interventions

def self_attn(C=16, gamma=0.7, seed=0):
    torch.manual_seed(seed)
    layer = Self_Attn(C).eval()
    layer.gamma.data.fill_(gamma)
    return layer


def explicit_output(layer, x, attention):
    """The layer's formula by hand for a given (B, N, N) map: gamma * v attention^T + x."""
    B, C, H, W = x.shape
    v = layer.project(x)[2]                                       # (B, C, N)
    return layer.gamma * torch.bmm(v, attention.transpose(1, 2)).reshape(B, C, H, W) + x


def test_remove_gives_the_network_with_that_gamma_at_zero():
    G = tiny_g(gamma=0.5)
    z = at.z_for_seeds([0, 1], G.z_dim)
    with torch.no_grad():
        img = G(z)
        for res in ("8", "16"):
            zeroed = tiny_g(gamma=0.5)
            zeroed.attn[res].gamma.data.zero_()
            with at.intervene(G.attn[res], "remove"):
                # equal up to float rounding: with 2 threads the next conv may round differently
                # on the layer's input than on gamma * o + input (measured: 8e-7)
                torch.testing.assert_close(G(z), zeroed(z), atol=1e-5, rtol=0, msg=res)
            assert not torch.equal(img, zeroed(z))                 # the layer did something
        assert torch.equal(G(z), img)                              # nothing left behind


@pytest.mark.parametrize("return_attn", [True, False])  # the explicit map and the fused path
def test_uniform_and_mean_row_equal_the_explicit_computation(return_attn):
    layer = self_attn()
    x = torch.randn(2, 16, 4, 8) * 3                               # non-square: 4 rows, 8 columns
    N = 32
    with torch.no_grad():
        out, full = layer(x)
        uniform = torch.full((2, N, N), 1 / N)
        mean_row = full.mean(1, keepdim=True).expand(2, N, N)
        for mode, attention in (("uniform", uniform), ("mean_row", mean_row)):
            with at.intervene(layer, mode):
                got, maps = layer(x, return_attn=return_attn)
            assert torch.allclose(got, explicit_output(layer, x, attention), atol=1e-5), mode
            assert maps is None if not return_attn else torch.allclose(maps, attention, atol=1e-6)
            # one query: only its position changes, to what the explicit map gives there
            n, (i, j) = 13, at.index_to_cell(13, 8)
            idx = torch.tensor([n, 2])
            own, own_rows = layer(x, return_attn=True, queries=idx)
            with at.intervene(layer, mode, queries=[n]):
                got, rows = layer(x, return_attn=True, queries=idx)
            ref = explicit_output(layer, x, attention)
            assert torch.allclose(got[:, :, i, j], ref[:, :, i, j], atol=1e-5)
            changed = (got != own).any(1)                          # (B, H, W)
            assert changed[:, i, j].all() and changed.sum() == 2
            assert torch.allclose(rows[:, 0], attention[:, n], atol=1e-6)
            assert torch.equal(rows[:, 1], own_rows[:, 1])
        assert full.max() > 4 / N                                  # not uniform already
        with at.intervene(layer, "remove"):
            assert torch.equal(layer(x)[0], x)


def test_mean_row_changes_nothing_where_every_query_has_the_same_map():
    layer = self_attn()
    # x varies across positions only in channel 0, which the query projection ignores: q is the
    # same at every position, so every row is softmax(q . k) over the same keys
    layer.query_conv.parametrizations.weight.original.data[:, 0] = 0
    x = torch.randn(2, 16, 1, 1).expand(2, 16, 4, 8).clone()
    x[:, 0] = torch.randn(2, 4, 8) * 5
    with torch.no_grad():
        out, full = layer(x)
        assert torch.allclose(full, full[:, :1].expand_as(full), atol=1e-6)  # identical rows ...
        assert full.max() > 4 / 32                                             # ... and not uniform
        with at.intervene(layer, "mean_row"):
            got, maps = layer(x)
    assert torch.allclose(got, out, atol=1e-6) and torch.allclose(maps, full, atol=1e-6)
    with pytest.raises(ValueError, match="remove, uniform, mean_row"):
        with at.intervene(layer, "zero"):
            pass


def test_deltas_are_zero_exactly_where_gamma_is_zero():
    G = tiny_g(gamma=0.5)
    G.attn["8"].gamma.data.zero_()
    torch.manual_seed(0)
    D = Discriminator(32, conv_dim=8, attn_res=[8, 4]).eval()
    D.attn["8"].gamma.data.fill_(0.5)                              # D4 stays at its initial 0
    table = {r["name"]: r for r in st.layer_statistics(G, [0, 1], n_queries=4, D=D)}
    for name in ("G8", "D4"):  # zero up to float rounding (see the test above)
        assert all(table[name][key] < 1e-6 for key in st.DELTA_KEYS.values()), name
    for name in ("G16", "D8"):
        assert all(table[name][key] > 0 for key in st.DELTA_KEYS.values()), name
    assert [table[n]["delta_of"] for n in table] == ["image", "image", "D score", "D score"]
    text = st.format_table(list(table.values()), 2, 4)
    assert "| Δ remove | Δ uniform | Δ mean row |" in text and "| 0.0000 | 0.0000 | 0.0000 |" in text
    lines = st.format_json(list(table.values()), 2, 4).splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["layer"] for r in rows] == ["G8", "G16", "D8", "D4"]
    assert rows[1]["ablation_delta"] == table["G16"]["ablation_delta"] and rows[1]["gamma"] == 0.5


def test_one_querys_uniform_row_changes_only_the_pixels_its_cell_feeds():
    ex = Explorer(tiny_g())
    cell, image, changed = ex.intervention(0, "G16", cell=(5, 9))
    assert cell == (5, 9) and np.array_equal(image, ex.image(0))
    # after G16 only the last transposed conv (kernel 4, stride 2): cell (i, j) feeds pixels
    # 2i-1 .. 2i+2 in each direction
    ys, xs = np.nonzero(np.abs(changed - image).max(-1))
    assert len(ys) and set(ys) <= set(range(9, 13)) and set(xs) <= set(range(17, 21))
    with pytest.raises(ValueError, match="D's score"):
        Explorer(tiny_g(), Discriminator(32, conv_dim=8, attn_res=[8, 4]).eval()).intervention(0, "D8", cell=(0, 0))


def test_intervention_figure_marks_the_query_and_shows_the_change_where_it_is():
    changed = IMG.copy()
    i, j = PEAK
    changed[i * 8:(i + 1) * 8, j * 4:(j + 1) * 4] += 0.25       # the block of cell PEAK of a 4x8 map
    fig, axes = af.plot_intervention(IMG, changed, QUERY, MAP_HW)
    for ax in axes.values():
        assert tuple(ax.get_images()[0].get_extent()) == (0, 32, 32, 0)
        assert query_xy(ax) == pytest.approx(at.cell_to_pixel(*QUERY, MAP_HW, (32, 32)))
    d = heat(axes["diff"])
    assert block_centre(d.get_array(), d.get_extent()) == pytest.approx(at.cell_to_pixel(*PEAK, MAP_HW, (32, 32)))
    assert np.asarray(d.get_array()).max() == pytest.approx(0.25)
    matplotlib.pyplot.close(fig)


# ----------------------------------------------------------------------------- contribution maps

def test_contribution_is_gamma_times_weight_times_value_norm_and_sees_a_planted_value():
    layer = self_attn(gamma=-0.6)                                   # |gamma|: a norm is not negative
    x = torch.randn(1, 16, 4, 8)
    # a direction of the input that q and k ignore: planted at one key it leaves every attention
    # weight as it was and makes that key's value vector large
    qk = torch.cat([layer.query_conv.weight, layer.key_conv.weight])[:, :, 0, 0]  # (2C', C)
    blind = torch.linalg.svd(qk).Vh[-1]                             # (C,), qk @ blind = 0
    planted = x.clone()
    key = 21
    planted[0, :, key // 8, key % 8] += 1000 * blind
    queries = torch.tensor([0, 13, 31])
    with torch.no_grad():
        weights = at.attention_rows(layer, planted, queries)        # (1, Q, N)
        assert torch.allclose(weights, at.attention_rows(layer, x, queries), atol=1e-5)
        got = at.contribution_rows(layer, planted, queries)
        q, k, v = layer.project(planted)                            # (1, C', N), (1, C', N), (1, C, N)
        gamma = layer.gamma.detach()
    for a, n in enumerate(queries.tolist()):
        energy = torch.tensor([float(q[0, :, n] @ k[0, :, m]) for m in range(32)])
        alpha = torch.softmax(energy, 0)
        brute = torch.tensor([float(torch.linalg.vector_norm(gamma * alpha[m] * v[0, :, m]))
                              for m in range(32)])
        assert torch.allclose(got[0, a], brute, rtol=1e-4, atol=1e-7), n
        assert int(got[0, a].argmax()) == key != int(weights[0, a].argmax())


def test_contribution_figure_marks_each_maps_own_peak():
    weights = planted_map(*MAP_HW, PEAK, SECOND)
    contrib = planted_map(*MAP_HW, SECOND, PEAK)                    # the value norms swap the order
    fig, axes = af.plot_contribution(IMG, weights, contrib, QUERY, k=3)
    expect_marks(axes["weights"], weights, (32, 32), 3)
    assert query_xy(axes["contribution"]) == pytest.approx(at.cell_to_pixel(*QUERY, MAP_HW, (32, 32)))
    offsets, _ = topk_dots(axes["contribution"])
    assert tuple(offsets[0]) == pytest.approx(at.cell_to_pixel(*SECOND, MAP_HW, (32, 32)))
    matplotlib.pyplot.close(fig)
    ex = Explorer(tiny_g())
    cell, w, c, x_norm = ex.contribution(0, "G16", pixel=(13, 6))
    assert cell == (3, 6) and np.array_equal(w, ex.query(0, "G16", cell=cell)[1])
    assert not np.allclose(c / c.sum(), w)                          # the values reweigh the keys
    assert x_norm == pytest.approx(float(ex.features(0, "G16")[0, :, 3, 6].norm()))
