"""LRP engine: hand-computed facts, conservation through every layer, the report's accounting,
hidden-layer starts, composites, bad input, and nothing left behind."""
import copy

import pytest
import torch
import torchvision
from conftest import (
    DictOutput,
    assert_unchanged,
    make_cnn,
    make_mlp,
    model_state,
    relative,
)
from torch import nn

import attrib
from attrib.errors import InputError
from attrib.lrp import (
    COMPOSITES,
    LRP,
    LRP0,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    Norm,
    Pass,
    ZBox,
    ZPlus,
)
from attrib.module_types import AVERAGE_POOLS, BATCHNORMS, LINEAR_LAYERS

CONSERVING = dict(types=[(LINEAR_LAYERS, LRP0()), (AVERAGE_POOLS, Norm(0)), (BATCHNORMS, LRP0())], addition_rule=Norm(0))


def bias_free(model: nn.Module) -> nn.Module:
    """Zero every bias and BatchNorm shift (keeping random BatchNorm scales)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCHNORMS):
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.zero_()
                module.bias.zero_()
            elif getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def torchvision_model(name: str, slim: bool = True) -> nn.Module:
    """A random-init torchvision model in float64. ``slim`` swaps VGG's and AlexNet's 100M-weight
    classifier for one of the same layout (Linear, ReLU, Dropout, ..., 10 classes) after a 1x1
    average pooling, which keeps the tests fast; the oracle tests use the models as shipped."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if slim and hasattr(model, "classifier") and isinstance(model.classifier, nn.Sequential) and name.startswith(("vgg", "alexnet")):
        width = 512 if name.startswith("vgg") else 256
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(width, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True),
                                         nn.Dropout(), nn.Linear(64, 10))
    return model.double().eval()


def image(size=32, batch=1, seed=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_captum_hand_computed_epsilon_fact():
    """Linear(3,3, W=2) -> ReLU -> Linear(3,1, W=3), x = [1, 2, 3]: relevance [18, 36, 54]."""
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[2].weight.fill_(3.0)
    result = LRP(model, COMPOSITES["epsilon"](1e-9)).attribute(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), target=0)
    assert torch.allclose(result.attributions, torch.tensor([[18.0, 36.0, 54.0]], dtype=torch.float64), rtol=1e-9)
    assert float(result.outputs) == 108.0


def test_hand_computed_zplus_and_one_hot_start():
    """y = relu(W x), W = [[1, -1], [2, 1]], x = [1, 2]: z = [-1, 4] -> only unit 2 is active.
    Output = [1, 1] . y = 4. z+ at layer 1: positive contributions of unit 2 are 2*1 and 1*2 -> [2, 2]."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        model[2].weight.fill_(1.0)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    composite = Composite(types=[(LINEAR_LAYERS, ZPlus(epsilon=0))])
    result = LRP(model, composite).attribute(x, target=0)
    assert torch.allclose(result.attributions, torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    one_hot = LRP(model, composite).attribute(x, target=0, start="one_hot")
    assert torch.allclose(one_hot.attributions, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def mlp_batchnorm() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


MODELS = {
    "mlp": lambda: make_mlp(activation=nn.ReLU, bias=False),
    "mlp_batchnorm": mlp_batchnorm,
    "cnn": lambda: make_cnn(bias=False),
    "vgg11": lambda: torchvision_model("vgg11"),
    "vgg11_bn": lambda: torchvision_model("vgg11_bn"),
    "alexnet": lambda: torchvision_model("alexnet"),
    "resnet18": lambda: torchvision_model("resnet18"),
    "resnet50": lambda: torchvision_model("resnet50"),
    "densenet121": lambda: torchvision_model("densenet121"),
    "mobilenet_v2": lambda: torchvision_model("mobilenet_v2"),
}
SIZES = {"cnn": 8, "alexnet": 64}


@pytest.mark.parametrize("name", list(MODELS))
def test_lrp0_conserves_relevance_through_every_layer_of_bias_free_models(name):
    model = bias_free(MODELS[name]())
    before = model_state(model)
    x = torch.rand(2, 6, dtype=torch.float64) if name.startswith("mlp") else image(SIZES.get(name, 32), batch=2)
    result = LRP(model, Composite(**CONSERVING)).attribute(x, target=1)
    report = result.info["conservation"]
    scale = report.start.abs().max()
    assert len(report.rows) >= 3
    if name == "mlp_batchnorm":
        assert [row.name for row in report.rows] == ["0+1", "2", "3"]  # the BatchNorm is folded into the Linear
    for row in report.rows:
        assert float(row.difference.abs().max()) <= 1e-6 * scale, (row.name, row.difference)
    assert relative(report.input, report.start) < 1e-6
    assert relative(result.attributions.flatten(1).sum(1), result.outputs) < 1e-6
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["mlp", "cnn", "vgg11", "alexnet"])
def test_zplus_conserves_relevance_on_bias_free_relu_networks(name):
    model = bias_free(MODELS[name]())
    x = torch.rand(2, 6, dtype=torch.float64) if name == "mlp" else image(SIZES.get(name, 32), batch=2)
    composite = Composite(**dict(CONSERVING, types=[(LINEAR_LAYERS, ZPlus(epsilon=0)), (AVERAGE_POOLS, Norm(0))]))
    report = LRP(model, composite).attribute(x, target=1).info["conservation"]
    for row in report.rows:
        assert float(row.difference.abs().max()) <= 1e-6 * report.start.abs().max(), row.name
    assert relative(report.input, report.start) < 1e-6


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "densenet121", "mobilenet_v2"])
def test_report_accounts_for_every_change_with_biases(name):
    """With biases and stabilisers relevance is absorbed; every bit of it shows up in a listed row:
    the rows' differences add up to input minus start, so no unlisted operation (a residual add
    copying relevance to both branches, say) changes it."""
    model = MODELS[name]()
    x = image(32, batch=2)
    report = LRP(model, "epsilon_gamma_box").attribute(x, target=2).info["conservation"]
    listed = sum(row.difference for row in report.rows)
    assert relative(listed, report.input - report.start) < 1e-9
    assert float((report.input - report.start).abs().max()) > 1e-6 * float(report.start.abs().max())  # something absorbed


def test_residual_addition_splits_instead_of_copying():
    """A toy block y = relu(a + b), a = 2x, b = 3x: a's branch gets 2/5 of the relevance, b's 3/5."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)

        def forward(self, x):
            out = self.a(x)
            out += self.b(x)
            return out

    block = Block().double()
    with torch.no_grad():
        block.a.weight.fill_(2.0)
        block.b.weight.fill_(3.0)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    result = LRP(block, Composite(types=[(nn.Linear, LRP0())], addition_rule=Norm(0))).attribute(x, target=0, layers=["a", "b"])
    assert float(result.layers["a"]) == pytest.approx(2.0) and float(result.layers["b"]) == pytest.approx(3.0)
    assert float(result.attributions) == pytest.approx(5.0)
    copied = LRP(block, Composite(types=[(nn.Linear, LRP0())], split_additions=False)).attribute(x, target=0)
    assert float(copied.attributions) == pytest.approx(10.0)  # what the plain gradient does: both get all 5


def test_residual_addition_around_the_input_itself_splits():
    """``head(x + lin(x))``: the model's input is an operand too (the run feeds the model a copy of
    it, a computed tensor). x = 1, lin = 3, head = 1: the input gets 1 directly and 3 through lin,
    not 4 + 4 as the copying gradient would give."""
    class AroundInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)

        def forward(self, x):
            return self.head(x + self.lin(x))

    model = AroundInput().double().eval()
    with torch.no_grad():
        model.lin.weight.fill_(3.0)
        model.head.weight.fill_(1.0)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    result = LRP(model, Composite(types=[(nn.Linear, LRP0())], addition_rule=Norm(0))).attribute(x, target=0, layers=["lin"])
    assert float(result.layers["lin"]) == pytest.approx(3.0, abs=1e-14)
    assert float(result.attributions) == pytest.approx(4.0, abs=1e-14) and float(result.delta.abs()) < 1e-14


class Addition(nn.Module):
    def forward(self, a, b):
        return a + b


class InPlaceAddition(nn.Module):
    def forward(self, a, b):
        a += b
        return a


class Sum3(nn.Module):
    def forward(self, a, b, c):
        return c + b + a  # another order of addition than the functional a + b + c: equal up to rounding


class Product(nn.Module):
    def forward(self, a, b):
        return a * b


class Concatenation(nn.Module):
    def forward(self, a, b):
        return torch.cat([a, b], 1)


class Joined(nn.Module):
    """Two Linear branches joined by ``join`` (a module; ``None``: the functional ``a + b``), then
    ReLU and a head; with ``third``, a one-unit branch added too (broadcast, passed by keyword)."""

    def __init__(self, join: nn.Module | None = None, third: bool = False, width: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.fa, self.fb, self.fc = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 1) if third else None
        self.join, self.relu, self.head = join, nn.ReLU(), nn.Linear(width, 2)
        self.double().eval()

    def forward(self, x):
        a, b = self.fa(x), self.fb(x)
        if self.fc is not None:
            return self.head(self.relu(a + b + self.fc(x) if self.join is None else self.join(a, b, c=self.fc(x))))
        return self.head(self.relu(a + b if self.join is None else self.join(a, b)))


def test_module_that_sums_its_inputs_shares_relevance_under_norm():
    """A leaf module ``forward(a, b): return a + b`` mapped to Norm shares as the functional ``a + b``
    does: by hand (a = 2x, b = 3x: 2/5 and 3/5 of the relevance), and against the same network
    written with ``a + b``, also in place, with three inputs, broadcasting and a keyword argument."""
    hand = Joined(Addition(), width=3)
    with torch.no_grad():
        for layer, value in ((hand.fa, 2.0), (hand.fb, 3.0), (hand.head, 1.0)):
            layer.weight.fill_(value)
            layer.bias.zero_()
    exact = Composite(types=[(nn.Linear, LRP0())], names={"join": Norm(0)})
    x = torch.full((1, 4), 0.25, dtype=torch.float64)
    result = LRP(hand, exact).attribute(x, target=0, layers=["fa", "fb", "join"])
    assert torch.allclose(result.layers["fa"], torch.full((1, 3), 2.0, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.allclose(result.layers["fb"], torch.full((1, 3), 3.0, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.allclose(result.layers["join"], torch.full((1, 3), 5.0, dtype=torch.float64), rtol=0, atol=1e-14)
    assert float(result.attributions.sum()) == pytest.approx(15.0, abs=1e-13)
    rows = {row.name: row for row in result.info["conservation"].rows}
    assert rows["join"].rule == "Norm(epsilon=0)" and float(rows["join"].difference.abs()) < 1e-13
    x = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) - 0.5
    for third, joins in ((False, (Addition(), InPlaceAddition())), (True, (Sum3(),))):
        functional = LRP(Joined(None, third), Composite(types=[(nn.Linear, Epsilon())], first=Flat(), addition_rule=Norm(1e-6)))
        expected = functional.attribute(x, target=[0, 1, 1], layers=["fa", "fb"])
        for join in joins:
            mapped = Composite(types=[(nn.Linear, Epsilon())], first=Flat(), names={"join": Norm(1e-6)})
            got = LRP(Joined(join, third), mapped).attribute(x, target=[0, 1, 1], layers=["fa", "fb"])
            assert relative(got.attributions, expected.attributions) < 1e-12, type(join).__name__
            assert all(relative(got.layers[n], expected.layers[n]) < 1e-12 for n in ("fa", "fb"))
            assert relative(got.delta, expected.delta) < 1e-12


def test_module_with_several_inputs_under_another_rule_is_refused():
    """Before, the rule read only the first argument and all relevance went down it, silently (the
    report still balanced). Now: an error naming the module and what to do, and nothing left behind."""
    x = torch.rand(2, 4, dtype=torch.float64)
    linear = [(nn.Linear, Epsilon())]
    cases = [
        (Joined(Addition()), {"join": Pass()}, r"'join' \(Addition\) takes arguments 0, 1 from the inputs' graph, but its rule Pass\(\)"),
        (Joined(Addition()), {}, r"'join' \(Addition\) takes arguments 0, 1 .* it has no rule.*map it to Norm"),
        (Joined(Product()), {"join": Norm()}, r"'join' \(Product\) is mapped to Norm .* not their elementwise sum"),
        (Joined(Product()), {"join": Pass()}, r"'join' \(Product\) takes arguments 0, 1"),
        (Joined(Concatenation(), width=6), {}, r"'join' \(Concatenation\) takes arguments 0, 1 .* no rule"),
        (Joined(Concatenation(), width=6), {"join": Norm()}, "not their elementwise sum"),
        (Joined(Sum3(), third=True), {"join": Gamma()}, r"takes arguments 0, 1, 'c' from the inputs' graph"),
    ]
    for model, names, message in cases:
        before = model_state(model)
        with pytest.raises(InputError, match=message):
            LRP(model, Composite(types=linear, names=names)).attribute(x, target=0)
        assert_unchanged(model, before)

    class Scaled(nn.Module):
        def forward(self, factor, x):
            return factor * x

    class ScalesItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale = nn.Linear(4, 2).double(), Scaled()

        def forward(self, x):
            return self.scale(torch.tensor(2.0, dtype=x.dtype), self.fc(x))

    with pytest.raises(InputError, match=r"'scale' \(Scaled\) takes argument 1 from the inputs' graph"):
        LRP(ScalesItsInput().eval(), Composite(types=linear, names={"scale": Pass()})).attribute(x, target=0)
    with pytest.raises(InputError, match="'join' has 2 inputs; record its output"):
        LRP(Joined(Addition()), Composite(types=linear, names={"join": Norm()})).attribute(
            x, target=0, layers=["join"], attribute_to_layer_input=True)


def test_module_rule_sees_the_calls_other_arguments():
    """A custom module ``forward(x, factor=1.0)`` called with ``factor=2.0`` under the Gradient rule:
    the vector-Jacobian product is of ``2 x`` (before, the view called ``forward(x)``, so of ``x``).
    fc = [1, 3], x = [1, 1]: score 8, relevance 16 at fc's output, LRP-0 at fc: [4, 12]."""
    class Scale(nn.Module):
        def forward(self, x, factor=1.0):
            return x * factor

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale = nn.Linear(2, 1, bias=False), Scale()

        def forward(self, x):
            return self.scale(self.fc(x), factor=2.0)

    model = Scaled().double().eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 3.0]]))
    x = torch.ones(1, 2, dtype=torch.float64)
    result = LRP(model, Composite(types=[(nn.Linear, LRP0())], names={"scale": Gradient()})).attribute(x, target=0)
    assert torch.equal(result.attributions, torch.tensor([[4.0, 12.0]], dtype=torch.float64))
    normed = LRP(model, Composite(types=[(nn.Linear, LRP0())], names={"scale": Norm(0)})).attribute(x, target=0)
    assert torch.equal(normed.attributions, torch.tensor([[2.0, 6.0]], dtype=torch.float64))  # conserves the score 8


def test_inplace_relu_gives_the_same_as_out_of_place():
    model = torchvision_model("vgg11")
    out_of_place = copy.deepcopy(model)
    for module in out_of_place.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    x = image(32)
    for composite in ["epsilon_gamma_box", "epsilon_plus_flat"]:
        a = LRP(model, composite).attribute(x, target=4).attributions
        b = LRP(out_of_place, composite).attribute(x, target=4).attributions
        assert torch.equal(a, b)


def test_batch_equals_examples_one_by_one():
    model = torchvision_model("vgg16")
    x = image(32, batch=3)
    lrp = LRP(model, "vgg16_tutorial")
    batch = lrp.attribute(x, target=[1, 2, 3])
    for i in range(3):
        single = lrp.attribute(x[i:i + 1], target=i + 1)
        assert relative(batch.attributions[i:i + 1], single.attributions) < 1e-12


def test_recorded_layer_relevance_restarts_the_backward_pass():
    """Rules are linear in the relevance: starting at features.10 from the relevance recorded there
    (one_hot start with a callable selector whose gradient is that relevance) gives the same input map."""
    model = torchvision_model("vgg11")
    x = image(32, batch=2)
    lrp = LRP(model, "epsilon_gamma_box")
    full = lrp.attribute(x, target=3, layers=["features.11", "features.13"])
    report = full.info["conservation"]
    entering = {row.name: row.entering for row in report.rows}
    assert relative(full.layers["features.11"].sum((1, 2, 3)).double(), entering["features.11"]) < 1e-12
    recorded = full.layers["features.11"]
    restarted = lrp.attribute(x, start_layer="features.11", start="one_hot",
                              neuron_selector=lambda y: (y * recorded).flatten(1).sum(1))
    assert relative(restarted.attributions, full.attributions) < 1e-10
    leaving = lrp.attribute(x, target=3, layers=["features.11"], attribute_to_layer_input=True)
    assert relative(leaving.layers["features.11"].sum((1, 2, 3)).double(), {r.name: r.leaving for r in report.rows}["features.11"]) < 1e-12


def test_start_from_hidden_filters_matches_the_truncated_model():
    model = torchvision_model("vgg11")
    x = image(32, batch=2)
    lrp = LRP(model, "epsilon_plus_flat")
    selectors = [(c, slice(None), slice(None)) for c in (3, 17, 40)]
    batched = lrp.attribute(x, start_layer="features.8", neuron_selector=selectors)
    truncated = model.features[:9]
    for k, c in enumerate(selectors):
        alone = lrp.attribute(x, start_layer="features.8", neuron_selector=c)
        assert torch.equal(batched.attributions[k], alone.attributions)
        reference = LRP(truncated, "epsilon_plus_flat").attribute(x, target=lambda out, c=c[0]: out[:, c].sum((1, 2)))
        assert relative(alone.attributions, reference.attributions) < 1e-12
        assert relative(alone.outputs, reference.outputs) < 1e-12


def test_vgg16_tutorial_matches_a_tutorial_style_reimplementation():
    """The LRP tutorial's loop over layers (activations, then each layer with rho/incr), rewritten
    here with our stabiliser convention, on a random-init torchvision VGG16 at 32 px."""
    torch.manual_seed(3)
    model = torchvision_model("vgg16")
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.uniform_(-0.05, 0.05)
    x = image(32)
    mean, std = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64), torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    ours = LRP(model, "vgg16_tutorial").attribute(x, target=7).attributions

    layers = list(model.features) + [model.avgpool, nn.Flatten()] + list(model.classifier)
    activations = [x]
    for layer in layers:
        activations.append(layer(activations[-1]).detach())
    relevance = torch.zeros_like(activations[-1])
    relevance[:, 7] = activations[-1][:, 7]

    def stab(z, eps):
        return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)

    def propagate(a, forward, rule_stab):
        a = a.clone().requires_grad_(True)
        z = forward(a)
        s = (current / rule_stab(z.detach())).detach()
        (z * s).sum().backward()
        return (a * a.grad).detach()

    current = relevance
    for index in range(len(layers) - 1, 0, -1):
        layer, a = layers[index], activations[index]
        if isinstance(layer, nn.MaxPool2d):
            pool = nn.AvgPool2d(2)
            eps = (lambda z: 0.25 * z.pow(2).mean().sqrt()) if index >= 17 else (lambda z: 1e-6)
            current = propagate(a, pool, lambda z: stab(z, eps(z)))
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            current = propagate(a, layer, lambda z: stab(z, 1e-6))
        elif isinstance(layer, nn.Conv2d) and index <= 16:
            w, b = layer.weight + 0.25 * layer.weight.clamp(min=0), layer.bias + 0.25 * layer.bias.clamp(min=0)
            current = propagate(a, lambda t: nn.functional.conv2d(t, w, b, padding=1), lambda z: stab(z, 1e-6))
        elif isinstance(layer, nn.Conv2d):
            current = propagate(a, layer, lambda z: stab(z, 0.25 * z.pow(2).mean().sqrt()))
        elif isinstance(layer, nn.Linear):
            current = propagate(a, layer, lambda z: torch.where(z == 0, torch.ones_like(z), z))
        elif isinstance(layer, nn.Flatten):
            current = current.reshape(a.shape)
        # ReLU, Dropout: relevance passes
    first, a = layers[0], activations[0]
    low = (-mean / std).view(1, 3, 1, 1).expand_as(a)
    high = ((1 - mean) / std).view(1, 3, 1, 1).expand_as(a)
    a, lo, hi = a.clone().requires_grad_(True), low.clone().requires_grad_(True), high.clone().requires_grad_(True)
    conv = lambda t, w: nn.functional.conv2d(t, w, None, padding=1)
    z = conv(a, first.weight) - conv(lo, first.weight.clamp(min=0)) - conv(hi, first.weight.clamp(max=0))
    s = (current / stab(z.detach(), 1e-6)).detach()
    (z * s).sum().backward()
    expected = a * a.grad + lo * lo.grad + hi * hi.grad
    assert relative(ours, expected.detach()) < 1e-10


def test_composite_lookup_by_name_pattern_first_and_type():
    model = make_cnn()
    composite = Composite(types=[(nn.Conv2d, Gamma(0.5)), (nn.Linear, Epsilon(0.1))], names={"3": Epsilon(0.2)}, first=ZBox(-1.0, 1.0))
    report = LRP(model, composite).attribute(torch.rand(1, 3, 8, 8, dtype=torch.float64), target=0).info["conservation"]
    rules = {row.name: row.rule for row in report.rows}
    assert rules["0"].startswith("ZBox") and rules["3"] == repr(Epsilon(0.2)) and rules["6"] == repr(Epsilon(0.1))
    assert rules["1"] == "Pass()" and rules["4"] == "Pass()"
    glob = Composite(types=[(LINEAR_LAYERS, Epsilon())], names={"[03]": LRP0()})
    rules = {row.name: row.rule for row in LRP(model, glob).attribute(torch.rand(1, 3, 8, 8, dtype=torch.float64), target=0).info["conservation"].rows}
    assert rules["0"] == rules["3"] == "LRP0(bias=True)"


def test_registry_lists_the_presets():
    assert {"epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "vgg16_tutorial"} <= set(COMPOSITES)
    composite = COMPOSITES["epsilon_gamma_box"](low=-2.0, high=2.0, gamma=0.5)
    assert composite.name == "epsilon_gamma_box" and composite.first.low == -2.0


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3).double()
        self.relu = nn.ReLU()

    def forward(self, x):
        self.relu(self.conv(x))
        raise RuntimeError("boom")


def test_hooks_removed_and_model_unchanged_when_forward_raises():
    model = Raising().eval()
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        LRP(model, "epsilon_gamma_box").attribute(torch.rand(1, 3, 6, 6, dtype=torch.float64), target=0)
    assert_unchanged(model, before)
    a, b = torch.ones(2, requires_grad=True) * 1, torch.ones(2, requires_grad=True) * 1
    assert type(a + b).__name__ == "Tensor" and (a + b).grad_fn.name() == "AddBackward0"  # no mode left active


def test_model_unchanged_after_a_normal_run_with_batchnorm_merging():
    model = torchvision_model("resnet18")
    before = model_state(model)
    output_before = model(image(32)).detach()
    LRP(model, "epsilon_gamma_box").attribute(image(32), target=0, layers=["layer1.0.conv1", "layer2"])
    assert_unchanged(model, before)
    assert torch.equal(model(image(32)).detach(), output_before)


def test_errors_name_the_argument():
    model = make_cnn()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="composite: unknown name 'nope'"):
        LRP(model, "nope")
    with pytest.raises(TypeError, match="composite"):
        LRP(model, 3)
    with pytest.raises(ValueError, match=r"no layer of the model matches \['features.9'\]"):
        LRP(model, Composite(names={"features.9": Epsilon()})).attribute(x, target=0)
    with pytest.raises(ValueError, match="start must be"):
        LRP(model).attribute(x, target=0, start="logit")
    with pytest.raises(ValueError, match="target: not used"):
        LRP(model).attribute(x, target=0, start_layer="3", neuron_selector=(0, 0, 0))
    with pytest.raises(ValueError, match="neuron_selector: give start_layer"):
        LRP(model).attribute(x, neuron_selector=(0, 0, 0))
    with pytest.raises(ValueError, match="target"):
        LRP(model).attribute(x, target=9)
    with pytest.raises(ValueError, match="closest names"):
        LRP(model).attribute(x, target=0, layers=["60"])
    with pytest.raises(ValueError, match="neuron_selector"):
        LRP(model).attribute(x, start_layer="3", neuron_selector=(9, 0, 0))
    with pytest.raises(ValueError, match="ZBox low"):
        LRP(model, Composite(types=[(LINEAR_LAYERS, Epsilon())], first=ZBox(torch.zeros(5), 1.0))).attribute(x, target=0)
    with pytest.raises(ValueError, match="needs weights"):
        LRP(model, Composite(types=[(LINEAR_LAYERS, Epsilon()), (nn.MaxPool2d, Gamma())])).attribute(x, target=0)
    with pytest.raises(ValueError, match="training mode"):
        LRP(nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train())
    with pytest.raises(TypeError, match="model output"):
        LRP(DictOutput()).attribute(torch.rand(1, 4, dtype=torch.float64), target=0)


def test_layer_without_a_rule_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double().eval()
    with pytest.raises(ValueError, match=r"no rule for layer '1' \(LayerNorm\)"):
        LRP(model).attribute(torch.rand(1, 4, dtype=torch.float64), target=0)
    mapped = LRP(model, Composite(types=[(LINEAR_LAYERS, Epsilon())], names={"1": Pass()}))
    rows = {row.name: row for row in mapped.attribute(torch.rand(1, 4, dtype=torch.float64), target=0).info["conservation"].rows}
    assert rows["1"].rule == "Pass()" and float(rows["1"].difference) == 0.0


def test_recording_a_reused_module_is_refused():
    model = torchvision_model("resnet18")
    with pytest.raises(attrib.LayerReuseError, match="layer1.0.relu"):
        LRP(model).attribute(image(32), target=0, layers=["layer1.0.relu"])


def test_conservation_off_gives_the_same_relevance():
    model = torchvision_model("resnet18")
    lrp = LRP(model, "epsilon_gamma_box")
    full = lrp.attribute(image(32), target=2)
    quick = lrp.attribute(image(32), target=2, conservation=False)
    assert torch.equal(full.attributions, quick.attributions) and torch.equal(full.delta, quick.delta)
    assert quick.info["conservation"].rows == [] and len(full.info["conservation"].rows) > 40


def test_runs_under_no_grad_and_matches():
    model = make_cnn()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lrp = LRP(model, "epsilon_plus_flat")
    expected = lrp.attribute(x, target=[0, 3]).attributions
    with torch.no_grad():
        assert torch.equal(lrp.attribute(x, target=[0, 3]).attributions, expected)


def test_inplace_relu_overwriting_a_kept_output_falls_back_when_relevance_sits_below_zero():
    """Flat on the layer above a ReLU hands relevance to units the ReLU zeroed: relu(z) no longer
    stands in for z, so the layer recomputes z and the result equals the out-of-place model's."""
    inplace = make_cnn(activation=lambda: nn.ReLU(inplace=True))
    plain = make_cnn(activation=nn.ReLU)
    plain.load_state_dict(inplace.state_dict())
    composite = Composite(types=[(LINEAR_LAYERS, Epsilon(1e-3))], names={"3": Flat()})
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    a = LRP(inplace, composite).attribute(x, target=1)
    b = LRP(plain, composite).attribute(x, target=1)
    assert torch.equal(a.attributions, b.attributions)
    below_zero = LRP(plain, composite).attribute(x, target=1, layers=["0"]).layers["0"]
    z = plain[0](x)
    assert float(below_zero[z < 0].abs().max()) > 0  # the case this test is about does occur


def test_gamma_survives_a_denominator_that_rounds_to_zero_below_an_inplace_relu():
    """Below an in-place ReLU the gamma rule skips masking (no relevance arrives where z <= 0); where
    (w + gamma w+) x + eps is exactly 0 there (float32 cancellation on a ResNet50 did this), 0 / 0
    must not leak NaN. Hand calculation: unit 0 is dead (z = -1e-6), unit 1 carries
    1.25 / (1.25 + eps) of the top's relevance, and the input 1.25 / (1.25 + eps) of that."""
    eps = torch.tensor(1e-6)
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(inplace=True), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.stack([-eps, torch.tensor(1.0)]).view(2, 1))
        model[2].weight.fill_(1.0)
    composite = Composite(types=[(nn.Linear, Gamma(0.25, epsilon=1e-6))])
    relevance = LRP(model, composite).attribute(torch.ones(1, 1), target=0).attributions
    expected = (1.25 / (1.25 + 1e-6)) ** 2
    assert torch.isfinite(relevance).all()
    assert abs(float(relevance) - expected) < 5e-7  # float32


def test_modules_that_never_run_need_no_rule_and_the_first_rule_goes_to_the_first_layer_that_runs():
    """An unused LSTM (no rule) and an unused BatchNorm without running statistics (not affine) do
    not make LRP refuse the model; the composite's first-layer rule goes to the first linear layer
    that runs, not to an unused Linear registered before it. The relevance equals that of the same
    model without the unused modules."""
    torch.manual_seed(0)

    class Used(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.pool = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
            self.flat, self.fc = nn.Flatten(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))

    class WithUnused(Used):
        def __init__(self):
            super().__init__()
            self.unused_bn = nn.BatchNorm2d(3, track_running_stats=False)
            self.unused_lstm = nn.LSTM(4, 4)
            self.unused_linear = nn.Linear(3, 3)

    plain = Used().double().eval()
    extra = WithUnused().double().eval()
    extra.load_state_dict(plain.state_dict(), strict=False)
    # the unused Linear comes first in registration order
    extra._modules = dict(sorted(extra._modules.items(), key=lambda item: not item[0].startswith("unused")))
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    for name in ("epsilon", "epsilon_gamma_box", "epsilon_plus_flat"):
        expected = LRP(plain, name).attribute(x, target=1)
        got = LRP(extra, name).attribute(x, target=1)
        assert relative(got.attributions, expected.attributions) < 1e-12, name
        assert got.info["conservation"].rows[0].rule == expected.info["conservation"].rows[0].rule
    with pytest.raises(ValueError, match="unused_lstm"):  # a module without a rule that does run is named
        class Runs(WithUnused):
            def forward(self, x):
                return super().forward(x) + self.unused_lstm(x.flatten(2)[..., :4].sum(1, keepdim=True))[0][:, 0, :2]
        LRP(Runs().double().eval(), "epsilon").attribute(x, target=1)


def test_views_are_kept_rebuilt_when_a_parameter_changes_and_dropped_by_clear_cache():
    """The kept views (folded BatchNorms, w + gamma w^+) serve repeated calls; a changed parameter
    rebuilds them (the result follows the new weights); clear_cache() empties the cache and the
    next call rebuilds it with the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double().eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lrp = LRP(model, "epsilon_gamma_box")
    first = lrp.attribute(x, target=1).attributions
    kept = len(lrp.views)
    assert kept >= 3  # conv, its folded form with the BatchNorm, the linear layer
    fresh = LRP(copy.deepcopy(model), "epsilon_gamma_box").attribute(x, target=1).attributions
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)
    with torch.no_grad():
        model[0].weight.mul_(-1.5)  # in place: same tensor, new version
    changed = lrp.attribute(x, target=1).attributions
    torch.testing.assert_close(changed, LRP(copy.deepcopy(model), "epsilon_gamma_box").attribute(x, target=1).attributions,
                               rtol=0, atol=0)
    assert (changed - first).abs().max() > 1e-3
    lrp.clear_cache()
    assert len(lrp.views) == 0
    torch.testing.assert_close(lrp.attribute(x, target=1).attributions, changed, rtol=0, atol=0)
    assert len(lrp.views) == kept
