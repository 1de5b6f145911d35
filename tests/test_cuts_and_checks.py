"""Cut layers (where completeness holds), the default layer, and the library's early, named errors
(issue 13 items 3, 4, 7), each against a number: completeness, a dense re-implementation, or the
same method on an equivalent model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import relative
from torch import nn

import attrib
from attrib.cuts import cut_layers, default_layer
from attrib.errors import InputError


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).double().eval()


def test_cuts_of_resnet18_follow_the_skip_connections_and_carry_the_whole_score_change(resnet):
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    convs = [n for n, m in resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    cuts = cut_layers(resnet, x, convs + ["layer1", "layer4", "layer4.1", "avgpool"])
    assert [n for n in convs if cuts[n]] == ["conv1", "fc"]  # every other conv sits inside a residual block
    assert cuts["layer1"] and cuts["layer4"] and cuts["layer4.1"] and cuts["avgpool"]
    assert default_layer(resnet, x) == "layer4"
    layers = ["conv1", "layer4", "layer4.1.conv2", "layer2.0.conv1"]
    result = attrib.LayerConductance(resnet, layers).attribute(x, target=3, n_steps=64)
    change = result.outputs - result.baseline_outputs
    for name in ("conv1", "layer4"):  # cuts: complete (exact here: random init has no biases)
        assert abs(float(result.delta[name] / change)) < 1e-10, name
    for name in ("layer4.1.conv2", "layer2.0.conv1"):  # bypassed: only a share (-0.003 and 0.43 here)
        assert abs(float(result[name].sum() / change) - 1) > 0.4, name


def test_default_layer_is_the_last_convolution_where_it_is_a_cut():
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None).eval()
    assert default_layer(vgg, torch.rand(1, 3, 32, 32)) == "features.18"
    dense = torchvision.models.densenet121(weights=None).eval()
    assert default_layer(dense, torch.rand(1, 3, 32, 32)) == "features"  # the dense block concatenates around it
    branches = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 30 * 30, 2)).eval()
    assert cut_layers(branches, torch.rand(1, 3, 32, 32), ["0", "1", "3"]) == {"0": True, "1": True, "3": True}


def test_gradcam_on_a_conv1d_layer_equals_its_formula_with_linear_interpolation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    model = model.double().eval()
    x = torch.randn(2, 2, 40, dtype=torch.float64)
    got = attrib.GradCAM(model, "0").attribute(x, target=1).attributions
    probe = x.clone().requires_grad_(True)
    activation = model[0](probe)
    (grad,) = torch.autograd.grad(model[1:](activation)[:, 1].sum(), activation)
    cam = (grad.mean(2, keepdim=True) * activation).sum(1, keepdim=True).clamp(min=0)
    expected = F.interpolate(cam, size=40, mode="linear", align_corners=False)
    assert relative(got, expected) < 1e-12


def test_gradcam_and_ascent_on_a_linear_layer_say_why_before_indexing_fails():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(InputError, match="'3'.*without spatial dimensions"):
        attrib.GradCAM(model.eval(), "3").attribute(x, target=0)
    with pytest.raises(InputError, match="'3'.*without spatial dimensions"):
        attrib.conductance_ascent(model.eval(), x, layer="3", target=0, steps=1, bounds=None)


def test_deconvolution_from_a_linear_layer_after_torch_flatten_equals_deconvnet():
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)

    class Truncated(nn.Module):
        def __init__(self):
            super().__init__()
            self.vgg = vgg

        def forward(self, x):
            return self.vgg.classifier[0](torch.flatten(self.vgg.avgpool(self.vgg.features(x)), 1))

    truncated = Truncated().eval()
    with torch.no_grad():
        unit = int(truncated(x)[0].argmax())
        activation = truncated(x)[0, unit]
    got = attrib.DeconvReconstruction(vgg).attribute(x, layer="classifier.0", neuron_selector=(unit,)).attributions
    expected = attrib.DeconvNet(truncated).attribute(x, target=unit).attributions * activation
    assert relative(got, expected) < 1e-12


def test_empty_batch_numpy_targets_and_a_model_that_changes_its_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 4)).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(InputError, match="inputs: the batch is empty"):
        attrib.IntegratedGradients(model).attribute(x[:0], target=0)
    ig = attrib.IntegratedGradients(model)
    for target in (np.int64(2), np.array([2, 2]), [np.int32(2), 2]):
        assert torch.equal(ig.attribute(x, target=target).attributions, ig.attribute(x, target=2).attributions)

    class Doubling(nn.Module):  # changes its input in place, as some user models do
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            x.mul_(2.0)
            return self.inner(x)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x * 2.0)

    before = x.clone()
    for method in (attrib.IntegratedGradients, attrib.Saliency, attrib.InputXGradient):
        got = method(Doubling().eval()).attribute(x, target=1).attributions
        assert relative(got, method(Plain().eval()).attribute(x, target=1).attributions) < 1e-12
    got = attrib.LayerConductance(Doubling().eval(), "inner.1").attribute(x, target=1)
    assert relative(got["inner.1"], attrib.LayerConductance(Plain().eval(), "inner.1").attribute(x, target=1)["inner.1"]) < 1e-12
    assert torch.equal(x, before)  # the caller's tensor is untouched
