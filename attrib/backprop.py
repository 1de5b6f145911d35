"""Modified backpropagation through ReLU: guided backprop (Springenberg et al., 2015) and the
deconvnet's gradient form (Zeiler & Fergus, 2014).

Every ReLU the forward pass calls is caught by a ``TorchFunctionMode``: ``nn.ReLU`` modules, in-place
or not, a module reused several times (torchvision's ResNet), and functional ``F.relu`` /
``torch.relu`` / ``Tensor.relu`` (DenseNet). Caught ReLUs compute out of place, so the rule sees
the input each call really had. Nothing is attached to the model.

- guided: ``dx = g * [x > 0] * [g > 0]``
- deconvnet: ``dx = g * [g > 0]`` (the forward mask is ignored; the reconstruction's ReLU)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .gradients import input_gradients
from .result import Attribution
from .types import Inputs, TargetType

RELUS = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu_}


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        positive = x > 0
        ctx.save_for_backward(positive)
        return x * positive

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (positive,) = ctx.saved_tensors
        return grad.clamp(min=0) * positive


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp(min=0)


class ReLURule(TorchFunctionMode):
    """While active, every ReLU call runs ``function`` (an autograd Function) instead, out of place.

    >>> with ReLURule(_GuidedReLU):   # every ReLU called in here passes back only positive gradients where x > 0
    ...     output = model(x)
    """

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in RELUS and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            return self.function.apply(args[0])
        return func(*args, **(kwargs or {}))


class _ReLUMethod:
    rule: type[torch.autograd.Function]
    name: str

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(self, inputs: Inputs, target: TargetType = None, additional_forward_args: Any = None,
                  internal_batch_size: int | str | None = "auto", memory_budget: int | None = None) -> Attribution:
        found = input_gradients(self.model, inputs, target, additional_forward_args, mode=ReLURule(self.rule),
                                internal_batch_size=internal_batch_size, memory_budget=memory_budget)
        return Attribution(attributions=found.given(found.grads), outputs=found.scores, method=self.name, evaluations=1)


class GuidedBackprop(_ReLUMethod):
    """Gradient in which every ReLU passes only positive signal at positive inputs.

    >>> GuidedBackprop(model).attribute(x, target=3).attributions
    """

    rule, name = _GuidedReLU, "guided_backprop"


class DeconvNet(_ReLUMethod):
    """The deconvnet as a gradient: every ReLU passes ``relu(signal)`` whatever its input was
    (Captum's ``Deconvolution``). :class:`attrib.DeconvReconstruction` is the same map built from
    transposed layers.

    >>> DeconvNet(model).attribute(x, target=3).attributions
    """

    rule, name = _DeconvReLU, "deconvnet"
