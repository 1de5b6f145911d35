"""Zeiler-Fergus deconvolution reconstruction and conductance gradient ascent."""
import pytest
import torch
import torchvision
from conftest import assert_unchanged, make_cnn, model_state, relative
from torch import nn

import attrib
from attrib.ascent import aggregated_conductance, conductance_map, last_conv

FILTER = (5, slice(None), slice(None))


@pytest.mark.parametrize("arch, layer, selector", [
    ("vgg11", "features.18", FILTER),            # the last conv's ReLU, one filter
    ("vgg16", "features.28", (7, 1, 0)),        # the last conv's output, one neuron
    ("vgg16", "features.23", FILTER),            # a max pooling's output
    ("alexnet", "features.10", FILTER),          # overlapping 3x3/2 poolings below
])
def test_reconstruction_equals_the_deconvnet_gradient(arch, layer, selector):
    """Same mathematics: the DeconvNet gradient of the truncated model, started from the selected
    activations, is the reconstruction (1e-5 asked; float64 gives exact agreement)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).double().eval()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    before = model_state(model)
    result = attrib.DeconvReconstruction(model).attribute(x, layer=layer, neuron_selector=selector)
    assert_unchanged(model, before)
    start = result.info["start"]
    assert float(start.abs().sum()) > 0 and int((start != 0).flatten(1).sum(1).max()) < start[0].numel()
    truncated = model.features[:int(layer.split(".")[1]) + 1]
    expected = attrib.DeconvNet(truncated).attribute(x, target=lambda out: (out * start).flatten(1).sum(1),
                                                     internal_batch_size=None).attributions  # the callable reads start
    assert relative(result.attributions, expected) < 1e-12
    assert float(result.attributions.abs().max()) > 0


def test_reconstruction_by_hand_through_unpooling_relu_and_transposed_conv():
    """1x1 conv (weight 2), ReLU, 2x2 max pool on a 1x1x2x4 map: the selected pooled unit's value goes
    back to its switch, through ReLU, times the tied weight 2; every other position gets 0."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.MaxPool2d(2)).double().eval()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[0].bias.fill_(-1.0)
    x = torch.tensor([[[[1.0, 3.0, 0.0, 2.5], [2.0, 0.5, 4.0, 1.0]]]], dtype=torch.float64)
    result = attrib.DeconvReconstruction(model).attribute(x, layer="2", neuron_selector=(0, 0, 1))
    expected = torch.zeros_like(x)
    expected[0, 0, 1, 2] = 2.0 * (2.0 * 4.0 - 1.0)  # pooled value 7 at the switch (1, 2), times w = 2
    assert torch.equal(result.attributions, expected)


def test_reconstruction_refuses_residual_models_and_unknown_layers():
    model = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(ValueError, match="plain chain"):
        attrib.DeconvReconstruction(model).attribute(torch.rand(1, 3, 32, 32), layer="layer1.1.conv1", neuron_selector=FILTER)
    with pytest.raises(ValueError, match="container"):
        attrib.DeconvReconstruction(model).attribute(torch.rand(1, 3, 32, 32), layer="layer1", neuron_selector=FILTER)
    odd = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh()).eval()
    with pytest.raises(ValueError, match="Tanh"):
        attrib.DeconvReconstruction(odd).attribute(torch.rand(1, 1, 5, 5), layer="1", neuron_selector=(0, 0, 0))
    with pytest.raises(ValueError, match="neuron_selector"):
        attrib.DeconvReconstruction(odd).attribute(torch.rand(1, 1, 5, 5), layer="0", neuron_selector=(9, 0, 0))


class SmoothCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Softplus(), nn.Conv2d(4, 3, 3), nn.Softplus())
        self.head = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_conductance_gradient_matches_finite_differences():
    model = SmoothCNN().double().eval()
    x = torch.rand(1, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def objective(image, create_graph=False):
        return aggregated_conductance(model, image, "features.2", 1, n_steps=6, create_graph=create_graph)[0, 2]

    probe = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(probe, True), probe)
    numeric = torch.zeros_like(x).view(-1)
    step = 1e-6
    for i in range(x.numel()):
        bump = torch.zeros_like(x).view(-1)
        bump[i] = step
        bump = bump.view_as(x)
        numeric[i] = (objective(x + bump) - objective(x - bump)) / (2 * step)
    assert relative(grad, numeric.view_as(x)) < 1e-7
    assert float(grad.abs().max()) > 1e-4


def test_conductance_map_is_complete_and_matches_layer_conductance():
    """The ascent's differentiable conductance is LayerConductance's stieltjes_trapezoid."""
    model = SmoothCNN().double().eval()
    x = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    ours = conductance_map(model, x, "features.2", 1, n_steps=16)
    reference = attrib.LayerConductance(model, "features.2").attribute(x, target=1, n_steps=16, method="stieltjes_trapezoid")
    assert relative(ours, reference["features.2"]) < 1e-12


def test_ascent_raises_the_objective_and_reports_the_gradient_effect():
    model = SmoothCNN().double().eval()
    x = torch.rand(1, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    before = model_state(model)
    out = attrib.conductance_ascent(model, x, layer="features.2", target=1, steps=15, lr=0.01, bounds=(0.0, 1.0), n_steps=6)
    assert_unchanged(model, before)
    assert out.objective.shape == (16, 1)
    rises = out.objective[1:, 0] - out.objective[:-1, 0]
    assert float(out.objective[-1, 0]) > float(out.objective[0, 0]) and int((rises > 0).sum()) >= 13
    assert float(out.image.min()) >= 0.0 and float(out.image.max()) <= 1.0
    scores = aggregated_conductance(model, x, "features.2", 1, n_steps=6)
    assert int(out.filter[0]) == int(scores[0].argmax())
    assert torch.allclose(out.objective[0], scores[0, out.filter])
    # the gradient effect: d(activation of the strongest neuron)/dx, from the truncated model
    c, (h, w) = int(out.filter[0]), out.neuron[0].tolist()
    probe = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model.features[:3](probe)[0, c, h, w], probe)
    assert torch.equal(out.gradient_effect, expected)
    assert torch.equal(out.mask, expected != 0)
    # softplus: the receptive field of a 3x3 after a 3x3 is 5x5 of 7x7
    assert int(out.mask[0, 0].sum()) == 25


def test_ascent_on_vgg11_keeps_imagenet_bounds():
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None).eval()
    x = torch.rand(1, 3, 32, 32)
    out = attrib.conductance_ascent(model, x, target=3, steps=2, lr=0.5, n_steps=4)
    assert out.layer == last_conv(model) == "features.18"
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert bool((out.image >= (0 - mean) / std - 1e-6).all()) and bool((out.image <= (1 - mean) / std + 1e-6).all())
    assert not torch.equal(out.image, x)


def test_ascent_errors_name_the_argument():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="bounds"):
        attrib.conductance_ascent(model, x, target=0, bounds="sRGB")
    with pytest.raises(ValueError, match="bounds"):
        attrib.conductance_ascent(model, x, target=0, bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="filter"):
        attrib.conductance_ascent(model, x, target=0, filter=99, bounds=None)
    with pytest.raises(ValueError, match="optimizer"):
        attrib.conductance_ascent(model, x, target=0, optimizer="lbfgs-ish", bounds=None)
    with pytest.raises(ValueError, match="lr"):
        attrib.conductance_ascent(model, x, target=0, lr=0, bounds=None)
    with pytest.raises(ValueError, match="n_steps"):
        attrib.conductance_ascent(model, x, target=0, n_steps=0, bounds=None)
