"""GraphML and JSON (node-link) files of a flow graph. Node ids become ``"layer:channel"`` strings;
the attributes (numbers and strings) are kept as they are."""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

from .flow import FlowGraph


def node_id(node: tuple) -> str:
    return f"{node[0]}:{node[1]}"


def plain_graph(flow: FlowGraph, graph: nx.DiGraph | None = None) -> nx.DiGraph:
    """A copy with string node ids, ready for any writer."""
    graph = flow.graph if graph is None else graph
    return nx.relabel_nodes(graph, {node: node_id(node) for node in graph.nodes}, copy=True)


def write_graphml(flow: FlowGraph, path: str | Path, graph: nx.DiGraph | None = None) -> None:
    nx.write_graphml(plain_graph(flow, graph), str(path))


def write_json(flow: FlowGraph, path: str | Path, graph: nx.DiGraph | None = None) -> None:
    data = nx.node_link_data(plain_graph(flow, graph), edges="edges")
    Path(path).write_text(json.dumps(data, indent=1))
