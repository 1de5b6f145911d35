"""Critical-neuron path graphs (networkx), built on attrib's LRP and conductance."""
from .export import node_id, plain_graph, write_graphml, write_json
from .flow import CLASS_LAYER, FlowGraph, build_graph, default_layers
from .heatmaps import KCurves, full_heatmap, k_curves, mse, path_heatmaps, path_scores, smape
from .paths import Path, k_best_paths, pruned, selected_neurons

__all__ = [
    "CLASS_LAYER", "FlowGraph", "KCurves", "Path", "build_graph", "default_layers", "full_heatmap", "k_best_paths",
    "k_curves", "mse", "node_id", "path_heatmaps", "path_scores", "plain_graph", "pruned", "selected_neurons", "smape",
    "write_graphml", "write_json",
]
