"""Several inputs (Captum's convention): a tuple of tensors in, a tuple of maps out, delta over all of
them. Captum is the oracle (float64, 1e-8) on a three-input model; axioms where Captum has no counterpart."""
import copy
import warnings

import pytest
import torch
from captum import attr as captum
from conftest import assert_unchanged, model_state, relative
from torch import nn

import attrib
from attrib.hooks import capture

TOL = 1e-8


class ThreeInputs(nn.Module):
    """An image (B, 2, 6, 6), a feature vector (B, 5) and a second image-like (B, 1, 6, 6) input, with a
    per-example scale passed as an additional forward argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.features = nn.Linear(5, 6)
        self.frelu = nn.ReLU()
        self.head = nn.Linear(4 * 9 + 6, 3)

    def forward(self, image, vector, mask, scale=None):
        y = self.pool(self.relu(self.conv(torch.cat([image, mask], 1))))
        z = self.frelu(self.features(vector))
        out = self.head(torch.cat([y.flatten(1), z], 1))
        return out if scale is None else out * scale.unsqueeze(1)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = ThreeInputs().double().eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64),
              torch.randn(3, 5, generator=g, dtype=torch.float64),
              torch.rand(3, 1, 6, 6, generator=g, dtype=torch.float64))
    baselines = (0.1 * torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64), 0.5,
                 torch.zeros(1, 1, 6, 6, dtype=torch.float64))
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    return model, inputs, baselines, [0, 2, 1], scale


def close(ours, theirs):
    assert isinstance(ours, tuple) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert relative(a, b) <= TOL


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients(case, method):
    model, inputs, baselines, target, scale = case
    ours = attrib.IntegratedGradients(model).attribute(inputs, target=target, baselines=baselines, n_steps=7, method=method,
                                                       additional_forward_args=(scale,), internal_batch_size=5)
    theirs, delta = captum.IntegratedGradients(model).attribute(
        inputs, target=target, baselines=baselines, n_steps=7, method=method, additional_forward_args=(scale,),
        return_convergence_delta=True,
    )
    close(ours.attributions, theirs)
    assert torch.allclose(ours.delta, delta, rtol=1e-8, atol=1e-12)
    total = sum(a.flatten(1).sum(1) for a in ours.attributions)
    assert torch.allclose(total - (ours.outputs - ours.baseline_outputs), ours.delta, atol=1e-12)


def smooth(model):
    smooth = copy.deepcopy(model)
    smooth.relu, smooth.frelu, smooth.pool = nn.Softplus(), nn.Tanh(), nn.AvgPool2d(2)
    return smooth


def test_integrated_gradients_completeness_over_all_inputs(case):
    model, inputs, baselines, target, scale = case
    ig = attrib.IntegratedGradients(smooth(model))
    args = dict(target=target, baselines=baselines, method="gausslegendre", additional_forward_args=scale)
    fine, coarse = ig.attribute(inputs, n_steps=20, **args), ig.attribute(inputs, n_steps=4, **args)
    change = (fine.outputs - fine.baseline_outputs).abs().max()
    # Gauss-Legendre on a smooth path converges fast; the sum is over all three inputs
    assert fine.delta.abs().max() < 1e-7 * change
    assert fine.delta.abs().max() < 1e-3 * coarse.delta.abs().max()
    chunked = ig.attribute(inputs, n_steps=20, internal_batch_size=7, **args)  # any chunking, same numbers
    for a, b in zip(fine.attributions, chunked.attributions):
        assert relative(a, b) <= 1e-12


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_layer_conductance_internal_influence_and_gradient_x_activation(case, method):
    model, inputs, baselines, target, scale = case
    before = model_state(model)
    args = dict(target=target, additional_forward_args=(scale,))
    ours = attrib.LayerConductance(model, ["conv", "features"]).attribute(inputs, baselines=baselines, n_steps=6,
                                                                          method=method, **args)
    assert_unchanged(model, before)
    for name in ("conv", "features"):
        theirs = captum.LayerConductance(model, getattr(model, name)).attribute(inputs, baselines=baselines, n_steps=6,
                                                                                method=method, **args)
        assert relative(ours[name], theirs) <= TOL
        influence = attrib.InternalInfluence(model, name).attribute(inputs, baselines=baselines, n_steps=6,
                                                                    method=method, **args)
        expected = captum.InternalInfluence(model, getattr(model, name)).attribute(inputs, baselines=baselines, n_steps=6,
                                                                                   method=method, **args)
        assert relative(influence[name], expected) <= TOL
        gxa = attrib.LayerGradientXActivation(model, name).attribute(inputs, **args)
        expected = captum.LayerGradientXActivation(model, getattr(model, name)).attribute(inputs, **args)
        assert relative(gxa[name], expected) <= TOL
        act = attrib.LayerActivation(model, name).attribute(inputs, additional_forward_args=(scale,))
        assert relative(act[name], captum.LayerActivation(model, getattr(model, name)).attribute(
            inputs, additional_forward_args=(scale,))) <= TOL


def test_stieltjes_conductance_is_complete_over_all_inputs(case):
    model, inputs, baselines, target, scale = case
    res = attrib.LayerConductance(smooth(model), ["conv", "features", "head"]).attribute(
        inputs, target=target, baselines=baselines, n_steps=64, additional_forward_args=scale)
    change = res.outputs - res.baseline_outputs
    # the head is linear: its conductance is exact; conv and features together cut the network (each alone does not)
    assert (res.delta["head"].abs() <= 1e-10 * change.abs().max()).all()
    both = res["conv"].flatten(1).sum(1) + res["features"].flatten(1).sum(1) - change
    assert (both.abs() <= 1e-4 * change.abs().max()).all()
    assert (res.delta["conv"].abs() > 1e-2 * change.abs().max()).any()


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_neuron_conductance(case, method):
    model, inputs, baselines, target, scale = case
    neurons = [(1,), (2,)]  # Captum needs a layer that every input reaches
    ours = attrib.NeuronConductance(model, "head").attribute(
        inputs, neurons, target=target, baselines=baselines, n_steps=5, method=method, additional_forward_args=scale,
    )
    assert isinstance(ours.attributions, tuple) and len(ours.attributions) == 3
    for i, neuron in enumerate(neurons):
        theirs = captum.NeuronConductance(model, model.head).attribute(
            inputs, neuron, target=target, baselines=baselines, n_steps=5, method=method,
            additional_forward_args=(scale,),
        )
        close(tuple(a[i] for a in ours.attributions), theirs)
    one = attrib.NeuronConductance(model, "head").attribute(
        inputs, neurons[0], target=target, baselines=baselines, n_steps=5, method=method, additional_forward_args=scale,
    )
    close(one.attributions, tuple(a[0] for a in ours.attributions))


def test_neuron_conductance_sums_to_the_neurons_layer_conductance(case):
    model, inputs, baselines, target, scale = case
    res = attrib.NeuronConductance(model, "features").attribute(inputs, [(2,), (4,)], target=target, baselines=baselines,
                                                                n_steps=16, additional_forward_args=scale)
    layer = attrib.LayerConductance(model, "features").attribute(inputs, target=target, baselines=baselines, n_steps=16,
                                                                 additional_forward_args=scale)
    for i, unit in enumerate((2, 4)):
        total = sum(a[i].flatten(1).sum(1) for a in res.attributions)
        # the units read only the vector input: the other inputs get exactly zero through them
        assert torch.equal(res.attributions[0][i], torch.zeros_like(inputs[0]))
        assert torch.allclose(total, layer["features"][:, unit], atol=1e-10)
        assert torch.allclose(res.delta[i], total - layer["features"][:, unit], atol=1e-12)


def test_gradient_family(case):
    model, inputs, _, target, scale = case
    args = dict(target=target, additional_forward_args=(scale,))
    close(attrib.Saliency(model).attribute(inputs, **args).attributions, captum.Saliency(model).attribute(inputs, **args))
    close(attrib.Saliency(model).attribute(inputs, abs=False, **args).attributions,
          captum.Saliency(model).attribute(inputs, abs=False, **args))
    close(attrib.InputXGradient(model).attribute(inputs, **args).attributions,
          captum.InputXGradient(model).attribute(inputs, **args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(attrib.GuidedBackprop(model).attribute(inputs, **args).attributions,
              captum.GuidedBackprop(model).attribute(inputs, **args))
        close(attrib.DeconvNet(model).attribute(inputs, **args).attributions,
              captum.Deconvolution(model).attribute(inputs, **args))


def test_gradcam_and_guided_gradcam(case):
    model, inputs, _, target, scale = case
    args = dict(target=target, additional_forward_args=(scale,))
    cam = attrib.GradCAM(model, "conv").attribute(inputs, relu_attributions=False, interpolate_mode=None, **args)
    assert relative(cam.tensor, captum.LayerGradCam(model, model.conv).attribute(inputs, **args)) <= TOL
    upsampled = attrib.GradCAM(model, "pool").attribute(inputs, **args).tensor
    assert upsampled.shape == (3, 1, 6, 6)  # the first input's spatial size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = attrib.GuidedGradCAM(model, "pool").attribute(inputs, **args).attributions
        theirs = captum.GuidedGradCam(model, model.pool).attribute(inputs, **args)
    assert any("inputs[1]" in str(w.message) for w in caught)  # the vector has no spatial dimensions
    assert ours[1].numel() == 0 and theirs[1].numel() == 0
    assert relative(ours[0], theirs[0]) <= TOL and relative(ours[2], theirs[2]) <= TOL


def test_deeplift(case):
    model, inputs, baselines, target, scale = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = attrib.DeepLift(model, maxpool="gradient").attribute(inputs, target=target, baselines=baselines,
                                                                    additional_forward_args=scale)
        theirs, delta = captum.DeepLift(model).attribute(inputs, target=target, baselines=baselines,
                                                         additional_forward_args=(scale,), return_convergence_delta=True)
    close(ours.attributions, theirs)
    assert torch.allclose(ours.delta, delta, atol=1e-10)
    exact = attrib.DeepLift(model).attribute(inputs, target=target, baselines=baselines, additional_forward_args=scale)
    assert exact.delta.abs().max() < 1e-10  # the rescale rule on max pooling: complete over all inputs together


def test_one_tensor_gives_a_tensor_and_a_tuple_of_one_gives_a_tuple(case):
    model, inputs, _, target, scale = case

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, image):
            return self.inner(image, image.new_ones(image.shape[0], 5), image[:, :1])

    one = One()
    x = inputs[0]
    as_tensor = attrib.IntegratedGradients(one).attribute(x, target=target, n_steps=4)
    as_tuple = attrib.IntegratedGradients(one).attribute((x,), target=target, baselines=(None,), n_steps=4)
    assert isinstance(as_tensor.attributions, torch.Tensor)
    assert isinstance(as_tuple.attributions, tuple) and len(as_tuple.attributions) == 1
    assert torch.equal(as_tensor.attributions, as_tuple.attributions[0])


def test_integer_inputs_are_refused_with_a_pointer_and_accepted_as_forward_args(case):
    model, inputs, _, target, scale = case

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, image, vector, keep):
            return self.inner(image * keep.unsqueeze(1).to(image.dtype), vector, image[:, :1].detach() * 0)

    masked = Masked()
    keep = torch.ones(3, 6, 6, dtype=torch.bool)
    keep[:, :2] = False
    with pytest.raises(TypeError, match=r"inputs\[2\] is torch.bool: integer and boolean inputs .* additional_forward_args"):
        attrib.IntegratedGradients(masked).attribute((inputs[0], inputs[1], keep), target=target)
    res = attrib.IntegratedGradients(masked).attribute(inputs[:2], target=target, additional_forward_args=keep,
                                                       internal_batch_size=4, n_steps=5)
    assert torch.equal(res.attributions[0][:, :, :2], torch.zeros_like(res.attributions[0][:, :, :2]))
    # layer-only methods neither interpolate nor differentiate the inputs: integers pass there
    act = attrib.LayerActivation(masked, "inner.conv").attribute((inputs[0], inputs[1], keep))
    with capture(masked, ["inner.conv"]) as cap:
        masked(inputs[0], inputs[1], keep)
    assert torch.equal(act["inner.conv"], cap["inner.conv"])


def test_bad_several_inputs_are_refused_by_name(case):
    model, inputs, baselines, target, _ = case
    ig = attrib.IntegratedGradients(model)
    with pytest.raises(ValueError, match=r"same batch size.*\[3, 2, 3\]"):
        ig.attribute((inputs[0], inputs[1][:2], inputs[2]), target=0)
    with pytest.raises(ValueError, match="2 given for 3 inputs"):
        ig.attribute(inputs, target=0, baselines=baselines[:2])
    with pytest.raises(TypeError, match="a tuple of 3 baselines"):
        ig.attribute(inputs, target=0, baselines=torch.zeros(3, 2, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"baselines\[1\] of shape \(3, 4\) do not match inputs\[1\] of shape \(3, 5\)"):
        ig.attribute(inputs, target=0, baselines=(None, torch.zeros(3, 4, dtype=torch.float64), None))
    with pytest.raises(TypeError, match=r"inputs\[1\] is torch.float32 but the model's parameters are torch.float64"):
        ig.attribute((inputs[0], inputs[1].float(), inputs[2]), target=0)
    with pytest.raises(ValueError, match=r"inputs\[2\] contains NaN"):
        ig.attribute((inputs[0], inputs[1], inputs[2] * float("nan")), target=0)
    with pytest.raises(TypeError, match="as a tuple of tensors, not a list"):
        ig.attribute(list(inputs), target=0)


class Two(nn.Module):
    """``net`` on cat(a, b): a has 2 channels, b 1."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, a, b):
        return self.net(torch.cat([a, b], 1))


class Joined(nn.Module):
    """``net`` on the concatenated input itself; ``detach_b`` cuts b's channel from the gradient."""

    def __init__(self, net: nn.Module, detach_b: bool = False) -> None:
        super().__init__()
        self.net, self.detach_b = net, detach_b

    def forward(self, x):
        return self.net(torch.cat([x[:, :2], x[:, 2:].detach()], 1) if self.detach_b else x)


def test_conductance_ascent_of_one_chosen_input():
    """Ascending input 0 of (a, b) is the ascent of cat(a, b) through a model that detaches b's channels:
    the same conductance (both inputs interpolated) and the same gradient w.r.t. a, so Adam moves a identically."""
    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 36, 3)).double().eval()

    a, b = torch.rand(2, 2, 6, 6, dtype=torch.float64), torch.rand(2, 1, 6, 6, dtype=torch.float64)
    options = dict(layer="net.2", target=[0, 2], steps=4, lr=0.05, n_steps=6, bounds=None)
    two = attrib.conductance_ascent(Two(conv), (a, b), ascend=0, **options)
    joined = attrib.conductance_ascent(Joined(conv, detach_b=True), torch.cat([a, b], 1), **options)
    assert torch.equal(two.filter, joined.filter)
    assert relative(two.objective, joined.objective) <= 1e-12
    assert relative(two.image, joined.image[:, :2]) <= 1e-12
    assert torch.equal(joined.image[:, 2:], b)  # b's channels got no gradient: Adam leaves them
    assert relative(two.gradient_effect, joined.gradient_effect[:, :2]) <= 1e-12
    assert two.objective[-1].sum() > two.objective[0].sum()
    with pytest.raises(ValueError, match=r"ascend: the index of the input to optimise, an int in \[0, 1\], got 2"):
        attrib.conductance_ascent(Two(conv), (a, b), ascend=2, **options)


def test_evaluation_tools_take_several_inputs():
    """Each tool on (a, b) equals the same tool on cat(a, b) through the same network."""
    from attrib import evaluate

    torch.manual_seed(4)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)).double().eval()

    a, b = torch.rand(3, 2, 5, 5, dtype=torch.float64), torch.rand(3, 1, 5, 5, dtype=torch.float64)
    two, joined, x = Two(conv), Joined(conv), torch.cat([a, b], 1)
    assert torch.equal(evaluate.ablation_scores(two, (a, b), "net.1", [0, 1, 2]),
                       evaluate.ablation_scores(joined, x, "net.1", [0, 1, 2]))
    importance = evaluate.filter_importance(two, (a, b), "net.1", [0, 1, 2], "conductance", n_steps=8)
    assert relative(importance, evaluate.filter_importance(joined, x, "net.1", [0, 1, 2], "conductance", n_steps=8)) <= 1e-12
    assert evaluate.flip_counts(two, (a, b), "net.1", importance) == evaluate.flip_counts(joined, x, "net.1", importance)
    assert torch.equal(evaluate.pooled_activations(two, (a, b), "net.1", batch_size=2),
                       evaluate.pooled_activations(joined, x, "net.1"))
    ours = evaluate.sanity_check(two, (a, b), "net.1", [0, 1, 2], methods=["gradient_x_activation"], n_steps=4)
    theirs = evaluate.sanity_check(joined, x, "net.1", [0, 1, 2], methods=["gradient_x_activation"], n_steps=4)
    assert ours == theirs and len(ours["gradient_x_activation"]) == 2


def test_a_list_in_additional_forward_args_is_one_argument_as_in_captum(case):
    model, inputs, baselines, target, scale = case

    class Listed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, image, vector, mask, factors):
            return self.inner(image, vector, mask, factors[0] * factors[1])

    listed = Listed()
    factors = [torch.tensor([2.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)]  # one argument, not two
    ours = attrib.IntegratedGradients(listed).attribute(inputs, target=target, baselines=baselines, n_steps=5,
                                                        additional_forward_args=factors)
    theirs = captum.IntegratedGradients(listed).attribute(inputs, target=target, baselines=baselines, n_steps=5,
                                                          additional_forward_args=factors)
    close(ours.attributions, theirs)
