"""Seeded, small models shared by the tests (no downloads)."""
import pytest
import torch
import torchvision
from torch import nn


def make_cnn(seed: int = 0, activation=nn.ReLU, bias: bool = True, dtype=torch.float64, pool=nn.MaxPool2d) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias), activation(), pool(2),
        nn.Conv2d(4, 6, 3, bias=bias), activation(), nn.Flatten(), nn.Linear(6 * 2 * 2, 5, bias=bias),
    ).to(dtype).eval()


def make_mlp(seed: int = 0, activation=nn.Softplus, widths=(6, 8, 7, 3), bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).double().eval()


class DictOutput(nn.Module):
    """A model whose output is a dict, not a tensor."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3).double()

    def forward(self, x):
        return {"logits": self.body(x)}


@pytest.fixture(scope="session")
def vgg11():
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).double().eval()


@pytest.fixture(scope="session")
def vgg11_convs(vgg11):
    return [name for name, module in vgg11.named_modules() if isinstance(module, nn.Conv2d)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def model_state(model: nn.Module):
    """Everything that must be unchanged after an attribution run."""
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        [(n, p.requires_grad, id(p)) for n, p in model.named_parameters()],
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    after = model_state(model)
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]
