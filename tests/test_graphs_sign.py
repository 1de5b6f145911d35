"""Path graphs when the relevance that flows has the opposite sign to the score (issue 15, 7c).

A bias can absorb more than the whole score: a positive logit made of negative evidence and a
large bias sends negative relevance down, a negative logit made of positive evidence sends
positive relevance down. The graph then keeps, per layer, the channels with the largest value in
the direction of that layer's total and follows edges whose oriented share is positive; every
number below comes from a dense LRP-epsilon written out with matrices, or from hand arithmetic.
"""
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

from attrib import graphs
from attrib.lrp import LRP, LRP0, Composite, Epsilon
from attrib.module_types import LINEAR_LAYERS

EPSILON = 0.01
EPSILON_RULE = Composite(types=[(LINEAR_LAYERS, Epsilon(EPSILON))])


def flipped_mlp(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """3 -> 5 -> 5 -> 2, hidden biases 0; the output bias of class 0 is set to +-1, against the sign
    of the evidence W a, so the logit's sign is the opposite of what flows below it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    x = torch.rand(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model[0].bias.zero_()
        model[2].bias.zero_()
        evidence = float(model(x)[0, 0] - model[4].bias[0])
        model[4].bias[0] = 1.0 if evidence < 0 else -1.0
    return model, x


def stab(z: torch.Tensor) -> torch.Tensor:
    return z + EPSILON * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def dense_lrp(model: nn.Module, x: torch.Tensor, target: int) -> dict:
    """LRP-epsilon by matrices: relevance per channel at the two hidden Linear outputs, the direct
    flows class -> "2" and "2" -> "0", and the input relevance per channel of "0"."""
    (w0, b0), (w2, b2), (w4, b4) = [(model[i].weight.detach(), model[i].bias.detach()) for i in (0, 2, 4)]
    a = x[0]
    z0 = w0 @ a + b0
    a0 = z0.clamp_min(0)
    z2 = w2 @ a0 + b2
    a2 = z2.clamp_min(0)
    z4 = w4 @ a2 + b4
    score = z4[target]
    from_class = a2 * w4[target] / stab(score) * score                       # (5,): into the channels of "2"
    down = (w2 * a0[None, :]) / stab(z2)[:, None] * from_class[:, None]      # (5 upper, 5 lower)
    r0 = down.sum(0)
    to_input = r0 * (z0 - b0) / stab(z0)                                     # what each channel of "0" passes on
    return {"score": float(score), "r2": from_class, "r0": r0, "from_class": from_class, "down": down, "to_input": to_input}


def sign(value: float) -> float:
    return 1.0 if value > 0 else -1.0


def dense_paths(dense: dict, k_channels: int) -> tuple[dict, list]:
    """The graph's definition written out: per layer the k channels with the largest value x the
    sign of the layer's total; an edge counts when share x sign(upper) x sign(lower) > 0 (the class
    node's sign is the score's); paths ranked by the product of shares in absolute value."""
    score, r2, r0 = dense["score"], dense["r2"], dense["r0"]
    d_class, d2, d0 = sign(score), sign(float(r2.sum())), sign(float(r0.sum()))
    top = {"2": torch.argsort(r2 * d2, descending=True)[:k_channels].tolist(),
           "0": torch.argsort(r0 * d0, descending=True)[:k_channels].tolist()}
    found = []
    for upper, lower in itertools.product(top["2"], top["0"]):
        first = float(dense["from_class"][upper]) / score
        second = float(dense["down"][upper, lower]) / float(r2[upper])
        if first * d_class * d2 > 0 and second * d2 * d0 > 0:
            found.append((first * second, (upper, lower)))
    found.sort(key=lambda item: -abs(item[0]))
    return top, found


@pytest.mark.parametrize("seed", [4, 9])
def test_paths_follow_the_relevance_when_a_bias_flips_its_sign(seed):
    """seed 4: logit +0.80 from evidence -0.20; seed 9: logit -0.80 from evidence +0.20. The code
    before the fix ranked channels in the score's direction: for seed 9 it kept channels with no
    relevance of the score's sign and returned no path, silently; for seed 4 it returned paths
    through channels that carry under a tenth of what the best ones below carry."""
    model, x = flipped_mlp(seed)
    dense = dense_lrp(model, x, 0)
    flow = graphs.build_graph(model, x, target=0, k=3, composite=EPSILON_RULE, conductance_steps=None)
    assert flow.score == pytest.approx(dense["score"], rel=1e-12)
    for layer, key in (("2", "r2"), ("0", "r0")):
        assert torch.allclose(flow.values[layer], dense[key], rtol=1e-12, atol=1e-15)
        assert sign(float(dense[key].sum())) == -sign(flow.score) == flow.directions[layer]  # the premise
    top, expected = dense_paths(dense, 3)
    assert flow.top == top
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # paths exist: no warning
        paths = graphs.k_best_paths(flow, 9)
    assert len(paths) == len(expected) >= 5
    for path, (score, (upper, lower)) in zip(paths, expected):
        assert path.nodes == (flow.class_node, ("2", upper), ("0", lower))
        assert path.score == pytest.approx(score, rel=1e-10)
        assert path.carried == pytest.approx(score * dense["score"], rel=1e-10)
        assert sign(path.carried) == flow.directions["0"] == -sign(flow.score)
    # the best path's K-path heatmap is the relevance it carries, passed through "0" to the input
    best = paths[0]
    lower = best.nodes[-1][1]
    heatmap = graphs.path_heatmaps(flow, [paths[:1]])[0]
    through = best.carried * float(dense["to_input"][lower] / dense["r0"][lower])
    assert float(heatmap.sum()) == pytest.approx(through, rel=1e-9)
    full = graphs.full_heatmap(flow)
    assert float(full.sum()) == pytest.approx(float(dense["to_input"].sum()), rel=1e-9)
    assert graphs.share(heatmap, full) > 0  # the path's map points the way the full map does


@pytest.mark.parametrize("seed", [4, 9])
def test_selection_rule_counts_contributions_in_the_layers_direction(seed):
    model, x = flipped_mlp(seed)
    dense = dense_lrp(model, x, 0)
    flow = graphs.build_graph(model, x, target=0, k=3, composite=EPSILON_RULE, conductance_steps=None)
    kept = graphs.selected_neurons(flow)
    for layer, key in (("2", "r2"), ("0", "r0")):
        values = dense[key] * sign(float(dense[key].sum()))
        threshold = float(values.mean() - values.std(unbiased=False))
        assert kept[layer] == [c for c in range(5) if float(values[c]) > threshold]


class Reversal(nn.Module):
    """x = (1, 1) -> identity -> ReLU -> "mid" -> ReLU -> head, by hand (LRP-0 numbers):
    unit A of "mid": z = 1, head weight -1: relevance -1, sent to channel 0 of "low" (-1);
    unit B: evidence 2, bias -1.4, z = 0.6, head weight +1: relevance +0.6, but it sends all of its
    evidence, +2, to channel 1 of "low". Score -0.4 = -1 + 0.6; "mid" totals -0.4 (direction -),
    "low" totals -1 + 2 = +1 (direction +): the relevance changes direction at B's bias, and no node
    of the direction of "mid" sends anything in the direction of "low"."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Linear(2, 2, bias=False).double()
        self.mid = nn.Linear(2, 2).double()
        self.head = nn.Linear(2, 1, bias=False).double()
        with torch.no_grad():
            self.low.weight.copy_(torch.eye(2))
            self.mid.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
            self.mid.bias.copy_(torch.tensor([0.0, -1.4], dtype=torch.float64))
            self.head.weight.copy_(torch.tensor([[-1.0, 1.0]], dtype=torch.float64))

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.low(x)))))


def test_no_path_warns_why_and_the_bias_free_rule_finds_it():
    model = Reversal().eval()
    x = torch.ones(1, 2, dtype=torch.float64)
    lrp0 = Composite(types=[(LINEAR_LAYERS, LRP0())])
    flow = graphs.build_graph(model, x, target=0, layers=["low", "mid"], k=2, composite=lrp0, conductance_steps=None)
    assert flow.score == pytest.approx(-0.4, abs=1e-12)
    assert flow.values["mid"].tolist() == pytest.approx([-1.0, 0.6], abs=1e-12)
    assert flow.values["low"].tolist() == pytest.approx([-1.0, 2.0], abs=1e-12)
    assert flow.directions == {"low": 1.0, "mid": -1.0}
    with pytest.warns(UserWarning, match=r"no path .* stop at layer 'mid'.*every channel is kept.*bias=False"):
        assert graphs.k_best_paths(flow, 5) == []
    with pytest.warns(UserWarning, match="no path"):
        curves = graphs.k_curves(flow, max_k=3)  # no paths: empty curves, not a crash
    assert curves.ks == [] and curves.scores == []
    assert curves.full_relevance == pytest.approx(-1.0 + 2.0, abs=1e-12)  # x_0 gets -1, x_1 gets +2
    assert curves.full_score == pytest.approx(-0.4, abs=1e-12)
    # without the bias in z, B passes on its 0.6: "low" = (-1, 0.6), and class -> A -> channel 0
    # carries all of A's relevance: score 2.5 * 1 (shares -1 / -0.4 and -1 / -1), carried -1
    bias_free = Composite(types=[(LINEAR_LAYERS, LRP0(bias=False))])
    fixed = graphs.build_graph(model, x, target=0, layers=["low", "mid"], k=2, composite=bias_free, conductance_steps=None)
    assert fixed.values["low"].tolist() == pytest.approx([-1.0, 0.6], abs=1e-12)
    (path,) = graphs.k_best_paths(fixed, 5)
    assert path.nodes == (fixed.class_node, ("mid", 0), ("low", 0))
    assert path.score == pytest.approx(2.5, rel=1e-12) and path.carried == pytest.approx(-1.0, rel=1e-12)
    assert float(LRP(model, bias_free).attribute(x, target=0).attributions.sum()) == pytest.approx(-0.4, abs=1e-12)


def positive_share_paths(flow: graphs.FlowGraph) -> list:
    """Brute force by the rule before the fix: every path from the class node of positive shares."""
    graph, found = flow.graph, []
    tiers = [[flow.class_node]] + [[(layer, c) for c in flow.top[layer]] for layer in reversed(flow.layers)]
    for nodes in itertools.product(*tiers):
        shares = [graph.edges[a, b]["share"] for a, b in itertools.pairwise(nodes) if graph.has_edge(a, b)]
        if len(shares) == len(nodes) - 1 and all(s > 0 for s in shares):
            found.append((math.prod(shares), nodes))
    return sorted(found, key=lambda item: -item[0])


def bias_free_mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                         nn.Linear(8, 3, bias=False)).double().eval()


@pytest.mark.parametrize("method", ["lrp", "conductance"])
def test_without_a_flip_paths_are_the_positive_share_paths_of_either_sign(method):
    """Bias-free: LRP-0 conserves the score layer by layer and conductance sums to F(x) - F(0) =
    F(x) at every layer, so every direction is the score's sign and the rule is the old one, for
    a positive and for a negative target score (conductance's completeness keeps its layers in
    the score's direction: its graphs were not affected)."""
    model = bias_free_mlp()
    x = torch.rand(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits = model(x)[0]
    lrp0 = Composite(types=[(LINEAR_LAYERS, LRP0())])
    for target in (int(logits.argmax()), int(logits.argmin())):
        flow = graphs.build_graph(model, x, target=target, k=4, composite=lrp0, conductance_steps=None,
                                  method=method, n_steps=64)
        assert flow.score == pytest.approx(float(logits[target]), rel=1e-12)
        for layer in flow.layers:
            assert float(flow.values[layer].sum()) == pytest.approx(flow.score, rel=1e-9)  # completeness
            assert flow.directions[layer] == sign(flow.score)
            along = flow.values[layer] * sign(flow.score)
            assert flow.top[layer] == torch.argsort(along, descending=True)[:4].tolist()
        expected = positive_share_paths(flow)
        paths = graphs.k_best_paths(flow, 100)
        assert len(paths) == len(expected) >= 8
        for path, (score, nodes) in zip(paths, expected):
            assert path.nodes == nodes and path.score == pytest.approx(score, rel=1e-12) and path.score > 0
            assert sign(path.carried) == sign(flow.score)
    assert float(logits.min()) < 0 < float(logits.max())
