"""Saliency, input x gradient, SmoothGrad, guided backprop, deconvnet, Grad-CAM, guided Grad-CAM and
DeepLIFT: Captum's published small-model facts, Captum as oracle on VGG16, axioms, and torchvision
models as shipped (in-place and reused ReLUs)."""
import copy
import warnings

import pytest
import torch
import torchvision
from conftest import assert_unchanged, make_cnn, make_mlp, model_state, relative
from torch import nn

import attrib

captum_attr = pytest.importorskip("captum.attr")
warnings.filterwarnings("ignore", module="captum")


def out_of_place(model: nn.Module) -> nn.Module:
    """A copy with out-of-place ReLUs, for Captum (its hooks need them)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return twin


class OneConv(nn.Module):
    """Captum's one-conv test model, from its published weights: conv 1->2 (3x3, ones, bias -50/-75),
    ReLU, linear 8->4 (five ones then three -1 per row, no bias), ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], 1))
            self.fc1.bias.zero_()

    def forward(self, x):
        return self.relu2(self.fc1(self.relu1(self.conv1(x)).view(-1, 8)))


class TwoReLUs(nn.Module):
    """f(x1, x2) = 2 relu(x1) + 2 relu(x2 - 1.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return 2 * self.relu(x[:, 0]) + 2 * self.relu(x[:, 1] - 1.5)


ARANGE = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)


def test_guided_backprop_and_deconvnet_published_one_conv_values():
    model = OneConv().eval()
    guided = attrib.GuidedBackprop(model).attribute(ARANGE, target=0).attributions
    deconv = attrib.DeconvNet(model).attribute(ARANGE, target=0).attributions
    expected_guided = torch.tensor([[0.0, 1, 1, 1], [1, 3, 3, 2], [1, 3, 3, 2], [1, 2, 2, 1]])
    expected_deconv = torch.tensor([[2.0, 3, 3, 1], [3, 5, 5, 2], [3, 5, 5, 2], [1, 2, 2, 1]])
    assert torch.equal(guided[0, 0], expected_guided)
    assert torch.equal(deconv[0, 0], expected_deconv)
    assert torch.equal(guided, captum_attr.GuidedBackprop(model).attribute(ARANGE.clone(), target=0))
    assert torch.equal(deconv, captum_attr.Deconvolution(model).attribute(ARANGE.clone(), target=0))


def test_deeplift_published_two_relu_value():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    result = attrib.DeepLift(TwoReLUs()).attribute(x, baselines=0.0)
    assert torch.allclose(result.attributions, torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    assert abs(float(result.delta)) < 1e-12
    # the gradient at x alone would give x * grad = (2, 4): the rescale rule is what gives (2, 1)
    assert torch.allclose(attrib.InputXGradient(TwoReLUs()).attribute(x).attributions,
                          torch.tensor([[2.0, 4.0]], dtype=torch.float64))


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).double().eval()


@pytest.fixture(scope="module")
def pictures():
    return torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_vgg16_gradient_methods_match_captum(vgg16, pictures):
    """attrib runs the model as shipped (in-place ReLUs); Captum an out-of-place copy."""
    twin = out_of_place(vgg16)
    target = [3, 7]
    pairs = [
        (attrib.Saliency(vgg16).attribute(pictures, target=target).attributions,
         captum_attr.Saliency(twin).attribute(pictures.clone(), target=target)),
        (attrib.Saliency(vgg16).attribute(pictures, target=target, abs=False).attributions,
         captum_attr.Saliency(twin).attribute(pictures.clone(), target=target, abs=False)),
        (attrib.InputXGradient(vgg16).attribute(pictures, target=target).attributions,
         captum_attr.InputXGradient(twin).attribute(pictures.clone(), target=target)),
        (attrib.GuidedBackprop(vgg16).attribute(pictures, target=target).attributions,
         captum_attr.GuidedBackprop(twin).attribute(pictures.clone(), target=target)),
        (attrib.DeconvNet(vgg16).attribute(pictures, target=target).attributions,
         captum_attr.Deconvolution(twin).attribute(pictures.clone(), target=target)),
        (attrib.DeepLift(vgg16).attribute(pictures, target=target).attributions,
         captum_attr.DeepLift(twin).attribute(pictures.clone(), target=target)),
    ]
    for ours, theirs in pairs:
        assert relative(ours, theirs) < 1e-10


@pytest.mark.parametrize("layer", ["features.28", "features.17"])
def test_vgg16_gradcam_and_guided_gradcam_match_captum(vgg16, pictures, layer):
    twin = out_of_place(vgg16)
    theirs_layer = dict(out_of_place(vgg16).named_modules())[layer]
    captum_cam = captum_attr.LayerGradCam(twin, dict(twin.named_modules())[layer])
    raw = attrib.GradCAM(vgg16, layer).attribute(pictures, target=3, relu_attributions=False, interpolate_mode=None)
    assert relative(raw.attributions, captum_cam.attribute(pictures.clone(), target=3)) < 1e-10
    cam = attrib.GradCAM(vgg16, layer).attribute(pictures, target=3)  # ReLU, bilinear to 32x32
    expected = captum_attr.LayerAttribution.interpolate(
        captum_cam.attribute(pictures.clone(), target=3, relu_attributions=True), (32, 32), "bilinear")
    assert cam.attributions.shape == (2, 1, 32, 32)
    assert relative(cam.attributions, expected) < 1e-10
    guided = attrib.GuidedGradCAM(vgg16, layer).attribute(pictures, target=3).attributions
    captum_guided = captum_attr.GuidedGradCam(twin, dict(twin.named_modules())[layer])
    assert relative(guided, captum_guided.attribute(pictures.clone(), target=3)) < 1e-10
    del theirs_layer


def test_gradcam_by_hand_on_a_tiny_model():
    """Weights a_c = mean of dF/dA_c; map = relu(sum_c a_c A_c), hand-checked on a linear head."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(8, 1, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        model[2].weight.copy_(torch.tensor([[1.0, 1, 1, 1, 2, 2, 2, 2]]))
    x = torch.arange(4, dtype=torch.float64).view(1, 1, 2, 2)
    cam = attrib.GradCAM(model, "0").attribute(x, relu_attributions=False, interpolate_mode=None)
    # channel 0: A = x, weight 1; channel 1: A = -x, weight 2 -> 1 * x + 2 * (-x) = -x
    assert torch.equal(cam.attributions, -x)
    assert torch.equal(cam.info["weights"], torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert torch.equal(attrib.GradCAM(model, "0").attribute(x, interpolate_mode=None).attributions, torch.zeros_like(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_deeplift_is_complete_on_torchvision_models_as_shipped(name):
    """Captum refuses ResNet (one ReLU module per block, used twice); the rescale rule per call keeps
    completeness to rounding, also through the overlapping 3x3/2 max pooling, DenseNet's functional
    in-place ReLUs and concatenations, and MobileNetV2's ReLU6 at activations of ~1e-10 (random init)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    baselines = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 0.1
    before = model_state(model)
    result = attrib.DeepLift(model).attribute(x, target=5, baselines=baselines)
    assert_unchanged(model, before)
    change = (result.outputs - result.baseline_outputs).abs()
    assert float((result.delta.abs() / change).max()) < 1e-10
    assert float((change / result.outputs.abs()).min()) > 1e-3  # the test is not vacuous: the score does change


def test_resnet18_backprop_methods_match_an_out_of_place_copy():
    """The in-place, reused ReLU of torchvision's ResNet gives what Captum gives on an out-of-place copy."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double().eval()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    twin = out_of_place(model)
    assert relative(attrib.GuidedBackprop(model).attribute(x, target=1).attributions,
                    captum_attr.GuidedBackprop(twin).attribute(x.clone(), target=1)) < 1e-12
    assert relative(attrib.DeconvNet(model).attribute(x, target=1).attributions,
                    captum_attr.Deconvolution(twin).attribute(x.clone(), target=1)) < 1e-12


def test_deeplift_catches_functional_relu_and_pooling():
    """F.relu and F.max_pool2d in a forward method, no modules: same as the module version."""
    modules = make_cnn()

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a, self.conv_b, self.head = modules[0], modules[3], modules[6]

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv_a(x)), 2)
            return self.head(torch.flatten(torch.nn.functional.relu(self.conv_b(x), inplace=True), 1))

    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    a = attrib.DeepLift(Functional().eval()).attribute(x, target=2, baselines=0.5)
    b = attrib.DeepLift(modules).attribute(x, target=2, baselines=0.5)
    assert relative(a.attributions, b.attributions) < 1e-12
    assert float(a.delta.abs().max()) < 1e-12
    # Captum's pooling rule is lost where a ReLU module feeds the pooling: it equals maxpool="gradient"
    captum = captum_attr.DeepLift(modules).attribute(x.clone(), target=2, baselines=0.5)
    assert relative(attrib.DeepLift(modules, maxpool="gradient").attribute(x, target=2, baselines=0.5).attributions, captum) < 1e-10
    assert relative(b.attributions, captum) > 1e-2  # the rescale rule at the pooling does differ here


def test_deeplift_max_pool_rule_against_a_window_by_window_calculation():
    """Overlapping 3x3/2 windows; in each window x's winner takes max(y, y') - y' and x''s winner
    y - max(y, y') of the output change, times the signal from above; multiplier = share / (x - x')."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.MaxPool2d(3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 1)).double().eval()
    x, base = torch.randn(1, 1, 5, 5, dtype=torch.float64), torch.randn(1, 1, 5, 5, dtype=torch.float64)
    pooled, pooled_ref = nn.functional.max_pool2d(x, 3, 2), nn.functional.max_pool2d(base, 3, 2)
    after, after_ref = pooled.relu(), pooled_ref.relu()
    weight = model[3].weight.view(2, 2)
    share = torch.zeros(5, 5, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            window, window_ref = x[0, 0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], base[0, 0, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            y, y_ref = float(pooled[0, 0, i, j]), float(pooled_ref[0, 0, i, j])
            signal = float(weight[i, j]) * float(after[0, 0, i, j] - after_ref[0, 0, i, j]) / (y - y_ref)  # ReLU's rescale
            a, b = divmod(int(window.argmax()), 3)
            share[2 * i + a, 2 * j + b] += signal * (max(y, y_ref) - y_ref)
            a, b = divmod(int(window_ref.argmax()), 3)
            share[2 * i + a, 2 * j + b] += signal * (y - max(y, y_ref))
    result = attrib.DeepLift(model).attribute(x, baselines=base)
    assert torch.allclose(result.attributions[0, 0], share, atol=1e-14)
    assert abs(float(result.delta)) < 1e-12


def test_deeplift_smooth_activations_complete_and_match_captum():
    model = make_mlp(activation=nn.Tanh)
    x, base = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ours = attrib.DeepLift(model).attribute(x, target=1, baselines=base)
    theirs = captum_attr.DeepLift(model).attribute(x, target=1, baselines=base)
    assert relative(ours.attributions, theirs) < 1e-10
    assert float(ours.delta.abs().max()) < 1e-12
    multipliers = attrib.DeepLift(model, multiply_by_inputs=False).attribute(x, target=1, baselines=base).attributions
    assert torch.allclose(multipliers * (x - base), ours.attributions)


def test_input_x_gradient_is_complete_on_bias_free_relu_networks():
    model = make_cnn(bias=False)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    result = attrib.InputXGradient(model).attribute(x, target=4)
    assert torch.allclose(result.attributions.flatten(1).sum(1), result.outputs, rtol=1e-12, atol=1e-14)


def test_smoothgrad_equals_a_loop_over_the_same_noise_in_any_chunking():
    model = make_cnn()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    smooth = attrib.SmoothGrad(model)
    noise = smooth.noise(x, 7, 0.2, torch.Generator().manual_seed(3))
    loop = sum(attrib.Saliency(model).attribute(x + noise[k], target=[0, 1, 2], abs=False).attributions for k in range(7)) / 7
    for chunk in (None, 4, 21):
        got = smooth.attribute(x, target=[0, 1, 2], n_samples=7, stdevs=0.2, internal_batch_size=chunk,
                               generator=torch.Generator().manual_seed(3))
        assert relative(got.attributions, loop) < 1e-12
    sigma = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) * 0.2
    assert torch.allclose(noise.flatten(2).std(2).mean(0), sigma, rtol=0.1)


def test_smoothgrad_of_a_linear_model_is_its_gradient():
    model = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    got = attrib.SmoothGrad(model).attribute(x, target=2, n_samples=5, stdevs=0.5).attributions
    assert torch.allclose(got, model.weight[2].expand(4, 5), atol=1e-15)
    squared = attrib.SmoothGrad(model).attribute(x, target=2, n_samples=5, square=True).attributions
    assert torch.allclose(squared, model.weight[2].square().expand(4, 5), atol=1e-15)


def test_smoothgrad_matches_captum_noise_tunnel_without_noise():
    model = make_cnn()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    ours = attrib.SmoothGrad(model).attribute(x, target=1, n_samples=3, stdevs=0.0, abs=True).attributions
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(x.clone(), target=1, nt_samples=3, stdevs=0.0)
    assert relative(ours, theirs) < 1e-12


@pytest.mark.parametrize("method", [
    lambda m: attrib.Saliency(m), lambda m: attrib.GuidedBackprop(m), lambda m: attrib.DeepLift(m),
    lambda m: attrib.GradCAM(m, "0"), lambda m: attrib.SmoothGrad(m),
])
def test_model_unchanged_and_hooks_gone_when_forward_raises(method):
    model = make_cnn()
    before = model_state(model)
    with pytest.raises(RuntimeError):
        method(model).attribute(torch.rand(1, 3, 5, 5, dtype=torch.float64), target=0)  # too small for the head
    assert_unchanged(model, before)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(model(x), make_cnn()(x))  # and no mode is left active: plain forward is plain


def test_errors_name_the_argument():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_samples"):
        attrib.SmoothGrad(model).attribute(x, target=0, n_samples=0)
    with pytest.raises(ValueError, match="stdevs"):
        attrib.SmoothGrad(model).attribute(x, target=0, stdevs=-1.0)
    with pytest.raises(ValueError, match="interpolate_mode"):
        attrib.GradCAM(model, "0").attribute(x, target=0, interpolate_mode="cubic-ish")
    with pytest.raises(ValueError, match="layers"):
        attrib.GradCAM(model, "nope")
    with pytest.raises(ValueError, match="baselines"):
        attrib.DeepLift(model).attribute(x, target=0, baselines=torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="inputs"):
        attrib.Saliency(model).attribute(x.float(), target=0)
    with pytest.raises(ValueError, match="target"):
        attrib.GuidedBackprop(model).attribute(x, target=9)
