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
``leak`` (0 for LRP-0 on bias-free networks). What reaches the input without passing a chosen
layer (the lowest layer's relevance, or a skip connection around every chosen layer) counts as
outflow. Residual connections appear as edges that skip layers: the
part of a node's relevance that takes the identity branch reaches an earlier layer directly.

Every layer has a *direction*, the sign of its total (:func:`directions`): the top-``k`` channels
are those with the largest value times it. It is the score's sign in the ordinary case, but a
bias that absorbs more than the whole score (a positive logit made of negative evidence plus a
large bias, or the reverse) leaves relevance of the opposite sign flowing below it; ranking in
the score's direction would keep the channels that carry the least.

All k channels of a layer go through one backward pass (k rows of one forward pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from attrib import LayerActivation, LayerConductance
from attrib.checks import (
    as_args,
    check_baselines,
    check_count,
    check_inputs,
    expand_args,
)
from attrib.edges import direct_grads, frontier
from attrib.errors import InputError
from attrib.hooks import capture, frozen_parameters, resolve_layers
from attrib.lrp import LRP
from attrib.lrp.composites import Composite
from attrib.lrp.trace import RelevanceTrace
from attrib.module_types import LINEAR_LAYERS
from attrib.quadrature import uniform_nodes
from attrib.sums import trapezoid_sum
from attrib.sweep import interpolate, step_major
from attrib.targets import normalize_target, target_scores
from attrib.types import INPUT, Baselines, LayerSpec, TargetType

CLASS_LAYER = "output"


@dataclass
class FlowGraph:
    """A built graph and what it was built from.

    ``layers``: chosen layers in forward order; ``top[layer]``: its k channels by descending
    value times the layer's direction (``directions``: the sign of the layer's total);
    ``values[layer]``: the flowing quantity (relevance or conductance) of every channel ``(C,)``;
    ``flows[upper][lower]``: ``(k, C_lower)`` direct flows from the upper layer's top channels
    (``upper`` is ``"output"`` for the class node, one row); ``trace``: the kept LRP pass (for
    path heatmaps).

    >>> flow = build_graph(model, x[:1], target=3, k=8)
    >>> flow.graph.number_of_nodes(), flow.values['features.28']   # nodes; relevance per channel
    """

    graph: nx.DiGraph
    layers: list[str]
    target: Any
    score: float
    top: dict[str, list[int]]
    values: dict[str, Tensor]
    flows: dict[str, dict[str, Tensor]]
    trace: RelevanceTrace | None
    model: nn.Module
    inputs: Tensor
    seen_at: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)  # per example, (C, ...)
    args: tuple = ()  # additional_forward_args, for the masked forward passes

    @property
    def class_node(self) -> tuple:
        return (CLASS_LAYER, self.target)

    @property
    def directions(self) -> dict[str, float]:
        """Per layer, +1.0 or -1.0: the direction of the relevance (conductance) flowing through it."""
        return directions(self.values, self.score)


def default_layers(model: nn.Module, inputs: Tensor, additional_forward_args: Any = None) -> list[str]:
    """Every Conv and Linear layer that runs in the forward pass, except the one that produces the
    model output (modules that do not run in eval mode, such as auxiliary heads, are left out)."""
    names = [name for name, module in model.named_modules() if isinstance(module, LINEAR_LAYERS)]
    if not names:
        raise InputError("layers: the model has no Conv or Linear layer; name the layers")
    with capture(model, names) as cap, torch.no_grad():
        output = model(inputs, *as_args(additional_forward_args))
        ran = dict(cap.captured)
    names = [n for n in names if n in ran]
    if isinstance(output, Tensor):
        names = [n for n in names if not (ran[n].shape == output.shape and torch.equal(ran[n], output))]
    return names


def _per_channel(tensor: Tensor) -> Tensor:
    """Sum over every dimension after the channel one: ``(rows, C, ...) -> (rows, C)``."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1).sum(-1)


@dataclass
class _Parts:
    """What a method computes before the graph is assembled."""

    names: list[str]
    values: dict[str, Tensor]                # per channel (C,)
    flows: dict[str, dict[str, Tensor]]      # upper -> lower -> (rows, C_lower)
    to_input: dict[str, Tensor]              # per top channel, what reaches the input directly
    top: dict[str, list[int]]
    score: float
    seen_at: dict[str, str]
    trace: RelevanceTrace | None = None


def direction_of(value: float, otherwise: float = 1.0) -> float:
    """+1.0 or -1.0 by the sign of ``value``; ``otherwise`` for 0."""
    return 1.0 if value > 0 else -1.0 if value < 0 else otherwise


def directions(values: dict[str, Tensor], score: float) -> dict[str, float]:
    """Per layer, the direction (+1.0 or -1.0) of what flows through it: the sign of the layer's
    total over every channel (the score's sign where the total is 0). It can differ from the
    score's sign: a bias (or epsilon) that absorbs more than the whole score leaves relevance of
    the opposite sign flowing below it."""
    return {name: direction_of(float(value.sum()), direction_of(score)) for name, value in values.items()}


def _rank(values: dict[str, Tensor], score: float, k: int) -> tuple[dict, dict]:
    """Channels ordered by their value in the direction of what flows through their layer (where
    that is negative the most negative channels carry it); the first k are the graph's."""
    along = directions(values, score)
    order = {name: torch.argsort(value * along[name], descending=True).tolist() for name, value in values.items()}
    return order, {name: channels[:k] for name, channels in order.items()}


def _one_channel_rows(total: Tensor, channels: list[int], rows: int) -> Tensor:
    """``(rows, *total.shape)``: row i keeps only channel ``channels[i]`` of ``total``."""
    out = torch.zeros((rows,) + tuple(total.shape), dtype=total.dtype, device=total.device)
    for row, channel in enumerate(channels):
        out[row, channel] = total[channel]
    return out


def _lrp_parts(model, inputs, target, names, k, composite, args) -> _Parts:
    lrp = LRP(model, composite)
    trace = lrp.trace(inputs, target, layers=names, copies=k, additional_forward_args=args)
    names = trace.names
    values = {name: _per_channel(trace.totals[name].unsqueeze(0))[0] for name in names}
    _, top = _rank(values, trace.score, k)
    start_rows = torch.zeros_like(trace.start)
    start_rows[0] = trace.start[0]
    flows, to_input = {}, {}
    for upper, rows, count in [(None, start_rows, 1)] + [(n, _one_channel_rows(trace.totals[n], top[n], k), len(top[n])) for n in names]:
        found = trace.propagate(upper, rows)
        direct = found.pop(INPUT, None)
        key = CLASS_LAYER if upper is None else upper
        flows[key] = {lower: _per_channel(v)[:count] for lower, v in found.items()}
        if direct is not None:  # relevance that reaches the input without passing a chosen layer
            to_input[key] = direct.reshape(direct.shape[0], -1).sum(1)[:count]
    return _Parts(names, values, flows, to_input, top, trace.score, dict(trace.seen_at), trace)


def _stieltjes_per_channel(v: Tensor, path: Tensor) -> Tensor:
    """Per channel, the trapezoid Stieltjes sum of gradients ``v`` along the layer's ``path``
    ``(1, nodes, C, ...)``: ``(nodes, C, ...)`` -> ``(C,)``, or batched ``(r, nodes, C, ...)`` -> ``(r, C)``."""
    batched = v.dim() == path.dim()
    terms = trapezoid_sum(v if batched else v.unsqueeze(0), path, dim=1)
    per_channel = terms.reshape(terms.shape[0], terms.shape[1], -1).sum(-1)
    return per_channel if batched else per_channel[0]


def _conductance_flows(total: Tensor, grads: dict[str, Tensor], places: dict[str, GradientEdge], shapes: dict,
                       paths: dict[str, Tensor], names: list[str], top: dict[str, list[int]]) -> tuple[dict, dict]:
    """From the class node and from each kept channel of each layer, one backward pass to the layers
    of its frontier: the conductance each lower channel receives through it (``flows``), and what
    reaches the input directly (``to_input``)."""
    order = names + [INPUT]
    flows, to_input = {}, {}
    for upper in [None] + names:
        root: Tensor | GradientEdge
        if upper is None:
            root, start, key, batched = total, torch.ones_like(total), CLASS_LAYER, False
            below = frontier(total.grad_fn, places, order)
        else:
            start = torch.zeros((len(top[upper]),) + shapes[upper], dtype=total.dtype, device=total.device)
            for row, channel in enumerate(top[upper]):
                start[row, :, channel] = grads[upper][:, channel]
            root, key, batched = places[upper], upper, True
            below = frontier(places[upper].node, places, order)
        found = direct_grads(root, start, {n: places[n] for n in below}, shapes, batched=batched)
        found = {n: (v if batched else v.unsqueeze(0)) for n, v in found.items()}
        direct = found.pop(INPUT, None)
        flows[key] = {lower: _stieltjes_per_channel(v, paths[lower]) for lower, v in found.items()}
        if direct is not None:  # what reaches the input without passing a chosen layer (x - x' inner product)
            to_input[key] = _stieltjes_per_channel(direct, paths[INPUT]).sum(1)
    return flows, to_input


def _conductance_parts(model, inputs, target, names, k, n_steps, baselines, args) -> _Parts:
    """Conductance flows: the conductance of channel c' of a lower layer carried on the paths that
    go through channel c of the upper layer, ``sum_k (v_k + v_{k+1}) / 2 * (y'_{k+1} - y'_k)`` over
    uniform nodes 0..1, where ``v_k`` is dF/dy' through c only (the gradient at the upper layer masked
    to c, taken down to y'). Summed over every c of the layers whose frontier holds y', it is the
    conductance of c' (exactly); summed over every c', the conductance of c up to the Riemann error."""
    check_count("n_steps", n_steps)
    baselines = check_baselines(baselines, inputs)
    alphas = torch.tensor(uniform_nodes(n_steps), dtype=inputs.dtype, device=inputs.device)  # first node 2**-60
    nodes = n_steps + 1
    node, example = step_major(1, 0, nodes, inputs.device)  # one example: row k is node k
    with frozen_parameters(model), capture(model, names) as cap, torch.enable_grad():
        rows = interpolate(baselines, inputs - baselines, alphas, node, example)
        rows.requires_grad_(True)
        output = model(rows, *expand_args(as_args(args), example, 1))
        scores = target_scores(output, normalize_target(target, 1) if not callable(target) else target, example)
        missing = [name for name in names if name not in cap.captured or not cap[name].requires_grad]
        if missing:
            raise InputError(f"layers: {missing} are not on the input's graph")
        names = [name for name in cap.captured if name in names]  # the order they ran in
        tensors = {name: cap[name] for name in names}
        places = {name: get_gradient_edge(tensors[name]) for name in names}
        places[INPUT] = get_gradient_edge(rows)
        tensors[INPUT] = rows
        shapes = {name: tuple(tensors[name].shape) for name in places}
        total = scores.sum()
        grads = direct_grads(total, torch.ones_like(total), {n: places[n] for n in names}, shapes, cut=False)
        paths = {name: tensors[name].detach().unsqueeze(0) for name in places}
        values = {name: _stieltjes_per_channel(grads[name], paths[name]) for name in names}
        score = float((scores[-1] - scores[0]).detach())
        _, top = _rank(values, score, k)
        flows, to_input = _conductance_flows(total, grads, places, shapes, paths, names, top)
    return _Parts(names, values, flows, to_input, top, score, {n: n for n in names})


def build_graph(
    model: nn.Module,
    inputs: Tensor,
    target: TargetType,
    layers: Sequence[LayerSpec] | None = None,
    k: int = 8,
    composite: str | Composite = "epsilon_plus",
    method: str = "lrp",
    n_steps: int = 16,
    baselines: Baselines = None,
    conductance_steps: int | None = 16,
    additional_forward_args: Any = None,
) -> FlowGraph:
    """The flow graph of one example (``inputs`` of batch 1) for ``target``.

    ``method="lrp"`` (default): LRP relevance flows under ``composite``. ``method="conductance"``:
    conductance flows over ``n_steps`` from ``baselines`` (see :func:`_conductance_parts`).
    ``layers``: default every Conv and Linear layer but the output layer. ``k``: channels kept per
    layer (the top by value). ``conductance_steps``: steps for the LRP graph's node attribute
    ``conductance`` (layer conductance per channel, one batched pass for all layers); ``None``
    leaves it out. Node attribute ``value`` is what flows (relevance or conductance).
    """
    inputs = check_inputs(model, inputs)
    if inputs.shape[0] != 1:
        raise InputError(f"inputs: a graph explains one example; got a batch of {inputs.shape[0]}")
    check_count("k", k)
    if method not in ("lrp", "conductance"):
        raise InputError(f"method must be 'lrp' or 'conductance', got {method!r}")
    names = default_layers(model, inputs, additional_forward_args) if layers is None else [n for n, _ in resolve_layers(model, layers)]
    if not names:
        raise InputError("layers: give at least one layer")
    if method == "lrp":
        parts = _lrp_parts(model, inputs, target, names, k, composite, additional_forward_args)
        conductance = _conductance(model, inputs, target, parts.names, conductance_steps, additional_forward_args)
        assert parts.trace is not None  # the LRP parts keep their trace
        meta: dict[str, Any] = dict(method="lrp", composite=parts.trace.composite.name)
    else:
        parts = _conductance_parts(model, inputs, target, names, k, n_steps, baselines, additional_forward_args)
        conductance = parts.values
        meta = dict(method="conductance", n_steps=n_steps)
    target_key = target if not isinstance(target, Tensor) else int(target)
    if isinstance(target_key, list):
        target_key = target_key[0]
    return _assemble(model, inputs, target_key, parts, conductance, meta, additional_forward_args)


def _assemble(model, inputs, target_key, parts: _Parts, conductance, meta, args) -> FlowGraph:
    names, top, values = parts.names, parts.top, parts.values
    graph = nx.DiGraph(target=str(target_key), score=parts.score, **meta)
    depth = {name: i for i, name in enumerate(names)}
    class_node = (CLASS_LAYER, target_key)
    graph.add_node(class_node, layer=CLASS_LAYER, channel=str(target_key), depth=len(names), value=parts.score,
                   rank=0, outflow=0.0, leak=0.0)
    seen = sorted(set(parts.seen_at.values()))
    activations = LayerActivation(model, seen).attribute(inputs, additional_forward_args=args).attributions
    order, _ = _rank(values, parts.score, max(len(t) for t in top.values()))
    for name in names:
        activation = activations[parts.seen_at[name]][0]
        flat = activation.reshape(activation.shape[0], -1)
        rank = {channel: i for i, channel in enumerate(order[name])}
        for channel in top[name]:
            attributes = dict(
                layer=name, channel=channel, depth=depth[name], value=float(values[name][channel]),
                rank=rank[channel], act_mean=float(flat[channel].mean()), act_max=float(flat[channel].max()),
            )
            if meta["method"] == "lrp":
                attributes["relevance"] = attributes["value"]
            if conductance is not None:
                attributes["conductance"] = float(conductance[name][channel])
            graph.add_node((name, channel), **attributes)
    for upper, lowers in parts.flows.items():
        sources = [class_node] if upper == CLASS_LAYER else [(upper, c) for c in top[upper]]
        for row, source in enumerate(sources):
            own = graph.nodes[source]["value"]
            outflow = sum(float(f[row].sum()) for f in lowers.values())
            if upper in parts.to_input:
                outflow += float(parts.to_input[upper][row])
            graph.nodes[source]["outflow"] = outflow
            graph.nodes[source]["leak"] = own - outflow
            for lower, flow in lowers.items():
                for channel in top[lower]:
                    weight = float(flow[row, channel])
                    graph.add_edge(source, (lower, channel), weight=weight, share=weight / own if own != 0 else 0.0)
    return FlowGraph(graph=graph, layers=names, target=target_key, score=parts.score, top=top, values=values,
                     flows=parts.flows, trace=parts.trace, model=model, inputs=inputs, seen_at=dict(parts.seen_at),
                     shapes={name: tuple(activations[parts.seen_at[name]].shape[1:]) for name in names},
                     args=as_args(args))


def _conductance(model, inputs, target, names, steps, additional_forward_args) -> dict[str, Tensor] | None:
    if steps is None:
        return None
    result = LayerConductance(model, names).attribute(
        inputs, target=target, n_steps=steps, additional_forward_args=additional_forward_args,
    )
    return {name: _per_channel(result.attributions[name])[0] for name in names}
