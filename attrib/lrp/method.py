"""LRP (Bach et al., 2015; Montavon et al., 2019): the method class. A composite names the rule
of every layer (:mod:`attrib.lrp.composites`), :func:`~attrib.lrp.plan.make_plan` applies it to the
model, and a :class:`~attrib.lrp.run.Run` does the forward pass and the relevance backward passes.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from ..attention import attention_as_modules
from ..checks import as_args, as_given, check_input_tuple, check_model
from ..errors import InputError, InputTypeError
from ..hooks import resolve_layers
from ..result import Attribution
from ..targets import normalize_target, selector_weights, target_scores
from ..types import Inputs, LayerSpec, NeuronSelector, TargetType
from .composites import COMPOSITES, Composite
from .plan import ViewCache, make_plan
from .report import ConservationReport, per_example_sum
from .run import Run
from .trace import RelevanceTrace


class LRP:
    """Layer-wise relevance propagation with hand-written rules (``attrib.lrp.rules``).

    >>> res = LRP(model, composite="epsilon_gamma_box").attribute(x, target=3, layers=["features.28"])
    >>> res.attributions           # relevance at the input, shaped like x
    >>> res.layers["features.28"]  # relevance at that layer's output
    >>> print(res.info["conservation"])  # per layer: relevance entering, leaving, difference
    >>> LRP(two_input_model).attribute((image, features), target=3).attributions   # (of image, of features)

    ``composite``: a name in :data:`attrib.lrp.COMPOSITES` (default parameters) or a
    :class:`~attrib.lrp.Composite`. The model must be in eval mode; it is not modified.
    """

    def __init__(self, model: nn.Module, composite: Union[str, Composite] = "epsilon") -> None:
        check_model(model)
        if isinstance(composite, str):
            if composite not in COMPOSITES:
                raise InputError(f"composite: unknown name {composite!r}; known: {', '.join(sorted(COMPOSITES))}")
            composite = COMPOSITES[composite]()
        if not isinstance(composite, Composite):
            raise InputTypeError(f"composite: expected a name or a Composite, got {type(composite).__name__}")
        self.model = model
        self.composite = composite
        self.views = ViewCache()

    def clear_cache(self) -> None:
        """Drop the kept views and the parameters derived for rules (folded BatchNorms, w + gamma w^+)."""
        self.views.clear()

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        *,
        layers: LayerSpec | Sequence[LayerSpec] | None = None,
        attribute_to_layer_input: bool = False,
        start: str = "score",
        start_layer: LayerSpec | None = None,
        neuron_selector: NeuronSelector | list[NeuronSelector] | None = None,
        additional_forward_args: Any = None,
        conservation: bool = True,
    ) -> Attribution:
        """Relevance at the inputs (and at ``layers``).

        ``inputs``: a tensor, or a tuple of tensors with one batch size (the model is called as
        ``model(*inputs, *additional_forward_args)``); ``attributions`` is then a tuple in their order.
        The composite's first-layer rule goes to the first linear layer that runs on any input's
        graph; name another input's first layer in the composite to give it that rule too.

        ``start``: ``"score"`` starts from the explained score itself (the target logit, or the
        selected activations), ``"one_hot"`` from 1 at the target (or the selected units).
        ``start_layer`` + ``neuron_selector``: start from chosen neurons or filters of a hidden layer
        (an index tuple, a tuple with slices such as ``(c, slice(None), slice(None))`` for filter c,
        a callable on the layer output, or a list of these: then results get a leading dimension).
        The forward pass stops at ``start_layer``. ``layers``: record the relevance at these layers'
        outputs (inputs with ``attribute_to_layer_input``) in ``result.layers``.
        ``info["conservation"]``: a :class:`ConservationReport`; ``delta`` = input relevance (all
        inputs together) minus starting relevance, per example. ``conservation=False`` skips the
        per-layer sums (two reductions per layer, about 5% at batch 1); the totals and ``delta`` remain.
        """
        model = self.model
        check_model(model)
        with attention_as_modules(model):  # attention's steps as modules with rules
            return self._attribute(inputs, target, layers, attribute_to_layer_input, start, start_layer, neuron_selector,
                                   additional_forward_args, conservation)

    def _attribute(self, inputs, target, layers, attribute_to_layer_input, start, start_layer, neuron_selector,
                   additional_forward_args, conservation) -> Attribution:
        model = self.model
        checked, single = check_input_tuple(model, inputs)
        if start not in ("score", "one_hot"):
            raise InputError(f"start must be 'score' or 'one_hot', got {start!r}")
        side = "in" if attribute_to_layer_input else "out"
        record = {name: (module, side) for name, module in resolve_layers(model, layers)} if layers else {}
        start_module = None
        if start_layer is not None:
            if target is not None:
                raise InputError("target: not used when starting from start_layer; select units with neuron_selector")
            if neuron_selector is None:
                raise InputError("neuron_selector: required with start_layer")
            (start_name, start_module), = resolve_layers(model, start_layer)
        elif neuron_selector is not None:
            raise InputError("neuron_selector: give start_layer too")
        else:
            target = normalize_target(target, checked[0].shape[0])
        run = Run(model, self.composite, make_plan(model, self.composite, self.views), self.views, record, start_module)
        run.per_layer = bool(conservation)
        leaves = tuple(x.detach().requires_grad_(True) for x in checked)
        output = run.forward(leaves, as_args(additional_forward_args))
        with torch.enable_grad():  # nothing in the model is written, so nothing needs restoring
            if start_module is None:
                return self._from_output(run, leaves, output, target, start, single)
            if run.start_output is None:
                raise InputError(f"start_layer: {start_name!r} did not run in the forward pass")
            return self._from_layer(run, leaves, run.start_output, neuron_selector, start, single)

    def trace(
        self, inputs: Tensor, target: TargetType = None, *, layers: Sequence[LayerSpec], copies: int = 1,
        start: str = "score", additional_forward_args: Any = None,
    ) -> RelevanceTrace:
        """Keep one forward pass of one example (``copies`` rows) for many backward passes between
        the recorded ``layers``: see :class:`attrib.lrp.trace.RelevanceTrace`. One input tensor."""
        check_model(self.model)
        return RelevanceTrace(
            self.model, self.composite, inputs, target, layers, copies, additional_forward_args, start, views=self.views,
        )

    def _from_output(
        self, run: Run, leaves: tuple[Tensor, ...], output: Any, target: TargetType, start: str, single: bool,
    ) -> Attribution:
        if not isinstance(output, Tensor):
            raise InputTypeError(f"model output is a {type(output).__name__}; LRP needs a tensor output")
        if not output.requires_grad:
            raise InputError("inputs: the model output does not depend on the inputs")
        scores = target_scores(output, target, torch.arange(leaves[0].shape[0], device=output.device))
        selection, = torch.autograd.grad(scores.sum(), output, retain_graph=True)
        relevance = selection if start == "one_hot" else output.detach() * selection
        scores = scores.detach().clone()  # the backward pass may overwrite the kept output in place
        found, records, report = run.backward(output, relevance, leaves, retain=False)
        return Attribution(
            attributions=as_given(found, single), delta=report.total_difference.to(found[0].dtype), outputs=scores,
            method=f"lrp:{self.composite.name}", layers=records, info={"conservation": report},
        )

    def _from_layer(
        self, run: Run, leaves: tuple[Tensor, ...], value: Tensor, neuron_selector, start: str, single: bool,
    ) -> Attribution:
        """One backward pass per selector; with a list of selectors every result gets a leading dimension."""
        selectors = neuron_selector if isinstance(neuron_selector, list) else [neuron_selector]
        if not selectors:
            raise InputError("neuron_selector: the list is empty")
        scores, found, records, reports = [], [], [], []
        for i, selector in enumerate(selectors):
            weights = selector_weights(selector, value.detach()).expand_as(value)
            relevance = weights if start == "one_hot" else value.detach() * weights
            scores.append(per_example_sum(value.detach() * weights))
            per_input, recorded, report = run.backward(value, relevance, leaves, retain=i < len(selectors) - 1)
            found.append(per_input)
            records.append(recorded)
            reports.append(report)
        dtype = found[0][0].dtype
        kept: ConservationReport | list[ConservationReport]
        if isinstance(neuron_selector, list):
            maps = tuple(torch.stack(maps) for maps in zip(*found))
            layers = {name: torch.stack([recorded[name] for recorded in records]) for name in records[0]}
            delta = torch.stack([report.total_difference for report in reports]).to(dtype)
            outputs, kept = torch.stack(scores).to(dtype), reports
        else:
            maps, layers, delta = found[0], records[0], reports[0].total_difference.to(dtype)
            outputs, kept = scores[0].to(dtype), reports[0]
        return Attribution(
            attributions=as_given(maps, single), delta=delta, outputs=outputs, method=f"lrp:{self.composite.name}",
            layers=layers, info={"conservation": kept},
        )


