"""Dhamdhere et al.'s hand-computable cases: conductance vs gradient x activation vs internal influence."""
import pytest
import torch
from torch import nn

import attrib


class Scalar(nn.Module):
    """x -> y = w x (module 'y') -> head(y)."""

    def __init__(self, weight: float, head):
        super().__init__()
        self.y = nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            self.y.weight.fill_(weight)
        self.head = head

    def forward(self, x):
        return self.head(self.y(x)).reshape(-1)


ONE = torch.ones(1, 1, dtype=torch.float64)


def test_saturation_conductance_is_one_gradient_x_activation_is_zero():
    model = Scalar(2.0, lambda y: torch.clamp(y, max=1.0))  # y = 2x, z = min(y, 1)
    # the kink y = 1 sits at alpha = 1/2, the midpoint of a step when n_steps is odd: the trapezoid is exact
    res = attrib.LayerConductance(model, "y").attribute(ONE, n_steps=51)
    assert float(res["y"]) == pytest.approx(1.0, abs=1e-14)
    assert float(res.delta["y"]) == pytest.approx(0.0, abs=1e-14)
    coarse = attrib.LayerConductance(model, "y").attribute(ONE, n_steps=50)
    assert abs(float(coarse["y"]) - 1.0) <= 1 / 50 + 1e-12  # kink on a node: one step is half wrong
    gxa = attrib.LayerGradientXActivation(model, "y").attribute(ONE)
    assert float(gxa["y"]) == 0.0


def test_overshoot_conductance_is_epsilon_gradient_x_activation_is_one_plus_epsilon():
    eps = 0.25
    model = Scalar(1.0, lambda y: torch.relu(y - 1.0))  # f(x) = x, g(y) = max(y - 1, 0)
    x = torch.full((1, 1), 1.0 + eps, dtype=torch.float64)
    res = attrib.LayerConductance(model, "y").attribute(x, n_steps=200, tolerance=1e-13)
    assert float(res.outputs) == pytest.approx(eps, abs=1e-15)
    assert float(res["y"]) == pytest.approx(eps, abs=1e-13)
    gxa = attrib.LayerGradientXActivation(model, "y").attribute(x)
    assert float(gxa["y"]) == pytest.approx(1.0 + eps, abs=1e-15)
    # the paper's printed x = 1 - eps: the gradient is 0 there and both are 0
    below = torch.full((1, 1), 1.0 - eps, dtype=torch.float64)
    assert float(attrib.LayerConductance(model, "y").attribute(below, n_steps=10)["y"]) == 0.0
    assert float(attrib.LayerGradientXActivation(model, "y").attribute(below)["y"]) == 0.0


def test_sign_conductance_is_minus_one_internal_influence_is_plus_one():
    model = Scalar(-1.0, lambda y: y)  # f(x) = -x, g(y) = y
    res = attrib.LayerConductance(model, "y").attribute(ONE, n_steps=4)
    assert float(res["y"]) == pytest.approx(-1.0, abs=1e-15)
    influence = attrib.InternalInfluence(model, "y").attribute(ONE, n_steps=4)
    assert float(influence["y"]) == pytest.approx(1.0, abs=1e-15)
