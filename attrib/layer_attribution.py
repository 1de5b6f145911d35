"""The comparators of Dhamdhere et al.: internal influence, gradient x activation, activation."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .checks import expand_args
from .errors import InputError
from .hooks import capture, resolve_layers
from .quadrature import weighted_rule
from .result import Attribution
from .sums import WeightedSum
from .sweep import StraightPath, interpolation_layer
from .targets import target_scores
from .types import Baselines, Inputs, LayerSpec, TargetType


class LayerMethod:
    """A method explaining one or more layers: ``Method(model, layers).attribute(inputs, ...)``.

    >>> InternalInfluence(model, ['features.26', 'features.28']).layers   # the resolved names
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]) -> None:
        self.model = model
        self.layers = [name for name, _ in resolve_layers(model, layers, elements=True)]
        if not self.layers:
            raise InputError("layers: give at least one layer")


class PathLayerMethod(LayerMethod):
    """A layer method along a path, which may interpolate at a layer (``interpolate_at``, see
    :class:`~attrib.sweep.StraightPath`): ``Method(model, ["convs.0"], interpolate_at="embedding")``."""

    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec], interpolate_at: LayerSpec | None = None) -> None:
        super().__init__(model, layers)
        self.interpolate_at = interpolation_layer(model, interpolate_at)

    def path(self, inputs: Inputs, baselines: Baselines, target: TargetType, additional_forward_args: Any,
             layer_baselines: Baselines, layer_noise: Tensor | None) -> StraightPath:
        return StraightPath(self.model, inputs, baselines, target, additional_forward_args,
                            interpolate_at=self.interpolate_at, layer_baselines=layer_baselines, layer_noise=layer_noise)


class InternalInfluence(PathLayerMethod):
    """``integral dF/dy_j dalpha`` along the input path (Leino et al., 2018), per unit of each layer.

    ``method`` defaults to Captum's ``"gausslegendre"``; no completeness axiom applies (delta None).
    ``interpolate_at`` puts the path at a layer (token models; see :class:`~attrib.sweep.StraightPath`).

    >>> InternalInfluence(model, 'features.28').attribute(x, target=3, n_steps=50)['features.28']
    """

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        baselines: Baselines = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
        layer_baselines: Baselines = None,
        layer_noise: Tensor | None = None,
    ) -> Attribution:
        path = self.path(inputs, baselines, target, additional_forward_args, layer_baselines, layer_noise)
        alphas, weights = weighted_rule(method, n_steps)
        integral = WeightedSum(weights, path.batch)
        path.evaluate(
            alphas, lambda chunk: None, layers=self.layers, attribute_to_layer_input=attribute_to_layer_input,
            internal_batch_size=internal_batch_size, memory_budget=memory_budget,
            consume=lambda chunk, name, value, grad: integral.add_layer(chunk, name, grad),
        )
        return Attribution(
            attributions=path.gather(self.layers, integral.total), outputs=path.outputs,
            baseline_outputs=path.baseline_outputs, method=method, n_steps=n_steps, evaluations=alphas.shape[0],
        )


class LayerGradientXActivation(LayerMethod):
    """``y_j dF/dy_j`` at the input itself (one forward and one backward pass for all layers);
    ``multiply_by_inputs=False`` gives the layer gradient ``dF/dy_j`` alone.

    >>> LayerGradientXActivation(model, 'features.28').attribute(x, target=3)['features.28']
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec], multiply_by_inputs: bool = True) -> None:
        super().__init__(model, layers)
        self.multiply_by_inputs = multiply_by_inputs

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, None, target, additional_forward_args, differentiable=False)
        chunk = path.at_inputs(layers=self.layers, attribute_to_layer_input=attribute_to_layer_input)
        return Attribution(
            attributions=path.gather(self.layers, {key: chunk.values[key] * chunk.grads[key] if self.multiply_by_inputs
                                                   else chunk.grads[key] for key in chunk.grads}),
            outputs=chunk.scores, evaluations=1,
        )


class LayerActivation(LayerMethod):
    """The layers' outputs (or inputs) at the inputs; ``outputs`` holds the target scores if a target is given.

    >>> LayerActivation(model, 'features.28').attribute(x)['features.28']   # the layer's output
    """

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, None, target, additional_forward_args, differentiable=False)
        target = path.target
        example = torch.arange(path.batch, device=path.inputs[0].device)
        on = "input" if attribute_to_layer_input else "output"
        with capture(self.model, self.layers, on=on) as cap, torch.no_grad():
            output = self.model(*path.inputs, *expand_args(path.args, example, path.batch))
            activations = {name: tuple(cap[p] for p in cap.parts[name]) if name in cap.parts else cap[name]
                           for name in self.layers}
        outputs = None
        if target is not None:
            outputs = target_scores(output, target, example)
        return Attribution(attributions=activations, outputs=outputs, evaluations=1)
