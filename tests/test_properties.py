"""Axioms on random small CNNs and MLPs (hypothesis): completeness, linearity, insensitivity,
and neuron conductance summing to layer conductance."""
import torch
from conftest import make_cnn, make_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attrib

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh}


def random_case(seed: int, kind: str, activation: str, bias: bool, batch: int):
    if kind == "cnn":
        model = make_cnn(seed, ACTIVATIONS[activation], bias)
        shape, layers = (batch, 3, 8, 8), ["0", "1", "2", "3", "4", "6"]
    else:
        model = make_mlp(seed, ACTIVATIONS[activation], bias=bias)
        shape, layers = (batch, 6), ["0", "1", "2", "3", "4"]
    generator = torch.Generator().manual_seed(seed)
    return model, torch.randn(*shape, generator=generator, dtype=torch.float64), layers


def total(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def score_change(model, x, baselines, target):
    with torch.no_grad():
        return model(x)[:, target] - model(baselines)[:, target]


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["cnn", "mlp"]), n_steps=st.integers(1, 12),
       batch=st.integers(1, 3), target=st.integers(0, 2))
def test_completeness_is_exact_on_bias_free_relu_nets(seed, kind, n_steps, batch, target):
    """Positively homogeneous net, zero baseline: the gradient is constant along the path."""
    model, x, layers = random_case(seed, kind, "relu", False, batch)
    res = attrib.LayerConductance(model, layers).attribute(x, target=target, n_steps=n_steps)
    change = score_change(model, x, torch.zeros_like(x), target)
    scale = float(change.abs().max()) + 1e-12
    for name in layers:
        assert float((total(res[name]) - change).abs().max()) <= 1e-11 * scale, name
        assert torch.allclose(res.delta[name], total(res[name]) - change, rtol=0, atol=1e-14)


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["cnn", "mlp"]),
       activation=st.sampled_from(["relu", "softplus", "tanh"]), batch=st.integers(1, 2))
def test_completeness_at_every_layer_to_a_tolerance(seed, kind, activation, batch):
    model, x, layers = random_case(seed, kind, activation, True, batch)
    baselines = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    res = attrib.LayerConductance(model, layers).attribute(x, target=1, baselines=baselines, n_steps=8, tolerance=1e-7)
    change = score_change(model, x, baselines, 1)
    for name in layers:
        assert float((total(res[name]) - change).abs().max()) <= 1e-7 + 1e-12, name


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["cnn", "mlp"]),
       activation=st.sampled_from(["relu", "softplus"]), a=st.floats(-3, 3), b=st.floats(-3, 3),
       method=st.sampled_from(attrib.QUADRATURE_METHODS))
def test_linearity_in_the_output(seed, kind, activation, a, b, method):
    model, x, layers = random_case(seed, kind, activation, True, 2)
    run = attrib.LayerConductance(model, layers)
    first = run.attribute(x, target=0, n_steps=5, method=method)
    second = run.attribute(x, target=2, n_steps=5, method=method)
    mixed = run.attribute(x, target=lambda out: a * out[:, 0] + b * out[:, 2], n_steps=5, method=method)
    for name in layers:
        expected = a * first[name] + b * second[name]
        assert torch.allclose(mixed[name], expected, rtol=1e-10, atol=1e-12 * (1 + float(expected.abs().max())))


@SETTINGS
@given(seed=st.integers(0, 10_000), unit=st.integers(0, 7), method=st.sampled_from(attrib.QUADRATURE_METHODS))
def test_insensitivity_a_unit_that_cannot_change_the_output_gets_zero(seed, unit, method):
    model = make_mlp(seed, nn.ReLU)
    with torch.no_grad():
        model[2].weight[:, unit] = 0.0  # hidden unit `unit` of layer "1" feeds nothing
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = attrib.LayerConductance(model, ["1", "0"]).attribute(x, target=1, n_steps=6, method=method)
    assert torch.all(res["1"][:, unit] == 0) and torch.all(res["0"][:, unit] == 0)
    influence = attrib.InternalInfluence(model, "1").attribute(x, target=1, n_steps=6)
    assert torch.all(influence["1"][:, unit] == 0)


@SETTINGS
@given(seed=st.integers(0, 10_000), neuron=st.integers(0, 7), batch=st.integers(1, 3))
def test_neuron_conductance_sums_to_layer_conductance_first_layer_exactly(seed, neuron, batch):
    """At the first linear layer dy = W dx along the path, so the two quadratures agree exactly."""
    model = make_mlp(seed, nn.ReLU)
    x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layer = attrib.LayerConductance(model, "0").attribute(x, target=2, n_steps=7)["0"][:, neuron]
    through = attrib.NeuronConductance(model, "0").attribute(x, (neuron,), target=2, n_steps=7)
    assert torch.allclose(total(through.attributions), layer, rtol=1e-12, atol=1e-14)
    assert float(through.delta.abs().max()) <= 1e-14


@SETTINGS
@given(seed=st.integers(0, 10_000), channel=st.integers(0, 5), row=st.integers(0, 1), col=st.integers(0, 1))
def test_neuron_conductance_sums_to_layer_conductance_deep_layer(seed, channel, row, col):
    """Deeper, the quadratures differ by O(1/n^2) on a smooth net: they converge to each other."""
    model = make_cnn(seed, nn.Softplus, pool=nn.AvgPool2d)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layer = attrib.LayerConductance(model, "4").attribute(x, target=3, n_steps=400)["4"][:, channel, row, col]
    through = attrib.NeuronConductance(model, "4").attribute(x, [(channel, row, col)], target=3, n_steps=400)
    gap = (total(through.attributions[0]) - layer).abs()
    assert float(gap.max()) <= 1e-5 * (1 + float(layer.abs().max()))
    filters = attrib.NeuronConductance(model, "4").attribute(x, [(channel, slice(None), slice(None))], target=3, n_steps=400)
    whole = attrib.LayerConductance(model, "4").attribute(x, target=3, n_steps=400)["4"][:, channel].sum((1, 2))
    assert float((total(filters.attributions[0]) - whole).abs().max()) <= 1e-5 * (1 + float(whole.abs().max()))
