"""Relevance flow between channels, as a networkx graph (the neuron-selection paper's network graph).

Nodes are ``(layer, channel)`` for the top-``k`` channels of every chosen layer, plus the class node
``("output", target)``. For the LRP graph the edge ``(L, c) -> (L', c')`` carries

    weight = the relevance arriving at channel c' of L' (summed over positions) when the backward
             pass starts from channel c of L alone (its full relevance, all other units zero), and
             stops at the first chosen layers below L (its *frontier*);
    share  = weight / relevance(L, c).

LRP is linear in the starting relevance for a fixed forward pass, so the flows from all channels of
L add up to the relevance of L' exactly; a node's flows to *all* channels of its frontier add up
to its relevance minus what its own layer absorbs (bias, epsilon): node attributes ``outflow`` and
``leak`` (0 for LRP-0 on bias-free networks). For the lowest layer, ``outflow`` is what reaches the
input. Residual connections appear as edges that skip layers: the
part of a node's relevance that takes the identity branch reaches an earlier layer directly.

All k channels of a layer go through one backward pass (k rows of one forward pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
import torch
from torch import Tensor, nn

from attrib import LayerActivation, LayerConductance
from attrib.engine import check_inputs
from attrib.hooks import LayerSpec, capture, resolve_layers
from attrib.lrp import LRP
from attrib.lrp.composites import Composite
from attrib.lrp.trace import RelevanceTrace
from attrib.targets import TargetType

CLASS_LAYER = "output"
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class FlowGraph:
    """A built graph and what it was built from.

    ``layers``: chosen layers in forward order; ``top[layer]``: its k channels by descending
    relevance; ``relevance[layer]``: relevance of every channel ``(C,)``; ``flows[upper][lower]``:
    ``(k, C_lower)`` direct flows from the upper layer's top channels (top: the largest relevance
    times the sign of the score) (``upper`` is ``"output"`` for
    the class node, one row); ``trace``: the kept LRP pass (for path heatmaps)."""

    graph: nx.DiGraph
    layers: list[str]
    target: Any
    score: float
    top: dict[str, list[int]]
    relevance: dict[str, Tensor]
    flows: dict[str, dict[str, Tensor]]
    trace: RelevanceTrace
    model: nn.Module
    inputs: Tensor
    seen_at: dict[str, str] = field(default_factory=dict)

    @property
    def class_node(self) -> tuple:
        return (CLASS_LAYER, self.target)


def default_layers(model: nn.Module, inputs: Tensor) -> list[str]:
    """Every Conv and Linear layer except the one that produces the model output."""
    names = [name for name, module in model.named_modules() if isinstance(module, LAYER_TYPES)]
    if not names:
        raise ValueError("layers: the model has no Conv or Linear layer; name the layers")
    with capture(model, names) as cap, torch.no_grad():
        output = model(inputs)
    if isinstance(output, Tensor):
        names = [n for n in names if not (cap[n].shape == output.shape and torch.equal(cap[n], output))]
    return names


def _per_channel(tensor: Tensor) -> Tensor:
    """Sum over every dimension after the channel one: ``(rows, C, ...) -> (rows, C)``."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1).sum(-1)


def build_graph(
    model: nn.Module,
    inputs: Tensor,
    target: TargetType,
    layers: Sequence[LayerSpec] | None = None,
    k: int = 8,
    composite: str | Composite = "epsilon_plus",
    conductance_steps: int | None = 16,
    additional_forward_args: Any = None,
) -> FlowGraph:
    """The LRP flow graph of one example (``inputs`` of batch 1) for ``target``.

    ``layers``: default every Conv and Linear layer but the output layer. ``k``: channels kept per
    layer (the top by relevance). ``conductance_steps``: steps for the node attribute
    ``conductance`` (layer conductance per channel, one batched pass for all layers); ``None``
    leaves it out.
    """
    inputs = check_inputs(model, inputs)
    if inputs.shape[0] != 1:
        raise ValueError(f"inputs: a graph explains one example; got a batch of {inputs.shape[0]}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    names = default_layers(model, inputs) if layers is None else [n for n, _ in resolve_layers(model, layers)]
    if not names:
        raise ValueError("layers: give at least one layer")
    lrp = LRP(model, composite)
    trace = lrp.trace(inputs, target, layers=names, copies=k, additional_forward_args=additional_forward_args)
    names = trace.names
    relevance = {name: _per_channel(trace.totals[name].unsqueeze(0))[0] for name in names}
    # channels are ranked by their relevance in the direction of the explained score (for a
    # negative score, the most negative channels carry it)
    sign = 1.0 if trace.score >= 0 else -1.0
    order = {name: torch.argsort(relevance[name] * sign, descending=True).tolist() for name in names}
    top = {name: order[name][:k] for name in names}
    target_key = target if not isinstance(target, Tensor) else int(target)
    if isinstance(target_key, list):
        target_key = target_key[0]

    flows: dict[str, dict[str, Tensor]] = {}
    to_input: dict[str, Tensor] = {}
    start_rows = torch.zeros_like(trace.start)
    start_rows[0] = trace.start[0]
    flows[CLASS_LAYER] = {lower: _per_channel(value)[:1] for lower, value in trace.propagate(None, start_rows).items()}
    for name in names:
        total = trace.totals[name]
        rows = torch.zeros((k,) + tuple(total.shape), dtype=total.dtype, device=total.device)
        for row, channel in enumerate(top[name]):
            rows[row, channel] = total[channel]
        flows[name] = {lower: _per_channel(value)[:len(top[name])] for lower, value in trace.propagate(name, rows).items()}
        if not flows[name]:  # nothing recorded below: the relevance goes to the input
            to_input[name] = trace.input_share(name, rows).reshape(k, -1).sum(1)[:len(top[name])]

    conductance = _conductance(model, inputs, target, names, conductance_steps, additional_forward_args)
    graph = nx.DiGraph(target=str(target_key), score=trace.score, composite=lrp.composite.name, method="lrp")
    depth = {name: i for i, name in enumerate(names)}
    class_node = (CLASS_LAYER, target_key)
    graph.add_node(class_node, layer=CLASS_LAYER, channel=str(target_key), depth=len(names), relevance=trace.score,
                   rank=0, outflow=0.0, leak=0.0)
    seen = sorted(set(trace.seen_at.values()))
    activations = LayerActivation(model, seen).attribute(inputs, additional_forward_args=additional_forward_args).attributions
    for name in names:
        activation = activations[trace.seen_at[name]][0]
        flat = activation.reshape(activation.shape[0], -1)
        rank = {channel: i for i, channel in enumerate(order[name])}
        for channel in top[name]:
            attributes = dict(
                layer=name, channel=channel, depth=depth[name], relevance=float(relevance[name][channel]),
                rank=rank[channel], act_mean=float(flat[channel].mean()), act_max=float(flat[channel].max()),
            )
            if conductance is not None:
                attributes["conductance"] = float(conductance[name][channel])
            graph.add_node((name, channel), **attributes)
    for upper, lowers in flows.items():
        sources = [class_node] if upper == CLASS_LAYER else [(upper, c) for c in top[upper]]
        for row, source in enumerate(sources):
            outflow = sum(float(flow[row].sum()) for flow in lowers.values())
            if upper in to_input:
                outflow = float(to_input[upper][row])
            graph.nodes[source]["outflow"] = outflow
            graph.nodes[source]["leak"] = graph.nodes[source]["relevance"] - outflow
            own = graph.nodes[source]["relevance"]
            for lower, flow in lowers.items():
                for channel in top[lower]:
                    weight = float(flow[row, channel])
                    graph.add_edge(source, (lower, channel), weight=weight, share=weight / own if own != 0 else 0.0)
    return FlowGraph(graph=graph, layers=names, target=target_key, score=trace.score, top=top, relevance=relevance,
                     flows=flows, trace=trace, model=model, inputs=inputs, seen_at=dict(trace.seen_at))


def _conductance(model, inputs, target, names, steps, additional_forward_args) -> dict[str, Tensor] | None:
    if steps is None:
        return None

    result = LayerConductance(model, names).attribute(
        inputs, target=target, n_steps=steps, additional_forward_args=additional_forward_args,
    )
    return {name: _per_channel(result.attributions[name])[0] for name in names}
