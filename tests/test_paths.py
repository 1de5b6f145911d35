"""Integration nodes and weights: Captum's definitions, and ours."""
import pytest
import torch
from captum.attr._utils.approximation_methods import approximation_parameters

from attrib.quadrature import CAPTUM_METHODS, FIRST_NODE, stieltjes_rule, weighted_rule


@pytest.mark.parametrize("method", CAPTUM_METHODS)
@pytest.mark.parametrize("n", [2, 7, 50])
def test_nodes_and_weights_are_captums(method, n):
    step_sizes, alphas = approximation_parameters(method)
    ours_alphas, ours_weights = weighted_rule(method, n)
    assert ours_alphas.tolist() == alphas(n)
    # Captum multiplies by torch.tensor(step_sizes), float32
    assert ours_weights.tolist() == torch.tensor(step_sizes(n), dtype=torch.float32).tolist()
    stieltjes_alphas, form = stieltjes_rule(method, n)
    assert form == "left" and stieltjes_alphas.tolist() == alphas(n + 1)


@pytest.mark.parametrize("n", [1, 4, 50])
def test_stieltjes_trapezoid_nodes_span_the_path(n):
    alphas, weights = weighted_rule("stieltjes_trapezoid", n)
    assert alphas[0] == FIRST_NODE and alphas[-1] == 1.0
    assert torch.allclose(alphas[1:], torch.arange(1, n + 1, dtype=torch.float64) / n, rtol=0, atol=0)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-15)
    assert weights[0] == weights[-1] == 0.5 / n
