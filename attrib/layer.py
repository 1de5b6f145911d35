"""The comparators of Dhamdhere et al.: internal influence, gradient x activation, activation."""
from __future__ import annotations

from contextlib import closing
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .engine import as_args, check_inputs, check_model, endpoint_scores, expand_args, prepare, sweep
from .hooks import LayerSpec, capture, resolve_layers
from .paths import weighted_rule
from .result import Attribution
from .sums import WeightedSum
from .targets import TargetType, normalize_target, target_scores
from .errors import InputError


class _LayerMethod:
    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]) -> None:
        self.model = model
        self.layers = [name for name, _ in resolve_layers(model, layers)]
        if not self.layers:
            raise InputError("layers: give at least one layer")


class InternalInfluence(_LayerMethod):
    """``integral dF/dy_j dalpha`` along the input path (Leino et al., 2018), per unit of each layer.

    ``method`` defaults to Captum's ``"gausslegendre"``; no completeness axiom applies (delta None).
    """

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        baselines: Tensor | float | None = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
    ) -> Attribution:
        inputs, baselines, target = prepare(self.model, inputs, baselines, target)
        alphas, weights = weighted_rule(method, n_steps)
        args = as_args(additional_forward_args)
        outputs, baseline_outputs = endpoint_scores(self.model, inputs, baselines, target, args)
        integral = WeightedSum(weights, inputs.shape[0])
        with closing(sweep(
            self.model, inputs, baselines, alphas, target=target, layers=self.layers,
            attribute_to_layer_input=attribute_to_layer_input, internal_batch_size=internal_batch_size,
            additional_forward_args=args, consume=lambda chunk, name, value, grad: integral.add_layer(chunk, name, grad),
        )) as chunks:
            for _ in chunks:
                pass
        return Attribution(
            attributions={name: integral.total[name] for name in self.layers}, outputs=outputs, baseline_outputs=baseline_outputs,
            method=method, n_steps=n_steps, evaluations=alphas.shape[0],
        )


class LayerGradientXActivation(_LayerMethod):
    """``y_j dF/dy_j`` at the input itself (one forward and one backward pass for all layers)."""

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
    ) -> Attribution:
        inputs, _, target = prepare(self.model, inputs, None, target)
        (chunk,) = list(sweep(
            self.model, inputs, inputs, torch.ones(1, dtype=torch.float64), target=target, layers=self.layers,
            attribute_to_layer_input=attribute_to_layer_input, additional_forward_args=as_args(additional_forward_args),
        ))
        return Attribution(
            attributions={name: chunk.values[name] * chunk.grads[name] for name in self.layers},
            outputs=chunk.scores, evaluations=1,
        )


class LayerActivation(_LayerMethod):
    """The layers' outputs (or inputs) at the inputs; ``outputs`` holds the target scores if a target is given."""

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
    ) -> Attribution:
        check_model(self.model)
        inputs = check_inputs(self.model, inputs)
        target = normalize_target(target, inputs.shape[0])
        example = torch.arange(inputs.shape[0], device=inputs.device)
        on = "input" if attribute_to_layer_input else "output"
        with capture(self.model, self.layers, on=on) as cap, torch.no_grad():
            output = self.model(inputs, *expand_args(as_args(additional_forward_args), example, inputs.shape[0]))
            activations = {name: cap[name] for name in self.layers}
        outputs = None
        if target is not None:
            outputs = target_scores(output, target, example)
        return Attribution(attributions=activations, outputs=outputs, evaluations=1)
