"""Hooks: capture, edit, reuse detection; nothing left behind, also when the forward raises."""
import pytest
import torch
import torchvision
from conftest import assert_unchanged, make_cnn, model_state
from torch import nn

import attrib
from attrib.hooks import LayerReuseError, capture, mask, resolve_layers


class Functional(nn.Module):
    """Functional ops between modules, an in-place ReLU, and a reused module."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(4, 2)

    def forward(self, x, reuse=False):
        h = self.act(self.a(x) * 2.0 + 1.0)
        if reuse:
            h = self.act(h - 0.5)
        return self.b(torch.tanh(h))


def test_capture_output_and_input_match_a_manual_forward():
    torch.manual_seed(0)
    model = Functional().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with capture(model, ["a", model.b]) as out_cap:
        y = model(x)
    with capture(model, ["b"], on="input") as in_cap:
        model(x)
    a_out = x @ model.a.weight.T + model.a.bias
    assert torch.equal(out_cap["a"], a_out)  # a clone flowed on: the in-place ReLU did not touch it
    hidden = torch.tanh(torch.relu(a_out * 2.0 + 1.0))
    assert torch.equal(in_cap["b"], hidden)
    assert torch.equal(out_cap["b"], y)


def test_edit_and_mask_change_what_flows_on():
    torch.manual_seed(0)
    model = Functional().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    with capture(model, ["a"], edit={"a": mask(keep)}):
        y = model(x)
    expected = model.b(torch.tanh(torch.relu(model.a(x) * keep * 2.0 + 1.0)))
    assert torch.allclose(y, expected, rtol=0, atol=0)
    with capture(model, ["b"], on="input", edit={"b": lambda t: torch.zeros_like(t)}):
        assert torch.equal(model(x), model.b.bias.expand(3, 2))


def test_reused_module_is_reported_clearly():
    model = Functional().double()
    with pytest.raises(LayerReuseError, match="'act' runs 2 times"):
        with capture(model, ["act"]):
            model(torch.randn(2, 4, dtype=torch.float64), reuse=True)


def test_torchvision_resnet_reused_relu_is_reported():
    model = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(ValueError, match="layer1.0.relu"):
        attrib.LayerConductance(model, "layer1.0.relu").attribute(torch.rand(1, 3, 32, 32), target=0, n_steps=2)


def test_unknown_layer_lists_closest_names():
    model = make_cnn()
    with pytest.raises(ValueError, match=r"closest names: .*'?1'?"):
        resolve_layers(model, "10")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layers(model, nn.ReLU())


def test_hooks_removed_and_model_unchanged_after_forward_raises():
    model = make_cnn()
    model[3].register_forward_pre_hook(lambda m, a: None)  # the user's own hook must survive
    before = model_state(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    boom = nn.Module()

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = model[4].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        attrib.LayerConductance(model, ["0", "3"]).attribute(x, target=1, n_steps=3)
    handle.remove()
    assert_unchanged(model, before)
    del boom


def test_buffers_training_and_requires_grad_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    model[2].weight.requires_grad_(False)
    before = model_state(model)
    with capture(model, ["1"]):
        model.train()  # user code inside the context flips modes and updates running stats
        model(torch.randn(5, 3, dtype=torch.float64))
        model[0].weight.requires_grad_(False)
    assert_unchanged(model, before)


def test_training_mode_batchnorm_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="model.eval"):
        attrib.IntegratedGradients(model).attribute(torch.randn(2, 3, dtype=torch.float64), target=0)


def test_graph_starts_at_the_lowest_layer():
    """Layer methods never need dF/dx: the captured layer is a leaf, nothing below keeps a graph."""
    model = make_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    from attrib.sweep import sweep

    chunks = sweep(model, (x,), (torch.zeros_like(x),), torch.tensor([0.5, 1.0], dtype=torch.float64), target=0, layers=["3"])
    seen = []
    import attrib.sweep as engine

    original = engine._gradients

    def spy(scores, tensors):
        seen.append({name: (t.is_leaf, t.requires_grad) for name, t in tensors.items()})
        return original(scores, tensors)

    engine._gradients = spy
    try:
        list(chunks)
    finally:
        engine._gradients = original
    assert len(seen) == 2 and all(s == {"3": (True, True)} for s in seen)  # the memory probe's row, then the rest
