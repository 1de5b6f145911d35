"""The gradient family of hidden neurons, and Captum's options (multiply_by_inputs, Grad-CAM's channel
summation, compute_convergence_delta, tuple targets, output batch checks). Captum is the oracle (float64)."""
import warnings

import pytest
import torch
from captum import attr as captum
from conftest import assert_unchanged, make_cnn, model_state, relative
from torch import nn

import attrib

TOL = 1e-8


@pytest.fixture(scope="module")
def cnn():
    model = make_cnn()
    torch.manual_seed(3)
    return model, torch.rand(3, 3, 8, 8, dtype=torch.float64), torch.rand(3, 3, 8, 8, dtype=torch.float64) * 0.1


NEURONS = [(1, 1, 1), (0, slice(None), slice(None))]


@pytest.mark.parametrize("ours_cls, theirs_cls", [
    (attrib.NeuronGradient, captum.NeuronGradient),
    (attrib.NeuronGuidedBackprop, captum.NeuronGuidedBackprop),
    (attrib.NeuronDeconvolution, captum.NeuronDeconvolution),
])
def test_neuron_gradient_family_matches_captum(cnn, ours_cls, theirs_cls):
    model, x, _ = cnn
    before = model_state(model)
    ours = ours_cls(model, "3").attribute(x, NEURONS, internal_batch_size=2)
    assert_unchanged(model, before)
    assert ours.attributions.shape == (2,) + x.shape
    layer = dict(model.named_modules())["3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, neuron in enumerate(NEURONS):
            theirs = theirs_cls(model, layer).attribute(x, neuron)
            assert relative(ours.attributions[i], theirs) <= TOL, neuron
    one = ours_cls(model, "3").attribute(x, NEURONS[0])
    assert torch.equal(one.attributions, ours.attributions[0])


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("multiply", [True, False])
def test_neuron_integrated_gradients_matches_captum_and_is_complete(cnn, method, multiply):
    model, x, baselines = cnn
    ours = attrib.NeuronIntegratedGradients(model, "3", multiply_by_inputs=multiply).attribute(
        x, NEURONS, baselines=baselines, n_steps=12, method=method, internal_batch_size=7)
    layer = dict(model.named_modules())["3"]
    for i, neuron in enumerate(NEURONS):
        theirs = captum.NeuronIntegratedGradients(model, layer, multiply_by_inputs=multiply).attribute(
            x, neuron, baselines=baselines, n_steps=12, method=method)
        assert relative(ours.attributions[i], theirs) <= TOL
    # completeness against the selected units' own change (ReLU layer: piecewise linear along the path)
    fine = attrib.NeuronIntegratedGradients(model, "1").attribute(x, [(2, 4, 4), (1, slice(None), slice(None))],
                                                                  baselines=baselines, n_steps=64)
    with attrib.capture(model, ["1"]) as cap:
        model(torch.cat([x, baselines]))
    change = torch.stack([cap["1"][:, 2, 4, 4], cap["1"][:, 1].flatten(1).sum(1)])
    change = change[:, :3] - change[:, 3:]
    assert torch.allclose(fine.outputs - fine.baseline_outputs, change, atol=1e-14)
    assert torch.allclose(fine.attributions.flatten(2).sum(2) - change, fine.delta, atol=1e-12)
    assert fine.delta.abs().max() < 0.05 * change.abs().max()


def test_neuron_methods_with_several_inputs_and_a_callable_selector():
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu, self.head = nn.Linear(4, 6), nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)

        def forward(self, u, v):
            return self.head(self.relu(self.a(u) + self.b(v)))

    model = Two().double()
    inputs = (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    ours = attrib.NeuronGradient(model, "relu").attribute(inputs, [(2,), lambda y: y[:, 1] * 2 + y[:, 4]])
    theirs = captum.NeuronGradient(model, model.relu).attribute(inputs, (2,))
    for a, b in zip(ours.attributions, theirs):
        assert relative(a[0], b) <= TOL
    combined = [2 * a + c for a, c in zip(captum.NeuronGradient(model, model.relu).attribute(inputs, (1,)),
                                          captum.NeuronGradient(model, model.relu).attribute(inputs, (4,)))]
    for a, b in zip(ours.attributions, combined):
        assert relative(a[1], b) <= TOL
    smooth = attrib.NeuronIntegratedGradients(model, "relu").attribute(inputs, lambda y: (y[:, 1] + y[:, 4]).square(),
                                                                       n_steps=64)
    total = sum(a.flatten(1).sum(1) for a in smooth.attributions)  # a callable has a completeness error too
    assert torch.allclose(total - (smooth.outputs - smooth.baseline_outputs), smooth.delta, atol=1e-12)
    assert smooth.delta.abs().max() < 1e-3 * (smooth.outputs - smooth.baseline_outputs).abs().max()  # ReLU kinks: O(1/n)
    ig = attrib.NeuronIntegratedGradients(model, "relu").attribute(inputs, (2,), n_steps=20)
    theirs = captum.NeuronIntegratedGradients(model, model.relu).attribute(inputs, (2,), n_steps=20)
    for a, b in zip(ig.attributions, theirs):
        assert relative(a, b) <= TOL


def test_multiply_by_inputs_false_matches_captum(cnn):
    model, x, baselines = cnn
    target = [0, 2, 1]
    ig = attrib.IntegratedGradients(model, multiply_by_inputs=False).attribute(x, target=target, baselines=baselines, n_steps=9)
    theirs = captum.IntegratedGradients(model, multiply_by_inputs=False).attribute(x, target=target, baselines=baselines,
                                                                                   n_steps=9)
    assert relative(ig.attributions, theirs) <= TOL
    full = attrib.IntegratedGradients(model).attribute(x, target=target, baselines=baselines, n_steps=9)
    assert torch.equal(ig.delta, full.delta)  # delta stays the full attributions' completeness error
    nc = attrib.NeuronConductance(model, "3", multiply_by_inputs=False).attribute(
        x, (1, 1, 0), target=target, baselines=baselines, n_steps=6, method="riemann_trapezoid")
    theirs = captum.NeuronConductance(model, model[3], multiply_by_inputs=False).attribute(
        x, (1, 1, 0), target=target, baselines=baselines, n_steps=6, method="riemann_trapezoid")
    assert relative(nc.attributions, theirs) <= TOL
    grad = attrib.LayerGradientXActivation(model, "3", multiply_by_inputs=False).attribute(x, target=target)["3"]
    theirs = captum.LayerGradientXActivation(model, model[3], multiply_by_inputs=False).attribute(x, target=target)
    assert relative(grad, theirs) <= TOL


def test_gradcam_without_channel_summation_matches_captum(cnn):
    model, x, _ = cnn
    ours = attrib.GradCAM(model, "3").attribute(x, target=1, relu_attributions=False, interpolate_mode=None,
                                                attr_dim_summation=False).tensor
    theirs = captum.LayerGradCam(model, model[3]).attribute(x, target=1, attr_dim_summation=False)
    assert ours.shape == theirs.shape and ours.shape[1] > 1
    assert relative(ours, theirs) <= TOL


def test_compute_convergence_delta_matches_captum(cnn):
    model, x, baselines = cnn
    ig = attrib.IntegratedGradients(model)
    res = ig.attribute(x, target=2, baselines=baselines, n_steps=7)
    ours = ig.compute_convergence_delta(res.attributions, baselines, x, target=2)
    theirs = captum.IntegratedGradients(model).compute_convergence_delta(res.attributions, baselines, x, target=2)
    assert torch.allclose(ours, theirs, atol=1e-12) and torch.allclose(ours, res.delta, atol=1e-12)
    lc = attrib.LayerConductance(model, "3")
    layer = lc.attribute(x, target=2, baselines=baselines, n_steps=7)
    assert torch.allclose(lc.compute_convergence_delta(layer["3"], baselines, x, target=2), layer.delta["3"], atol=1e-12)
    with pytest.raises(ValueError, match=r"attributions has shape \(2, 3, 8, 8\); it needs 3 rows"):
        ig.compute_convergence_delta(res.attributions[:2], baselines, x, target=2)


def test_tuple_targets_on_outputs_with_several_dimensions():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 1)).double()  # (B, 4, H, W) scores
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    for target in [(1, 2, 3), [(0, 0, 0), (3, 4, 1)]]:
        ours = attrib.IntegratedGradients(model).attribute(x, target=target, n_steps=8)
        theirs = captum.IntegratedGradients(model).attribute(x, target=target, n_steps=8)
        assert relative(ours.attributions, theirs) <= TOL
        sal = attrib.Saliency(model).attribute(x, target=target).attributions
        assert relative(sal, captum.Saliency(model).attribute(x, target=target)) <= TOL


def test_an_output_batch_that_differs_from_the_input_batch_is_refused():
    class Pooled(nn.Module):
        def forward(self, x):
            return x.sum(0, keepdim=True)

    with pytest.raises(ValueError, match=r"shape \(1, 4\) for a batch of 6 input rows; attribution needs one output row per input row"):
        attrib.IntegratedGradients(Pooled()).attribute(torch.rand(3, 4, dtype=torch.float64), target=0)
    with pytest.raises(ValueError, match="one output row per input row"):
        attrib.Saliency(Pooled()).attribute(torch.rand(3, 4, dtype=torch.float64), target=0)


def test_captum_conventions_for_one_input_in_a_tuple_and_a_one_element_target(cnn):
    model, x, baselines = cnn
    ours = attrib.IntegratedGradients(model).attribute((x,), target=torch.tensor([2]), baselines=baselines, n_steps=5)
    theirs = captum.IntegratedGradients(model).attribute((x,), target=torch.tensor([2]), baselines=baselines, n_steps=5)
    assert isinstance(ours.attributions, tuple) and relative(ours.attributions[0], theirs[0]) <= TOL


def test_gradcam_on_inputs_without_the_maps_spatial_dimensions_keeps_the_layer_map():
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.conv, self.head = nn.Embedding(10, 4), nn.Conv1d(4, 3, 3, padding=1), nn.Linear(3, 2)

        def forward(self, ids):
            return self.head(self.conv(self.embed(ids).transpose(1, 2)).mean(2))

    model = Tokens().double()
    ids = torch.randint(10, (3, 7))
    with pytest.warns(UserWarning, match="the map stays at the layer's resolution"):
        ours = attrib.GradCAM(model, "conv").attribute(ids, target=1, relu_attributions=False)
    assert ours.info["resized"] is False
    assert relative(ours.tensor, captum.LayerGradCam(model, model.conv).attribute(ids, target=1)) <= TOL


def test_gradient_shap_and_neuron_methods_name_the_right_argument(cnn):
    model, x, _ = cnn
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        attrib.GradientShap(model).attribute(x, torch.zeros(2, 3, 8, 8, dtype=torch.float64), n_samples=0, target=0)
    with pytest.raises(TypeError, match=r"baselines: GradientShap draws from reference examples"):
        attrib.GradientShap(model).attribute(x, None, target=0)
    with pytest.raises(ValueError, match=r"baselines of shape \(2, 3, 4, 4\): give N >= 1 reference examples shaped"):
        attrib.GradientShap(model).attribute(x, torch.zeros(2, 3, 4, 4, dtype=torch.float64), target=0)

    class Pooled(nn.Module):  # the output mixes the batch, but the neuron methods never read it
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).sum(0, keepdim=True)

    grads = attrib.NeuronGradient(Pooled(), "inner.3").attribute(x, (1, 1, 1)).attributions
    assert relative(grads, captum.NeuronGradient(model, model[3]).attribute(x, (1, 1, 1))) <= TOL


def test_deeplift_refuses_a_batch_that_is_not_first():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):  # x: (B, T, 3) -> (T, B, 3) inside, then back
            return torch.relu(self.lin(x).transpose(0, 1)).sum((0, 2)).unsqueeze(1)

    with pytest.raises(ValueError, match=r"first dimension is not a multiple of the evaluated batch \[x; x'\]"):
        attrib.DeepLift(SequenceFirst().double()).attribute(torch.randn(2, 5, 3, dtype=torch.float64), baselines=0.0)
