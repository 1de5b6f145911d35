"""Captum as the oracle, float64: every integration method, small models and vgg11 at 32 px."""
import warnings

import pytest
import torch
from captum import attr as captum
from conftest import assert_unchanged, make_cnn, make_mlp, model_state, relative

import attrib
from attrib.quadrature import CAPTUM_METHODS

TOL = 1e-8


@pytest.fixture(scope="module")
def cnn_case():
    model = make_cnn()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    baselines = 0.1 * torch.randn(3, 3, 8, 8, dtype=torch.float64)
    return model, x, baselines, [1, 3, 0]


@pytest.mark.parametrize("method", CAPTUM_METHODS)
def test_integrated_gradients(cnn_case, method):
    model, x, baselines, target = cnn_case
    ours = attrib.IntegratedGradients(model).attribute(x, target=target, baselines=baselines, n_steps=9, method=method)
    theirs, delta = captum.IntegratedGradients(model).attribute(
        x, target=target, baselines=baselines, n_steps=9, method=method, return_convergence_delta=True
    )
    assert relative(ours.attributions, theirs) <= TOL
    assert torch.allclose(ours.delta, delta, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", CAPTUM_METHODS)
def test_layer_conductance_all_layers_in_one_call(cnn_case, method):
    model, x, baselines, target = cnn_case
    layers = ["0", "1", "3", "4"]
    before = model_state(model)
    ours = attrib.LayerConductance(model, layers).attribute(x, target=target, baselines=baselines, n_steps=6, method=method)
    assert_unchanged(model, before)
    for name in layers:
        theirs = captum.LayerConductance(model, model[int(name)]).attribute(
            x, target=target, baselines=baselines, n_steps=6, method=method
        )
        assert relative(ours[name], theirs) <= TOL, name


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_layer_conductance_to_layer_input(cnn_case, method):
    model, x, baselines, target = cnn_case
    ours = attrib.LayerConductance(model, "3").attribute(
        x, target=target, baselines=baselines, n_steps=5, method=method, attribute_to_layer_input=True
    )
    theirs = captum.LayerConductance(model, model[3]).attribute(
        x, target=target, baselines=baselines, n_steps=5, method=method, attribute_to_layer_input=True
    )
    assert relative(ours["3"], theirs) <= TOL


@pytest.mark.parametrize("method", CAPTUM_METHODS)
def test_neuron_conductance_single_neurons(cnn_case, method):
    model, x, baselines, target = cnn_case
    neurons = [(2, 1, 0), (0, 0, 1), (5, 1, 1)]
    ours = attrib.NeuronConductance(model, "3").attribute(
        x, neurons, target=target, baselines=baselines, n_steps=7, method=method
    )
    for i, neuron in enumerate(neurons):
        theirs = captum.NeuronConductance(model, model[3]).attribute(
            x, neuron, target=target, baselines=baselines, n_steps=7, method=method
        )
        assert relative(ours.attributions[i], theirs) <= TOL


@pytest.mark.parametrize("method", CAPTUM_METHODS)
def test_internal_influence_and_gradient_x_activation(cnn_case, method):
    model, x, baselines, target = cnn_case
    ours = attrib.InternalInfluence(model, ["1", "3"]).attribute(x, target=target, baselines=baselines, n_steps=7, method=method)
    for name in ["1", "3"]:
        theirs = captum.InternalInfluence(model, model[int(name)]).attribute(
            x, target=target, baselines=baselines, n_steps=7, method=method
        )
        assert relative(ours[name], theirs) <= TOL
    gxa = attrib.LayerGradientXActivation(model, ["0", "4"]).attribute(x, target=target)
    for name in ["0", "4"]:
        theirs = captum.LayerGradientXActivation(model, model[int(name)]).attribute(x, target=target)
        assert relative(gxa[name], theirs) <= TOL
    act = attrib.LayerActivation(model, ["4"]).attribute(x)
    assert torch.equal(act["4"], captum.LayerActivation(model, model[4]).attribute(x))


def test_mlp_all_methods():
    model = make_mlp()
    torch.manual_seed(2)
    x = torch.randn(4, 6, dtype=torch.float64)
    ours = attrib.LayerConductance(model, ["0", "2", "4"]).attribute(x, target=2, n_steps=11, method="riemann_middle")
    for name in ["0", "2", "4"]:
        theirs = captum.LayerConductance(model, model[int(name)]).attribute(x, target=2, n_steps=11, method="riemann_middle")
        assert relative(ours[name], theirs) <= TOL


def test_vgg11_small_resolution(vgg11, vgg11_convs):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    target = [7, 123]
    before = model_state(vgg11)
    for method in ["riemann_trapezoid", "gausslegendre"]:
        ours = attrib.LayerConductance(vgg11, vgg11_convs).attribute(x, target=target, n_steps=4, method=method)
        for name in vgg11_convs[::3]:
            layer = dict(vgg11.named_modules())[name]
            theirs = captum.LayerConductance(vgg11, layer).attribute(x, target=target, n_steps=4, method=method)
            assert relative(ours[name], theirs) <= TOL, (method, name)
    ig = attrib.IntegratedGradients(vgg11).attribute(x, target=target, n_steps=4, method="riemann_left")
    theirs = captum.IntegratedGradients(vgg11).attribute(x, target=target, n_steps=4, method="riemann_left")
    assert relative(ig.attributions, theirs) <= TOL
    nc = attrib.NeuronConductance(vgg11, "features.18").attribute(x, (3, 1, 0), target=target, n_steps=4, method="riemann_right")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum.NeuronConductance(vgg11, vgg11.features[18]).attribute(
            x, (3, 1, 0), target=target, n_steps=4, method="riemann_right"
        )
    assert relative(nc.attributions, theirs) <= TOL
    ii = attrib.InternalInfluence(vgg11, "features.13").attribute(x, target=target, n_steps=4)
    assert relative(ii["features.13"], captum.InternalInfluence(vgg11, vgg11.features[13]).attribute(x, target=target, n_steps=4)) <= TOL
    gxa = attrib.LayerGradientXActivation(vgg11, "features.8").attribute(x, target=target)
    assert relative(gxa["features.8"], captum.LayerGradientXActivation(vgg11, vgg11.features[8]).attribute(x, target=target)) <= TOL
    assert_unchanged(vgg11, before)
