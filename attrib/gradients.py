"""Gradient methods on the input: integrated gradients (Sundararajan et al., 2017), saliency,
input x gradient and SmoothGrad."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .checks import (
    as_args,
    check_count,
    check_input_tuple,
    check_inputs,
    check_internal_batch_size,
    check_model,
    expand_args,
)
from .errors import InputError
from .hooks import frozen_parameters
from .quadrature import weighted_rule
from .result import Attribution
from .sums import WeightedSum
from .sweep import StraightPath
from .targets import normalize_target, target_scores
from .types import Baselines, Inputs, TargetType


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
        inputs: Inputs,
        target: TargetType = None,
        baselines: Baselines = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        additional_forward_args: Any = None,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, baselines, target, additional_forward_args)
        alphas, weights = weighted_rule(method, n_steps)
        integral = WeightedSum(weights, path.batch)
        path.evaluate(alphas, integral.add, input_grad=True, internal_batch_size=internal_batch_size)
        attributions = [integral.total[key] * d for key, d in zip(path.keys, path.differences)]
        return Attribution(
            attributions=path.as_given(attributions), delta=path.total(attributions) - path.change,
            outputs=path.outputs, baseline_outputs=path.baseline_outputs, method=method, n_steps=n_steps,
            evaluations=alphas.shape[0],
        )


@dataclass
class InputGradients:
    """dF/dx for every input (a tuple, one per input), F(x), and how the inputs were given.

    >>> found = input_gradients(model, (image, metadata), target=3)
    >>> found.given([g.abs() for g in found.grads])   # a tuple again, as the inputs were
    """

    inputs: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    scores: Tensor
    single: bool

    def given(self, maps: Sequence[Tensor]) -> Any:
        """One map per input, returned as the inputs were given: a tensor, or a tuple."""
        return maps[0] if self.single else tuple(maps)


def input_gradients(
    model: nn.Module, inputs: Inputs, target: TargetType, additional_forward_args: Any = None,
    mode: TorchFunctionMode | None = None,
) -> InputGradients:
    """``dF/dx`` for every input and example, and ``F(x)``, from one forward and one backward pass.

    Parameters are frozen for the pass (restored afterwards), so no parameter gradient is built or
    accumulated. ``mode`` (a ``TorchFunctionMode``) is active during the forward pass: the backprop
    methods use it to give ReLU another backward rule. An input the score does not depend on gets
    zeros; if it depends on none of them, :class:`InputError`.
    """
    check_model(model)
    checked, single = check_input_tuple(model, inputs)
    n = checked[0].shape[0]
    target = normalize_target(target, n)
    example = torch.arange(n, device=checked[0].device)
    args = expand_args(as_args(additional_forward_args), example, n)
    with frozen_parameters(model), torch.enable_grad():
        probes = [x.clone().requires_grad_(True) for x in checked]
        with mode if mode is not None else nullcontext():
            output = model(*[p.clone() for p in probes], *args)  # a model may change its input in place
        scores = target_scores(output, target, example)
        found = torch.autograd.grad(scores.sum(), probes, allow_unused=True) if scores.requires_grad else [None] * len(probes)
    if all(g is None for g in found):
        raise InputError("inputs: the explained output does not depend on the inputs")
    grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(checked, found))
    return InputGradients(checked, grads, scores.detach(), single)


class Saliency:
    """Simonyan et al. (2014): ``|dF/dx|`` (``abs=True``, Captum's default) or the signed gradient.

    >>> Saliency(model).attribute(x, target=3).attributions
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(self, inputs: Inputs, target: TargetType = None, abs: bool = True,
                  additional_forward_args: Any = None) -> Attribution:
        found = input_gradients(self.model, inputs, target, additional_forward_args)
        maps = [g.abs() if abs else g for g in found.grads]
        return Attribution(attributions=found.given(maps), outputs=found.scores, method="saliency", evaluations=1)


class InputXGradient:
    """``x * dF/dx`` (Shrikumar et al., 2016); exact completeness for bias-free ReLU networks with a zero baseline.

    >>> InputXGradient(model).attribute(x, target=3).attributions   # x * dF/dx
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(self, inputs: Inputs, target: TargetType = None, additional_forward_args: Any = None) -> Attribution:
        found = input_gradients(self.model, inputs, target, additional_forward_args)
        maps = [x * g for x, g in zip(found.inputs, found.grads)]
        return Attribution(attributions=found.given(maps), outputs=found.scores, method="input_x_gradient", evaluations=1)


class SmoothGrad:
    """Smilkov et al. (2017): the gradient averaged over ``n_samples`` noisy copies ``x + N(0, sigma^2)``.

    ``stdevs`` is relative to each example's input range: ``sigma = stdevs * (x.max() - x.min())``
    (the paper's 10-20 %). All copies of all examples are one batch, evaluated in chunks of
    ``internal_batch_size`` rows. ``square=True`` averages squared gradients (SmoothGrad-squared),
    ``abs=True`` absolute ones (Captum's ``NoiseTunnel(Saliency(model))``), ``multiply_by_inputs``
    multiplies the mean by ``x``. ``generator`` makes the noise reproducible.

    >>> SmoothGrad(model).attribute(x, target=3, n_samples=50, stdevs=0.15).attributions
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def noise(self, inputs: Tensor, n_samples: int, stdevs: float, generator: torch.Generator | None = None) -> Tensor:
        """The noise ``(n_samples, B, ...)`` that :meth:`attribute` adds (sample-major)."""
        sigma = self.noise_sigma(inputs, stdevs)
        noise = torch.randn((n_samples,) + tuple(inputs.shape), generator=generator, dtype=inputs.dtype,
                            device=inputs.device if generator is None else generator.device)
        return noise.to(inputs.device).mul_(sigma.view((1, -1) + (1,) * (inputs.dim() - 1)))

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        n_samples: int = 50,
        stdevs: float = 0.15,
        square: bool = False,
        abs: bool = False,
        multiply_by_inputs: bool = False,
        internal_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        additional_forward_args: Any = None,
    ) -> Attribution:
        check_model(self.model)
        inputs = check_inputs(self.model, inputs)
        check_count("n_samples", n_samples)
        if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not stdevs >= 0:
            raise InputError(f"stdevs must be a number >= 0 (a fraction of the input range), got {stdevs!r}")
        if square and abs:
            raise InputError("square and abs: choose one")
        n = inputs.shape[0]
        target = normalize_target(target, n)
        rows = n_samples * n
        chunk_rows = check_internal_batch_size(internal_batch_size, rows)
        noise = self.noise(inputs, n_samples, stdevs, generator).reshape((rows,) + tuple(inputs.shape[1:]))
        args = as_args(additional_forward_args)
        total = torch.zeros_like(inputs)
        for start in range(0, rows, chunk_rows):
            example = torch.arange(start, min(start + chunk_rows, rows), device=inputs.device) % n
            rows_target = [target[e] for e in example.tolist()] if isinstance(target, list) else target
            (grads,) = input_gradients(
                self.model, inputs[example] + noise[start:start + chunk_rows], rows_target,
                expand_args(args, example, n),
            ).grads
            if square:
                grads = grads.square_()
            elif abs:
                grads = grads.abs_()
            total.index_add_(0, example, grads)
        mean = total / n_samples
        with torch.no_grad():
            scores = target_scores(self.model(inputs, *expand_args(args, torch.arange(n, device=inputs.device), n)),
                                   target, torch.arange(n, device=inputs.device))
        return Attribution(
            attributions=mean * inputs if multiply_by_inputs else mean, outputs=scores, method="smoothgrad",
            n_steps=n_samples, evaluations=n_samples + 1, info={"sigma": self.noise_sigma(inputs, stdevs)},
        )

    @staticmethod
    def noise_sigma(inputs: Tensor, stdevs: float) -> Tensor:
        spread = inputs.reshape(inputs.shape[0], -1)
        return (spread.amax(1) - spread.amin(1)) * stdevs
