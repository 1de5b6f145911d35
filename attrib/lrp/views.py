"""Views of layers as affine maps ``z = forward(x, weight, bias)`` that rules can re-evaluate with
modified parameters, and ``backward(x, weight, s)``, the vector-Jacobian product with respect to the
input (``sum_k w_jk s_k``). Nothing here changes a module: modified parameters are new tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..module_types import CONVOLUTIONS


def _autograd_vjp(function: Callable[[Tensor], Tensor], x: Tensor, s: Tensor) -> Tensor:
    with torch.enable_grad():
        probe = x.detach().requires_grad_(True)
        return torch.autograd.grad(function(probe), probe, s)[0]


class LayerView:
    """Base: a module seen as ``forward(x, weight, bias)``; ``weight``/``bias`` are the effective ones.

    Views live as long as their :class:`~attrib.lrp.LRP` object, so parameters derived by rules
    (``w + gamma w^+``, a folded BatchNorm) are computed once; ``signature`` (the identity and
    version counter of every source tensor) tells when a view is stale and must be rebuilt.

    >>> view = view_of(model.features[0])
    >>> torch.allclose(view.forward(x, view.weight, view.bias), model.features[0](x))   # True
    """

    kind = "layer"
    weight: Tensor | None = None
    bias: Tensor | None = None
    sources: tuple = ()
    module: nn.Module | None = None  # the module seen (None for a function)
    built: tuple | None = None  # the ``signature`` when the view was built (set by ViewCache)

    def signature(self) -> tuple:
        return tuple((id(t), t._version) for t in self.sources if t is not None)

    def derived(self, key: tuple, compute: Callable[[], Tensor | None]) -> Tensor | None:
        """A tensor computed from the parameters once, then kept with the view."""
        memo = self.__dict__.setdefault("_derived", {})
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def backward(self, x: Tensor, weight: Tensor | None, s: Tensor) -> Tensor:
        return _autograd_vjp(lambda probe: self.forward(probe, weight, None), x, s)

    def reference_output(self, x: Tensor, z: Tensor) -> Tensor:
        """The output the proportions are taken from (the forward output, unless redefined)."""
        return z


class _ParameterView(LayerView):
    """A module whose own ``weight`` and ``bias`` are the layer's parameters."""

    weight: Tensor

    def __init__(self, module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        self.module = module
        self.kind = type(module).__name__
        self.weight, self.bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
        self.sources = (module.weight, module.bias)


class LinearView(_ParameterView):
    """``nn.Linear``: ``z = x W^T + b``.

    >>> view = LinearView(nn.Linear(4, 2))
    >>> view.backward(x, view.weight, s)   # s @ W: the vector-Jacobian product
    """

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward(self, x, weight, s):
        return s @ weight


class ConvView(_ParameterView):
    """``nn.ConvNd``; the backward pass calls the direct input-gradient kernel where padding allows.

    >>> view = ConvView(conv)
    >>> view.forward(x, view.weight.clamp(min=0), None)   # the same convolution with w+
    """

    module: nn.Conv1d | nn.Conv2d | nn.Conv3d

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(module)
        # the direct input-gradient kernel needs integer padding and zero padding mode
        self._direct = module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def forward(self, x, weight, bias):
        return self.module._conv_forward(x, weight, bias)

    def backward(self, x, weight, s):
        if not self._direct:
            return super().backward(x, weight, s)
        module = self.module
        dims = x.dim() - 2
        return torch.ops.aten.convolution_backward(
            s, x, weight, None, list(module.stride), list(module.padding), list(module.dilation),
            False, [0] * dims, module.groups, [True, False, False],
        )[0]


def _batchnorm_sources(module: nn.modules.batchnorm._BatchNorm) -> tuple:
    return (module.running_mean, module.running_var, module.weight, module.bias)


def batchnorm_affine(module: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel of an eval-mode BatchNorm: ``y = scale * x + shift``."""
    # the LRP plan refuses a BatchNorm without running statistics before a view is made
    assert module.running_mean is not None and module.running_var is not None, "BatchNorm keeps no running statistics"
    scale = torch.rsqrt(module.running_var.detach() + module.eps)
    shift = -module.running_mean.detach() * scale
    if module.weight is not None:
        scale = scale * module.weight.detach()
        shift = shift * module.weight.detach() + module.bias.detach()
    return scale, shift


class FoldedView(LayerView):
    """A Linear/Conv followed by a BatchNorm, as one layer: ``w' = w * scale``, ``b' = b * scale + shift``.

    >>> view = FoldedView(ConvView(conv), batchnorm)
    >>> view.forward(x, view.weight, view.bias)   # == batchnorm(conv(x)) in eval mode
    """

    def __init__(self, base: LinearView | ConvView, batchnorm: nn.modules.batchnorm._BatchNorm) -> None:
        self.base, self.module = base, batchnorm
        self.kind = f"{base.kind}+{type(batchnorm).__name__}"
        self.sources = base.sources + _batchnorm_sources(batchnorm)
        scale, shift = batchnorm_affine(batchnorm)
        self.weight = base.weight * scale.reshape((-1,) + (1,) * (base.weight.dim() - 1))
        self.bias = shift if base.bias is None else base.bias * scale + shift

    def forward(self, x, weight, bias):
        return self.base.forward(x, weight, bias)

    def backward(self, x, weight, s):
        return self.base.backward(x, weight, s)


class AffineView(LayerView):
    """A BatchNorm with no Linear/Conv right before it: a per-channel affine map (a diagonal layer).

    >>> view = AffineView(batchnorm)
    >>> view.forward(x, view.weight, view.bias)   # == batchnorm(x) in eval mode
    """

    def __init__(self, module: nn.modules.batchnorm._BatchNorm) -> None:
        self.module = module
        self.kind = type(module).__name__
        self.sources = _batchnorm_sources(module)
        self.weight, self.bias = batchnorm_affine(module)

    @staticmethod
    def _shaped(param: Tensor, x: Tensor) -> Tensor:
        return param.reshape((1, -1) + (1,) * (x.dim() - 2))

    def forward(self, x, weight, bias):
        out = x * self._shaped(weight, x)
        return out if bias is None else out + self._shaped(bias, x)

    def backward(self, x, weight, s):
        return s * self._shaped(weight, x)


class FunctionView(LayerView):
    """A parameter-free linear map given as a function (pooling, a functional op).

    >>> view = FunctionView(lambda t: F.avg_pool2d(t, 2), 'avg_pool2d')
    >>> view.backward(x, None, s)   # by autograd
    """

    def __init__(self, function: Callable[[Tensor], Tensor], kind: str) -> None:
        self.function = function
        self.kind = kind

    def forward(self, x, weight, bias):
        return self.function(x)


class MaxAsAveragePoolView(FunctionView):
    """A max pooling seen, for relevance, as the average pooling with the same window (LRP tutorial).

    >>> MaxAsAveragePoolView(nn.MaxPool2d(2)).forward(x, None, None)   # == F.avg_pool2d(x, 2)
    """

    def __init__(self, module: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d) -> None:
        dims = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(module)]
        if module.dilation not in (1, (1,) * dims):
            raise InputError(f"maxpool='average' needs dilation 1, got {module.dilation!r}")
        average = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        stride = module.stride if module.stride is not None else module.kernel_size
        super().__init__(
            lambda x: average(x, module.kernel_size, stride, module.padding, module.ceil_mode, count_include_pad=True),
            f"{type(module).__name__} as average",
        )

    def reference_output(self, x, z):
        return self.function(x)


def view_of(module: nn.Module) -> LayerView:
    """The view of a leaf module that has a rule."""
    if isinstance(module, nn.Linear):
        return LinearView(module)
    if isinstance(module, CONVOLUTIONS):
        return ConvView(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return AffineView(module)
    view = FunctionView(module.forward, type(module).__name__)
    view.module = module  # rules that read the module's settings (LayerNorm's shape, Softmax's dim)
    return view
