"""method="exact": the linear regions of the path and the exact sums over them (attrib/exact.py).

Oracles: the activation pattern on a dense grid of the path (regions), completeness (an axiom the exact sums must
meet to float64 rounding), Captum's Riemann sums at many steps (the limit), and the layer conductance of a
neuron's selection (neuron conductance adds up to it)."""
from __future__ import annotations

import captum.attr as captum_attr
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import attrib
from attrib.errors import InputError
from attrib.exact import linear_regions
from attrib.models.digits import load_digits_model, preprocess, sample_digits

F64 = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Linear(8, 6),
                         nn.ReLU6(), nn.Linear(6, 3)).double().eval()


class _PoolNet(nn.Module):
    """A conv, ReLU, overlapping max pool, a residual addition, adaptive max pool over a 1-d signal."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv1d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv1d(3, 3, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool1d(torch.relu(self.conv(x)), 3, stride=2)
        h = h + torch.relu(self.conv2(h))
        return self.fc(torch.cat([F.adaptive_max_pool1d(h, 1), F.adaptive_max_pool1d(-h, 1)], 1).flatten(1))


def _grid_patterns(model: nn.Module, x: torch.Tensor, base: torch.Tensor, points: int) -> int:
    """Number of changes of the activation pattern (kink sides, pooling winners) on a dense grid of the path."""
    record: list[torch.Tensor] = []

    def relu_like(module, args, output):
        z = args[0].flatten(1)
        record.append(torch.cat([z > 0] + ([z > 6] if isinstance(module, nn.ReLU6) else []), 1))
    handles = [m.register_forward_hook(relu_like) for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ReLU6))]
    alphas = torch.linspace(0, 1, points, dtype=F64).view(-1, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        model(base + alphas * (x - base))
    for h in handles:
        h.remove()
    pattern = torch.cat(record, 1)
    return int((pattern[1:] != pattern[:-1]).any(1).sum())


def _pool_patterns(model: _PoolNet, x: torch.Tensor, points: int) -> int:
    alphas = torch.linspace(1e-7, 1, points, dtype=F64).view(-1, 1, 1)  # at 0 every window is a tie (the input is 0)
    xs = alphas * x
    with torch.no_grad():
        z1 = model.conv(xs)
        _, i1 = F.max_pool1d(torch.relu(z1), 3, stride=2, return_indices=True)
        h = F.max_pool1d(torch.relu(z1), 3, stride=2)
        z2 = model.conv2(h)
        h = h + torch.relu(z2)
        _, i2 = F.adaptive_max_pool1d(h, 1, return_indices=True)
        _, i3 = F.adaptive_max_pool1d(-h, 1, return_indices=True)
    pattern = torch.cat([(z1 > 0).flatten(1), i1.flatten(1), (z2 > 0).flatten(1), i2.flatten(1), i3.flatten(1)], 1)
    return int((pattern[1:] != pattern[:-1]).any(1).sum())


def test_regions_are_the_activation_patterns_on_a_dense_grid():
    model = _mlp()
    x = torch.randn(4, 5, dtype=F64) * 2
    regions = linear_regions(model, x, baselines=0.0, target=1)
    for e in range(4):
        assert int(regions.counts[e]) - 1 == _grid_patterns(model, x[e:e + 1], torch.zeros(1, 5, dtype=F64), 200_001)
        assert regions.breakpoints[e][0] == 0 and regions.breakpoints[e][-1] == 1
    assert int(regions.counts.sum()) > 12  # the MLP's paths do cross kinks of all three kinds
    net = _PoolNet().double().eval()
    signal = torch.randn(3, 1, 12, dtype=F64) * 3
    pooled = linear_regions(net, signal, baselines=0.0, target=0)
    for e in range(3):
        assert int(pooled.counts[e]) - 1 == _pool_patterns(net, signal[e:e + 1], 200_001)
    assert int(pooled.counts.sum()) > 10


def test_each_region_is_affine_the_score_changes_by_the_midpoint_gradient():
    net = _PoolNet().double().eval()
    x = torch.randn(2, 1, 12, dtype=F64) * 3
    regions = linear_regions(net, x, baselines=0.0, target=1)
    rows = regions.example
    with torch.no_grad():
        ends = [net(t.view(-1, 1, 1) * x[rows])[:, 1] for t in (regions.starts, regions.stops)]
    mid = (regions.midpoints.view(-1, 1, 1) * x[rows]).requires_grad_(True)
    grad, = torch.autograd.grad(net(mid)[:, 1].sum(), mid)
    predicted = (grad * x[rows]).flatten(1).sum(1) * regions.lengths
    assert float((ends[1] - ends[0] - predicted).abs().max()) < 1e-12
    quarter = regions.starts + 0.25 * regions.lengths  # and affine inside: F at a quarter is linear interpolation
    inside = net(quarter.view(-1, 1, 1) * x[rows])[:, 1].detach()
    assert float((inside - (0.75 * ends[0] + 0.25 * ends[1])).abs().max()) < 1e-12


def _digits(n: int = 2, noise: float = 0.02):
    model = load_digits_model().double().eval()
    raw, labels = sample_digits()
    x = preprocess(raw[:n]).double()
    torch.manual_seed(3)
    return model, x, x + noise * torch.randn_like(x), labels[:n]


def test_exact_integrated_gradients_are_complete_on_the_digits_cnn_and_the_limit_of_captums_sums():
    model, x, base, target = _digits()
    exact = attrib.IntegratedGradients(model).attribute(x, target=target, baselines=base, method="exact")
    change = exact.outputs - exact.baseline_outputs
    assert float((exact.delta / change).abs().max()) < 1e-12
    assert int(exact.info["regions"].min()) > 20
    rows = exact.info["search_evaluations"] + int(exact.info["regions"].sum())
    assert exact.method == "exact" and exact.evaluations == -(-rows // x.shape[0])  # per example, as the quadratures count
    ig = captum_attr.IntegratedGradients(model)
    errors = []
    for n in (32, 512):
        riemann = ig.attribute(x, base, target=target, n_steps=n, method="riemann_trapezoid")
        errors.append(float((riemann - exact.attributions).abs().max()))
    assert errors[1] < errors[0] / 8 and errors[1] < 5e-3 * float(exact.attributions.abs().max())  # to the limit as n grows


def test_exact_layer_conductance_is_complete_at_every_layer_and_the_limit_of_the_riemann_stieltjes_sums():
    model, x, base, target = _digits()
    layers = ["features.1", "features.4", "features.8", "avgpool", "classifier.0", "classifier.1"]
    exact = attrib.LayerConductance(model, layers).attribute(x, target=target, baselines=base, method="exact")
    change = exact.outputs - exact.baseline_outputs
    for name in layers:
        assert float((exact.delta[name] / change).abs().max()) < 1e-12, name
    fine = attrib.LayerConductance(model, ["features.4", "classifier.1"]).attribute(x, target=target, baselines=base, n_steps=512)
    for name in ("features.4", "classifier.1"):
        scale = float(exact[name].abs().max())
        assert float((fine[name] - exact[name]).abs().max()) < 4e-3 * scale, name
    coarse = attrib.LayerConductance(model, "features.4").attribute(x, target=target, baselines=base, n_steps=16)
    assert float((coarse["features.4"] - exact["features.4"]).abs().max()) > 5 * float((fine["features.4"] - exact["features.4"]).abs().max())
    # Captum's LayerConductance converges to it too (left Riemann-Stieltjes sums)
    captum = captum_attr.LayerConductance(model, model.features[4]).attribute(x, base, target=target, n_steps=512)
    assert float((captum.detach() - exact["features.4"]).abs().max()) < 2e-2 * float(exact["features.4"].abs().max())


def test_exact_neuron_conductance_adds_up_to_the_selections_exact_layer_conductance():
    model, x, base, target = _digits(noise=0.01)
    selectors = [(3, slice(None), slice(None)), (5, 2, 2)]
    nc = attrib.NeuronConductance(model, "features.8").attribute(x, selectors, target=target, baselines=base, method="exact")
    lc = attrib.LayerConductance(model, "features.8").attribute(x, target=target, baselines=base, method="exact")
    layer = lc["features.8"]
    totals = nc.attributions.flatten(2).sum(2)
    expected = torch.stack([layer[:, 3].flatten(1).sum(1), layer[:, 5, 2, 2]])
    assert float((totals - expected).abs().max()) < 1e-12 * float(layer.abs().sum())
    assert float(nc.delta.abs().max()) < 1e-13
    assert torch.equal(nc.info["regions"], lc.info["regions"])
    # and the limit of Captum's neuron conductance for a single neuron
    captum = captum_attr.NeuronConductance(model, model.features[8]).attribute(x, (5, 2, 2), base, target=target, n_steps=512,
                                                                               method="riemann_trapezoid")
    assert float((captum - nc.attributions[1]).abs().max()) < 1e-3 * float(nc.attributions[1].abs().max()) + 1e-12


def _with_biases(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.double().eval()


@pytest.mark.parametrize("name,size", [("alexnet", 64), ("vgg11", 32), ("resnet18", 32)])
def test_exact_integrated_gradients_are_complete_on_torchvision_models_with_biases(name, size):
    torch.manual_seed(0)
    model = _with_biases(getattr(torchvision.models, name)(weights=None, num_classes=10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, size, size, dtype=F64)
    base = x + (0.001 if name == "vgg11" else 0.003) * torch.randn_like(x)  # few regions: CI time
    res = attrib.IntegratedGradients(model).attribute(x, target=3, baselines=base, method="exact")
    change = res.outputs - res.baseline_outputs
    assert int(res.info["regions"][0]) >= 5
    assert float(res.delta.abs().max()) < 1e-11 * float(torch.maximum(res.outputs.abs(), change.abs()).max())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_exact_integrated_gradients_at_the_text_models_embedding():
    from attrib.models.text import load_text_model, load_vocabulary
    model = load_text_model().double().eval()
    ids, _ = load_vocabulary().encode(["a gripping and moving film", "dull and far too long"])
    ig = attrib.IntegratedGradients(model, interpolate_at="embedding")
    exact = ig.attribute(ids, target=1, baselines=torch.zeros_like(ids), method="exact")
    change = exact.outputs - exact.baseline_outputs
    assert float((exact.delta / change).abs().max()) < 1e-12 and int(exact.info["regions"].min()) > 3
    fine = ig.attribute(ids, target=1, baselines=torch.zeros_like(ids), n_steps=256)
    assert float((fine["embedding"] - exact["embedding"]).abs().max()) < 1e-3 * float(exact["embedding"].abs().max())


class _Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))


class _Cube(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h * h * h  # a cube: its midpoint gradient is not its mean (a square's would be, exactly)


@pytest.mark.parametrize("model,words", [
    (nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), ["module '1'", "Sigmoid"]),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2)), ["module '1'", "LayerNorm"]),
    (_Gelu(), ["the model's own forward", "gelu"]),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train(), ["'1'", "training mode"]),
    (_Cube(), ["miss completeness", "multiply two tensors"]),
])
def test_what_is_not_piecewise_linear_is_refused_by_name_and_the_model_is_left_as_it_was(model, words):
    torch.manual_seed(0)
    model = model.double()
    training = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4, dtype=F64)
    for method in (attrib.IntegratedGradients(model), attrib.LayerConductance(model, list(dict(model.named_children()))[0])):
        with pytest.raises(InputError) as error:
            method.attribute(x, target=0, method="exact")
        message = str(error.value)
        assert all(w in message for w in words), message
        assert "training mode" in message or ("method='exact'" in message and ("tolerance=" in message or "n_steps" in message))
    assert [m.training for m in model.modules()] == training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_exact_arguments_are_checked():
    model = _mlp()
    x = torch.randn(2, 5, dtype=F64) * 3
    with pytest.raises(InputError, match="max_regions"):
        attrib.IntegratedGradients(model).attribute(x, target=0, method="exact", max_regions=2)
    with pytest.raises(InputError, match="max_regions"):
        attrib.LayerConductance(model, "1").attribute(x, target=0, method="exact", max_regions=0)
    with pytest.raises(InputError, match="tolerance"):
        attrib.LayerConductance(model, "1").attribute(x, target=0, method="exact", tolerance=1e-3)
    with pytest.raises(InputError, match="method"):
        attrib.InternalInfluence(model, "1").attribute(x, target=0, method="exact")
    with pytest.raises(InputError, match="target"):
        attrib.IntegratedGradients(model).attribute(x, target=7, method="exact")
