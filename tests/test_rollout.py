"""Attention rollout: against a dense re-implementation from the paper's formula over the weights that PyTorch's
own nn.MultiheadAttention reports on each block's input (a tiny random torchvision ViT and a token transformer
with batch_first=False), closed forms (uniform attention, identity attention, hand-computed 2- and 3-token cases),
its axioms (rows of the rolled-out matrix sum to 1, examples independent, the model left as it was), the patch
order of patches_to_image against torchvision's own tokens, and errors that name the argument."""
import functools

import pytest
import torch
import torchvision
from torch import nn

from attrib import InputError, InputTypeError, attention_rollout, patches_to_image
from attrib.rollout import rollout_matrix

BLOCKS = 3


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=BLOCKS, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=3)
    with torch.no_grad():  # torchvision starts the position embedding small; larger makes the attention less uniform
        vit.encoder.pos_embedding.normal_(0, 1.0)
    return vit.double().eval()


def block_inputs(vit: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What each block's self_attention reads (its ln_1 output), with plain forward hooks."""
    seen: list[torch.Tensor] = []
    handles = [layer.ln_1.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for layer in vit.encoder.layers]
    try:
        with torch.no_grad():
            vit(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def torch_weights(vit: nn.Module, x: torch.Tensor, average: bool = True) -> list[torch.Tensor]:
    """PyTorch's own attention weights per block, on the block's input: (B, L, L) averaged, or (B, H, L, L)."""
    with torch.no_grad():
        return [layer.self_attention(h, h, h, need_weights=True, average_attn_weights=average)[1]
                for layer, h in zip(vit.encoder.layers, block_inputs(vit, x))]


def dense_rollout(fused: list[torch.Tensor]) -> torch.Tensor:
    """The paper's formula on (B, L, L) matrices: A' = (0.5 A + 0.5 I) with rows renormalised, A'_last ... A'_first."""
    eye = torch.eye(fused[0].shape[-1], dtype=fused[0].dtype)
    mixed = []
    for a in fused:
        m = 0.5 * a + 0.5 * eye
        mixed.append(m / m.sum(-1, keepdim=True))
    return functools.reduce(lambda rolled, m: torch.einsum("bij,bjk->bik", m, rolled), mixed[1:], mixed[0])


def test_matches_the_dense_formula_over_pytorchs_own_attention_weights():
    vit = tiny_vit()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = dense_rollout(torch_weights(vit, x))[:, 0, 1:]
    got = attention_rollout(vit, x)
    assert got.shape == (3, 16)
    assert torch.allclose(got, expected, atol=1e-13, rtol=0)
    assert float(expected.std()) > 1e-3  # not a uniform map, so the comparison tells something


def test_max_and_min_head_fusion_match_the_dense_formula_over_pytorchs_per_head_weights():
    vit = tiny_vit(2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    per_head = torch_weights(vit, x, average=False)
    for fusion, reduce in (("max", lambda w: w.amax(1)), ("min", lambda w: w.amin(1))):
        expected = dense_rollout([reduce(w) for w in per_head])[:, 0, 1:]
        assert torch.allclose(attention_rollout(vit, x, head_fusion=fusion), expected, atol=1e-13, rtol=0)


def test_discard_ratio_matches_a_row_by_row_dense_version():
    vit = tiny_vit(4)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ratio = 0.5
    fused = []
    for a in torch_weights(vit, x):
        a = a.clone()
        drop = int(ratio * a.shape[-1])  # 17 tokens: the 8 smallest of every row
        for b in range(a.shape[0]):
            for i in range(a.shape[1]):
                threshold = sorted(a[b, i].tolist())[drop - 1]
                a[b, i][a[b, i] <= threshold] = 0.0
        fused.append(a)
    expected = dense_rollout(fused)[:, 0, 1:]
    assert torch.allclose(attention_rollout(vit, x, discard_ratio=ratio), expected, atol=1e-13, rtol=0)


def test_uniform_attention_has_the_closed_form():
    # a zero query projection makes every score 0, so every block attends uniformly: A = U = 11^T / L.
    # (0.5 I + 0.5 U)^n = 0.5^n I + (1 - 0.5^n) U, since U^2 = U: every other token gets (1 - 0.5^n) / L.
    vit = tiny_vit(6)
    with torch.no_grad():
        for layer in vit.encoder.layers:
            width = layer.self_attention.embed_dim
            layer.self_attention.in_proj_weight[:width] = 0.0
            layer.self_attention.in_proj_bias[:width] = 0.0
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    tokens = 17
    expected = (1 - 0.5 ** BLOCKS) / tokens
    got = attention_rollout(vit, x)
    assert torch.allclose(got, torch.full_like(got, expected), atol=1e-15, rtol=0)
    assert abs(float(got.sum(1)[0]) + 0.5 ** BLOCKS + (1 - 0.5 ** BLOCKS) / tokens - 1) < 1e-14  # + the class token's own


def test_identity_attention_rolls_out_to_the_identity():
    eye = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5)
    for fusion in ("mean", "max", "min"):
        assert torch.equal(rollout_matrix([eye] * 4, head_fusion=fusion), torch.eye(5, dtype=torch.float64).expand(2, 5, 5))


def test_two_tokens_by_hand():
    # head 1 attends to token 0, head 2 to token 1, from both tokens
    heads = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]], dtype=torch.float64)
    # mean: [[.5, .5], [.5, .5]] -> A' = [[.75, .25], [.25, .75]]; two blocks: [[.625, .375], [.375, .625]]
    assert torch.allclose(rollout_matrix([heads]), torch.tensor([[[0.75, 0.25], [0.25, 0.75]]], dtype=torch.float64))
    assert torch.allclose(rollout_matrix([heads, heads]), torch.tensor([[[0.625, 0.375], [0.375, 0.625]]], dtype=torch.float64))
    # max: [[1, 1], [1, 1]] -> 0.5 A + 0.5 I = [[1, .5], [.5, 1]], rows renormalised: [[2/3, 1/3], [1/3, 2/3]]
    assert torch.allclose(rollout_matrix([heads], head_fusion="max"),
                          torch.tensor([[[2 / 3, 1 / 3], [1 / 3, 2 / 3]]], dtype=torch.float64))
    # min: all 0 -> the identity
    assert torch.equal(rollout_matrix([heads], head_fusion="min"), torch.eye(2, dtype=torch.float64).unsqueeze(0))


def test_discard_by_hand():
    a = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]], dtype=torch.float64)
    # discard_ratio 0.4: floor(1.2) = 1 weight per row, the smallest (a tie goes to the lower index):
    # [.5, .3, 0] -> 0.5 A + 0.5 I = [.75, .15, 0] / .9 ; [0, .6, .3] -> [0, .8, .15] / .95 ; [0, .25, .5] -> [0, .125, .75] / .875
    expected = torch.tensor([[[0.75 / 0.9, 0.15 / 0.9, 0.0], [0.0, 0.8 / 0.95, 0.15 / 0.95], [0.0, 0.125 / 0.875, 0.75 / 0.875]]],
                            dtype=torch.float64)
    assert torch.allclose(rollout_matrix([a], discard_ratio=0.4), expected, atol=1e-15, rtol=0)
    assert torch.equal(rollout_matrix([a], discard_ratio=0.3), rollout_matrix([a]))  # floor(0.9) = 0: nothing discarded


def test_rows_sum_to_one_and_the_scores_are_the_class_row_less_its_own_share():
    generator = torch.Generator().manual_seed(8)
    blocks = [torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=generator).softmax(-1) for _ in range(5)]
    for fusion in ("mean", "max", "min"):
        for ratio in (0.0, 0.5):
            rolled = rollout_matrix(blocks, discard_ratio=ratio, head_fusion=fusion)
            assert torch.allclose(rolled.sum(-1), torch.ones(2, 6, dtype=torch.float64), atol=1e-14, rtol=0)
            assert float(rolled.min()) >= 0.0
    vit = tiny_vit(9)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=generator)
    scores = attention_rollout(vit, x)
    own = dense_rollout(torch_weights(vit, x))[:, 0, 0]
    assert torch.allclose(scores.sum(1) + own, torch.ones(2, dtype=torch.float64), atol=1e-14, rtol=0)


def test_examples_are_independent_and_the_model_is_left_as_it_was():
    vit = tiny_vit(10)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        before = vit(x)
    batch = attention_rollout(vit, x)
    one_by_one = torch.cat([attention_rollout(vit, x[i:i + 1]) for i in range(4)])
    assert torch.allclose(batch, one_by_one, atol=1e-14, rtol=0)
    with torch.no_grad():
        assert torch.equal(vit(x), before)
    attention = vit.encoder.layers[0].self_attention
    assert not hasattr(attention, "softmax") and "forward" not in attention.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())


class TokenTransformer(nn.Module):
    """Token ids -> a sequence-first nn.TransformerEncoder (batch_first=False); reads token 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.embedding = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.encoder(scale * self.embedding(ids).transpose(0, 1))[0])


def test_sequence_first_token_model_with_extra_arguments_matches_pytorchs_weights():
    model = TokenTransformer().double().eval()
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(13))
    seen: list[torch.Tensor] = []
    handles = [layer.self_attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
               for layer in model.encoder.layers]
    try:
        model(ids, 3.0)  # parameters needing gradients: PyTorch's fused fast path is off, the hooks fire
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 2 and seen[0].shape == (7, 3, 8)  # sequence first
    with torch.no_grad():
        weights = [layer.self_attn(h, h, h, need_weights=True)[1] for layer, h in zip(model.encoder.layers, seen)]
    rolled = dense_rollout(weights)
    assert torch.allclose(attention_rollout(model, ids, additional_forward_args=3.0), rolled[:, 0, 1:], atol=1e-13, rtol=0)
    last = attention_rollout(model, ids, additional_forward_args=(3.0,), token=-1)
    assert torch.allclose(last, rolled[:, 6, :6], atol=1e-13, rtol=0)


def test_patches_to_image_follows_torchvisions_token_order():
    vit = tiny_vit(14)
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    row, column = 2, 1  # perturb one pixel of patch (2, 1): only that patch's token may change
    changed = x.clone()
    changed[0, 0, 4 * row + 3, 4 * column + 2] = 1.0
    with torch.no_grad():
        tokens = [vit._process_input(t)[0] for t in (x, changed)]  # (16 patches, hidden)
    moved = (tokens[1] - tokens[0]).abs().sum(-1).nonzero().flatten().tolist()
    assert moved == [row * 4 + column]
    onehot = torch.zeros(1, 16, dtype=torch.float64)
    onehot[0, moved[0]] = 1.0
    image = patches_to_image(onehot, size=16)
    assert image.shape == (1, 1, 16, 16)
    assert float(image.sum()) == 16.0 and float(image[0, 0, 4 * row + 3, 4 * column + 2]) == 1.0
    assert float(image[0, 0, 4 * row:4 * row + 4, 4 * column:4 * column + 4].sum()) == 16.0
    assert torch.equal(patches_to_image(torch.arange(6.0).unsqueeze(0), grid=(2, 3)), torch.arange(6.0).reshape(1, 1, 2, 3))
    smooth = patches_to_image(torch.ones(2, 16), size=(8, 12), mode="bilinear")
    assert torch.allclose(smooth, torch.ones(2, 1, 8, 12))  # a constant map stays constant


def test_errors_name_the_argument():
    cnn = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.randn(1, 3, 8, 8)
    cnn(x)
    with pytest.raises(InputError, match="^model: .*no nn.MultiheadAttention"):
        attention_rollout(cnn, x)
    vit = tiny_vit()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(InputError, match="^discard_ratio"):
        attention_rollout(vit, x, discard_ratio=1.0)
    with pytest.raises(InputError, match="^head_fusion"):
        attention_rollout(vit, x, head_fusion="median")
    with pytest.raises(InputError, match="^token: 17 is out of range for 17 tokens"):
        attention_rollout(vit, x, token=17)
    with pytest.raises(InputTypeError, match="^inputs are torch.float32 but the model's parameters are torch.float64"):
        attention_rollout(vit, x.float())
    with pytest.raises(InputError, match="^model: .*training mode"):
        attention_rollout(tiny_vit().train(), x)
    with pytest.raises(InputError, match="^grid: 15 patches are not a square"):
        patches_to_image(torch.ones(1, 15))
    with pytest.raises(InputError, match="^grid: 2 x 3 patches, but scores has 8"):
        patches_to_image(torch.ones(1, 8), grid=(2, 3))
    with pytest.raises(InputError, match="^weights\\[1\\] has 3 tokens"):
        rollout_matrix([torch.ones(1, 1, 2, 2) / 2, torch.ones(1, 1, 3, 3) / 3])
    with pytest.raises(InputError, match="^weights\\[0\\] of shape"):
        rollout_matrix([torch.ones(1, 1, 2, 3) / 3])
