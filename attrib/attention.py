"""Attention as explicit modules, for attribution inside ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` computes its heads inside one functional call (and, in eval mode without a
graph, ``nn.TransformerEncoderLayer`` and the module itself may take fused fast paths that skip its
``forward`` altogether), so the per-head values have no module to hook. Within
:func:`explicit_attention`, every ``nn.MultiheadAttention`` of the model runs the same math step by
step through submodules that hooks, conductance and LRP rules can name:

====================  ==========================================================  =====================
submodule             what                                                        output
====================  ==========================================================  =====================
``q_proj`` ...        the query / key / value projections (slices of the          ``(B, L, E)``
``k_proj, v_proj``    module's own in-projection; no copy of the weights)
``scores``            ``q k^T / sqrt(d)`` per head                                ``(B, H, L, S)``
``softmax``           over the keys, after the masks                              ``(B, H, L, S)``
``context``           ``weights v`` per head                                      ``(B, H, L, d)``
``heads``             the heads side by side, before the output projection        ``(B, L, E)``
``out_proj``          the module's own output projection, now called as a module  ``(B, L, E)``
====================  ==========================================================  =====================

(``B, L, E`` in the order the module was built for: with ``batch_first=False`` the projections and
``heads`` are ``(L, B, E)`` too, like its inputs.) :func:`head_scores` turns a map at ``heads`` into one
number per head and token. The modules are added on entry and removed on exit, with the original
``forward`` and the fast-path setting restored; the parameters are the module's own, so gradients and
state dicts are unchanged.

>>> with explicit_attention(model):
...     res = LayerConductance(model, ["encoder.layers.encoder_layer_3.self_attention.heads"]).attribute(x, target=3)
>>> head_scores(res["encoder.layers.encoder_layer_3.self_attention.heads"], num_heads=12)   # (B, H, L)
"""
from __future__ import annotations

import math
import types
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError, InputTypeError

SUBMODULES = ("q_proj", "k_proj", "v_proj", "scores", "softmax", "context", "heads")


class Projection(nn.Linear):
    """One of the query / key / value projections of an ``nn.MultiheadAttention``: ``x W^T + b`` with
    ``W``, ``b`` read from the owner's parameters (a slice of ``in_proj_weight``, or its
    ``q_proj_weight`` ...) at each call, so nothing is copied and nothing is registered here. It is an
    ``nn.Linear`` for everything that asks (LRP composites, views), with ``weight`` and ``bias`` those tensors."""

    def __init__(self, owner: nn.MultiheadAttention, index: int) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the parameters stay the owner's
        self._owner = [owner]  # a list, so that the owner is not registered as a submodule (no cycle)
        self.index = index
        self.in_features = (owner.embed_dim, owner.kdim, owner.vdim)[index]
        self.out_features = owner.embed_dim

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        owner, e = self._owner[0], self._owner[0].embed_dim
        if owner._qkv_same_embed_dim:
            return owner.in_proj_weight[self.index * e:(self.index + 1) * e]
        return (owner.q_proj_weight, owner.k_proj_weight, owner.v_proj_weight)[self.index]

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        owner, e = self._owner[0], self._owner[0].embed_dim
        return None if owner.in_proj_bias is None else owner.in_proj_bias[self.index * e:(self.index + 1) * e]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class AttentionScores(nn.Module):
    """``q k^T * scale`` for ``q`` (B, H, L, d) and ``k`` (B, H, S, d): the first product of attention."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return torch.matmul(q, k.transpose(-2, -1)) * self.scale


class AttentionContext(nn.Module):
    """``weights v`` for ``weights`` (B, H, L, S) and ``v`` (B, H, S, d): the second product of attention."""

    def forward(self, weights: Tensor, v: Tensor) -> Tensor:
        return torch.matmul(weights, v)


def _masked(scores: Tensor, mask: Tensor | None, name: str) -> Tensor:
    """``scores`` with a float mask added, or -inf where a bool mask is True (PyTorch's meaning)."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise InputTypeError(f"{name} must be bool or floating-point, got {mask.dtype}")
    return scores + mask.to(scores.dtype)


def _explicit_forward(self: Any, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Tensor | None = None, need_weights: bool = True, attn_mask: Tensor | None = None,
                      average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """The math of ``nn.MultiheadAttention.forward`` (eval mode), through the submodules above."""
    unbatched = query.dim() == 2
    if unbatched:  # (L, E): one sequence
        query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
    if not self.batch_first:  # (L, B, E) -> (B, L, E)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    batch, length, heads, width = q.shape[0], q.shape[1], self.num_heads, self.head_dim

    def split(t: Tensor) -> Tensor:  # (B, L, E) -> (B, H, L, d)
        return t.reshape(batch, t.shape[1], heads, width).transpose(1, 2)

    scores = self.scores(split(q), split(k))
    if is_causal and attn_mask is None:  # the hint without a mask: the causal mask itself
        attn_mask = torch.ones(length, k.shape[1], dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(batch, heads, length, -1)
        scores = _masked(scores, mask, "attn_mask")
    if key_padding_mask is not None:
        scores = _masked(scores, key_padding_mask.reshape(batch, 1, 1, -1), "key_padding_mask")
    weights = self.softmax(scores)
    context = self.context(weights, split(v))  # (B, H, L, d)
    joined = self.heads(context.transpose(1, 2).reshape(batch, length, heads * width))
    if not self.batch_first:
        joined = joined.transpose(0, 1)
    output = self.out_proj(joined)
    if unbatched:
        output = output.squeeze(0 if self.batch_first else 1)
    if not need_weights:
        return output, None
    shown = weights.mean(1) if average_attn_weights else weights
    return output, shown.squeeze(0) if unbatched else shown


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]


DEPTH = "_attrib_explicit_depth"  # in the module's __dict__: how many explicit_attention blocks hold it


def _refuse(name: str, module: nn.MultiheadAttention) -> None:
    if module.__dict__.get(DEPTH):
        return  # an outer explicit_attention already set it up
    if module.bias_k is not None or module.add_zero_attn:
        raise InputError(f"model: {name!r} uses add_bias_kv or add_zero_attn, which explicit_attention does not implement")
    if module.training and module.dropout > 0:
        raise InputError(f"model: {name!r} is in training mode with attention dropout; call model.eval() first")
    clash = [sub for sub in SUBMODULES if hasattr(module, sub)]
    if clash:
        raise InputError(f"model: {name!r} already has an attribute {clash[0]!r}; explicit_attention cannot add its own")


def _set_up(module: nn.MultiheadAttention) -> None:
    for index, sub in enumerate(("q_proj", "k_proj", "v_proj")):
        module.add_module(sub, Projection(module, index))
    module.add_module("scores", AttentionScores(1.0 / math.sqrt(module.head_dim)))
    module.add_module("softmax", nn.Softmax(dim=-1))
    module.add_module("context", AttentionContext())
    module.add_module("heads", nn.Identity())
    module.forward = types.MethodType(_explicit_forward, module)  # type: ignore[method-assign]


def _take_down(module: nn.MultiheadAttention) -> None:
    for sub in SUBMODULES:
        module._modules.pop(sub, None)
    module.__dict__.pop("forward", None)


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every ``nn.MultiheadAttention`` of ``model`` computes through named submodules
    (see the module docstring); yields their names. On exit the submodules are removed and the original
    ``forward`` and PyTorch's attention fast-path setting are restored, also when the block raises.
    Blocks nest (LRP enters one of its own inside yours): the innermost changes nothing, the outermost
    restores."""
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = _attention_modules(model)
    for name, module in found:
        _refuse(name, module)
    fast = torch.backends.mha.get_fastpath_enabled()
    held: list[nn.MultiheadAttention] = []
    try:
        torch.backends.mha.set_fastpath_enabled(False)  # the fused paths skip the module's forward
        for _, module in found:
            depth = module.__dict__.get(DEPTH, 0)
            if depth == 0:
                _set_up(module)
            module.__dict__[DEPTH] = depth + 1
            held.append(module)
        yield [name for name, _ in found]
    finally:
        for module in held:
            module.__dict__[DEPTH] -= 1
            if module.__dict__[DEPTH] == 0:
                del module.__dict__[DEPTH]
                _take_down(module)
        torch.backends.mha.set_fastpath_enabled(fast)


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an ``nn.MultiheadAttention``."""
    return any(isinstance(module, nn.MultiheadAttention) for module in model.modules())


def attention_as_modules(model: nn.Module) -> AbstractContextManager:
    """:func:`explicit_attention` if the model has attention, else nothing: for methods that need
    its inner steps as modules (LRP) or a double backward through it (the fused kernels have none)."""
    return explicit_attention(model) if has_attention(model) else nullcontext()


def head_scores(attributions: Tensor, num_heads: int, batch_first: bool = True) -> Tensor:
    """A map at an attention's ``heads`` tap, ``(B, L, E)`` (``(L, B, E)`` with ``batch_first=False``),
    as one number per head and token: the head's ``E / num_heads`` dimensions summed, ``(B, H, L)``."""
    if not isinstance(attributions, Tensor) or attributions.dim() != 3:
        raise InputError(f"attributions: need a (B, L, E) map at a heads tap, got {getattr(attributions, 'shape', type(attributions))}")
    if not batch_first:
        attributions = attributions.transpose(0, 1)
    batch, length, width = attributions.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
        raise InputError(f"num_heads: {num_heads!r} does not divide the embedding width {width}")
    return attributions.reshape(batch, length, num_heads, width // num_heads).sum(-1).transpose(1, 2)


class HeadConductance:
    """Conductance of every attention head, per token, with any other layers from the same sweep.

    ``attention``: names of ``nn.MultiheadAttention`` modules (default: every one in the model);
    ``layers``: other layers (encoder blocks, MLP activations) explained in the same pass;
    ``interpolate_at``: as for :class:`~attrib.LayerConductance` (token models). For each attention
    module the result holds, under its name, ``(B, H, L)``: the conductance of its heads' outputs
    (before the output projection, the ``heads`` tap of :func:`explicit_attention`) summed over each
    head's dimensions. Attention sits beside a residual connection, so a block's heads carry only part of
    the score change: their ``delta`` (sum minus F(x) - F(x')) is that of a layer which is not a cut; the
    blocks themselves are cuts and their ``delta`` is the quadrature error. ``info["heads"]`` holds the
    (B, L, E) maps at each tap.

    >>> res = HeadConductance(vit, layers=["encoder.layers.encoder_layer_11"]).attribute(x, target=3)
    >>> res["encoder.layers.encoder_layer_5.self_attention"].shape   # (B, 12, 197): heads x tokens
    """

    def __init__(self, model: nn.Module, attention: list[str] | None = None, layers: list[str] | None = None,
                 interpolate_at: str | None = None) -> None:
        from .hooks import resolve_layers

        self.model = model
        found = dict(_attention_modules(model))
        if not found:
            raise InputError("model: it has no nn.MultiheadAttention module to split into heads")
        names = list(found) if attention is None else [n for n, _ in resolve_layers(model, attention, argument="attention")]
        wrong = [n for n in names if n not in found]
        if wrong:
            raise InputError(f"attention: {wrong[0]!r} is a {type(dict(model.named_modules())[wrong[0]]).__name__}, "
                             "not an nn.MultiheadAttention")
        self.attention = {name: found[name] for name in names}
        self.layers = [n for n, _ in resolve_layers(model, layers, elements=True)] if layers else []
        given = [n for n in self.layers if n in found]
        if given:
            raise InputError(f"layers: {given[0]!r} is an nn.MultiheadAttention, whose output is a tuple; for that output as "
                             f"one layer name {given[0] + '[0]'!r}, and choose whose heads are split with attention=")
        self.interpolate_at = interpolate_at

    def attribute(self, inputs, target=None, baselines=None, n_steps: int = 50, **options):
        from .conductance import LayerConductance
        from .result import Attribution

        taps = [f"{name}.heads" for name in self.attention]
        with explicit_attention(self.model):
            res = LayerConductance(self.model, taps + self.layers, interpolate_at=self.interpolate_at).attribute(
                inputs, target=target, baselines=baselines, n_steps=n_steps, **options)
        maps: dict[str, Any] = {name: head_scores(res[tap], module.num_heads, module.batch_first)
                for (name, module), tap in zip(self.attention.items(), taps)}
        maps.update({name: res[name] for name in self.layers})
        assert isinstance(res.delta, dict), "LayerConductance reports delta per layer"
        delta = {name: res.delta[tap] for name, tap in zip(self.attention, taps)}
        delta.update({name: res.delta[name] for name in self.layers})
        return Attribution(attributions=maps, delta=delta, outputs=res.outputs, baseline_outputs=res.baseline_outputs,
                           method=res.method, n_steps=res.n_steps, evaluations=res.evaluations,
                           info={**res.info, "heads": {name: res[tap] for name, tap in zip(self.attention, taps)}})
