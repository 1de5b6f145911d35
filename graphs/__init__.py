"""Critical-neuron path graphs (networkx), built on attrib's LRP and conductance."""
from .critical_paths import CriticalPath, k_best_paths, pruned, selected_neurons
from .dataset import PathGraphRows
from .export import node_id, plain_graph, write_graphml, write_json
from .flow import CLASS_LAYER, FlowGraph, build_graph, default_layers
from .heatmaps import (
                       PLATEAU_TOLERANCE,
                       SHAPE_THRESHOLD,
                       KCurves,
                       full_heatmap,
                       k_curves,
                       mse,
                       path_heatmaps,
                       path_scores,
                       shape_distance,
                       share,
                       smape,
                       unit_l1,
)

__all__ = [
    "CLASS_LAYER", "FlowGraph", "KCurves", "PLATEAU_TOLERANCE", "CriticalPath", "PathGraphRows", "SHAPE_THRESHOLD", "build_graph", "default_layers",
    "full_heatmap", "k_best_paths", "k_curves", "mse", "node_id", "path_heatmaps", "path_scores", "plain_graph", "pruned",
    "selected_neurons", "shape_distance", "share", "smape", "unit_l1", "write_graphml", "write_json",
]
