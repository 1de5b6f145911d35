"""K-path heatmaps and the curves that choose K (the neuron-selection paper's MSE / SMAPE).

A K-path heatmap is the input relevance when, at every chosen layer, the relevance of the channels
not on any of the K best paths is set to zero during the backward pass (the same kept forward pass
as the graph). The score curve keeps only the path channels in a plain forward pass (the others'
activations set to zero at the layer's output) and compares the target score with the full one.

    SMAPE(a, b) = mean |a - b| / ((|a| + |b|) / 2)   (terms with a = b = 0 count 0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attrib.engine import expand_args
from attrib.hooks import capture, mask
from attrib.targets import normalize_target, target_scores

from .flow import FlowGraph
from .paths import Path, k_best_paths


def smape(a: Tensor, b: Tensor) -> float:
    scale = (a.abs() + b.abs()) / 2
    terms = torch.where(scale > 0, (a - b).abs() / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    return float(terms.mean())


def mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).square().mean())


def _masks(flow: FlowGraph, path_sets: list[list[Path]]) -> dict[str, Tensor]:
    """Per layer ``(len(path_sets), C)``: 1 on channels that lie on a path of each set."""
    masks = {}
    for layer in flow.layers:
        channels = flow.values[layer].shape[0]
        weights = torch.zeros(len(path_sets), channels, dtype=flow.inputs.dtype, device=flow.inputs.device)
        for row, paths in enumerate(path_sets):
            for path in paths:
                channel = path.channels.get(layer)
                if channel is not None:
                    weights[row, channel] = 1
        masks[layer] = weights
    return masks


def _trace(flow: FlowGraph):
    if flow.trace is None:
        raise ValueError("flow: K-path heatmaps come from the LRP pass; build the graph with method='lrp'")
    return flow.trace


def path_heatmaps(flow: FlowGraph, path_sets: list[list[Path]]) -> Tensor:
    """``(len(path_sets), *input)``: the input relevance keeping only each set's path channels."""
    trace = _trace(flow)
    copies = trace.copies
    masks = _masks(flow, path_sets)
    maps = []
    for start in range(0, len(path_sets), copies):
        rows = min(copies, len(path_sets) - start)
        keep = {}
        for layer, weights in masks.items():
            block = torch.zeros(copies, weights.shape[1], dtype=weights.dtype, device=weights.device)
            block[:rows] = weights[start:start + rows]
            keep[layer] = block
        maps.append(trace.to_input(trace.start, keep)[:rows])
    return torch.cat(maps)


def full_heatmap(flow: FlowGraph) -> Tensor:
    """The input relevance with nothing masked (the same pass)."""
    trace = _trace(flow)
    return trace.to_input(trace.start)[0]


def path_scores(flow: FlowGraph, path_sets: list[list[Path]]) -> Tensor:
    """Target score ``(len(path_sets),)`` with only each set's path channels kept in the forward pass
    (masked at the module that carries each layer's relevance: its BatchNorm when folded)."""
    masks = _masks(flow, path_sets)
    rows = len(path_sets)
    x = flow.inputs.expand((rows,) + tuple(flow.inputs.shape[1:]))
    modules = {flow.seen_at.get(layer, layer): layer for layer in flow.layers}
    edit = {}
    for module, layer in modules.items():
        weights = masks[layer]
        edit[module] = mask(weights.reshape(weights.shape + (1,) * (len(flow.shapes[layer]) - 1)))
    target = normalize_target(flow.target, rows)
    with capture(flow.model, list(modules), edit=edit), torch.no_grad():
        output = flow.model(x, *expand_args(flow.args, torch.zeros(rows, dtype=torch.long, device=x.device), 1))
    return target_scores(output, target, torch.arange(rows, device=x.device))


@dataclass
class KCurves:
    """For K = 1..N: the masked score and heatmap against the full ones."""

    ks: list[int]
    scores: list[float]
    score_mse: list[float]
    score_smape: list[float]
    heatmap_mse: list[float]
    heatmap_smape: list[float]
    full_score: float

    def choose(self, threshold: float, metric: str = "heatmap_smape") -> int | None:
        """The smallest K whose ``metric`` is at most ``threshold`` (None if none is)."""
        if metric not in ("score_mse", "score_smape", "heatmap_mse", "heatmap_smape"):
            raise ValueError(f"metric must be one of score_mse, score_smape, heatmap_mse, heatmap_smape; got {metric!r}")
        for k, value in zip(self.ks, getattr(self, metric)):
            if value <= threshold:
                return k
        return None


def k_curves(flow: FlowGraph, max_k: int = 10) -> KCurves:
    """MSE and SMAPE of the K-path score and heatmap against the full ones, K = 1..``max_k``."""
    paths = k_best_paths(flow, max_k)
    ks = list(range(1, len(paths) + 1))
    sets = [paths[:k] for k in ks]
    with torch.no_grad():
        full_score = float(target_scores(flow.model(flow.inputs, *flow.args), normalize_target(flow.target, 1), torch.zeros(1, dtype=torch.long)))
    reference = torch.tensor([full_score], dtype=flow.inputs.dtype)
    scores = path_scores(flow, sets).detach().cpu()
    if flow.trace is not None:
        full = full_heatmap(flow)
        maps = path_heatmaps(flow, sets)
        heat_mse, heat_smape = [mse(m, full) for m in maps], [smape(m, full) for m in maps]
    else:
        heat_mse = heat_smape = [float("nan")] * len(ks)
    return KCurves(
        ks=ks, scores=scores.tolist(),
        score_mse=[mse(s.view(1), reference) for s in scores],
        score_smape=[smape(s.view(1), reference) for s in scores],
        heatmap_mse=heat_mse, heatmap_smape=heat_smape, full_score=full_score,
    )
