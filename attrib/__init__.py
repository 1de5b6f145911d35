"""attrib: attribution for PyTorch — batched Riemann-Stieltjes conductance, integrated gradients and more.

The names below are imported on first use (PEP 562), so ``import attrib`` and the ``attrib`` command start
at once and an interrupt during the heavy imports is handled like any other."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AscentResult": "ascent",
    "aggregated_conductance": "ascent",
    "conductance_ascent": "ascent",
    "DeconvNet": "backprop",
    "GuidedBackprop": "backprop",
    "GradCAM": "cam",
    "GuidedGradCAM": "cam",
    "LayerConductance": "conductance",
    "NeuronConductance": "conductance",
    "DeconvReconstruction": "deconv",
    "DatasetRun": "dataset_run",
    "load_run": "dataset_run",
    "run_dataset": "dataset_run",
    "DeepLift": "deeplift",
    "DeepLiftShap": "deeplift",
    "NeuronDeconvolution": "neuron",
    "NeuronGradient": "neuron",
    "NeuronGuidedBackprop": "neuron",
    "NeuronIntegratedGradients": "neuron",
    "InputError": "errors",
    "InputTypeError": "errors",
    "InputXGradient": "gradients",
    "IntegratedGradients": "gradients",
    "Saliency": "gradients",
    "SmoothGrad": "gradients",
    "LayerReuseError": "hooks",
    "explicit_attention": "attention",
    "head_scores": "attention",
    "HeadConductance": "attention",
    "attention_rollout": "rollout",
    "patches_to_image": "rollout",
    "capture": "hooks",
    "mask": "hooks",
    "preserved": "hooks",
    "resolve_layers": "hooks",
    "LRP": "lrp",
    "InternalInfluence": "layer_attribution",
    "LayerActivation": "layer_attribution",
    "LayerGradientXActivation": "layer_attribution",
    "NoiseTunnel": "noise",
    "GradientShap": "shap",
    "QUADRATURE_METHODS": "quadrature",
    "Attribution": "result",
    "filter_scores": "result",
    "top_filters": "result",
    "token_scores": "result",
}

__all__ = [
    "AscentResult",
    "Attribution",
    "DatasetRun",
    "DeconvNet",
    "DeconvReconstruction",
    "DeepLift",
    "DeepLiftShap",
    "GradCAM",
    "GradientShap",
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
    "HeadConductance",
    "explicit_attention",
    "head_scores",
    "attention_rollout",
    "patches_to_image",
    "NeuronDeconvolution",
    "NeuronGradient",
    "NeuronGuidedBackprop",
    "NeuronIntegratedGradients",
    "NoiseTunnel",
    "QUADRATURE_METHODS",
    "NeuronConductance",
    "capture",
    "filter_scores",
    "load_run",
    "mask",
    "preserved",
    "resolve_layers",
    "run_dataset",
    "token_scores",
    "top_filters",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """A public name (imported from its module on first use) or a submodule (``attrib.lrp``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
