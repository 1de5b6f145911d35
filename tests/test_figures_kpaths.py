"""K-path heatmaps compared by shape (unit-L1 maps) and by the share they carry; the K choice; the
figures' declared colour scales and colour bars."""
import math

import numpy as np
import pytest
import torch
from conftest import make_cnn

from attrib import graphs
from attrib.viz import figures
from attrib.viz.graph import draw_graph, draw_k_curves


def test_shape_distance_and_share_equal_a_hand_calculation():
    a = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=torch.float64)   # |a|_1 = 4: a / 4 = [.25, -.25, .5, 0]
    b = torch.tensor([2.0, 0.0, 2.0, 0.0], dtype=torch.float64)    # |b|_1 = 4: b / 4 = [.5, 0, .5, 0]
    assert graphs.shape_distance(a, b) == pytest.approx(0.25 + 0.25 + 0.0 + 0.0, abs=1e-15)
    assert graphs.share(a, b) == pytest.approx((1 - 1 + 2) / (2 + 2), abs=1e-15)
    assert graphs.shape_distance(1e-20 * a, a) == pytest.approx(0.0, abs=1e-15)  # amount does not count, shape does
    assert graphs.share(1e-20 * a, a) == pytest.approx(1e-20, rel=1e-12)
    assert graphs.shape_distance(-a, a) == pytest.approx(2.0, abs=1e-15)  # opposite signs
    assert graphs.shape_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])) == pytest.approx(2.0)  # disjoint
    zeros = torch.zeros(4, dtype=torch.float64)
    assert graphs.shape_distance(zeros, a) == 2.0 and graphs.shape_distance(zeros, zeros) == 0.0
    assert math.isnan(graphs.share(a, torch.tensor([1.0, -1.0])))
    # a (C, H, W) map: every element counts; 2 channels x 1 x 2
    c = torch.tensor([[[3.0, 1.0]], [[0.0, -4.0]]])  # |c|_1 = 8
    d = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])   # |d|_1 = 4
    hand = abs(3 / 8 - 1 / 4) + abs(1 / 8 - 1 / 4) + abs(0 - 1 / 4) + abs(-4 / 8 - 1 / 4)
    assert graphs.shape_distance(c, d) == pytest.approx(hand, abs=1e-12)
    assert graphs.share(c, d) == pytest.approx(0 / 4, abs=1e-15)


def every_path(flow: graphs.FlowGraph) -> list:
    """One path through every pair of channels of make_cnn's two conv layers: every channel kept."""
    channels = {layer: flow.values[layer].numel() for layer in flow.layers}
    return [graphs.CriticalPath((flow.class_node, ("3", upper), ("0", lower)), 1.0, 1.0)
            for upper in range(channels["3"]) for lower in range(channels["0"])]


def test_masking_nothing_gives_distance_zero_and_share_one_and_curves_use_the_formulas():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    flow = graphs.build_graph(model, x, target=3, k=64, composite="epsilon_plus", conductance_steps=None)
    assert flow.layers == ["0", "3"]
    full = graphs.full_heatmap(flow)
    kept, one = graphs.path_heatmaps(flow, [every_path(flow), every_path(flow)[:1]])
    assert graphs.shape_distance(kept, full) < 1e-12
    assert abs(graphs.share(kept, full) - 1) < 1e-12
    assert abs(graphs.share(graphs.path_scores(flow, [every_path(flow)])[0], torch.tensor(flow.score, dtype=torch.float64)) - 1) < 1e-12
    assert graphs.shape_distance(one, full) > 0.1 and abs(graphs.share(one, full)) < 1
    curves = graphs.k_curves(flow, max_k=6)
    paths = graphs.k_best_paths(flow, 6)
    maps = graphs.path_heatmaps(flow, [paths[:k] for k in curves.ks])
    for i, k in enumerate(curves.ks):
        unit_k, unit_full = maps[i] / maps[i].abs().sum(), full / full.abs().sum()
        assert curves.heatmap_distance[i] == pytest.approx(float((unit_k - unit_full).abs().sum()), abs=1e-12)
        assert curves.heatmap_share[i] == pytest.approx(float(maps[i].sum() / full.sum()), rel=1e-12)
        assert curves.score_share[i] == pytest.approx(curves.scores[i] / curves.full_score, rel=1e-12)
    assert curves.full_relevance == pytest.approx(float(full.sum()), rel=1e-12)


def curves_of(distances: list[float]) -> graphs.KCurves:
    n = len(distances)
    return graphs.KCurves(ks=list(range(1, n + 1)), scores=[0.0] * n, score_mse=[0.0] * n, score_smape=[0.0] * n,
                          heatmap_mse=[0.0] * n, heatmap_smape=[2.0] * n, full_score=1.0, heatmap_distance=distances,
                          heatmap_share=[0.1] * n, score_share=[0.1] * n)


def test_choose_returns_the_smallest_k_under_the_threshold():
    curves = curves_of([1.5, 0.9, 1.2, 0.8, 0.83])
    assert graphs.SHAPE_THRESHOLD == 1.0 and curves.choose() == 2  # default: heatmap_distance <= 1
    assert curves.choose(0.85) == 4 and curves.choose(0.8) == 4 and curves.choose(0.79) is None
    assert curves.choose(2.0, metric="heatmap_smape") == 1 and curves.choose(1.9, metric="heatmap_smape") is None
    assert curves.plateau() == 4  # within 0.05 of the best (0.8)
    assert curves.plateau(0.5) == 2 and curves.plateau(0.7) == 1
    with pytest.raises(ValueError, match="metric"):
        curves.choose(0.5, metric="heatmap_share")  # a share is not a distance
    assert curves_of([math.nan, math.nan]).plateau() is None


def test_k_path_figure_draws_unit_l1_maps_on_one_scale_with_one_colour_bar():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    full = torch.randn(3, 8, 8, generator=generator, dtype=torch.float64)
    maps = {1: 1e-20 * torch.randn(3, 8, 8, generator=generator, dtype=torch.float64),
            5: 3e-5 * torch.randn(3, 8, 8, generator=generator, dtype=torch.float64)}
    fig = figures.k_path_heatmaps(image, full, maps)
    heat = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "bwr"]
    assert len(heat) == 3
    units = [(m / m.abs().sum()).sum(0).numpy() for m in (full, maps[1], maps[5])]
    limit = float(np.percentile(np.abs(np.concatenate([u.reshape(-1) for u in units])), 99))
    assert all(im.get_clim() == pytest.approx((-limit, limit), rel=1e-12) for im in heat)
    for im, unit in zip(heat, units):  # each panel is its map divided by its L1 norm
        assert np.allclose(np.asarray(im.get_array()), unit, rtol=0, atol=1e-15)
    scale = figures.k_path_scale(full, maps)
    assert scale.limit == pytest.approx(limit, rel=1e-12)
    assert scale.shares[1] == pytest.approx(float(maps[1].sum() / full.sum()), rel=1e-12)
    assert scale.distances[5] == pytest.approx(graphs.shape_distance(maps[5], full), rel=1e-12)
    assert f"share {scale.shares[1]:.2g}" in fig.axes[1].get_title() and f"share {scale.shares[5]:.2g}" in fig.axes[2].get_title()
    assert len(fig.axes) == 4 and "L1 norm" in fig.axes[3].get_ylabel()  # three panels and one colour bar
    assert "one colour scale" in scale.caption and f"{limit:.3g}" in scale.caption
    again = figures.figure_pixels(figures.k_path_heatmaps(image, full, maps))
    assert np.array_equal(figures.figure_pixels(fig), again)


def test_colour_bars_wherever_colour_encodes_a_number():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = {"LRP": torch.randn(3, 8, 8), "conductance ascent": torch.rand(3, 8, 8)}
    grid = figures.method_grid(image, maps)
    assert len(grid.axes) == 3 + 2  # original, two overlays, a colour bar under each
    bars = grid.axes[3:]
    assert all("p99" in bar.get_xlabel() for bar in bars)
    limit = figures.clip_value(figures._map2d(maps["LRP"]))
    assert bars[0].get_xlim() == pytest.approx((-limit, limit))
    # no image special case: "conductance ascent" is drawn as a signed map like any other
    assert any(im.get_cmap().name == "bwr" for im in grid.axes[2].get_images())
    triptych = figures.ascent_triptych(image, image, torch.randn(8, 8))
    assert len(triptych.axes) == 4 and "|gradient|" in triptych.axes[3].get_ylabel()
    rebuilt = figures.reconstructions(image, {"filter 3": torch.randn(3, 8, 8)})
    assert "min-max rescaled" in rebuilt.axes[1].get_title()


def test_graph_and_curve_figures_say_what_colour_and_lines_mean():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    flow = graphs.build_graph(model, x, target=3, k=4, conductance_steps=None)
    fig = draw_graph(flow, graphs.k_best_paths(flow, 2))
    assert len(fig.axes) == 2 and "relevance" in fig.axes[1].get_ylabel()
    curves = graphs.k_curves(flow, max_k=5)
    fig = draw_k_curves(curves, threshold=1.0)
    shape = fig.axes[0]
    assert list(shape.lines[0].get_ydata()) == curves.heatmap_distance
    chosen = curves.choose(1.0)
    assert any(f"K = {chosen}" in t.get_text() if chosen else "no K" in t.get_text() for t in shape.get_legend().get_texts())


def test_digits_model_chooses_k_by_shape_where_raw_smape_cannot():
    """The embedded digits model, digit 3 (the CLI's first sample): the K paths carry a few percent of
    the relevance, so the raw maps differ everywhere (SMAPE near its maximum), but the shape distance
    falls under the default threshold."""
    from attrib.models import load_digits_model, preprocess, sample_digits

    images, _ = sample_digits()
    model = load_digits_model()
    x = preprocess(images[3:4])
    target = int(model(x).argmax())
    flow = graphs.build_graph(model, x, target=target, k=6, conductance_steps=None)
    curves = graphs.k_curves(flow, max_k=50)
    chosen = curves.choose()
    assert chosen is not None and curves.heatmap_distance[chosen - 1] <= graphs.SHAPE_THRESHOLD
    assert all(d > graphs.SHAPE_THRESHOLD for d in curves.heatmap_distance[:chosen - 1])
    assert curves.choose(0.5, metric="heatmap_smape") is None and min(curves.heatmap_smape) > 1
    assert all(0 < s < 0.1 for s in curves.heatmap_share)


DRAW = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from conftest import make_cnn
from attrib import graphs
from attrib.viz.graph import draw_graph
from attrib.viz.figures import figure_pixels
x = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
flow = graphs.build_graph(make_cnn(), x, target=3, k=6, conductance_steps=None)
print(hashlib.sha256(figure_pixels(draw_graph(flow, graphs.k_best_paths(flow, 8))).tobytes()).hexdigest())
"""


def test_the_graph_drawing_does_not_depend_on_the_hash_seed():
    """The critical paths are drawn in a fixed order: the same graph gives the same pixels whatever
    PYTHONHASHSEED is (they were kept in a set, whose order follows the seed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = DRAW.format(tests=str(Path(__file__).parent))
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout.strip() for seed in (1, 2, 3, 4)}
    assert len(digests) == 1
