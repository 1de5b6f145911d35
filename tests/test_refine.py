"""Refinement to a tolerance from the per-step completeness residuals."""
import warnings

import pytest
import torch
from conftest import make_cnn
from torch import nn

import attrib


@pytest.mark.parametrize("activation, pool, tolerance", [(nn.ReLU, nn.MaxPool2d, 1e-5), (nn.Softplus, nn.AvgPool2d, 1e-8)])
def test_bisection_meets_the_tolerance_with_fewer_evaluations_than_doubling(activation, pool, tolerance):
    model = make_cnn(3, activation, pool=pool)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    baselines = torch.full_like(x, 0.3)
    run = attrib.LayerConductance(model, ["0", "3", "6"])
    bisect = run.attribute(x, target=2, baselines=baselines, n_steps=4, tolerance=tolerance)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # doubling may run out of max_steps on the ReLU net
        double = run.attribute(x, target=2, baselines=baselines, n_steps=4, tolerance=tolerance, refine="double", max_steps=1024)
    with torch.no_grad():
        change = model(x)[:, 2] - model(baselines)[:, 2]
    assert bisect.info["converged"]
    for name in ["0", "3", "6"]:
        assert float((bisect[name].reshape(2, -1).sum(1) - change).abs().max()) <= tolerance + 1e-12
    assert bisect.evaluations < double.evaluations
    # every evaluated node is kept: the grid holds exactly `evaluations` nodes, all distinct
    assert len(set(bisect.info["alphas"])) == bisect.evaluations


def test_refined_result_matches_a_uniform_run_on_the_same_grid():
    model = make_cnn(1, nn.Softplus)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="not reached"):
        doubled = attrib.LayerConductance(model, "3").attribute(x, target=0, n_steps=3, tolerance=1e-300, refine="double", max_steps=24)
    uniform = attrib.LayerConductance(model, "3").attribute(x, target=0, n_steps=24)
    assert doubled.evaluations == 25 and not doubled.info["converged"]
    assert torch.allclose(doubled["3"], uniform["3"], rtol=1e-12, atol=1e-15)
