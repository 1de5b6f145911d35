"""Gradient methods on the input: integrated gradients (Sundararajan et al., 2017), saliency,
input x gradient and SmoothGrad."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .checks import (
    as_given,
    check_count,
    check_input_tuple,
)
from .errors import InputError
from .exact import (DEFAULT_MAX_REGIONS, EXACT, check_complete, exact_evaluations, exact_info, exact_input_integral,
                    find_regions)
from .noise import NoiseTunnel, draw_noise, noise_scale
from .quadrature import weighted_rule
from .result import Attribution
from .sums import WeightedSum
from .sweep import ConvergenceDelta, StraightPath, interpolation_layer
from .types import Baselines, Inputs, LayerSpec, TargetType


class IntegratedGradients(ConvergenceDelta):
    """``IG_i = (x_i - x'_i) integral dF/dx_i (x' + alpha (x - x')) dalpha``, with ``delta`` per example.

    >>> res = IntegratedGradients(model).attribute(x, target=3, n_steps=50)
    >>> res.attributions.sum((1, 2, 3)) - (res.outputs - res.baseline_outputs)  # == res.delta

    ``multiply_by_inputs=False`` returns the path-averaged gradient alone (Captum's "local" IG); ``delta``
    stays the completeness error of the full (multiplied) attributions.
    ``method`` defaults to Captum's ``"gausslegendre"`` so numbers agree with Captum's default;
    ``"stieltjes_trapezoid"`` is the trapezoid rule over 0..1 (see :mod:`attrib.paths`). ``"exact"``, on
    piecewise-linear models (ReLU, max pooling, affine layers), sums the path's linear regions exactly
    (:mod:`attrib.exact`; ``info["regions"]`` per example; ``n_steps`` unused; more than ``max_regions`` is refused).

    ``interpolate_at="embedding"`` interpolates that layer's output instead of the inputs (Captum's
    LayerIntegratedGradients): inputs may be token ids, ``baselines`` are inputs too (e.g. the padding
    id) or ``layer_baselines`` gives the start at the layer, and ``attributions`` is
    ``{"embedding": map}`` (:func:`attrib.token_scores` sums it per token).

    >>> res = IntegratedGradients(model, interpolate_at="embedding").attribute(ids, target=1, baselines=0)
    >>> attrib.token_scores(res["embedding"])   # (B, T)
    """

    def __init__(self, model: nn.Module, multiply_by_inputs: bool = True, interpolate_at: LayerSpec | None = None) -> None:
        self.model = model
        self.multiply_by_inputs = multiply_by_inputs
        self.interpolate_at = interpolation_layer(model, interpolate_at)

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        baselines: Baselines = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
        additional_forward_args: Any = None,
        layer_baselines: Baselines = None,
        layer_noise: Tensor | None = None,
        max_regions: int = DEFAULT_MAX_REGIONS,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, baselines, target, additional_forward_args,
                            interpolate_at=self.interpolate_at, layer_baselines=layer_baselines, layer_noise=layer_noise)
        if method == EXACT:
            return self._exact(path, internal_batch_size, memory_budget, max_regions)
        alphas, weights = weighted_rule(method, n_steps)
        integral = WeightedSum(weights, path.batch)
        path.evaluate(alphas, integral.add, input_grad=True, internal_batch_size=internal_batch_size,
                      memory_budget=memory_budget)
        attributions = [integral.total[key] * d for key, d in zip(path.keys, path.differences)]
        maps = attributions if self.multiply_by_inputs else [integral.total[key] for key in path.keys]
        return Attribution(
            attributions=path.as_given(maps), delta=path.total(attributions) - path.change,
            outputs=path.outputs, baseline_outputs=path.baseline_outputs, method=method, n_steps=n_steps,
            evaluations=alphas.shape[0],
        )

    def _exact(self, path: StraightPath, internal_batch_size: int | str | None, memory_budget: int | None,
               max_regions: int) -> Attribution:
        regions = find_regions(path, internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                               max_regions=max_regions, method="IntegratedGradients")
        total = exact_input_integral(path, regions, internal_batch_size, memory_budget)
        attributions = [total[key] * d for key, d in zip(path.keys, path.differences)]
        delta = path.total(attributions) - path.change
        check_complete(path, delta, "IntegratedGradients")
        maps = attributions if self.multiply_by_inputs else [total[key] for key in path.keys]
        return Attribution(
            attributions=path.as_given(maps), delta=delta, outputs=path.outputs, baseline_outputs=path.baseline_outputs,
            method=EXACT, evaluations=exact_evaluations(regions, 1, path.batch), info=exact_info(regions),
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
        return as_given(maps, self.single)


def input_gradients(
    model: nn.Module, inputs: Inputs, target: TargetType, additional_forward_args: Any = None,
    mode: TorchFunctionMode | None = None, internal_batch_size: int | str | None = "auto",
    memory_budget: int | None = None,
) -> InputGradients:
    """``dF/dx`` for every input and example, and ``F(x)``, from one forward and one backward pass per
    chunk of examples (:func:`attrib.sweep.sweep` at the inputs).

    Parameters are frozen for the pass (restored afterwards), so no parameter gradient is built or
    accumulated. ``mode`` (a ``TorchFunctionMode``) is active during the forward pass: the backprop
    methods use it to give ReLU another backward rule. An input the score does not depend on gets zeros.
    """
    path = StraightPath(model, inputs, None, target, additional_forward_args)
    chunk = path.at_inputs(input_grad=True, mode=mode, internal_batch_size=internal_batch_size, memory_budget=memory_budget)
    return InputGradients(path.inputs, tuple(chunk.grads[key] for key in path.keys), chunk.scores, path.single)


class Saliency:
    """Simonyan et al. (2014): ``|dF/dx|`` (``abs=True``, Captum's default) or the signed gradient.

    >>> Saliency(model).attribute(x, target=3).attributions
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(self, inputs: Inputs, target: TargetType = None, abs: bool = True, additional_forward_args: Any = None,
                  internal_batch_size: int | str | None = "auto", memory_budget: int | None = None) -> Attribution:
        found = input_gradients(self.model, inputs, target, additional_forward_args,
                                internal_batch_size=internal_batch_size, memory_budget=memory_budget)
        maps = [g.abs() if abs else g for g in found.grads]
        return Attribution(attributions=found.given(maps), outputs=found.scores, method="saliency", evaluations=1)


class InputXGradient:
    """``x * dF/dx`` (Shrikumar et al., 2016); exact completeness for bias-free ReLU networks with a zero baseline.

    >>> InputXGradient(model).attribute(x, target=3).attributions   # x * dF/dx
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(self, inputs: Inputs, target: TargetType = None, additional_forward_args: Any = None,
                  internal_batch_size: int | str | None = "auto", memory_budget: int | None = None) -> Attribution:
        found = input_gradients(self.model, inputs, target, additional_forward_args,
                                internal_batch_size=internal_batch_size, memory_budget=memory_budget)
        maps = [x * g for x, g in zip(found.inputs, found.grads)]
        return Attribution(attributions=found.given(maps), outputs=found.scores, method="input_x_gradient", evaluations=1)


class SmoothGrad:
    """Smilkov et al. (2017): the gradient averaged over ``n_samples`` noisy copies ``x + N(0, sigma^2)``.

    ``stdevs`` is relative to each example's input range: ``sigma = stdevs * (x.max() - x.min())``
    (the paper's 10-20 %; :class:`attrib.NoiseTunnel` takes absolute ones by default, as Captum).
    A :class:`~attrib.noise.NoiseTunnel` around :class:`Saliency`: all copies of all examples are one
    batch, evaluated in chunks (``internal_batch_size``, default ``"auto"``: the memory budget).
    ``square=True`` averages squared gradients (SmoothGrad-squared), ``abs=True`` absolute ones
    (Captum's ``NoiseTunnel(Saliency(model))``), ``multiply_by_inputs`` multiplies the mean by ``x``.
    ``generator`` makes the noise reproducible; ``outputs`` is the mean score over the noisy copies.

    >>> SmoothGrad(model).attribute(x, target=3, n_samples=50, stdevs=0.15).attributions
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def noise(self, inputs: Tensor, n_samples: int, stdevs: float, generator: torch.Generator | None = None) -> Tensor:
        """The noise ``(n_samples, B, ...)`` that :meth:`attribute` adds with the same ``generator`` state."""
        drawn = draw_noise(inputs, n_samples, noise_scale(inputs, stdevs, "range"), generator)
        return drawn.view((inputs.shape[0], n_samples) + tuple(inputs.shape[1:])).transpose(0, 1)

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        n_samples: int = 50,
        stdevs: float = 0.15,
        square: bool = False,
        abs: bool = False,
        multiply_by_inputs: bool = False,
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
        generator: torch.Generator | None = None,
        additional_forward_args: Any = None,
    ) -> Attribution:
        check_count("n_samples", n_samples)
        if square and abs:
            raise InputError("square and abs: choose one")
        if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not stdevs >= 0:
            raise InputError(f"stdevs must be a number >= 0 (a fraction of the input range), got {stdevs!r}")
        result = NoiseTunnel(Saliency(self.model)).attribute(
            inputs, nt_type="smoothgrad_sq" if square else "smoothgrad", nt_samples=n_samples, stdevs=stdevs,
            stdev_mode="range", generator=generator, target=target, abs=abs, additional_forward_args=additional_forward_args,
            internal_batch_size=internal_batch_size, memory_budget=memory_budget,
        )
        if multiply_by_inputs:
            checked, single = check_input_tuple(self.model, inputs)
            maps = (result.attributions,) if single else result.attributions
            result.attributions = as_given([m * x for m, x in zip(maps, checked)], single)
        result.method, result.n_steps, result.evaluations = "smoothgrad", n_samples, n_samples
        return result
