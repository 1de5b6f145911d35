"""The path sweep shared by every path method.

For inputs x (B, ...), baselines x' and nodes alpha_0..alpha_m, the interpolated batch has
``(m+1)·B`` rows, step-major (row ``r`` is node ``r // B`` of example ``r % B``), and is evaluated in
chunks of ``internal_batch_size`` rows. Per chunk: one forward pass with hooks capturing every
requested layer, the target scores, and one backward pass giving dF/d(layer) for all layers (and
dF/dx when asked) at once. Parameters never need gradients here, so the autograd graph starts at
the lowest captured layer (or the input) and the part of the network below keeps nothing for
backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .hooks import LayerSpec, capture, frozen_parameters, resolve_layers
from .targets import TargetType, normalize_target, target_scores
from .errors import InputError, InputTypeError

INPUT = "<input>"


@dataclass
class Chunk:
    """One evaluated chunk: rows ``start:stop`` of the step-major interpolated batch."""

    start: int
    stop: int
    node: Tensor  # (rows,) node index of each row
    example: Tensor  # (rows,) example index of each row
    scores: Tensor  # (rows,) target scores, detached
    values: dict[str, Tensor]  # captured layer tensors (and INPUT), detached
    grads: dict[str, Tensor]  # dF/d(value), detached


Differentiate = Callable[[Tensor, dict[str, Tensor]], dict[str, Tensor]]
Consume = Callable[[Chunk, str, Tensor, Tensor], None]


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


def check_baselines(baselines: Tensor | float | int | None, inputs: Tensor) -> Tensor:
    """``None`` (zeros), a number, a tensor shaped like ``inputs`` or like one example ``(1, ...)``."""
    if baselines is None:
        return torch.zeros_like(inputs)
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        return torch.full_like(inputs, float(baselines))
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
    """An int (not a bool) of at least ``minimum``, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InputError(f"{name} must be {wanted}, got {value!r}")
    return value


def check_internal_batch_size(internal_batch_size: int | None, rows: int) -> int:
    if internal_batch_size is None:
        return rows
    if isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int):
        raise InputTypeError(f"internal_batch_size must be an int or None, got {type(internal_batch_size).__name__}")
    if internal_batch_size < 1:
        raise InputError(f"internal_batch_size must be at least 1, got {internal_batch_size}")
    return internal_batch_size


def expand_args(args: Sequence[Any], example: Tensor, n_examples: int) -> tuple:
    """Repeat per-example tensors among ``additional_forward_args`` for each row; pass others as is."""
    return tuple(
        arg[example.to(arg.device)] if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == n_examples else arg
        for arg in args
    )


def _gradients(scores: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """dF/dt for every tensor at once (zeros where F does not depend on it)."""
    names = [name for name, tensor in tensors.items() if tensor.requires_grad]
    found: dict[str, Tensor] = {}
    if names and scores.requires_grad:
        grads = torch.autograd.grad(scores.sum(), [tensors[n] for n in names], allow_unused=True)
        found = {n: g for n, g in zip(names, grads) if g is not None}
    return {name: found[name] if name in found else torch.zeros_like(tensor) for name, tensor in tensors.items()}


def _reaching(roots: list, targets: list[Tensor]) -> set[int]:
    """ids of the autograd nodes, among those below ``roots``, from which a leaf in ``targets`` is reached."""
    target_ids = {id(t) for t in targets}
    order, seen, children = [], set(), {}
    stack = [(root, False) for root in roots]
    while stack:  # iterative post-order DFS (graphs of deep nets exceed the recursion limit)
        node, finished = stack.pop()
        if finished:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        children[id(node)] = [child for child, _ in node.next_functions if child is not None]
        stack.extend((child, False) for child in children[id(node)])
    reach: set[int] = set()
    for node in order:
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if (variable is not None and id(variable) in target_ids) or any(id(c) in reach for c in children[id(node)]):
            reach.add(id(node))
    return reach


def _streamed_gradients(
    scores: Tensor, streamed: dict[str, Tensor], others: dict[str, Tensor], consume: Callable[[str, Tensor, Tensor], None]
) -> dict[str, Tensor]:
    """One backward pass; each streamed tensor's (value, gradient) goes to ``consume`` as soon as the
    gradient is complete (a tensor hook), so neither is kept for the rest of the pass. The gradients of
    ``others`` are returned. Leaves, and tensors whose graph reaches none of the leaves, are
    differentiated directly."""
    pending = dict(streamed)
    direct = [name for name, t in streamed.items() if t.requires_grad and t.grad_fn is None]
    leaves = [streamed[n] for n in direct] + [t for t in others.values() if t.requires_grad and t.grad_fn is None]
    inner = [name for name, t in streamed.items() if t.grad_fn is not None]
    if inner:
        reach = _reaching([streamed[n].grad_fn for n in inner], leaves)
        direct += [name for name in inner if id(streamed[name].grad_fn) not in reach]
    handles = []

    def deliver(name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            consume(name, pending.pop(name).detach(), grad.detach())
        return hook

    try:
        for name in inner:
            if name not in direct:
                handles.append(streamed[name].register_hook(deliver(name)))
        wanted = {name: streamed[name] for name in direct}
        wanted.update(others)
        del streamed
        grads = _gradients(scores, wanted)
    finally:
        for handle in handles:
            handle.remove()
    for name in direct:
        consume(name, pending.pop(name).detach(), grads.pop(name).detach())
    for name in list(pending):  # F does not depend on it: its hook never ran
        value = pending.pop(name).detach()
        consume(name, value, torch.zeros_like(value))
    return {name: grads[name] for name in others}


def endpoint_scores(
    model: nn.Module, inputs: Tensor, baselines: Tensor, target: TargetType, additional_forward_args: Sequence[Any] = ()
) -> tuple[Tensor, Tensor]:
    """F(x) and F(x') from one forward pass without a graph; also validates the target early."""
    n = inputs.shape[0]
    example = torch.arange(n, device=inputs.device).repeat(2)
    with torch.no_grad():
        output = model(torch.cat([inputs, baselines]), *expand_args(additional_forward_args, example, n))
        scores = target_scores(output, target, example)
    return scores[:n].detach(), scores[n:].detach()


def sweep(
    model: nn.Module,
    inputs: Tensor,
    baselines: Tensor,
    alphas: Tensor,
    *,
    target: TargetType,
    layers: Sequence[LayerSpec] = (),
    attribute_to_layer_input: bool = False,
    input_grad: bool = False,
    internal_batch_size: int | None = None,
    additional_forward_args: Sequence[Any] = (),
    differentiate: Differentiate | None = None,
    consume: Consume | None = None,
) -> Iterator[Chunk]:
    """Evaluate the path in chunks; yields a :class:`Chunk` per forward+backward pass.

    ``differentiate(scores, tensors)`` replaces the default backward (dF/d every captured tensor);
    ``tensors`` holds the captured layers and, when ``input_grad``, the interpolated input as INPUT.
    ``consume(chunk, name, value, grad)`` instead receives each captured layer during the backward
    pass, as soon as its gradient is complete; those layers are then left out of the yielded chunk,
    and no layer's activations and gradients are all held at once.
    """
    if consume is not None and differentiate is not None:
        raise InputError("sweep: give differentiate or consume, not both")
    n = inputs.shape[0]
    rows = alphas.shape[0] * n
    chunk_rows = check_internal_batch_size(internal_batch_size, rows)
    names = [name for name, _ in resolve_layers(model, layers)] if layers else []
    diff = inputs - baselines
    alphas = alphas.to(device=inputs.device, dtype=inputs.dtype)
    on = "input" if attribute_to_layer_input else "output"
    with frozen_parameters(model), capture(model, names, on=on, leaf=True) as cap:
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            index = torch.arange(start, stop, device=inputs.device)
            node, example = index // n, index % n
            shape = (-1,) + (1,) * (inputs.dim() - 1)
            with torch.enable_grad():
                interpolated = baselines[example] + alphas[node].view(shape) * diff[example]
                interpolated.requires_grad_(input_grad)
                fed = interpolated.clone() if input_grad else interpolated  # a model may change its input in place
                output = model(fed, *expand_args(additional_forward_args, example, n))
                scores = target_scores(output, target, example)
                tensors = {name: cap.captured[name] for name in names}
                cap.captured.clear()
                chunk = Chunk(start, stop, node, example, scores.detach(), {}, {})
                if input_grad:
                    tensors[INPUT] = interpolated
                if consume is not None:
                    grads = _streamed_gradients(  # no reference to the streamed layers stays here
                        scores, {name: tensors.pop(name) for name in names}, tensors,
                        lambda name, value, grad: consume(chunk, name, value, grad),
                    )
                else:
                    grads = (differentiate or _gradients)(scores, tensors)
            chunk.values.update({name: tensor.detach() for name, tensor in tensors.items()})
            chunk.grads.update({name: grad.detach() for name, grad in grads.items()})
            del interpolated, fed, output, scores, tensors, grads  # nothing of this chunk's graph outlives it
            yield chunk
            del chunk


def prepare(model: nn.Module, inputs: Tensor, baselines: Any, target: TargetType) -> tuple[Tensor, Tensor, TargetType]:
    """Validate the common arguments of a path method."""
    check_model(model)
    inputs = check_inputs(model, inputs)
    return inputs, check_baselines(baselines, inputs), normalize_target(target, inputs.shape[0])


def as_args(additional_forward_args: Any) -> tuple:
    if additional_forward_args is None:
        return ()
    return tuple(additional_forward_args) if isinstance(additional_forward_args, (tuple, list)) else (additional_forward_args,)
