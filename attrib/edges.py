"""Direct gradients between places in an autograd graph (used by LRP traces and conductance flows).

Places are ``GradientEdge``s taken when a tensor is made, so a later in-place operation on the
tensor (ResNet's ``out += identity``) does not move them. Going down from a root, the *frontier*
is the set of places reached first; a *direct* backward pass takes what arrives at each frontier
place and hands zeros on from there, so nothing is counted again through a lower place.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge


def frontier(root, places: dict[str, GradientEdge], order: Sequence[str], root_is_place: bool = False) -> list[str]:
    """Names of ``places`` reached first going down from autograd node ``root`` (in ``order``).
    The root itself counts only with ``root_is_place`` (the model output may be a place's own node)."""
    nodes = {edge.node: name for name, edge in places.items()}
    if root_is_place and root in nodes:
        return [nodes[root]]
    found, seen, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node is not root and node in nodes:
            found.add(nodes[node])
            continue
        stack.extend(child for child, _ in node.next_functions)
    return [name for name in order if name in found]


def direct_grads(
    root: Tensor | GradientEdge, grad: Tensor, places: dict[str, GradientEdge], shapes: dict[str, tuple],
    cut: bool = True, batched: bool = False,
) -> dict[str, Tensor]:
    """What arrives at each place when ``grad`` starts at ``root``; with ``cut``, nothing passes a
    place. ``batched``: ``grad`` has a leading dimension of independent starts (vmapped)."""
    if not places:
        return {}
    handles = []

    def stop(index: int) -> Callable:
        def hook(grads: tuple) -> tuple:
            return tuple(torch.zeros_like(g) if (i == index and g is not None) else g for i, g in enumerate(grads))
        return hook

    names = list(places)
    try:
        if cut:
            handles = [places[n].node.register_prehook(stop(places[n].output_nr)) for n in names]
        found = torch.autograd.grad(
            root, [places[n] for n in names], [grad], retain_graph=True, allow_unused=True, is_grads_batched=batched,
        )
    finally:
        for handle in handles:
            handle.remove()
    lead = (grad.shape[0],) if batched else ()
    return {
        name: torch.zeros(lead + tuple(shapes[name]), dtype=grad.dtype, device=grad.device) if value is None else value.detach()
        for name, value in zip(names, found)
    }
