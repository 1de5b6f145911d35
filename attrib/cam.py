"""Grad-CAM (Selvaraju et al., 2017) and guided Grad-CAM."""
from __future__ import annotations

import warnings
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .backprop import GuidedBackprop
from .errors import InputError
from .hooks import resolve_layers
from .result import Attribution
from .sweep import StraightPath
from .types import Inputs, LayerSpec, TargetType

_MODES = ("nearest", "bilinear", "bicubic", "area", "linear", "trilinear", "nearest-exact")
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample(maps: Tensor, size: tuple[int, ...], mode: str) -> Tensor:
    """Resize ``(B, 1, *spatial)`` maps to ``size`` (``align_corners=False`` where the mode has it);
    ``linear``, ``bilinear`` and ``trilinear`` each mean linear interpolation in the map's dimensions."""
    if mode not in _MODES:
        raise InputError(f"interpolate_mode must be one of {_MODES} or None, got {mode!r}")
    if len(size) != maps.dim() - 2:
        raise InputError(f"cannot resize a map with {maps.dim() - 2} spatial dims to input size {tuple(size)}")
    if mode in _LINEAR.values():  # linear interpolation in as many dimensions as the map has (Conv1d/2d/3d layers)
        mode = _LINEAR[maps.dim() - 2] if maps.dim() - 2 in _LINEAR else mode
    corners = False if mode in ("bilinear", "bicubic", "linear", "trilinear") else None
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=corners)


class GradCAM:
    """``L = ReLU(sum_c a_c A_c)`` with ``a_c`` the gradient of the target at layer output ``A``,
    averaged over its spatial positions; resized to the input's spatial size.

    ``relu_attributions=False`` keeps negative evidence; ``interpolate_mode=None`` returns the map at
    the layer's resolution; ``attr_dim_summation=False`` keeps one map per channel, (B, C, ...), unsummed.
    With several inputs the map is resized to the first input's spatial size.
    With both set so, the numbers are Captum's ``LayerGradCam``'s. ``info``
    holds the channel weights ``(B, C)`` and the layer-resolution map.

    >>> GradCAM(model, "features.28").attribute(x, target=3).attributions  # (B, 1, H, W)
    """

    def __init__(self, model: nn.Module, layer: LayerSpec) -> None:
        self.model = model
        ((self.layer, _),) = resolve_layers(model, layer, elements=True)

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        relu_attributions: bool = True,
        interpolate_mode: str | None = "bilinear",
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
        attr_dim_summation: bool = True,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, None, target, additional_forward_args, differentiable=False)
        chunk = path.at_inputs(layers=[self.layer], attribute_to_layer_input=attribute_to_layer_input)
        if self.layer in chunk.parts:
            raise InputError(f"layer: {self.layer!r} is called with several inputs; select one, e.g. '{self.layer}[0]'")
        activation, grads = chunk.values[self.layer], chunk.grads[self.layer]
        if activation.dim() < 3:
            raise InputError(
                f"layer: {self.layer!r} gives shape {tuple(activation.shape)}, without spatial dimensions; Grad-CAM "
                "needs a layer with (B, C, H, W) (or (B, C, L), (B, C, D, H, W)) output, such as a convolution"
            )
        spatial = tuple(range(2, grads.dim()))
        weights = grads.mean(spatial) if spatial else grads
        cam = weights.view(weights.shape + (1,) * len(spatial)) * activation
        if attr_dim_summation:
            cam = cam.sum(1, keepdim=True)
        if relu_attributions:
            cam = cam.clamp(min=0)
        layer_map = cam
        resized = interpolate_mode is not None and bool(spatial) and path.inputs[0].dim() == cam.dim()
        if resized:
            cam = upsample(cam, tuple(path.inputs[0].shape[2:]), interpolate_mode)  # type: ignore[arg-type]
        elif interpolate_mode is not None and spatial:
            warnings.warn(f"GradCAM: the input of shape {tuple(path.inputs[0].shape)} has not the layer map's "
                          f"{len(spatial)} spatial dimension(s) (token ids?); the map stays at the layer's resolution")
        return Attribution(
            attributions=cam, outputs=chunk.scores, method="gradcam", evaluations=1,
            info={"layer": self.layer, "weights": weights, "layer_map": layer_map, "resized": resized},
        )


class GuidedGradCAM:
    """Guided backprop times Grad-CAM resized to the input (nearest, as Captum's ``GuidedGradCam``).

    >>> GuidedGradCAM(model, "features.28").attribute(x, target=3).attributions  # shaped like x
    """

    def __init__(self, model: nn.Module, layer: LayerSpec) -> None:
        self.model = model
        self.gradcam = GradCAM(model, layer)
        self.guided = GuidedBackprop(model)

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        interpolate_mode: str = "nearest",
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
    ) -> Attribution:
        cam = self.gradcam.attribute(
            inputs, target, relu_attributions=True, interpolate_mode=None,
            attribute_to_layer_input=attribute_to_layer_input, additional_forward_args=additional_forward_args,
        )
        layer_map = cam.tensor
        if layer_map.dim() < 3:
            raise InputError(f"layer: {self.gradcam.layer!r} has no spatial dimensions to map onto the input")
        guided = self.guided.attribute(inputs, target, additional_forward_args)
        single = isinstance(guided.attributions, Tensor)
        maps: list[Tensor] = []
        for i, grads in enumerate([guided.attributions] if single else guided.attributions):
            if grads.dim() != layer_map.dim():
                if single:
                    raise InputError(f"inputs: shape {tuple(grads.shape)} has no spatial dimensions like layer "
                                     f"{self.gradcam.layer!r}'s map {tuple(layer_map.shape)}")
                warnings.warn(f"GuidedGradCAM: inputs[{i}] of shape {tuple(grads.shape)} has not the layer map's "
                              f"{layer_map.dim() - 2} spatial dimensions; its attribution is an empty tensor")
                maps.append(grads.new_empty(0))
                continue
            maps.append(grads * upsample(layer_map, tuple(grads.shape[2:]), interpolate_mode))
        return Attribution(
            attributions=maps[0] if single else tuple(maps), outputs=guided.outputs, method="guided_gradcam",
            evaluations=2, info={"gradcam": layer_map, "guided_backprop": guided.attributions},
        )
