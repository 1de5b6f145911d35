"""The result every method returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from .errors import InputError, InputTypeError

Attributions = Union[Tensor, tuple[Tensor, ...], dict[str, Union[Tensor, tuple[Tensor, ...]]]]


@dataclass
class Attribution:
    """Attributions with what is needed to check them.

    ``attributions`` is a tensor (input methods; a tuple of tensors, one per input, when the inputs
    were a tuple) or a dict keyed by layer name (layer methods).
    ``delta`` is the signed completeness error ``attributions.sum() - (outputs - baseline_outputs)``
    per example, (B,) — a dict per layer for layer methods — or ``None`` where no axiom applies.
    ``evaluations`` counts model evaluations per example (interpolation nodes). ``info`` holds
    method-specific extras (e.g. ``step_residuals``: per layer, (n_steps, B) — each step's
    Stieltjes sum minus the score change over that step). ``layers`` holds per-layer maps of input
    methods that also record layers (LRP), keyed by layer name; ``result[name]`` reads either.

    >>> res = IntegratedGradients(model).attribute(x, target=3)
    >>> res.tensor.shape == x.shape, res.delta   # the map, and the completeness error per example
    """

    attributions: Attributions
    delta: Union[Tensor, dict[str, Tensor], None] = None
    outputs: Tensor | None = None
    baseline_outputs: Tensor | None = None
    method: str | None = None
    n_steps: int | None = None
    evaluations: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Tensor] = field(default_factory=dict)

    @property
    def tensor(self) -> Tensor:
        """``attributions`` of an input method; a layer method's maps are read with ``result[layer]``.

        >>> IntegratedGradients(model).attribute(x, target=3).tensor.shape == x.shape
        """
        if isinstance(self.attributions, dict):
            raise InputError(f"attributions: this result holds layers {list(self.attributions)}; read one with result[name]")
        if isinstance(self.attributions, tuple):
            raise InputError(f"attributions: this result holds {len(self.attributions)} input maps (the inputs were a "
                             "tuple); read one with result.attributions[i]")
        return self.attributions

    def __getitem__(self, layer: str) -> Any:
        if isinstance(self.attributions, dict):
            return self.attributions[layer]
        if layer in self.layers:
            return self.layers[layer]
        raise KeyError(f"{layer!r}: this result holds one input map" + (f" and layers {list(self.layers)}" if self.layers else ""))

    def filter_scores(self, layer: str | None = None, reduce: str = "sum") -> Tensor:
        """Per-filter scores (B, C) of a layer's map; see :func:`attrib.filter_scores`."""
        if isinstance(self.attributions, dict):
            if layer is None:
                if len(self.attributions) != 1:
                    raise InputError(f"layer: name one of {list(self.attributions)}")
                layer = next(iter(self.attributions))
            value = self[layer]
            if isinstance(value, tuple):
                raise InputError(f"layer: {layer!r} holds {len(value)} maps (one per layer input); score one of them "
                                 "with attrib.filter_scores(result[layer][i])")
            return filter_scores(value, reduce)
        return filter_scores(self.tensor, reduce)


def token_scores(attributions: Any, dim: int = -1) -> Tensor:
    """One number per token: a (B, T, E) map at an embedding summed over the embedding dimension ``dim``
    (the per-token attributions add up to the map's total, so completeness carries over).

    >>> res = IntegratedGradients(model, interpolate_at="embedding").attribute(ids, target=1)
    >>> token_scores(res["embedding"])   # (B, T)
    """
    if isinstance(attributions, Attribution):
        maps = attributions.attributions
        if not (isinstance(maps, dict) and len(maps) == 1):
            raise InputError("attributions: give one layer's map, e.g. token_scores(result['embedding'])")
        attributions, = maps.values()
    if not isinstance(attributions, Tensor):
        raise InputTypeError(f"attributions must be a (B, T, E) tensor, got {type(attributions).__name__}")
    if attributions.dim() < 3:
        raise InputError(f"attributions: need (B, T, E) (batch, tokens, embedding) to score tokens, got shape "
                         f"{tuple(attributions.shape)}")
    return attributions.sum(dim)


def filter_scores(attributions: Tensor, reduce: str = "sum") -> Tensor:
    """Aggregate a (B, C, ...) map per channel: ``"sum"`` (Dhamdhere et al. Eq. 3 summed over the
    filter's neurons) or ``"max"`` (the neuron-selection paper's max over H x W)."""
    if attributions.dim() < 2:
        raise InputError(f"attributions: need (B, C, ...) to score filters, got shape {tuple(attributions.shape)}")
    flat = attributions.reshape(attributions.shape[0], attributions.shape[1], -1)
    if reduce == "sum":
        return flat.sum(-1)
    if reduce == "max":
        return flat.amax(-1)
    raise InputError(f"reduce must be 'sum' or 'max', got {reduce!r}")


def top_filters(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest scores and their channel indices, per example: ((B, k), (B, k)) or ((k,), (k,))."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.shape[-1]:
        raise InputError(f"k must be an int in [1, {scores.shape[-1]}], got {k!r}")
    values, indices = torch.topk(scores, k, dim=-1)
    return values, indices
