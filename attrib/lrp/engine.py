"""The LRP engine: one forward pass in which every leaf module with a rule is wrapped, one backward
pass in which the 'gradient' flowing between layers is the relevance.

Each rule-bearing leaf gets a forward pre-hook (it hands the module a detached input, so the
module's own forward builds no graph) and a forward hook that returns the module's output through
``_Relay``: a custom autograd function whose backward applies the layer's rule. Operations between
modules keep their gradient, which already moves relevance correctly for reshapes, slicing,
concatenation and max-pool winners; residual additions and functional average pooling are caught
by :class:`~attrib.lrp.canonizers.FunctionalOps`. Every hook lives inside the run and is removed in
``finally``; no parameter or buffer is written.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ..engine import as_args, check_inputs, check_model
from ..hooks import LayerReuseError, LayerSpec, resolve_layers
from ..result import Attribution
from ..targets import NeuronSelector, TargetType, normalize_target, selector_weights, target_scores
from .canonizers import FUNCTIONAL_POOLS, FunctionalOps
from .composites import BATCHNORMS, COMPOSITES, LINEAR_TYPES, MAX_POOLS, WINNER_POOLS, Composite
from .layers import ConvView, FoldedView, FunctionView, LayerView, LinearView, MaxAsAveragePoolView, view_of
from .report import ConservationReport, LayerBalance, per_example_sum
from .rules import Gradient, Norm, Pass, Rule, divide
from ..errors import InputError, InputTypeError

if TYPE_CHECKING:
    from .trace import RelevanceTrace

CHEAP_VIEWS = (FunctionView,)


class _Stop(Exception):
    """Raised by the start layer's hook: nothing above it is needed."""


class _Relay(torch.autograd.Function):
    """Forward: hands on the layer's output. Backward: the layer's rule turns relevance at its output
    into relevance at its inputs."""

    @staticmethod
    def forward(ctx, step, *inputs):
        ctx.step = step
        output, step.output = step.output, None
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, relevance):
        return (None,) + ctx.step.propagate(relevance)


class _RelayInPlace(_Relay):
    """Like :class:`_Relay` for ``a += b``: the addition is done in ``a`` itself (marked dirty), so
    ``a.add_(b)`` keeps its meaning and no copy is made."""

    @staticmethod
    def forward(ctx, step, a, b):
        ctx.step = step
        ctx.mark_dirty(a)
        return a.add_(b)


def _saved(tensor: Tensor) -> tuple[Tensor, int]:
    return tensor, tensor._version


class _Step:
    """One call of a layer in the relevance graph."""

    def __init__(self, run: "_Run", row: LayerBalance, view: LayerView, rule: Rule, x: Tensor, z: Tensor | None) -> None:
        self.run, self.row, self.view, self.rule = run, row, view, rule
        self.x, self.x_version = _saved(x)
        self.z, self.z_version = _saved(z) if z is not None else (None, 0)
        self.output: Tensor | None = None
        self.records: list[tuple[str, str]] = []  # (layer name, "out" | "in")
        self.relu_version = -1  # z's version after an in-place ReLU overwrote it with relu(z)

    def _input(self) -> Tensor:
        if self.x._version != self.x_version:
            raise InputError(
                f"LRP: the input of {self.row.name!r} was modified in place after the layer ran, so its "
                "relevance cannot be computed; make that operation out of place"
            )
        return self.x

    def propagate(self, relevance: Tensor) -> tuple[Tensor, ...]:
        x = self._input()
        z, hints = None, {}
        if self.rule.needs_output:
            z = self.z
            if z is not None and z._version != self.z_version:
                # relu(z) gives the same relevance as z if none arrives where they differ (z < 0)
                quiet = z._version == self.relu_version and not bool((relevance != 0).logical_and_(z == 0).any())
                hints["quiet"] = quiet
                if not quiet:
                    z = None
            if z is None:
                z = self.view.forward(x, self.view.weight, self.view.bias)
                hints["scratch"] = True
            else:
                hints["scratch"] = self.run.final_pass  # nothing needs the kept output after this pass
            reference = self.view.reference_output(x, z)
            if reference is not z:
                z, hints["scratch"] = reference, True
        hints = {key: value for key, value in hints.items() if key in self.rule.hints and value}
        result = self.rule.relevance(self.view, x, z, relevance, **hints)
        self.run.account(self, relevance, (result,))
        return (result,)


class _SumStep(_Step):
    """``a + b``: ``R_a = a R / stab(a + b)``, ``R_b = b R / stab(a + b)``."""

    def __init__(self, run, row, a: Tensor, b: Tensor, epsilon: float) -> None:
        super().__init__(run, row, FunctionView(lambda t: t, "add"), Norm(epsilon), a, None)
        self.b, self.b_version = _saved(b)

    def propagate(self, relevance):
        a = self._input()
        if self.b._version != self.b_version:
            raise InputError(f"LRP: an operand of the addition {self.row.name!r} was modified in place afterwards")
        share = divide(relevance, a + self.b, self.rule.epsilon, scratch=True)
        to_b = (self.b * share).sum_to_size(self.b.shape)
        result = (share.mul_(a).sum_to_size(a.shape), to_b)
        self.run.account(self, relevance, result)
        return result


Entry = tuple[str, Rule, LayerView, str]  # (label, rule, view, repr(rule))


class Plan(dict):
    """``id(module) -> Entry`` for every leaf module with a rule. ``first``: linear layers' entries
    under the composite's first-layer rule, given to the first linear layer that runs on the input's
    graph; ``refused``: why no rule fits a leaf, raised only if that leaf runs (a module that
    ``forward`` never calls needs no rule); ``labels``: every leaf's label."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[int, Entry] = {}
        self.refused: dict[int, InputError] = {}
        self.labels: dict[int, str] = {}


class _Run:
    """Hooks and bookkeeping for one forward pass and the backward passes that follow it."""

    def __init__(self, lrp: "LRP", plan: Plan, record: dict[str, tuple[nn.Module, str]], start: nn.Module | None) -> None:
        self.model, self.composite, self.plan, self.lrp = lrp.model, lrp.composite, plan, lrp
        self.record, self.start_module = record, start
        self.depth = 0
        self.inputs: list[Tensor | None] = []
        self.parents: list[str] = []
        self.rows: list[LayerBalance] = []
        self.calls: dict[str, int] = {}
        self.linear_outputs: dict[int, tuple[Tensor, _Step, Tensor]] = {}
        self.saved_outputs: dict[int, tuple[Tensor, _Step]] = {}
        self.saved_inputs: dict[int, Tensor] = {}
        self.records: dict[str, Tensor] = {}
        # recorded layers' outputs and their places in the graph, taken when they are made (a later
        # in-place operation, such as ResNet's `out += identity`, moves the tensor but not its edge)
        self.outputs: dict[str, Tensor] = {}
        self.edges: dict[str, GradientEdge] = {}
        self.start_output: Tensor | None = None
        self.per_layer = True  # sum the relevance entering and leaving every layer for the report
        self.final_pass = False  # the last backward pass: steps may overwrite what they kept
        self.first_taken = False  # whether the first linear layer on the input's graph has run

    # ------------------------------------------------------------------ forward
    def _label(self, name: str) -> str:
        count = self.calls[name] = self.calls.get(name, 0) + 1
        if count > 1 and name in self.record:
            raise LayerReuseError(
                f"layers: module {name!r} runs {count} times in one forward pass, so its relevance is ambiguous"
            )
        return name if count == 1 else f"{name}#{count}"

    def _relay(self, row: LayerBalance, view: LayerView, rule: Rule, x: Tensor, output: Tensor, graph_input: Tensor) -> tuple[Tensor, _Step]:
        keep_output = rule.needs_output and not isinstance(view, CHEAP_VIEWS)
        step = _Step(self, row, view, rule, x, output.detach() if keep_output else None)
        if not isinstance(rule, Pass):
            self.saved_inputs[id(graph_input)] = graph_input
        step.output = output.detach()
        out = _Relay.apply(step, graph_input)
        if keep_output:
            self.saved_outputs[id(out)] = (out, step)
        return out, step

    def _entry(self, module: nn.Module) -> Entry:
        """This call's rule: the first-layer rule for the first linear layer on the input's graph."""
        key = id(module)
        entry = self.plan.get(key)
        if isinstance(module, LINEAR_TYPES) and not self.first_taken:
            self.first_taken = True
            entry = self.plan.first.get(key, entry)
        if entry is None:
            raise self.plan.refused[key]
        return entry

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        name = self.plan.labels[id(module)]
        self.depth += 1
        if not args or not isinstance(args[0], Tensor):
            raise InputTypeError(f"LRP: layer {name!r} was called without a tensor as its first argument")
        x = args[0]
        if not (x.requires_grad and torch.is_grad_enabled()):
            self.inputs.append(None)
            return None
        self.inputs.append(x)
        detached = x.detach()
        if getattr(module, "inplace", False) and self._kept(x):
            owner = self.saved_outputs.get(id(x))
            if (type(module) is nn.ReLU and owner is not None and owner[0] is x and owner[1].rule.relu_exact
                    and self.saved_inputs.get(id(x)) is not x):
                owner[1].relu_version = x._version + 1  # it keeps relu(z); checked in backward
            else:
                detached = detached.clone()  # the in-place op must not overwrite what a layer kept
        return (detached,) + tuple(args[1:])

    def _kept(self, tensor: Tensor) -> bool:
        """Whether a step keeps this tensor (as its input or output) for the backward pass."""
        output = self.saved_outputs.get(id(tensor))
        return (output is not None and output[0] is tensor) or self.saved_inputs.get(id(tensor)) is tensor

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        self.depth -= 1
        x = self.inputs.pop()
        if x is None:
            return None
        name, rule, view, rule_text = self._entry(module)
        if not isinstance(output, Tensor):
            raise InputTypeError(f"LRP: layer {name!r} returned a {type(output).__name__}, not a tensor")
        label = self._label(name)
        merged = self.linear_outputs.get(id(x)) if isinstance(module, BATCHNORMS) and self.composite.merge_batchnorm else None
        if merged is not None and merged[0] is x:
            _, below, source = merged
            # the layer below is replaced by the folded one: forget what it kept (its output may
            # still reach the graph elsewhere, then it recomputes)
            del self.linear_outputs[id(x)]
            self.saved_outputs.pop(id(x), None)
            below.z = None
            view = self.lrp.view(("folded", id(below.view.module), id(module)), lambda: FoldedView(below.view, module))
            rule = below.rule
            rule.check(view, label)
            row = LayerBalance(f"{below.row.name}+{label}", view.kind, below.row.rule)
            self.rows.append(row)
            out, step = self._relay(row, view, rule, below.x, output, source)
            step.records = [(n, side) for n, side in below.records if side == "in"]
            step.records += [(n, "out") for n, side in below.records if side == "out"]
            if name in self.record:
                step.records.append((name, "out"))
            self._keep_outputs(step, out)
            return out
        row = LayerBalance(label, view.kind, rule_text)
        self.rows.append(row)
        out, step = self._relay(row, view, rule, x.detach(), output, x)
        if name in self.record:
            step.records.append((name, self.record[name][1]))
        self._keep_outputs(step, out)
        if isinstance(view, (LinearView, ConvView)):
            self.linear_outputs[id(out)] = (out, step, x)
        return out

    def _keep_outputs(self, step: _Step, out: Tensor) -> None:
        for name, side in step.records:
            if side == "out":
                self.outputs[name], self.edges[name] = out, get_gradient_edge(out)

    def parent_pre_hook(self, name: str) -> Callable:
        def hook(module, args):
            self.parents.append(name)
        return hook

    def parent_post_hook(self, module, args, output) -> None:
        self.parents.pop()

    def _functional_label(self, what: str) -> str:
        parent = self.parents[-1] if self.parents else ""
        return self._label(f"{parent}.{what}" if parent else what)

    def addition(self, a: Tensor, b: Tensor, inplace: bool) -> Tensor:
        """A residual addition between two computed tensors (called by FunctionalOps)."""
        saved_a = a.detach()
        if inplace:
            saved_a = saved_a.clone()
            owner = self.saved_outputs.get(id(a))
            if owner is not None and owner[0] is a:  # the layer that produced `a` keeps the old values
                owner[1].z, owner[1].z_version = _saved(saved_a)
                del self.saved_outputs[id(a)]
        else:
            self.saved_inputs[id(a)] = a
        self.saved_inputs[id(b)] = b
        rule = self.composite.addition_rule
        row = LayerBalance(self._functional_label("add"), "add", repr(rule))
        self.rows.append(row)
        step = _SumStep(self, row, saved_a, b.detach(), rule.epsilon)
        if inplace:
            return _RelayInPlace.apply(step, a, b)
        step.output = saved_a + b.detach()
        return _Relay.apply(step, a, b)

    def functional(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        """A functional average pooling between modules: the Norm rule."""
        x, rest = args[0], args[1:]
        view = FunctionView(lambda t: func(t, *rest, **kwargs), func.__name__)
        label = self._functional_label(func.__name__)
        rule = self.composite.rule_for_function(label, FUNCTIONAL_POOLS[func])
        rule.check(view, label)
        row = LayerBalance(label, view.kind, repr(rule))
        self.rows.append(row)
        out, _ = self._relay(row, view, rule, x.detach(), func(x.detach(), *rest, **kwargs), x)
        return out

    def record_hook(self, name: str, side: str) -> Callable:
        def store(module, args, output=None):
            tensor = args[0] if side == "in" else output
            self._label(name)
            if not (isinstance(tensor, Tensor) and tensor.requires_grad):
                raise InputError(f"layers: the {side}put of {name!r} is not on the input's graph, so it gets no relevance")
            tensor.register_hook(lambda relevance: self.records.__setitem__(name, relevance.detach()))
            if side == "out":
                self.outputs[name], self.edges[name] = tensor, get_gradient_edge(tensor)
        return store

    def start_hook(self, module, args, output) -> None:
        if not (isinstance(output, Tensor) and output.requires_grad):
            raise InputError("start_layer: its output is not a tensor on the input's graph")
        self.start_output = output
        raise _Stop

    def _hooked(self, module: nn.Module) -> bool:
        key = id(module)
        return key in self.plan or key in self.plan.first or key in self.plan.refused

    def hooks(self, stack: ExitStack) -> None:
        """Register every hook on ``stack`` (removed when it closes)."""
        def keep(handle):
            stack.callback(handle.remove)
        for name, module in self.model.named_modules():
            if self._hooked(module):
                keep(module.register_forward_pre_hook(self.pre_hook))
                keep(module.register_forward_hook(self.post_hook))
            elif any(True for _ in module.children()):
                keep(module.register_forward_pre_hook(self.parent_pre_hook(name)))
                keep(module.register_forward_hook(self.parent_post_hook))
        for name, (module, side) in self.record.items():
            if not self._hooked(module):
                if side == "in":
                    keep(module.register_forward_pre_hook(self.record_hook(name, "in")))
                else:
                    keep(module.register_forward_hook(self.record_hook(name, "out")))
        if self.start_module is not None:
            keep(self.start_module.register_forward_hook(self.start_hook))

    def finish_forward(self) -> None:
        self.linear_outputs.clear()
        self.saved_outputs.clear()
        self.saved_inputs.clear()

    # ----------------------------------------------------------------- backward
    def account(self, step: _Step, relevance: Tensor, result: tuple[Tensor, ...]) -> None:
        if self.per_layer:
            entering = per_example_sum(relevance)
            leaving = entering if result[0] is relevance else sum(per_example_sum(r) for r in result)
            step.row.add(entering, leaving)
        for name, side in step.records:
            self.records[name] = (relevance if side == "out" else result[0]).detach()

    def backward(self, tensor: Tensor, relevance: Tensor, inputs: Tensor, retain: bool) -> tuple[Tensor, dict, ConservationReport]:
        for row in self.rows:
            row.entering = row.leaving = None
        self.records = {}
        self.final_pass = not retain
        found = torch.autograd.grad(tensor, inputs, relevance, retain_graph=retain, allow_unused=True)[0]
        if found is None:
            raise InputError("inputs: the explained output does not depend on the inputs")
        missing = [name for name in self.record if name not in self.records]
        if missing:
            raise InputError(f"layers: {missing} received no relevance (not between the input and the explained output)")
        report = ConservationReport(
            [row for row in self.rows if row.entering is not None], per_example_sum(relevance), per_example_sum(found),
            [] if self.per_layer else ["per-layer sums were not taken (conservation=False)"],
        )
        return found, dict(self.records), report


class LRP:
    """Layer-wise relevance propagation with hand-written rules (``attrib.lrp.rules``).

    >>> res = LRP(model, composite="epsilon_gamma_box").attribute(x, target=3, layers=["features.28"])
    >>> res.attributions           # relevance at the input, shaped like x
    >>> res.layers["features.28"]  # relevance at that layer's output
    >>> print(res.info["conservation"])  # per layer: relevance entering, leaving, difference

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
        self._views: dict[Any, LayerView] = {}

    def view(self, key: Any, make: Callable[[], LayerView]) -> LayerView:
        """The view kept under ``key``, rebuilt when a parameter or buffer behind it changed."""
        view = self._views.get(key)
        if view is None or view.built != view.signature():
            view = make()
            view.built = view.signature()
            self._views[key] = view
        return view

    def clear_cache(self) -> None:
        """Drop the kept views and the parameters derived for rules (folded BatchNorms, w + gamma w^+)."""
        self._views.clear()

    def _plan(self) -> Plan:
        leaves = [(name, m) for name, m in self.model.named_modules() if not any(True for _ in m.children())]
        unused = self.composite.unused_patterns([name for name, _ in leaves])
        if unused:
            raise InputError(f"composite {self.composite.name!r}: no layer of the model matches {unused}")
        plan = Plan()
        for name, module in leaves:
            plan.labels[id(module)] = name or type(module).__name__
            try:
                entry = self._entry(name, module, first=False)
                if entry is not None:
                    plan[id(module)] = entry
            except InputError as error:
                plan.refused[id(module)] = error
            if isinstance(module, LINEAR_TYPES) and self.composite.first is not None:
                try:
                    entry = self._entry(name, module, first=True)
                    if entry is not None:
                        plan.first[id(module)] = entry
                except InputError as error:
                    plan.refused.setdefault(id(module), error)
        return plan

    def _entry(self, name: str, module: nn.Module, first: bool) -> Entry | None:
        """The rule, view and label of one leaf (``None``: autograd's gradient is its rule)."""
        label = name or type(module).__name__
        rule = self.composite.rule_for(name, module, first)
        if rule is None or (isinstance(rule, Gradient) and isinstance(module, WINNER_POOLS)):
            return None  # autograd's own gradient is the rule (max pooling: the winner takes all)
        if isinstance(module, BATCHNORMS) and (module.running_mean is None or module.running_var is None):
            raise InputError(f"LRP: BatchNorm {label!r} keeps no running statistics, so it is not an affine map per example")
        if self.composite.maxpool == "average" and isinstance(module, MAX_POOLS):
            view = self.view(("average", id(module)), lambda: MaxAsAveragePoolView(module))
        else:
            view = self.view(id(module), lambda: view_of(module))
        rule.check(view, label)
        return (label, rule, view, repr(rule))

    def attribute(
        self,
        inputs: Tensor,
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
        """Relevance at the input (and at ``layers``).

        ``start``: ``"score"`` starts from the explained score itself (the target logit, or the
        selected activations), ``"one_hot"`` from 1 at the target (or the selected units).
        ``start_layer`` + ``neuron_selector``: start from chosen neurons or filters of a hidden layer
        (an index tuple, a tuple with slices such as ``(c, slice(None), slice(None))`` for filter c,
        a callable on the layer output, or a list of these: then results get a leading dimension).
        The forward pass stops at ``start_layer``. ``layers``: record the relevance at these layers'
        outputs (inputs with ``attribute_to_layer_input``) in ``result.layers``.
        ``info["conservation"]``: a :class:`ConservationReport`; ``delta`` = input relevance minus
        starting relevance, per example. ``conservation=False`` skips the per-layer sums (two
        reductions per layer, about 5% at batch 1); the totals and ``delta`` remain.
        """
        model = self.model
        check_model(model)
        inputs = check_inputs(model, inputs)
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
            target = normalize_target(target, inputs.shape[0])
        plan = self._plan()
        args = as_args(additional_forward_args)
        run = _Run(self, plan, record, start_module)
        run.per_layer = bool(conservation)
        x = inputs.clone().requires_grad_(True)
        with torch.enable_grad():  # nothing in the model is written, so nothing needs restoring
            with ExitStack() as stack:
                run.hooks(stack)
                stack.enter_context(FunctionalOps(run, self.composite.split_additions))
                try:
                    output = model(x, *args)
                except _Stop:
                    output = None
                finally:
                    run.finish_forward()
            if start_module is None:
                return self._from_output(run, x, output, target, start)
            if run.start_output is None:
                raise InputError(f"start_layer: {start_name!r} did not run in the forward pass")
            return self._from_layer(run, x, run.start_output, neuron_selector, start)

    def trace(
        self, inputs: Tensor, target: TargetType = None, *, layers: LayerSpec | Sequence[LayerSpec], copies: int = 1,
        start: str = "score", additional_forward_args: Any = None,
    ) -> "RelevanceTrace":
        """Keep one forward pass of one example (``copies`` rows) for many backward passes between
        the recorded ``layers``: see :class:`attrib.lrp.trace.RelevanceTrace`."""
        from .trace import RelevanceTrace

        check_model(self.model)
        return RelevanceTrace(self, inputs, target, layers, copies, additional_forward_args, start)

    def _from_output(self, run: _Run, x: Tensor, output: Any, target: TargetType, start: str) -> Attribution:
        if not isinstance(output, Tensor):
            raise InputTypeError(f"model output is a {type(output).__name__}; LRP needs a tensor output")
        if not output.requires_grad:
            raise InputError("inputs: the model output does not depend on the inputs")
        scores = target_scores(output, target, torch.arange(x.shape[0], device=x.device))
        selection, = torch.autograd.grad(scores.sum(), output, retain_graph=True)
        relevance = selection if start == "one_hot" else output.detach() * selection
        scores = scores.detach().clone()  # the backward pass may overwrite the kept output in place
        found, records, report = run.backward(output, relevance, x, retain=False)
        return Attribution(
            attributions=found, delta=(report.input - report.start).to(found.dtype), outputs=scores,
            method=f"lrp:{self.composite.name}", layers=records, info={"conservation": report},
        )

    def _from_layer(self, run: _Run, x: Tensor, value: Tensor, neuron_selector, start: str) -> Attribution:
        selectors = neuron_selector if isinstance(neuron_selector, list) else [neuron_selector]
        if not selectors:
            raise InputError("neuron_selector: the list is empty")
        results = []
        for i, selector in enumerate(selectors):
            weights = selector_weights(selector, value.detach()).expand_as(value)
            relevance = weights if start == "one_hot" else value.detach() * weights
            results.append((per_example_sum(value.detach() * weights),) + run.backward(value, relevance, x, retain=i < len(selectors) - 1))
        found = torch.stack([r[1] for r in results])
        delta = torch.stack([(r[3].input - r[3].start) for r in results]).to(found.dtype)
        outputs = torch.stack([r[0] for r in results]).to(found.dtype)
        layers = {name: torch.stack([r[2][name] for r in results]) for name in results[0][2]}
        reports = [r[3] for r in results]
        if not isinstance(neuron_selector, list):
            found, delta, outputs = found[0], delta[0], outputs[0]
            layers = {name: value[0] for name, value in layers.items()}
            reports = reports[0]
        return Attribution(
            attributions=found, delta=delta, outputs=outputs, method=f"lrp:{self.composite.name}",
            layers=layers, info={"conservation": reports},
        )
