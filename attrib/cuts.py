"""Which layers are cuts: layers that every path from the input to the output crosses.

Completeness (the conductance of a layer adds up to F(x) - F(x')) is a property of cuts only: a
layer that a skip connection bypasses (a convolution inside a residual block, one branch of an
Inception module) carries only part of the score change, and that share is what its conductance
sums to. A layer is a cut when, in the autograd graph of one forward pass, the output's node cannot
reach the input without passing through the node that made the layer's output.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .checks import as_args, check_inputs
from .errors import InputError
from .hooks import capture, frozen_parameters, preserved, resolve_layers
from .module_types import CONVOLUTIONS
from .types import LayerSpec


def _nodes(start: Any, blocked: Any = None) -> Iterator[Any]:
    """Every node of the autograd graph reachable from ``start`` without visiting ``blocked`` (a node or
    a list of nodes)."""
    stack, seen = [start], {id(b) for b in blocked} if isinstance(blocked, list) else {id(blocked)}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def _reaches(start: Any, goal: Any, blocked: Any) -> bool:
    """Whether ``goal`` is reachable from ``start`` in the autograd graph without visiting ``blocked``."""
    return any(node is goal for node in _nodes(start, blocked))


def cut_layers(
    model: nn.Module, inputs: Tensor, layers: LayerSpec | Sequence[LayerSpec], additional_forward_args: Any = None,
    interpolate_at: str | None = None, together: bool = False,
) -> dict[str, bool]:
    """``{layer: whether every path from the input to the output crosses it}`` for one forward pass
    (the first example of ``inputs`` is enough: the structure does not depend on the values). A layer
    that runs more than once, or whose output does not depend on the input, is not a cut.

    ``interpolate_at``: paths start at that layer's output instead of the input (token models; the
    inputs may be integers). ``together``: one more entry, under ``"+".join(layers)``, says whether every
    path crosses at least one of the layers (the branches of an Inception block, the parallel
    convolutions of a text CNN)."""
    resolved = resolve_layers(model, layers)
    made: dict[str, list] = {name: [] for name, _ in resolved}

    def record(name: str):
        def hook(module, args, output):
            made[name].append(output.grad_fn if isinstance(output, Tensor) else None)
        return hook

    probes: list[Tensor] = []
    with ExitStack() as stack:
        stack.enter_context(preserved(model))
        stack.enter_context(frozen_parameters(model))
        stack.enter_context(torch.enable_grad())
        if interpolate_at is None:
            probe = check_inputs(model, inputs)[:1].clone().requires_grad_(True)
            fed = probe.clone()
        else:
            fed = check_inputs(model, inputs, differentiable=False)[:1]
            def start_here(value: Tensor) -> Tensor:
                probes.append(value.detach().requires_grad_(True))
                return probes[-1]

            stack.enter_context(capture(model, [interpolate_at], substitute={interpolate_at: start_here}))
        handles = [module.register_forward_hook(record(name)) for name, module in resolved]
        try:
            output = model(fed, *as_args(additional_forward_args))
        finally:
            for handle in handles:
                handle.remove()
        probe = probe if interpolate_at is None else probes[0]
    if not isinstance(output, Tensor) or output.grad_fn is None:
        raise InputError("inputs: the model output is not a tensor that depends on the inputs")
    start = output.grad_fn
    leaf = _leaf_of(start, probe)
    found = {name: len(nodes) == 1 and nodes[0] is not None and _reaches(start, nodes[0], None)
             and not _reaches(start, leaf, nodes[0]) for name, nodes in made.items()}
    if together:
        ends = [nodes[0] for nodes in made.values() if len(nodes) == 1 and nodes[0] is not None]
        found["+".join(made)] = len(ends) == len(made) and not _reaches(start, leaf, ends)
    return found


def _leaf_of(start: Any, probe: Tensor) -> Any:
    """The graph node that accumulates the gradient of ``probe``."""
    for node in _nodes(start):
        if type(node).__name__ == "AccumulateGrad" and node.variable is probe:
            return node
    raise InputError("inputs: the model output does not depend on the inputs")


def default_layer(model: nn.Module, inputs: Tensor, additional_forward_args: Any = None) -> str | None:
    """The layer to explain by default: the last convolution that runs, if it is a cut; otherwise the
    outermost block around it that is a cut (torchvision's ResNet18: ``layer4``, not
    ``layer4.1.conv2``). ``None`` when no convolution runs."""
    ran: list[str] = []
    handles = [module.register_forward_hook(lambda module, args, output, name=name: ran.append(name))
               for name, module in model.named_modules() if isinstance(module, CONVOLUTIONS)]
    try:
        with preserved(model), torch.no_grad():
            model(check_inputs(model, inputs)[:1].clone(), *as_args(additional_forward_args))
    finally:
        for handle in handles:
            handle.remove()
    if not ran:
        return None
    last = ran[-1]
    parts = last.split(".")
    candidates = [last] + [".".join(parts[:i]) for i in range(1, len(parts))]  # itself, then outermost first
    cuts = cut_layers(model, inputs, candidates, additional_forward_args)
    for name in candidates:
        if cuts[name]:
            return name
    return last
