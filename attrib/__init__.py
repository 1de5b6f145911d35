"""attrib: attribution for PyTorch — batched Riemann-Stieltjes conductance, integrated gradients and more."""
from .ascent import AscentResult, aggregated_conductance, conductance_ascent
from .backprop import DeconvNet, GuidedBackprop
from .cam import GradCAM, GuidedGradCAM
from .conductance import LayerConductance, NeuronConductance
from .deconv import DeconvReconstruction
from .deeplift import DeepLift
from .errors import InputError, InputTypeError
from .gradients import InputXGradient, IntegratedGradients, Saliency, SmoothGrad
from .hooks import LayerReuseError, capture, mask, preserved, resolve_layers
from .lrp import LRP
from .layer import InternalInfluence, LayerActivation, LayerGradientXActivation
from .paths import METHODS
from .result import Attribution, filter_scores, top_filters

__all__ = [
    "AscentResult",
    "Attribution",
    "DeconvNet",
    "DeconvReconstruction",
    "DeepLift",
    "GradCAM",
    "GuidedBackprop",
    "GuidedGradCAM",
    "InputError",
    "InputTypeError",
    "InputXGradient",
    "Saliency",
    "SmoothGrad",
    "aggregated_conductance",
    "conductance_ascent",
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
