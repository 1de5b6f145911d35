"""Argument checks shared by every method: each raises :class:`~attrib.errors.InputError` (or
:class:`~attrib.errors.InputTypeError`) naming the argument, before any work is done."""
from __future__ import annotations

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



def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    stochastic = [
        name for name, module in model.named_modules()
        if module.training and isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
    ]
    if stochastic:
        raise InputError(
            f"model: {stochastic[0]!r} is in training mode, where rows of the interpolated batch would mix "
            "(batch statistics) or be random (dropout); call model.eval() first"
        )



def check_inputs(model: nn.Module, inputs: Tensor) -> Tensor:
    if not isinstance(inputs, Tensor):
        raise InputTypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if inputs.dim() == 0:
        raise InputError("inputs must have a batch dimension")
    if inputs.shape[0] == 0:
        raise InputError(f"inputs: the batch is empty (shape {tuple(inputs.shape)}); give at least one example")
    if not inputs.is_floating_point():
        raise InputTypeError(f"inputs must be floating point to be interpolated, got {inputs.dtype}")
    device, dtype = model_device_dtype(model)
    if device is not None and inputs.device != device:
        raise InputError(f"inputs are on {inputs.device} but the model is on {device}; move one of them")
    if dtype is not None and inputs.dtype != dtype:
        raise InputTypeError(f"inputs are {inputs.dtype} but the model's parameters are {dtype}")
    if not torch.isfinite(inputs).all():
        raise InputError("inputs contain NaN or infinite values")
    return inputs.detach()



def check_baselines(baselines: Baselines, inputs: Tensor) -> Tensor:
    """``None`` (zeros), a number, a tensor shaped like ``inputs`` or like one example ``(1, ...)``."""
    if baselines is None:  # one element seen at every position (read-only, like the other returns)
        return inputs.new_zeros(()).expand_as(inputs)
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        return inputs.new_full((), float(baselines)).expand_as(inputs)
    if not isinstance(baselines, Tensor):
        raise InputTypeError(f"baselines must be None, a number or a tensor, got {type(baselines).__name__}")
    if baselines.shape != inputs.shape and baselines.shape != (1,) + inputs.shape[1:]:
        raise InputError(
            f"baselines of shape {tuple(baselines.shape)} do not match inputs of shape {tuple(inputs.shape)}; "
            f"give shape {tuple(inputs.shape)} or {(1,) + tuple(inputs.shape[1:])}"
        )
    if baselines.device != inputs.device:
        raise InputError(f"baselines are on {baselines.device} but inputs are on {inputs.device}")
    if baselines.dtype != inputs.dtype:
        raise InputTypeError(f"baselines are {baselines.dtype} but inputs are {inputs.dtype}")
    if not torch.isfinite(baselines).all():
        raise InputError("baselines contain NaN or infinite values")
    return baselines.detach().expand_as(inputs)



def check_count(name: str, value: object, minimum: int = 1) -> int:
    """An int (not a bool) of at least ``minimum``: InputTypeError for another type, InputError
    (a ValueError) for a smaller int; both name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InputError(f"{name} must be {wanted}, got {value!r}")
    return value


def check_internal_batch_size(internal_batch_size: int | None, rows: int) -> int:
    """Rows per forward pass: ``None`` means all ``rows`` at once."""
    return rows if internal_batch_size is None else check_count("internal_batch_size", internal_batch_size)


def expand_args(args: Sequence[Any], example: Tensor, n_examples: int) -> tuple:
    """Repeat per-example tensors among ``additional_forward_args`` for each row; pass others as is."""
    return tuple(
        arg[example.to(arg.device)] if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == n_examples else arg
        for arg in args
    )



def as_args(additional_forward_args: Any) -> tuple:
    if additional_forward_args is None:
        return ()
    return tuple(additional_forward_args) if isinstance(additional_forward_args, (tuple, list)) else (additional_forward_args,)
