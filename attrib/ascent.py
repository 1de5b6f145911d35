"""Conductance gradient ascent (the seed "layer conductance as a pathway to visual interpretability").

A filter's aggregated conductance is the maximum over its H x W positions of the layer conductance
(Dhamdhere et al.) at a layer, here the trapezoid Riemann-Stieltjes sum over uniform nodes. The
ascent changes the input image to raise one filter's aggregated conductance, differentiating
through the conductance computation itself (a double backward), and keeps the image inside the
valid pixel range of the model's normalised space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from .checks import (
    as_args,
    check_baseline_tuple,
    check_count,
    check_input_tuple,
    check_model,
    expand_args,
)
from .errors import InputError
from .hooks import capture, frozen_parameters, preserved, resolve_layers
from .module_types import CONVOLUTIONS
from .normalization import normalized_range
from .quadrature import uniform_nodes
from .sums import trapezoid_sum
from .attention import attention_as_modules
from .sweep import interpolate, step_major
from .targets import normalize_target, target_scores
from .types import Baselines, Inputs, LayerSpec, TargetType

Bounds = Union[str, tuple, None]
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def last_conv(model: nn.Module) -> str:
    """The dotted name of the model's last convolution (in registration order)."""
    names = [name for name, module in model.named_modules() if isinstance(module, CONVOLUTIONS)]
    if not names:
        raise InputError("layer: the model has no convolution; name the layer")
    return names[-1]


def conductance_map(
    model: nn.Module, inputs: Inputs, layer: str, target: TargetType, n_steps: int = 20,
    baselines: Baselines = None, create_graph: bool = False, additional_forward_args: Any = None,
) -> Tensor:
    """Layer conductance ``(B, C, ...)`` of ``layer``'s output, differentiable w.r.t. ``inputs`` when
    ``create_graph``: ``sum_k (g_k + g_{k+1}) / 2 * (y_{k+1} - y_k)`` over nodes ``k / n_steps`` (the
    first at ``2**-60``, as :mod:`attrib.quadrature` explains): LayerConductance's ``stieltjes_trapezoid``.
    With several inputs (a tuple) every one is interpolated with the same alpha per row."""
    check_count("n_steps", n_steps)
    given = inputs if isinstance(inputs, tuple) else (inputs,)
    n, device = given[0].shape[0], given[0].device
    starts = check_baseline_tuple(baselines, tuple(x.detach() for x in given), not isinstance(inputs, tuple))
    alphas = torch.tensor(uniform_nodes(n_steps), dtype=given[0].dtype, device=device)  # first node 2**-60
    node, example = step_major(n, 0, (n_steps + 1) * n, device)
    rows = [interpolate(b, x - b, alphas, node, example) for x, b in zip(given, starts)]
    with frozen_parameters(model), capture(model, [layer], leaf=True) as cap, torch.enable_grad():
        output = model(*rows, *expand_args(as_args(additional_forward_args), example, n))
        values = cap[layer]
        scores = target_scores(output, target, example)
        (grads,) = torch.autograd.grad(scores.sum(), values, create_graph=create_graph)
    values = values.reshape((n_steps + 1, n) + tuple(values.shape[1:]))
    grads = grads.reshape(values.shape)
    return trapezoid_sum(grads, values)


def aggregated_conductance(
    model: nn.Module, inputs: Inputs, layer: LayerSpec, target: TargetType, n_steps: int = 20,
    baselines: Baselines = None, create_graph: bool = False, additional_forward_args: Any = None,
) -> Tensor:
    """Per filter ``(B, C)``: the maximum over positions of the layer conductance (differentiable)."""
    ((name, _),) = resolve_layers(model, layer)
    conductance = conductance_map(model, inputs, name, target, n_steps, baselines, create_graph, additional_forward_args)
    return conductance.flatten(2).amax(-1)


def _bounds(bounds: Bounds, inputs: Tensor) -> tuple[Tensor, Tensor] | None:
    if bounds is None:
        return None
    if isinstance(bounds, str):
        if bounds != "imagenet":
            raise InputError(f"bounds must be 'imagenet', (low, high) or None, got {bounds!r}")
        if inputs.dim() != 4 or inputs.shape[1] != 3:
            raise InputError("bounds: 'imagenet' needs (B, 3, H, W) inputs; give bounds=(low, high) for this model")
        low, high = normalized_range()
    elif isinstance(bounds, tuple) and len(bounds) == 2:
        low, high = (torch.as_tensor(b, dtype=torch.float64) for b in bounds)
    else:
        raise InputError(f"bounds must be 'imagenet', (low, high) or None, got {bounds!r}")
    if low.dim() == 1 and inputs.dim() > 1:
        if low.numel() != inputs.shape[1]:
            raise InputError(f"bounds: {low.numel()} per-channel values for {inputs.shape[1]} channels")
        low, high = (b.view((1, -1) + (1,) * (inputs.dim() - 2)) for b in (low, high))
    if bool((low > high).any()):
        raise InputError("bounds: low must not exceed high")
    return low.to(inputs), high.to(inputs)


@dataclass
class AscentResult:
    """``image``: the optimised input; ``objective`` ``(steps + 1, B)``: the filter's aggregated
    conductance before each step and after the last; ``filter`` ``(B,)``; ``conductance`` ``(B, C)``:
    every filter's aggregated conductance at the original input; ``neuron`` ``(B, spatial...)``: the
    position of the selected filter's strongest conductance there; ``gradient_effect``: the input
    gradient of that neuron's activation at the original input; ``mask``: where it is non-zero.

    >>> out = conductance_ascent(model, x, target=3)
    >>> out.image, out.objective[-1], out.filter   # optimised input, last objective, filter per example
    """

    image: Tensor
    objective: Tensor
    filter: Tensor
    conductance: Tensor
    neuron: Tensor
    gradient_effect: Tensor
    mask: Tensor
    layer: str


def conductance_ascent(
    model: nn.Module,
    inputs: Inputs,
    layer: LayerSpec | None = None,
    target: TargetType = None,
    filter: int | Sequence[int] | None = None,
    steps: int = 50,
    lr: float = 0.1,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
    n_steps: int = 20,
    baselines: Baselines = None,
    bounds: Bounds = "imagenet",
    additional_forward_args: Any = None,
    ascend: int = 0,
) -> AscentResult:
    """Maximise one filter's aggregated conductance at ``layer`` (default: the last convolution) by
    gradient ascent on the input. ``filter=None`` takes each example's top filter. ``bounds``: the
    valid range in the model's input space, ``"imagenet"`` (``(0 - mean) / std`` to ``(1 - mean) / std``
    per channel), ``(low, high)`` numbers or per-channel sequences, or ``None``; the image is clamped
    to it after every step. With several inputs (a tuple), ``ascend`` picks the one that is optimised
    (the conductance still interpolates all of them); ``image`` and ``gradient_effect`` are that input's.

    >>> out = conductance_ascent(vgg, x, target=3, steps=50, lr=0.1)
    >>> out.objective[-1] > out.objective[0]
    """
    check_model(model)
    given, single = check_input_tuple(model, inputs)
    if isinstance(ascend, bool) or not isinstance(ascend, int) or not 0 <= ascend < len(given):
        raise InputError(f"ascend: the index of the input to optimise, an int in [0, {len(given) - 1}], got {ascend!r}")
    target = normalize_target(target, given[0].shape[0])
    name = last_conv(model) if layer is None else resolve_layers(model, layer)[0][0]
    check_count("steps", steps, minimum=0)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    limits = _bounds(bounds, given[ascend])
    make = OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else optimizer
    if make is None:
        raise InputError(f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable(params, lr=...), got {optimizer!r}")

    def placed(image: Tensor) -> Inputs:
        return image if single else given[:ascend] + (image,) + given[ascend + 1:]

    def objective_of(image: Tensor, create_graph: bool) -> Tensor:
        return aggregated_conductance(model, placed(image), name, target, n_steps, baselines, create_graph,
                                      additional_forward_args)

    with preserved(model), attention_as_modules(model):  # the fused attention kernels have no double backward
        image = given[ascend].clone().requires_grad_(True)
        # the conductance at the input chooses the filter and is the first iteration's objective (one pass for both)
        conductance = conductance_map(model, placed(image), name, target, n_steps, baselines, steps > 0, additional_forward_args)
        if conductance.dim() < 3:
            raise InputError(f"layer: {name!r} gives shape {tuple(conductance.shape)}, without spatial dimensions; the "
                             "ascent maximises a filter's largest conductance over positions: choose a convolutional layer")
        scores, chosen, picked, neuron = _choose(conductance.detach(), filter, name)
        effect = _neuron_gradient(model, given, ascend, name, chosen, picked, additional_forward_args)

        history = _ascend(image, conductance, chosen, make([image], lr=lr), steps, limits, objective_of)
    return AscentResult(
        image=image.detach(), objective=torch.stack(history), filter=chosen, conductance=scores, neuron=neuron,
        gradient_effect=effect, mask=effect != 0, layer=name,
    )


def _ascend(image: Tensor, conductance: Tensor, chosen: Tensor, opt: torch.optim.Optimizer, steps: int,
            limits: tuple[Tensor, Tensor] | None, objective_of: Callable[[Tensor, bool], Tensor]) -> list[Tensor]:
    """``steps`` optimiser steps on ``image`` raising each example's ``chosen`` filter's objective
    (the first from ``conductance``, already at the input), clamped to ``limits`` after each; the
    objective before every step and at the end."""
    history = []
    for step in range(steps):
        opt.zero_grad()
        objective = conductance.flatten(2).amax(-1) if step == 0 else objective_of(image, True)
        value = objective.gather(1, chosen.view(-1, 1)).squeeze(1)
        history.append(value.detach())
        (-value.sum()).backward()
        opt.step()
        if limits is not None:
            with torch.no_grad():
                image.copy_(torch.maximum(torch.minimum(image, limits[1]), limits[0]))
    del conductance
    final = objective_of(image.detach(), False).gather(1, chosen.view(-1, 1)).squeeze(1)
    history.append(final.detach())
    return history


def _choose(conductance: Tensor, filter: int | Sequence[int] | None, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the conductance ``(B, C, ...)`` at the input: each filter's score (its largest conductance
    over positions), the filter ascended (``filter``, or each example's top one), the flat position of
    that filter's strongest neuron and the neuron's index tuple."""
    n = conductance.shape[0]
    scores = conductance.flatten(2).amax(-1)
    if filter is None:
        chosen = scores.argmax(1)
    else:
        chosen = torch.as_tensor(filter, device=conductance.device).reshape(-1).expand(n).long()
        if bool(((chosen < 0) | (chosen >= scores.shape[1])).any()):
            raise InputError(f"filter: {filter!r} is out of range for {scores.shape[1]} filters at {name!r}")
    picked = conductance[torch.arange(n), chosen].flatten(1).argmax(1)
    neuron = torch.stack(torch.unravel_index(picked, conductance.shape[2:]), 1)
    return scores, chosen, picked, neuron


def _neuron_gradient(model: nn.Module, inputs: tuple[Tensor, ...], ascend: int, layer: str, channel: Tensor,
                     position: Tensor, args: Any) -> Tensor:
    """d y[b, channel_b, position_b] / d x for each example (x: the input at position ``ascend``)."""
    n = inputs[0].shape[0]
    example = torch.arange(n, device=inputs[0].device)
    with frozen_parameters(model), capture(model, [layer]) as cap, torch.enable_grad():
        probe = inputs[ascend].clone().requires_grad_(True)
        model(*inputs[:ascend], probe, *inputs[ascend + 1:], *expand_args(as_args(args), example, n))
        values = cap[layer]
        picked = values[example, channel].flatten(1).gather(1, position.view(-1, 1))
        return torch.autograd.grad(picked.sum(), probe)[0]
