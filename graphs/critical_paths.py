"""Critical paths in a flow graph and the paper's neuron selection rule.

A path runs from the class node down to a node of the lowest chosen layer. Its **score** is the
product of the shares along it: the fraction of the class relevance that follows exactly this path
when every node splits its relevance in proportion to its flows (``carried = score * class
relevance``). Only edges with a positive share take part (a log of a non-positive share is not a
length), so the K best paths are the K shortest paths under the length ``-log share``. They are
found exactly by dynamic programming over the DAG (layers are topologically ordered): every node
keeps the K best partial paths that reach it.

Selection rule (the neuron-selection paper): a neuron is kept when its contribution exceeds the
mean minus one standard deviation of the contributions in its layer. We read "the difference
between forward and backward results" as follows: the forward result is the neuron's activation,
the backward result its relevance, and the contribution the paper compares is the relevance (what
the backward pass assigns to the neuron for the forward pass it saw), signed in the direction of
the explained score. The statistics run over *every* channel of the layer, not only the k in the
graph.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import networkx as nx
import torch

from attrib.checks import check_count

from .flow import CLASS_LAYER, FlowGraph


@dataclass(frozen=True)
class CriticalPath:
    """``nodes`` from the class node down; ``score`` = product of shares; ``carried`` = score x the
    class node's value (its relevance, or F(x) - F(x') for conductance).

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
    """The ``k`` paths with the largest score from the class node to the lowest layer, best first."""
    check_count("k", k)
    graph = flow.graph if graph is None else graph
    source = flow.class_node
    lowest = flow.layers[0]
    best: dict = {source: [(0.0, (source,))]}  # node -> up to k (length, path), length = sum of -log share
    order = sorted(graph.nodes, key=lambda node: -graph.nodes[node]["depth"])  # top layer first
    for node in order:
        if node not in best:
            continue
        for child in graph.successors(node):
            share = graph.edges[node, child]["share"]
            if not share > 0:
                continue
            step = -math.log(share)
            merged = best.setdefault(child, []) + [(length + step, path + (child,)) for length, path in best[node]]
            best[child] = heapq.nsmallest(k, merged)
    ends = [entry for node, entries in best.items() if node[0] == lowest for entry in entries]
    total = graph.nodes[source]["value"]
    return [CriticalPath(path, math.exp(-length), math.exp(-length) * total) for length, path in heapq.nsmallest(k, ends)]


def selected_neurons(flow: FlowGraph, std_factor: float = 1.0) -> dict[str, list[int]]:
    """Per layer, every channel whose value (relevance, or conductance) exceeds mean -
    ``std_factor`` x std over the layer."""
    kept = {}
    sign = 1.0 if flow.score >= 0 else -1.0  # contributions in the direction of the explained score
    for layer in flow.layers:
        values = flow.values[layer].double() * sign
        threshold = values.mean() - std_factor * (values.std(unbiased=False) if values.numel() > 1 else 0.0)
        kept[layer] = torch.nonzero(values > threshold).flatten().tolist()
    return kept


def pruned(flow: FlowGraph, std_factor: float = 1.0) -> nx.DiGraph:
    """The graph restricted to the class node and the nodes the selection rule keeps."""
    kept = selected_neurons(flow, std_factor)
    nodes = [node for node in flow.graph.nodes if node[0] == CLASS_LAYER or node[1] in set(kept.get(node[0], ()))]
    return flow.graph.subgraph(nodes).copy()
