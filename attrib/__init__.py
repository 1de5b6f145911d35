"""attrib: attribution for PyTorch — batched Riemann-Stieltjes conductance, integrated gradients and more."""
from .conductance import LayerConductance, NeuronConductance
from .gradients import IntegratedGradients
from .hooks import LayerReuseError, capture, mask, preserved, resolve_layers
from .lrp import LRP
from .layer import InternalInfluence, LayerActivation, LayerGradientXActivation
from .paths import METHODS
from .result import Attribution, filter_scores, top_filters

__all__ = [
    "Attribution",
    "IntegratedGradients",
    "InternalInfluence",
    "LayerActivation",
    "LayerConductance",
    "LayerGradientXActivation",
    "LRP",
    "LayerReuseError",
    "METHODS",
    "NeuronConductance",
    "capture",
    "filter_scores",
    "mask",
    "preserved",
    "resolve_layers",
    "top_filters",
]
__version__ = "0.1.0"
