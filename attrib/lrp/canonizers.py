"""Canonizers: make a model's functional operations LRP-correct without editing the model.

- **BatchNorm merging** (``Composite.merge_batchnorm``): a BatchNorm whose input is exactly the output
  of a Linear/Conv is folded into it for the relevance pass (``w' = w * scale``,
  ``b' = b * scale + shift``); the forward values are the model's own. Nothing is written to the
  model: the folded parameters are new tensors. Done by the engine when the BatchNorm runs.
- **Residual additions** (``Composite.split_additions``): while the model's forward runs, a
  ``TorchFunctionMode`` catches ``a + b``, ``torch.add`` and ``a += b`` between two computed
  tensors (both on the input's graph) outside any leaf module, e.g. torchvision ResNet's
  ``out += identity``, or two of the model's inputs; relevance is then shared in proportion,
  ``R_a = a R / stab(a + b)``, instead of being copied to both branches as the gradient would. A leaf
  module that sums several inputs (``forward(a, b): return a + b``) is shared the same way when the
  composite maps it to ``Norm``; a leaf called with several tensors from the inputs' graph under any
  other rule is refused when it runs (:meth:`attrib.lrp.run.Run.pre_hook`). Functional average pooling
  (``F.adaptive_avg_pool2d`` in DenseNet and MobileNetV2) gets the ``Norm`` rule the same way.
  Concatenation of computed tensors needs nothing: its gradient already hands each branch its own share.
- **Constants added or concatenated** (a position embedding ``x + pos_embedding``, a class token
  ``torch.cat([cls, x])``): parameters are frozen while the run's forward pass goes, so anything not
  computed from the inputs is a constant. Under ``split_additions``, ``computed + constant`` (``+``,
  ``+=``, ``torch.add`` without ``alpha``; the constant broadcasting to the computed tensor) after the
  first linear layer is shared like a bias, ``R_x = x R / stab(x + c)``, the constant keeping its
  share; before that layer (an input normalisation written as an addition) it passes relevance on as
  before. ``torch.cat``/``concat`` with constant parts hands each computed part its slice and the
  constant parts keep theirs. Both are rows of the conservation report (kind ``"add constant"`` /
  ``"cat constant"``), so what a position embedding or a class token keeps is shown, not lost silently.
  Not caught: Python numbers, subtraction, ``alpha=``, ``stack``/``hstack``/``pad`` with constants.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

ADDITIONS = {torch.add, Tensor.add, Tensor.__add__}
INPLACE_ADDITIONS = {Tensor.add_, Tensor.__iadd__}
CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}
FUNCTIONAL_POOLS = {  # and the module type whose rule they take
    F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d, F.avg_pool3d: nn.AvgPool3d,
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d,
}


def on_graph(value: object) -> bool:
    """A tensor computed from the inputs (not a parameter, buffer or constant): the run feeds the
    model copies of its inputs, so the inputs themselves count too."""
    return isinstance(value, Tensor) and value.requires_grad and value.grad_fn is not None


def constant(value: object) -> bool:
    """A floating-point tensor not computed from the inputs (a parameter, buffer, or made from them)."""
    return isinstance(value, Tensor) and value.is_floating_point() and not on_graph(value)


def _absorbs(computed: Tensor, other: object) -> bool:
    """``other`` is a constant that broadcasts to ``computed`` (a bias-like addend: the sum has
    ``computed``'s shape, so its rows stay the examples)."""
    return (isinstance(other, Tensor) and constant(other)
            and torch.broadcast_shapes(computed.shape, other.shape) == computed.shape)


class Receiver(Protocol):
    """What takes the caught operations (:class:`attrib.lrp.run.Run`).

    >>> with FunctionalOps(run, additions=True):   # run: an attrib.lrp.run.Run
    ...     model(x)
    """

    depth: int  # > 0 while a hooked leaf module runs: operations inside it are that module's own
    first_taken: bool  # whether the first linear layer on the inputs' graph has run

    def addition(self, a: Tensor, b: Tensor, inplace: bool) -> Tensor: ...

    def concatenation(self, parts: list[Tensor], dim: int) -> Tensor: ...

    def functional(self, func: Callable, args: tuple, kwargs: dict) -> Tensor: ...


class FunctionalOps(TorchFunctionMode):
    """Routes residual additions and functional average pooling of one forward pass to ``run``.

    >>> with FunctionalOps(run, additions=True):   # run: an attrib.lrp.run.Run
    ...     model(x)                         # out += identity becomes a relevance-sharing step
    """

    def __init__(self, run: Receiver, additions: bool) -> None:
        super().__init__()
        self.run = run
        self.additions = additions

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.run.depth == 0 and torch.is_grad_enabled():
            if self.additions and (func in ADDITIONS or func in INPLACE_ADDITIONS) and len(args) == 2 and not kwargs:
                a, b = args
                inplace = func in INPLACE_ADDITIONS
                if on_graph(a) and on_graph(b):
                    return self.run.addition(a, b, inplace=inplace)
                if self.run.first_taken and (on_graph(a) and _absorbs(a, b) or not inplace and on_graph(b) and _absorbs(b, a)):
                    return self.run.addition(a, b, inplace=inplace)
            given = args[0] if args else kwargs.get("tensors")
            if func in CONCATENATIONS and isinstance(given, (list, tuple)) and "out" not in kwargs:
                parts = list(given)
                if (any(on_graph(t) for t in parts) and any(constant(t) for t in parts)
                        and all(isinstance(t, Tensor) for t in parts) and len({t.dim() for t in parts}) == 1):
                    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
                    return self.run.concatenation(parts, dim)
            if func in FUNCTIONAL_POOLS and args and on_graph(args[0]):
                return self.run.functional(func, args, kwargs)
        return func(*args, **kwargs)
