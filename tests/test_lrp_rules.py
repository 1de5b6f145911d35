"""Every LRP rule against a dense re-implementation of its formula.

The layer is recovered as a matrix M (outputs x inputs, one example) by applying it to unit vectors;
each rule is then written with explicit contributions ``C[j, i] = M[j, i] * x[i]`` as in the LRP
overview, not with the engine's vector-Jacobian products. float64, several shapes, with and
without bias, signed and non-negative inputs.
"""
import pytest
import torch
from torch import nn

from attrib.lrp import LRP0, AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus
from attrib.lrp.layers import AffineView, FunctionView, view_of

from conftest import relative

EPS = 1e-6


def make_layer(kind: str, bias: bool) -> tuple[nn.Module, tuple]:
    torch.manual_seed(7)
    layers = {
        "linear": (lambda: nn.Linear(6, 4, bias=bias), (6,)),
        "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, bias=bias), (2, 7)),
        "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1, bias=bias), (2, 4, 5)),
        "conv2d_groups": (lambda: nn.Conv2d(4, 4, 2, stride=2, groups=2, bias=bias), (4, 4, 4)),
        "conv2d_dilated": (lambda: nn.Conv2d(2, 2, 3, dilation=2, padding=2, bias=bias), (2, 5, 5)),
        "conv3d": (lambda: nn.Conv3d(2, 2, 2, bias=bias), (2, 3, 3, 3)),
    }
    make, shape = layers[kind]
    layer = make().double()
    if bias:
        with torch.no_grad():
            layer.bias.uniform_(-0.5, 0.5)
    return layer, shape


@torch.no_grad()
def dense(function, shape) -> torch.Tensor:
    """M[j, i] = output j of ``function`` at the unit vector e_i (one example)."""
    n = torch.Size(shape).numel()
    basis = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(shape))
    return function(basis).reshape(n, -1).T


def stab(z, eps=EPS):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def bias_vector(layer, n_out) -> torch.Tensor:
    if getattr(layer, "bias", None) is None:
        return torch.zeros(n_out, dtype=torch.float64)
    per_channel = layer.bias.detach()
    return per_channel.repeat_interleave(n_out // per_channel.numel())


def share(contributions, denominator, relevance):
    """R_i = sum_j C[j, i] / stab(den_j) R_j."""
    return (contributions / stab(denominator)[:, None] * relevance[:, None]).sum(0)


def dense_rule(rule_name, layer, x, relevance, params) -> torch.Tensor:
    """One example: x (n_in,), relevance (n_out,)."""
    shape = params["shape"]
    M = dense(lambda t: layer(t) - (0 if layer.bias is None else layer(torch.zeros_like(t))), shape)
    b = bias_vector(layer, M.shape[0])
    C = M * x[None, :]
    z = C.sum(1) + b
    if rule_name == "lrp0":
        keep = z != 0
        return (C / torch.where(keep, z, 1)[:, None] * (relevance * keep)[:, None]).sum(0)
    if rule_name in ("epsilon", "epsilon_relative"):
        eps = EPS if rule_name == "epsilon" else 0.3 * z.pow(2).mean().sqrt()
        return (C / stab(z, eps)[:, None] * relevance[:, None]).sum(0)
    if rule_name == "gamma":
        g = params["gamma"]
        up, down = M + g * M.clamp(min=0), M + g * M.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        result = torch.zeros_like(x)
        positive = up * xp[None, :] + down * xn[None, :]
        negative = down * xp[None, :] + up * xn[None, :]
        result += share(positive, positive.sum(1) + b + g * b.clamp(min=0), relevance * (z > 0))
        result += share(negative, negative.sum(1) + b + g * b.clamp(max=0), relevance * (z < 0))
        return result
    if rule_name in ("alpha2beta1", "zplus"):
        alpha, beta = (2.0, 1.0) if rule_name == "alpha2beta1" else (1.0, 0.0)
        P, N = C.clamp(min=0), C.clamp(max=0)
        return alpha * share(P, P.sum(1) + b.clamp(min=0), relevance) - beta * share(N, N.sum(1) + b.clamp(max=0), relevance)
    if rule_name == "zbox":
        low, high = params["low"], params["high"]
        Z = C - M.clamp(min=0) * low[None, :] - M.clamp(max=0) * high[None, :]
        return share(Z, Z.sum(1), relevance)
    if rule_name == "flat":
        connected = structural(layer, shape)
        return share(connected, connected.sum(1), relevance)
    if rule_name == "wsquare":
        W2 = M ** 2
        return share(W2, W2.sum(1), relevance)
    raise AssertionError(rule_name)


def structural(layer, shape) -> torch.Tensor:
    """1 where input i feeds output j (zero weights included): the layer with all-ones weights."""
    view = view_of(layer)
    ones = torch.ones_like(layer.weight)
    return dense(lambda t: view.forward(t, ones, None), shape)


RULES = {
    "lrp0": lambda p: LRP0(),
    "epsilon": lambda p: Epsilon(EPS),
    "epsilon_relative": lambda p: Epsilon(0.3, relative=True),
    "gamma": lambda p: Gamma(p["gamma"], epsilon=EPS),
    "alpha2beta1": lambda p: AlphaBeta(2.0, 1.0, epsilon=EPS),
    "zplus": lambda p: ZPlus(epsilon=EPS),
    "zbox": lambda p: ZBox(p["low_channels"], p["high_channels"], epsilon=EPS),
    "flat": lambda p: Flat(EPS),
    "wsquare": lambda p: WSquare(EPS),
}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d_groups", "conv2d_dilated", "conv3d"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("rule_name", list(RULES))
def test_rule_matches_dense_formula(rule_name, kind, bias, signed):
    layer, shape = make_layer(kind, bias)
    generator = torch.Generator().manual_seed(11)
    x = torch.rand((3,) + shape, generator=generator, dtype=torch.float64)
    if signed:
        x = 2 * x - 1
    channels = shape[0]
    params = {
        "shape": shape, "gamma": 0.25,
        "low_channels": torch.linspace(-1.5, -1.0, channels, dtype=torch.float64),
        "high_channels": torch.linspace(1.0, 2.0, channels, dtype=torch.float64),
    }
    if rule_name == "zbox" and kind == "linear":  # per-feature bounds for a dense input layer
        params["low_channels"] = torch.linspace(-1.5, -1.0, 6, dtype=torch.float64)
        params["high_channels"] = torch.linspace(1.0, 2.0, 6, dtype=torch.float64)
    z = layer(x).detach()
    relevance = torch.randn(z.shape, generator=generator, dtype=torch.float64)
    x_before, relevance_before = x.clone(), relevance.clone()
    rule = RULES[rule_name](params)
    ours = rule.relevance(view_of(layer), x, z, relevance)
    assert torch.equal(x, x_before) and torch.equal(relevance, relevance_before)  # inputs untouched
    low = params["low_channels"].reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape).reshape(-1)
    high = params["high_channels"].reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape).reshape(-1)
    for example in range(x.shape[0]):
        expected = dense_rule(rule_name, layer, x[example].reshape(-1), relevance[example].reshape(-1),
                              dict(params, low=low, high=high))
        assert relative(ours[example].reshape(-1), expected) < 1e-10, (rule_name, kind, example)


def test_zbox_from_normalization_bounds():
    rule = ZBox.from_normalization([0.5, 0.25], [0.5, 0.25])
    assert torch.allclose(rule.low, torch.tensor([-1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(rule.high, torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_pass_and_norm_on_average_pooling():
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    pool = nn.AvgPool2d(2)
    z = pool(x)
    relevance = torch.randn(z.shape, generator=generator, dtype=torch.float64)
    ours = Norm(EPS).relevance(view_of(pool), x, z, relevance)
    M = dense(pool, x.shape[1:])
    for e in range(2):
        xe = x[e].reshape(-1)
        expected = share(M * xe[None, :], M @ xe, relevance[e].reshape(-1))
        assert relative(ours[e].reshape(-1), expected) < 1e-12
    assert torch.equal(Pass().relevance(FunctionView(torch.relu, "ReLU"), x, x, x), x)


def test_batchnorm_alone_is_a_diagonal_layer():
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(-1, 1), bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    z = bn(x).detach()
    relevance = torch.randn_like(z)
    view = AffineView(bn)
    assert relative(view.forward(x, view.weight, view.bias), z) < 1e-13
    ours = Epsilon(EPS).relevance(view, x, z, relevance)
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().reshape(1, 3, 1, 1)
    assert relative(ours, x * scale * relevance / stab(z)) < 1e-12


@pytest.mark.parametrize("make", [lambda: AlphaBeta(1.5, 1.0), lambda: AlphaBeta(-1.0, -2.0), lambda: Epsilon(-1.0), lambda: Gamma(-0.1)])
def test_bad_rule_parameters(make):
    with pytest.raises(ValueError):
        make()


def test_stabiliser_sign_convention():
    """stab(z) = z + eps sign(z) with sign(0) = +1, also for a negative zero; eps = 0 drops z = 0."""
    from attrib.lrp.rules import divide

    z = torch.tensor([-0.0, 0.0, 2.0, -2.0], dtype=torch.float64)
    relevance = torch.ones(4, dtype=torch.float64)
    assert divide(relevance, z, 0.5).tolist() == [2.0, 2.0, 0.4, -0.4]
    assert divide(relevance, z, torch.tensor(0.5, dtype=torch.float64)).tolist() == [2.0, 2.0, 0.4, -0.4]
    assert divide(relevance, z, 0).tolist() == [0.0, 0.0, 0.5, -0.5]
