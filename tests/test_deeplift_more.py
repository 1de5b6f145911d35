"""DeepLIFT's softmax rule, adaptive max pooling, Captum's options (multipliers, custom_attribution_func) and
DeepLIFT-SHAP: completeness to rounding (float64), the softmax multipliers against their dense formula and
the gradient limit, Captum as oracle (1e-8) where its rules are ours."""
import warnings

import pytest
import torch
from conftest import assert_unchanged, make_cnn, make_mlp, model_state, relative
from torch import nn
from torch.nn import functional as F

import attrib
from attrib.deeplift import DeepLiftShap

captum = pytest.importorskip("captum.attr")
warnings.filterwarnings("ignore", module="captum")
TOL = 1e-8
float64 = dict(dtype=torch.float64)


class Head(nn.Module):
    """A model followed by a functional (or method) softmax-family call."""

    def __init__(self, body: nn.Module, head) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x))


class TwoInputs(nn.Module):
    """An image (B, 2, 6, 6) through conv, ReLU, max pooling and a vector (B, 4) through linear, tanh;
    an optional per-example scale as an additional forward argument and an optional softmax head."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv, self.relu, self.pool = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.features, self.tanh = nn.Linear(4, 5), nn.Tanh()
        self.out = nn.Linear(3 * 9 + 5, 4)
        self.head = head or nn.Identity()
        self.double().eval()

    def forward(self, image, vector, scale=None):
        joined = torch.cat([self.pool(self.relu(self.conv(image))).flatten(1), self.tanh(self.features(vector))], 1)
        out = self.out(joined) if scale is None else self.out(joined) * scale.unsqueeze(1)
        return self.head(out)


def two_inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 6, 6, generator=g, **float64), torch.randn(batch, 4, generator=g, **float64)


HEADS = {
    "Softmax": lambda: nn.Softmax(dim=1),
    "LogSoftmax": lambda: nn.LogSoftmax(dim=-1),
    "Softmin": lambda: nn.Softmin(dim=1),
    "F.softmax": lambda: Head(nn.Identity(), lambda t: F.softmax(t, 1)),
    "Tensor.log_softmax": lambda: Head(nn.Identity(), lambda t: t.log_softmax(1)),
    "torch.softmax dtype": lambda: Head(nn.Identity(), lambda t: torch.softmax(t, 1, dtype=torch.float64)),
}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("body", ["mlp", "cnn"])
def test_softmax_heads_are_complete_where_the_gradient_and_captum_are_not(body, head):
    if body == "mlp":
        model = nn.Sequential(make_mlp(activation=nn.ReLU, widths=(6, 8, 7, 5)), HEADS[head]()).double().eval()
        x, base = torch.randn(16, 6, **float64), torch.randn(16, 6, **float64)
    else:
        model = nn.Sequential(make_cnn(), HEADS[head]()).double().eval()
        x, base = torch.rand(16, 3, 8, 8, **float64), 0.5 * torch.rand(16, 3, 8, 8, **float64)
    result = attrib.DeepLift(model).attribute(x, target=2, baselines=base)
    change = result.outputs - result.baseline_outputs
    assert torch.allclose(result.outputs, model(x)[:, 2], rtol=1e-12, atol=0)
    assert float(result.delta.abs().max()) <= 1e-10 * float(change.abs().max())
    assert torch.allclose(result.attributions.flatten(1).sum(1), change, rtol=0, atol=1e-12)
    if isinstance(model[1], (nn.Softmax, nn.LogSoftmax)) and body == "mlp":  # Captum hooks these modules
        _, delta = captum.DeepLift(model).attribute(x, target=2, baselines=base, return_convergence_delta=True)
        assert float(delta.abs().max()) > 1e-4 * float(change.abs().max())  # not vacuous: a nonlinear step


def dense_softmax_multipliers(x, x_ref, log: bool):
    """M with M (x - x') = y - y' for one pair, from the formula with plain exponentials: w_i = s(x_i, x'_i) /
    s(L, L'), s(a, b) = (e^a - e^b) / (a - b), L = log sum e^x; M = I - 1 w^T (log-softmax) or diag(rho) M,
    rho_i = (y_i - y'_i) / (z_i - z'_i) (softmax, z the log-probabilities)."""
    def s(a, b):
        return (a.exp() - b.exp()) / (a - b)

    total, total_ref = x.exp().sum().log(), x_ref.exp().sum().log()
    weights = s(x, x_ref) / s(total, total_ref)
    matrix = torch.eye(len(x), **float64) - torch.outer(torch.ones_like(x), weights)
    if log:
        return matrix
    z, z_ref = x - total, x_ref - total_ref
    return torch.diag((z.exp() - z_ref.exp()) / (z - z_ref)) @ matrix


@pytest.mark.parametrize("log", [False, True])
def test_softmax_multipliers_equal_the_dense_formula_are_exact_symmetric_and_tend_to_the_jacobian(log):
    model = nn.LogSoftmax(dim=1) if log else nn.Softmax(dim=1)
    g = torch.Generator().manual_seed(4)
    x, x_ref = 2 * torch.randn(3, 5, generator=g, **float64), 2 * torch.randn(3, 5, generator=g, **float64)
    for target in range(5):
        ours = attrib.DeepLift(model, multiply_by_inputs=False).attribute(x, target=target, baselines=x_ref).attributions
        swapped = attrib.DeepLift(model, multiply_by_inputs=False).attribute(x_ref, target=target, baselines=x).attributions
        for e in range(3):
            matrix = dense_softmax_multipliers(x[e], x_ref[e], log)
            assert torch.allclose(ours[e], matrix[target], rtol=1e-12, atol=1e-14)  # row t of M: M^T e_t
            assert torch.allclose(matrix @ (x[e] - x_ref[e]), model(x[e:e + 1])[0] - model(x_ref[e:e + 1])[0], atol=1e-15)
        assert torch.allclose(ours, swapped, rtol=1e-12, atol=1e-15)  # the rule does not care which end is which
    near = x + 1e-9 * torch.randn(3, 5, generator=g, **float64)
    limit = attrib.DeepLift(model, multiply_by_inputs=False).attribute(x, target=1, baselines=near).attributions
    gradient = attrib.Saliency(model).attribute(x, target=1, abs=False).attributions
    assert torch.allclose(limit, gradient, atol=1e-8)
    same = attrib.DeepLift(model, multiply_by_inputs=False).attribute(x, target=1, baselines=x).attributions
    assert torch.allclose(same, gradient, rtol=1e-13, atol=1e-15)


def test_softmax_rule_is_finite_and_complete_for_logit_gaps_that_overflow_exp():
    """Logits ~1e3 apart between the inputs and the baselines: e^x overflows float64; the rule works
    with e^(x - max) and expm1, and 0 <= w_i <= 1 keeps the multipliers bounded."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double().eval()
    with torch.no_grad():
        model[2].weight.mul_(2000)
    x, base = torch.randn(32, 5, **float64), torch.randn(32, 5, **float64)
    for head in (nn.Softmax(dim=1), nn.LogSoftmax(dim=1)):
        result = attrib.DeepLift(nn.Sequential(model, head)).attribute(x, target=1, baselines=base)
        change = result.outputs - result.baseline_outputs
        assert bool(torch.isfinite(result.attributions).all())
        assert float(result.delta.abs().max()) <= 1e-13 * float(change.abs().max()) + 1e-13


def test_softmax_with_several_inputs_is_complete_over_all_of_them():
    model = TwoInputs(nn.Softmax(dim=1))
    inputs, base = two_inputs(5, 6), two_inputs(1, 7)
    result = attrib.DeepLift(model).attribute(inputs, target=[0, 1, 2, 3, 0], baselines=base,
                                              additional_forward_args=torch.linspace(0.5, 2, 5, **float64))
    total = sum(a.flatten(1).sum(1) for a in result.attributions)
    change = result.outputs - result.baseline_outputs
    assert float(result.delta.abs().max()) <= 1e-10 * float(change.abs().max())
    assert torch.allclose(total, change, rtol=0, atol=1e-12)


def test_adaptive_max_pooling_takes_the_max_pool_rule():
    """6x6 -> 3x3 adaptive windows are the 2x2/2 windows: the same attributions as MaxPool2d(2) (whose rule
    is checked window by window in test_gradient_family); uneven adaptive windows stay complete."""
    conv, head = make_cnn()[0], nn.Linear(4 * 9, 5).double()
    x, base = torch.rand(3, 3, 6, 6, **float64), 0.3 * torch.rand(1, 3, 6, 6, **float64)
    adaptive = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d(3), nn.Flatten(), head).eval()
    fixed = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), head).eval()
    ours = attrib.DeepLift(adaptive).attribute(x, target=4, baselines=base)
    assert relative(ours.attributions, attrib.DeepLift(fixed).attribute(x, target=4, baselines=base).attributions) < 1e-14
    uneven = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d((3, 4)), nn.Flatten(), nn.Linear(4 * 12, 5).double()).eval()
    x, base = torch.rand(3, 3, 7, 9, **float64), 0.3 * torch.rand(1, 3, 7, 9, **float64)
    result = attrib.DeepLift(uneven).attribute(x, target=4, baselines=base)
    assert float(result.delta.abs().max()) <= 1e-10 * float((result.outputs - result.baseline_outputs).abs().max())
    gradient_rule = attrib.DeepLift(uneven, maxpool="gradient").attribute(x, target=4, baselines=base)
    assert float(gradient_rule.delta.abs().max()) > 1e-4  # not vacuous: x and x' pick different winners


def captum_pair(inputs, base, scale):
    """(our arguments, Captum's) for the two-input model: the same inputs, baselines, targets, scale."""
    ours = dict(target=[0, 3, 1], baselines=base, additional_forward_args=scale)
    return ours, dict(target=[0, 3, 1], baselines=base, additional_forward_args=(scale,))


@pytest.fixture(scope="module")
def case():
    inputs, base = two_inputs(3, 8), two_inputs(3, 9)
    return TwoInputs(), inputs, base, torch.tensor([1.0, 2.0, 0.5], **float64)


def test_multipliers_match_captum_for_one_and_several_inputs(case):
    model, inputs, base, scale = case
    ours_args, their_args = captum_pair(inputs, base, scale)
    ours = attrib.DeepLift(model, multiply_by_inputs=False, maxpool="gradient").attribute(inputs, **ours_args)
    theirs = captum.DeepLift(model, multiply_by_inputs=False).attribute(inputs, **their_args)
    assert isinstance(ours.attributions, tuple) and len(ours.attributions) == 2
    for a, b in zip(ours.attributions, theirs):
        assert relative(a, b) <= TOL
    mlp, x, x_ref = make_mlp(activation=nn.ReLU), torch.randn(4, 6, **float64), torch.randn(4, 6, **float64)
    one = attrib.DeepLift(mlp, multiply_by_inputs=False).attribute(x, target=1, baselines=x_ref).attributions
    assert relative(one, captum.DeepLift(mlp, multiply_by_inputs=False).attribute(x, target=1, baselines=x_ref)) <= TOL


CUSTOM = {
    "multipliers": lambda m: tuple(2 * t for t in m),
    "inputs": lambda m, x: tuple(t * u.abs() for t, u in zip(m, x)),
    "baselines": lambda m, x, b: tuple(t * (u - v) ** 2 for t, u, v in zip(m, x, b)),
}


@pytest.mark.parametrize("custom", CUSTOM)
def test_custom_attribution_func_matches_captum(case, custom):
    model, inputs, base, scale = case
    ours_args, their_args = captum_pair(inputs, base, scale)
    ours = attrib.DeepLift(model, maxpool="gradient").attribute(inputs, custom_attribution_func=CUSTOM[custom], **ours_args)
    theirs, delta = captum.DeepLift(model).attribute(inputs, custom_attribution_func=CUSTOM[custom],
                                                     return_convergence_delta=True, **their_args)
    for a, b in zip(ours.attributions, theirs):
        assert relative(a, b) <= TOL
    assert torch.allclose(ours.delta, delta, rtol=1e-8, atol=1e-12)  # delta checks the custom maps, as Captum's
    single = attrib.DeepLift(model.out).attribute(inputs[1].repeat(1, 8)[:, :32], target=2, baselines=0.5,
                                                  custom_attribution_func=CUSTOM[custom])
    reference = captum.DeepLift(model.out).attribute(inputs[1].repeat(1, 8)[:, :32], target=2, baselines=0.5,
                                                     custom_attribution_func=CUSTOM[custom])
    assert isinstance(single.attributions, torch.Tensor) and relative(single.attributions, reference) <= TOL


@pytest.mark.parametrize("custom, words", [
    (5, "must be a function"), (lambda: (), "1 to 3 arguments"), (lambda a, b, c, d: a, "1 to 3 arguments"),
    (lambda m: m[0], "must return a tuple of 2"), (lambda m: m[:1], "must return a tuple of 2"),
    (lambda m: (m[0], m[1][:1]), "shaped like the inputs"),
])
def test_custom_attribution_func_errors_name_it(case, custom, words):
    model, inputs, base, _ = case
    for method in (attrib.DeepLift(model), DeepLiftShap(model)):
        with pytest.raises(attrib.InputError, match="custom_attribution_func") as caught:
            method.attribute(inputs, target=0, baselines=base, custom_attribution_func=custom)
        assert words in str(caught.value)


SHAP_OPTIONS = {
    "default": dict(),
    "multipliers": dict(multiply_by_inputs=False),
    "custom": dict(custom_attribution_func=CUSTOM["baselines"]),
}


@pytest.mark.parametrize("option", SHAP_OPTIONS)
def test_deeplift_shap_matches_captum_for_several_inputs(case, option):
    model, inputs, _, scale = case
    references = two_inputs(4, 10)
    options = dict(SHAP_OPTIONS[option])
    flag = dict(multiply_by_inputs=options.pop("multiply_by_inputs", True))
    before = model_state(model)
    ours = DeepLiftShap(model, maxpool="gradient", **flag).attribute(inputs, references, target=[0, 3, 1],
                                                                     additional_forward_args=scale, **options)
    assert_unchanged(model, before)
    theirs, delta = captum.DeepLiftShap(model, **flag).attribute(
        inputs, references, target=[0, 3, 1], additional_forward_args=(scale,), return_convergence_delta=True, **options)
    for a, b in zip(ours.attributions, theirs):
        assert relative(a, b) <= TOL
    assert ours.info["deltas"].shape == (3, 4)
    if option != "multipliers":  # with multipliers we check (x - x') m, Captum sums the multipliers
        assert torch.allclose(ours.info["deltas"].flatten(), delta, rtol=1e-8, atol=1e-12)


def test_deeplift_shap_matches_captum_on_one_input():
    model = make_cnn()
    x, references = torch.rand(3, 3, 8, 8, **float64), torch.rand(5, 3, 8, 8, **float64)
    ours = DeepLiftShap(model, maxpool="gradient").attribute(x, references, target=2)
    theirs, delta = captum.DeepLiftShap(model).attribute(x, references, target=2, return_convergence_delta=True)
    assert isinstance(ours.attributions, torch.Tensor) and relative(ours.attributions, theirs) <= TOL
    assert torch.allclose(ours.info["deltas"].flatten(), delta, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("internal_batch_size", [1, 4, 7])
def test_deeplift_shap_chunked_equals_unchunked(case, internal_batch_size):
    model, inputs, _, scale = case
    references = two_inputs(5, 11)
    shap = DeepLiftShap(model)
    whole = shap.attribute(inputs, references, target=[0, 3, 1], additional_forward_args=scale)
    chunked = shap.attribute(inputs, references, target=[0, 3, 1], additional_forward_args=scale,
                             internal_batch_size=internal_batch_size)
    for a, b in zip(chunked.attributions, whole.attributions):
        assert relative(a, b) < 1e-12
    assert torch.allclose(chunked.info["deltas"], whole.info["deltas"], atol=1e-13)
    assert torch.allclose(chunked.baseline_outputs, whole.baseline_outputs, rtol=1e-13)


def test_deeplift_shap_is_complete_with_the_rescale_rule_and_reports_the_means():
    """Max pooling by the rescale rule and a softmax head: every (example, reference) pair is complete, and
    so is the average against F(x) - mean_j F(x'_j)."""
    model = TwoInputs(nn.Softmax(dim=1))
    inputs, references = two_inputs(3, 12), two_inputs(6, 13)
    result = DeepLiftShap(model).attribute(inputs, references, target=[2, 0, 1], internal_batch_size=5)
    with torch.no_grad():
        outputs = model(*inputs)[torch.arange(3), [2, 0, 1]]
        at_references = model(*references)[:, [2, 0, 1]].T  # (B, N): example e's target at reference j
    assert torch.allclose(result.outputs, outputs, rtol=1e-13)
    assert torch.allclose(result.baseline_outputs, at_references.mean(1), rtol=1e-13)
    assert float(result.info["deltas"].abs().max()) <= 1e-10
    total = sum(a.flatten(1).sum(1) for a in result.attributions)
    assert torch.allclose(total, outputs - at_references.mean(1), rtol=0, atol=1e-12)
    assert torch.allclose(result.delta, result.info["deltas"].mean(1), atol=1e-16)


def test_deeplift_shap_with_one_reference_is_deeplift():
    model = make_cnn()
    x, reference = torch.rand(3, 3, 8, 8, **float64), torch.rand(1, 3, 8, 8, **float64)
    shap = DeepLiftShap(model).attribute(x, reference, target=[1, 2, 3])
    plain = attrib.DeepLift(model).attribute(x, target=[1, 2, 3], baselines=reference)
    assert relative(shap.attributions, plain.attributions) < 1e-14
    assert torch.allclose(shap.delta, plain.delta, atol=1e-15)


@pytest.mark.parametrize("baselines, words", [
    (None, "needs reference examples"), (0.0, "needs reference examples"),
    (torch.zeros(0, 3, 8, 8, **float64), "no reference examples"),
    (torch.zeros(2, 3, 8, **float64), "shaped ('N', 3, 8, 8)"),
    (torch.zeros(2, 3, 8, 7, **float64), "shaped ('N', 3, 8, 8)"),
    (torch.zeros(2, 3, 8, 8), "float32"),
    (torch.full((2, 3, 8, 8), float("nan"), **float64), "NaN"),
    ((torch.zeros(2, 3, 8, 8, **float64),) * 2, "2 given for 1 inputs"),
])
def test_deeplift_shap_baseline_errors_name_baselines(baselines, words):
    x = torch.rand(2, 3, 8, 8, **float64)
    with pytest.raises(attrib.InputError, match="baselines") as caught:
        DeepLiftShap(make_cnn()).attribute(x, baselines, target=0)
    assert words in str(caught.value)


def test_deeplift_shap_several_inputs_need_one_distribution_each_with_one_count(case):
    model, inputs, _, _ = case
    image, vector = two_inputs(4, 14)
    with pytest.raises(attrib.InputError, match="same number of reference examples"):
        DeepLiftShap(model).attribute(inputs, (image, vector[:3]), target=0)
    with pytest.raises(attrib.InputError, match=r"baselines\[1\] of shape \(4, 5\)"):
        DeepLiftShap(model).attribute(inputs, (image, torch.zeros(4, 5, **float64)), target=0)
    with pytest.raises(attrib.InputError, match="baselines: 1 given for 2 inputs"):
        DeepLiftShap(model).attribute(inputs, (image,), target=0)
    with pytest.raises(attrib.InputError, match="internal_batch_size"):
        DeepLiftShap(model).attribute(inputs, (image, vector), target=0, internal_batch_size=0)


def test_custom_attribution_func_sees_every_row_at_once_whatever_the_chunking():
    """A function that normalises over its batch gives Captum's numbers with any internal_batch_size."""
    import warnings

    from captum import attr as captum_attr
    from conftest import make_cnn

    model = make_cnn()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    baselines = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 0.1

    def normalised(multipliers, inputs, baselines):
        return tuple(m * (x - b) / (m * (x - b)).abs().sum() for m, x, b in zip(multipliers, inputs, baselines))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.DeepLift(model).attribute(x, target=1, baselines=baselines, custom_attribution_func=normalised)
    for chunk in ("auto", None, 1, 4):
        ours = attrib.DeepLift(model, maxpool="gradient").attribute(
            x, target=1, baselines=baselines, custom_attribution_func=normalised, internal_batch_size=chunk)
        assert float((ours.attributions - theirs).abs().max() / theirs.abs().max()) <= 1e-8, chunk
