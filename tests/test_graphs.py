"""Path graphs: flows conserve relevance, K-best paths equal brute force, masking nothing gives the
full heatmap, attributes are numbers, files round-trip."""
import math

import networkx as nx
import pytest
import torch
import torchvision
from conftest import assert_unchanged, make_cnn, model_state, relative
from torch import nn

import attrib
from attrib import graphs
from attrib.lrp import LRP, LRP0, Composite, Epsilon, Norm
from attrib.module_types import AVERAGE_POOLS, BATCHNORMS, LINEAR_LAYERS

LRP_ZERO = Composite(types=[(LINEAR_LAYERS, LRP0()), (AVERAGE_POOLS, Norm(0)), (BATCHNORMS, LRP0())], addition_rule=Norm(0))


def tiny_mlp(bias: bool = False) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.ReLU(), nn.Linear(6, 6, bias=bias), nn.ReLU(),
                         nn.Linear(6, 3, bias=bias)).double().eval()


class TinyResidual(nn.Module):
    """conv -> ReLU -> [conv -> ReLU -> conv] + identity -> ReLU -> pool -> linear, bias-free."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.b(self.relu(self.a(x)))
        out += x
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.relu(out), 1), 1))


def all_flows_conserve(flow: graphs.FlowGraph) -> float:
    """Largest |sum of a node's flows to every channel below - its relevance|, relative to the score."""
    worst = 0.0
    for upper, lowers in flow.flows.items():
        sources = [flow.class_node] if upper == graphs.CLASS_LAYER else [(upper, c) for c in flow.top[upper]]
        for row, node in enumerate(sources):
            out = sum(float(values[row].sum()) for values in lowers.values()) if lowers else flow.graph.nodes[node]["outflow"]
            worst = max(worst, abs(out - flow.graph.nodes[node]["value"]))
    return worst / abs(flow.score)


@pytest.mark.parametrize("model, shape", [(tiny_mlp(), (1, 4)), (make_cnn(bias=False), (1, 3, 8, 8)), (TinyResidual().double().eval(), (1, 2, 6, 6))])
def test_lrp0_flows_conserve_relevance_on_bias_free_networks(model, shape):
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flow = graphs.build_graph(model, x, target=1, k=3, composite=LRP_ZERO, conductance_steps=None)
    assert all_flows_conserve(flow) < 1e-10
    for node, data in flow.graph.nodes(data=True):
        assert abs(data["leak"]) <= 1e-10 * abs(flow.score), node
    # and the direct flows into a layer, from every channel of every layer (or the class) above it,
    # add up to each of its channels' relevance (linearity of the backward pass)
    full = graphs.build_graph(model, x, target=1, k=64, composite=LRP_ZERO, conductance_steps=None)
    incoming = {layer: torch.zeros_like(full.values[layer]) for layer in full.layers}
    for lowers in full.flows.values():
        for lower, values in lowers.items():
            incoming[lower] += values.sum(0)
    for layer in full.layers:
        assert relative(incoming[layer], full.values[layer]) < 1e-10, layer


@pytest.mark.parametrize("model, shape", [(make_cnn(), (1, 3, 8, 8)), (TinyResidual().double().eval(), (1, 2, 6, 6))])
def test_conductance_flows_add_up_to_layer_conductance(model, shape):
    """Node values are LayerConductance's stieltjes_trapezoid per channel; the direct flows into a
    layer from everything above add up to each channel's conductance exactly; on the bias-free
    residual net at a zero baseline the path integral is exact, so nodes leak nothing."""
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    flow = graphs.build_graph(model, x, target=1, k=64, method="conductance", n_steps=12)
    reference = attrib.LayerConductance(model, flow.layers).attribute(x, target=1, n_steps=12, method="stieltjes_trapezoid")
    incoming = {layer: torch.zeros_like(flow.values[layer]) for layer in flow.layers}
    for lowers in flow.flows.values():
        for lower, values in lowers.items():
            incoming[lower] += values.sum(0)
    for layer in flow.layers:
        per_channel = reference[layer][0].reshape(reference[layer].shape[1], -1).sum(-1)
        assert relative(flow.values[layer], per_channel) < 1e-12, layer
        assert relative(incoming[layer], flow.values[layer]) < 1e-10, layer
    assert math.isclose(flow.score, float(reference.outputs - reference.baseline_outputs), rel_tol=1e-12)
    if isinstance(model, TinyResidual):
        assert max(abs(d["leak"]) for _, d in flow.graph.nodes(data=True)) < 1e-12 * abs(flow.score)
        assert any(u[0] == graphs.CLASS_LAYER and v[0] == "stem" for u, v in flow.graph.edges)
    with pytest.raises(ValueError, match="method='lrp'"):
        graphs.path_heatmaps(flow, [graphs.k_best_paths(flow, 1)])


def test_residual_graph_has_skip_edges_and_splits_at_the_addition():
    model = TinyResidual().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    flow = graphs.build_graph(model, x, target=0, k=4, composite=LRP_ZERO, conductance_steps=None)
    assert flow.layers == ["stem", "a", "b"]
    assert flow.trace.frontier(None) == ["stem", "b"]   # the head's relevance splits at the addition
    assert flow.trace.frontier("b") == ["a"]
    skip = [(u, v) for u, v in flow.graph.edges if u[0] == graphs.CLASS_LAYER and v[0] == "stem"]
    assert len(skip) == 4
    # the identity branch: what the class hands to the stem directly plus what reaches it through a and b
    direct = float(flow.flows[graphs.CLASS_LAYER]["stem"].sum())
    via_b = float(flow.flows[graphs.CLASS_LAYER]["b"].sum())
    assert abs(direct + via_b - flow.score) < 1e-12 and abs(direct) > 1e-6 and abs(via_b) > 1e-6


def test_leak_per_layer_equals_the_conservation_report_with_biases():
    """With biases and epsilon, what a layer's nodes absorb (k = every channel) is that layer's
    difference in LRP's conservation report."""
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    composite = Composite(types=[(LINEAR_LAYERS, Epsilon(0.01))])
    flow = graphs.build_graph(model, x, target=2, k=64, composite=composite, conductance_steps=None)
    report = LRP(model, composite).attribute(x, target=2).info["conservation"]
    rows = {row.name: float(row.difference[0]) for row in report.rows}
    for layer in flow.layers:
        leak = sum(flow.graph.nodes[(layer, c)]["leak"] for c in flow.top[layer])
        assert abs(leak + rows[layer]) < 1e-12, layer
        assert abs(rows[layer]) > 1e-8  # biases do absorb here


def brute_force_paths(flow: graphs.FlowGraph, positive_only: bool = True) -> list[tuple[float, tuple]]:
    graph, lowest = flow.graph, flow.layers[0]
    found = []
    for end in [n for n in graph.nodes if n[0] == lowest]:
        for nodes in nx.all_simple_paths(graph, flow.class_node, end):
            shares = [graph.edges[a, b]["share"] for a, b in zip(nodes[:-1], nodes[1:])]
            if positive_only and not all(s > 0 for s in shares):
                continue
            found.append((math.prod(shares), tuple(nodes)))
    return sorted(found, key=lambda item: -item[0])


def path_mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize("model, shape, seed", [(path_mlp(), (1, 4), 7), (TinyResidual().double().eval(), (1, 2, 6, 6), 3)])
def test_k_best_paths_equal_brute_force_enumeration(model, shape, seed):
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    target = int(model(x).argmax())
    flow = graphs.build_graph(model, x, target=target, k=4, composite="epsilon", conductance_steps=None)
    expected = brute_force_paths(flow)
    assert len(expected) >= 6
    got = graphs.k_best_paths(flow, 6)
    assert [p.nodes for p in got] == [nodes for _, nodes in expected[:6]]
    for path, (score, _) in zip(got, expected):
        assert math.isclose(path.score, score, rel_tol=1e-12)
        assert math.isclose(path.carried, score * flow.score, rel_tol=1e-12)
    assert len(graphs.k_best_paths(flow, 10_000)) == len(expected)


def test_masking_nothing_reproduces_the_full_heatmap():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    flow = graphs.build_graph(model, x, target=3, k=64, composite="epsilon_plus", conductance_steps=None)
    every = [graphs.CriticalPath(nodes, score, score) for score, nodes in brute_force_paths(flow, positive_only=False)]
    maps = graphs.path_heatmaps(flow, [every, every[:1]])
    full = LRP(model, "epsilon_plus").attribute(x, target=3).attributions[0]
    assert relative(maps[0], full) < 1e-12
    assert relative(graphs.full_heatmap(flow), full) < 1e-12
    assert relative(maps[1], full) > 1e-3  # one path keeps far less
    # the score with every channel kept is the model's own; with one path's channels, something else
    scores = graphs.path_scores(flow, [every, every[:1]])
    assert abs(float(scores[0]) - float(model(x)[0, 3])) < 1e-12
    kept = every[0].channels
    masked = model[0](x)
    masked = masked * torch.zeros(masked.shape[1], dtype=x.dtype).index_fill_(0, torch.tensor([kept["0"]]), 1).view(1, -1, 1, 1)
    rest = model[3](model[2](model[1](masked)))
    rest = rest * torch.zeros(rest.shape[1], dtype=x.dtype).index_fill_(0, torch.tensor([kept["3"]]), 1).view(1, -1, 1, 1)
    hand = model[6](model[5](model[4](rest)))[0, 3]
    assert abs(float(scores[1]) - float(hand)) < 1e-12


def test_k_curves_and_choice():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    flow = graphs.build_graph(model, x, target=3, k=4, composite="epsilon_plus", conductance_steps=None)
    curves = graphs.k_curves(flow, max_k=5)
    paths = graphs.k_best_paths(flow, 5)
    assert curves.ks == list(range(1, len(paths) + 1))
    maps = graphs.path_heatmaps(flow, [paths[:2]])
    full = graphs.full_heatmap(flow)
    assert math.isclose(curves.heatmap_mse[1], float((maps[0] - full).square().mean()), rel_tol=1e-12)
    scale = (maps[0].abs() + full.abs()) / 2
    terms = torch.where(scale > 0, (maps[0] - full).abs() / scale.clamp_min(1e-300), torch.zeros_like(scale))
    assert math.isclose(curves.heatmap_smape[1], float(terms.mean()), rel_tol=1e-12)
    s = curves.scores[0]
    assert math.isclose(curves.score_smape[0], abs(s - flow.score) / ((abs(s) + abs(flow.score)) / 2), rel_tol=1e-12)
    best = min(curves.heatmap_smape)
    assert curves.choose(best, metric="heatmap_smape") == curves.ks[curves.heatmap_smape.index(best)]
    assert curves.choose(-1.0, metric="heatmap_smape") is None
    with pytest.raises(ValueError, match="metric"):
        curves.choose(0.1, metric="accuracy")


def test_attributes_are_numbers_and_files_round_trip(tmp_path):
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    before = model_state(model)
    flow = graphs.build_graph(model, x, target=1, k=3, conductance_steps=8)
    assert_unchanged(model, before)
    conductance = attrib.LayerConductance(model, flow.layers).attribute(x, target=1, n_steps=8)
    activation = attrib.LayerActivation(model, flow.layers).attribute(x)
    for node, data in flow.graph.nodes(data=True):
        assert {"value", "rank", "depth", "outflow", "leak"} <= set(data)
        for key in ("value", "outflow", "leak"):
            assert math.isfinite(data[key])
        if node[0] != graphs.CLASS_LAYER:
            layer, channel = node
            assert math.isclose(data["conductance"], float(conductance[layer][0, channel].sum()), rel_tol=1e-9, abs_tol=1e-15)
            assert math.isclose(data["act_max"], float(activation[layer][0, channel].max()), rel_tol=1e-12)
            assert math.isclose(data["act_mean"], float(activation[layer][0, channel].mean()), rel_tol=1e-12)
    for _, _, data in flow.graph.edges(data=True):
        assert math.isfinite(data["weight"]) and math.isfinite(data["share"])
    graphs.write_graphml(flow, tmp_path / "g.graphml")
    graphs.write_json(flow, tmp_path / "g.json")
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert back.number_of_nodes() == flow.graph.number_of_nodes() and back.number_of_edges() == flow.graph.number_of_edges()
    a, b = next(iter(flow.graph.edges))
    assert math.isclose(back.edges[graphs.node_id(a), graphs.node_id(b)]["share"], flow.graph.edges[a, b]["share"])
    pruned = graphs.pruned(flow)
    kept = graphs.selected_neurons(flow)
    for layer in flow.layers:  # in the direction of what flows through the layer (the sign of its total)
        values = flow.values[layer] * (1 if flow.values[layer].sum() > 0 else -1)
        threshold = values.mean() - values.std(unbiased=False)
        assert kept[layer] == [c for c in range(values.numel()) if values[c] > threshold]
    assert all(n[0] == graphs.CLASS_LAYER or n[1] in kept[n[0]] for n in pruned.nodes)


def test_resnet18_and_vgg11_graphs_conserve_with_lrp0():
    """Torchvision models as shipped (in-place ReLUs, the reused ReLU, `out += identity`)."""
    torch.manual_seed(0)
    for name in ("resnet18", "vgg11"):
        model = getattr(torchvision.models, name)(weights=None).double().eval()
        x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
        flow = graphs.build_graph(model, x, target=4, k=3, composite=LRP_ZERO, conductance_steps=None)
        inner = [n for n in flow.graph.nodes if n[0] not in (graphs.CLASS_LAYER,)]
        assert len(inner) == 3 * len(flow.layers)
        worst = max(abs(flow.graph.nodes[n]["leak"]) for n in inner) / abs(flow.score)
        assert worst < 1e-9, name
        if name == "resnet18":
            assert any(flow.layers.index(v[0]) < flow.layers.index(u[0]) - 1 for u, v in flow.graph.edges if u[0] in flow.layers)


def test_errors_name_the_argument():
    model = make_cnn()
    with pytest.raises(ValueError, match="inputs"):
        graphs.build_graph(model, torch.rand(2, 3, 8, 8, dtype=torch.float64), target=1)
    with pytest.raises(ValueError, match="k must"):
        graphs.build_graph(model, torch.rand(1, 3, 8, 8, dtype=torch.float64), target=1, k=0)
    with pytest.raises(ValueError, match="layers"):
        graphs.build_graph(model, torch.rand(1, 3, 8, 8, dtype=torch.float64), target=1, layers=["nope"])


def test_drawing_marks_exactly_the_path_edges(tmp_path):
    from matplotlib.colors import to_hex

    from attrib.viz.graph import draw_graph

    model = TinyResidual().double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    flow = graphs.build_graph(model, x, target=int(model(x).argmax()), k=3, conductance_steps=None)
    paths = graphs.k_best_paths(flow, 3)
    figure = draw_graph(flow, paths)
    red = [line for line in figure.axes[0].lines if to_hex(line.get_color()) == "#d62728"]
    on_paths = {(a, b) for p in paths for a, b in zip(p.nodes[:-1], p.nodes[1:])}
    assert len(red) == len(on_paths) > 0
    assert len(figure.axes[0].lines) == flow.graph.number_of_edges()
    draw_graph(flow, paths, tmp_path / "flow.png")
    assert (tmp_path / "flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_order_unused_modules_extra_arguments_and_skips_around_every_layer():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    # layers given out of order: the conductance graph sorts them into the order they run
    given = graphs.build_graph(model, x, target=1, layers=["3", "0"], k=3, method="conductance", n_steps=8)
    assert given.layers == ["0", "3"] and len(graphs.k_best_paths(given, 50)) == len(brute_force_paths(given))

    class WithAux(nn.Module):  # an auxiliary head that does not run in eval mode, and an extra argument
        def __init__(self):
            super().__init__()
            self.net, self.aux = make_cnn(), nn.Linear(5, 5).double()

        def forward(self, x, scale):
            out = self.net(x) * scale
            return self.aux(out) if self.training else out

    wrapped = WithAux().eval()
    flow = graphs.build_graph(wrapped, x, target=1, k=3, additional_forward_args=(2.0,), conductance_steps=None)
    assert flow.layers == ["net.0", "net.3", "net.6"]  # no "aux": it does not run in eval mode
    curves = graphs.k_curves(flow, max_k=3)
    assert curves.full_score == pytest.approx(float(wrapped(x, 2.0)[0, 1]))
    # the output layer recorded: the class node hands everything to it
    with_head = graphs.build_graph(model, x, target=1, layers=["0", "3", "6"], k=3, composite=LRP_ZERO, conductance_steps=None)
    assert {v[0] for v in with_head.graph.successors(with_head.class_node)} == {"6"}
    # a skip connection around every recorded layer: what reaches the input directly is outflow, not leak
    residual = TinyResidual().double().eval()
    y = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    skipping = graphs.build_graph(residual, y, target=0, layers=["a", "b"], k=4, composite=LRP_ZERO, conductance_steps=None)
    assert abs(skipping.graph.nodes[skipping.class_node]["leak"]) < 1e-12 * abs(skipping.score)
    through_b = float(skipping.flows[graphs.CLASS_LAYER]["b"].sum())
    assert abs(skipping.graph.nodes[skipping.class_node]["outflow"] - through_b) > 1e-6  # the skip carries some
