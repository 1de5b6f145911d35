"""Deletion/insertion curves, infidelity and max-sensitivity (attrib/faithfulness.py): against hand computations on
tiny models and Captum's infidelity / sensitivity_max given the same perturbations."""
from __future__ import annotations

import captum.attr as captum_attr
import captum.metrics as captum_metrics
import pytest
import torch
from torch import nn

import attrib
from attrib.errors import InputError
from attrib.faithfulness import infidelity, max_sensitivity, perturbation_curve

F64 = torch.float64


class _Sum(nn.Module):
    """F_c(x) = sum of the input weighted by w_c: a linear model whose logits can be computed by hand."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def test_deletion_and_insertion_curves_by_hand():
    # one 1x2x2 image, logits F_0 = x.sum(): deleting the pixel with the largest attribution first
    model = _Sum(torch.ones(1, 4, dtype=F64))
    x = torch.tensor([[[[4.0, 1.0], [2.0, 3.0]]]], dtype=F64)
    attributions = x.clone()
    curve = perturbation_curve(model, x, attributions, target=0, mode="deletion", steps=4, score="logit", fill=0.0)
    assert curve.scores.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]
    assert curve.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert float(curve.auc) == pytest.approx(0.25 * (10 / 2 + 6 + 3 + 1 + 0 / 2))
    least = perturbation_curve(model, x, attributions, target=0, mode="deletion", order="least", steps=4, score="logit")
    assert least.scores.tolist() == [[10.0, 9.0, 7.0, 4.0, 0.0]]
    inserted = perturbation_curve(model, x, attributions, target=0, mode="insertion", steps=2, score="logit", fill=1.0)
    assert inserted.scores.tolist() == [[4.0, 4 - 2 + 4 + 3, 10.0]]  # fill 1 everywhere, then the two best pixels back
    # patches of 2 over a 4x4 image: one patch per step
    big = torch.arange(16, dtype=F64).view(1, 1, 4, 4)
    patches = perturbation_curve(_Sum(torch.ones(1, 16, dtype=F64)), big, big, target=0, units=2, steps=4, score="logit")
    assert patches.units == "2x2 patches"
    assert patches.scores.tolist() == [[120.0, 120 - 50, 120 - 50 - 42, 120 - 50 - 42 - 18, 0.0]]  # patch sums 10, 18, 42, 50


def test_curve_probabilities_match_a_direct_evaluation_and_the_batches_do_not_matter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    attributions = attrib.IntegratedGradients(model).attribute(x, target=[0, 1, 2]).attributions
    fill = torch.randn(3, 8, 8, dtype=F64)
    curve = perturbation_curve(model, x, attributions, target=[0, 1, 2], units=2, steps=5, fill=fill, batch_size=4)
    again = perturbation_curve(model, x, attributions, target=[0, 1, 2], units=2, steps=5, fill=fill, batch_size=100)
    assert torch.equal(curve.scores, again.scores)
    # step 2 of example 1 by hand: 2 * 16 / 5 -> round(6.4) = 6 patches of 2x2 replaced, most relevant first
    scores = attributions[1].sum(0).reshape(4, 2, 4, 2).sum((1, 3)).flatten()
    keep = torch.ones(16, dtype=torch.bool)
    keep[scores.argsort(descending=True, stable=True)[:6]] = False
    mask = keep.view(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)
    image = torch.where(mask, x[1], fill)
    expected = model(image.unsqueeze(0)).softmax(1)[0, 1]
    assert float(curve.scores[1, 2]) == pytest.approx(float(expected), abs=1e-14)
    assert float(curve.scores[1, 0]) == pytest.approx(float(model(x[1:2]).softmax(1)[0, 1]), abs=1e-14)


def test_infidelity_is_captums_with_the_same_perturbations():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(4, 6, dtype=F64)
    attributions = attrib.IntegratedGradients(model).attribute(x, target=2, n_steps=16).attributions
    draws = torch.randn(5, 4, 6, dtype=F64) * 0.1
    stacked = draws.transpose(0, 1).reshape(20, 6)  # Captum's rows: the samples of example 0 first

    def perturb(inputs):
        return stacked, inputs - stacked
    for normalize in (False, True):
        ours = infidelity(model, x, attributions, target=2, perturbations=draws, normalize=normalize)
        theirs = captum_metrics.infidelity(model, perturb, x, attributions, target=2, n_perturb_samples=5, normalize=normalize)
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14), normalize
    # by hand for a linear model: with the gradient as Phi, I . Phi = F(x) - F(x - I), so the infidelity is 0
    linear = _Sum(torch.randn(3, 6, dtype=F64))
    exact = attrib.Saliency(linear).attribute(x, target=1, abs=False).attributions
    assert float(infidelity(linear, x, exact, target=1, n_samples=8).abs().max()) < 1e-20


def test_max_sensitivity_is_captums_with_the_same_perturbations():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(3, 6, dtype=F64)
    draws = (torch.rand(4, 3, 6, dtype=F64) * 2 - 1) * 0.05
    order = draws.transpose(0, 1).reshape(12, 6)  # example-major, as Captum expands the inputs

    def perturb(inputs, perturb_radius=0.02):
        return inputs + order
    ours = max_sensitivity(attrib.Saliency(model), x, target=1, perturbations=draws)
    theirs = captum_metrics.sensitivity_max(captum_attr.Saliency(model).attribute, x, perturb_func=perturb,
                                            n_perturb_samples=4, target=1)
    assert torch.allclose(ours, theirs, rtol=1e-10)
    # a callable works too, and a linear model's saliency does not move at all
    linear = _Sum(torch.randn(3, 6, dtype=F64))
    still = max_sensitivity(lambda inputs, target: attrib.Saliency(linear).attribute(inputs, target=target, abs=False).attributions,
                            x, target=0, n_samples=3)
    assert float(still.max()) == 0.0


def test_bad_arguments_are_named():
    model = _Sum(torch.ones(2, 4, dtype=F64))
    x = torch.ones(1, 1, 2, 2, dtype=F64)
    for kwargs, word in ((dict(mode="erase"), "mode"), (dict(order="best"), "order"), (dict(units=3), "units"),
                         (dict(fill=torch.zeros(3)), "fill"), (dict(steps=0), "steps"), (dict(score="softmax"), "score")):
        with pytest.raises(InputError, match=word):
            perturbation_curve(model, x, x, target=0, **kwargs)
    with pytest.raises(InputError, match="attributions"):
        perturbation_curve(model, x, torch.ones(1, 3), target=0)
    with pytest.raises(InputError, match="perturbations"):
        infidelity(model, x, x, target=0, perturbations=torch.zeros(2, 4))


def test_a_pixel_maps_infidelity_is_the_full_maps_under_perturbations_shared_by_the_channels():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    full = attrib.InputXGradient(model).attribute(x, target=1).attributions
    shared = torch.randn(7, 2, 1, 6, 6, dtype=F64) * 0.1
    expected = infidelity(model, x, full, target=1, perturbations=shared.expand(7, 2, 3, 6, 6).contiguous())
    assert torch.allclose(infidelity(model, x, full.sum(1), target=1, perturbations=shared), expected, rtol=1e-12)
