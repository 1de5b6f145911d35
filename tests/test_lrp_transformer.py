"""LRP for transformers: AttnLRP's and CP-LRP's rules against dense re-implementations of their formulas,
conservation on a bias-free configuration, and both composites on torchvision's ViT and nn.TransformerEncoder
as shipped; float64."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from attrib import LRP, explicit_attention
from attrib.attention import AttentionContext, AttentionScores
from attrib.lrp import Composite
from attrib.lrp.rules import ConstantFirst, Epsilon, LayerNormRule, Norm, SoftmaxRule, UniformProduct, stab
from attrib.lrp.views import view_of

torch.manual_seed(0)


def _random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_rule_is_its_formula(affine):
    norm = nn.LayerNorm(5, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x, relevance, eps = _random(3, 5), _random(3, 5), 1e-3
    found = LayerNormRule(eps).relevance(view_of(norm), x, None, relevance)
    expected = torch.empty_like(x)
    centring = torch.eye(5, dtype=torch.float64) - 1 / 5  # c = C x
    for row in range(3):
        c = centring @ x[row]
        n = c / (c.pow(2).mean() + norm.eps).sqrt()
        y = n * norm.weight + norm.bias if affine else n
        r_n = (n * norm.weight if affine else n) * relevance[row] / stab(y, eps) if affine else relevance[row]
        # LRP-epsilon through the centring map: R_j = sum_k x_j C_kj R_k / stab(c_k)
        expected[row] = torch.stack([sum(x[row, j] * centring[k, j] * r_n[k] / stab(c[k:k + 1], eps)[0] for k in range(5))
                                     for j in range(5)])
    assert (found - expected).abs().max() < 1e-12


def test_softmax_rule_is_the_taylor_term_at_the_input():
    softmax = nn.Softmax(dim=-1)
    x, relevance = _random(2, 4), _random(2, 4)
    z = softmax(x)
    found = SoftmaxRule().relevance(view_of(softmax), x, z, relevance)
    for row in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda t: torch.softmax(t, -1), x[row])  # d s_j / d x_i at [j, i]
        expected = x[row] * (jacobian.T @ (relevance[row] / z[row]))  # R_i = x_i sum_j (ds_j/dx_i) R_j / s_j
        assert (found[row] - expected).abs().max() < 1e-12
    masked = x.clone()
    masked[0, 1] = float("-inf")
    assert SoftmaxRule().relevance(view_of(softmax), masked, softmax(masked), relevance)[0, 1] == 0


def test_product_rules_share_every_term_between_its_two_factors():
    scores, context = AttentionScores(0.5), AttentionContext()
    q, k, relevance, eps = _random(2, 3, 4), _random(2, 5, 4), _random(2, 3, 5), 1e-3
    z = scores(q, k)
    r_q, r_k = UniformProduct(eps).relevance_pair(scores.forward, q, k, z, relevance)
    share = relevance / stab(z, eps)
    terms = 0.5 * q.unsqueeze(2) * k.unsqueeze(1) * share.unsqueeze(-1)  # (B, L, S, d): each term q_id k_sd / 2 ... / stab(z_ls)
    assert (r_q - 0.5 * terms.sum(2)).abs().max() < 1e-12
    assert (r_k - 0.5 * terms.sum(1)).abs().max() < 1e-12
    weights, v, relevance = torch.softmax(_random(2, 3, 5), -1), _random(2, 5, 4), _random(2, 3, 4)
    z = context(weights, v)
    share = relevance / stab(z, eps)
    terms = weights.unsqueeze(-1) * v.unsqueeze(1) * share.unsqueeze(2)  # (B, L, S, d): w_ls v_sd R_ld / stab(z_ld)
    r_w, r_v = UniformProduct(eps).relevance_pair(context.forward, weights, v, z, relevance)
    assert (r_w - 0.5 * terms.sum(-1)).abs().max() < 1e-12 and (r_v - 0.5 * terms.sum(1)).abs().max() < 1e-12
    r_w, r_v = ConstantFirst(eps).relevance_pair(context.forward, weights, v, z, relevance)
    assert r_w.abs().max() == 0 and (r_v - terms.sum(1)).abs().max() < 1e-12


class BiasFree(nn.Module):
    """Embeddings in, two bias-free encoder layers, a bias-free linear head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, bias=False)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_cp_lrp_is_conservative_without_biases_and_attnlrp_loses_only_at_the_softmax():
    torch.manual_seed(0)
    model = BiasFree().double().eval()
    x = _random(2, 5, 8)
    block = "encoder.layers.0"
    res = LRP(model, "cp_lrp").attribute(x, target=1, layers=[block])
    eps_free = LRP(model, Composite(types=[((nn.Linear,), Epsilon(0)), ((nn.LayerNorm,), LayerNormRule(0)),
                                           *_cp_rules(0.0)], addition_rule=Norm(0), name="cp_lrp_0")).attribute(
        x, target=1, layers=[block])
    for found in (res, eps_free):
        total = found.attributions.flatten(1).sum(1)
        tolerance = 1e-4 if found is res else 1e-10  # epsilon 1e-6 absorbs a little; 0 nothing
        assert (total - found.outputs).abs().max() < tolerance * found.outputs.abs().max()
        # the relevance at a hidden block is what arrives below it
        assert (found.layers[block].flatten(1).sum(1) - total).abs().max() < tolerance * found.outputs.abs().max()
    attn = LRP(model, Composite(types=[((nn.Linear,), Epsilon(0)), ((nn.LayerNorm,), LayerNormRule(0)),
                                       (nn.Softmax, SoftmaxRule()), ((AttentionScores, AttentionContext), UniformProduct(0))],
                                addition_rule=Norm(0), name="attnlrp_0")).attribute(x, target=1)
    for row in attn.info["conservation"].rows:
        if "softmax" not in row.name:
            assert (row.entering - row.leaving).abs().max() < 1e-10, row.name
    assert any("softmax" in row.name and (row.entering - row.leaving).abs().max() > 1e-6
               for row in attn.info["conservation"].rows)


def _cp_rules(epsilon: float) -> list:
    from attrib.lrp.rules import Blocked

    return [(nn.Softmax, Blocked()), (AttentionContext, ConstantFirst(epsilon)), (AttentionScores, UniformProduct(epsilon))]


def test_both_composites_run_on_torchvisions_vit_and_leave_it_as_it_was():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                                                 mlp_dim=16, num_classes=3).double().eval()
    with torch.no_grad():  # torchvision starts the head and the class token at zero: no relevance would pass or stay
        model.heads.head.weight.normal_(0, 0.5)
        model.class_token.normal_()
    x = _random(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    names = [name for name, _ in model.named_modules()]
    for composite in ("attnlrp", "cp_lrp"):
        res = LRP(model, composite).attribute(x, target=1)
        report = res.info["conservation"]
        rows = {row.name: row for row in report.rows}
        assert "encoder.layers.encoder_layer_1.self_attention.softmax" in rows
        # where relevance is absorbed, row by row: also by the class token and the position embedding
        assert (sum(row.difference for row in report.rows) - report.total_difference).abs().max() < 1e-10
        assert rows["cat (class_token)"].difference.abs().min() > 0
        assert rows["encoder.add (encoder.pos_embedding)"].difference.abs().min() > 0
        assert torch.isfinite(res.attributions).all() and res.attributions.abs().sum() > 0
        assert (res.outputs - before[:, 1]).abs().max() < 1e-12
    with torch.no_grad():
        assert (model(x) - before).abs().max() == 0
    assert [name for name, _ in model.named_modules()] == names  # the explicit attention is gone again
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with pytest.raises(ValueError, match=r"LRP has no rule for layer 'encoder.layers.encoder_layer_0.ln_1' \(LayerNorm\)"):
        LRP(model, Composite(types=[((nn.Linear, nn.Conv2d), Epsilon())])).attribute(x, target=1)
    with explicit_attention(model):  # the taps are layers LRP can record
        tap = "encoder.layers.encoder_layer_1.self_attention.heads"
        res = LRP(model, "cp_lrp").attribute(x, target=1, layers=[tap])
    assert res.layers[tap].shape == (2, 5, 8)


class _Tokens(nn.Module):
    """Tokens from a linear map, a learned position embedding added, a class token in front, a linear read-out."""

    def __init__(self, cat: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.pos = nn.Parameter(torch.randn(3, 4))
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.cat = cat
        self.out = nn.Linear(16 if cat else 12, 2, bias=False)

    def forward(self, x):
        tokens = self.embed(x) + self.pos
        if self.cat:
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.out(tokens.flatten(1))


@pytest.mark.parametrize("cat", [False, True])
def test_a_position_embedding_and_a_class_token_keep_their_shares_and_the_report_shows_them(cat):
    torch.manual_seed(1)
    model = _Tokens(cat).double().eval()
    x = _random(2, 3, 4)
    composite = Composite(types=[(nn.Linear, Epsilon(0))], addition_rule=Norm(1e-6), name="eps0")
    res = LRP(model, composite).attribute(x, target=1, layers=["embed"])
    with torch.no_grad():
        embedded = model.embed(x)
        tokens = embedded + model.pos
        read = torch.cat([model.cls.expand(2, -1, -1), tokens], 1) if cat else tokens
    # LRP-0 without a bias at the read-out: R_j = a_j w_j for the target's row
    at_read = read * model.out.weight[1].reshape(read.shape[1:])
    at_tokens = at_read[:, 1:] if cat else at_read
    expected = embedded * at_tokens / stab(tokens, 1e-6)  # the position embedding keeps pos * R / stab(z)
    assert (res.layers["embed"] - expected).abs().max() < 1e-12
    rows = {row.name: row for row in res.info["conservation"].rows}
    added = rows["add (pos)"]
    assert added.kind == "add constant"
    # what leaves is the embedding's share: the position embedding's share (and epsilon's) stays
    assert (added.difference - (expected - at_tokens).detach().flatten(1).sum(1)).abs().max() < 1e-12
    assert ((model.pos * at_tokens / stab(tokens, 1e-6)).flatten(1).sum(1) + added.difference).abs().max() < 1e-5
    if cat:
        joined = rows["cat (cls)"]
        assert joined.kind == "cat constant"
        assert (joined.difference + at_read[:, 0].detach().sum(1)).abs().max() < 1e-12
    # every bit of relevance is accounted for by the rows
    report = res.info["conservation"]
    assert (sum(row.difference for row in report.rows) - report.total_difference).abs().max() < 1e-12
    assert all(p.requires_grad for p in model.parameters())  # frozen only while the forward pass ran


def test_the_transformer_composites_put_zbox_on_the_first_layer_only_when_given_bounds():
    import inspect

    from attrib.lrp import COMPOSITES, ZBox

    for name in ("attnlrp", "cp_lrp"):
        assert {"low", "high"} <= set(inspect.signature(COMPOSITES[name]).parameters)
        assert COMPOSITES[name]().first is None
        first = COMPOSITES[name](low=-1.0, high=2.0).first
        assert isinstance(first, ZBox) and (first.low, first.high) == (-1.0, 2.0)
        with pytest.raises(ValueError, match="low and high: give both or neither"):
            COMPOSITES[name](low=-1.0)


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
def test_attnlrp_on_rmsnorm_gelu_and_silu_is_the_dense_epsilon_rule_with_identities():
    """RMSNorm (no centring, no bias) and GELU/SiLU pass relevance unchanged under AttnLRP; the Linear layers
    share it by LRP-0 (epsilon 0, no biases): the whole map against a dense re-implementation."""
    from attrib.lrp import COMPOSITES

    torch.manual_seed(3)
    l1, norm, l2, l3 = nn.Linear(6, 5, bias=False), nn.RMSNorm(5), nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(l1, norm, nn.GELU(), l2, nn.SiLU(), l3).double().eval()
    x = _random(2, 6)
    res = LRP(model, COMPOSITES["attnlrp"](epsilon=0.0)).attribute(x, target=2)
    with torch.no_grad():
        z1 = l1(x)
        a1 = torch.nn.functional.gelu(norm(z1))
        z2 = l2(a1)
        a2 = torch.nn.functional.silu(z2)
        relevance = a2 * l3.weight[2]                  # LRP-0 at the last layer, starting from the score
        relevance = a1 * ((relevance / z2) @ l2.weight)  # SiLU: identity; then LRP-0 through l2
        expected = x * ((relevance / z1) @ l1.weight)    # GELU and RMSNorm: identities; then LRP-0 through l1
    assert (res.attributions - expected).abs().max() < 1e-12 * expected.abs().max()
    rows = {row.name: row for row in res.info["conservation"].rows}
    for name in ("1", "2", "4"):  # RMSNorm, GELU, SiLU
        assert (rows[name].entering - rows[name].leaving).abs().max() < 1e-12, name


class _Normalised(nn.Module):
    """A small CNN behind an input normalisation, written either as ``(x - mean) / std`` or ``x * scale + shift``."""

    def __init__(self, as_addition: bool) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).reshape(1, 3, 1, 1))
        self.as_addition = as_addition

    def forward(self, x):
        if self.as_addition:
            return self.net(x * (1 / self.std) + (-self.mean / self.std))
        return self.net((x - self.mean) / self.std)


def test_a_constant_added_before_the_first_layer_is_not_a_bias_and_the_model_is_left_as_it_was():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps = [LRP(_Normalised(addition).double().eval(), "epsilon").attribute(x, target=1).attributions for addition in (0, 1)]
    assert (maps[0] - maps[1]).abs().max() < 1e-12 * maps[0].abs().max()  # however the normalisation is written


class _Writes(nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))
        self.p = nn.Parameter(torch.zeros(3))
        self.target = target

    def forward(self, x):
        self.calls.add_(1)  # a buffer the model updates itself: its business, as in any forward pass
        h = self.l1(x)
        if self.target == "parameter":
            q = self.p
            q += h.mean(0)  # writes into its own parameter
        return self.l2(h + self.p)


def test_a_forward_that_updates_a_buffer_runs_and_one_that_writes_a_parameter_is_refused_by_name():
    x = _random(2, 3)
    model = _Writes("buffer").double()
    res = LRP(model, "epsilon").attribute(x, target=0)
    assert float(model.calls) == 1 and all(p.requires_grad and p.is_leaf for p in model.parameters())
    assert "add (p)" in {row.name for row in res.info["conservation"].rows}
    with pytest.raises(ValueError, match=r"wrote into the parameter 'p' in place"):
        LRP(_Writes("parameter").double(), "epsilon").attribute(x, target=0)


class _Windows(nn.Module):
    """A layer run on a batch-major split of the batch (as Swin runs attention on windows), and a legacy empty
    part concatenated (skipped by torch.cat)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(6, 5), nn.Linear(20, 2)

    def forward(self, x):
        windows = self.inner(x.reshape(x.shape[0] * 2, 2, 6)).reshape(x.shape[0], 4, 5)
        return self.out(torch.cat([torch.tensor([], dtype=x.dtype), windows.flatten(1)], 1))


def test_rows_of_a_layer_run_on_windows_are_per_example_and_still_account_for_everything():
    torch.manual_seed(5)
    model = _Windows().double().eval()
    x = _random(3, 4, 6)
    report = LRP(model, "epsilon").attribute(x, target=1).info["conservation"]
    assert {row.name for row in report.rows} == {"inner", "out"}
    for row in report.rows:
        assert row.entering.shape == (3,) and row.leaving.shape == (3,), row.name
    assert (sum(row.difference for row in report.rows) - report.total_difference).abs().max() < 1e-12
