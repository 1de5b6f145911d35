"""The streamed backward pass: each layer's gradient is used as soon as it is complete.

Layers are consumed during backward through tensor hooks; the lowest layers (graph leaves) and
layers whose graph reaches no leaf are differentiated directly. Every route must give the same
numbers, and completeness must hold on cuts made of several layers (parallel branches).
"""
import torch
from conftest import relative
from torch import nn

import attrib


class TwoBranches(nn.Module):
    """x -> a -> softplus -> (c, d) -> softplus(c) + softplus(d) -> linear: {a} and {c, d} are both cuts."""

    def __init__(self, scale: torch.Tensor | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 5, 3, padding=1)
        self.d = nn.Conv2d(4, 5, 1)
        self.dead = nn.Conv2d(4, 2, 1)  # runs, but the output does not depend on it
        self.head = nn.Linear(5 * 6 * 6, 3)
        self.scale = scale  # a plain tensor attribute (not a parameter) that may require grad

    def forward(self, x):
        h = nn.functional.softplus(self.a(x))
        if self.scale is not None:
            h = h * self.scale
        self.dead(h)
        return self.head((nn.functional.softplus(self.c(h)) + nn.functional.softplus(self.d(h))).flatten(1))


def inputs():
    return torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_hooked_layers_equal_directly_differentiated_ones():
    model = TwoBranches().double().eval()
    x = inputs()
    with_a = attrib.LayerConductance(model, ["a", "c", "d", "dead"]).attribute(x, target=[0, 2], n_steps=12)  # c, d hooked
    alone = attrib.LayerConductance(model, ["c", "d"]).attribute(x, target=[0, 2], n_steps=12)  # c, d leaves
    assert list(with_a.attributions) == ["a", "c", "d", "dead"]
    for name in ["c", "d"]:
        assert relative(with_a[name], alone[name]) <= 1e-12
    assert float(with_a["dead"].abs().max()) == 0.0
    change = with_a.outputs - with_a.baseline_outputs
    # smooth path: the trapezoid rule's error is O(1/n^2), on the two-layer cut {c, d} as on {a}
    fine = attrib.LayerConductance(model, ["a", "c", "d"]).attribute(x, target=[0, 2], n_steps=400)
    cut = fine["c"].flatten(1).sum(1) + fine["d"].flatten(1).sum(1)
    assert float((cut - change).abs().max()) <= 1e-6 * float(change.abs().max())
    assert float(fine.delta["a"].abs().max()) <= 1e-6 * float(change.abs().max())


def test_layers_whose_graph_reaches_no_leaf_are_differentiated_directly():
    scale = torch.full((1,), 1.5, dtype=torch.float64, requires_grad=True)
    model = TwoBranches(scale).double().eval()
    x = inputs()
    # c and d need a gradient (through `scale`) without being leaves of ours: no leaf below them
    res = attrib.LayerConductance(model, ["c", "d"]).attribute(x, target=1, n_steps=12)
    plain = attrib.LayerConductance(TwoBranches(scale.detach()).double().eval(), ["c", "d"]).attribute(x, target=1, n_steps=12)
    for name in ["c", "d"]:
        assert relative(res[name], plain[name]) <= 1e-12
    assert scale.grad is None  # nothing was accumulated into the user's tensor


def test_streamed_and_chunked_agree_with_internal_influence_dense():
    model = TwoBranches().double().eval()
    x = inputs()
    full = attrib.InternalInfluence(model, ["a", "c"]).attribute(x, target=0, n_steps=7)
    chunked = attrib.InternalInfluence(model, ["a", "c"]).attribute(x, target=0, n_steps=7, internal_batch_size=3)
    # dense re-implementation: gauss-legendre nodes, dF/dy at each node by plain autograd
    nodes, weights = attrib.quadrature.weighted_rule("gausslegendre", 7)
    expected = torch.zeros_like(full["c"])
    for alpha, weight in zip(nodes.tolist(), weights.tolist()):
        seen = {}
        handle = model.c.register_forward_hook(lambda m, i, o: seen.setdefault("c", o))
        out = model(alpha * x)
        handle.remove()
        expected += weight * torch.autograd.grad(out[:, 0].sum(), seen["c"])[0]
    for res in [full, chunked]:
        assert relative(res["c"], expected) <= 1e-12
