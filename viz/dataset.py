"""The summary page of a dataset run (``attrib run``): per-class filter statistics as heatmaps, the
class-level path graphs, and the numbers of ``aggregates.json`` in tables."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .figures import save  # noqa: E402
from .report import STYLE, _fmt, _src, _table  # noqa: E402


def class_heatmap(values: np.ndarray, classes: list[str], title: str, label: str, signed: bool = True):
    """Classes x channels."""
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.22 * values.shape[1]), 1.2 + 0.35 * len(classes)))
    if signed:
        bound = float(np.nanmax(np.abs(values))) or 1.0
        drawn = ax.imshow(values, aspect="auto", cmap="bwr", vmin=-bound, vmax=bound, interpolation="nearest")
    else:
        drawn = ax.imshow(values, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_ylabel("class")
    ax.set_xlabel("channel")
    ax.set_title(title, fontsize=10)
    fig.colorbar(drawn, ax=ax, label=label, fraction=0.03)
    fig.tight_layout()
    return fig


def _layer_order(edges: dict) -> list[str]:
    """Layers from the class node down (edges run from an upper layer to a lower one)."""
    import networkx as nx

    layers = nx.DiGraph()
    for source, end in edges:
        upper, lower = source.rpartition(":")[0], end.rpartition(":")[0]
        if upper != lower:
            layers.add_edge(upper, lower)
    try:
        return list(nx.topological_sort(layers))
    except nx.NetworkXUnfeasible:
        return sorted(layers.nodes)


def class_graph_figure(edges: dict, title: str, most: int = 40):
    """The class-level graph: layers as columns from the class node (left) down, the ``most`` edges with
    the largest summed |weight|, drawn with width by weight (red > 0, blue < 0)."""
    order = _layer_order(edges)
    kept = sorted(edges.items(), key=lambda item: -abs(item[1][0]))[:most]
    nodes = sorted({node for (source, end), _ in kept for node in (source, end)},
                   key=lambda n: (order.index(n.rpartition(":")[0]) if n.rpartition(":")[0] in order else 0, n))
    column: dict[str, list[str]] = {}
    for node in nodes:
        column.setdefault(node.rpartition(":")[0], []).append(node)
    position: dict[str, tuple[float, float]] = {}
    for x, layer in enumerate(order):
        members = column.get(layer, [])
        for y, node in enumerate(members):
            position[node] = (x, y - (len(members) - 1) / 2)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(order)), 4.5))
    largest = max((abs(weight) for _, (weight, _) in kept), default=1.0) or 1.0
    for (source, end), (weight, count) in kept:
        if source in position and end in position:
            (x0, y0), (x1, y1) = position[source], position[end]
            ax.plot([x0, x1], [y0, y1], color="#c0392b" if weight > 0 else "#2e5fa8", alpha=0.7,
                    linewidth=0.5 + 4 * abs(weight) / largest, zorder=1)
    for node, (px, py) in position.items():
        ax.scatter([px], [py], s=220, color="white", edgecolors="#333", zorder=2)
        ax.annotate(node.rpartition(":")[2], (px, py), fontsize=7, ha="center", va="center", zorder=3)
    ax.set_xticks(range(len(order)), order, rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def write_summary_page(folder: Path, manifest: dict, result: dict, merged: dict) -> None:
    """Figures and ``index.html`` in ``folder`` (a staging folder of the summary)."""
    config = manifest["config"]
    classes = sorted(result["classes"], key=int)
    keys = list(manifest.get("keys") or [])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>attrib run summary</title><style>{STYLE}</style>"
             "</head><body>", "<h1>attrib run: per-class summary</h1>"]
    method = config["method"]["class"].rpartition(".")[2]
    parts.append("<p>" + html.escape(
        f"{config['count']} examples of {config['dataset']['class'].rpartition('.')[2]} in {manifest['shards']} shards; "
        f"method {method} ({', '.join(f'{k}={v}' for k, v in config['attribute_kwargs'].items()) or 'defaults'}); "
        f"target: {config['target']}; model weights {config['model'][:12]}…; top-k = {result['top_k']}") + "</p>")
    rows = [[c, result["classes"][c]["count"]] + [", ".join(str(m["channel"]) for m in
                                                          result["classes"][c]["layers"][key]["most_frequent"][:3])
                                                for key in keys] for c in classes]
    parts.append("<h2>Classes</h2><p class='small'>Per class: examples, and per map the channels most often among an "
                 f"example's top {result['top_k']}.</p>")
    parts.append(_table(rows, ["class", "examples"] + [f"most frequent at {key}" for key in keys]))
    for j, key in enumerate(keys):
        means = np.array([result["classes"][c]["layers"][key]["mean"] for c in classes])
        counts = np.array([result["classes"][c]["layers"][key]["top_k_counts"] for c in classes], dtype=float)
        shares = counts / np.array([[result["classes"][c]["count"]] for c in classes], dtype=float)
        for name, fig, caption in (
            (f"mean_{j}.png", class_heatmap(means, classes, f"{key}: mean per class", "mean channel sum"),
             f"{key}: the mean over each class's examples of every channel's summed attribution (std in aggregates.json)"),
            (f"topk_{j}.png", class_heatmap(shares, classes, f"{key}: share of examples with the channel in their top "
                                                           f"{result['top_k']}", "share of the class's examples", signed=False),
             f"{key}: how often each channel is among an example's top {result['top_k']}, per class"),
        ):
            save(fig, folder / name)
            parts.append(f"<figure><img src='{_src(name)}' alt='{html.escape(name)}'><figcaption>{html.escape(caption)}"
                         "</figcaption></figure>")
    agreement = [(c, layer, found) for c in classes for layer, found in result["classes"][c]["ablation_agreement"].items()]
    if agreement:
        parts.append("<h2>Ablation agreement</h2><p class='small'>Per example, the correlation of the method's channel sums "
                     "with the drop in the target's score when each channel is zeroed; mean ± std over the class.</p>")
        parts.append(_table([[c, layer, f"{_fmt(f['pearson']['mean'])} ± {_fmt(f['pearson']['std'])}",
                              f"{_fmt(f['spearman']['mean'])} ± {_fmt(f['spearman']['std'])}",
                              f['pearson']['undefined']] for c, layer, f in agreement],
                            ["class", "layer", "Pearson", "Spearman", "undefined"]))
    graphs = [c for c in classes if merged[int(c)]["edges"]]
    if graphs:
        parts.append("<h2>Class-level path graphs</h2><p class='small'>Every edge of the examples' LRP path graphs, its "
                     "weight summed over the class (class_&lt;c&gt;.graphml and .json hold all of them; the figure the 40 "
                     "heaviest); and the paths that recur among the examples' best paths.</p>")
        for c in graphs:
            name = f"graph_{c}.png"
            save(class_graph_figure(merged[int(c)]["edges"], f"class {c}: summed edge weights"), folder / name)
            parts.append(f"<h3>class {html.escape(c)}</h3><figure><img src='{_src(name)}' alt='{html.escape(name)}'>"
                         f"<figcaption>files: class_{html.escape(c)}.graphml, class_{html.escape(c)}.json</figcaption></figure>")
            recurring = result["classes"][c]["recurring_paths"][:5]
            parts.append(_table([[" → ".join(p["nodes"]), p["examples"], p["mean_score"]] for p in recurring],
                                ["path", "examples", "mean score"]))
    parts.append("</body></html>")
    (folder / "index.html").write_text("\n".join(parts))
