"""Per-class aggregates of a dataset run (:mod:`attrib.dataset_run`), merged across ranks.

Every rank reduces the shards it owns, shard by shard, to partial statistics; ``all_gather_object``
brings them to rank 0, which merges them **in shard order** (so the result does not depend on how many
processes ran) and writes ``out/summary/``:

- ``aggregates.json``: per class (the explained target) and per map (layer):
  - ``count``, and per channel the ``mean`` and ``std`` of the per-example channel sums (a layer's
    filter conductance, for conductance; merged by Chan's pairwise update of count, mean and M2);
  - ``top_k_counts``: per channel, in how many examples it is among the example's ``top_k`` channels
    (by value), and ``most_frequent``: the channels counted most often;
  - ``ablation_agreement`` (runs with ``ablation_layers``): per example, the Pearson and Spearman
    correlation of the method's channel sums with the ablation scores at that layer (the drop in the
    target's score when the channel is zeroed, :func:`attrib.evaluate.ablation_scores`); their mean and
    spread per class, and the number of examples where either is undefined (a constant side);
- ``class_<c>.graphml`` / ``.json`` (runs with :class:`attrib.graphs.PathGraphRows`): the class-level
  path graph, every edge of the examples' LRP path graphs with its weight **summed** over the class's examples (``weight``), the number
  of examples it appears in (``examples``) and the mean (``mean_weight``); and the class's recurring paths
  (the examples' best paths, counted) in ``aggregates.json``;
- with a ``page`` writer (the CLI's: :func:`attrib.viz.dataset.write_summary_page`), figures and
  ``index.html``. The folder is staged: complete or absent.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np



def _moments(values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean(0)
    return values.shape[0], mean, ((values - mean) ** 2).sum(0)


def _merge_moments(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s pairwise update of (count, mean, M2)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta ** 2 * (na * nb / n)


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: Pearson of a and b, Spearman (Pearson of average ranks); nan where a side is constant."""
    import torch

    from .evaluate import pearson, spearman

    left, right = torch.as_tensor(np.asarray(a, dtype=np.float64)), torch.as_tensor(np.asarray(b, dtype=np.float64))
    return pearson(left, right).numpy(), spearman(left, right).numpy()


def shard_partial(arrays: dict[str, np.ndarray], keys: list[str], ablation_layers: list[str], top_k: int) -> dict:
    """One shard's statistics per class (plain Python and numpy: they travel through all_gather_object)."""
    target = np.asarray(arrays["target"])
    partial: dict[int, dict] = {}
    for c in sorted(set(target.tolist())):
        rows = np.flatnonzero(target == c)
        entry: dict[str, Any] = {"count": int(rows.size), "layers": {}, "top": {}, "agreement": {}, "edges": {}, "paths": {}}
        for j, key in enumerate(keys):
            values = np.asarray(arrays[f"filters__{j}"])[rows]
            entry["layers"][key] = _moments(values)
            k = min(top_k, values.shape[1])
            top = np.argsort(-values, axis=1, kind="stable")[:, :k]
            entry["top"][key] = np.bincount(top.reshape(-1), minlength=values.shape[1]).astype(np.int64)
        for j, layer in enumerate(ablation_layers):
            if layer not in keys:
                continue
            ablation = np.asarray(arrays[f"ablation__{j}"])[rows]
            ours = np.asarray(arrays[f"filters__{keys.index(layer)}"])[rows]
            pearson_r, spearman_r = _correlations(ours, ablation)
            entry["agreement"][layer] = {name: [float(v) for v in values]
                                         for name, values in (("pearson", pearson_r), ("spearman", spearman_r))}
        if "graph_edge_row" in arrays:
            chosen = set(rows.tolist())
            for row, source, end, weight in zip(arrays["graph_edge_row"], arrays["graph_edge_source"],
                                                arrays["graph_edge_target"], arrays["graph_edge_weight"]):
                if int(row) in chosen:
                    total = entry["edges"].setdefault((str(source), str(end)), [0.0, 0])
                    total[0] += float(weight)
                    total[1] += 1
            for row, path, score in zip(arrays["graph_path_row"], arrays["graph_path"], arrays["graph_path_score"]):
                if int(row) in chosen:
                    total = entry["paths"].setdefault(str(path), [0, 0.0])
                    total[0] += 1
                    total[1] += float(score)
        partial[int(c)] = entry
    return partial


def merge(into: dict, partial: dict) -> dict:
    """``partial`` (a later shard's) added to ``into``, class by class."""
    for c, entry in partial.items():
        if c not in into:
            into[c] = {"count": 0, "layers": {}, "top": {}, "agreement": {}, "edges": {}, "paths": {}}
        kept = into[c]
        kept["count"] += entry["count"]
        for key, moments in entry["layers"].items():
            kept["layers"][key] = _merge_moments(kept["layers"][key], moments) if key in kept["layers"] else moments
        for key, counts in entry["top"].items():
            kept["top"][key] = kept["top"][key] + counts if key in kept["top"] else counts
        for layer, found in entry["agreement"].items():
            own = kept["agreement"].setdefault(layer, {"pearson": [], "spearman": []})
            for name in ("pearson", "spearman"):
                own[name] = own[name] + found[name]
        for edge, (weight, count) in entry["edges"].items():
            total = kept["edges"].setdefault(edge, [0.0, 0])
            total[0] += weight
            total[1] += count
        for path, (count, score) in entry["paths"].items():
            total = kept["paths"].setdefault(path, [0, 0.0])
            total[0] += count
            total[1] += score
    return into


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "examples": 0, "undefined": len(values)}
    array = np.asarray(finite)
    return {"mean": float(array.mean()), "std": float(array.std()), "examples": len(finite),
            "undefined": len(values) - len(finite)}


def finished(merged: dict, top_k: int, most: int = 5) -> dict:
    """The merged statistics as the JSON the summary writes."""
    classes = {}
    for c in sorted(merged):
        entry = merged[c]
        layers = {}
        for key, (count, mean, m2) in entry["layers"].items():
            counts = entry["top"][key]
            order = np.argsort(-counts, kind="stable")[:most]
            layers[key] = {"mean": [float(v) for v in mean], "std": [float(v) for v in np.sqrt(m2 / count)],
                           "top_k_counts": [int(v) for v in counts],
                           "most_frequent": [{"channel": int(i), "examples": int(counts[i])} for i in order if counts[i] > 0]}
        paths = sorted(entry["paths"].items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
        classes[str(c)] = {
            "count": entry["count"], "layers": layers,
            "ablation_agreement": {layer: {name: _spread(values) for name, values in found.items()}
                                   for layer, found in entry["agreement"].items()},
            "recurring_paths": [{"nodes": path.split(">"), "examples": count, "mean_score": score / count}
                                for path, (count, score) in paths[:10]],
            "graph_edges": len(entry["edges"]),
        }
    return {"top_k": top_k, "classes": classes}


def class_graph(edges: dict) -> Any:
    """A networkx DiGraph of a class's summed edges (node ids ``layer:channel``)."""
    import networkx as nx

    graph = nx.DiGraph()
    for (source, end), (weight, count) in sorted(edges.items()):
        for node in (source, end):
            if node not in graph:
                layer, _, channel = node.rpartition(":")
                graph.add_node(node, layer=layer, channel=channel)
        graph.add_edge(source, end, weight=weight, examples=count, mean_weight=weight / count)
    return graph


def summarise(run: Any, place: Any, mine: list[int], top_k: int, page: Any = None) -> dict | None:
    """Every rank reduces its shards (``run``: the :class:`attrib.dataset_run.DatasetRun`; ``place``: its
    ``World``); rank 0 merges in shard order and writes ``summary/``. Returns the aggregates on rank 0
    (None elsewhere)."""
    config = run.manifest["config"]
    ablation_layers = list(config.get("extras", {}).get("ablation_layers") or [])
    partials = [(shard, shard_partial(run.shard_arrays(shard), run.keys, ablation_layers, top_k)) for shard in mine]
    if place.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * place.size if place.rank == 0 else []
        dist.gather_object(partials, gathered if place.rank == 0 else None, dst=0)
        partials = [item for part in gathered for item in part] if place.rank == 0 else []
    result = None
    if place.rank == 0:
        merged: dict = {}
        for _, partial in sorted(partials, key=lambda item: item[0]):
            merge(merged, partial)
        result = finished(merged, top_k)
        _write(run, merged, result, page)
    if place.distributed:
        import torch.distributed as dist

        dist.barrier()
    return result


def _write(run: Any, merged: dict, result: dict, page: Any) -> None:
    import networkx as nx

    from .report_folder import staged

    with staged(run.folder / "summary") as folder:
        (folder / "aggregates.json").write_text(json.dumps(result, indent=1))
        for c in sorted(merged):
            if merged[c]["edges"]:
                graph = class_graph(merged[c]["edges"])
                nx.write_graphml(graph, folder / f"class_{c}.graphml")
                (folder / f"class_{c}.json").write_text(json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
        if page is not None:
            page(folder, run.manifest, result, merged)
