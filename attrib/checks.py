"""Argument checks shared by every method: each raises :class:`~attrib.errors.InputError` (or
:class:`~attrib.errors.InputTypeError`) naming the argument, before any work is done."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError, InputTypeError
from .types import Baselines


def model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None



def _own_dropout(module: nn.Module) -> bool:
    """A module that applies dropout itself in training mode (nn.MultiheadAttention, the RNNs between layers)."""
    rate = getattr(module, "dropout", None)
    return isinstance(rate, float) and rate > 0


def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    stochastic = [
        name for name, module in model.named_modules()
        if module.training and (isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
                                or _own_dropout(module))
    ]
    if stochastic:
        raise InputError(
            f"model: {stochastic[0]!r} is in training mode, where rows of the interpolated batch would mix "
            "(batch statistics) or be random (dropout); call model.eval() first"
        )



INTEGER_INPUTS = (
    "integer and boolean inputs (token ids, masks) cannot be interpolated or differentiated; interpolate at the "
    "layer that embeds them (the path methods take interpolate_at=, e.g. IntegratedGradients(model, "
    "interpolate_at='embedding')), or pass them through additional_forward_args"
)


def _check_one(model: nn.Module, inputs: object, name: str, differentiable: bool) -> Tensor:
    are, contain = ("are", "contain") if name == "inputs" else ("is", "contains")
    if not isinstance(inputs, Tensor):
        raise InputTypeError(f"{name} must be a tensor, got {type(inputs).__name__}")
    if inputs.dim() == 0:
        raise InputError(f"{name} must have a batch dimension")
    if inputs.shape[0] == 0:
        raise InputError(f"{name}: the batch is empty (shape {tuple(inputs.shape)}); give at least one example")
    device, dtype = model_device_dtype(model)
    if device is not None and inputs.device != device:
        raise InputError(f"{name} {are} on {inputs.device} but the model is on {device}; move one of them")
    if not inputs.is_floating_point():
        if differentiable:
            raise InputTypeError(f"{name} {are} {inputs.dtype}: {INTEGER_INPUTS}")
        return inputs.detach()
    if dtype is not None and inputs.dtype != dtype:
        raise InputTypeError(f"{name} {are} {inputs.dtype} but the model's parameters are {dtype}")
    if not torch.isfinite(inputs).all():
        raise InputError(f"{name} {contain} NaN or infinite values")
    return inputs.detach()


def check_inputs(model: nn.Module, inputs: Tensor, differentiable: bool = True) -> Tensor:
    """One input tensor, for the methods that take one (a tuple is refused by name)."""
    if isinstance(inputs, (tuple, list)):
        raise InputTypeError(f"inputs must be one tensor for this method, got a {type(inputs).__name__} of {len(inputs)}")
    return _check_one(model, inputs, "inputs", differentiable)


def check_input_tuple(model: nn.Module, inputs: object, differentiable: bool = True) -> tuple[tuple[Tensor, ...], bool]:
    """A tensor or a tuple of tensors with one batch size -> ``(tuple of checked tensors, single)``;
    ``single`` is True when one tensor was given (results then come back as a tensor, not a tuple).
    ``differentiable=False`` lets integer and bool tensors through (methods that neither
    interpolate nor differentiate the inputs)."""
    if isinstance(inputs, Tensor):
        return (_check_one(model, inputs, "inputs", differentiable),), True
    if isinstance(inputs, list):
        raise InputTypeError("inputs: give several inputs as a tuple of tensors, not a list (Captum's convention)")
    if not isinstance(inputs, tuple):
        raise InputTypeError(f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    if not inputs:
        raise InputError("inputs: the tuple is empty")
    checked = tuple(_check_one(model, x, f"inputs[{i}]", differentiable) for i, x in enumerate(inputs))
    batches = [x.shape[0] for x in checked]
    if len(set(batches)) > 1:
        raise InputError(f"inputs: every input needs the same batch size (first dimension); got {batches}")
    return checked, False


def as_given(maps: Sequence[Tensor], single: bool) -> Any:
    """One map per input, returned as the inputs were given: a tensor for one tensor, else a tuple."""
    return maps[0] if single else tuple(maps)


def check_baselines(baselines: Baselines, inputs: Tensor, name: str = "baselines", what: str | None = None) -> Tensor:
    """``None`` (zeros), a number, a tensor shaped like ``inputs`` or like one example ``(1, ...)``
    (``what`` names ``inputs`` in messages). For integer inputs (token ids) a number must be a whole one."""
    if baselines is None:  # one element seen at every position (read-only, like the other returns)
        return inputs.new_zeros(()).expand_as(inputs)
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        if not math.isfinite(baselines):
            raise InputError(f"{name} must be a finite number, got {baselines!r}")
        if not inputs.is_floating_point():
            if not float(baselines).is_integer():
                raise InputError(f"{name}: the inputs are {inputs.dtype} (e.g. token ids), so the baseline must be a whole "
                                 f"number (e.g. the padding id), got {baselines!r}")
            return inputs.new_full((), int(baselines)).expand_as(inputs)
        return inputs.new_full((), float(baselines)).expand_as(inputs)
    if not isinstance(baselines, Tensor):
        raise InputTypeError(f"{name} must be None, a number or a tensor, got {type(baselines).__name__}")
    if baselines.shape != inputs.shape and baselines.shape != (1,) + inputs.shape[1:]:
        what = what or ("inputs" if name == "baselines" else name.replace("baselines", "inputs"))
        raise InputError(
            f"{name} of shape {tuple(baselines.shape)} do not match {what} of shape {tuple(inputs.shape)}; "
            f"give shape {tuple(inputs.shape)} or {(1,) + tuple(inputs.shape[1:])}"
        )
    what = what or "inputs"
    if baselines.device != inputs.device:
        raise InputError(f"{name} are on {baselines.device} but {what} are on {inputs.device}")
    if baselines.dtype != inputs.dtype:
        raise InputTypeError(f"{name} are {baselines.dtype} but {what} are {inputs.dtype}")
    if not torch.isfinite(baselines).all():
        raise InputError(f"{name} contain NaN or infinite values")
    return baselines.detach().expand_as(inputs)


def check_baseline_tuple(baselines: object, inputs: tuple[Tensor, ...], single: bool) -> tuple[Tensor, ...]:
    """Baselines matching ``inputs``: for one input as :func:`check_baselines`; for a tuple of inputs a
    tuple of the same length whose items are each None, a number or a tensor (``None`` or one number
    alone applies to every input)."""
    if len(inputs) == 1 and not isinstance(baselines, tuple):  # one input (also a tuple of one): a bare baseline
        return (check_baselines(baselines, inputs[0]),)  # type: ignore[arg-type]
    if baselines is None or (isinstance(baselines, (int, float)) and not isinstance(baselines, bool)):
        return tuple(check_baselines(baselines, x) for x in inputs)
    if not isinstance(baselines, tuple):
        raise InputTypeError(
            f"baselines: with {len(inputs)} inputs give a tuple of {len(inputs)} baselines (each None, a number or a "
            f"tensor), got {type(baselines).__name__}"
        )
    if len(baselines) != len(inputs):
        raise InputError(f"baselines: {len(baselines)} given for {len(inputs)} inputs; give one per input")
    if single:
        return (check_baselines(baselines[0], inputs[0]),)
    return tuple(check_baselines(b, x, f"baselines[{i}]") for i, (b, x) in enumerate(zip(baselines, inputs)))


def describe(value: object) -> str:
    """A value for an error message: a tensor's shape, a sequence's shapes, else its type."""
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {[tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in value]}"
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def check_references(baselines: object, inputs: tuple[Tensor, ...], single: bool, method: str,
                     alternative: str) -> tuple[Tensor, ...]:
    """A baseline distribution: per input one tensor of N >= 1 reference examples, (N, ...) with the
    input's per-example shape, the same N for every input (one tensor for one input given as a tensor)."""
    given = (baselines,) if isinstance(baselines, Tensor) else baselines
    if not isinstance(given, tuple) or not all(isinstance(b, Tensor) for b in given):
        raise InputTypeError(
            f"baselines: {method} draws from reference examples; it needs reference examples, a tensor (N, ...) per "
            f"input (a tuple of them for several inputs), got {describe(baselines)}; for one baseline (None or a "
            f"number) use {alternative}"
        )
    if len(given) != len(inputs):
        raise InputError(f"baselines: {len(given)} given for {len(inputs)} inputs; give one tensor of reference "
                         "examples per input")
    for i, (references, x) in enumerate(zip(given, inputs)):
        name = "baselines" if single else f"baselines[{i}]"
        if references.dim() != x.dim() or references.shape[1:] != x.shape[1:]:
            raise InputError(f"{name} of shape {tuple(references.shape)}: give N >= 1 reference examples shaped "
                             f"{('N',) + tuple(x.shape[1:])} like one example of the inputs")
        if references.shape[0] < 1:
            raise InputError(f"{name}: no reference examples (shape {tuple(references.shape)}); give N >= 1")
        check_baselines(references, x[:1].expand(references.shape), name)  # device, dtype, finite values
    counts = [b.shape[0] for b in given]
    if len(set(counts)) > 1:
        raise InputError(f"baselines: every input needs the same number of reference examples, got {counts}")
    return tuple(b.detach() for b in given)


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """An int (not a bool) of at least ``minimum``: InputTypeError for another type, InputError
    (a ValueError) for a smaller int; both name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InputError(f"{name} must be {wanted}, got {value!r}")
    return value


def expand_args(args: Sequence[Any], example: Tensor, n_examples: int) -> tuple:
    """Repeat per-example tensors among ``additional_forward_args`` for each row; pass others as is."""
    return tuple(
        arg[example.to(arg.device)] if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == n_examples else arg
        for arg in args
    )



def as_args(additional_forward_args: Any) -> tuple:
    """Captum's meaning: None is no argument, a tuple is several, anything else (a list too) is one."""
    if additional_forward_args is None:
        return ()
    return additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
