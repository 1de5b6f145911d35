"""LRP with several inputs (Captum's convention): Captum as the oracle, conservation over all inputs
together, the same network taking one concatenated input, tensor/tuple results, hidden-layer starts,
errors that name the input, and nothing left behind."""
import warnings

import pytest
import torch
from conftest import assert_unchanged, make_cnn, model_state, relative
from torch import nn

from attrib.errors import InputError, InputTypeError
from attrib.lrp import LRP, LRP0, Composite, Epsilon, Norm
from attrib.module_types import LINEAR_LAYERS

IMAGE, VECTOR, EXTRA = (3, 6, 6), (5,), (3,)


class ThreeInputs(nn.Module):
    """An image branch (Conv2d, ReLU) and a vector branch (Linear, ReLU) concatenated with a third
    input as it is into a Linear head. No nn.Flatten: Captum's LRP has no rule for it."""

    def __init__(self, bias: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.relu_image = nn.Conv2d(3, 4, 3, bias=bias), nn.ReLU()
        self.fc_vector, self.relu_vector = nn.Linear(5, 4, bias=bias), nn.ReLU()
        self.head = nn.Linear(4 * 4 * 4 + 4 + 3, 6, bias=bias)
        self.double().eval()

    def forward(self, image, vector, extra):
        seen = self.relu_image(self.conv(image)).flatten(1)
        read = self.relu_vector(self.fc_vector(vector))
        return self.head(torch.cat([seen, read, extra], 1))


class Concatenated(nn.Module):
    """The same network (the same modules) taking the three inputs flattened into one row."""

    def __init__(self, parts: ThreeInputs):
        super().__init__()
        self.parts = parts

    def forward(self, flat):
        image, vector, extra = flat.split([IMAGE[0] * IMAGE[1] * IMAGE[2], VECTOR[0], EXTRA[0]], 1)
        return self.parts(image.reshape((-1,) + IMAGE), vector, extra)


def inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((batch,) + shape, generator=generator, dtype=torch.float64) for shape in (IMAGE, VECTOR, EXTRA))


def conserving() -> Composite:
    """LRP-0 everywhere and unstabilised sums: exactly conservative on bias-free networks."""
    return Composite(types=[(LINEAR_LAYERS, LRP0())], addition_rule=Norm(0))


def test_matches_captum_on_three_inputs():
    """Captum 0.9's LRP (epsilon 1e-9 on Linear and Conv2d, ReLU passing) takes tuple inputs."""
    from captum.attr import LRP as CaptumLRP

    model, xs = ThreeInputs(), inputs()
    ours = LRP(model, Composite(types=[(LINEAR_LAYERS, Epsilon(1e-9))])).attribute(xs, target=[1, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum sets requires_grad on the inputs and says so
        theirs, their_delta = CaptumLRP(model).attribute(xs, target=[1, 4], return_convergence_delta=True)
    assert isinstance(ours.attributions, tuple) and len(ours.attributions) == 3
    for mine, expected in zip(ours.attributions, theirs):
        assert mine.shape == expected.shape and relative(mine, expected) < 1e-8
    assert relative(ours.delta, -their_delta) < 1e-8  # Captum: score minus the relevance; ours: the relevance minus the score
    assert float(ours.delta.abs().min()) > 1e-3  # the biases absorb relevance, so the comparison covers delta


@pytest.mark.parametrize("batch", [1, 3])
def test_relevance_over_all_inputs_together_is_conserved(batch):
    model, xs = ThreeInputs(bias=False), inputs(batch)
    result = LRP(model, conserving()).attribute(xs, target=2)
    report = result.info["conservation"]
    total = sum(r.flatten(1).sum(1) for r in result.attributions)
    score = model(*xs)[:, 2].detach()
    assert float((total - score).abs().max()) <= 1e-10
    assert float(result.delta.abs().max()) <= 1e-10
    assert float((report.input - total).abs().max()) <= 1e-12 and float((report.start - score).abs().max()) <= 1e-12
    assert max(float(row.difference.abs().max()) for row in report.rows) <= 1e-10
    assert all(float(r.abs().sum()) > 1e-3 for r in result.attributions)  # every input gets its share


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_same_relevance_as_the_network_taking_one_concatenated_input(composite):
    model, xs = ThreeInputs(), inputs(3)
    several = LRP(model, composite).attribute(xs, target=[0, 5, 2], layers=["relu_vector"])
    flat = torch.cat([x.flatten(1) for x in xs], 1)
    one = LRP(Concatenated(model), composite).attribute(flat, target=[0, 5, 2], layers=["parts.relu_vector"])
    slices = one.attributions.split([x[0].numel() for x in xs], 1)
    for mine, part, x in zip(several.attributions, slices, xs):
        assert relative(mine, part.reshape(x.shape)) < 1e-12
    assert relative(several.delta, one.delta) < 1e-12
    assert relative(several.layers["relu_vector"], one.layers["parts.relu_vector"]) < 1e-12
    first = {row.name: row.rule for row in several.info["conservation"].rows}
    assert first["conv"] == {row.name: row.rule for row in one.info["conservation"].rows}["parts.conv"]


def test_a_tensor_gives_a_tensor_and_a_tuple_of_one_a_tuple_of_one():
    model = make_cnn()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lrp = LRP(model, "epsilon_plus_flat")
    alone, wrapped = lrp.attribute(x, target=[1, 3]), lrp.attribute((x,), target=[1, 3])
    assert isinstance(alone.attributions, torch.Tensor)
    assert isinstance(wrapped.attributions, tuple) and len(wrapped.attributions) == 1
    assert torch.equal(wrapped.attributions[0], alone.attributions) and torch.equal(wrapped.delta, alone.delta)
    selectors = [(0, 1, 1), (2, 0, 1)]
    alone = lrp.attribute(x, start_layer="4", neuron_selector=selectors)
    wrapped = lrp.attribute((x,), start_layer="4", neuron_selector=selectors)
    assert isinstance(alone.attributions, torch.Tensor) and alone.attributions.shape == (2,) + tuple(x.shape)
    assert isinstance(wrapped.attributions, tuple) and torch.equal(wrapped.attributions[0], alone.attributions)


def test_start_layer_with_several_inputs():
    """From the head's units: the same as explaining those outputs, with a leading selector dimension
    on every input's map; from the vector branch: the other inputs get zeros and the vector all of it."""
    model, xs = ThreeInputs(), inputs(2)
    lrp = LRP(model, "epsilon")
    selected = lrp.attribute(xs, start_layer="head", neuron_selector=[(1,), (4,)])
    assert isinstance(selected.attributions, tuple) and len(selected.attributions) == 3
    for k, unit in enumerate((1, 4)):
        explained = lrp.attribute(xs, target=unit)
        for mine, expected in zip(selected.attributions, explained.attributions):
            assert mine.shape == (2,) + tuple(expected.shape) and relative(mine[k], expected) < 1e-12
        assert relative(selected.delta[k], explained.delta) < 1e-12 and relative(selected.outputs[k], explained.outputs) < 1e-12
    one = lrp.attribute(xs, start_layer="head", neuron_selector=(4,))
    assert all(torch.equal(a, b[1]) for a, b in zip(one.attributions, selected.attributions))
    bias_free = ThreeInputs(bias=False)
    branch = LRP(bias_free, conserving()).attribute(xs, start_layer="relu_vector", neuron_selector=(2,))
    image, vector, extra = branch.attributions
    assert not image.any() and not extra.any()
    assert float((vector.sum(1) - branch.outputs).abs().max()) <= 1e-12 and float(vector.abs().sum()) > 0


def test_an_input_the_output_does_not_depend_on_gets_zeros():
    class Ignores(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2, bias=False).double()

        def forward(self, used, unused):
            return self.fc(used)

    model = Ignores().eval()
    used, unused = torch.rand(2, 4, dtype=torch.float64), torch.rand(2, 7, dtype=torch.float64)
    result = LRP(model, conserving()).attribute((used, unused), target=1)
    assert result.attributions[1].shape == unused.shape and not result.attributions[1].any()
    assert relative(result.attributions[0], LRP(model.fc, conserving()).attribute(used, target=1).attributions) < 1e-15


def test_an_addition_of_two_inputs_is_shared_in_proportion():
    """``fc(a + b)`` of two raw inputs: R_a = a R_z / z, R_b = b R_z / z (the gradient would hand
    both the whole R_z, doubling the relevance)."""
    class Sums(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 1, bias=False).double()

        def forward(self, a, b):
            return self.fc(a + b)

    model = Sums().eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 2.0]]))
    a, b = torch.tensor([[1.0, 3.0]], dtype=torch.float64), torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    result = LRP(model, conserving()).attribute((a, b), target=0)
    z = a + b                   # (4, 2)
    at_z = z * model.fc.weight  # LRP-0 at fc's input: x_j w_j R / z_out, with R = z_out (score start)
    assert torch.allclose(result.attributions[0], a * at_z / z, rtol=0, atol=1e-14)
    assert torch.allclose(result.attributions[1], b * at_z / z, rtol=0, atol=1e-14)
    assert float(result.delta.abs().max()) <= 1e-14


def test_nothing_left_behind_after_a_run_and_after_a_failed_run():
    model, xs = ThreeInputs(), inputs(2)
    before, kept = model_state(model), tuple(x.clone() for x in xs)
    output_before = model(*xs).detach()
    LRP(model, "epsilon_gamma_box").attribute(xs, target=1, layers=["conv", "relu_vector"])
    assert_unchanged(model, before)
    assert torch.equal(model(*xs).detach(), output_before)
    assert all(torch.equal(x, k) and not x.requires_grad for x, k in zip(xs, kept))

    class Raising(ThreeInputs):
        def forward(self, image, vector, extra):
            super().forward(image, vector, extra)
            raise RuntimeError("boom")

    raising = Raising()
    before = model_state(raising)
    with pytest.raises(RuntimeError, match="boom"):
        LRP(raising, "epsilon").attribute(xs, target=1)
    assert_unchanged(raising, before)
    before = model_state(model)
    with pytest.raises(InputError, match="target"):  # fails after the forward pass
        LRP(model, "epsilon").attribute(xs, target=9)
    assert_unchanged(model, before)


def test_errors_name_the_input():
    model, xs = ThreeInputs(), inputs(2)
    lrp = LRP(model, "epsilon")
    with pytest.raises(InputTypeError, match="tuple of tensors, not a list"):
        lrp.attribute(list(xs), target=0)
    with pytest.raises(InputError, match="same batch size"):
        lrp.attribute((xs[0], xs[1][:1], xs[2]), target=0)
    with pytest.raises(InputTypeError, match=r"inputs\[1\] is torch.float32"):
        lrp.attribute((xs[0], xs[1].float(), xs[2]), target=0)
    with pytest.raises(InputError, match=r"inputs\[2\] contains NaN"):
        lrp.attribute((xs[0], xs[1], xs[2] * float("nan")), target=0)
    with pytest.raises(InputTypeError, match="inputs must be one tensor for this method, got a tuple of 3"):
        lrp.trace(tuple(x[:1] for x in xs), target=0, layers=["conv"])
    with pytest.raises(InputError, match="the tuple is empty"):
        lrp.attribute((), target=0)
