"""LRP rules, each written as its formula (Montavon et al., "Layer-wise relevance propagation: an
overview", 2019; Bach et al., 2015; Montavon et al., "Explaining nonlinear classification
decisions with deep Taylor decomposition", 2017).

A rule maps the relevance ``R_k`` at a layer's output to relevance ``R_j`` at its input. The layer is
an affine map ``z_k = sum_j x_j w_jk + b_k`` (Linear, ConvNd, a BatchNorm folded into one of them, a
BatchNorm on its own, an average pooling with fixed weights), seen through a
:class:`~attrib.lrp.views.LayerView`: ``forward(x, weight, bias)`` and ``backward(x, weight, s)``,
the latter the vector-Jacobian product ``sum_k w_jk s_k``. Every product rule then reads

    R_j = x_j * sum_k w'_jk * R_k / stab(z'_k)       computed as  x * backward(x, w', R / stab(z'))

with its own modified weights ``w'`` (and inputs). Stabiliser: ``stab(z) = z + eps * sign(z)`` with
``sign(0) = +1``, so a zero denominator becomes ``+eps``.

Bias convention (``bias=True``, the default): the bias takes part in the denominator and absorbs
relevance, with the same modification as the weights: ``Gamma`` uses ``b + gamma * b^+`` (for
positive outputs; ``b + gamma * b^-`` for negative ones), ``ZPlus``/``AlphaBeta`` count ``b^+`` as a
positive and ``b^-`` as a negative contribution, ``ZBox``'s bias cancels (as in the tutorial).
``bias=False`` leaves the bias out of the denominator, which makes the rule conservative.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..normalization import normalized_range

if TYPE_CHECKING:
    from .views import LayerView

Number = float | int


def stab(z: Tensor, epsilon: Number | Tensor) -> Tensor:
    """The stabiliser ``z + eps * sign(z)`` with ``sign(0) = +1`` (also for -0.0)."""
    return torch.where(z < 0, z - epsilon, z + epsilon)


def divide(relevance: Tensor, z: Tensor, epsilon: Number | Tensor, scratch: bool = False) -> Tensor:
    """``relevance / stab(z)``; ``epsilon=0`` divides by ``z`` itself and drops the relevance where ``z = 0``.

    ``scratch=True`` lets it overwrite ``z``. The denominator is :func:`stab` computed by
    :func:`_stabilised`, which allocates as little as possible.
    """
    if not isinstance(epsilon, Tensor) and epsilon == 0:
        zero = z == 0
        return torch.div(relevance, z.masked_fill(zero, 1)).masked_fill_(zero, 0)
    denominator = _stabilised(z, epsilon, scratch)
    return torch.div(relevance, denominator, out=denominator)


def _stabilised(z: Tensor, epsilon: Number | Tensor, scratch: bool) -> Tensor:
    """``stab(z)`` in a tensor the caller may overwrite, with as few fresh tensors as possible: on CPU
    they cost page faults, often more than the arithmetic. ``scratch``: ``z`` itself may be used."""
    if scratch and not isinstance(epsilon, Tensor):  # z + eps - 2 eps [z < 0], in z
        negative = z < 0  # -0.0 is not negative: sign(0) = +1
        return z.add_(epsilon).sub_(negative.view(torch.uint8), alpha=2 * epsilon)
    if z.numel() and bool(z.amin() >= 0):  # no negative outputs (below a ReLU, say): z + eps
        return z + epsilon
    denominator = z.abs().add_(epsilon).copysign_(z)
    zero = z == 0
    if bool(zero.any()):  # copysign gives -0.0 a negative sign; the convention says +1
        denominator = torch.where(zero, torch.as_tensor(epsilon, dtype=z.dtype, device=z.device), denominator)
    return denominator


def _divide_signed(relevance: Tensor, denominator: Tensor, epsilon: Number, sign: int) -> Tensor:
    """``relevance / stab(denominator)`` in place for a denominator known to have ``sign`` (or be 0)."""
    if epsilon == 0:
        return divide(relevance, denominator, 0)
    return torch.div(relevance, denominator.add_(sign * epsilon), out=denominator)


def _shifted(bias: Tensor | None, layer: LayerView, epsilon: Number) -> Tensor:
    """``bias + epsilon`` (a bias of ``epsilon`` if there is none): the layer adds it in the same pass."""
    if bias is not None:
        return bias + epsilon
    weight = layer.weight
    assert weight is not None  # only rules that need weights shift the bias
    return torch.full((weight.shape[0],), epsilon, dtype=weight.dtype, device=weight.device)


def _has_negative(x: Tensor) -> bool:
    return x.numel() > 0 and bool(x.amin() < 0)


def _rms(z: Tensor) -> Tensor:
    """Root mean square of each example's ``z``, shaped to broadcast against ``z``."""
    return z.pow(2).reshape(z.shape[0], -1).mean(1).sqrt().reshape((-1,) + (1,) * (z.dim() - 1))


def _positive(param: Tensor | None) -> Tensor | None:
    return None if param is None else param.clamp(min=0)


def _negative(param: Tensor | None) -> Tensor | None:
    return None if param is None else param.clamp(max=0)


def _signs(sign: int) -> tuple:
    """``(part of sign s, part of sign -s)``: ``(_positive, _negative)`` for ``s = 1``."""
    return (_positive, _negative) if sign > 0 else (_negative, _positive)


def _param_part(layer: LayerView, which: str, part) -> Tensor | None:
    """``part`` (``_positive``/``_negative``) of the layer's weight or bias, kept with the view."""
    return layer.derived((which, part.__name__), lambda: part(getattr(layer, which)))


def _input_parts(x: Tensor) -> tuple[Tensor, ...]:
    """``(x^+, x^-)``, or ``(x,)`` when ``x >= 0`` (``x^-`` is then 0 and adds nothing)."""
    if not _has_negative(x):
        return (x,)
    return x.clamp(min=0), x.clamp(max=0)


def _denominator(layer: LayerView, parts: tuple, weights: tuple, bias: Tensor | None) -> Tensor:
    """``sum_j x_j w'_jk + b'_k`` where each input part (``x^+``, ``x^-``) has its own weights ``w'``."""
    total = layer.forward(parts[0], weights[0], bias)
    for part, weight in zip(parts[1:], weights[1:]):
        total += layer.forward(part, weight, None)
    return total


def _redistribute(layer: LayerView, parts: tuple, weights: tuple, share: Tensor) -> Tensor:
    """``x_j sum_k w'_jk share_k``, summed over the input parts, each with its own weights ``w'``."""
    total = layer.backward(parts[0], weights[0], share).mul_(parts[0])
    for part, weight in zip(parts[1:], weights[1:]):
        total += layer.backward(part, weight, share).mul_(part)
    return total


class Rule:
    """Base class. ``relevance(layer, x, z, R)`` returns the relevance at the layer's input.

    ``x`` is the layer's input, ``z`` its output in the forward pass (``None`` for a rule that does not
    declare ``needs_output``), ``R`` the relevance at ``z``.

    >>> class Half(Rule):   # a rule is its formula: here R_j = R_j / 2 for an elementwise layer
    ...     def relevance(self, layer, x, z, relevance):
    ...         return relevance / 2
    """

    needs_weight = False
    needs_output = False  # whether ``z`` is used (else the engine need not keep it)
    # whether relu(z) may stand in for z wherever no relevance sits on z <= 0 (then an in-place ReLU
    # above the layer may overwrite the kept output instead of working on a copy)
    relu_exact = False
    # keyword hints relevance() accepts: ``quiet`` (no relevance arrives where z <= 0), ``scratch``
    # (z may be overwritten: the engine will not need it again)
    hints: frozenset = frozenset()

    def relevance(self, layer: LayerView, x: Tensor, z: Tensor | None, relevance: Tensor) -> Tensor:
        raise NotImplementedError

    def check(self, layer: LayerView, name: str) -> None:
        """Raise ValueError if this rule cannot be used on ``layer``."""
        if self.needs_weight and layer.weight is None:
            raise InputError(
                f"composite: rule {self!r} needs weights, but layer {name!r} ({layer.kind}) has none"
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_"))
        return f"{type(self).__name__}({params})"


class _BiasRule(Rule):
    def __init__(self, bias: bool = True) -> None:
        self.bias = bias


class Epsilon(_BiasRule):
    """LRP-epsilon: ``R_j = x_j sum_k w_jk R_k / (z_k + eps sign(z_k))``.

    ``relative=True`` scales ``epsilon`` per example by the root mean square of ``z`` (the LRP
    tutorial's ``0.25 * std`` is ``Epsilon(0.25, relative=True)``).

    >>> Epsilon(1e-6)
    """

    def __init__(self, epsilon: float = 1e-6, relative: bool = False, bias: bool = True) -> None:
        if not epsilon >= 0:
            raise InputError(f"epsilon must be >= 0, got {epsilon!r}")
        self.epsilon = epsilon
        self.relative = relative
        super().__init__(bias)
        self.relu_exact = not relative  # the RMS needs the negative outputs too

    needs_output = True
    hints = frozenset({"scratch"})

    def relevance(self, layer, x, z, relevance, scratch: bool = False):
        if not self.bias and layer.bias is not None:
            z, scratch = layer.forward(x, layer.weight, None), True
        epsilon = self.epsilon * _rms(z) if self.relative else self.epsilon
        return layer.backward(x, layer.weight, divide(relevance, z, epsilon, scratch)).mul_(x)


class LRP0(_BiasRule):
    """LRP-0: ``R_j = x_j sum_k w_jk R_k / z_k``. Where ``z_k = 0`` its relevance is dropped (with
    ReLU above, the relevance there is already 0).

    >>> Composite(types=[(nn.Linear, LRP0())])
    """

    needs_output = True
    relu_exact = True

    def relevance(self, layer, x, z, relevance):
        if not self.bias and layer.bias is not None:
            z = layer.forward(x, layer.weight, None)
        return layer.backward(x, layer.weight, divide(relevance, z, 0)).mul_(x)


class Gamma(_BiasRule):
    """LRP-gamma, favouring positive contributions: for ``z_k > 0``
    ``R_j = sum_k x_j (w_jk + gamma w_jk^+) R_k / sum_j x_j (w_jk + gamma w_jk^+) (+ b_k + gamma b_k^+)``.

    Written for inputs of either sign (Andeol et al., 2021): for ``z_k > 0`` the contributions
    ``x^+ (w + gamma w^+)`` and ``x^- (w + gamma w^-)`` are used; for ``z_k < 0`` the roles of ``w^+`` and
    ``w^-`` swap, favouring negative contributions. With non-negative inputs and positive outputs
    (a ReLU network) this is the overview's formula; zennit's ``Gamma`` uses the same convention.

    >>> Composite(types=[(nn.Conv2d, Gamma(0.25))])
    """

    needs_weight = True
    needs_output = True
    relu_exact = True
    hints = frozenset({"quiet"})

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6, bias: bool = True) -> None:
        if not gamma >= 0:
            raise InputError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma = gamma
        self.epsilon = epsilon
        super().__init__(bias)

    def _tilted(self, layer, which: str, part) -> Tensor | None:
        """``p + gamma part(p)`` for the layer's weight or (if the rule uses it) bias, kept with the view."""
        param = getattr(layer, which)
        if param is None or (which == "bias" and not self.bias):
            return None
        return layer.derived(("gamma", self.gamma, which, part.__name__), lambda: part(param).mul_(self.gamma).add_(param))

    def relevance(self, layer, x, z, relevance, quiet: bool = False):
        if self.epsilon != 0 and not _has_negative(x):
            return self._fast(layer, x, z, relevance, quiet)
        return self.reference(layer, x, z, relevance)

    def reference(self, layer, x, z, relevance) -> Tensor:
        """The formula, for inputs of either sign: the outputs of each sign ``s`` share their
        relevance, ``R_j = sum_{k: s z_k > 0} c_jk R_k / (sum_j c_jk + b_k + gamma b_k^s + s eps)`` with
        ``c_jk = x_j^+ (w_jk + gamma w_jk^s) + x_j^- (w_jk + gamma w_jk^-s)``."""
        parts = x.clamp(min=0), x.clamp(max=0)
        total = self._side(layer, parts, z, relevance, 1)
        if bool((z < 0).logical_and_(relevance != 0).any()):  # relevance on negative outputs (none below a ReLU)
            total += self._side(layer, parts, z, relevance, -1)
        return total

    def _side(self, layer, parts, z, relevance, sign: int) -> Tensor:
        """The outputs of sign ``s``. The tilt only adds contributions of sign ``s``, so the denominator
        has that sign there and stab() adds ``s * eps``."""
        same, opposite = _signs(sign)
        weights = (self._tilted(layer, "weight", same), self._tilted(layer, "weight", opposite))
        denominator = _denominator(layer, parts, weights, self._tilted(layer, "bias", same))
        share = _divide_signed(relevance, denominator, self.epsilon, sign).masked_fill_(z <= 0 if sign > 0 else z >= 0, 0)
        return _redistribute(layer, parts, weights, share)

    def _fast(self, layer, x, z, relevance, quiet: bool) -> Tensor:
        """:meth:`reference` for ``x >= 0`` and ``eps > 0``, with one modified forward pass. There the
        denominators ``d+ = (w + g w^+) x + b + g b^+`` (for ``z > 0``) and ``d- = (w + g w^-) x + b + g b^-``
        (for ``z < 0``) add up to ``(2 + g) z`` and have the sign of ``z`` where used, so
        ``stab(d+) = d+ + eps`` (eps rides in the bias) and ``-stab(d-) = eps - d- = stab(d+) - (2 + g) z``.
        ``quiet``: no relevance arrives where ``z <= 0`` (and ``z`` may be ``relu(z)``)."""
        weight_up = self._tilted(layer, "weight", _positive)
        up = layer.forward(x, weight_up, _shifted(self._tilted(layer, "bias", _positive), layer, self.epsilon))
        nonpositive, down = None, None
        if not quiet:
            nonpositive = z <= 0
            if bool(torch.logical_and(relevance, nonpositive).any()):  # relevance on z <= 0
                down = self._fast_negative(layer, x, z, relevance, up)  # before `up` is overwritten
        share = torch.div(relevance, up, out=up)
        if nonpositive is not None:
            share.masked_fill_(nonpositive, 0)
        else:  # where z <= 0, d+ + eps can round to exactly 0 (cancellation in float32): 0 / 0 there
            share.nan_to_num_(0.0, 0.0, 0.0)
        total = layer.backward(x, weight_up, share)
        if down is not None:
            total -= down
        return total.mul_(x)

    def _fast_negative(self, layer, x, z, relevance, up: Tensor) -> Tensor:
        """``sum_{k: z_k < 0} (w + g w^-)_jk R_k / -stab(d-_k)``, ``-stab(d-) = up - (2 + g) z`` (``up = stab(d+)``)."""
        plain = z if self.bias or layer.bias is None else layer.forward(x, layer.weight, None)
        flipped = torch.add(up, plain, alpha=-(2 + self.gamma))  # eps - d-, positive where z < 0
        share = torch.div(relevance, flipped, out=flipped).masked_fill_(z >= 0, 0).nan_to_num_(0.0, 0.0, 0.0)
        return layer.backward(x, self._tilted(layer, "weight", _negative), share)


class AlphaBeta(_BiasRule):
    """LRP-alpha-beta: ``R_j = sum_k (alpha (x_j w_jk)^+ / sum_j (x_j w_jk)^+ - beta (x_j w_jk)^- /
    sum_j (x_j w_jk)^-) R_k`` with ``alpha - beta = 1``; positive contributions are ``x^+ w^+`` and
    ``x^- w^-`` (plus ``b^+``), negative ones ``x^+ w^-`` and ``x^- w^+`` (plus ``b^-``).

    >>> Composite(types=[(nn.Conv2d, AlphaBeta(alpha=2.0, beta=1.0))])
    """

    needs_weight = True

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, epsilon: float = 1e-6, bias: bool = True) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
            raise InputError(f"alpha and beta must be >= 0 with alpha - beta = 1, got alpha={alpha!r}, beta={beta!r}")
        self.alpha = alpha
        self.beta = beta
        self.epsilon = epsilon
        super().__init__(bias)

    def relevance(self, layer, x, z, relevance):
        parts = _input_parts(x)
        total = self._share(layer, parts, relevance, 1)
        if self.alpha != 1:
            total = self.alpha * total
        if self.beta:
            total -= self.beta * self._share(layer, parts, relevance, -1)
        return total

    def _share(self, layer, parts, relevance, sign: int) -> Tensor:
        """``sum_k c_jk R_k / stab(sum_j c_jk + b_k^s)`` over the contributions ``c`` of sign ``s``:
        ``x^+ w^s`` and ``x^- w^-s``. They never cancel, so the denominator has sign ``s`` (or is 0
        where every ``c`` is, and then its sign does not matter): stab() adds ``s * eps``, with the bias."""
        same, opposite = _signs(sign)
        weights = (_param_part(layer, "weight", same), _param_part(layer, "weight", opposite))
        bias = _param_part(layer, "bias", same) if self.bias else None
        if self.epsilon == 0:
            return _redistribute(layer, parts, weights, divide(relevance, _denominator(layer, parts, weights, bias), 0))
        denominator = _denominator(layer, parts, weights, _shifted(bias, layer, sign * self.epsilon))
        return _redistribute(layer, parts, weights, torch.div(relevance, denominator, out=denominator))


class ZPlus(AlphaBeta):
    """z+ rule (``AlphaBeta(1, 0)``): ``R_j = sum_k (x_j w_jk)^+ / sum_j (x_j w_jk)^+ R_k``.

    >>> Composite(types=[(nn.Conv2d, ZPlus())])
    """

    def __init__(self, epsilon: float = 1e-6, bias: bool = True) -> None:
        super().__init__(1.0, 0.0, epsilon, bias)

    def __repr__(self) -> str:
        return f"ZPlus(epsilon={self.epsilon!r}, bias={self.bias!r})"


class ZBox(Rule):
    """z^B for a bounded input layer, ``low <= x <= high`` (deep Taylor decomposition):
    ``R_j = sum_k (x_j w_jk - l_j w_jk^+ - h_j w_jk^-) R_k / sum_j (x_j w_jk - l_j w_jk^+ - h_j w_jk^-)``.

    ``low``/``high``: floats, or per-channel tensors of shape (C,), or tensors broadcasting to one
    example's shape. :meth:`from_normalization` derives them from a normalisation's mean and std.

    >>> Composite(first=ZBox.from_normalization(IMAGENET_MEAN, IMAGENET_STD))   # pixels in [0, 1]
    """

    needs_weight = True

    def __init__(self, low: Number | Tensor, high: Number | Tensor, epsilon: float = 1e-6) -> None:
        self.low = low
        self.high = high
        self.epsilon = epsilon

    @classmethod
    def from_normalization(cls, mean, std, epsilon: float = 1e-6) -> ZBox:
        """Bounds of ``(x - mean) / std`` for ``x`` in [0, 1]: ``low = -mean/std``, ``high = (1-mean)/std``."""
        low, high = normalized_range(mean, std)
        return cls(low, high, epsilon)

    @staticmethod
    def _bound(bound: Number | Tensor, x: Tensor, name: str) -> Tensor:
        bound = torch.as_tensor(bound, dtype=x.dtype, device=x.device)
        if bound.dim() == 1 and x.dim() > 2 and bound.shape[0] == x.shape[1]:
            bound = bound.reshape((-1,) + (1,) * (x.dim() - 2))
        try:
            return torch.broadcast_to(bound, x.shape[1:]).expand_as(x)
        except RuntimeError:
            raise InputError(
                f"ZBox {name}: shape {tuple(bound.shape)} does not broadcast to the input layer's shape "
                f"{tuple(x.shape[1:])} per example"
            ) from None

    def relevance(self, layer, x, z, relevance):
        low, high = self._bound(self.low, x, "low"), self._bound(self.high, x, "high")
        weight = layer.weight
        weight_pos, weight_neg = _param_part(layer, "weight", _positive), _param_part(layer, "weight", _negative)
        denominator = layer.forward(x, weight, None)
        denominator -= layer.forward(low[:1], weight_pos, None)  # the bounds are the same for every example
        denominator -= layer.forward(high[:1], weight_neg, None)
        share = divide(relevance, denominator, self.epsilon)
        plain, positive = layer.backward(x, weight, share), layer.backward(x, weight_pos, share)
        # x c - l c+ - h c- with c- = c - c+
        return plain.mul_(x - high).addcmul_(positive, high - low)


class Flat(Rule):
    """Flat: ``R_j = sum_k R_k / N_k``, every input connected to ``k`` gets an equal share
    (``N_k`` = number of inputs of ``k``, fewer at a padded border).

    >>> Composite(first=Flat())
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def relevance(self, layer, x, z, relevance):
        ones = torch.ones_like(x)
        weight = None if layer.weight is None else layer.derived(("ones",), lambda: torch.ones_like(layer.weight))
        return layer.backward(ones, weight, divide(relevance, layer.forward(ones, weight, None), self.epsilon))


class WSquare(Rule):
    """w^2: ``R_j = sum_k w_jk^2 R_k / sum_j w_jk^2`` (the bias is not used).

    >>> Composite(first=WSquare())
    """

    needs_weight = True

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def relevance(self, layer, x, z, relevance):
        ones = torch.ones_like(x)
        weight = layer.derived(("square",), lambda: layer.weight.pow(2))
        return layer.backward(ones, weight, divide(relevance, layer.forward(ones, weight, None), self.epsilon))


class Pass(Rule):
    """Pass relevance through unchanged (elementwise activations): ``R_j = R_j``.

    >>> Composite(types=[(nn.GELU, Pass())])
    """

    def relevance(self, layer, x, z, relevance):
        if relevance.shape != x.shape:
            raise InputError(
                f"Pass needs a layer whose output has its input's shape; got {tuple(x.shape)} -> {tuple(relevance.shape)}"
            )
        return relevance


class Norm(Rule):
    """Share in proportion to contributions without parameters (average pooling, sums):
    ``R_j = x_j sum_k w_jk R_k / stab(z_k)`` with the layer's fixed weights (``epsilon=0``: no
    stabiliser, exactly conservative).

    >>> Composite(types=[(nn.AvgPool2d, Norm(0))])   # exactly conservative
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    needs_output = True
    hints = frozenset({"scratch"})

    def relevance(self, layer, x, z, relevance, scratch: bool = False):
        return layer.backward(x, None, divide(relevance, z, self.epsilon, scratch)).mul_(x)


class Gradient(Rule):
    """The layer's plain vector-Jacobian product ``R_j = sum_k dz_k/dx_j R_k`` (max pooling: the
    winner takes all).

    >>> Composite(types=[(nn.Tanh, Gradient())])   # relevance times the local derivative
    """

    def relevance(self, layer, x, z, relevance):
        return layer.backward(x, layer.weight, relevance)



# ---------------------------------------------------------------- transformers
# AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022), from their equations.


class LayerNormRule(Rule):
    """LayerNorm / RMSNorm with the normalisation treated as a constant: for
    ``y = gamma * (x - mean(x)) / sigma + beta`` the division by ``sigma`` passes relevance unchanged
    (the identity rule), the affine part is shared by LRP-epsilon (``R_n = gamma n R / stab(y)``: the
    bias ``beta`` absorbs its share) and the centring, a linear map, by LRP-epsilon too:
    ``R_x = x * (s - mean(s))`` with ``s = R_n / stab(x - mean(x))``. RMSNorm has no centring:
    ``R_x = R_n``. Without a bias and with ``epsilon -> 0`` it is conservative.

    >>> Composite(types=[(nn.LayerNorm, LayerNormRule(1e-6))])
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        if not epsilon >= 0:
            raise InputError(f"epsilon must be >= 0, got {epsilon!r}")
        self.epsilon = epsilon

    def relevance(self, layer, x, z, relevance):
        norm = layer.module
        dims = tuple(range(x.dim() - len(norm.normalized_shape), x.dim()))
        centred = isinstance(norm, nn.LayerNorm)
        c = x - x.mean(dims, keepdim=True) if centred else x
        spread = c.pow(2).mean(dims, keepdim=True) if centred else x.pow(2).mean(dims, keepdim=True)
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        n = c / (spread + eps).sqrt()
        if norm.weight is not None:
            scaled = n * norm.weight.detach()
            y = scaled + norm.bias.detach() if getattr(norm, "bias", None) is not None else scaled
            relevance = scaled * divide(relevance, y, self.epsilon)
        if not centred:
            return relevance
        s = divide(relevance, c, self.epsilon)
        return x * (s - s.mean(dims, keepdim=True))


class SoftmaxRule(Rule):
    """AttnLRP's softmax rule, a Taylor decomposition at the input with the bias absorbing the rest:
    ``R_i = x_i (R_i - s_i sum_j R_j)`` over the softmax dimension, ``s`` its output. Masked
    positions (``x = -inf``) get none.

    >>> Composite(types=[(nn.Softmax, SoftmaxRule())])
    """

    needs_output = True

    def relevance(self, layer, x, z, relevance):
        dim = getattr(layer.module, "dim", -1)
        dim = -1 if dim is None else dim
        result = x * (relevance - z * relevance.sum(dim, keepdim=True))
        return torch.where(torch.isfinite(x), result, torch.zeros_like(result))


class Blocked(Rule):
    """No relevance passes (CP-LRP's attention weights: treated as constants, so the relevance goes to
    the values only). The relevance that arrives is absorbed and shown in the conservation report.

    >>> Composite(types=[(nn.Softmax, Blocked())])
    """

    def relevance(self, layer, x, z, relevance):
        return torch.zeros_like(x)


class ProductRule(Rule):
    """A rule for a module with two inputs from the graph whose output is bilinear in them (the two
    matrix products of attention): ``relevance_pair(product, a, b, z, R)`` returns ``(R_a, R_b)``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        if not epsilon >= 0:
            raise InputError(f"epsilon must be >= 0, got {epsilon!r}")
        self.epsilon = epsilon

    def relevance(self, layer, x, z, relevance):  # one input: not a product
        raise InputError(f"{type(self).__name__} is a rule for modules with two inputs from the graph")

    @staticmethod
    def _contributions(product, a: Tensor, b: Tensor, share: Tensor) -> tuple[Tensor, Tensor]:
        """``(a * d(share . product)/da, b * d(share . product)/db)``: each factor's part of every product term."""
        with torch.enable_grad():
            pa, pb = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            ga, gb = torch.autograd.grad(product(pa, pb), (pa, pb), share)
        return a * ga, b * gb

    def relevance_pair(self, product, a: Tensor, b: Tensor, z: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class UniformProduct(ProductRule):
    """AttnLRP's rule for a product of two computed tensors (``q k^T``, ``weights v``): each term
    ``a_ij b_jk`` of ``z_ik`` takes its LRP-epsilon share of ``R_ik``, split half and half between
    its two factors: ``R_a = a * (R / stab(z)) b^T / 2``, ``R_b = b * a^T (R / stab(z)) / 2``.
    Conservative up to ``epsilon``.

    >>> Composite(types=[((AttentionScores, AttentionContext), UniformProduct())])
    """

    def relevance_pair(self, product, a, b, z, relevance):
        ra, rb = self._contributions(product, a, b, divide(relevance, z, self.epsilon))
        return ra / 2, rb / 2


class ConstantFirst(ProductRule):
    """CP-LRP's rule for a product whose first factor is taken as a constant (the attention weights):
    the product is then linear in the second factor, which takes all of the relevance by LRP-epsilon,
    ``R_b = b * a^T (R / stab(z))``; the first gets none.

    >>> Composite(types=[(AttentionContext, ConstantFirst())])
    """

    def relevance_pair(self, product, a, b, z, relevance):
        _, rb = self._contributions(product, a, b, divide(relevance, z, self.epsilon))
        return torch.zeros_like(a), rb
