"""The path sweep shared by every path method.

For inputs x (B, ...), baselines x' and nodes alpha_0..alpha_m, the interpolated batch has
``(m+1)·B`` rows, step-major (row ``r`` is node ``r // B`` of example ``r % B``), and is evaluated in
chunks of ``internal_batch_size`` rows. Per chunk: one forward pass with hooks capturing every
requested layer, the target scores, and one backward pass giving dF/d(layer) for all layers (and
dF/dx when asked) at once. Parameters never need gradients here, so the autograd graph starts at
the lowest captured layer (or the input) and the part of the network below keeps nothing for
backward.
"""
from __future__ import annotations

import functools
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Generator, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .checks import (
    as_args,
    as_given,
    check_baseline_tuple,
    check_baselines,
    describe,
    check_input_tuple,
    check_model,
    expand_args,
)
from .errors import InputError, InputTypeError
from .hooks import capture, frozen_parameters, resolve_layers
from .memory import AUTO, ChunkPlan, Footprint
from .targets import normalize_target, target_scores
from .types import Baselines, Inputs, LayerSpec, TargetType, input_keys


@dataclass
class Chunk:
    """One evaluated chunk: rows ``start:stop`` of the step-major interpolated batch.

    >>> path.evaluate(alphas, lambda chunk: print(chunk.start, chunk.stop, chunk.scores.shape), layers=['fc1'])
    """

    start: int
    stop: int
    node: Tensor  # (rows,) node index of each row
    example: Tensor  # (rows,) example index of each row
    scores: Tensor  # (rows,) target scores, detached
    values: dict[str, Tensor]  # captured layer tensors (and INPUT), detached
    grads: dict[str, Tensor]  # dF/d(value), detached
    parts: dict[str, list[str]] = field(default_factory=dict)  # a layer captured as several tensors: their keys


@dataclass
class Interpolation:
    """The path at a layer: the output of ``layer`` is replaced, row by row, by
    ``start[e] + alpha_n * difference[e]`` (``start``: the layer's value at the baselines; ``difference``:
    its value at the inputs minus that), a leaf needing a gradient, captured under ``layer``."""

    layer: str
    start: Tensor
    difference: Tensor


Differentiate = Callable[[Tensor, dict[str, Tensor]], dict[str, Tensor]]
Consume = Callable[[Chunk, str, Tensor, Tensor], None]


def _gradients(scores: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """dF/dt for every tensor at once (zeros where F does not depend on it)."""
    names = [name for name, tensor in tensors.items() if tensor.requires_grad]
    found: dict[str, Tensor] = {}
    if names and scores.requires_grad:
        grads = torch.autograd.grad(scores.sum(), [tensors[n] for n in names], allow_unused=True)
        found = {n: g for n, g in zip(names, grads) if g is not None}
    return {name: found[name] if name in found else torch.zeros_like(tensor) for name, tensor in tensors.items()}


def _reaching(roots: list, targets: list[Tensor]) -> set[int]:
    """ids of the autograd nodes, among those below ``roots``, from which a leaf in ``targets`` is reached."""
    target_ids = {id(t) for t in targets}
    order, seen, children = [], set(), {}
    stack = [(root, False) for root in roots]
    while stack:  # iterative post-order DFS (graphs of deep nets exceed the recursion limit)
        node, finished = stack.pop()
        if finished:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        children[id(node)] = [child for child, _ in node.next_functions if child is not None]
        stack.extend((child, False) for child in children[id(node)])
    reach: set[int] = set()
    for node in order:
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if (variable is not None and id(variable) in target_ids) or any(id(c) in reach for c in children[id(node)]):
            reach.add(id(node))
    return reach


def _streamed_gradients(
    scores: Tensor, streamed: dict[str, Tensor], others: dict[str, Tensor], consume: Callable[[str, Tensor, Tensor], None],
    starts: Sequence[Tensor] = (),
) -> dict[str, Tensor]:
    """One backward pass; each streamed tensor's (value, gradient) goes to ``consume`` as soon as the
    gradient is complete (a tensor hook), so neither is kept for the rest of the pass. The gradients of
    ``others`` are returned. Leaves, and tensors whose graph reaches none of the leaves (those of
    ``streamed`` and ``others``, and ``starts``: the interpolated layer's point), are differentiated directly."""
    pending = dict(streamed)
    direct = [name for name, t in streamed.items() if t.requires_grad and t.grad_fn is None]
    leaves = ([streamed[n] for n in direct] + [t for t in others.values() if t.requires_grad and t.grad_fn is None]
              + list(starts))
    inner = [name for name, t in streamed.items() if t.grad_fn is not None]
    if inner:
        reach = _reaching([streamed[n].grad_fn for n in inner], leaves)
        direct += [name for name in inner if id(streamed[name].grad_fn) not in reach]
    handles = []

    def deliver(name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            consume(name, pending.pop(name).detach(), grad.detach())
        return hook

    try:
        for name in inner:
            if name not in direct:
                handles.append(streamed[name].register_hook(deliver(name)))
        wanted = {name: streamed[name] for name in direct}
        wanted.update(others)
        wanted.update({f"<start {i}>": t for i, t in enumerate(starts)})  # the pass runs down to them, so every hook fires
        del streamed
        grads = _gradients(scores, wanted)
    finally:
        for handle in handles:
            handle.remove()
    for name in direct:
        consume(name, pending.pop(name).detach(), grads.pop(name).detach())
    for name in list(pending):  # F does not depend on it: its hook never ran
        value = pending.pop(name).detach()
        consume(name, value, torch.zeros_like(value))
    return {name: grads[name] for name in others}


def sweep(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    baselines: Sequence[Tensor | None],
    alphas: Tensor,
    *,
    target: TargetType,
    layers: Sequence[LayerSpec] = (),
    attribute_to_layer_input: bool = False,
    input_grad: bool = False,
    internal_batch_size: int | str | None = AUTO,
    memory_budget: int | None = None,
    additional_forward_args: Sequence[Any] = (),
    differentiate: Differentiate | None = None,
    consume: Consume | None = None,
    mode: TorchFunctionMode | None = None,
    interpolation: Interpolation | None = None,
    examples: Tensor | None = None,
) -> Generator[Chunk, None, None]:
    """Evaluate the path in chunks; yields a :class:`Chunk` per forward+backward pass.

    Every input is interpolated with the same alpha per row (a baseline ``None`` leaves that input
    as it is: evaluation at the inputs). ``differentiate(scores, tensors)`` replaces the default
    backward (dF/d every captured tensor); ``tensors`` holds the captured layers and, when
    ``input_grad``, the interpolated inputs under :func:`~attrib.types.input_keys`.
    ``consume(chunk, name, value, grad)`` instead receives each captured layer during the backward
    pass, as soon as its gradient is complete; those layers are then left out of the yielded chunk,
    and no layer's activations and gradients are all held at once. ``mode``, a ``TorchFunctionMode``,
    is active during each forward pass (the backprop methods give ReLU another backward rule with
    it). ``internal_batch_size``: rows per
    forward pass, ``"auto"`` (sized to ``memory_budget`` bytes or the free memory: see
    :mod:`attrib.memory`) or ``None`` (all rows at once).

    With ``interpolation`` (an :class:`Interpolation`) the inputs are not interpolated: every row feeds
    its example's inputs as they are (token ids may be integers), and the named layer's output is
    replaced by the path's point at that layer; ``input_grad`` then asks for dF/d(that point), under
    the layer's name, and every captured layer must depend on it.

    With ``examples`` (one example index per row) the rows are given one by one instead of step-major:
    row ``r`` is example ``examples[r]`` at ``alphas[r]`` (``chunk.node`` is then the row's index into
    ``alphas``), so every example may have nodes of its own (``method="exact"``).
    """
    if consume is not None and differentiate is not None:
        raise InputError("sweep: give differentiate or consume, not both")
    n = inputs[0].shape[0]
    device = inputs[0].device
    if examples is not None and examples.shape != alphas.shape:
        raise InputError(f"sweep: examples has shape {tuple(examples.shape)}, alphas {tuple(alphas.shape)}; one example per row")
    rows_total = alphas.shape[0] * n if examples is None else alphas.shape[0]
    plan = ChunkPlan(internal_batch_size, rows_total, device, memory_budget)
    names = [name for name, _ in resolve_layers(model, layers, elements=True)] if layers else []
    if interpolation is not None:
        baselines = [None] * len(inputs)  # the inputs are fed as they are; the layer is interpolated
    diffs = [None if b is None else x - b for x, b in zip(inputs, baselines)]
    dtype = (interpolation.start.dtype if interpolation is not None
             else next((x.dtype for x in inputs if x.is_floating_point()), torch.float64))
    alphas = alphas.to(device=device, dtype=dtype)
    on = "input" if attribute_to_layer_input else "output"
    keys = input_keys(len(inputs))
    rows: dict[str, Tensor] = {}  # node and example of the chunk being evaluated, for the interpolation
    with ExitStack() as stack:
        stack.enter_context(frozen_parameters(model))
        at = None
        if interpolation is not None:  # entered first, so that its hook runs before the capture's on the same layer
            path = interpolation
            at = stack.enter_context(capture(model, [path.layer], argument="interpolate_at", substitute={
                path.layer: lambda value: _point(value, path, alphas, rows["node"], rows["example"])}))
        cap = stack.enter_context(capture(model, names, on=on, leaf=True))
        for start, stop in plan:
            if examples is None:
                node, example = step_major(n, start, stop, device)
            else:
                node, example = torch.arange(start, stop, device=device), examples[start:stop].to(device)
            rows.update(node=node, example=example)
            footprint = Footprint(model, device) if plan.probing else nullcontext()
            with footprint:
                with torch.enable_grad():
                    points = {
                        key: x[example] if b is None or d is None else interpolate(b, d, alphas.to(x.dtype), node, example)
                        for key, x, b, d in zip(keys, inputs, baselines, diffs)
                    }
                args = expand_args(additional_forward_args, example, n)
                with mode if mode is not None else nullcontext():
                    chunk = _evaluate(model, cap, names, points, (start, stop, node, example), target, input_grad,
                                      args, differentiate, consume, at)
                del points  # nothing of this chunk's graph outlives it
            if isinstance(footprint, Footprint):
                footprint.add(chain(chunk.values.values(), chunk.grads.values()))
                plan.measured(footprint.peak, stop - start)
            yield chunk
            del chunk


def _point(value: Tensor, path: Interpolation, alphas: Tensor, node: Tensor, example: Tensor) -> Tensor:
    """The interpolation's replacement for a layer output ``value`` of the chunk's rows."""
    expected = (node.shape[0],) + tuple(path.start.shape[1:])
    if tuple(value.shape) != expected:
        raise InputError(f"interpolate_at: layer {path.layer!r} gave shape {tuple(value.shape)} for {node.shape[0]} rows, "
                         f"not {expected} as at the path's ends; its first dimension must be the batch")
    point = interpolate(path.start, path.difference, alphas, node, example)
    return point.requires_grad_(True) if torch.is_grad_enabled() else point


def _evaluate(model: nn.Module, cap: capture, names: list[str], points: dict[str, Tensor],
              rows: tuple[int, int, Tensor, Tensor], target: TargetType,
              input_grad: bool, args: tuple, differentiate: Differentiate | None, consume: Consume | None,
              at: capture | None = None) -> Chunk:
    """One forward and one backward pass at the chunk's ``points`` (rows ``start, stop, node, example``
    of the step-major batch, one tensor per input; with ``at``, the capture interpolating a layer, the
    inputs are fed as they are and that layer's point takes their place); the returned chunk holds
    detached scores, values and gradients."""
    with torch.enable_grad():
        for point in points.values():
            point.requires_grad_(input_grad and at is None and point.is_floating_point())
        fed = [point.clone() if point.requires_grad else point for point in points.values()]  # a model may write its input
        output = model(*fed, *args)
        del fed
        start, stop, node, example = rows
        scores = target_scores(output, target, example)
        names = [part for name in names for part in cap.parts.get(name, [name])]
        tensors = {name: cap.captured[name] if name in cap.captured else cap[name] for name in names}  # cap[...] says which did not run
        cap.captured.clear()
        chunk = Chunk(start, stop, node, example, scores.detach(), {}, {}, dict(cap.parts))
        leaves: list[Tensor] = []  # where the path's graph starts, besides the captured tensors
        if at is not None:
            layer = at.layers[0][0]
            point = at[layer]
            at.captured.clear()
            independent = sorted(cap.made_leaves | {name for name, t in tensors.items() if not t.is_floating_point()})
            if independent:
                raise InputError(f"layers: {independent[0]!r} does not depend on interpolate_at layer {layer!r} (it runs "
                                 "before it or beside it, or is not floating-point), so it does not change along the path; "
                                 "choose a layer after it")
            leaves.append(point)
            if input_grad:
                tensors[layer] = point
        else:
            integer = [name for name, t in tensors.items() if not t.is_floating_point()]
            if integer:
                raise InputError(f"layers: {integer[0]!r} is {tensors[integer[0]].dtype}, which has no gradient; choose a "
                                 "layer with a floating-point value")
            if input_grad:
                tensors.update(points)
        if consume is not None:
            grads = _streamed_gradients(  # no reference to the streamed layers stays here
                scores, {name: tensors.pop(name) for name in names}, tensors, functools.partial(consume, chunk), leaves,
            )
        else:
            grads = (differentiate or _gradients)(scores, tensors)
    chunk.values.update({name: tensor.detach() for name, tensor in tensors.items()})
    chunk.grads.update({name: grad.detach() for name, grad in grads.items()})
    return chunk


def interpolate(baselines: Tensor, difference: Tensor, alphas: Tensor, node: Tensor, example: Tensor) -> Tensor:
    """Rows ``x'_e + alpha_n (x_e - x'_e)`` for each pair (``node[r]``, ``example[r]``): the points of the path."""
    shape = (-1,) + (1,) * (baselines.dim() - 1)
    return baselines[example] + alphas[node].view(shape) * difference[example]


def step_major(n_examples: int, start: int, stop: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``(node, example)`` of rows ``start:stop`` of the step-major batch: row ``r`` is node ``r // B`` of
    example ``r % B`` (``B = n_examples``)."""
    index = torch.arange(start, stop, device=device)
    return index // n_examples, index % n_examples


class StraightPath:
    """The straight line from the baselines to the inputs: the arguments a path method shares, checked
    once, and the target score at both ends (one forward pass without a graph, taken before the first
    sweep, so that a bad target fails before the long part).

    ``inputs`` and ``baselines`` are held as tuples (one entry per input, see
    :func:`~attrib.checks.check_input_tuple`); :meth:`as_given` gives a per-input result back as the
    caller passed the inputs (a tensor for one tensor, else a tuple).

    ``interpolate_at`` (a layer name) puts the path at that layer's output instead: the inputs may be
    token ids, the baselines are inputs too (their layer value is the path's start), or
    ``layer_baselines`` gives the start at the layer directly (None, a number, a tensor like the
    layer's output or like one example's); ``layer_noise`` is added to the layer's value at the inputs
    (what :class:`~attrib.noise.NoiseTunnel` uses). ``keys`` is then ``(layer,)``, ``differences`` the
    layer's change, and :meth:`as_given` returns ``{layer: map}``. The scores at the ends are taken with
    the layer set to its two ends and every input as given, so completeness holds exactly against them
    (they equal F(x) and F(x') when the model reads its inputs only through that layer).

    >>> path = StraightPath(model, x, baselines=0.0, target=3)
    >>> path.evaluate(torch.tensor([0.5, 1.0]), print, layers=["features.28"])   # each Chunk
    >>> path.change                                                              # F(x) - F(x') per example
    """

    def __init__(self, model: nn.Module, inputs: Inputs, baselines: Baselines, target: TargetType,
                 additional_forward_args: Any = None, differentiable: bool = True, interpolate_at: str | None = None,
                 layer_baselines: Baselines = None, layer_noise: Tensor | None = None) -> None:
        check_model(model)
        self.model = model
        self.interpolate_at = interpolate_at
        if interpolate_at is None:
            for name, value in (("layer_baselines", layer_baselines), ("layer_noise", layer_noise)):
                if value is not None:
                    raise InputError(f"{name}: the path is at the inputs; give interpolate_at=<layer> to the method's "
                                     "constructor to interpolate at a layer")
            self.inputs, self.single = check_input_tuple(model, inputs, differentiable)
            self.baselines = check_baseline_tuple(baselines, self.inputs, self.single) if differentiable else self.inputs
            self.keys = input_keys(len(self.inputs))
        else:
            self.inputs, self.single = check_input_tuple(model, inputs, differentiable=False)
            if baselines is not None and layer_baselines is not None:
                raise InputError("baselines and layer_baselines: give the path's start as inputs (baselines) or as the "
                                 f"value of layer {interpolate_at!r} (layer_baselines), not both")
            self.baselines = check_baseline_tuple(baselines, self.inputs, self.single)
            self.keys = (interpolate_at,)
        self._layer_baselines, self._layer_noise = layer_baselines, layer_noise
        self.target = normalize_target(target, self.batch)
        self.args = as_args(additional_forward_args)
        self.parts: dict[str, list[str]] = {}  # layers seen as several tensors (a module's positional inputs)
        self._ends: tuple[Tensor, Tensor] | None = None
        self._interpolation: Interpolation | None = None

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def interpolation(self) -> Interpolation | None:
        """The path at the layer (its start and change per example), or None for a path at the inputs;
        computed once, from one graph-free pass over the inputs (and the baselines)."""
        if self.interpolate_at is not None and self._interpolation is None:
            layer, n = self.interpolate_at, self.batch
            given = self._layer_baselines is not None
            fed = self.inputs if given else tuple(torch.cat([x, b]) for x, b in zip(self.inputs, self.baselines))
            values = layer_output(self.model, layer, fed, self.args, n)
            end = values[:n]
            start = (check_baselines(self._layer_baselines, end, "layer_baselines", f"the output of layer {layer!r}") if given else values[n:]).to(end.dtype)
            if self._layer_noise is not None:
                noise = self._layer_noise
                if not isinstance(noise, Tensor) or noise.shape != end.shape or not noise.is_floating_point():
                    raise InputError(f"layer_noise: needs a floating-point tensor of shape {tuple(end.shape)}, like the "
                                     f"output of layer {layer!r}, got {describe(noise)}")
                if not torch.isfinite(noise).all():
                    raise InputError("layer_noise contains NaN or infinite values")
                end = end + noise.detach().to(end)
            self._interpolation = Interpolation(layer, start.expand_as(end), end - start)
        return self._interpolation

    @property
    def differences(self) -> tuple[Tensor, ...]:
        """``x - x'`` per input (at the interpolated layer: the layer's change)."""
        if self.interpolation is not None:
            return (self.interpolation.difference,)
        return tuple(x - b for x, b in zip(self.inputs, self.baselines))

    def as_given(self, per_input: Sequence[Tensor]) -> Any:
        """One tensor per input, returned as the inputs were given: a tensor, or a tuple (for a path at a
        layer, ``{layer: map}``)."""
        if self.interpolate_at is not None:
            return {self.interpolate_at: per_input[0]}
        return as_given(per_input, self.single)

    def total(self, per_input: Sequence[Tensor]) -> Tensor:
        """The per-example sum over every input's map, (B,)."""
        return sum((t.reshape(self.batch, -1).sum(1) for t in per_input), start=self._zero())

    def _zero(self) -> Tensor:
        like = self.interpolation.start if self.interpolation is not None else self.inputs[0]
        return like.new_zeros((), dtype=like.dtype if like.is_floating_point() else torch.float64)

    def values_at_ends(self, layers: Sequence[str] = (), on: str = "output") -> tuple[Tensor, dict[str, Tensor]]:
        """Target scores (2B,) and the ``layers``' values at the inputs (rows :B) and at the baselines
        (rows B:), from one forward pass without a graph (at a layer: its two ends, the inputs as given)."""
        n = self.batch
        example = torch.arange(n, device=self.inputs[0].device).repeat(2)
        substitute = {}
        if self.interpolation is not None:
            path = self.interpolation
            ends = torch.cat([path.start + path.difference, path.start])
            fed = tuple(torch.cat([x, x]) for x in self.inputs)
            substitute = {path.layer: lambda value: _same_shape(value, ends, path.layer)}
        else:
            fed = tuple(torch.cat([x, b]) for x, b in zip(self.inputs, self.baselines))
        with ExitStack() as stack, torch.no_grad():
            if substitute:
                stack.enter_context(capture(self.model, list(substitute), substitute=substitute))
            cap = stack.enter_context(capture(self.model, list(layers), on=on)) if layers else None
            output = self.model(*fed, *expand_args(self.args, example, n))
            scores = target_scores(output, self.target, example)
            values = {name: cap[name] for name in layers} if cap is not None else {}
        return scores.detach(), values

    def _scores_at_ends(self) -> tuple[Tensor, Tensor]:
        if self._ends is None:
            scores, _ = self.values_at_ends()
            self._ends = scores[:self.batch], scores[self.batch:]
        return self._ends

    @property
    def outputs(self) -> Tensor:
        """F(x), per example."""
        return self._scores_at_ends()[0]

    @property
    def baseline_outputs(self) -> Tensor:
        """F(x'), per example."""
        return self._scores_at_ends()[1]

    @property
    def change(self) -> Tensor:
        """F(x) - F(x'), per example: what a complete attribution adds up to."""
        return self.outputs - self.baseline_outputs

    def evaluate(self, alphas: Tensor, each: Callable[[Chunk], Any], **options: Any) -> None:
        """:func:`sweep` along the path at ``alphas`` (keyword ``options`` as there), handing each chunk
        to ``each``; the scores at the ends are taken first."""
        self._scores_at_ends()
        chunks = sweep(self.model, self.inputs, self.baselines, alphas, target=self.target,
                       additional_forward_args=self.args, interpolation=self.interpolation, **options)
        with closing(chunks):
            for chunk in chunks:
                self.parts.update(chunk.parts)
                each(chunk)

    def gather(self, names: Sequence[str], per_key: dict[str, Tensor]) -> dict[str, Any]:
        """Per layer name, its tensor, or the tuple of its parts' tensors where it was captured as several."""
        return {name: tuple(per_key[p] for p in self.parts[name]) if name in self.parts else per_key[name] for name in names}

    def layer_total(self, value: Any) -> Tensor:
        """The per-example sum of a layer's map (over all its parts), (B,)."""
        parts = value if isinstance(value, tuple) else (value,)
        return sum((t.reshape(self.batch, -1).sum(1) for t in parts), start=self._zero())

    def at_inputs(self, **options: Any) -> Chunk:
        """The inputs themselves (alpha = 1, no other point and no endpoint pass), evaluated in chunks
        as :func:`sweep` and returned as one chunk of all rows."""
        assert self.interpolate_at is None, "at_inputs evaluates a path at the inputs"
        chunks = sweep(self.model, self.inputs, [None] * len(self.inputs), torch.ones(1, dtype=torch.float64),
                       target=self.target, additional_forward_args=self.args, **options)
        with closing(chunks):
            pieces = list(chunks)
        for piece in pieces:
            self.parts.update(piece.parts)
        if len(pieces) == 1:
            return pieces[0]
        first = pieces[0]
        return Chunk(
            0, self.batch, torch.cat([c.node for c in pieces]), torch.cat([c.example for c in pieces]),
            torch.cat([c.scores for c in pieces]), {k: torch.cat([c.values[k] for c in pieces]) for k in first.values},
            {k: torch.cat([c.grads[k] for c in pieces]) for k in first.grads}, first.parts,
        )


def interpolation_layer(model: nn.Module, interpolate_at: LayerSpec | None) -> str | None:
    """The resolved name of a method's ``interpolate_at`` (None: the path is at the inputs)."""
    if interpolate_at is None:
        return None
    if isinstance(interpolate_at, (list, tuple)):
        raise InputTypeError(f"interpolate_at: give one layer (a name or a module), got a {type(interpolate_at).__name__}")
    (name, _), = resolve_layers(model, [interpolate_at], elements=True, argument="interpolate_at")
    return name


def _same_shape(value: Tensor, replacement: Tensor, layer: str) -> Tensor:
    if value.shape != replacement.shape:
        raise InputError(f"interpolate_at: layer {layer!r} gave shape {tuple(value.shape)}, not {tuple(replacement.shape)} "
                         "as in the first pass; its first dimension must be the batch")
    return replacement


def layer_output(model: nn.Module, layer: str, inputs: tuple[Tensor, ...], args: Sequence[Any], n_examples: int) -> Tensor:
    """The output of ``layer`` for ``inputs`` (rows ``i`` of example ``i % n_examples``), one forward pass
    without a graph; refused unless it is a floating-point tensor whose first dimension is the batch
    (checked again on one row, so that a sequence-first output cannot pass by a coincidence of sizes).
    A model that fails on the inputs before the layer (a token id outside the vocabulary, float ids)
    is an error about the inputs, not a traceback from inside torch."""
    rows = inputs[0].shape[0]
    for fed, count in ((inputs, rows), (tuple(x[:1] for x in inputs), 1)):
        example = torch.arange(count, device=inputs[0].device) % n_examples
        with frozen_parameters(model), capture(model, [layer], argument="interpolate_at") as cap, torch.no_grad():
            try:
                model(*fed, *expand_args(args, example, n_examples))
            except (IndexError, RuntimeError, TypeError) as error:
                if layer in cap.captured:
                    raise
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise InputError(f"inputs: the model fails on the inputs or the baselines before layer {layer!r} "
                                 f"({type(error).__name__}: {first}); are the token ids within the vocabulary and integers?") from None
            value = cap[layer]
        if count == rows:
            found = value
        if not value.is_floating_point():
            raise InputError(f"interpolate_at: layer {layer!r} outputs {value.dtype}, which cannot be interpolated; "
                             "choose a layer with a floating-point output (e.g. the embedding)")
        if value.dim() == 0 or value.shape[0] != count:
            raise InputError(f"interpolate_at: layer {layer!r} gave shape {tuple(value.shape)} for {count} "
                             f"{'rows' if count > 1 else 'row'}; its first dimension must be the batch (e.g. batch_first=True)")
    return found.detach()


def convergence_delta(model: nn.Module, attributions: Any, start_point: Baselines, end_point: Inputs,
                      target: TargetType = None, additional_forward_args: Any = None,
                      interpolate_at: str | None = None) -> Tensor:
    """``sum(attributions) - (F(end_point) - F(start_point))`` per example (Captum's
    ``compute_convergence_delta``): the completeness error of any attributions of these two points.
    ``attributions`` is a tensor or a tuple (one per input, or a layer's parts), or a dict of one
    layer's map; their per-example sums are added. With ``interpolate_at`` the two points are inputs
    whose values at that layer are the path's ends (token ids may be integers)."""
    try:
        path = StraightPath(model, end_point, start_point, target, additional_forward_args, interpolate_at=interpolate_at)
    except InputError as error:  # the path's checks name its own arguments; here they are the two points
        message = str(error)
        for own, given in (("baselines", "start_point"), ("inputs", "end_point")):
            if message.startswith(own):
                message = given + message[len(own):]
        raise type(error)(message) from None
    if isinstance(attributions, dict):
        if len(attributions) != 1:
            raise InputError(f"attributions: a dict of {len(attributions)} layers' maps; give one layer's map "
                             f"(each of {list(attributions)} adds up to the change on its own)")
        attributions, = attributions.values()
    parts = attributions if isinstance(attributions, tuple) else (attributions,)
    for i, part in enumerate(parts):
        if not isinstance(part, Tensor):
            raise InputTypeError(f"attributions must be a tensor or a tuple of tensors, got {type(part).__name__}")
        if part.dim() == 0 or part.shape[0] != path.batch:
            raise InputError(f"attributions{'' if len(parts) == 1 else f'[{i}]'} has shape {tuple(part.shape)}; it needs "
                             f"{path.batch} rows, one per example of end_point")
    return path.layer_total(tuple(p.to(path.change.dtype) for p in parts)) - path.change


class ConvergenceDelta:
    """``compute_convergence_delta`` for methods whose maps should add up to the score change.

    >>> ig = IntegratedGradients(model)
    >>> ig.compute_convergence_delta(ig.attribute(x, target=3).attributions, 0.0, x, target=3)
    """

    model: nn.Module
    interpolate_at: str | None = None

    def compute_convergence_delta(self, attributions: Any, start_point: Baselines, end_point: Inputs,
                                  target: TargetType = None, additional_forward_args: Any = None) -> Tensor:
        return convergence_delta(self.model, attributions, start_point, end_point, target, additional_forward_args,
                                 self.interpolate_at)
