"""DeepLIFT with the rescale rule (Shrikumar et al., 2017).

The inputs and baselines go through the model as one batch ``[x; x']``. A ``TorchFunctionMode``
catches every elementwise nonlinearity and max pooling the forward pass calls (modules, reused
modules, in-place and functional forms alike) and gives it the multiplier of its own pair of rows:

- elementwise ``f``: ``m = (f(x) - f(x')) / (x - x')``, or ``f'(x)`` where ``|x - x'|`` is below
  ``sqrt(machine eps) * max(|x|, |x'|)`` (Captum: below 1e-10, absolute);
- max pooling: in each window the output change ``y - y'`` is split between x's winner, which
  takes ``max(y, y') - y'``, and x''s winner, which takes ``y - max(y, y')``; each input's
  multiplier is its share over ``x - x'`` (the gradient where ``x - x'`` is that small, which only
  happens where its share is 0).

Linear layers keep their gradient, so the multipliers compose by the chain rule and
``sum((x - x') * m) = F(x) - F(x')`` holds exactly for networks built from linear maps and the
caught operations; ``delta`` reports the gap (nonzero where an uncaught nonlinearity, such as a
softmax, is linearised by its gradient).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .checks import expand_args
from .errors import InputError
from .hooks import frozen_parameters
from .result import Attribution
from .sweep import StraightPath
from .targets import target_scores
from .types import Baselines, Inputs, TargetType

ELEMENTWISE: set[Callable] = {
    F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
    F.celu, F.gelu, F.silu, F.softplus, F.hardtanh, F.sigmoid, torch.sigmoid, Tensor.sigmoid, F.tanh, torch.tanh,
    Tensor.tanh,
}
MAX_POOL_FUNCTIONS = {  # caught function -> the form with a signature that returns the winners
    F.max_pool1d: F.max_pool1d_with_indices, F.max_pool2d: F.max_pool2d_with_indices, F.max_pool3d: F.max_pool3d_with_indices,
}


def _small(delta_in: Tensor, x_in: Tensor, x_ref: Tensor) -> Tensor:
    """Where ``x - x'`` is too small against ``x`` and ``x'`` for a difference quotient (relative, so
    that models whose activations are tiny, e.g. random-init MobileNetV2 at ~1e-10, stay exact)."""
    tolerance = torch.finfo(delta_in.dtype).eps ** 0.5
    return delta_in.abs() <= tolerance * torch.maximum(x_in.abs(), x_ref.abs())


def _halves(tensor: Tensor) -> tuple[Tensor, Tensor]:
    n = tensor.shape[0] // 2
    return tensor[:n], tensor[n:]


class _Rescale(torch.autograd.Function):
    """``y = f(x)`` on ``[x; x']``; backward multiplies by the pair's rescale multiplier."""

    @staticmethod
    def forward(ctx, x: Tensor, function: Callable[[Tensor], Tensor]) -> Tensor:
        y = function(x)
        ctx.function = function
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y = ctx.saved_tensors
        (x_in, x_ref), (y_in, y_ref) = _halves(x), _halves(y)
        delta_in = x_in - x_ref
        with torch.enable_grad():
            probe = x_in.detach().requires_grad_(True)
            slope = torch.autograd.grad(ctx.function(probe), probe, torch.ones_like(probe))[0]
        small = _small(delta_in, x_in, x_ref)
        multiplier = torch.where(small, slope, (y_in - y_ref) / torch.where(small, torch.ones_like(delta_in), delta_in))
        grad_in, _ = _halves(grad)
        return torch.cat([grad_in * multiplier, torch.zeros_like(grad_in)]), None


class _MaxPoolRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, pool: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
        y, winners = pool(x)
        ctx.save_for_backward(x, y, winners)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, winners = ctx.saved_tensors
        (x_in, x_ref), (y_in, y_ref) = _halves(x), _halves(y)
        (won_in, won_ref), (grad_in, _) = _halves(winners), _halves(grad)
        top = torch.maximum(y_in, y_ref)
        flat = x_in.flatten(2)

        def scatter(values: Tensor, index: Tensor) -> Tensor:  # sums over overlapping windows
            return torch.zeros_like(flat).scatter_add_(2, index.flatten(2), values.flatten(2)).view_as(x_in)

        share = scatter(grad_in * (top - y_ref), won_in) + scatter(grad_in * (y_in - top), won_ref)
        delta_in = x_in - x_ref
        small = _small(delta_in, x_in, x_ref)
        multiplier = torch.where(small, scatter(grad_in, won_in), share / torch.where(small, torch.ones_like(delta_in), delta_in))
        return torch.cat([multiplier, torch.zeros_like(multiplier)]), None


def _out_of_place(func: Callable, args: tuple, kwargs: dict, **force) -> Callable[[Tensor], Tensor]:
    """``t -> func(t, *args[1:], **kwargs)`` with ``inplace`` off (and ``force`` applied)."""
    func = {torch.relu_: torch.relu, Tensor.relu_: torch.relu, F.relu_: torch.relu}.get(func, func)
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):  # builtins without a signature take no flags
        return lambda t: func(t, *args[1:], **kwargs)
    arguments = dict(bound.arguments)
    first = next(iter(arguments))
    arguments.pop(first)
    if "inplace" in arguments:
        arguments["inplace"] = False
    arguments.update(force)
    return lambda t: func(t, **arguments)


class RescaleRule(TorchFunctionMode):
    """While active, caught nonlinearities back-propagate DeepLIFT multipliers for ``[x; x']`` batches
    (max pooling too, unless ``pools=False``: then it keeps its gradient).

    >>> with RescaleRule(pools=True):   # on a batch [inputs; baselines]
    ...     output = model(torch.cat([x, x_ref]).requires_grad_())
    """

    def __init__(self, pools: bool = True) -> None:
        super().__init__()
        self.pools = pools

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            if func in ELEMENTWISE:
                return _Rescale.apply(args[0], _out_of_place(func, args, kwargs))
            if self.pools and func in MAX_POOL_FUNCTIONS:
                with_indices = MAX_POOL_FUNCTIONS[func]
                if not inspect.signature(with_indices).bind(*args, **kwargs).arguments.get("return_indices", False):
                    return _MaxPoolRescale.apply(args[0], _out_of_place(with_indices, args, kwargs, return_indices=True))
        return func(*args, **kwargs)


class DeepLift:
    """DeepLIFT, rescale rule: ``attributions = (x - x') * m`` with ``m`` the multipliers above;
    ``delta`` (B,) is ``attributions.sum() - (F(x) - F(x'))``.

    Works on models as shipped: reused and in-place ReLUs, functional ReLUs and max pooling are
    caught per call. ``multiply_by_inputs=False`` returns the multipliers ``m``. ``maxpool="gradient"``
    keeps max pooling's gradient (the DeepLIFT authors' default); completeness then holds only where
    x and x' pick the same winners. Captum 0.9 effectively does this wherever a ReLU module feeds the
    pooling (its pooling rule is lost there), so ``"gradient"`` reproduces its numbers on such models.

    >>> res = DeepLift(model).attribute(x, target=3, baselines=0.0)
    >>> res.delta  # ~0 for ReLU / max-pool networks
    """

    def __init__(self, model: nn.Module, multiply_by_inputs: bool = True, maxpool: str = "rescale") -> None:
        if maxpool not in ("rescale", "gradient"):
            raise InputError(f"maxpool must be 'rescale' or 'gradient', got {maxpool!r}")
        self.model = model
        self.multiply_by_inputs = multiply_by_inputs
        self.maxpool = maxpool

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        baselines: Baselines = None,
        additional_forward_args: Any = None,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, baselines, target, additional_forward_args)
        target, n = path.target, path.batch
        example = torch.arange(n, device=path.inputs[0].device).repeat(2)
        args = expand_args(path.args, example, n)
        with frozen_parameters(self.model), torch.enable_grad():
            probes = [torch.cat([x, b]).requires_grad_(True) for x, b in zip(path.inputs, path.baselines)]
            with RescaleRule(pools=self.maxpool == "rescale"):
                output = self.model(*probes, *args)
            scores = target_scores(output, target, example)
            if not scores.requires_grad:
                raise InputError("inputs: the explained output does not depend on the inputs")
            outputs, baseline_outputs = _halves(scores.detach())
            found = torch.autograd.grad(scores[:n].sum(), probes, allow_unused=True)
        multipliers = [torch.zeros_like(x) if g is None else _halves(g)[0] for x, g in zip(path.inputs, found)]
        attributions = [d * m for d, m in zip(path.differences, multipliers)]
        delta = path.total(attributions) - (outputs - baseline_outputs)
        return Attribution(
            attributions=path.as_given(attributions if self.multiply_by_inputs else multipliers), delta=delta, outputs=outputs,
            baseline_outputs=baseline_outputs, method="deeplift", evaluations=2,
        )
