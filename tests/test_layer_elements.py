"""Layers whose output is a tuple, list or dict (LSTM, MultiheadAttention, custom heads) and layers with
several positional inputs (nn.Bilinear): "name[i]" picks one element. Oracles: the same network with an
nn.Identity tap on that element (ours and Captum's), and Captum's tuple results for several layer inputs."""
import pytest
import torch
from captum import attr as captum
from conftest import assert_unchanged, model_state, relative
from torch import nn

import attrib

TOL = 1e-8


class Sequence(nn.Module):
    """LSTM -> MultiheadAttention -> a dict head; ``tap=True`` routes the picked elements through Identity taps."""

    def __init__(self, tap: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.mix = nn.Bilinear(4, 4, 5)
        self.out = nn.Linear(5, 2)
        self.tap = tap
        self.lstm_tap, self.attn_tap = nn.Identity(), nn.Identity()

    def heads(self, z):
        return {"logits": self.out(z), "aux": z.sum(1)}

    def forward(self, x):
        seq, (h, _) = self.lstm(x)
        if self.tap:
            seq = self.lstm_tap(seq)
        attended, _ = self.attn(seq, seq, seq)
        if self.tap:
            attended = self.attn_tap(attended)
        return self.heads(torch.tanh(self.mix(attended.mean(1), h[0])))["logits"]


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    plain = Sequence().double().eval()
    tapped = Sequence(tap=True).double().eval()
    tapped.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    return plain, tapped, x, [0, 1, 1]


@pytest.mark.parametrize("method", ["riemann_trapezoid", "stieltjes_trapezoid"])
def test_an_element_of_a_tuple_output_is_the_same_as_a_tap_on_it(pair, method):
    plain, tapped, x, target = pair
    before = model_state(plain)
    ours = attrib.LayerConductance(plain, ["lstm[0]", "attn[0]"]).attribute(x, target=target, n_steps=8, method=method)
    assert_unchanged(plain, before)
    taps = attrib.LayerConductance(tapped, ["lstm_tap", "attn_tap"]).attribute(x, target=target, n_steps=8, method=method)
    assert relative(ours["lstm[0]"], taps["lstm_tap"]) <= 1e-12
    assert relative(ours["attn[0]"], taps["attn_tap"]) <= 1e-12
    assert torch.allclose(ours.delta["attn[0]"], taps.delta["attn_tap"], atol=1e-14)
    if method == "riemann_trapezoid":
        theirs = captum.LayerConductance(tapped, tapped.attn_tap).attribute(x, target=target, n_steps=8, method=method)
        assert relative(ours["attn[0]"], theirs) <= TOL


def test_internal_influence_gradient_x_activation_activation_and_neurons_on_an_element(pair):
    plain, tapped, x, target = pair
    influence = attrib.InternalInfluence(plain, "lstm[0]").attribute(x, target=target, n_steps=6)
    theirs = captum.InternalInfluence(tapped, tapped.lstm_tap).attribute(x, target=target, n_steps=6)
    assert relative(influence["lstm[0]"], theirs) <= TOL
    gxa = attrib.LayerGradientXActivation(plain, "attn[0]").attribute(x, target=target)
    assert relative(gxa["attn[0]"], captum.LayerGradientXActivation(tapped, tapped.attn_tap).attribute(x, target=target)) <= TOL
    act = attrib.LayerActivation(plain, "attn[0]").attribute(x)
    assert relative(act["attn[0]"], captum.LayerActivation(tapped, tapped.attn_tap).attribute(x)) <= TOL
    neurons = attrib.NeuronConductance(plain, "lstm[0]").attribute(x, [(2, 1), (4, 3)], target=target, n_steps=6,
                                                                 method="riemann_trapezoid")
    for i, neuron in enumerate([(2, 1), (4, 3)]):
        expected = captum.NeuronConductance(tapped, tapped.lstm_tap).attribute(x, neuron, target=target, n_steps=6,
                                                                             method="riemann_trapezoid")
        assert relative(neurons.attributions[i], expected) <= TOL


def test_several_layer_inputs_give_a_tuple_as_captum(pair):
    plain, _, x, target = pair
    for cls, options in [(attrib.LayerConductance, dict(n_steps=6, method="riemann_trapezoid")),
                         (attrib.InternalInfluence, dict(n_steps=6)), (attrib.LayerGradientXActivation, {})]:
        ours = cls(plain, "mix").attribute(x, target=target, attribute_to_layer_input=True, **options)["mix"]
        theirs = getattr(captum, cls.__name__)(plain, plain.mix).attribute(x, target=target, attribute_to_layer_input=True,
                                                                           **options)
        assert isinstance(ours, tuple) and len(ours) == 2
        for a, b in zip(ours, theirs):
            assert relative(a, b) <= TOL, cls.__name__
    one = attrib.LayerConductance(plain, "mix[1]").attribute(x, target=target, attribute_to_layer_input=True, n_steps=6,
                                                            method="riemann_trapezoid")
    both = attrib.LayerConductance(plain, "mix").attribute(x, target=target, attribute_to_layer_input=True, n_steps=6,
                                                          method="riemann_trapezoid")
    assert relative(one["mix[1]"], both["mix"][1]) <= 1e-12
    act = attrib.LayerActivation(plain, "mix").attribute(x, attribute_to_layer_input=True)["mix"]
    for a, b in zip(act, captum.LayerActivation(plain, plain.mix).attribute(x, attribute_to_layer_input=True)):
        assert relative(a, b) <= TOL


def test_both_inputs_of_a_layer_together_are_complete(pair):
    """The mix layer's two inputs together cut the network: their conductances sum to the score change."""
    plain, _, x, target = pair
    res = attrib.LayerConductance(plain, "mix").attribute(x, target=target, attribute_to_layer_input=True, n_steps=256)
    change = res.outputs - res.baseline_outputs
    total = sum(t.flatten(1).sum(1) for t in res["mix"])
    assert torch.allclose(total - change, res.delta["mix"], atol=1e-14)
    assert res.delta["mix"].abs().max() < 1e-4 * change.abs().max()
    assert res.info["step_residuals"]["mix"].shape == (256, 3)
    assert torch.allclose(res.info["step_residuals"]["mix"].sum(0), res.delta["mix"], atol=1e-12)


def test_a_dict_output_element(pair):
    plain, tapped, x, target = pair
    ours = attrib.LayerConductance(plain, "attn[0]").attribute(x, target=target, n_steps=5)

    class DictHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = plain
            self.split = Split()

        def forward(self, x):
            parts = self.split(x)
            return self.inner(parts["a"] + parts["b"])

    class Split(nn.Module):
        def forward(self, x):
            return {"a": 0.25 * x, "b": 0.75 * x}

    model = DictHead().eval()
    a = attrib.LayerConductance(model, ["split[a]", "split[b]"]).attribute(x, target=target, n_steps=5)
    assert relative(a["split[a]"] / 0.25, a["split[b]"] / 0.75) <= 1e-12  # both carry x, scaled
    assert torch.allclose(a["split[a]"].flatten(1).sum(1) + a["split[b]"].flatten(1).sum(1),
                          ours.outputs - ours.baseline_outputs, atol=1e-4)


def test_wrong_elements_are_refused_by_name(pair):
    plain, _, x, target = pair
    with pytest.raises(TypeError, match=r"layer 'lstm' output is a tuple of 2 \(Tensor, tuple\).*'lstm\[0\]'"):
        attrib.LayerConductance(plain, "lstm").attribute(x, target=target)
    with pytest.raises(ValueError, match=r"'lstm\[5\]': element 5 is out of range"):
        attrib.LayerConductance(plain, "lstm[5]").attribute(x, target=target)
    with pytest.raises(TypeError, match=r"layer 'lstm\[1\]' output is a tuple, not a tensor"):
        attrib.LayerConductance(plain, "lstm[1]").attribute(x, target=target)
    with pytest.raises(ValueError, match=r"'lsmt' is not a submodule.*closest names: lstm"):
        attrib.LayerConductance(plain, "lsmt[0]")
    with pytest.raises(ValueError, match=r"'lstm\[0\]' picks an element .* which this method does not take"):
        attrib.LRP(plain).attribute(x, target=0, layers=["lstm[0]"])
    with pytest.raises(ValueError, match=r"'mix' is called with several inputs; select one, e.g. 'mix\[0\]'"):
        attrib.NeuronConductance(plain, "mix").attribute(x, (0,), target=target, attribute_to_neuron_input=True)
    before = model_state(plain)
    with pytest.raises(ValueError):
        attrib.LayerConductance(plain, "attn[7]").attribute(x, target=target)
    assert_unchanged(plain, before)


def test_layers_that_never_run_and_containers_are_refused_by_name():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
            self.unused = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            for block in self.blocks:
                x = torch.relu(block(x))
            return self.head(x)

    model = Blocks().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'blocks\[0\]': 'blocks' is a ModuleList, which is never called; .* 'blocks.0'"):
        attrib.LayerConductance(model, "blocks[0]")
    with pytest.raises(ValueError, match=r"'blocks' is a ModuleList"):
        attrib.LayerActivation(model, model.blocks)
    before = model_state(model)
    for method in (attrib.LayerConductance(model, "unused"), attrib.LayerGradientXActivation(model, "unused")):
        with pytest.raises(ValueError, match=r"'unused' did not run in the forward pass"):
            method.attribute(x, target=0)
    with pytest.raises(ValueError, match=r"'unused' did not run in the forward pass"):
        attrib.LayerActivation(model, "unused").attribute(x)
    assert_unchanged(model, before)
    res = attrib.LayerConductance(model, "blocks.0").attribute(x, target=1, n_steps=64)
    assert res["blocks.0"].shape == (2, 3)


def test_integer_inputs_beside_a_layers_input_are_not_parts():
    """block(h, positions): the integer positions are passed through, h alone is the layer's input."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(5, 4)

        def forward(self, h, positions):
            return h + self.table(positions)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block, self.head = nn.Linear(3, 4), Block(), nn.Linear(4, 2)

        def forward(self, x, positions):
            return self.head(torch.tanh(self.block(self.inp(x), positions)))

    torch.manual_seed(0)
    model = Model().double()
    x, positions = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 3, 4])
    ours = attrib.LayerConductance(model, "block").attribute(x, target=1, attribute_to_layer_input=True, n_steps=6,
                                                            method="riemann_trapezoid", additional_forward_args=positions)
    # h is inp's output unchanged: Captum's conductance there (Captum itself fails on the block's integer input)
    theirs = captum.LayerConductance(model, model.inp).attribute(x, target=1, n_steps=6, method="riemann_trapezoid",
                                                                 additional_forward_args=(positions,))
    assert isinstance(ours["block"], torch.Tensor)
    assert relative(ours["block"], theirs) <= TOL
