"""LRP against zennit 0.5.1 and Captum 0.9.0 on torchvision models as shipped (random init, float64)."""
import copy

import pytest
import torch
import torchvision
from conftest import relative
from torch import nn

from attrib.lrp import LRP, Composite, Epsilon
from attrib.module_types import AVERAGE_POOLS, LINEAR_LAYERS, MAX_POOLS
from attrib.normalization import IMAGENET_MEAN, IMAGENET_STD

zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
SIZE = 32


@pytest.fixture(scope="module")
def pictures():
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return (pixels - MEAN) / STD


def shipped(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                # non-trivial statistics, so that merging matters. eps = 0: zennit's merge leaves the
                # BatchNorm computing x / sqrt(1 + eps) instead of x (5e-6 per layer), ours folds exactly
                module.eps = 0.0
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(0.2 * torch.rand(module.num_features, generator=generator) - 0.1)
    return model


def zennit_relevance(model, x, composite, target):
    selection = torch.zeros(x.shape[0], 1000, dtype=x.dtype)
    selection[range(x.shape[0]), target] = 1.0
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, lambda output: output * selection)
    return relevance


BOUNDS = {"low": (-MEAN / STD).expand(1, 3, SIZE, SIZE), "high": ((1 - MEAN) / STD).expand(1, 3, SIZE, SIZE)}
CASES = [
    ("vgg16", "epsilon_gamma_box", lambda: EpsilonGammaBox(**BOUNDS, canonizers=[VGGCanonizer()])),
    ("vgg16", "epsilon_plus_flat", lambda: EpsilonPlusFlat(canonizers=[VGGCanonizer()])),
    ("vgg16_bn", "epsilon_gamma_box", lambda: EpsilonGammaBox(**BOUNDS, canonizers=[VGGCanonizer()])),
    ("resnet18", "epsilon_gamma_box", lambda: EpsilonGammaBox(**BOUNDS, canonizers=[ResNetCanonizer()])),
    ("resnet18", "epsilon_plus_flat", lambda: EpsilonPlusFlat(canonizers=[ResNetCanonizer()])),
    ("resnet50", "epsilon_gamma_box", lambda: EpsilonGammaBox(**BOUNDS, canonizers=[ResNetCanonizer()])),
]


@pytest.mark.parametrize("name,composite,theirs", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_matches_zennit(name, composite, theirs, pictures):
    model = shipped(name)
    target = [3, 11]
    ours = LRP(model, composite).attribute(pictures, target=target).attributions
    expected = zennit_relevance(model, pictures, theirs(), target)
    assert relative(ours, expected) < 1e-10


def test_matches_captum_epsilon_on_vgg16(pictures):
    from captum.attr import LRP as CaptumLRP

    model = shipped("vgg16")
    # Captum's LRP cannot run with in-place ReLUs; it gives max pooling and average pooling the
    # epsilon rule (epsilon 1e-9), so the composite says the same
    theirs_model = copy.deepcopy(model)
    for module in theirs_model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    composite = Composite(types=[(LINEAR_LAYERS, Epsilon(1e-9)), (AVERAGE_POOLS + MAX_POOLS, Epsilon(1e-9))])
    ours = LRP(model, composite).attribute(pictures, target=[5, 7])
    expected = CaptumLRP(theirs_model).attribute(pictures, target=[5, 7]).detach()
    assert relative(ours.attributions, expected) < 1e-10

