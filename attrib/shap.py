"""GradientSHAP (Lundberg & Lee, 2017): the expected gradient times (input - baseline) over baselines
drawn from a distribution, points drawn uniformly on the straight line between them, and Gaussian
noise on the inputs — a :class:`~attrib.noise.NoiseTunnel` whose samples each draw a baseline."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_count, check_input_tuple, check_references
from .gradients import input_gradients
from .noise import NoiseTunnel
from .result import Attribution
from .sweep import ConvergenceDelta, StraightPath
from .types import Baselines, Inputs, TargetType


class _RandomPoint:
    """One sample: ``g = dF/dx`` at ``x' + u (x - x')`` with ``u ~ U(0, 1)`` per row; the map is
    ``(x - x') g`` (or ``g``), and ``delta`` its sum minus ``F(x) - F(x')``, per row."""

    def __init__(self, model: nn.Module, multiply_by_inputs: bool, generator: torch.Generator | None) -> None:
        self.model, self.multiply_by_inputs, self.generator = model, multiply_by_inputs, generator

    def attribute(self, inputs: Inputs, target: TargetType = None, baselines: Baselines = None,
                  additional_forward_args: Any = None, internal_batch_size: int | str | None = "auto",
                  memory_budget: int | None = None) -> Attribution:
        path = StraightPath(self.model, inputs, baselines, target, additional_forward_args)
        device = self.generator.device if self.generator is not None else path.inputs[0].device
        u = torch.rand(path.batch, generator=self.generator, device=device, dtype=torch.float64).to(path.inputs[0].device)
        points = tuple(b + u.to(d.dtype).view((-1,) + (1,) * (d.dim() - 1)) * d
                       for b, d in zip(path.baselines, path.differences))
        found = input_gradients(self.model, points[0] if path.single else points, path.target, path.args,
                                internal_batch_size=internal_batch_size, memory_budget=memory_budget)
        maps = [d * g for d, g in zip(path.differences, found.grads)] if self.multiply_by_inputs else list(found.grads)
        delta = path.total([d * g for d, g in zip(path.differences, found.grads)]) - path.change
        return Attribution(attributions=path.as_given(maps), delta=delta, outputs=path.outputs,
                           baseline_outputs=path.baseline_outputs, method="gradient_shap", n_steps=1, evaluations=3,
                           info={"alphas": u})


class GradientShap(ConvergenceDelta):
    """SHAP values approximated by expected gradients: for each of ``n_samples`` samples per example, a
    baseline drawn uniformly from ``baselines`` (a tensor of N reference examples, or one per input),
    a point drawn uniformly between it and the noisy input ``x + N(0, stdevs^2)``, and the gradient
    there times (noisy input - baseline); the mean over samples.

    ``delta`` (B,) is the mean over samples of each sample's completeness error (its map's sum minus
    F(noisy x) - F(baseline)); ``info["sample_deltas"]`` holds them, (B, n_samples). In expectation
    the map sums to the mean score change (exact for models linear along each line). Options as
    Captum's ``GradientShap``; ``generator`` makes the draws reproducible.

    >>> res = GradientShap(model).attribute(x, baselines=references, n_samples=20, target=3)
    >>> res.attributions.sum((1, 2, 3)) - (res.outputs - res.baseline_outputs)   # == res.delta
    """

    def __init__(self, model: nn.Module, multiply_by_inputs: bool = True) -> None:
        self.model = model
        self.multiply_by_inputs = multiply_by_inputs

    def attribute(
        self,
        inputs: Inputs,
        baselines: Tensor | tuple[Tensor, ...],
        n_samples: int = 5,
        stdevs: float | tuple[float, ...] = 0.0,
        target: TargetType = None,
        additional_forward_args: Any = None,
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Attribution:
        check_count("n_samples", n_samples)
        check_references(baselines, *check_input_tuple(self.model, inputs), "GradientShap", "IntegratedGradients")
        sample = _RandomPoint(self.model, self.multiply_by_inputs, generator)
        result = NoiseTunnel(sample).attribute(
            inputs, nt_type="smoothgrad", nt_samples=n_samples, stdevs=stdevs, draw_baseline_from_distrib=True,
            generator=generator, baselines=baselines, target=target, additional_forward_args=additional_forward_args,
            internal_batch_size=internal_batch_size, memory_budget=memory_budget,
        )
        result.method = "gradient_shap"
        return result
