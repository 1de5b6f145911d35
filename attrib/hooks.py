"""Context-managed capture, replacement and masking of submodule outputs or inputs.

Every hook lives inside a context manager and is removed in ``finally``; the model's parameters
(identity and ``requires_grad``), buffers and ``training`` flags are restored on exit, also when
the forward pass raises.

    >>> with capture(model, ["features.3", "features.8"]) as cap:
    ...     model(x)
    >>> cap["features.8"].shape
"""
from __future__ import annotations

import difflib
import re
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError, InputTypeError
from .types import LayerSpec

Edit = Callable[[Tensor], Tensor]


class LayerReuseError(InputError):
    """A hooked module ran more than once in one forward pass, so 'its output' is ambiguous.

    >>> LRP(model).attribute(x, layers=['shared'])   # raises LayerReuseError if 'shared' runs twice per pass
    """


_ELEMENT = re.compile(r"^(?P<name>.*?)\[(?P<key>[^\[\]]+)\]$")


def split_element(layer: str) -> tuple[str, int | str | None]:
    """``"lstm[0]"`` -> ``("lstm", 0)``, ``"heads[logits]"`` -> ``("heads", "logits")``, ``"fc"`` -> ``("fc", None)``."""
    found = _ELEMENT.match(layer)
    if found is None:
        return layer, None
    key = found.group("key").strip()
    return found.group("name"), int(key) if key.lstrip("-").isdigit() else key


def resolve_layers(model: nn.Module, layers: LayerSpec | Sequence[LayerSpec], elements: bool = False,
                   argument: str = "layers") -> list[tuple[str, nn.Module]]:
    """Map layer names or module objects to ``(dotted name, module)`` pairs of ``model``.

    An unknown name raises ``ValueError`` listing the closest names from ``model.named_modules()``.
    With ``elements``, a name may pick one element of the module's output (or, for inputs, one
    positional input): ``"lstm[0]"``, ``"heads[logits]"``; the name returned is the name as given.
    Errors name ``argument``.
    """
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, Sequence):
        raise InputTypeError(f"{argument} must be a layer name, a module, or a list of them")
    by_name = dict(model.named_modules())
    by_module = {id(module): name for name, module in reversed(list(model.named_modules()))}
    resolved: list[tuple[str, nn.Module]] = []
    for layer in layers:
        if isinstance(layer, str):
            name, element = split_element(layer) if layer not in by_name else (layer, None)
            if element is not None and not elements:
                raise InputError(f"{argument}: {layer!r} picks an element of a layer's output, which this method does not "
                                 f"take; give the module {name!r}")
            if name not in by_name or name == "":
                close = difflib.get_close_matches(name, [n for n in by_name if n], n=5, cutoff=0.5)
                hint = f"; closest names: {', '.join(close)}" if close else ""
                raise InputError(f"{argument}: {name!r} is not a submodule of the model{hint}")
            _refuse_containers(layer, name, by_name[name], argument)
            resolved.append((layer, by_name[name]))
        elif isinstance(layer, nn.Module):
            if id(layer) not in by_module or by_module[id(layer)] == "":
                raise InputError(f"{argument}: the {type(layer).__name__} module given is not a submodule of the model")
            _refuse_containers(by_module[id(layer)], by_module[id(layer)], layer, argument)
            resolved.append((by_module[id(layer)], layer))
        else:
            raise InputTypeError(f"{argument}: expected a name or an nn.Module, got {type(layer).__name__}")
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise InputError(f"{argument}: a layer is listed twice: {names}")
    return resolved


def _refuse_containers(layer: str, name: str, module: nn.Module, argument: str = "layers") -> None:
    """Modules without a forward of their own (ModuleList, ModuleDict) hold modules but are never called
    (a subclass that defines forward, like torchvision's _DenseBlock, is a layer like any other)."""
    if type(module).forward is nn.Module.forward:
        first = next(iter(dict(module.named_children())), "0")
        raise InputError(f"{argument}: {layer!r}: {name!r} is a {type(module).__name__}, which is never called; name one of "
                         f"its modules, e.g. '{name}.{first}'")


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore ``training``, parameter objects and ``requires_grad``, and buffer values on exit."""
    training = [(module, module.training) for module in model.modules()]
    params = [
        (module, name, param, param.requires_grad)
        for module in model.modules()
        for name, param in module._parameters.items()
        if param is not None
    ]
    buffers = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    try:
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for module, name, param, requires_grad in params:
            module._parameters[name] = param
            param.requires_grad_(requires_grad)
        for module, name, buffer, saved in buffers:
            module._buffers[name] = buffer
            if not torch.equal(buffer, saved):  # kernels such as batch_norm update stats without a version bump
                with torch.no_grad():
                    buffer.copy_(saved)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off for every parameter (restored by :func:`preserved`).

    The autograd graph then starts at the first tensor that needs a gradient (the input, or the
    first captured layer), so the part of the network below it keeps no activations for backward.
    """
    with preserved(model):
        for param in model.parameters():
            param.requires_grad_(False)
        yield


class capture:
    """Capture (and optionally edit) the output, or the input, of submodules during forward passes.

    Args:
        model: any ``nn.Module``.
        layers: dotted names from ``model.named_modules()`` or module objects.
        on: ``"output"`` or ``"input"`` (the module's first positional argument).
        edit: ``{name: f}``; ``f(tensor)`` replaces what flows on from that layer (see :func:`mask`).
        leaf: make each captured tensor that does not already need a gradient a leaf that does, so
            gradients with respect to it can be taken even when nothing below needs one
            (``cap.made_leaves`` names those: tensors that did not depend on anything needing a gradient).
        substitute: ``{name: f}``; ``f(tensor)`` replaces the layer's value itself: the replacement is
            what is captured and what flows on (the interpolation at a layer, see :mod:`attrib.sweep`).
        argument: the argument errors name (``"layers"``; ``"interpolate_at"`` for the interpolated layer).

    ``cap[name]`` is the tensor seen in the latest forward pass. What flows on is a clone, so an
    in-place operation downstream (``ReLU(inplace=True)``) cannot alter the captured tensor. A module
    that runs twice in one forward pass raises :class:`LayerReuseError`.

    >>> with capture(model, ['features.28'], on='input') as cap:
    ...     model(x)
    >>> cap['features.28']   # the layer's input in that pass
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Sequence[LayerSpec],
        *,
        on: str = "output",
        edit: Mapping[str, Edit] | None = None,
        leaf: bool = False,
        substitute: Mapping[str, Edit] | None = None,
        argument: str = "layers",
    ) -> None:
        if on not in ("output", "input"):
            raise InputError(f"on must be 'output' or 'input', got {on!r}")
        self.model = model
        self.argument = argument
        self.layers = resolve_layers(model, layers, elements=True, argument=argument)
        self.on = on
        self.edit = dict(edit or {})
        self.substitute = dict(substitute or {})
        for option, given in (("edit", self.edit), ("substitute", self.substitute)):
            unknown = set(given) - {name for name, _ in self.layers}
            if unknown:
                raise InputError(f"{option}: {sorted(unknown)} are not among the captured layers")
        self.leaf = leaf
        self.captured: dict[str, Tensor] = {}
        self.made_leaves: set[str] = set()
        self.parts: dict[str, list[str]] = {}  # a layer captured as several tensors (its positional inputs)
        self._elements = {name: split_element(name)[1] if name not in dict(model.named_modules()) else None
                          for name, _ in self.layers}
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self._guard: AbstractContextManager[None] | None = None

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.captured and name in {n for n, _ in self.layers}:
            raise InputError(f"{self.argument}: {name!r} did not run in the forward pass; choose a module the model calls")
        return self.captured[name]

    def _take(self, name: str, tensor: object) -> Tensor:
        if not isinstance(tensor, Tensor):
            raise InputTypeError(f"layer {name!r} {self.on} is a {type(tensor).__name__}, not a tensor")
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] > 1:
            raise LayerReuseError(
                f"{self.argument}: module {name!r} runs {self._calls[name]} times in one forward pass (it is reused), "
                "so its output is ambiguous; choose a module that runs once per forward pass"
            )
        if name in self.substitute:
            tensor = self.substitute[name](tensor)
        if self.leaf and not tensor.requires_grad and torch.is_grad_enabled() and tensor.is_floating_point():
            tensor = tensor.detach().requires_grad_(True)
            self.made_leaves.add(name)
        self.captured[name] = tensor
        flowing = self.edit[name](tensor) if name in self.edit else tensor
        return flowing.clone() if flowing is tensor else flowing

    def _output_hook(self, name: str):
        element = self._elements[name]

        def hook(module, args, output):
            if element is None:
                if not isinstance(output, Tensor):
                    raise InputTypeError(f"layer {name!r} output is {_describe(output)}, not a tensor; choose one "
                                         f"element, e.g. {name + '[0]' if isinstance(output, (tuple, list)) else name + '[key]'!r}")
                return self._take(name, output)
            return _replace(output, element, lambda value: self._take(name, value), name, self.argument)
        return hook

    def _input_hook(self, name: str):
        element = self._elements[name]

        def hook(module, args):
            if len(args) == 0:
                raise InputTypeError(f"layer {name!r} was called without a positional input to capture")
            if element is not None:
                return _replace(tuple(args), element, lambda value: self._take(name, value), name, self.argument)
            tensors = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
            if len(tensors) < 2:  # one floating-point input (integer ones beside it, e.g. positions, are not parts)
                first = tensors[0] if tensors else 0
                return tuple(self._take(name, a) if i == first else a for i, a in enumerate(args))
            self.parts[name] = [f"{name}[{i}]" for i in tensors]  # several inputs: one capture each, a tuple in results
            return tuple(self._take(f"{name}[{i}]", a) if i in tensors else a for i, a in enumerate(args))
        return hook

    def _reset(self, module, args) -> None:
        self._calls.clear()
        self.made_leaves.clear()

    def __enter__(self) -> "capture":
        self._guard = preserved(self.model)
        self._guard.__enter__()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._reset))
            for name, module in self.layers:
                if self.on == "output":
                    self._handles.append(module.register_forward_hook(self._output_hook(name)))
                else:
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        finally:
            guard, self._guard = self._guard, None
            if guard is not None:
                guard.__exit__(None, None, None)


def _describe(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    if isinstance(value, dict):
        return f"a dict with keys {list(value)}"
    return f"a {type(value).__name__}"


def _replace(container: object, element: int | str, take: Callable[[object], Tensor], name: str,
             argument: str = "layers") -> object:
    """``container`` with ``element`` replaced by ``take(container[element])`` (tuples, named tuples,
    lists and dicts; the others refused by name)."""
    if isinstance(container, dict):
        if element not in container:
            raise InputError(f"{argument}: {name!r}: the output has no key {element!r}; its keys are {list(container)}")
        return {**container, element: take(container[element])}
    if not isinstance(container, (tuple, list)) or not isinstance(element, int):
        raise InputError(f"{argument}: {name!r} picks element {element!r}, but this is {_describe(container)}")
    if not -len(container) <= element < len(container):
        raise InputError(f"{argument}: {name!r}: element {element} is out of range for {_describe(container)}")
    items = list(container)
    items[element] = take(items[element])
    if isinstance(container, list):
        return items
    return type(container)(*items) if hasattr(container, "_fields") else tuple(items)


def mask(weights: Tensor) -> Edit:
    """An ``edit`` that multiplies what flows on from a layer by ``weights`` (broadcast per example)."""
    return lambda tensor: tensor * weights
