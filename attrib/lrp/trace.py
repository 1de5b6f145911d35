"""A kept LRP forward pass for many partial backward passes: relevance between chosen layers.

The path graphs need, for each of k channels of a layer, the relevance that reaches the layers
below when the backward pass starts from that channel alone. A trace runs the forward pass once
with ``copies`` identical rows of one example; a backward pass then starts at any recorded layer
with a different relevance in every row (one channel each), and stops at the next recorded layers
below (its *frontier*): relevance arriving there is taken and not passed further, so each number
is the *direct* flow, never counted twice through a lower recorded layer.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ..checks import as_args, check_count, check_inputs
from ..edges import direct_grads, frontier
from ..errors import InputError
from ..hooks import resolve_layers
from ..targets import normalize_target, target_scores
from ..types import INPUT, LayerSpec, TargetType
from .composites import Composite
from .plan import ViewCache, make_plan
from .run import Run

OUTPUT = "<output>"


class RelevanceTrace:
    """One example, ``copies`` rows, forward pass kept. ``names``: the recorded layers in forward
    order; ``totals[name]``: the full relevance at each (one row); ``start``: the relevance at the
    output; ``score``: the explained score; ``seen_at[name]``: the module whose output carries the
    layer's relevance (its BatchNorm when the two are folded).

    >>> trace = LRP(model, "epsilon_plus").trace(x[:1], target=3, layers=["features.26", "features.28"], copies=8)
    >>> flows = trace.propagate("features.28", masked)   # {"features.26": (8, C, H, W)}
    """

    def __init__(
        self, model: nn.Module, composite: Composite, inputs: Tensor, target: TargetType, layers: Sequence[LayerSpec],
        copies: int, additional_forward_args: Any = None, start: str = "score", views: ViewCache | None = None,
    ) -> None:
        inputs = check_inputs(model, inputs)
        if inputs.shape[0] != 1:
            raise InputError(f"inputs: a trace follows one example, got a batch of {inputs.shape[0]}")
        check_count("copies", copies)
        if start not in ("score", "one_hot"):
            raise InputError(f"start must be 'score' or 'one_hot', got {start!r}")
        target = normalize_target(target, 1)
        if isinstance(target, list):
            target = target[0]
        resolved = resolve_layers(model, layers)
        self.copies = copies
        views = ViewCache() if views is None else views
        self.composite = composite
        self.run = Run(model, composite, make_plan(model, composite, views), views, {name: (module, "out") for name, module in resolved})
        self.run.per_layer = False
        self.input = inputs.expand((copies,) + tuple(inputs.shape[1:])).clone().requires_grad_(True)
        output = self.run.forward((self.input,), as_args(additional_forward_args))
        with torch.enable_grad():
            if not isinstance(output, Tensor) or not output.requires_grad:
                raise InputError("inputs: the model output is not a tensor that depends on the inputs")
            rows = torch.arange(copies, device=inputs.device)
            scores = target_scores(output, target, rows)
            (selection,) = torch.autograd.grad(scores.sum(), output, retain_graph=True)
        missing = [name for name, _ in resolved if name not in self.run.outputs]
        if missing:
            raise InputError(f"layers: {missing} did not run between the input and the output")
        order = {name: i for i, name in enumerate(self.run.edges)}
        self.names = sorted((name for name, _ in resolved), key=order.__getitem__)
        self.edges = {name: self.run.edges[name] for name in self.names}
        self.shapes = {name: tuple(self.run.outputs[name].shape) for name in self.names}
        # a recorded Linear/Conv folded with the BatchNorm after it is seen at the BatchNorm's output
        folded = dict(row.name.split("+", 1) for row in self.run.rows if "+" in row.name)
        self.seen_at = {name: folded.get(name, name) for name in self.names}
        self.output = output
        self.start = (selection if start == "one_hot" else output.detach() * selection).detach()
        self.score = float(scores[0].detach())
        # the input as a place too: relevance that reaches it without passing a recorded layer
        self._places = dict(self.edges, **{INPUT: get_gradient_edge(self.input)})
        self.shapes[INPUT] = tuple(self.input.shape)
        self.totals = {name: value[0] for name, value in self._backward(output, self.start, self.names, cut=False).items()}

    def frontier(self, upper: str | None, with_input: bool = False) -> list[str]:
        """The recorded layers reached first going down from ``upper`` (``None``: the output); with
        ``with_input``, also :data:`INPUT` when relevance reaches the input without passing one."""
        root = self.output.grad_fn if upper is None else self.edges[upper].node
        places = self._places if with_input else self.edges
        return frontier(root, places, self.names + ([INPUT] if with_input else []), root_is_place=upper is None)

    def propagate(self, upper: str | None, relevance: Tensor) -> dict[str, Tensor]:
        """Relevance ``(copies, ...)`` at each frontier layer of ``upper`` when the backward pass
        starts with ``relevance`` (``(copies, ...)``) at ``upper``'s output (``None``: the model output);
        under the key :data:`INPUT`, what reaches the input directly (the lowest layer's relevance,
        or a skip connection around every recorded layer)."""
        root = self.output if upper is None else self.edges[upper]
        shape = tuple(self.output.shape) if upper is None else self.shapes[upper]
        if tuple(relevance.shape) != shape:
            raise InputError(f"relevance: expected shape {shape} at {upper or OUTPUT!r}, got {tuple(relevance.shape)}")
        return self._backward(root, relevance, self.frontier(upper, with_input=True), cut=True)

    def to_input(self, relevance: Tensor, keep: dict[str, Tensor] | None = None) -> Tensor:
        """Input relevance ``(copies, ...)`` from ``relevance`` at the output, multiplying the relevance
        at each layer in ``keep`` by its mask (``(copies, C)``, per row and channel) on the way down."""
        handles = []

        def scale(weights: Tensor, index: int) -> Callable:
            def hook(grads: tuple) -> tuple:
                scaled = list(grads)
                scaled[index] = scaled[index] * weights.to(scaled[index].dtype)
                return tuple(scaled)
            return hook

        try:
            for name, weights in (keep or {}).items():
                edge = self.edges[name]
                shaped = weights.reshape(tuple(weights.shape) + (1,) * (len(self.shapes[name]) - 2))
                handles.append(edge.node.register_prehook(scale(shaped, edge.output_nr)))
            (found,) = torch.autograd.grad([self.output], [self.input], [relevance], retain_graph=True, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return torch.zeros_like(self.input) if found is None else found.detach()

    def _backward(self, root, relevance: Tensor, names: list[str], cut: bool) -> dict[str, Tensor]:
        self.run.final_pass = False
        return direct_grads(root, relevance, {n: self._places[n] for n in names}, self.shapes, cut=cut)
