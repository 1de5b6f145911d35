"""The evaluation studies of Dhamdhere et al. as tools: ablation agreement, filters-to-flip, feature
selection, and the model-randomisation sanity check of Adebayo et al.

- **Ablation score** of filter c at a layer: the drop in the target's pre-softmax score when c's
  output is forced to 0 (``mode="zero"``), or to -inf (``mode="suppress"``: the paper's bias of -inf
  before the ReLU, so the ReLU after it outputs 0). The batch dimension carries the ablations.
- **Filter importance** per method: the layer's attribution summed over each filter's positions
  (Eq. 3 of the paper for conductance): ``activation``, ``gradient_x_activation``,
  ``internal_influence``, ``conductance``.
- **Flip test**: ablate the method's filters in rank order until the predicted label changes.
- **Feature selection**: per class, the k filters with the largest mean importance on a training
  split; a linear classifier on the union's pooled activations; held-out accuracy.
- **Sanity check**: randomise layers from the top down; rank correlation of each method's
  attribution at the layer with the original.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .checks import check_input_tuple
from .conductance import LayerConductance
from .errors import InputError
from .hooks import capture, resolve_layers
from .layer_attribution import (
    InternalInfluence,
    LayerActivation,
    LayerGradientXActivation,
)
from .targets import normalize_target, target_scores
from .types import Baselines, Inputs, TargetType

COMPARED_METHODS = ("activation", "gradient_x_activation", "internal_influence", "conductance")


def _suppressor(mode: str) -> Callable[[Tensor, Tensor], Tensor]:
    if mode == "zero":
        return lambda t, keep: t * keep
    if mode == "suppress":
        return lambda t, keep: t.masked_fill(keep == 0, float("-inf"))
    raise InputError(f"mode must be 'zero' or 'suppress', got {mode!r}")


def _tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _rows(inputs: Inputs, index: slice) -> Inputs:
    """The same rows of every input."""
    return tuple(x[index] for x in inputs) if isinstance(inputs, tuple) else inputs[index]


def _ablated_output(model: nn.Module, inputs: Inputs, layer: str, keep: Tensor, mode: str) -> Tensor:
    """The model output, no graph, with the layer's channels multiplied by ``keep`` ``(rows, C)``
    (0 = ablated, by ``mode``); ``inputs`` (a tensor or a tuple) has one row per ablation, or one row, repeated."""
    rows = keep.shape[0]
    given = tuple(x.expand((rows,) + tuple(x.shape[1:])) if x.shape[0] == 1 else x for x in _tuple(inputs))
    suppress = _suppressor(mode)

    def edit(tensor: Tensor) -> Tensor:
        return suppress(tensor, keep.to(tensor.dtype).reshape(keep.shape + (1,) * (tensor.dim() - 2)))

    with torch.no_grad(), capture(model, [layer], edit={layer: edit}):
        return model(*given)


def ablate(model: nn.Module, inputs: Inputs, layer: str, keep: Tensor, target: TargetType, mode: str = "zero") -> Tensor:
    """Target scores ``(rows,)`` with the layer's channels multiplied by ``keep`` ``(rows, C)`` (0 =
    ablated); ``inputs`` has one row per ablation (or one row, repeated)."""
    rows = keep.shape[0]
    output = _ablated_output(model, inputs, layer, keep, mode)
    return target_scores(output, normalize_target(target, rows), torch.arange(rows, device=output.device))


def _channels(model: nn.Module, inputs: Inputs, layer: str) -> int:
    return LayerActivation(model, layer).attribute(_rows(inputs, slice(0, 1)))[layer].shape[1]


def ablation_scores(model: nn.Module, inputs: Inputs, layer: str, target: TargetType, mode: str = "zero",
                    batch_size: int = 256) -> Tensor:
    """``(B, C)``: score(x) - score(x with filter c ablated), every filter of ``layer`` (``inputs``: a
    tensor or a tuple of tensors)."""
    given, single = check_input_tuple(model, inputs, differentiable=False)
    inputs = given[0] if single else given
    ((layer, _),) = resolve_layers(model, layer)
    n, device = given[0].shape[0], given[0].device
    targets = normalize_target(target, n)
    channels = _channels(model, inputs, layer)
    with torch.no_grad():
        full = target_scores(model(*given), targets, torch.arange(n, device=device))
    out = torch.empty(n, channels, dtype=full.dtype, device=full.device)
    eye = 1 - torch.eye(channels, dtype=full.dtype, device=device)
    for b in range(n):
        target_b = targets[b] if isinstance(targets, list) else targets
        for start in range(0, channels, batch_size):
            keep = eye[start:start + batch_size]
            out[b, start:start + keep.shape[0]] = full[b] - ablate(model, _rows(inputs, slice(b, b + 1)), layer, keep,
                                                                   target_b, mode)
    return out


def layer_attribution(model: nn.Module, inputs: Inputs, layer: str, target: TargetType, method: str,
                      n_steps: int = 50, baselines: Baselines = None, interpolate_at: str | None = None) -> Tensor:
    """The method's attribution at ``layer``'s output, shaped like it ``(B, C, ...)``; the path methods
    interpolate at ``interpolate_at`` when it is given (token models)."""
    ((layer, _),) = resolve_layers(model, layer)
    if method == "activation":
        return LayerActivation(model, layer).attribute(inputs)[layer]
    if method == "gradient_x_activation":
        return LayerGradientXActivation(model, layer).attribute(inputs, target=target)[layer]
    if method == "internal_influence":
        return InternalInfluence(model, layer, interpolate_at=interpolate_at).attribute(
            inputs, target=target, baselines=baselines, n_steps=n_steps)[layer]
    if method == "conductance":
        return LayerConductance(model, layer, interpolate_at=interpolate_at).attribute(
            inputs, target=target, baselines=baselines, n_steps=n_steps)[layer]
    raise InputError(f"method must be one of {COMPARED_METHODS}, got {method!r}")


def filter_importance(model: nn.Module, inputs: Inputs, layer: str, target: TargetType, method: str,
                      n_steps: int = 50, baselines: Baselines = None, interpolate_at: str | None = None) -> Tensor:
    """``(B, C)``: the method's attribution at ``layer`` summed over each filter's positions."""
    value = layer_attribution(model, inputs, layer, target, method, n_steps, baselines, interpolate_at)
    return value.reshape(value.shape[0], value.shape[1], -1).sum(-1)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dimension (nan where one side is constant)."""
    a, b = a.double(), b.double()
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt())


def ranks(values: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank) along the last dimension, 1-based."""
    values = values.double()
    order = values.argsort(-1)
    ranked = torch.empty_like(values)
    ranked.scatter_(-1, order, torch.arange(1, values.shape[-1] + 1, dtype=values.dtype, device=values.device).expand_as(values).contiguous())
    flat_values, flat_ranks = values.reshape(-1, values.shape[-1]), ranked.reshape(-1, values.shape[-1])
    for row in range(flat_values.shape[0]):  # ties: the mean of their ranks
        unique, inverse = torch.unique(flat_values[row], return_inverse=True)
        if unique.numel() < flat_values.shape[1]:
            sums = torch.zeros(unique.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, flat_ranks[row])
            counts = torch.zeros_like(sums).index_add_(0, inverse, torch.ones_like(flat_ranks[row]))
            flat_ranks[row] = (sums / counts)[inverse]
    return flat_ranks.reshape(values.shape)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last dimension."""
    return pearson(ranks(a), ranks(b))


def flip_counts(model: nn.Module, inputs: Inputs, layer: str, importance: Tensor, max_filters: int | None = None,
                mode: str = "zero") -> list[int | None]:
    """Per example: how many of its top filters (by ``importance`` ``(B, C)``) must be ablated, in
    rank order, before the predicted label changes (``None`` if it never does within ``max_filters``)."""
    given, single = check_input_tuple(model, inputs, differentiable=False)
    inputs = given[0] if single else given
    ((layer, _),) = resolve_layers(model, layer)
    with torch.no_grad():
        predicted = model(*given).argmax(1)
    channels = importance.shape[1]
    limit = channels if max_filters is None else min(max_filters, channels)
    counts: list[int | None] = []
    _suppressor(mode)  # a bad mode fails before any work
    for b in range(given[0].shape[0]):
        order = importance[b].argsort(descending=True)[:limit]
        keep = torch.ones(limit, channels, dtype=importance.dtype, device=importance.device)
        for k in range(limit):  # row k ablates the top k + 1 filters
            keep[k:, order[k]] = 0
        labels = _ablated_output(model, _rows(inputs, slice(b, b + 1)), layer, keep, mode).argmax(1)
        changed = torch.nonzero(labels != predicted[b])
        counts.append(int(changed[0, 0]) + 1 if changed.numel() else None)
    return counts


def pooled_activations(model: nn.Module, inputs: Inputs, layer: str, batch_size: int = 512) -> Tensor:
    """``(B, C)``: each filter's output averaged over its positions."""
    parts = []
    for start in range(0, _tuple(inputs)[0].shape[0], batch_size):
        value = LayerActivation(model, layer).attribute(_rows(inputs, slice(start, start + batch_size)))[layer]
        parts.append(value.reshape(value.shape[0], value.shape[1], -1).mean(-1))
    return torch.cat(parts)


def select_filters(importance: Tensor, labels: Tensor, k: int) -> list[int]:
    """The union over classes of each class's k filters with the largest mean importance."""
    chosen: set[int] = set()
    for label in labels.unique().tolist():
        mean = importance[labels == label].mean(0)
        chosen.update(mean.argsort(descending=True)[:k].tolist())
    return sorted(chosen)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int,
                 iterations: int = 200, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features (LBFGS, seed-free)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
    train_x, test_x = ((train_x - mean) / std).double(), ((test_x - mean) / std).double()
    weight = torch.zeros(train_x.shape[1], classes, dtype=torch.float64, device=train_x.device, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).double().mean())


def randomised_copies(model: nn.Module, seed: int = 0, inputs: Inputs | None = None) -> Iterator[tuple[str, nn.Module]]:
    """Cascading randomisation (Adebayo et al.): copies with the top 1, 2, ... parameterised layers
    re-initialised (``reset_parameters``), from the output down: in the order they run on
    ``inputs`` when given (else registration order). The caller's random state is left as it was;
    one copy is alive at a time."""
    import copy

    names = [name for name, module in model.named_modules() if hasattr(module, "reset_parameters") and
             any(True for _ in module.parameters(recurse=False))]
    if inputs is not None:
        ran: list[str] = []
        modules = dict(model.named_modules())
        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: ran.append(n) if n not in ran else None) for n in names]
        try:
            with torch.no_grad():
                model(*_tuple(_rows(inputs, slice(0, 1))))
        finally:
            for handle in handles:
                handle.remove()
        names = ran + [n for n in names if n not in ran]
    current = copy.deepcopy(model)
    for step, name in enumerate(reversed(names)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + step)
            dict(current.named_modules())[name].reset_parameters()
        yield name, current
        current = copy.deepcopy(current)


def sanity_check(model: nn.Module, inputs: Inputs, layer: str, target: TargetType, methods: Sequence[str] = COMPARED_METHODS,
                 n_steps: int = 32, seed: int = 0) -> dict[str, list[tuple[str, float]]]:
    """Per method: ``(top layer randomised down to, mean Spearman correlation with the original
    per-unit attribution at ``layer``)`` for each step of the cascade."""
    ((layer, _),) = resolve_layers(model, layer)
    original = {m: layer_attribution(model, inputs, layer, target, m, n_steps).flatten(1) for m in methods}
    out: dict[str, list[tuple[str, float]]] = {m: [] for m in methods}
    for name, twin in randomised_copies(model, seed, inputs):
        for method in methods:
            value = layer_attribution(twin, inputs, layer, target, method, n_steps).flatten(1)
            out[method].append((name, float(spearman(original[method], value).nanmean())))
    return out
