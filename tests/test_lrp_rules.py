"""Every LRP rule against a dense re-implementation of its formula.

The layer is recovered as a matrix M (outputs x inputs, one example) by applying it to unit vectors;
each rule is then written with explicit contributions ``C[j, i] = M[j, i] * x[i]`` as in the LRP
overview, not with the engine's vector-Jacobian products. float64, several shapes, with and
without bias, signed and non-negative inputs; and every rule's fast paths and engine hints against
the same formulas (bottom of the file).
"""
import pytest
import torch
from conftest import relative
from torch import nn

from attrib.lrp import (
    LRP0,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    WSquare,
    ZBox,
    ZPlus,
)
from attrib.lrp.views import AffineView, FunctionView, view_of

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


def proportional(contributions, denominator, relevance):
    """R_i = sum_j C[j, i] / den_j R_j, leaving out the outputs with den_j = 0."""
    keep = denominator != 0
    return (contributions / torch.where(keep, denominator, 1)[:, None] * (relevance * keep)[:, None]).sum(0)


def share(contributions, denominator, relevance, eps=EPS):
    """R_i = sum_j C[j, i] / stab(den_j) R_j (eps = 0: / den_j, dropping den_j = 0)."""
    return proportional(contributions, stab(denominator, eps) if eps else denominator, relevance)


def dense_rule(rule, layer, x, relevance, params) -> torch.Tensor:
    """The formula of ``rule`` for one example: x (n_in,), relevance (n_out,)."""
    shape = params["shape"]
    M = dense(lambda t: layer(t) - (0 if layer.bias is None else layer(torch.zeros_like(t))), shape)
    b = bias_vector(layer, M.shape[0])
    C = M * x[None, :]
    z = C.sum(1) + b  # the layer's output, whatever the rule does with the bias
    if not getattr(rule, "bias", True):
        b = torch.zeros_like(b)  # bias=False: the bias is left out of the denominators
    if isinstance(rule, LRP0):
        return share(C, C.sum(1) + b, relevance, 0)
    if isinstance(rule, Epsilon):
        denominator = C.sum(1) + b
        eps = rule.epsilon * denominator.pow(2).mean().sqrt() if rule.relative else rule.epsilon
        return share(C, denominator, relevance, eps)
    if isinstance(rule, Gamma):
        g, eps = rule.gamma, rule.epsilon
        up, down = M + g * M.clamp(min=0), M + g * M.clamp(max=0)
        xp, xn = x.clamp(min=0)[None, :], x.clamp(max=0)[None, :]
        positive, negative = up * xp + down * xn, down * xp + up * xn
        # stab() of a denominator with the sign of z (with the bias it has; bias=False: the rule's choice)
        result = proportional(positive, positive.sum(1) + b + g * b.clamp(min=0) + eps, relevance * (z > 0))
        return result + proportional(negative, negative.sum(1) + b + g * b.clamp(max=0) - eps, relevance * (z < 0))
    if isinstance(rule, AlphaBeta):  # ZPlus too
        P, N = C.clamp(min=0), C.clamp(max=0)
        eps = rule.epsilon
        return (rule.alpha * proportional(P, P.sum(1) + b.clamp(min=0) + eps, relevance)
                - rule.beta * proportional(N, N.sum(1) + b.clamp(max=0) - eps, relevance))
    if isinstance(rule, ZBox):
        low, high = params["low"], params["high"]
        Z = C - M.clamp(min=0) * low[None, :] - M.clamp(max=0) * high[None, :]
        return share(Z, Z.sum(1), relevance, rule.epsilon)
    if isinstance(rule, Flat):
        connected = structural(layer, shape)
        return share(connected, connected.sum(1), relevance, rule.epsilon)
    if isinstance(rule, WSquare):
        W2 = M ** 2
        return share(W2, W2.sum(1), relevance, rule.epsilon)
    raise AssertionError(rule)


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
        expected = dense_rule(rule, layer, x[example].reshape(-1), relevance[example].reshape(-1),
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
    M = dense(pool, x.shape[1:])
    for scratch in (False, True):
        ours = Norm(EPS).relevance(view_of(pool), x, z.clone(), relevance, scratch=scratch)
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


# ---------------------------------------------------------------- fast paths
# Rules take a fast path beside their formula, chosen by the input's sign, epsilon, the bias and the
# engine's hints (``scratch``: z may be overwritten; ``quiet``: no relevance where z <= 0, and z may be
# relu(z) after an in-place ReLU). Each is checked against the dense formula above, in every branch.

FAST_EPS = 0.05  # large enough that a wrong sign of eps anywhere shows at 1e-10
FAST_RULES = {
    "epsilon": lambda: Epsilon(FAST_EPS),
    "epsilon0": lambda: Epsilon(0),
    "epsilon_nobias": lambda: Epsilon(FAST_EPS, bias=False),
    "epsilon_relative": lambda: Epsilon(0.3, relative=True),
    "lrp0": lambda: LRP0(),
    "lrp0_nobias": lambda: LRP0(bias=False),
    "gamma": lambda: Gamma(0.25, epsilon=FAST_EPS),
    "gamma0": lambda: Gamma(0.25, epsilon=0),
    "gamma_nobias": lambda: Gamma(0.5, epsilon=FAST_EPS, bias=False),
    "alpha2beta1": lambda: AlphaBeta(2.0, 1.0, epsilon=FAST_EPS),
    "alpha2beta1_eps0": lambda: AlphaBeta(2.0, 1.0, epsilon=0),
    "alpha2beta1_nobias": lambda: AlphaBeta(2.0, 1.0, epsilon=FAST_EPS, bias=False),
    "zplus": lambda: ZPlus(FAST_EPS),
    "zplus0": lambda: ZPlus(0),
}


def bits(tensor):
    """The float64 bit patterns (tells -0.0 from 0.0)."""
    return tensor.view(torch.int64).clone()


@torch.no_grad()
def make_exact_zeros(layer, x):
    """Output channel 0 becomes 0.5 x_0 - 0.5 x_1 at one kernel tap, and x_1 = x_0: it is exactly 0 while
    its contributions are not."""
    taps = layer.weight[0].view(layer.weight.shape[1], -1)
    taps.zero_()
    taps[0, 0], taps[1, 0] = 0.5, -0.5
    if layer.bias is not None:
        layer.bias[0] = 0
    x[:, 1] = x[:, 0]


def hint_cases(rule, z, quiet):
    """Every combination of hints the engine may pass, with the z it passes along."""
    hints = {"quiet": True} if quiet and "quiet" in rule.hints else {}
    signs = [False, True] if bool((z == 0).any()) else [False]
    for scratch in [False, True] if "scratch" in rule.hints else [False]:
        for negative_zero in signs:  # exact zeros as 0.0, then as -0.0 (the stabiliser counts both as +)
            given = z.masked_fill(z == 0, -0.0) if negative_zero else z.clone()
            yield given, dict(hints, scratch=True) if scratch else hints


@pytest.mark.parametrize("kind", ["linear", "conv2d_groups"])
@pytest.mark.parametrize("layer_bias", [False, True])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("rule_name", list(FAST_RULES))
def test_fast_paths_match_dense_formula(rule_name, zeros, signed, layer_bias, kind):
    """Each hint and branch gives the formula: scratch or not, quiet or not, inputs of one or both signs,
    eps = 0 or not, the bias in the denominator or not, outputs exactly 0.0 or -0.0, relevance on
    negative outputs or not. Only ``scratch`` may change z; x and the relevance are never changed."""
    layer, shape = make_layer(kind, layer_bias)
    generator = torch.Generator().manual_seed(5)
    x = torch.rand((3,) + shape, generator=generator, dtype=torch.float64)
    if signed:
        x = 2 * x - 1
    if zeros:
        make_exact_zeros(layer, x)
    z = layer(x).detach()
    rule = FAST_RULES[rule_name]()
    everywhere = torch.randn(z.shape, generator=generator, dtype=torch.float64)
    # relevance everywhere, only on z > 0 (as below a ReLU), and that with relu(z) kept (an in-place ReLU)
    cases = [(everywhere, False), (everywhere * (z > 0), False)] + [(everywhere * (z > 0), True)] * rule.relu_exact
    for relevance, quiet in cases:
        expected = torch.stack([
            dense_rule(rule, layer, x[e].reshape(-1), relevance[e].reshape(-1), {"shape": shape}) for e in range(x.shape[0])
        ])
        for given, hints in hint_cases(rule, z.relu() if quiet else z, quiet):
            x_bits, z_bits, relevance_bits = bits(x), bits(given), bits(relevance)
            ours = rule.relevance(view_of(layer), x, given if rule.needs_output else None, relevance, **hints)
            assert relative(ours.reshape(expected.shape), expected) < 1e-10, (quiet, hints)
            assert torch.equal(bits(x), x_bits) and torch.equal(bits(relevance), relevance_bits), (quiet, hints)
            assert hints.get("scratch") or torch.equal(bits(given), z_bits), (quiet, hints)


def test_gamma_fast_path_equals_its_reference():
    """Gamma's fast path (x >= 0, eps > 0) and its reference form agree, in float32 too."""
    layer, shape = make_layer("conv2d", True)
    layer = layer.float()
    x = torch.rand((2,) + shape, generator=torch.Generator().manual_seed(1))
    z = layer(x).detach()
    relevance = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    rule = Gamma(0.25, epsilon=FAST_EPS)
    for r in (relevance, relevance * (z > 0)):
        fast = rule.relevance(view_of(layer), x, z, r)
        assert relative(fast, rule.reference(view_of(layer), x, z, r)) < 1e-5


def test_gamma_quiet_zero_denominator():
    """Quiet: where z <= 0 the fast denominator d+ + eps can be exactly 0 (float32 cancellation); no
    relevance arrives there, so it contributes 0, not NaN."""
    eps = 2.0 ** -20
    layer = nn.Linear(2, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-0.5, 0.0], [0.5, 0.25]]))
        layer.bias.zero_()
    x = torch.tensor([[2 * eps, 1.0]], dtype=torch.float64)  # output 0: d+ = -eps, output 1 positive
    z = layer(x).detach()
    relevance = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    rule = Gamma(0.25, epsilon=eps)
    ours = rule.relevance(view_of(layer), x, z.relu(), relevance, quiet=True)
    assert relative(ours[0], dense_rule(rule, layer, x[0], relevance[0], {"shape": (2,)})) < 1e-12


def test_divide_matches_stab_in_every_branch():
    """divide(R, z, eps) = R / stab(z) (eps = 0: R / z, 0 where z = 0) whichever way it takes: eps = 0, a
    float or a per-example tensor eps, scratch or not, z of both signs, z >= 0, zeros as 0.0 and -0.0, no z."""
    from attrib.lrp.rules import divide
    from attrib.lrp.rules import stab as rules_stab

    generator = torch.Generator().manual_seed(4)
    for kind in ("mixed", "nonnegative", "zeros", "negative_zeros", "empty"):
        z = torch.randn(2, 40, generator=generator, dtype=torch.float64)
        z = z.abs() if kind == "nonnegative" else z[:, :0] if kind == "empty" else z
        if kind in ("zeros", "negative_zeros"):
            z[:, ::3] = 0.0 if kind == "zeros" else -0.0
        relevance = torch.randn(z.shape, generator=generator, dtype=torch.float64)
        for eps in (0, 0.5, torch.tensor([[0.5], [0.25]], dtype=torch.float64)):
            expected = torch.where(z == 0, 0.0, relevance / z) if not isinstance(eps, torch.Tensor) and eps == 0 \
                else relevance / stab(z, eps)
            assert torch.equal(rules_stab(z, eps), stab(z, eps))
            for scratch in (False, True):
                given, z_bits, relevance_bits = z.clone(), bits(z), bits(relevance)
                ours = divide(relevance, given, eps, scratch)
                assert ours.shape == z.shape and (not z.numel() or relative(ours, expected) < 1e-15), (kind, eps, scratch)
                assert torch.equal(bits(relevance), relevance_bits)
                assert scratch or torch.equal(bits(given), z_bits), (kind, eps)
