"""Critical paths in a flow graph and the paper's neuron selection rule.

A path runs from the class node down to a node of the lowest chosen layer. Its **score** is the
product of the shares along it: the fraction of the class relevance that follows exactly this path
when every node splits its relevance in proportion to its flows (``carried = score * class
relevance``, the signed relevance the path delivers to its last node). Paths follow the relevance
the way it flows. Every layer has a direction, the sign of its total (``flow.directions``; the
class node's is the score's sign), and an edge takes part when its **oriented share**, share x the
direction of its upper layer x that of its lower layer, is positive: its flow has the direction of
its lower layer and leaves a node of its upper layer's direction (or both are reversed). Where
every direction is the score's sign (the ordinary case) the oriented share is the share. But a bias
(or epsilon) that absorbs more than the whole score reverses what flows below it: a positive logit
made of negative evidence and a large bias sends negative relevance down, every share out of the
class node is negative, and a rule of positive shares finds no path at all. The K best paths are
the K shortest under the length ``-log oriented share`` (a log of a non-positive number is not a
length); they are found exactly by dynamic programming over the DAG (layers are topologically
ordered): every node keeps the K best partial paths that reach it. A path's ``score`` keeps its
sign: for every path found, the class score's sign times the lowest layer's direction, so that
``carried`` has the lowest layer's direction. When no path exists, a warning says why.

Selection rule (the neuron-selection paper): a neuron is kept when its contribution exceeds the
mean minus one standard deviation of the contributions in its layer. We read "the difference
between forward and backward results" as follows: the forward result is the neuron's activation,
the backward result its relevance, and the contribution the paper compares is the relevance (what
the backward pass assigns to the neuron for the forward pass it saw), signed in the direction of
what flows through its layer (``flow.directions``: the explained score's sign in the ordinary
case). The statistics run over *every* channel of the layer, not only the k in the graph.
"""
from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass

import networkx as nx
import torch

from attrib.checks import check_count

from .flow import CLASS_LAYER, FlowGraph, direction_of


@dataclass(frozen=True)
class CriticalPath:
    """``nodes`` from the class node down; ``score`` = product of shares (signed: module docstring);
    ``carried`` = score x the class node's value (its relevance, or F(x) - F(x') for conductance).

    >>> best = k_best_paths(flow, 5)[0]
    >>> best.nodes, best.score, best.channels   # class -> lowest layer, product of shares, {layer: channel}
    """

    nodes: tuple
    score: float
    carried: float

    @property
    def channels(self) -> dict[str, int]:
        return {layer: channel for layer, channel in self.nodes if layer != CLASS_LAYER}


def k_best_paths(flow: FlowGraph, k: int, graph: nx.DiGraph | None = None) -> list[CriticalPath]:
    """The ``k`` paths with the largest |score| from the class node to the lowest layer, best first;
    every edge on them carries relevance in the direction of its layers (module docstring). Warns,
    saying why, when there is none."""
    check_count("k", k)
    graph = flow.graph if graph is None else graph
    source, lowest, along = flow.class_node, flow.layers[0], flow.directions
    direction = {node: along[node[0]] for node in graph.nodes if node != source}
    direction[source] = direction_of(flow.score)
    best: dict = {source: [(0.0, (source,))]}  # node -> up to k (length, path), length: sum of -log oriented share
    order = sorted(graph.nodes, key=lambda node: -graph.nodes[node]["depth"])  # top layer first
    for node in order:
        if node not in best:
            continue
        for child in graph.successors(node):
            share = graph.edges[node, child]["share"] * direction[node] * direction[child]  # oriented share
            if not share > 0:
                continue
            step = -math.log(share)
            merged = best.setdefault(child, []) + [(length + step, path + (child,)) for length, path in best[node]]
            best[child] = heapq.nsmallest(k, merged)
    ends = [entry for node, entries in best.items() if node[0] == lowest and node != source for entry in entries]
    if not ends:
        warnings.warn(_no_path_reason(flow, graph, best), stacklevel=2)
    total = graph.nodes[source]["value"]
    sign = direction[source] * along[lowest]  # every found path's product of shares has this sign
    return [CriticalPath(path, sign * math.exp(-length), sign * math.exp(-length) * total)
            for length, path in heapq.nsmallest(k, ends)]


def _no_path_reason(flow: FlowGraph, graph: nx.DiGraph, reached: dict) -> str:
    """Why no path reaches the lowest layer, and what to do."""
    depths = {node[0]: graph.nodes[node]["depth"] for node in reached}
    last = min(depths, key=depths.__getitem__)
    where = "the class node" if last == CLASS_LAYER else f"layer {last!r}"
    signs = ", ".join(f"{layer} {'+' if d > 0 else '-'}" for layer, d in reversed(flow.directions.items()))
    partial = any(len(flow.top[layer]) < flow.values[layer].numel() for layer in flow.layers)
    remedy = "build the graph with a larger k (more channels per layer), or " if partial else "every channel is kept; "
    return (f"k_best_paths: no path from the class node (score {flow.score:.4g}) to layer {flow.layers[0]!r} carries "
            f"relevance in the direction it flows (the sign of each layer's total, top down: {signs}): the paths stop "
            f"at {where}, whose kept nodes send nothing in that direction to the kept channels below (it goes to "
            "channels the graph left out, or a bias or epsilon that absorbs more than a unit's relevance reverses it). "
            f"To follow it, {remedy}explain with rules that leave biases out (e.g. Epsilon(bias=False)), which "
            "conserve relevance layer by layer (up to epsilon) so that it keeps the score's sign; flow.flows holds every "
            "flow. Returning no paths.")


def selected_neurons(flow: FlowGraph, std_factor: float = 1.0) -> dict[str, list[int]]:
    """Per layer, every channel whose value (relevance, or conductance) in the layer's direction
    exceeds mean - ``std_factor`` x std over the layer."""
    kept = {}
    along = flow.directions  # contributions in the direction of what flows through each layer
    for layer in flow.layers:
        values = flow.values[layer].double() * along[layer]
        threshold = values.mean() - std_factor * (values.std(unbiased=False) if values.numel() > 1 else 0.0)
        kept[layer] = torch.nonzero(values > threshold).flatten().tolist()
    return kept


def pruned(flow: FlowGraph, std_factor: float = 1.0) -> nx.DiGraph:
    """The graph restricted to the class node and the nodes the selection rule keeps."""
    kept = selected_neurons(flow, std_factor)
    nodes = [node for node in flow.graph.nodes if node[0] == CLASS_LAYER or node[1] in set(kept.get(node[0], ()))]
    return flow.graph.subgraph(nodes).copy()
