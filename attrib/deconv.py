"""Deconvolution reconstruction (Zeiler & Fergus, 2014; the neuron-selection paper's Algorithms 2-3).

One forward pass records the chain of layers from the input to the chosen layer, with every max
pooling's switches (the positions of its maxima). Everything at the chosen layer except the
selected neuron(s) is zeroed, and the signal goes back down the chain:

- max pooling: unpooled to the recorded switches (values of windows sharing a winner add up, as
  in the gradient; ``MaxUnpool`` is the same map where windows do not overlap);
- ReLU: ``relu`` of the signal;
- convolution: the transposed convolution with the layer's own weights (no bias);
- linear: ``s W``; eval-mode BatchNorm: its scale; average pooling: its transpose;
  flatten, dropout, identity: reshaped.

This is the gradient with :class:`attrib.DeconvNet`'s ReLU rule, started from the selected
activations; the tests check that.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as nn_grad

from .checks import as_args, check_inputs, check_model
from .errors import InputError
from .hooks import preserved, resolve_layers
from .module_types import CONVOLUTIONS
from .result import Attribution
from .targets import selector_weights
from .types import LayerSpec, NeuronSelector

_POOLS = {nn.MaxPool1d: F.max_pool1d_with_indices, nn.MaxPool2d: F.max_pool2d_with_indices, nn.MaxPool3d: F.max_pool3d_with_indices}
_LINEAR_MAPS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_RESHAPES = (nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)


class _Reached(Exception):
    """Stops the forward pass once the chosen layer has run."""


class _Call:
    def __init__(self, name: str, module: nn.Module, x: Tensor, switches: Tensor | None) -> None:
        self.name, self.module, self.shape, self.switches = name, module, x.shape, switches
        self.x = x.clone() if isinstance(module, _LINEAR_MAPS) else None
        self.out_shape: torch.Size | None = None  # its output's shape (a functional flatten may follow)


_CONV_INPUT_GRAD = {1: nn_grad.conv1d_input, 2: nn_grad.conv2d_input, 3: nn_grad.conv3d_input}


def transpose_conv(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, signal: Tensor, shape: torch.Size) -> Tensor:
    """The convolution's transpose with its own weights, no bias, back to input ``shape``."""
    dims = signal.dim() - 2
    return _CONV_INPUT_GRAD[dims](
        list(shape), module.weight.detach(), signal, module.stride, module.padding, module.dilation, module.groups,
    )


def _check_supported(name: str, module: nn.Module) -> None:
    if type(module) in _POOLS or isinstance(module, CONVOLUTIONS + _LINEAR_MAPS + _RESHAPES + (nn.ReLU, nn.Linear)):
        if isinstance(module, CONVOLUTIONS) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
            raise InputError(f"layer {name!r}: padding {module.padding!r} / padding_mode {module.padding_mode!r} has no transposed form here; use integer zero padding")
        return
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return
    raise InputError(
        f"layer {name!r} ({type(module).__name__}) has no deconvolution step; supported: Conv, ReLU, MaxPool, "
        "Linear, BatchNorm, AvgPool, Flatten, Dropout, Identity"
    )


class DeconvReconstruction:
    """Reconstruct selected neurons of a layer in input space through the deconvnet path.

    ``neuron_selector``: an index tuple into the layer's output per example (``(c, h, w)``), a tuple
    with slices (``(c, slice(None), slice(None))`` is filter ``c``), or a callable on the layer
    output (its gradient weights the units). The selected activations are kept, the rest zeroed.
    The model must be a chain of leaf modules up to ``layer`` (VGG, AlexNet): anything that is not
    (a residual addition) is refused with the layer named.

    >>> DeconvReconstruction(vgg).attribute(x, layer="features.28", neuron_selector=(5, slice(None), slice(None)))
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _record(self, inputs: Tensor, layer: str, args: tuple) -> tuple[list[_Call], Tensor]:
        calls: list[_Call] = []
        last: list[tuple[Tensor, int]] = [(inputs, inputs._version)]
        handles = []

        def before(name: str):
            def check(module, hook_args):
                x = hook_args[0] if hook_args else None
                previous, version = last[0]
                if not isinstance(x, Tensor) or x._version != version or not (
                    x is previous or (x.data_ptr() == previous.data_ptr() and x.numel() == previous.numel())
                ):
                    raise InputError(
                        f"layer: the path to {layer!r} is not a plain chain of layers: the input of {name!r} is not "
                        "the unchanged output of the layer before it (a residual addition or another functional op "
                        "in between); deconvolution reconstruction needs VGG/AlexNet-like models"
                    )
                _check_supported(name, module)
                switches = None
                if type(module) in _POOLS:
                    switches = _POOLS[type(module)](
                        x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, return_indices=True,
                    )[1]
                calls.append(_Call(name, module, x, switches))
            return check

        def after(name: str):
            def record(module, hook_args, output):
                last[0] = (output, output._version)
                if calls and calls[-1].module is module:
                    calls[-1].out_shape = output.shape
                if name == layer:
                    raise _Reached(output)
            return record

        with preserved(self.model), torch.no_grad():
            try:
                for name, module in self.model.named_modules():
                    if name and not list(module.children()):
                        handles.append(module.register_forward_pre_hook(before(name)))
                        handles.append(module.register_forward_hook(after(name)))
                try:
                    self.model(inputs, *args)
                except _Reached as reached:
                    return calls, reached.args[0].clone()
            finally:
                for handle in handles:
                    handle.remove()
        raise InputError(f"layer: {layer!r} did not run in the forward pass")

    def attribute(
        self, inputs: Tensor, layer: LayerSpec, neuron_selector: NeuronSelector, additional_forward_args: Any = None,
    ) -> Attribution:
        check_model(self.model)
        inputs = check_inputs(self.model, inputs)
        ((name, module),) = resolve_layers(self.model, layer)
        if list(module.children()):
            raise InputError(f"layer: {name!r} is a container; choose one of its leaf layers")
        calls, activation = self._record(inputs, name, as_args(additional_forward_args))
        signal = activation * selector_weights(neuron_selector, activation)
        start = signal.clone()
        with torch.no_grad():
            for call in reversed(calls):  # a view between layers (torch.flatten in VGG's forward) is undone first
                signal = self._down(call, signal.reshape(call.out_shape or signal.shape))
        return Attribution(
            attributions=signal, method="deconvolution", evaluations=1,
            info={"layer": name, "start": start, "path": [call.name for call in calls]},
        )

    @staticmethod
    def _down(call: _Call, signal: Tensor) -> Tensor:
        module = call.module
        if type(module) in _POOLS:
            assert call.switches is not None  # recorded for every max pooling
            flat = torch.zeros(call.shape, dtype=signal.dtype, device=signal.device).flatten(2)
            flat.scatter_add_(2, call.switches.flatten(2), signal.flatten(2))
            return flat.view(call.shape)
        if isinstance(module, nn.ReLU):
            return signal.clamp(min=0)
        if isinstance(module, CONVOLUTIONS):
            return transpose_conv(module, signal, call.shape)
        if isinstance(module, nn.Linear):
            return signal @ module.weight
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_var is None:
                raise InputError(f"layer {call.name!r}: a BatchNorm without running statistics (track_running_stats=False) "
                                 "has no fixed scale to deconvolve through")
            scale = torch.rsqrt(module.running_var + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
            return signal * scale.view((1, -1) + (1,) * (signal.dim() - 2))
        if isinstance(module, _LINEAR_MAPS):
            assert call.x is not None  # kept for every linear map
            with torch.enable_grad():
                probe = call.x.detach().requires_grad_(True)
                return torch.autograd.grad(module(probe), probe, signal)[0]
        return signal.reshape(call.shape)
