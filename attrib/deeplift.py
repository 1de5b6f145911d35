"""DeepLIFT with the rescale rule (Shrikumar et al., 2017), and DeepLIFT-SHAP over a baseline distribution.

The inputs and baselines go through the model as one batch ``[x; x']``. A ``TorchFunctionMode``
catches every elementwise nonlinearity, max pooling and softmax the forward pass calls (modules,
reused modules, in-place and functional forms alike) and gives it the multiplier of its own pair of rows:

- elementwise ``f``: ``m = (f(x) - f(x')) / (x - x')``, or ``f'(x)`` where ``|x - x'|`` is below
  ``sqrt(machine eps) * max(|x|, |x'|)`` (Captum: below 1e-10, absolute);
- max pooling (adaptive too): in each window the output change ``y - y'`` is split between x's winner, which
  takes ``max(y, y') - y'``, and x''s winner, which takes ``y - max(y, y')``; each input's
  multiplier is its share over ``x - x'`` (the gradient where ``x - x'`` is that small, which only
  happens where its share is 0);
- softmax along a dimension (Sec. 3.5.3 of the paper attributes to the logits): with
  ``L = logsumexp(x)`` and ``s(a, b) = (e^a - e^b) / (a - b)`` (``e^a`` at ``a = b``), the weights
  ``w_i = s(x_i, x'_i) / s(L, L')`` give ``L - L' = sum_i w_i (x_i - x'_i)`` exactly (the sums of
  ``e^x`` and ``e^x'`` are ``e^L`` and ``e^L'``), so ``log_softmax`` changes by ``(I - 1 w^T)(x - x')``;
  ``softmax = exp(log_softmax)`` then rescales elementwise by ``rho_i = s(z_i, z'_i)`` on the
  log-probabilities ``z``. Multiplier matrices ``M = I - 1 w^T`` and ``diag(rho) M``: exact
  (``M (x - x') = y - y'``), symmetric in x and x', bounded (``0 <= w_i <= 1``, ``0 < rho_i <= 1``),
  and the Jacobian where ``x = x'`` (``w = rho = softmax(x)``).

Linear layers keep their gradient, so the multipliers compose by the chain rule and
``sum((x - x') * m) = F(x) - F(x')`` holds exactly for networks built from linear maps and the
caught operations; ``delta`` reports the gap (nonzero where an uncaught nonlinearity, such as a
layer norm or a product of two activations, is linearised by its gradient).
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .checks import check_references, describe, expand_args
from .errors import InputError, InputTypeError
from .hooks import frozen_parameters
from .result import Attribution
from .memory import ChunkPlan, Footprint
from .sweep import ConvergenceDelta, StraightPath
from .targets import target_scores
from .types import Baselines, Inputs, TargetType

ELEMENTWISE: set[Callable] = {
    F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
    F.celu, F.gelu, F.silu, F.softplus, F.hardtanh, F.sigmoid, torch.sigmoid, Tensor.sigmoid, F.tanh, torch.tanh,
    Tensor.tanh,
}
MAX_POOL_FUNCTIONS: dict[Callable, Callable] = {  # caught function -> the form with a signature that returns the winners
    F.max_pool1d: F.max_pool1d_with_indices, F.max_pool2d: F.max_pool2d_with_indices, F.max_pool3d: F.max_pool3d_with_indices,
    F.adaptive_max_pool1d: F.adaptive_max_pool1d_with_indices, F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices,
    F.adaptive_max_pool3d: F.adaptive_max_pool3d_with_indices,
}

SOFTMAX_FUNCTIONS: dict[Callable, str] = {
    F.softmax: "softmax", torch.softmax: "softmax", Tensor.softmax: "softmax", torch.special.softmax: "softmax",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax", Tensor.log_softmax: "log_softmax",
    torch.special.log_softmax: "log_softmax", F.softmin: "softmin",
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


def _exp_slope(a: Tensor, b: Tensor) -> Tensor:
    """``(e^a - e^b) / (a - b)``, ``e^a`` where ``a = b``: as ``e^max(a, b) * (1 - e^-gap) / gap``, accurate
    for every gap and free of overflow once ``a, b <= 0``."""
    gap = (a - b).abs()
    ratio = torch.where(gap > 0, -torch.expm1(-gap) / gap.clamp_min(torch.finfo(gap.dtype).tiny), torch.ones_like(gap))
    return torch.maximum(a, b).exp() * ratio


class _SoftmaxRescale(torch.autograd.Function):
    """``softmax(x)`` (``log_softmax`` if ``log``) along ``dim`` on ``[x; x']``; backward applies the
    pair's exact multiplier matrix (module docstring) transposed: ``g -> h - w * sum(h)``, ``h = rho * g``."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, log: bool) -> Tensor:
        ctx.dim, ctx.log = dim, log
        ctx.save_for_backward(x)
        return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,), dim = ctx.saved_tensors, ctx.dim
        (x_in, x_ref), (grad_in, _) = _halves(x), _halves(grad)
        total_in, total_ref = x_in.logsumexp(dim, keepdim=True), x_ref.logsumexp(dim, keepdim=True)
        top = torch.maximum(total_in, total_ref)  # a common shift: every exponent <= 0
        weights = _exp_slope(x_in - top, x_ref - top) / _exp_slope(total_in - top, total_ref - top)
        if not ctx.log:
            grad_in = grad_in * _exp_slope(x_in - total_in, x_ref - total_ref)
        multiplier = grad_in - weights * grad_in.sum(dim, keepdim=True)
        return torch.cat([multiplier, torch.zeros_like(multiplier)]), None, None


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


def _softmax(func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
    """A caught softmax, log-softmax or softmin through :class:`_SoftmaxRescale`; None where it is not
    taken per example (no ``dim``, or along the batch dimension): it then keeps its gradient."""
    try:
        arguments = dict(inspect.signature(func).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):  # builtins without a signature: (input, dim, dtype)
        arguments = dict(zip(("input", "dim", "dtype"), args), **kwargs)
    x, dim, dtype = args[0], arguments.get("dim"), arguments.get("dtype")
    if not isinstance(dim, int) or x.dim() < 2 or dim % x.dim() == 0:
        return None
    x = x if dtype is None else x.to(dtype)
    kind = SOFTMAX_FUNCTIONS[func]
    return _SoftmaxRescale.apply(-x if kind == "softmin" else x, dim, kind == "log_softmax")


class RescaleRule(TorchFunctionMode):
    """While active, caught nonlinearities and softmaxes back-propagate DeepLIFT multipliers for
    ``[x; x']`` batches (max pooling too, unless ``pools=False``: then it keeps its gradient).

    >>> with RescaleRule(pools=True):   # on a batch [inputs; baselines]
    ...     output = model(torch.cat([x, x_ref]).requires_grad_())
    """

    def __init__(self, pools: bool = True, rows: int | None = None) -> None:
        super().__init__()
        self.pools = pools
        self.rows = rows  # 2 x pairs: a caught tensor's first dimension must hold whole [x; x'] batches

    def _check_batch(self, func: Callable, x: Tensor) -> None:
        if self.rows is not None and (x.dim() == 0 or x.shape[0] % self.rows):
            raise InputError(
                f"DeepLIFT: {getattr(func, '__name__', func)} got a tensor of shape {tuple(x.shape)} whose first "
                f"dimension is not a multiple of the evaluated batch [x; x'] ({self.rows} rows); the batch must be "
                "the first dimension of every nonlinearity's input (sequence-first layouts are not supported)"
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            if func in ELEMENTWISE or func in SOFTMAX_FUNCTIONS or (self.pools and func in MAX_POOL_FUNCTIONS):
                self._check_batch(func, args[0])
            if func in ELEMENTWISE:
                return _Rescale.apply(args[0], _out_of_place(func, args, kwargs))
            if self.pools and func in MAX_POOL_FUNCTIONS:
                with_indices = MAX_POOL_FUNCTIONS[func]
                if not inspect.signature(with_indices).bind(*args, **kwargs).arguments.get("return_indices", False):
                    return _MaxPoolRescale.apply(args[0], _out_of_place(with_indices, args, kwargs, return_indices=True))
            if func in SOFTMAX_FUNCTIONS:
                caught = _softmax(func, args, kwargs)
                if caught is not None:
                    return caught
        return func(*args, **kwargs)


def _pair_multipliers(path: StraightPath, inputs: tuple[Tensor, ...], baselines: tuple[Tensor, ...], example: Tensor,
                      pools: bool) -> tuple[list[Tensor], Tensor, Tensor]:
    """The multipliers of each row of ``inputs`` against the same row of ``baselines`` (``example[r]`` is
    row r's example, for the target and the extra arguments), from one forward and one backward pass
    over ``[x; x']``; and the target scores at both, (rows,) each."""
    rows, model = example.repeat(2), path.model
    with frozen_parameters(model), torch.enable_grad():
        probes = [torch.cat([x, b]).requires_grad_(True) for x, b in zip(inputs, baselines)]
        with RescaleRule(pools=pools, rows=2 * example.shape[0]):
            output = model(*probes, *expand_args(path.args, rows, path.batch))
        scores = target_scores(output, path.target, rows)
        if not scores.requires_grad:
            raise InputError("inputs: the explained output does not depend on the inputs")
        found = torch.autograd.grad(scores[:example.shape[0]].sum(), probes, allow_unused=True)
    multipliers = [torch.zeros_like(x) if g is None else _halves(g)[0] for x, g in zip(inputs, found)]
    outputs, baseline_outputs = _halves(scores.detach())
    return multipliers, outputs, baseline_outputs


def _call_custom(func: Callable[..., Any], multipliers: list[Tensor], inputs: tuple[Tensor, ...],
                 baselines: tuple[Tensor, ...]) -> list[Tensor]:
    """Captum's ``custom_attribution_func``: called with ``(multipliers,)``, ``(multipliers, inputs)`` or
    ``(multipliers, inputs, baselines)``, tuples with one tensor per input, by how many parameters it
    has; it returns a tuple with one map per input."""
    try:
        count = len(inspect.signature(func).parameters)
    except (TypeError, ValueError) as error:
        raise InputTypeError(f"custom_attribution_func must be a function, got {type(func).__name__}") from error
    if not 1 <= count <= 3:
        raise InputError(f"custom_attribution_func must take 1 to 3 arguments (multipliers, inputs, baselines), it takes {count}")
    maps = func(*(tuple(multipliers), inputs, baselines)[:count])
    if not (isinstance(maps, (tuple, list)) and len(maps) == len(inputs)
            and all(isinstance(m, Tensor) and m.shape == x.shape for m, x in zip(maps, inputs))):
        raise InputError(
            f"custom_attribution_func must return a tuple of {len(inputs)} tensor(s) shaped like the inputs "
            f"{[tuple(x.shape) for x in inputs]}, got {describe(maps)}"
        )
    return list(maps)


def _maps(multipliers: list[Tensor], inputs: tuple[Tensor, ...], baselines: tuple[Tensor, ...], multiply_by_inputs: bool,
          custom: Callable[..., Any] | None) -> tuple[list[Tensor], list[Tensor]]:
    """(the maps returned, the maps whose sum ``delta`` checks): the custom function's for both if
    given; else ``(x - x') * m``, with the multipliers ``m`` returned instead if not ``multiply_by_inputs``."""
    if custom is not None:
        maps = _call_custom(custom, multipliers, inputs, baselines)
        return maps, maps
    products = [(x - b) * m for x, b, m in zip(inputs, baselines, multipliers)]
    return (products if multiply_by_inputs else multipliers), products


class DeepLift(ConvergenceDelta):
    """DeepLIFT, rescale rule: ``attributions = (x - x') * m`` with ``m`` the multipliers above;
    ``delta`` (B,) is ``attributions.sum() - (F(x) - F(x'))``.

    Works on models as shipped: reused and in-place ReLUs, functional ReLUs, max pooling and softmax
    are caught per call. ``multiply_by_inputs=False`` returns the multipliers ``m`` (``delta`` still
    checks ``(x - x') * m``); ``custom_attribution_func`` as in Captum (see :func:`_call_custom`; ``delta``
    then checks its maps). ``maxpool="gradient"`` keeps max pooling's gradient (the DeepLIFT authors'
    default); completeness then holds only where x and x' pick the same winners. Captum 0.9 effectively
    does this wherever a ReLU module feeds the pooling (its pooling rule is lost there), so
    ``"gradient"`` reproduces its numbers on such models (not through a softmax: Captum's rule there is
    the rescale rule minus its mean, not exact).

    >>> res = DeepLift(model).attribute(x, target=3, baselines=0.0)
    >>> res.delta  # ~0 for ReLU / max-pool / softmax networks
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
        custom_attribution_func: Callable[..., Any] | None = None,
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, baselines, target, additional_forward_args)
        found = self._pairs(path, path.batch, lambda pair: (pair, tuple(x[pair] for x in path.inputs),
                                                            tuple(b[pair] for b in path.baselines)),
                            custom_attribution_func, ChunkPlan(internal_batch_size, path.batch, path.inputs[0].device,
                                                               memory_budget))
        totals, sums, outputs, baseline_outputs = found
        return Attribution(
            attributions=path.as_given(totals), delta=sums - (outputs - baseline_outputs), outputs=outputs,
            baseline_outputs=baseline_outputs, method="deeplift", evaluations=2,
        )

    def _pairs(self, path: StraightPath, pairs: int, pick: Callable[[Tensor], tuple[Tensor, tuple, tuple]],
               custom: Callable[..., Any] | None, plan: ChunkPlan) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """DeepLIFT of ``pairs`` (example, reference) pairs, ``pick(pair) -> (example, xs, references)``,
        in chunks of the plan: the maps summed per example, and per pair the sum ``delta`` checks and
        the scores at both ends. A ``custom`` function is called once, on every pair's multipliers (as
        Captum calls it), so that it may compare rows; the forward passes are chunked all the same."""
        totals = [torch.zeros_like(x) for x in path.inputs]
        sums, outputs, baseline_outputs = (path.inputs[0].new_zeros(pairs) for _ in range(3))
        held: list[tuple[Tensor, list[Tensor], tuple, tuple]] = []
        for start, stop in plan:
            pair = torch.arange(start, stop, device=path.inputs[0].device)
            example, xs, bs = pick(pair)
            footprint = Footprint(self.model, path.inputs[0].device) if plan.probing else nullcontext()
            with footprint:
                multipliers, outputs[pair], baseline_outputs[pair] = _pair_multipliers(
                    path, xs, bs, example, self.maxpool == "rescale")
            if isinstance(footprint, Footprint):
                plan.measured(footprint.peak, stop - start)
            held.append((example, multipliers, xs, bs))
            if custom is None:
                self._add(held.pop(), totals, sums, start, None)
        if custom is not None:
            joined = (torch.cat([h[0] for h in held]),) + tuple(
                [torch.cat([h[part][i] for h in held]) for i in range(len(path.inputs))] for part in (1, 2, 3))
            self._add(joined, totals, sums, 0, custom)  # type: ignore[arg-type]
        return totals, sums, outputs, baseline_outputs

    def _add(self, rows: tuple[Tensor, list[Tensor], Sequence[Tensor], Sequence[Tensor]], totals: list[Tensor], sums: Tensor,
             start: int, custom: Callable[..., Any] | None) -> None:
        """The maps of pairs ``start, start + 1, ...`` added to their examples' totals, and their checked sums."""
        example, multipliers, xs, bs = rows
        maps, checked = _maps(multipliers, tuple(xs), tuple(bs), self.multiply_by_inputs, custom)
        for total, one in zip(totals, maps):
            total.index_add_(0, example, one)
        sums[start:start + example.shape[0]] = torch.stack([c.reshape(example.shape[0], -1).sum(1) for c in checked]).sum(0)


class DeepLiftShap:
    """DeepLIFT-SHAP (Lundberg & Lee, 2017): DeepLIFT of every example against each of N reference
    examples, averaged over them, ``mean_j (x - x'_j) * m_j`` (Captum's ``DeepLiftShap``). ``delta``
    (B,) is that map's sum minus ``F(x) - mean_j F(x'_j)``: the mean of the per-reference gaps in
    ``info["deltas"]`` (B, N); ``baseline_outputs`` is ``mean_j F(x'_j)``. The B x N pairs run as
    ``[x; x']`` batches of ``internal_batch_size`` pairs (``"auto"``: sized to the memory budget, as
    every batched method; None: all at once). ``multiply_by_inputs``,
    ``maxpool`` and ``custom_attribution_func`` as in :class:`DeepLift`.

    >>> res = DeepLiftShap(model).attribute(x, baselines=references, target=3)   # references: (N, ...)
    >>> res.info["deltas"].shape   # (B, N), each ~0 for ReLU / max-pool / softmax networks
    """

    def __init__(self, model: nn.Module, multiply_by_inputs: bool = True, maxpool: str = "rescale") -> None:
        self.deeplift = DeepLift(model, multiply_by_inputs, maxpool)

    def attribute(
        self,
        inputs: Inputs,
        baselines: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        custom_attribution_func: Callable[..., Any] | None = None,
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
    ) -> Attribution:
        path = StraightPath(self.deeplift.model, inputs, None, target, additional_forward_args)
        references = check_references(baselines, path.inputs, path.single, "DeepLiftShap", "DeepLift")
        count, pairs = references[0].shape[0], path.batch * references[0].shape[0]
        plan = ChunkPlan(internal_batch_size, pairs, path.inputs[0].device, memory_budget)
        totals, sums, outputs, baseline_outputs = self.deeplift._pairs(  # pair p: example p // N against reference p % N
            path, pairs, lambda pair: (pair // count, tuple(x[pair // count] for x in path.inputs),
                                       tuple(b[pair % count] for b in references)),
            custom_attribution_func, plan)
        deltas = (sums - (outputs - baseline_outputs)).view(path.batch, count)
        return Attribution(
            attributions=path.as_given([total / count for total in totals]), delta=deltas.mean(1),
            outputs=outputs.view(path.batch, count).mean(1), baseline_outputs=baseline_outputs.view(path.batch, count).mean(1),
            method="deeplift_shap", evaluations=2 * count, info={"deltas": deltas},
        )
