"""Interpolation at a layer (``interpolate_at=``): token models, against Captum's LayerIntegratedGradients
and, for the methods Captum has no layer-interpolating form of, against Captum on the same model cut at
the embedding (its embeddings fed as inputs, which is Captum's own recipe); float64."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attrib
from attrib import (
    IntegratedGradients,
    InternalInfluence,
    LayerConductance,
    NeuronConductance,
    NeuronIntegratedGradients,
    NoiseTunnel,
    token_scores,
)

captum_attr = pytest.importorskip("captum.attr")
TOL = 1e-8
VOCAB, T = 30, 9


class TextNet(nn.Module):
    """embedding -> conv1d -> relu -> max over time -> dense (the shape of the paper's sentiment CNN)."""

    def __init__(self, smooth: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3)
        self.relu = nn.Tanh() if smooth else nn.ReLU()
        self.fc = nn.Linear(5, 2)

    def after_embedding(self, e: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(e.transpose(1, 2)))
        return self.fc(h.amax(-1) if not isinstance(self.relu, nn.Tanh) else h.mean(-1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.after_embedding(self.embedding(ids))


class FromEmbedding(nn.Module):
    """The same network fed its embeddings: where Captum's input methods apply."""

    def __init__(self, net: TextNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net.after_embedding(e)


def _model(smooth: bool = False, seed: int = 0) -> TextNet:
    torch.manual_seed(seed)
    return TextNet(smooth).double().eval()


def _ids(seed: int = 1, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, T), generator=generator)


def _ends(model: TextNet, ids: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.embedding(ids), model.embedding(base)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_match_captum_layer_integrated_gradients(method):
    model, ids = _model(), _ids()
    base = torch.ones_like(ids)  # the unknown-word id as the baseline
    res = IntegratedGradients(model, interpolate_at="embedding").attribute(ids, target=1, baselines=base, n_steps=40,
                                                                           method=method)
    lig = captum_attr.LayerIntegratedGradients(model, model.embedding)
    expected, delta = lig.attribute(ids, base, target=1, n_steps=40, method=method, return_convergence_delta=True)
    assert set(res.attributions) == {"embedding"}
    assert (res["embedding"] - expected).abs().max() < TOL
    assert (res.delta - delta).abs().max() < TOL
    # completeness: the per-token scores add up to F(x) - F(x') minus the reported error
    totals = token_scores(res["embedding"]).sum(1)
    assert (totals - (res.outputs - res.baseline_outputs) - res.delta).abs().max() < 1e-12
    with torch.no_grad():
        assert (res.outputs - model(ids)[:, 1]).abs().max() < 1e-12
        assert (res.baseline_outputs - model(base)[:, 1]).abs().max() < 1e-12


def test_layer_methods_match_captum_on_the_embedding_inputs():
    model, ids = _model(), _ids()
    base = torch.zeros_like(ids)
    v, b = _ends(model, ids, base)
    cut = FromEmbedding(model)
    res = LayerConductance(model, ["conv", "relu"], interpolate_at="embedding").attribute(
        ids, target=0, n_steps=30, method="riemann_trapezoid")
    for name in ("conv", "relu"):
        expected = captum_attr.LayerConductance(cut, getattr(cut.net, name)).attribute(
            v, b, target=0, n_steps=30, method="riemann_trapezoid")
        assert (res[name] - expected).abs().max() < TOL
    influence = InternalInfluence(model, "conv", interpolate_at="embedding").attribute(ids, target=0, n_steps=30)
    expected = captum_attr.InternalInfluence(cut, cut.net.conv).attribute(v, b, target=0, n_steps=30)
    assert (influence["conv"] - expected).abs().max() < TOL


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_neuron_methods_match_captum_on_the_embedding_inputs(method):
    model, ids = _model(seed=3), _ids(seed=4)
    base = torch.zeros_like(ids)
    v, b = _ends(model, ids, base)
    cut = FromEmbedding(model)
    selectors = [(2, 1), (4, 3)]
    res = NeuronConductance(model, "conv", interpolate_at="embedding").attribute(ids, selectors, target=1, method=method)
    gradients = NeuronIntegratedGradients(model, "conv", interpolate_at="embedding").attribute(ids, selectors, method=method)
    for i, selector in enumerate(selectors):
        expected = captum_attr.NeuronConductance(cut, cut.net.conv).attribute(v, selector, b, target=1, method=method)
        assert (res["embedding"][i] - expected).abs().max() < TOL
        expected = captum_attr.NeuronIntegratedGradients(cut, cut.net.conv).attribute(v, selector, b, method=method)
        assert (gradients["embedding"][i] - expected).abs().max() < TOL
    # NeuronIntegratedGradients is complete against the unit's own change between the two ends
    with torch.no_grad():
        units = model.conv(v.transpose(1, 2)), model.conv(b.transpose(1, 2))
    change = torch.stack([units[0][:, c, t] - units[1][:, c, t] for c, t in selectors])
    assert (gradients.outputs - gradients.baseline_outputs - change).abs().max() < 1e-12


def test_noise_tunnel_adds_the_noise_at_the_layer_like_captum_on_the_embeddings():
    model, ids = _model(), _ids()
    base = torch.zeros_like(ids)
    v, b = _ends(model, ids, base)
    torch.manual_seed(11)
    res = NoiseTunnel(IntegratedGradients(model, interpolate_at="embedding")).attribute(
        ids, nt_type="smoothgrad", nt_samples=4, stdevs=0.2, target=1, n_steps=20)
    torch.manual_seed(11)
    expected = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(FromEmbedding(model))).attribute(
        v, nt_type="smoothgrad", nt_samples=4, stdevs=0.2, target=1, n_steps=20, baselines=b)
    assert (res["embedding"] - expected).abs().max() < TOL
    # the mean map's completeness error is the mean of the noisy samples' errors
    assert (res.delta - res.info["sample_deltas"].mean(1)).abs().max() < 1e-12


def test_several_inputs_and_forward_arguments_are_held_at_the_inputs():
    class Weighted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, ids, weights, scale):
            e = self.embedding(ids) * weights.unsqueeze(-1)  # a float input beside the token ids
            return self.fc(torch.tanh(e).sum(1)) * scale

    torch.manual_seed(0)
    model = Weighted().double().eval()
    ids = _ids()
    weights = torch.rand(3, T, dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).unsqueeze(1)
    base = (torch.zeros_like(ids), weights)
    res = IntegratedGradients(model, interpolate_at="embedding").attribute(
        (ids, weights), target=2, baselines=base, additional_forward_args=scale, n_steps=30)
    expected = captum_attr.LayerIntegratedGradients(model, model.embedding).attribute(
        (ids, weights), base, target=2, additional_forward_args=scale, n_steps=30)
    assert (res["embedding"] - expected).abs().max() < TOL


def test_conductance_of_the_interpolated_layer_is_its_integrated_gradients_and_layers_share_the_sweep():
    model, ids = _model(), _ids()
    lc = LayerConductance(model, ["embedding", "conv"], interpolate_at="embedding")
    both = lc.attribute(ids, target=1, n_steps=16)
    ig = IntegratedGradients(model, interpolate_at="embedding").attribute(ids, target=1, n_steps=16,
                                                                         method="stieltjes_trapezoid")
    assert (both["embedding"] - ig["embedding"]).abs().max() < 1e-12
    alone = LayerConductance(model, "conv", interpolate_at="embedding").attribute(ids, target=1, n_steps=16)
    assert (both["conv"] - alone["conv"]).abs().max() < 1e-12
    chunked = lc.attribute(ids, target=1, n_steps=16, internal_batch_size=2)
    for name in ("embedding", "conv"):
        assert (chunked[name] - both[name]).abs().max() < 1e-12
    # completeness: each layer adds up to the same change, and a smooth model converges fast
    for name in ("embedding", "conv"):
        assert (both[name].flatten(1).sum(1) - (both.outputs - both.baseline_outputs) - both.delta[name]).abs().max() < 1e-12
    smooth = _model(smooth=True)
    res = IntegratedGradients(smooth, interpolate_at="embedding").attribute(ids, target=1, n_steps=20)
    assert res.delta.abs().max() < 1e-8


def test_layer_baselines_are_the_path_start_at_the_layer():
    model, ids = _model(), _ids()
    unknown = torch.ones_like(ids)
    _, b = _ends(model, ids, unknown)
    ig = IntegratedGradients(model, interpolate_at="embedding")
    from_ids = ig.attribute(ids, target=1, baselines=unknown)
    from_values = ig.attribute(ids, target=1, layer_baselines=b)
    from_one = ig.attribute(ids, target=1, layer_baselines=b[:1])  # one example's shape, repeated
    assert (from_ids["embedding"] - from_values["embedding"]).abs().max() < 1e-12
    assert (from_ids["embedding"] - from_one["embedding"]).abs().max() < 1e-12
    zero = ig.attribute(ids, target=1, layer_baselines=0.0)
    expected = captum_attr.IntegratedGradients(FromEmbedding(model)).attribute(_ends(model, ids, ids)[0], 0.0, target=1)
    assert (zero["embedding"] - expected).abs().max() < TOL
    assert (ig.compute_convergence_delta(from_ids.attributions, unknown, ids, target=1) - from_ids.delta).abs().max() < 1e-12


def test_recurrent_and_transformer_models_match_captum():
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 5)
            self.lstm = nn.LSTM(5, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids):
            out, _ = self.lstm(self.embedding(ids))
            return self.fc(out[:, -1])

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 8)
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.fc = nn.Linear(8, 2)

        def forward(self, ids):
            return self.fc(self.encoder(self.embedding(ids)).mean(1))

    ids = _ids()
    for cls in (Recurrent, Encoder):
        torch.manual_seed(0)
        model = cls().double().eval()
        res = IntegratedGradients(model, interpolate_at="embedding").attribute(ids, target=0, n_steps=24)
        expected, delta = captum_attr.LayerIntegratedGradients(model, model.embedding).attribute(
            ids, target=0, n_steps=24, return_convergence_delta=True)
        assert (res["embedding"] - expected).abs().max() < TOL, cls.__name__
        assert (res.delta - delta).abs().max() < TOL, cls.__name__


def test_bad_arguments_name_the_argument_and_leave_the_model_clean():
    model, ids = _model(), _ids()
    ig = IntegratedGradients(model, interpolate_at="embedding")
    with pytest.raises(ValueError, match=r"baselines: the inputs are torch.int64 .* whole number"):
        ig.attribute(ids, target=1, baselines=0.5)
    with pytest.raises(ValueError, match=r"baselines and layer_baselines: .* not both"):
        ig.attribute(ids, target=1, baselines=0, layer_baselines=0.0)
    with pytest.raises(ValueError, match=r"layer_baselines of shape \(3, 9, 5\) do not match the output of layer 'embedding'"):
        ig.attribute(ids, target=1, layer_baselines=torch.zeros(3, T, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"interpolate_at: 'embeding' is not a submodule .* closest names: embedding"):
        IntegratedGradients(model, interpolate_at="embeding")
    with pytest.raises(ValueError, match=r"layer_baselines: the path is at the inputs; give interpolate_at="):
        IntegratedGradients(model).attribute(ids.double(), target=1, layer_baselines=0.0)
    with pytest.raises(TypeError, match=r"inputs are torch.int64: .* interpolate_at="):
        IntegratedGradients(model).attribute(ids, target=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers: 'embedding' does not depend on interpolate_at layer 'conv'"):
        LayerConductance(model, ["embedding"], interpolate_at="conv").attribute(ids, target=1)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 4)

        def forward(self, ids):
            return self.embedding(ids.t()).sum((0, 2)).unsqueeze(1)

    with pytest.raises(ValueError, match=r"interpolate_at: layer 'embedding' gave shape \(9, 6, 4\) for 6 rows; its first "
                                         r"dimension must be the batch"):
        IntegratedGradients(SequenceFirst().double(), interpolate_at="embedding").attribute(ids, target=0)


def test_token_scores_refuses_maps_without_an_embedding_dimension():
    with pytest.raises(ValueError, match=r"attributions: need \(B, T, E\)"):
        token_scores(torch.zeros(2, 3))
    assert attrib.token_scores(torch.ones(2, 3, 4)).sum() == 24


def test_more_bad_input_is_refused_by_name():
    model, ids = _model(), _ids()
    ig = IntegratedGradients(model, interpolate_at="embedding")
    with pytest.raises(ValueError, match=r"inputs: the model fails on the inputs or the baselines before layer 'embedding' "
                                         r"\(IndexError"):
        ig.attribute(torch.full_like(ids, VOCAB + 5), target=1)
    with pytest.raises(ValueError, match=r"inputs: the model fails"):
        ig.attribute(ids, target=1, baselines=VOCAB + 5)
    with pytest.raises(ValueError, match=r"layer_baselines must be a finite number"):
        ig.attribute(ids, target=1, layer_baselines=float("nan"))
    with pytest.raises(ValueError, match=r"layer_noise contains NaN"):
        ig.attribute(ids, target=1, layer_noise=torch.full((3, T, 6), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"layer_noise: the noise tunnel draws the noise"):
        NoiseTunnel(ig).attribute(ids, target=1, layer_noise=torch.zeros(3, T, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"stdevs: the noise goes on layer 'embedding'"):
        NoiseTunnel(ig).attribute(ids, target=1, stdevs=(0.1, 0.1))
    with pytest.raises(ValueError, match=r"start_point: the inputs are torch.int64 .* whole number"):
        ig.compute_convergence_delta(torch.zeros(3, T, 6), 0.5, ids, target=1)
    # a captured layer with an integer value (the embedding's input: the ids) cannot change along the path
    with pytest.raises(ValueError, match=r"layers: 'embedding' does not depend on interpolate_at layer 'embedding'"):
        InternalInfluence(model, "embedding", interpolate_at="embedding").attribute(ids, target=1, attribute_to_layer_input=True)

    class Twice(nn.Module):  # one embedding for two inputs: its output is ambiguous
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, a, b):
            return (self.embedding(a) * self.embedding(b)).sum((1, 2)).unsqueeze(1)

    twice = Twice().double().eval()
    with pytest.raises(ValueError, match=r"interpolate_at: module 'embedding' runs 2 times"):
        IntegratedGradients(twice, interpolate_at="embedding").attribute((ids, ids), target=0)
    with pytest.raises(ValueError, match=r"interpolate_at: 'unused' did not run"):
        IntegratedGradients(twice, interpolate_at="unused").attribute((ids, ids), target=0)


def test_sequence_first_outputs_are_refused_even_when_sizes_coincide():
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 4)
            self.lstm = nn.LSTM(4, 5)  # sequence first: (T, B, H)
            self.fc = nn.Linear(5, 2)

        def forward(self, ids):
            out, _ = self.lstm(self.embedding(ids).transpose(0, 1))
            return self.fc(out[-1])

    torch.manual_seed(0)
    model = SequenceFirst().double().eval()
    ids = _ids(batch=3)[:, :6]  # T = 6 = 2 B: the first pass's output (6, 6, 5) looks batch-first
    with pytest.raises(ValueError, match=r"interpolate_at: layer 'lstm\[0\]' gave shape \(6, 1, 5\) for 1 row"):
        IntegratedGradients(model, interpolate_at="lstm[0]").attribute(ids, target=0, internal_batch_size=6)


def test_dropout_inside_attention_in_training_mode_is_refused():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True).double()
    layer.eval()
    layer.self_attn.train()  # nn.MultiheadAttention applies its dropout itself
    with pytest.raises(ValueError, match=r"model: 'self_attn' is in training mode"):
        IntegratedGradients(layer).attribute(torch.randn(2, 3, 8, dtype=torch.float64), target=(0, 0))
