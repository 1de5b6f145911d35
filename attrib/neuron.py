"""The gradient family of one hidden neuron, filter or any selection of a layer's units: gradient,
guided backprop, deconvnet and integrated gradients of the selected units' value with respect to the
inputs (Captum's NeuronGradient, NeuronGuidedBackprop, NeuronDeconvolution, NeuronIntegratedGradients).

``neuron_selector`` is read as in :class:`attrib.NeuronConductance`: an index tuple, a tuple with
slices (the selected units are summed: ``(c, slice(None), slice(None))`` is filter c), a callable on
the layer's output giving one value per example, or a list of these — then the maps get a leading
dimension, one per selector, all from one forward pass per chunk (one backward pass per selector
from the layer to the inputs).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .backprop import ReLURule, _DeconvReLU, _GuidedReLU
from .errors import InputError
from .hooks import resolve_layers
from .quadrature import weighted_rule
from .result import Attribution
from .sums import WeightedSum
from .sweep import Differentiate, StraightPath, interpolation_layer
from .targets import no_score, selector_weights
from .types import Baselines, Inputs, LayerSpec, NeuronSelector


def _selectors(neuron_selector: Any) -> list:
    selectors = neuron_selector if isinstance(neuron_selector, list) else [neuron_selector]
    if not selectors:
        raise InputError("neuron_selector: the list is empty")
    return selectors


def selected_layer(tensors: dict[str, Tensor], layer: str) -> Tensor:
    """The captured layer a selector reads (a layer captured as several inputs has no single value)."""
    if layer not in tensors:
        raise InputError(f"layer: {layer!r} is called with several inputs; select one, e.g. '{layer}[0]'")
    return tensors[layer]


def zero_selections(interpolated: Sequence[Tensor], keys: list[list[str]]) -> dict[str, Tensor]:
    return {key: torch.zeros_like(x) for row in keys for key, x in zip(row, interpolated)}


def selections_to_inputs(value: Tensor, interpolated: Sequence[Tensor], selectors: list, keys: list[list[str]],
                         upstream: Tensor | None = None) -> dict[str, Tensor]:
    """Under ``keys[i][j]``: d(selector i's units of ``value``, each weighted by ``upstream`` if given)/d(input j),
    one backward pass per selector from the layer to the inputs; zeros where the inputs are not reached."""
    grads = zero_selections(interpolated, keys)
    wanted = [x for x in interpolated if x.requires_grad]
    if not value.requires_grad or not wanted:
        return grads
    for i, (selector, row) in enumerate(zip(selectors, keys)):
        weights = selector_weights(selector, value)
        outgoing = weights.expand_as(value) if upstream is None else upstream * weights
        found = iter(torch.autograd.grad(value, wanted, outgoing, retain_graph=i < len(selectors) - 1, allow_unused=True))
        for key, x in zip(row, interpolated):
            g = next(found) if x.requires_grad else None
            if g is not None:
                grads[key] = g
    return grads


def _to_inputs(layer: str, selectors: list, inputs: Sequence[str], keys: list[list[str]]) -> Differentiate:
    """Under ``keys[i][j]``: d(selector i's value of the layer)/d(input j), one backward pass per selector."""
    def differentiate(scores: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return selections_to_inputs(selected_layer(tensors, layer), [tensors[key] for key in inputs], selectors, keys)
    return differentiate


class _NeuronMethod:
    mode: type[torch.autograd.Function] | None = None
    name = "neuron_gradient"

    def __init__(self, model: nn.Module, layer: LayerSpec) -> None:
        self.model = model
        ((self.layer, _),) = resolve_layers(model, layer, elements=True)

    def _mode(self) -> TorchFunctionMode | None:
        return ReLURule(self.mode) if self.mode is not None else None

    @staticmethod
    def _keys(path: StraightPath, selectors: list) -> list[list[str]]:
        return [[f"<selector {i}> {key}" for key in path.keys] for i in range(len(selectors))]

    @staticmethod
    def _shape(path: StraightPath, per_selector: list[list[Tensor]], neuron_selector: Any) -> Any:
        """[selector][input] maps -> per input, stacked over selectors (or the one selector's map)."""
        per_input = [torch.stack([row[j] for row in per_selector]) for j in range(len(path.keys))]
        if not isinstance(neuron_selector, list):
            per_input = [m[0] for m in per_input]
        return path.as_given(per_input)

    def attribute(self, inputs: Inputs, neuron_selector: NeuronSelector | list[NeuronSelector],
                  additional_forward_args: Any = None, attribute_to_neuron_input: bool = False,
                  internal_batch_size: int | str | None = "auto", memory_budget: int | None = None) -> Attribution:
        path = StraightPath(self.model, inputs, None, no_score, additional_forward_args)
        selectors = _selectors(neuron_selector)
        keys = self._keys(path, selectors)
        chunk = path.at_inputs(layers=[self.layer], attribute_to_layer_input=attribute_to_neuron_input, input_grad=True,
                               mode=self._mode(), internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                               differentiate=_to_inputs(self.layer, selectors, path.keys, keys))
        maps = [[chunk.grads[key] for key in row] for row in keys]
        return Attribution(attributions=self._shape(path, maps, neuron_selector), method=self.name, evaluations=1,
                           info={"layer": self.layer})


class NeuronGradient(_NeuronMethod):
    """d(selected units of a layer)/d(inputs) at the inputs.

    >>> NeuronGradient(model, "features.28").attribute(x, (5, slice(None), slice(None))).attributions   # filter 5
    """


class NeuronGuidedBackprop(_NeuronMethod):
    """Guided backprop of the selected units: every ReLU between them and the inputs passes only
    positive signal at positive inputs.

    >>> NeuronGuidedBackprop(model, "features.28").attribute(x, (5, 3, 3)).attributions
    """

    mode, name = _GuidedReLU, "neuron_guided_backprop"


class NeuronDeconvolution(_NeuronMethod):
    """The deconvnet of the selected units: every ReLU passes ``relu(signal)`` whatever its input was.

    >>> NeuronDeconvolution(model, "features.28").attribute(x, (5, 3, 3)).attributions
    """

    mode, name = _DeconvReLU, "neuron_deconvolution"


class NeuronIntegratedGradients(_NeuronMethod):
    """Integrated gradients of the selected units' value: ``(x - x') integral d n / dx dalpha``.

    ``delta`` is the completeness error against the selection's own change, ``sum(maps) - (n(x) - n(x'))``
    per selector and example; ``outputs`` and ``baseline_outputs`` hold n(x) and n(x') (a callable's value).
    ``multiply_by_inputs=False`` leaves out ``x - x'``.

    >>> res = NeuronIntegratedGradients(model, "features.28").attribute(x, [(5, 3, 3), (7, 0, 0)], n_steps=50)
    >>> res.attributions.shape   # (2, *x.shape)
    """

    name = "neuron_integrated_gradients"

    def __init__(self, model: nn.Module, layer: LayerSpec, multiply_by_inputs: bool = True,
                 interpolate_at: LayerSpec | None = None) -> None:
        super().__init__(model, layer)
        self.multiply_by_inputs = multiply_by_inputs
        self.interpolate_at = interpolation_layer(model, interpolate_at)

    def attribute(self, inputs: Inputs, neuron_selector: NeuronSelector | list[NeuronSelector],  # type: ignore[override]
                  baselines: Baselines = None, n_steps: int = 50, method: str = "gausslegendre",
                  additional_forward_args: Any = None, attribute_to_neuron_input: bool = False,
                  internal_batch_size: int | str | None = "auto", memory_budget: int | None = None,
                  layer_baselines: Baselines = None, layer_noise: Tensor | None = None) -> Attribution:
        path = StraightPath(self.model, inputs, baselines, no_score, additional_forward_args,
                            interpolate_at=self.interpolate_at, layer_baselines=layer_baselines, layer_noise=layer_noise)
        selectors = _selectors(neuron_selector)
        alphas, weights = weighted_rule(method, n_steps)
        integral = WeightedSum(weights, path.batch)
        keys = self._keys(path, selectors)
        path.evaluate(alphas, lambda chunk: integral.add(chunk, {key: chunk.grads[key] for row in keys for key in row}),
                      layers=[self.layer], attribute_to_layer_input=attribute_to_neuron_input, input_grad=True,
                      mode=self._mode(), internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                      differentiate=_to_inputs(self.layer, selectors, path.keys, keys))
        full = [[integral.total[key] * d for key, d in zip(row, path.differences)] for row in keys]
        maps = full if self.multiply_by_inputs else [[integral.total[key] for key in row] for row in keys]
        outputs, baseline_outputs = self._ends(path, selectors, attribute_to_neuron_input)
        delta = torch.stack([path.total(row) for row in full]) - (outputs - baseline_outputs)
        if not isinstance(neuron_selector, list):
            delta, outputs, baseline_outputs = delta[0], outputs[0], baseline_outputs[0]
        return Attribution(attributions=self._shape(path, maps, neuron_selector), delta=delta, outputs=outputs,
                           baseline_outputs=baseline_outputs, method=method, n_steps=n_steps,
                           evaluations=alphas.shape[0] + 1, info={"layer": self.layer})

    def _ends(self, path: StraightPath, selectors: list, to_input: bool) -> tuple[Tensor, Tensor]:
        """The selections' values n(x) and n(x'), (S, B) each, from one forward pass without a graph."""
        n = path.batch
        _, found = path.values_at_ends([self.layer], on="input" if to_input else "output")
        value = found[self.layer]
        values = torch.stack([s(value) if callable(s) else (value * selector_weights(s, value)).reshape(2 * n, -1).sum(1)
                              for s in selectors])
        return values[:, :n], values[:, n:]
