"""The LRP run: one forward pass in which every leaf module with a rule is wrapped, and the
backward passes in which the 'gradient' flowing between layers is the relevance.

Each rule-bearing leaf gets a forward pre-hook (it hands the module a detached input, so the
module's own forward builds no graph) and a forward hook that returns the module's output through
:class:`Relay`: a custom autograd function whose backward calls its :class:`Step`, which applies the
layer's rule. Operations between modules keep their gradient, which already moves relevance
correctly for reshapes, slicing, concatenation and max-pool winners; residual additions and
functional average pooling are caught by :class:`~attrib.lrp.canonizers.FunctionalOps` and become
:class:`SumStep` / Norm steps. A leaf module called with several tensors from the inputs' graph
runs only under ``Norm``, as the sum of those tensors (a :class:`SumStep` too). Every hook lives
inside :meth:`Run.forward` and is removed in ``finally``; no parameter or buffer is written.
:class:`~attrib.lrp.method.LRP` and :class:`~attrib.lrp.trace.RelevanceTrace` both drive a :class:`Run`.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ..errors import InputError, InputTypeError
from ..hooks import LayerReuseError
from ..module_types import BATCHNORMS, LINEAR_LAYERS
from .canonizers import FUNCTIONAL_POOLS, FunctionalOps, on_graph
from .composites import Composite
from .plan import Entry, Plan, ViewCache
from .report import ConservationReport, LayerBalance, per_example_sum
from .rules import Norm, Pass, ProductRule, Rule, divide
from .views import ConvView, FoldedView, FunctionView, LayerView, LinearView

CHEAP_VIEWS = (FunctionView,)


class Stop(Exception):
    """Raised by the start layer's hook: nothing above it is needed.

    >>> Run(model, composite, plan, views, {}, start=model.features[10]).forward((x,), ())   # None: stopped there
    """


class Relay(torch.autograd.Function):
    """Forward: hands on the layer's output. Backward: the layer's rule turns relevance at its output
    into relevance at its inputs.

    >>> out = Relay.apply(step, x)   # out == step.output; out's backward calls step.propagate(relevance)
    """

    @staticmethod
    def forward(ctx, step, *inputs):
        ctx.step = step
        output, step.output = step.output, None
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, relevance):
        return (None,) + ctx.step.propagate(relevance)


class RelayInPlace(Relay):
    """Like :class:`Relay` for ``a += b``: the addition is done in ``a`` itself (marked dirty), so
    ``a.add_(b)`` keeps its meaning and no copy is made.

    >>> a = RelayInPlace.apply(step, a, b)   # a += b, with step.propagate as the backward
    """

    @staticmethod
    def forward(ctx, step, a, b):
        ctx.step = step
        ctx.mark_dirty(a)
        return a.add_(b)


def _saved(tensor: Tensor) -> tuple[Tensor, int]:
    return tensor, tensor._version


class Step:
    """One call of a layer in the relevance graph.

    >>> step.propagate(relevance)   # (relevance at the layer's input,), by the layer's rule
    """

    def __init__(self, run: Run, row: LayerBalance, view: LayerView, rule: Rule, x: Tensor, z: Tensor | None) -> None:
        self.run, self.row, self.view, self.rule = run, row, view, rule
        self.x, self.x_version = _saved(x)
        self.z: Tensor | None = z
        self.z_version = 0 if z is None else z._version
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
        z: Tensor | None = None
        hints: dict[str, bool] = {}
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


class SumStep(Step):
    """``z = x_1 + ... + x_n`` (broadcast; a residual ``a + b``, or a module that sums its inputs):
    ``R_i = x_i R / stab(z)``.

    >>> step.propagate(relevance)   # (R_a, R_b) for a + b, shared as a and b contributed to it
    """

    def __init__(self, run: Run, row: LayerBalance, operands: Sequence[Tensor], epsilon: float,
                 graph: Sequence[bool] | None = None) -> None:
        super().__init__(run, row, FunctionView(lambda t: t, "add"), Norm(epsilon), operands[0], None)
        self.others = [_saved(operand) for operand in operands[1:]]
        self.epsilon = epsilon
        self.graph = tuple(graph) if graph is not None else (True,) * len(operands)  # False: a constant keeps its share

    def propagate(self, relevance: Tensor) -> tuple[Tensor, ...]:
        first = self._input()
        if any(operand._version != version for operand, version in self.others):
            raise InputError(f"LRP: an operand of the addition {self.row.name!r} was modified in place afterwards")
        others = [operand for operand, _ in self.others]
        share = divide(relevance, sum(others, first), self.epsilon, scratch=True)
        shares = tuple((operand * share).sum_to_size(operand.shape) for operand in others)
        result = (share.mul_(first).sum_to_size(first.shape),) + shares
        self.run.account(self, relevance, tuple(r for r, on in zip(result, self.graph) if on))
        return result


class ConcatStep(Step):
    """``torch.cat`` of computed tensors and constants (a class token): each computed part gets its
    slice of the relevance; the constants' slices stay with them (absorbed, shown in the report).

    >>> step.propagate(relevance)   # (R_x,) for torch.cat([cls, x], dim=1): relevance[:, 1:]
    """

    def __init__(self, run: Run, row: LayerBalance, sizes: Sequence[int], dim: int, graph: Sequence[bool]) -> None:
        self.run, self.row = run, row
        self.sizes, self.dim, self.graph = list(sizes), dim, tuple(graph)
        self.output = None
        self.records = []

    def propagate(self, relevance: Tensor) -> tuple[Tensor, ...]:
        pieces = relevance.split(self.sizes, dim=self.dim)
        kept = tuple(piece for piece, on in zip(pieces, self.graph) if on)
        self.run.account(self, relevance, kept)
        return kept


class ProductStep(Step):
    """``z = product(a, b)``, bilinear in two computed tensors (the matrix products of attention):
    the rule (a :class:`~attrib.lrp.rules.ProductRule`) gives ``(R_a, R_b)``.

    >>> step.propagate(relevance)   # (R_q, R_k) for the scores q k^T
    """

    def __init__(self, run: Run, row: LayerBalance, view: LayerView, rule: ProductRule, a: Tensor, b: Tensor,
                 product: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__(run, row, view, rule, a, None)
        self.other = _saved(b)
        self.product = product

    def propagate(self, relevance: Tensor) -> tuple[Tensor, ...]:
        a = self._input()
        b, version = self.other
        if b._version != version:
            raise InputError(f"LRP: an operand of {self.row.name!r} was modified in place afterwards")
        assert isinstance(self.rule, ProductRule)
        z = self.product(a, b)
        result = self.rule.relevance_pair(self.product, a, b, z, relevance)
        self.run.account(self, relevance, result)
        return result


def _graph_arguments(args: tuple, kwargs: dict) -> dict[int | str, Tensor]:
    """A call's tensors from the inputs' graph, by position or keyword."""
    return {key: value for key, value in [*enumerate(args), *kwargs.items()] if on_graph(value)}


def _with_arguments(view: FunctionView, rest: tuple, kwargs: dict) -> FunctionView:
    """A module's view that calls its forward with the arguments after the first of one call."""
    function = view.function
    return FunctionView(lambda t: function(t, *rest, **kwargs), view.kind)


def _is_sum(operands: Sequence[Tensor], output: object) -> bool:
    """Whether ``output`` is the elementwise sum of ``operands`` (in any order of addition)."""
    if not (isinstance(output, Tensor) and output.is_floating_point()):
        return False
    total = sum(operands[1:], operands[0])
    if total.shape != output.shape:
        return False
    rounding = len(operands) * torch.finfo(output.dtype).eps * sum((x.abs() for x in operands[1:]), operands[0].abs())
    return bool(((output - total).abs() <= rounding).all())


@contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off for every parameter while the block runs, each flag restored after (buffers and
    values are the model's business, untouched). A forward pass that writes into a parameter in place
    (allowed once it needs no gradient) is refused afterwards, naming it: the model changes itself."""
    params = list(model.parameters())
    saved = [(param, param.requires_grad, param._version) for param in params]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        written = [param for param, _, version in saved if param._version != version or not param.is_leaf]
        for param, flag, _ in saved:
            if param.is_leaf:
                param.requires_grad_(flag)
    if written:
        names = {id(p): n for n, p in model.named_parameters()}
        raise InputError(f"model: its forward pass wrote into the parameter {names.get(id(written[0]), '?')!r} in place, "
                         "so every call changes the model; LRP refuses to run on it")


class Run:
    """Hooks and bookkeeping for one forward pass and the backward passes that follow it.

    >>> run = Run(model, composite, make_plan(model, composite, views), views, record={})
    >>> x = inputs.detach().requires_grad_()
    >>> output = run.forward((x,), ())
    >>> (relevance,), records, report = run.backward(output, output.detach(), (x,), retain=False)
    """

    def __init__(
        self, model: nn.Module, composite: Composite, plan: Plan, views: ViewCache,
        record: dict[str, tuple[nn.Module, str]], start: nn.Module | None = None,
    ) -> None:
        self.model, self.composite, self.plan, self.views = model, composite, plan, views
        self.record, self.start_module = record, start
        self.depth = 0
        self.inputs: list[Tensor | tuple[Tensor, ...] | None] = []  # per running hooked leaf: what is on the graph
        self.parents: list[str] = []
        self.rows: list[LayerBalance] = []
        self.calls: dict[str, int] = {}
        self.linear_outputs: dict[int, tuple[Tensor, Step, Tensor]] = {}
        self.saved_outputs: dict[int, tuple[Tensor, Step]] = {}
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
        self.tensor_names: dict[int, str] | None = None  # parameters and buffers by id, for constants' rows
        self.batch = 0  # the examples' count (rows of the inputs), set by forward

    # ------------------------------------------------------------------ forward
    def _label(self, name: str) -> str:
        count = self.calls[name] = self.calls.get(name, 0) + 1
        if count > 1 and name in self.record:
            raise LayerReuseError(
                f"layers: module {name!r} runs {count} times in one forward pass, so its relevance is ambiguous"
            )
        return name if count == 1 else f"{name}#{count}"

    def _relay(self, row: LayerBalance, view: LayerView, rule: Rule, x: Tensor, output: Tensor, graph_input: Tensor) -> tuple[Tensor, Step]:
        keep_output = rule.needs_output and not isinstance(view, CHEAP_VIEWS)
        step = Step(self, row, view, rule, x, output.detach() if keep_output else None)
        if not isinstance(rule, Pass):
            self.saved_inputs[id(graph_input)] = graph_input
        step.output = output.detach()
        out = Relay.apply(step, graph_input)
        if keep_output:
            self.saved_outputs[id(out)] = (out, step)
        return out, step

    def _entry(self, module: nn.Module) -> Entry:
        """This call's rule: the first-layer rule for the first linear layer on the input's graph."""
        key = id(module)
        entry = self.plan.get(key)
        if isinstance(module, LINEAR_LAYERS) and not self.first_taken:
            self.first_taken = True
            entry = self.plan.first.get(key, entry)
        if entry is None:
            raise self.plan.refused[key]
        return entry

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        name = self.plan.labels[id(module)]
        self.depth += 1
        if not args or not isinstance(args[0], Tensor):
            raise InputTypeError(f"LRP: layer {name!r} was called without a tensor as its first argument")
        graph = _graph_arguments(args, kwargs) if torch.is_grad_enabled() else {}
        if len(graph) > 1 or (graph and 0 not in graph):
            return self._several(module, name, graph, args, kwargs)
        if not graph:
            self.inputs.append(None)
            return None
        x = args[0]
        self.inputs.append(x)
        detached = x.detach()
        if getattr(module, "inplace", False) and self._kept(x):
            owner = self.saved_outputs.get(id(x))
            if (type(module) is nn.ReLU and owner is not None and owner[0] is x and owner[1].rule.relu_exact
                    and self.saved_inputs.get(id(x)) is not x):
                owner[1].relu_version = x._version + 1  # it keeps relu(z); checked in backward
            else:
                detached = detached.clone()  # the in-place op must not overwrite what a layer kept
        return (detached,) + tuple(args[1:]), kwargs

    def _several(
        self, module: nn.Module, name: str, graph: dict[int | str, Tensor], args: tuple, kwargs: dict,
    ) -> tuple[tuple, dict]:
        """A leaf called with several tensors from the inputs' graph (or one, not as its first
        argument): a rule for one input cannot see the others, so only a sum under ``Norm`` runs."""
        entry = self.plan.get(id(module))
        if entry is not None and isinstance(entry[1], ProductRule):
            if sorted(graph, key=str) != [0, 1] or kwargs:
                raise InputError(f"LRP: layer {name!r} ({type(module).__name__}) has a product rule, {entry[3]}, which needs "
                                 "exactly its first two arguments from the inputs' graph")
        elif entry is None or not isinstance(entry[1], Norm) or len(graph) < 2:
            places = ("arguments " if len(graph) > 1 else "argument ") + ", ".join(map(repr, graph))
            what = "it has no rule" if entry is None else f"its rule {entry[3]} reads only its first argument"
            raise InputError(
                f"LRP: layer {name!r} ({type(module).__name__}) takes {places} from the inputs' graph, but {what}; "
                f"relevance must reach every one of them. If it returns the sum of these inputs, map it to Norm "
                f"(Composite(names={{{name!r}: Norm()}})); otherwise write its operation in the model's forward outside "
                "a module (a + b, torch.cat), or pass the tensors that need no relevance detached"
            )
        self.inputs.append(tuple(graph.values()))
        copies = {key: tensor.detach().clone() for key, tensor in graph.items()}  # the module may write into them
        return (
            tuple(copies.get(i, value) for i, value in enumerate(args)),
            {key: copies.get(key, value) for key, value in kwargs.items()},
        )

    def _kept(self, tensor: Tensor) -> bool:
        """Whether a step keeps this tensor (as its input or output) for the backward pass."""
        output = self.saved_outputs.get(id(tensor))
        return (output is not None and output[0] is tensor) or self.saved_inputs.get(id(tensor)) is tensor

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
        self.depth -= 1
        x = self.inputs.pop()
        if x is None:
            return None
        if isinstance(x, tuple):
            if isinstance(self.plan[id(module)][1], ProductRule):
                return self._product_module(module, x, output)
            return self._sum_module(module, x, output)
        name, rule, view, rule_text = self._entry(module)
        if not isinstance(output, Tensor):
            raise InputTypeError(f"LRP: layer {name!r} returned a {type(output).__name__}, not a tensor")
        if type(view) is FunctionView and (len(args) > 1 or kwargs):
            view = _with_arguments(view, args[1:], kwargs)  # the module's forward, with this call's other arguments
        label = self._label(name)
        merged = self.linear_outputs.get(id(x)) if isinstance(module, BATCHNORMS) and self.composite.merge_batchnorm else None
        if merged is not None and merged[0] is x:
            _, below, source = merged
            # the layer below is replaced by the folded one: forget what it kept (its output may
            # still reach the graph elsewhere, then it recomputes)
            del self.linear_outputs[id(x)]
            self.saved_outputs.pop(id(x), None)
            below.z = None
            base = below.view
            assert isinstance(base, (LinearView, ConvView)) and isinstance(module, BATCHNORMS)  # kept only for these
            view = self.views.get(("folded", id(base.module), id(module)), lambda: FoldedView(base, module))
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

    def _sum_module(self, module: nn.Module, operands: tuple[Tensor, ...], output: Any) -> Tensor:
        """A leaf mapped to Norm that returned the sum of its inputs: shared like an addition."""
        name, rule, _, rule_text = self.plan[id(module)]
        if not _is_sum(operands, output):
            raise InputError(
                f"LRP: layer {name!r} ({type(module).__name__}) is mapped to Norm and called with {len(operands)} inputs "
                "from the graph, which shares relevance as for their sum, but its output is not their elementwise sum; "
                "write its operation in the model's forward outside a module, or give it one input from the graph"
            )
        if name in self.record and self.record[name][1] == "in":
            raise InputError(f"layers: {name!r} has {len(operands)} inputs; record its output, or the layers that feed it")
        assert isinstance(rule, Norm)  # checked by _several
        row = LayerBalance(self._label(name), "add", rule_text)
        self.rows.append(row)
        step = SumStep(self, row, [operand.detach() for operand in operands], rule.epsilon)
        self.saved_inputs.update((id(operand), operand) for operand in operands)
        step.output = output.detach()
        out = Relay.apply(step, *operands)
        if name in self.record:
            step.records.append((name, "out"))
            self._keep_outputs(step, out)
        return out

    def _product_module(self, module: nn.Module, operands: tuple[Tensor, ...], output: Any) -> Tensor:
        """A leaf with a product rule: its two graph inputs get their shares of the relevance."""
        name, rule, view, rule_text = self.plan[id(module)]
        if not isinstance(output, Tensor):
            raise InputTypeError(f"LRP: layer {name!r} returned a {type(output).__name__}, not a tensor")
        if name in self.record and self.record[name][1] == "in":
            raise InputError(f"layers: {name!r} has two inputs; record its output, or the layers that feed it")
        assert isinstance(rule, ProductRule)  # checked by the caller
        row = LayerBalance(self._label(name), view.kind, rule_text)
        self.rows.append(row)
        a, b = operands
        step = ProductStep(self, row, view, rule, a.detach(), b.detach(), module.forward)
        self.saved_inputs.update((id(operand), operand) for operand in operands)
        step.output = output.detach()
        out = Relay.apply(step, a, b)
        if name in self.record:
            step.records.append((name, "out"))
            self._keep_outputs(step, out)
        return out

    def _keep_outputs(self, step: Step, out: Tensor) -> None:
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
        """A residual addition between two computed tensors, or of a computed tensor and a constant
        (a position embedding), which keeps its share like a bias (called by FunctionalOps)."""
        graph = (on_graph(a), on_graph(b))
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
        label = self._functional_label("add")
        if not all(graph):
            label += self._constants([b if graph[0] else a])
        row = LayerBalance(label, "add" if all(graph) else "add constant", repr(rule))
        self.rows.append(row)
        step = SumStep(self, row, (saved_a, b.detach()), rule.epsilon, graph)
        if inplace:
            return RelayInPlace.apply(step, a, b)
        step.output = saved_a + b.detach()
        return Relay.apply(step, a, b)

    def _constants(self, tensors: list[Tensor]) -> str:
        """`` (name, ...)``: the model's parameters or buffers that the constants are (or are views of),
        for the report's row; empty if none is."""
        if self.tensor_names is None:
            self.tensor_names = {id(t): n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        names = [self.tensor_names.get(id(t if t._base is None else t._base)) for t in tensors]
        known = [name for name in names if name is not None]
        return f" ({', '.join(known)})" if known else ""

    def concatenation(self, parts: list[Tensor], dim: int) -> Tensor:
        """``torch.cat`` of computed tensors and constants (called by FunctionalOps)."""
        graph = [on_graph(part) for part in parts]
        label = self._functional_label("cat") + self._constants([part for part, on in zip(parts, graph) if not on])
        row = LayerBalance(label, "cat constant", "constant parts keep their slices")
        self.rows.append(row)
        output = torch.cat([part.detach() for part in parts], dim)
        step = ConcatStep(self, row, [part.shape[dim] for part in parts], dim, graph)
        step.output = output
        return Relay.apply(step, *[part for part, on in zip(parts, graph) if on])

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
        raise Stop

    def hooks(self, stack: ExitStack) -> None:
        """Register every hook on ``stack`` (removed when it closes)."""
        def keep(handle):
            stack.callback(handle.remove)
        for name, module in self.model.named_modules():
            if self.plan.hooked(module):
                keep(module.register_forward_pre_hook(self.pre_hook, with_kwargs=True))
                keep(module.register_forward_hook(self.post_hook, with_kwargs=True))
            elif any(True for _ in module.children()):
                keep(module.register_forward_pre_hook(self.parent_pre_hook(name)))
                keep(module.register_forward_hook(self.parent_post_hook))
        for name, (module, side) in self.record.items():
            if not self.plan.hooked(module):
                if side == "in":
                    keep(module.register_forward_pre_hook(self.record_hook(name, "in")))
                else:
                    keep(module.register_forward_hook(self.record_hook(name, "out")))
        if self.start_module is not None:
            keep(self.start_module.register_forward_hook(self.start_hook))

    def forward(self, inputs: tuple[Tensor, ...], args: tuple) -> Any:
        """The model's output ``model(*inputs, *args)`` (``inputs`` must require grad), every hook
        attached only for this call; ``None`` if the pass stopped at the start layer. The model gets
        copies of ``inputs``: operations on them are seen like those on any computed tensor (``a + b``
        of two inputs is shared, in-place operations are allowed), and ``inputs`` stay the leaves."""
        try:
            with torch.enable_grad(), ExitStack() as stack:
                fed = [x.clone() for x in inputs]
                self.batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
                stack.enter_context(_parameters_frozen(self.model))  # on the graph: computed from the inputs
                self.hooks(stack)
                stack.enter_context(FunctionalOps(self, self.composite.split_additions))
                return self.model(*fed, *args)
        except Stop:
            return None
        finally:  # what the forward pass needed to decide in-place questions
            self.linear_outputs.clear()
            self.saved_outputs.clear()
            self.saved_inputs.clear()

    # ----------------------------------------------------------------- backward
    def _per_example(self, tensor: Tensor) -> Tensor:
        """(B,) sums; a layer that runs on a batch-major split of the batch (Swin's windows: B * windows
        rows) is folded back to the examples."""
        sums = per_example_sum(tensor)
        rows = sums.shape[0]
        if self.batch and rows != self.batch and rows % self.batch == 0:
            sums = sums.reshape(self.batch, rows // self.batch).sum(1)
        return sums

    def account(self, step: Step, relevance: Tensor, result: tuple[Tensor, ...]) -> None:
        if self.per_layer:
            entering = self._per_example(relevance)
            leaving = entering if result[0] is relevance else torch.stack([self._per_example(r) for r in result]).sum(0)
            step.row.add(entering, leaving)
        for name, side in step.records:
            self.records[name] = (relevance if side == "out" else result[0]).detach()

    def backward(
        self, tensor: Tensor, relevance: Tensor, inputs: tuple[Tensor, ...], retain: bool,
    ) -> tuple[tuple[Tensor, ...], dict, ConservationReport]:
        """Relevance at every input (zeros at one the output does not depend on), at the recorded
        layers, and the report, from ``relevance`` at ``tensor``."""
        for row in self.rows:
            row.entering = row.leaving = None
        self.records = {}
        self.final_pass = not retain
        reached = torch.autograd.grad(tensor, inputs, relevance, retain_graph=retain, allow_unused=True)
        if all(value is None for value in reached):
            raise InputError("inputs: the explained output does not depend on the inputs")
        found = tuple(torch.zeros_like(x) if value is None else value for x, value in zip(inputs, reached))
        missing = [name for name in self.record if name not in self.records]
        if missing:
            raise InputError(f"layers: {missing} received no relevance (not between the input and the explained output)")
        report = ConservationReport(
            [row for row in self.rows if row.entering is not None], per_example_sum(relevance),
            torch.stack([per_example_sum(value) for value in found]).sum(0),
            [] if self.per_layer else ["per-layer sums were not taken (conservation=False)"],
        )
        return found, dict(self.records), report


