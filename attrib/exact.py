"""Exact path integrals on piecewise-linear networks (``method="exact"``).

Along the straight path ``x(a) = x' + a (x - x')`` a network made of affine maps (linear layers,
convolutions, BatchNorm in eval mode, average pooling, additions, concatenations, reshapes), kinks
(ReLU, leaky ReLU, PReLU, ReLU6 / hardtanh, clamp, abs) and max pooling is affine in ``a`` between
finitely many breakpoints: where a kink's input crosses its threshold, or a pooling window's winner
changes (Sotoudeh & Thakur, "Computing linear restrictions of neural networks", NeurIPS 2019). Inside a
linear region ``[t_r, t_r+1]`` every gradient is constant, so with ``m_r`` its midpoint and
``l_r = t_r+1 - t_r`` the integrals are finite sums, with no quadrature error:

    IG_i          = (x_i - x'_i) sum_r l_r dF/dx_i(x(m_r))
    Cond_j(y)     = sum_r dF/dy_j(x(m_r)) (y_j(t_r+1) - y_j(t_r))                  (layer conductance)
    Cond_ij(y)    = (x_i - x'_i) sum_r l_r [dF/dy_j dy_j/dx_i](x(m_r))            (neuron conductance)

**Finding the regions.** A segment ``[a, b]`` whose two ends have the same activation pattern (every
kink's input on the same side of each threshold, every pooling window won by the same input) is one
linear region: by induction over the operations in execution order, each one's input is affine on the
segment; an affine function with the same sign at both ends keeps it in between, and a maximum of affine
functions won by the same one at both ends is that one throughout (the maximum is convex). Otherwise let
``k`` be the first operation (execution order) where the ends differ: everything before it is affine on
the segment, so its input is too and its crossings are exact: ``t = a + (b - a) u_a / (u_a - u_b)``
for a unit whose ``u = z - threshold`` changes sign, and where the two winners' lines meet for a window.
The segment is cut at all of operation ``k``'s crossings and the pieces are checked again from ``k``
on. Each pass evaluates both ends of every unsettled segment in one graph-free batched forward
(chunked), and the analysis runs inside it, operation by operation (a ``TorchFunctionMode`` that sees
module and functional calls alike), so nothing of the forward is kept. A value within ``rtol`` of a
threshold (relative to the largest absolute value of that operation's input at that end of the segment) counts as
on either side; so does a window whose other winner is within ``rtol``.

Anything that is not piecewise linear (a sigmoid, softmax, LayerNorm, GELU, a BatchNorm or dropout in
training mode, ...) is refused by name when it runs. A product of two path-dependent tensors cannot be
recognised by its call; it is caught afterwards: the exact sums must be complete (their total equals
``F(x) - F(x')``), and an exact result whose completeness error exceeds ``check_rtol`` is refused.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .checks import check_count, expand_args
from .errors import InputError
from .hooks import capture
from .memory import ChunkPlan, Footprint
from .sums import WeightedSum
from .sweep import StraightPath, _point, interpolate, interpolation_layer
from .targets import target_scores

EXACT = "exact"
GAP = 2.0 ** -40  # breakpoints closer than this (in alpha) are merged: a region that short weighs nothing
DEFAULT_MAX_REGIONS = 1_000_000


def default_rtol(dtype: torch.dtype) -> float:
    """How close to a threshold (relative) counts as on it: ``eps ** 0.7`` (1e-11 in float64, 1.4e-5 in float32)."""
    return float(torch.finfo(dtype).eps) ** 0.7


def check_rtol(dtype: torch.dtype) -> float:
    """The largest completeness error an exact result may have, relative to max(|F(x)|, |F(x')|): 1e-7 in
    float64, 1e-3 in float32, 5e-2 in half precision (the regions' sum rounds like any sum of that many terms)."""
    return {torch.float64: 1e-7, torch.float32: 1e-3}.get(dtype, 5e-2)


# -- what the forward pass may do ------------------------------------------------------------------

def _scalar(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise _NotPiecewise(f"clamp with a tensor bound ({name})")
        return float(value)
    return float(value)


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _zero(args: tuple, kwargs: dict) -> tuple[float, ...]:
    return (0.0,)


def _hardtanh(args: tuple, kwargs: dict) -> tuple[float, ...]:
    return (float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0)))


def _clamp(args: tuple, kwargs: dict) -> tuple[float, ...]:
    low = _scalar(_arg(args, kwargs, 1, "min", None), "min")
    high = _scalar(_arg(args, kwargs, 2, "max", None), "max")
    return tuple(v for v in (low, high) if v is not None)


KINKS: dict[Callable, Callable[[tuple, dict], tuple[float, ...]]] = {}
for _owner, _names, _thresholds in (
    (F, ("relu", "relu_", "leaky_relu", "leaky_relu_", "prelu"), _zero),
    (torch, ("relu", "relu_", "abs", "abs_", "prelu"), _zero),
    (Tensor, ("relu", "relu_", "abs", "abs_"), _zero),
    (F, ("hardtanh", "hardtanh_"), _hardtanh),
    (torch, ("clamp", "clamp_", "clip", "clip_"), _clamp),
    (Tensor, ("clamp", "clamp_", "clip", "clip_"), _clamp),
):
    for _name in _names:
        if hasattr(_owner, _name):
            KINKS[getattr(_owner, _name)] = _thresholds
KINKS[F.relu6] = lambda args, kwargs: (0.0, 6.0)
if hasattr(torch._C._nn, "relu6"):
    KINKS[torch._C._nn.relu6] = lambda args, kwargs: (0.0, 6.0)

# max pooling: the function seen -> (the same pooling with indices, whether the call returns indices). The
# public F.max_pool2d is a dispatcher on return_indices, and it is what a mode sees.
POOLS: dict[Callable, tuple[Callable, Callable[[tuple, dict], bool]]] = {}
for _d in (1, 2, 3):
    _with = getattr(F, f"max_pool{_d}d_with_indices")
    _adaptive = getattr(F, f"adaptive_max_pool{_d}d_with_indices")
    _asked = (lambda args, kwargs: bool(_arg(args, kwargs, 6, "return_indices", False)))
    _asked_adaptive = (lambda args, kwargs: bool(_arg(args, kwargs, 2, "return_indices", False)))
    POOLS[_with] = (_with, lambda args, kwargs: True)
    POOLS[getattr(F, f"_max_pool{_d}d")] = (_with, lambda args, kwargs: False)
    POOLS[getattr(F, f"max_pool{_d}d")] = (_with, _asked)
    POOLS[getattr(torch, f"max_pool{_d}d")] = (_with, lambda args, kwargs: False)
    POOLS[_adaptive] = (_adaptive, lambda args, kwargs: True)
    POOLS[getattr(F, f"_adaptive_max_pool{_d}d")] = (_adaptive, lambda args, kwargs: False)
    POOLS[getattr(F, f"adaptive_max_pool{_d}d")] = (_adaptive, _asked_adaptive)

_NOT_PL_NAMES = (
    "sigmoid", "tanh", "exp", "expm1", "exp2", "log", "log1p", "log2", "log10", "softmax", "log_softmax", "softmin",
    "gelu", "silu", "mish", "elu", "selu", "celu", "softplus", "softsign", "hardswish", "hardsigmoid", "logsigmoid",
    "tanhshrink", "softshrink", "hardshrink", "threshold", "glu", "layer_norm", "group_norm", "instance_norm",
    "rms_norm", "local_response_norm", "normalize", "sqrt", "rsqrt", "pow", "square", "erf", "erfc", "sin", "cos",
    "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "max", "min", "amax", "amin", "maximum",
    "minimum", "fmax", "fmin", "sort", "topk", "median", "norm", "cosine_similarity", "pairwise_distance", "cdist",
    "scaled_dot_product_attention", "multi_head_attention_forward", "lstm", "gru", "rnn_tanh", "rnn_relu",
    "bilinear", "logsumexp", "cumprod", "prod", "atan", "asin", "acos", "sinh", "cosh", "atan2", "lerp",
)
NOT_PIECEWISE_LINEAR: set[Callable] = set()
for _owner in (torch, F, Tensor, torch.special, torch.linalg):
    for _name in _NOT_PL_NAMES:
        for _variant in (_name, _name + "_"):
            if callable(getattr(_owner, _variant, None)):
                NOT_PIECEWISE_LINEAR.add(getattr(_owner, _variant))
_RANDOM_IN_TRAINING = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}

MODULES_NOT_PL: tuple[type, ...] = tuple(t for t in (
    nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Hardswish,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.GLU, nn.Softmax,
    nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, getattr(nn, "RMSNorm", None), nn.MultiheadAttention, nn.RNNBase,
    nn.Bilinear, nn.CosineSimilarity, nn.PairwiseDistance, nn.Transformer, nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer) if t is not None)


class TooManyRegions(InputError):
    """``max_regions`` was passed; ``evaluations`` counts the forward rows the search had spent."""

    def __init__(self, message: str, evaluations: int) -> None:
        super().__init__(message)
        self.evaluations = evaluations


class _NotPiecewise(Exception):
    """Raised inside the forward pass; turned into an InputError naming the module."""


def _refusal(what: str, module: str, method: str) -> InputError:
    where = f"module {module!r}" if module else "the model's own forward"
    return InputError(
        f"method='exact': {where} computes {what}, which is not piecewise linear, so the path has no finite set of "
        f"linear regions and no exact sum; use a quadrature rule instead ({_alternative(method)})")


def _alternative(method: str) -> str:
    if method == "LayerConductance":
        return "method='stieltjes_trapezoid' with tolerance= bounds the completeness error"
    return "method='gausslegendre' or 'stieltjes_trapezoid', and raise n_steps until delta is small enough"


# -- the segments' analysis, inside the forward pass -----------------------------------------------

class _Analysis(TorchFunctionMode):
    """During one graph-free forward over the ends of ``S`` segments (segment ``s`` runs from row ``ia[s]`` to
    row ``ib[s]``; neighbours share a row), finds for every
    segment the first kink or pooling operation (at or after ``first[s]``) where its two ends differ, and
    that operation's crossings. Also refuses what is not piecewise linear, naming the module."""

    def __init__(self, a: Tensor, b: Tensor, ends: tuple[Tensor, Tensor], rows: int, first: Tensor, rtol: float,
                 method: str, started: bool) -> None:
        super().__init__()
        self.a, self.b, self.first = a, b, first
        self.ia, self.ib = ends  # each segment's two ends: rows of the batch
        self.S, self.rows = a.shape[0], rows
        self.rtol, self.method = rtol, method
        self.started = started  # False until the interpolated layer has run (interpolate_at)
        self.active = torch.ones(self.S, dtype=torch.bool, device=a.device)
        self.hit_op = torch.full((self.S,), -1, dtype=torch.long, device=a.device)
        self.crossings: list[tuple[Tensor, Tensor]] = []
        self.op = 0
        self.modules: list[str] = []

    # module bookkeeping (hooks installed by _Hooks)
    @property
    def module(self) -> str:
        return self.modules[-1] if self.modules else ""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            thresholds = KINKS.get(func)
            if thresholds is not None:
                z = _arg(args, kwargs, 0, "input", None)
                levels = thresholds(args, kwargs)
                self._kink(z, levels)  # before the call: an in-place kink overwrites its input
                return func(*args, **kwargs)
            pool = POOLS.get(func)
            if pool is not None:
                with_indices, asked = pool
                out, indices = with_indices(*args, **kwargs)
                self._pool(_arg(args, kwargs, 0, "input", None), indices)
                return (out, indices) if asked(args, kwargs) else out
            if self.started:
                if func in NOT_PIECEWISE_LINEAR:
                    raise _NotPiecewise(getattr(func, "__name__", str(func)))
                if func is F.batch_norm and _arg(args, kwargs, 5, "training", False):
                    raise _NotPiecewise("batch_norm in training mode (batch statistics)")
                if func in _RANDOM_IN_TRAINING and _arg(args, kwargs, 2, "training", True) and _arg(args, kwargs, 1, "p", 0.5) > 0:
                    raise _NotPiecewise(f"{func.__name__} in training mode (a random mask per pass)")
        except _NotPiecewise as error:
            raise _refusal(str(error), self.module, self.method) from None
        return func(*args, **kwargs)

    def _rows(self, z: Any) -> Tensor | None:
        if not self.started or not isinstance(z, Tensor) or not z.is_floating_point():
            return None
        if z.dim() == 0 or z.shape[0] != self.rows:
            raise InputError(f"method='exact': {('module ' + repr(self.module)) if self.module else 'the model'} gets a "
                             f"tensor of shape {tuple(z.shape)} whose first dimension is not the batch; exact mode needs "
                             "the batch first in every kink and max pooling")
        return z

    def _tolerance(self, za: Tensor, zb: Tensor) -> Tensor:
        low_a, high_a = torch.aminmax(za.flatten(1), dim=1)
        low_b, high_b = torch.aminmax(zb.flatten(1), dim=1)
        scale = torch.maximum(torch.maximum(high_a, -low_a), torch.maximum(high_b, -low_b))
        return (self.rtol * scale).clamp_min(torch.finfo(za.dtype).tiny)

    def _record(self, chosen: Tensor, segment: Tensor, fraction: Tensor, k: int) -> None:
        """Crossings at ``a + (b - a) * fraction`` of the chosen segments ``segment`` (positions in ``chosen``)."""
        seg = chosen[segment]
        self.crossings.append((seg, self.a[seg] + (self.b[seg] - self.a[seg]) * fraction.to(self.a.dtype)))
        self.active[seg] = False
        self.hit_op[seg] = k

    def _ends(self, z: Any) -> tuple[Tensor, Tensor, Tensor] | None:
        """The operation's input at both ends of the segments to check here (their positions ``chosen``,
        float64), or None; counts the operation."""
        z = self._rows(z)
        if z is None:
            return None
        k = self.op
        self.op += 1
        chosen = (self.active & (self.first <= k)).nonzero().squeeze(1)
        if not chosen.numel():
            return None
        return chosen, z[self.ia[chosen]].detach().double(), z[self.ib[chosen]].detach().double()

    def _kink(self, z: Any, levels: tuple[float, ...]) -> None:
        ends = self._ends(z)
        if ends is None or not levels:
            return
        chosen, za, zb = ends[0], ends[1].flatten(1), ends[2].flatten(1)
        tol = self._tolerance(za, zb).unsqueeze(1)
        for level in levels:
            ua, ub = za - level, zb - level
            cross = ((ua > tol) & (ub < -tol)) | ((ua < -tol) & (ub > tol))
            segment, unit = cross.nonzero(as_tuple=True)
            if segment.numel():
                fa, fb = ua[segment, unit], ub[segment, unit]
                self._record(chosen, segment, fa / (fa - fb), self.op - 1)

    def _pool(self, z: Any, indices: Tensor) -> None:
        ends = self._ends(z)
        if ends is None:
            return
        chosen, za, zb = ends[0], ends[1].flatten(2), ends[2].flatten(2)
        ia, ib = indices[self.ia[chosen]].flatten(2), indices[self.ib[chosen]].flatten(2)
        differ = ia != ib
        if not differ.any():
            return
        d_a = za.gather(2, ia) - za.gather(2, ib)  # >= 0: ia wins at a
        d_b = zb.gather(2, ia) - zb.gather(2, ib)  # <= 0: ib wins at b
        tol = self._tolerance(za, zb).view(-1, 1, 1)
        cross = differ & (d_a > tol) & (d_b < -tol)
        segment, channel, window = cross.nonzero(as_tuple=True)
        if segment.numel():
            fa, fb = d_a[segment, channel, window], d_b[segment, channel, window]
            self._record(chosen, segment, fa / (fa - fb), self.op - 1)


class _Census(_Analysis):
    """During one graph-free forward over ``nodes x B`` rows (node-major), counts per step and example the kink
    units whose side of a threshold, and the pooling windows whose winner, differ between the step's two
    nodes: an estimate of the breakpoints inside the step (see :func:`kink_census`). Refuses what is not piecewise
    linear, by name."""

    def __init__(self, nodes: int, batch: int, method: str, started: bool, device: torch.device) -> None:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        index = torch.zeros(0, dtype=torch.long, device=device)
        super().__init__(empty, empty, (index, index), nodes * batch, index, 0.0, method, started)
        self.nodes, self.batch = nodes, batch
        self.changes = torch.zeros(nodes - 1, batch, dtype=torch.long, device=device)

    def _differ(self, a: Tensor) -> None:
        a = a.reshape(self.nodes, self.batch, -1)
        self.changes += (a[1:] != a[:-1]).sum(2)

    def _kink(self, z: Any, levels: tuple[float, ...]) -> None:
        z = self._rows(z)
        if z is not None:
            for level in levels:
                self._differ(z.detach() > level)

    def _pool(self, z: Any, indices: Tensor) -> None:
        if self._rows(z) is not None:
            self._differ(indices)


def _per_item(internal_batch_size: int | str | None, rows: int) -> int | str | None:
    """``internal_batch_size`` (rows) as a number of items of about ``rows`` rows each; "auto" and None as given."""
    if isinstance(internal_batch_size, int) and not isinstance(internal_batch_size, bool):
        return max(1, internal_batch_size // rows)
    return internal_batch_size


def kink_census(path: StraightPath, alphas: Tensor, *, internal_batch_size: int | str | None = "auto",
                memory_budget: int | None = None, method: str = "") -> Tensor:
    """(steps, B): for each step between consecutive ``alphas`` and each example, how many kink units change
    side and pooling windows change winner between the step's ends; graph-free forward passes over the
    nodes, chunked. ``1 + changes.sum(0)`` estimates each path's linear regions: a unit that crosses twice within a
    step is missed, and two changes at one breakpoint count twice (a max pool over ReLU outputs that are all 0 changes
    winner where one of them turns on: on the digits CNN the census counts 25,259 against 22,437 regions). On a
    network without such ties (an MLP) and with nodes close enough it is the count of regions. Refuses a model that
    is not piecewise linear (:class:`InputError`, naming the module)."""
    B = path.batch
    device = path.inputs[0].device
    steps = alphas.shape[0] - 1
    counts = torch.zeros(steps, B, dtype=torch.long)
    plan = ChunkPlan(_per_item(internal_batch_size, 2 * B), steps, device, memory_budget)
    for start, stop in plan:  # steps start..stop-1: nodes start..stop, the boundary node evaluated twice
        nodes = stop - start + 1
        census = _Census(nodes, B, method, path.interpolation is None, device)
        footprint = Footprint(path.model, device) if plan.probing else nullcontext()
        with footprint:
            forward_rows(path, alphas[start:stop + 1].repeat_interleave(B), torch.arange(B).repeat(nodes), analysis=census)
        if isinstance(footprint, Footprint):
            plan.measured(footprint.peak, stop - start)
        counts[start:stop] = census.changes.cpu()
    return counts


class _ModuleWatch:
    """Hooks on every module for one pass: the analysis learns which module is running, and a module
    that is not piecewise linear is refused before it runs."""

    def __init__(self, model: nn.Module, analysis: _Analysis) -> None:
        self.model, self.analysis = model, analysis
        self.stack = ExitStack()

    def __enter__(self) -> "_ModuleWatch":
        for name, module in self.model.named_modules():
            self.stack.callback(module.register_forward_pre_hook(self._enter(name)).remove)
            self.stack.callback(module.register_forward_hook(self._leave(name)).remove)
        return self

    def _enter(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self.analysis.modules.append(name)
            if not self.analysis.started:
                return
            what = None
            if isinstance(module, MODULES_NOT_PL):
                what = f"a {type(module).__name__}"
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats):
                what = f"a {type(module).__name__} in training mode (batch statistics)"
            elif isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
                what = f"a {type(module).__name__} in training mode (a random mask per pass)"
            if what is not None:
                raise _refusal(what, name, self.analysis.method)
        return hook

    def _leave(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.analysis.modules and self.analysis.modules[-1] == name:
                self.analysis.modules.pop()
        return hook

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


# -- forward passes at given (alpha, example) rows ---------------------------------------------------

def forward_rows(path: StraightPath, alphas: Tensor, examples: Tensor, layers: Sequence[str] = (), on: str = "output",
                 analysis: _Analysis | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Target scores and the ``layers``' values at rows ``(alphas[r], examples[r])`` of the path, one
    forward pass without a graph (with ``analysis`` active and watching the modules)."""
    model, n = path.model, path.batch
    device = path.inputs[0].device
    node = torch.arange(alphas.shape[0], device=device)
    examples = examples.to(device)
    substitute: dict[str, Callable] = {}
    if path.interpolation is not None:
        interp = path.interpolation
        fed = tuple(x[examples] for x in path.inputs)
        at = alphas.to(device=device, dtype=interp.start.dtype)

        def point(value: Tensor) -> Tensor:
            if analysis is not None:
                analysis.started = True
            return _point(value, interp, at, node, examples)
        substitute = {interp.layer: point}
    else:
        fed = tuple(interpolate(b, x - b, alphas.to(device=device, dtype=x.dtype), node, examples)
                    for x, b in zip(path.inputs, path.baselines))
    with ExitStack() as stack, torch.no_grad():
        if substitute:
            stack.enter_context(capture(model, list(substitute), argument="interpolate_at", substitute=substitute))
        cap = stack.enter_context(capture(model, list(layers), on=on)) if layers else None
        with ExitStack() as watched:
            if analysis is not None:
                watched.enter_context(_ModuleWatch(model, analysis))
                watched.enter_context(analysis)
            output = model(*fed, *expand_args(path.args, examples, n))
        scores = target_scores(output, path.target, examples)
        values: dict[str, Tensor] = {}
        if cap is not None:
            for name in layers:
                for part in cap.parts.get(name, [name]):
                    values[part] = cap.captured[part] if part in cap.captured else cap[part]
                if name in cap.parts:
                    path.parts[name] = list(cap.parts[name])
    return scores.detach(), values


# -- the regions -------------------------------------------------------------------------------------

@dataclass
class Regions:
    """The linear regions of the path, per example: ``breakpoints[e]`` runs from 0 to 1 (float64), and
    region ``r`` of example ``e`` is ``[breakpoints[e][r], breakpoints[e][r + 1]]``.

    >>> regions = linear_regions(model, x, baselines=0.0, target=3)
    >>> regions.counts          # regions per example
    >>> regions.midpoints, regions.lengths, regions.example   # one row per region, example-major
    """

    breakpoints: list[Tensor]
    evaluations: int = 0  # forward rows spent finding them
    passes: int = 0
    starts: Tensor = field(init=False, repr=False)
    stops: Tensor = field(init=False, repr=False)
    example: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.starts = torch.cat([b[:-1] for b in self.breakpoints])
        self.stops = torch.cat([b[1:] for b in self.breakpoints])
        self.example = torch.cat([torch.full((len(b) - 1,), e, dtype=torch.long) for e, b in enumerate(self.breakpoints)])

    @property
    def counts(self) -> Tensor:
        return torch.tensor([len(b) - 1 for b in self.breakpoints], dtype=torch.long)

    @property
    def midpoints(self) -> Tensor:
        return (self.starts + self.stops) / 2

    @property
    def lengths(self) -> Tensor:
        return self.stops - self.starts


def find_regions(path: StraightPath, *, internal_batch_size: int | str | None = "auto", memory_budget: int | None = None,
                 rtol: float | None = None, max_regions: int = DEFAULT_MAX_REGIONS, method: str = "") -> Regions:
    """Every linear region of every example's path (see the module docstring), found with graph-free
    batched forward passes over the unsettled segments' ends."""
    path.outputs  # the ends' scores: a bad target fails here, before the search
    B = path.batch
    device = path.inputs[0].device
    dtype = path.interpolation.start.dtype if path.interpolation is not None else next(
        (x.dtype for x in path.inputs if x.is_floating_point()), torch.float64)
    max_regions = check_count("max_regions", max_regions)
    rtol = default_rtol(dtype) if rtol is None else float(rtol)
    if not rtol >= 0:
        raise InputError(f"rtol must be a non-negative number, got {rtol!r}")
    a = torch.zeros(B, dtype=torch.float64)
    b = torch.ones(B, dtype=torch.float64)
    example = torch.arange(B)
    first = torch.zeros(B, dtype=torch.long)
    settled: list[tuple[Tensor, Tensor, Tensor]] = []
    evaluations = passes = 0
    while a.numel():
        passes += 1
        plan = ChunkPlan(_per_item(internal_batch_size, 2), a.shape[0], device, memory_budget)
        done = torch.zeros(a.shape[0], dtype=torch.bool)
        hit_op = torch.full((a.shape[0],), -1, dtype=torch.long)
        found: list[tuple[Tensor, Tensor]] = []
        for start, stop in plan:
            s = slice(start, stop)
            n = stop - start
            ends = torch.stack([torch.cat([example[s], example[s]]).double(), torch.cat([a[s], b[s]])], 1)
            points, inverse = torch.unique(ends, dim=0, return_inverse=True)  # neighbours share an end
            analysis = _Analysis(a[s].to(device), b[s].to(device), (inverse[:n].to(device), inverse[n:].to(device)),
                                 points.shape[0], first[s].to(device), rtol, method, started=path.interpolation is None)
            footprint = Footprint(path.model, device) if plan.probing else nullcontext()
            with footprint:
                forward_rows(path, points[:, 1], points[:, 0].long(), analysis=analysis)
            if isinstance(footprint, Footprint):
                plan.measured(footprint.peak, n)
            evaluations += points.shape[0]
            done[s] = analysis.active.cpu()
            hit_op[s] = analysis.hit_op.cpu()
            found += [(seg.cpu() + start, t.cpu()) for seg, t in analysis.crossings]
        settled.append((a[done], b[done], example[done]))
        # tiny segments that still differ (both ends within GAP) are settled as they are
        a, b, example, first = _split(a, b, example, hit_op, found)
        tiny = (b - a) <= GAP
        if tiny.any():
            settled.append((a[tiny], b[tiny], example[tiny]))
            a, b, example, first = a[~tiny], b[~tiny], example[~tiny], first[~tiny]
        total = sum(int(s[0].numel()) for s in settled) + a.numel()
        if total > max_regions:
            raise TooManyRegions(f"max_regions: the paths have more than {max_regions} linear regions (still splitting "
                                 f"after {passes} passes); raise max_regions, or use a quadrature rule for this model",
                                 evaluations)
    starts = torch.cat([s[0] for s in settled])
    owners = torch.cat([s[2] for s in settled])
    breakpoints = []
    for e in range(B):
        mine = torch.sort(starts[owners == e]).values
        breakpoints.append(torch.cat([mine, torch.ones(1, dtype=torch.float64)]))
    return Regions(breakpoints, evaluations, passes)


def _split(a: Tensor, b: Tensor, example: Tensor, hit_op: Tensor, found: list[tuple[Tensor, Tensor]]
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pieces of every segment that had crossings, cut at them (crossings within GAP of each other or
    of the segment's ends merged), each to be checked again from the operation that cut it."""
    empty = torch.zeros(0, dtype=torch.float64)
    if not found:
        return empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    seg = torch.cat([f[0] for f in found])
    t = torch.cat([f[1] for f in found])
    order = torch.argsort(t)
    order = order[torch.argsort(seg[order], stable=True)]
    seg, t = seg[order], t[order]
    owners, counts = torch.unique_consecutive(seg, return_counts=True)
    pieces_a, pieces_b, pieces_e, pieces_f = [], [], [], []
    for s, cuts in zip(owners.tolist(), torch.split(t, counts.tolist())):
        lo, hi = float(a[s]), float(b[s])
        points = [lo]
        for value in cuts.tolist():
            if value - points[-1] > GAP and hi - value > GAP:
                points.append(value)
        points.append(hi)
        pieces_a += points[:-1]
        pieces_b += points[1:]
        pieces_e += [int(example[s])] * (len(points) - 1)
        pieces_f += [int(hit_op[s])] * (len(points) - 1)
    return (torch.tensor(pieces_a, dtype=torch.float64), torch.tensor(pieces_b, dtype=torch.float64),
            torch.tensor(pieces_e, dtype=torch.long), torch.tensor(pieces_f, dtype=torch.long))


def linear_regions(model: nn.Module, inputs: Any, baselines: Any = None, target: Any = None,
                   additional_forward_args: Any = None, internal_batch_size: int | str | None = "auto",
                   memory_budget: int | None = None, rtol: float | None = None,
                   max_regions: int = DEFAULT_MAX_REGIONS, interpolate_at: str | None = None) -> Regions:
    """The linear regions of the straight path from ``baselines`` to ``inputs`` (see :class:`Regions`).

    >>> linear_regions(model, x, baselines=0.0, target=3).counts
    """
    path = StraightPath(model, inputs, baselines, target, additional_forward_args,
                        interpolate_at=interpolation_layer(model, interpolate_at))
    return find_regions(path, internal_batch_size=internal_batch_size, memory_budget=memory_budget, rtol=rtol,
                        max_regions=max_regions, method="linear_regions")


# -- completeness as the last check ------------------------------------------------------------------

def check_complete(path: StraightPath, delta: Tensor | dict[str, Tensor], method: str, against: Tensor | None = None) -> None:
    """Refuse an exact result that is not complete: the model did something nonlinear the checks could not see.
    ``delta`` is relative to max(|F(x)|, |F(x')|), or to ``|against|`` (what the maps should add up to) where given."""
    deltas = delta if isinstance(delta, dict) else {"": delta}
    scale = torch.maximum(path.outputs.abs(), path.baseline_outputs.abs())
    if against is not None:
        scale = torch.maximum(scale, against.abs())
    scale = scale.clamp_min(torch.finfo(path.outputs.dtype).tiny)
    limit = check_rtol(path.outputs.dtype)
    for name, d in deltas.items():
        relative = (d.abs() / scale).max()
        if float(relative) > limit:
            where = f" at layer {name!r}" if name else ""
            raise InputError(
                f"method='exact': the exact sums{where} miss completeness by {float(relative):.3g} of |F| (more than "
                f"{limit:.1g}), so the model is not piecewise linear along this path; it may multiply two tensors that "
                f"both depend on the input, or use an operation the checks do not know. Use a quadrature rule "
                f"({_alternative(method)})")


# -- the exact sums ----------------------------------------------------------------------------------

def exact_input_integral(path: StraightPath, regions: Regions, internal_batch_size: int | str | None,
                         memory_budget: int | None) -> dict[str, Tensor]:
    """``sum_r l_r dF/dx(x(m_r))`` per input key."""
    integral = WeightedSum(regions.lengths, path.batch)
    path.evaluate(regions.midpoints, integral.add, input_grad=True, examples=regions.example,
                  internal_batch_size=internal_batch_size, memory_budget=memory_budget)
    return integral.total


def with_changes(path: StraightPath, regions: Regions, layers: Sequence[str], on: str,
                 internal_batch_size: int | str | None, memory_budget: int | None,
                 work: Callable[[slice, dict[str, Tensor]], None]) -> None:
    """Regions in groups sized to the budget; for each group, the layers' change over each region,
    ``y(t_r+1) - y(t_r)`` (two graph-free forward passes at the regions' ends), handed to ``work(group, change)``,
    which evaluates the group's midpoints (one chunk)."""
    device = path.inputs[0].device
    plan = ChunkPlan(internal_batch_size, regions.midpoints.shape[0], device, memory_budget)
    for start, stop in plan:
        group = slice(start, stop)
        footprint = Footprint(path.model, device) if plan.probing else nullcontext()
        with footprint:
            _, before = forward_rows(path, regions.starts[group], regions.example[group], layers, on)
            _, after = forward_rows(path, regions.stops[group], regions.example[group], layers, on)
            change = {key: after[key] - before[key] for key in before}
            del before, after
            work(group, change)
        if isinstance(footprint, Footprint):
            footprint.add(iter(change.values()))
            plan.measured(footprint.peak, stop - start)


def exact_layer_conductance(path: StraightPath, regions: Regions, layers: Sequence[str], on: str,
                            internal_batch_size: int | str | None, memory_budget: int | None) -> dict[str, Tensor]:
    """``sum_r dF/dy(x(m_r)) (y(t_r+1) - y(t_r))`` per captured key of ``layers``."""
    totals: dict[str, Tensor] = {}

    def work(group: slice, change: dict[str, Tensor]) -> None:
        def consume(chunk: Any, name: str, value: Tensor, grad: Tensor) -> None:
            term = grad * change[name][chunk.node]
            if name not in totals:
                totals[name] = term.new_zeros((path.batch,) + term.shape[1:])
            totals[name].index_add_(0, chunk.example, term)
        path.evaluate(regions.midpoints[group], lambda chunk: None, consume=consume, layers=list(layers),
                      attribute_to_layer_input=on == "input", examples=regions.example[group], internal_batch_size=None)

    with_changes(path, regions, layers, on, internal_batch_size, memory_budget, work)
    return totals


def exact_evaluations(regions: Regions, per_region: int, batch: int) -> int:
    """Model evaluations per example (as the quadrature rules count them): the search's forward rows and
    ``per_region`` rows per region, over all examples, divided by their number (rounded up)."""
    return -(-(regions.evaluations + per_region * int(regions.counts.sum())) // batch)


def exact_info(regions: Regions) -> dict[str, Any]:
    """What an exact result reports: the regions per example (``regions``), their breakpoints, and the
    forward rows and passes the search took."""
    return {"regions": regions.counts, "breakpoints": regions.breakpoints, "search_evaluations": regions.evaluations,
            "search_passes": regions.passes}
