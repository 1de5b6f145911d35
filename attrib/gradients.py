"""Integrated gradients (Sundararajan et al., 2017)."""
from __future__ import annotations

from contextlib import closing
from typing import Any

from torch import Tensor, nn

from .engine import INPUT, as_args, endpoint_scores, prepare, sweep
from .paths import weighted_rule
from .result import Attribution
from .sums import WeightedSum
from .targets import TargetType


class IntegratedGradients:
    """``IG_i = (x_i - x'_i) integral dF/dx_i (x' + alpha (x - x')) dalpha``, with ``delta`` per example.

    >>> res = IntegratedGradients(model).attribute(x, target=3, n_steps=50)
    >>> res.attributions.sum((1, 2, 3)) - (res.outputs - res.baseline_outputs)  # == res.delta

    ``method`` defaults to Captum's ``"gausslegendre"`` so numbers agree with Captum's default;
    ``"stieltjes_trapezoid"`` is the trapezoid rule over 0..1 (see :mod:`attrib.paths`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        baselines: Tensor | float | None = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        additional_forward_args: Any = None,
    ) -> Attribution:
        inputs, baselines, target = prepare(self.model, inputs, baselines, target)
        alphas, weights = weighted_rule(method, n_steps)
        args = as_args(additional_forward_args)
        outputs, baseline_outputs = endpoint_scores(self.model, inputs, baselines, target, args)
        integral = WeightedSum(weights, inputs.shape[0])
        with closing(sweep(
            self.model, inputs, baselines, alphas, target=target, input_grad=True,
            internal_batch_size=internal_batch_size, additional_forward_args=args,
        )) as chunks:
            for chunk in chunks:
                integral.add(chunk)
        attributions = integral.total[INPUT] * (inputs - baselines)
        return Attribution(
            attributions=attributions,
            delta=attributions.reshape(attributions.shape[0], -1).sum(1) - (outputs - baseline_outputs),
            outputs=outputs, baseline_outputs=baseline_outputs, method=method, n_steps=n_steps,
            evaluations=alphas.shape[0],
        )
