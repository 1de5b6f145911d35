"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

A transformer block adds its attention output to its input (the residual connection), so the
information at token ``i`` after the block is, roughly, half its own and half what it attended to.
Rollout models each block by its attention weights averaged over the heads, ``A``, mixed with the
identity for the residual path and renormalised so that every row sums to 1::

    A' = 0.5 A + 0.5 I,    A'_ij <- A'_ij / sum_j A'_ij

and follows the flow from the first block to the last by multiplying the blocks' matrices:
``R = A'_L ... A'_2 A'_1``. Row ``t`` of ``R`` says how much of each input token reaches token ``t`` at
the top; for a classifier that reads the class token (a ViT, BERT), the relevance of the input tokens
is the class token's row without the class token itself.

The weights are those of :func:`attrib.explicit_attention`'s ``softmax`` submodules (after the masks,
before dropout), captured with :class:`attrib.capture`: the method needs no gradient and no target.
Options beyond the paper: ``head_fusion`` ``"max"`` or ``"min"`` instead of the mean over heads, and
``discard_ratio``, which zeroes the smallest weights of every row of the fused matrix before the
identity is added (both are common variants; the defaults are the paper's).

>>> scores = attention_rollout(vit, x)             # (B, 64): the class token's row, patches only
>>> image = patches_to_image(scores, size=32)      # (B, 1, 32, 32): each patch's score on its pixels
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import _attention_modules, explicit_attention
from .checks import as_args, check_input_tuple, check_model
from .errors import InputError, InputTypeError
from .hooks import capture
from .types import Inputs

HEAD_FUSIONS = ("mean", "max", "min")


def _check_ratio(discard_ratio: object) -> float:
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)):
        raise InputTypeError(f"discard_ratio must be a number in [0, 1), got {type(discard_ratio).__name__}")
    if not 0.0 <= discard_ratio < 1.0:
        raise InputError(f"discard_ratio must be in [0, 1) (the share of each row's smallest weights set to 0), "
                         f"got {discard_ratio!r}")
    return float(discard_ratio)


def _check_fusion(head_fusion: object) -> str:
    if head_fusion not in HEAD_FUSIONS:
        raise InputError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    return str(head_fusion)


def _fuse(weights: Tensor, head_fusion: str) -> Tensor:
    """(B, H, L, L) -> (B, L, L)."""
    if head_fusion == "mean":
        return weights.mean(1)
    return weights.amax(1) if head_fusion == "max" else weights.amin(1)


def _discard(fused: Tensor, discard_ratio: float) -> Tensor:
    """Each row with its ``floor(discard_ratio * L)`` smallest weights set to 0 (ties: the lower index goes first)."""
    count = math.floor(discard_ratio * fused.shape[-1])
    if count == 0:
        return fused
    lowest = fused.argsort(dim=-1, stable=True)[..., :count]
    return fused.scatter(-1, lowest, 0.0)


def rollout_matrix(weights: Sequence[Tensor], discard_ratio: float = 0.0, head_fusion: str = "mean") -> Tensor:
    """The rolled-out attention ``A'_L ... A'_1`` (B, L, L) from the blocks' attention weights, first block
    first, each (B, H, L, L) (queries by keys; or (B, L, L), one head). Every row of the result sums to 1."""
    head_fusion, discard_ratio = _check_fusion(head_fusion), _check_ratio(discard_ratio)
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or not weights:
        raise InputError("weights: give a non-empty list of attention weights, (B, H, L, L) per block, first block first")
    rolled: Tensor | None = None
    for index, block in enumerate(weights):
        if not isinstance(block, Tensor) or not block.is_floating_point():
            raise InputTypeError(f"weights[{index}] must be a floating-point tensor, got {type(block).__name__}")
        if block.dim() == 3:
            block = block.unsqueeze(1)
        if block.dim() != 4 or block.shape[-1] != block.shape[-2]:
            raise InputError(f"weights[{index}] of shape {tuple(block.shape)}: rollout needs self-attention, (B, H, L, L) "
                             "with as many keys as queries")
        if rolled is not None and block.shape[-1] != rolled.shape[-1]:
            raise InputError(f"weights[{index}] has {block.shape[-1]} tokens but the blocks before it have "
                             f"{rolled.shape[-1]}; rollout needs the same tokens in every block")
        fused = _discard(_fuse(block, head_fusion), discard_ratio)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        mixed = 0.5 * fused + 0.5 * eye
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rolled = mixed if rolled is None else torch.matmul(mixed, rolled)
    assert rolled is not None
    return rolled


def attention_weights(model: nn.Module, inputs: Inputs, additional_forward_args: Any = None) -> dict[str, Tensor]:
    """The attention weights (B, H, L, S) of every ``nn.MultiheadAttention`` of ``model`` on ``inputs``,
    by the attention module's name, in the order the modules ran (one forward pass, no graph)."""
    check_model(model)
    found = [name for name, _ in _attention_modules(model)]
    if not found:
        raise InputError("model: it has no nn.MultiheadAttention module, so there is no attention to roll out")
    checked, _ = check_input_tuple(model, inputs, differentiable=False)
    args = as_args(additional_forward_args)
    taps = [f"{name}.softmax" for name in found]
    with explicit_attention(model), capture(model, taps) as cap, torch.no_grad():
        model(*checked, *args)
        ran = list(cap.captured)  # filled as the modules run: insertion order is the order of the pass
        weights = {name[:-len(".softmax")]: cap.captured[name] for name in ran}
    if not weights:
        raise InputError(f"model: none of its attention modules ({', '.join(found)}) ran in the forward pass")
    return weights


def attention_rollout(model: nn.Module, inputs: Inputs, discard_ratio: float = 0.0, head_fusion: str = "mean",
                      additional_forward_args: Any = None, token: int = 0) -> Tensor:
    """Attention rollout of ``model`` on ``inputs``: ``(B, L - 1)``, row ``token`` (the class token,
    0 for torchvision's ViT) of the rolled-out attention with the column of ``token`` itself removed,
    the other tokens in their order (for a ViT: the patches, row by row; see :func:`patches_to_image`).

    Every ``nn.MultiheadAttention`` that runs is one block, multiplied in the order they run; each must
    be self-attention over the same tokens. ``head_fusion``: ``"mean"`` (the paper), ``"max"`` or
    ``"min"`` over the heads; ``discard_ratio``: the share of each row's smallest fused weights set to 0
    before the residual identity is added (0: none). ``inputs`` may be token ids (nothing is
    differentiated); the model is called as ``model(*inputs, *additional_forward_args)``. The scores
    are non-negative and, with the class token's own share, sum to 1.
    """
    head_fusion, discard_ratio = _check_fusion(head_fusion), _check_ratio(discard_ratio)
    if isinstance(token, bool) or not isinstance(token, int):
        raise InputTypeError(f"token must be an int (the index of the token whose row is read), got {type(token).__name__}")
    weights = attention_weights(model, inputs, additional_forward_args)
    for name, block in weights.items():
        if block.shape[-1] != block.shape[-2]:
            raise InputError(f"model: {name!r} attends from {block.shape[-2]} queries to {block.shape[-1]} keys; rollout "
                             "needs self-attention")
    rolled = rollout_matrix(list(weights.values()), discard_ratio, head_fusion)
    length = rolled.shape[-1]
    if not -length <= token < length:
        raise InputError(f"token: {token} is out of range for {length} tokens")
    token %= length
    row = rolled[:, token]
    return torch.cat([row[:, :token], row[:, token + 1:]], dim=1)


def _pair(value: object, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
        raise InputError(f"{name} must be a positive int or a pair (height, width) of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def patches_to_image(scores: Tensor, size: int | tuple[int, int] | None = None, grid: int | tuple[int, int] | None = None,
                     mode: str = "nearest") -> Tensor:
    """Patch scores ``(B, N)`` (row by row over the patch grid, as torchvision's ViT orders its tokens)
    as images ``(B, 1, H, W)``. ``grid``: the patch grid (default: square, ``sqrt(N)`` a side);
    ``size``: the image size to upsample to (default: the grid itself). ``mode="nearest"`` gives every
    pixel of a patch its patch's score when the size is a multiple of the grid (``"bilinear"`` blends)."""
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise InputError(f"scores: need (B, N) patch scores, got {getattr(scores, 'shape', type(scores).__name__)}")
    count = scores.shape[1]
    if grid is None:
        side = math.isqrt(count)
        if side * side != count:
            raise InputError(f"grid: {count} patches are not a square grid; give grid=(rows, columns)")
        rows, columns = side, side
    else:
        rows, columns = _pair(grid, "grid")
        if rows * columns != count:
            raise InputError(f"grid: {rows} x {columns} patches, but scores has {count}")
    if mode not in ("nearest", "bilinear"):
        raise InputError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    image = scores.reshape(scores.shape[0], 1, rows, columns)
    if size is None:
        return image
    height, width = _pair(size, "size")
    if mode == "nearest":
        return F.interpolate(image, size=(height, width), mode="nearest")
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
