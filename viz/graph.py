"""Drawing a flow graph: layers stacked by depth (class node on top), channels left to right by
rank, edge width by share, the critical paths in red, node colour by value (with a colour bar);
and the K-path curves."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import SymmetricalLogLocator  # noqa: E402

from attrib.graphs.critical_paths import CriticalPath  # noqa: E402
from attrib.graphs.flow import CLASS_LAYER, FlowGraph  # noqa: E402


def layered_positions(flow: FlowGraph, graph: nx.DiGraph) -> dict:
    """x: rank within the layer, centred; y: depth."""
    by_layer: dict[str, list] = {}
    for node in graph.nodes:
        by_layer.setdefault(node[0], []).append(node)
    positions = {}
    for layer, nodes in by_layer.items():
        nodes.sort(key=lambda node: graph.nodes[node]["rank"])
        for i, node in enumerate(nodes):
            positions[node] = (i - (len(nodes) - 1) / 2, graph.nodes[node]["depth"])
    return positions


def draw_graph(
    flow: FlowGraph, paths: Sequence[CriticalPath] = (), path: str | Path | None = None, graph: nx.DiGraph | None = None,
    title: str | None = None,
):
    """Draw the graph (or a pruned one); returns the figure and writes a PNG when ``path`` is given."""
    graph = flow.graph if graph is None else graph
    positions = layered_positions(flow, graph)
    on_path = {(a, b) for p in paths for a, b in zip(p.nodes[:-1], p.nodes[1:])}
    width = max(7.0, 0.9 * max((sum(1 for n in graph.nodes if n[0] == layer) for layer in flow.layers), default=1))
    fig, ax = plt.subplots(figsize=(width, 0.55 * len(flow.layers) + 2.5))
    shares = np.array([abs(d["share"]) for _, _, d in graph.edges(data=True)] or [0.0])
    top = float(np.quantile(shares, 0.99)) if shares.size else 1.0
    top = top if top > 0 else 1.0
    for (a, b), data in zip(graph.edges, graph.edges.values()):
        if (a, b) in on_path:
            continue
        (x0, y0), (x1, y1) = positions[a], positions[b]
        share = data["share"]
        ax.plot([x0, x1], [y0, y1], color="#1f77b4" if share >= 0 else "#7f7f7f", alpha=0.35,
                linewidth=0.2 + 2.0 * min(abs(share) / top, 1.0), zorder=1)
    for a, b in sorted(on_path):  # a fixed drawing order (a set's order follows the hash seed)
        if a in positions and b in positions:
            (x0, y0), (x1, y1) = positions[a], positions[b]
            ax.plot([x0, x1], [y0, y1], color="#d62728", linewidth=2.2, zorder=3)
    nodes = list(graph.nodes)
    peak: dict[str, float] = {}
    for node in nodes:  # colours are scaled per layer: values shrink with depth
        peak[node[0]] = max(peak.get(node[0], 0.0), abs(graph.nodes[node]["value"]))
    colour = np.array([graph.nodes[n]["value"] / (peak[n[0]] or 1.0) for n in nodes])
    xs, ys = zip(*(positions[n] for n in nodes))
    dots = ax.scatter(xs, ys, c=colour, cmap="bwr", vmin=-1, vmax=1, s=90, edgecolors="black", linewidths=0.5, zorder=4)
    for node in nodes:
        x, y = positions[node]
        if node[0] == CLASS_LAYER:
            ax.annotate(f"class {node[1]}", (x, y), textcoords="offset points", xytext=(8, 4), fontsize=9)
        else:
            ax.annotate(str(node[1]), (x, y), textcoords="offset points", xytext=(0, -13), fontsize=6, ha="center", zorder=5)
    depths = sorted({(graph.nodes[n]["depth"], n[0]) for n in graph.nodes})
    ax.set_yticks([d for d, _ in depths])
    ax.set_yticklabels([layer if layer != CLASS_LAYER else "class" for _, layer in depths], fontsize=8)
    ax.set_xticks([])
    what = "relevance" if graph.graph.get("method", "lrp") == "lrp" else "conductance"
    bar = fig.colorbar(dots, ax=ax, fraction=0.03, pad=0.01, ticks=[-1, 0, 1])
    bar.set_label(f"node {what} / largest |{what}| in its layer", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    ax.set_xlabel(f"channels ranked by {what} in the direction it flows (left = strongest), numbered\n"
                  f"red: critical paths; edge width: share; node colour: {what} per layer (blue < 0 < red)", fontsize=8)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"{what} flow for class {flow.target}, score {flow.score:.3g} ({len(paths)} critical paths)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def draw_k_curves(curves, path: str | Path | None = None, threshold: float | None = None):
    """Against K: the shape distance of the K-path heatmap to the full one (unit-L1 maps, 0..2;
    ``threshold`` and the K it chooses marked), and the share of the relevance / score the K paths
    carry (symlog: shares of a deep network's paths span many decades and may be negative)."""
    fig, (shape, amount) = plt.subplots(1, 2, figsize=(9, 3.4))
    shape.plot(curves.ks, curves.heatmap_distance, marker="s", label="heatmap shape distance")
    shape.set_ylim(0, 2)
    shape.set_xlabel("K (critical paths kept)")
    shape.set_ylabel("sum |a/|a|_1 - b/|b|_1|\n(0 same shape, 2 nothing in common)", fontsize=8)
    if threshold is not None:
        chosen = curves.choose(threshold)
        shape.axhline(threshold, color="#d62728", linestyle="--", linewidth=1,
                      label=f"threshold {threshold:g}: " + (f"K = {chosen}" if chosen is not None else "no K reaches it"))
        if chosen is not None:
            shape.axvline(chosen, color="#d62728", linestyle=":", linewidth=1)
    shape.legend(fontsize=8)
    amount.plot(curves.ks, curves.heatmap_share, marker="s", label="sum of K-path map / sum of full map")
    amount.plot(curves.ks, curves.score_share, marker="o", label="masked score / full score")
    values = np.array([v for v in list(curves.heatmap_share) + list(curves.score_share) if np.isfinite(v)])
    if values.size and (values > 0).all():
        amount.set_yscale("log")
    else:  # negative shares too: symmetric log, linear only below the smallest non-zero |share|
        nonzero = np.abs(values[values != 0])
        linthresh = float(nonzero.min()) if nonzero.size else 1e-12
        amount.set_yscale("symlog", linthresh=linthresh)
        decades = max(1, math.ceil(math.log10(max(1.0, float(nonzero.max()) if nonzero.size else 1.0) / linthresh) / 6))
        amount.yaxis.set_major_locator(SymmetricalLogLocator(linthresh=linthresh, base=10.0 ** decades))
    amount.axhline(1.0, color="#7f7f7f", linewidth=0.8)
    amount.set_xlabel("K (critical paths kept)")
    amount.set_ylabel("share carried by the K paths", fontsize=8)
    amount.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
