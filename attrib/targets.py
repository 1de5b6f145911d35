"""Targets: which scalar of the model output is explained, one per example.

``target`` may be
- ``None`` when the model returns one score per example;
- an ``int`` (a column of a ``(B, C)`` output) or a ``tuple`` of ints (an index into the non-batch
  dimensions, e.g. ``(class, row, col)`` of a segmentation map);
- a ``list`` with one int/tuple per example, or a 1-D integer tensor of length B;
- a callable mapping the model output to one score per example (custom heads, summed segmentation
  scores); it also accepts outputs that are not tensors (dicts, tuples).
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from .errors import InputError, InputTypeError
from .types import NeuronSelector, TargetType


def _index(target: object, shape: torch.Size) -> tuple:
    """Check one index (int or tuple) against the non-batch shape; return it as a tuple."""
    index = (target,) if isinstance(target, int) else target
    if not isinstance(index, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        raise InputTypeError(f"target: expected an int or a tuple of ints, got {target!r}")
    if len(index) != len(shape):
        raise InputError(
            f"target: {target!r} indexes {len(index)} dimension(s) but the model output has "
            f"{len(shape)} per example (shape {tuple(shape)})"
        )
    for i, size in zip(index, shape):
        if not -size <= i < size:
            raise InputError(f"target: {target!r} is out of range for model output of shape {tuple(shape)} per example")
    return tuple(i % size for i, size in zip(index, shape))


def _plain_ints(target: object) -> object:
    """numpy (or any ``__index__``) integers as Python ints, numpy arrays as tensors; the rest as is."""
    if isinstance(target, (bool, Tensor)) or callable(target):
        return target
    if hasattr(target, "__array__") and not isinstance(target, (int, tuple, list)):
        array = torch.as_tensor(target)
        return array if array.dim() else _plain_ints(array.item())
    if hasattr(target, "__index__") and not isinstance(target, int):
        return operator.index(target)
    if isinstance(target, (tuple, list)):
        return type(target)(_plain_ints(t) for t in target)
    return target


def normalize_target(target: TargetType, n_examples: int) -> TargetType:
    """Turn a per-example tensor target into a list and check per-example lengths; ints pass
    (numpy integers and arrays count as ints and tensors)."""
    target = _plain_ints(target)  # type: ignore[assignment]
    if isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise InputTypeError(f"target: an integer tensor is needed, got dtype {target.dtype}")
        if target.dim() == 0 or target.shape == (1,):  # one class for every example (Captum reads it so)
            return int(target.reshape(()))
        if target.dim() != 1 or target.shape[0] != n_examples:
            raise InputError(f"target: a tensor target needs shape ({n_examples},), got {tuple(target.shape)}")
        return [int(t) for t in target.tolist()]
    if isinstance(target, list):
        if len(target) != n_examples:
            raise InputError(f"target: {len(target)} targets given for {n_examples} examples")
    elif target is not None and not isinstance(target, (int, tuple)) and not callable(target):
        raise InputTypeError(f"target: unsupported type {type(target).__name__}")
    if isinstance(target, bool):
        raise InputTypeError("target: a bool is not a class index")
    return target


def no_score(output: object) -> Tensor:
    """The target of methods that explain a hidden unit, not an output: no score (zeros), and the
    output's shape is not checked."""
    raise AssertionError("no_score is read by target_scores, never called")


def target_scores(output: object, target: TargetType, example: Tensor) -> Tensor:
    """Scores ``(rows,)`` of an output for ``rows`` interpolated rows; ``example[r]`` is row r's example."""
    rows = example.shape[0]
    if target is no_score:
        return torch.zeros(rows, dtype=torch.get_default_dtype(), device=example.device)
    if callable(target):
        scores = target(output)
        if not isinstance(scores, Tensor) or scores.shape != (rows,):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise InputError(
                f"target: the callable must return one score per row of the output it is given, shape ({rows},); got "
                f"{got}. Methods evaluate rows in chunks (internal_batch_size, 'auto' by default): a callable that reads "
                "per-example tensors of its own sees a chunk; pass internal_batch_size=None for one chunk of all rows"
            )
        return scores
    if not isinstance(output, Tensor):
        raise InputTypeError(
            f"model output is a {type(output).__name__}, not a tensor; pass a callable target that maps it "
            "to one score per example"
        )
    if output.dim() == 0 or output.shape[0] != rows:
        raise InputError(
            f"model output has shape {tuple(output.shape)} for a batch of {rows} input rows; attribution needs one "
            "output row per input row (a model that pools or reshapes across the batch mixes the examples)"
        )
    per_example = output.shape[1:]
    if target is None:
        if per_example.numel() != 1:
            raise InputError(
                f"target is required: the model returns {per_example.numel()} scores per example "
                f"(output shape {tuple(output.shape)})"
            )
        return output.reshape(rows)
    flat = output.reshape(rows, -1)
    strides = torch.tensor(
        [int(torch.tensor(per_example[d + 1:]).prod()) for d in range(len(per_example))], dtype=torch.long
    )
    if isinstance(target, list):
        columns = torch.tensor(
            [sum(i * s for i, s in zip(_index(t, per_example), strides.tolist())) for t in target],
            dtype=torch.long, device=output.device,
        )
        return flat.gather(1, columns[example.to(output.device)].unsqueeze(1)).squeeze(1)
    column = sum(i * s for i, s in zip(_index(target, per_example), strides.tolist()))
    return flat[:, column]


def selector_weights(selector: NeuronSelector, layer_value: Tensor) -> Tensor:
    """Weights on the layer's units that define 'the neuron': a one-hot, a 0/1 mask for slices,
    or the gradient of a callable's per-example value (a mask for linear selections)."""
    if callable(selector):
        with torch.enable_grad():
            probe = layer_value.detach().requires_grad_(True)
            value = selector(probe)
            if not isinstance(value, Tensor) or value.shape != (layer_value.shape[0],):
                raise InputError("neuron_selector: a callable must return one value per example")
            return torch.autograd.grad(value.sum(), probe)[0]
    index = (selector,) if isinstance(selector, int) else selector
    if not isinstance(index, tuple) or len(index) != layer_value.dim() - 1:
        raise InputError(
            f"neuron_selector: {selector!r} must index all {layer_value.dim() - 1} non-batch dimensions "
            f"of the layer (shape {tuple(layer_value.shape[1:])})"
        )
    weights = torch.zeros(layer_value.shape[1:], dtype=layer_value.dtype, device=layer_value.device)
    try:
        weights[index] = 1
    except IndexError as error:
        raise InputError(f"neuron_selector: {selector!r} is out of range for layer shape {tuple(layer_value.shape[1:])}") from error
    return weights.unsqueeze(0)
