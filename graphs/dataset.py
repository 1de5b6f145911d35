"""Per-example path graphs for dataset runs (:func:`attrib.run_dataset`'s ``per_example``): each example's
LRP path graph (:func:`build_graph`), kept as flat edge and path arrays that the run's summary sums per class."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from attrib.errors import InputError
from .critical_paths import k_best_paths
from .export import node_id
from .flow import build_graph


@dataclass(frozen=True)
class PathGraphRows:
    """Every example's LRP path graph with ``k`` channels per layer under ``composite``: its edges
    (``graph_edge_row``, ``_source``, ``_target``, ``_weight``; node ids ``layer:channel``) and its ``paths``
    best paths (``graph_path_row``, ``graph_path``: node ids joined by ``>``, ``graph_path_score``). Rows
    count from the batch's first example (the run offsets them within the shard).

    >>> run_dataset(method, data, "runs/x", per_example=[PathGraphRows(k=4)])
    """

    k: int = 4
    paths: int = 5
    composite: str = "epsilon_plus"

    def __post_init__(self) -> None:
        from attrib.lrp import COMPOSITES

        for name, value in (("k", self.k), ("paths", self.paths)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if self.composite not in COMPOSITES:
            raise InputError(f"composite: unknown {self.composite!r}; known: {', '.join(sorted(COMPOSITES))}")

    def describe(self) -> dict:
        return {"kind": "path graphs", "k": self.k, "paths": self.paths, "composite": self.composite}

    def __call__(self, model: nn.Module, x: Tensor, targets: Tensor) -> dict[str, np.ndarray]:
        edge_rows, sources, ends, weights, path_rows, paths, scores = [], [], [], [], [], [], []
        for i in range(x.shape[0]):
            flow = build_graph(model, x[i:i + 1], target=int(targets[i]), k=self.k, composite=self.composite,
                               conductance_steps=None)
            for source, end, data in flow.graph.edges(data=True):
                edge_rows.append(i)
                sources.append(node_id(source))
                ends.append(node_id(end))
                weights.append(float(data["weight"]))
            for path in k_best_paths(flow, self.paths):
                path_rows.append(i)
                paths.append(">".join(node_id(node) for node in path.nodes))
                scores.append(float(path.score))
        return {"graph_edge_row": np.asarray(edge_rows, dtype=np.int64), "graph_edge_source": np.asarray(sources, dtype=str),
                "graph_edge_target": np.asarray(ends, dtype=str), "graph_edge_weight": np.asarray(weights, dtype=np.float64),
                "graph_path_row": np.asarray(path_rows, dtype=np.int64), "graph_path": np.asarray(paths, dtype=str),
                "graph_path_score": np.asarray(scores, dtype=np.float64)}
