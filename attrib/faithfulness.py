"""The faithfulness metrics the field compares attribution methods with, batched.

- **Deletion / insertion** (Petsiuk et al., "RISE", 2018): units (pixels, patches, or input elements) are
  changed in the order of their attribution, most (or least) relevant first; deletion replaces them by
  ``fill`` starting from the input, insertion puts them back starting from ``fill``. The curve is the
  target's score after each step; its area (trapezoid rule over the fraction changed) is the summary: low
  for deletion and high for insertion when the most relevant units come first.
- **Infidelity** (Yeh et al., "On the (in)fidelity and sensitivity of explanations", NeurIPS 2019, Eq. 1):
  ``E_I[(I . Phi - (F(x) - F(x - I)))^2]`` over perturbations ``I`` (default ``N(0, noise_scale^2)`` per
  element); with ``normalize`` the attributions are first scaled by the best ``beta`` (Captum's option).
- **Max-sensitivity** (Yeh et al. Eq. 2 as Captum computes it): ``max_s ||Phi(x + u_s) - Phi(x)|| / ||Phi(x)||``
  over perturbations ``u_s`` uniform in the L-infinity ball of ``radius``.

>>> curve = perturbation_curve(model, x, ig.attributions, target=3, mode="deletion", units=4, fill=blank)
>>> curve.auc, curve.scores            # (B,), (B, steps + 1)
>>> infidelity(model, x, ig.attributions, target=3), max_sensitivity(IntegratedGradients(model), x, target=3)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .checks import check_count, check_model
from .errors import InputError, InputTypeError
from .targets import normalize_target, target_scores
from .types import TargetType

MODES = ("deletion", "insertion")
ORDERS = ("most", "least")
SCORES = ("probability", "logit")


@dataclass
class Curve:
    """A deletion or insertion curve per example: ``scores[:, k]`` after changing ``fractions[k]`` of the units."""

    mode: str
    order: str
    units: str
    fractions: Tensor  # (steps + 1,)
    scores: Tensor  # (B, steps + 1)
    auc: Tensor  # (B,)


def _check_image_like(inputs: Any, attributions: Any) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise InputTypeError(f"inputs: needs a floating-point tensor, got {type(inputs).__name__}")
    if not isinstance(attributions, Tensor):
        raise InputTypeError(f"attributions: needs a tensor, got {type(attributions).__name__}")
    if inputs.dim() < 2:
        raise InputError(f"inputs: needs a batch dimension, got shape {tuple(inputs.shape)}")


def unit_scores(inputs: Tensor, attributions: Tensor, units: str | int) -> tuple[Tensor, Callable[[Tensor], Tensor], str]:
    """(B, U) scores per unit, a function from a (rows, U) mask to a mask of rows like ``inputs``'s, and the units' name.

    ``"pixels"`` (images (B, C, H, W): the attribution summed over channels; a map (B, H, W) or (B, 1, H, W) is
    taken as it is), ``"elements"`` (every input element), or an int ``p``: ``p x p`` patches (summed)."""
    B = inputs.shape[0]
    if units == "elements" or inputs.dim() == 2:
        if attributions.shape != inputs.shape:
            raise InputError(f"attributions: shape {tuple(attributions.shape)} is not that of the inputs {tuple(inputs.shape)}")
        return attributions.reshape(B, -1), lambda mask: mask.reshape((-1,) + tuple(inputs.shape[1:])), "elements"
    if inputs.dim() != 4:
        raise InputError(f"units: {units!r} needs images (B, C, H, W); give units='elements' for inputs of shape {tuple(inputs.shape)}")
    _, C, H, W = inputs.shape
    if attributions.shape == inputs.shape:
        pixels = attributions.sum(1)
    elif tuple(attributions.shape) in ((B, H, W), (B, 1, H, W)):
        pixels = attributions.reshape(B, H, W)
    else:
        raise InputError(f"attributions: shape {tuple(attributions.shape)} is neither that of the inputs {tuple(inputs.shape)} "
                         f"nor a map ({B}, {H}, {W})")
    if units == "pixels":
        return pixels.reshape(B, -1), lambda mask: mask.reshape(-1, 1, H, W).expand(-1, C, H, W), "pixels"
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise InputError(f"units: 'pixels', 'elements' or a patch size (a positive int), got {units!r}")
    p = units
    if H % p or W % p:
        raise InputError(f"units: patches of {p} px do not tile {H}x{W} images; choose a size that divides both")
    patches = pixels.reshape(B, H // p, p, W // p, p).sum((2, 4))

    def expand(mask: Tensor) -> Tensor:
        grid = mask.reshape(-1, H // p, W // p)
        return grid.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).expand(-1, C, H, W)
    return patches.reshape(B, -1), expand, f"{p}x{p} patches"


def _score(model: nn.Module, rows: Tensor, target: TargetType, example: Tensor, score: str) -> Tensor:
    output = model(rows)
    if score == "probability":
        if not isinstance(output, Tensor) or output.dim() != 2:
            raise InputError("score: 'probability' needs a model with (B, classes) outputs; give score='logit'")
        output = output.softmax(1)
    return target_scores(output, target, example)


def perturbation_curve(model: nn.Module, inputs: Tensor, attributions: Tensor, target: TargetType = None, *,
                       mode: str = "deletion", order: str = "most", units: str | int = "pixels",
                       fill: float | Tensor = 0.0, steps: int = 20, score: str = "probability", batch_size: int = 64) -> Curve:
    """The deletion or insertion curve of ``attributions`` (see the module docstring), ``steps + 1`` points per
    example, evaluated in batches of ``batch_size`` images. ``fill``: a number or a tensor like ``inputs`` (a
    blurred copy, a baseline). ``score``: the target's softmax probability, or its logit."""
    check_model(model)
    _check_image_like(inputs, attributions)
    for name, value, allowed in (("mode", mode, MODES), ("order", order, ORDERS), ("score", score, SCORES)):
        if value not in allowed:
            raise InputError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    steps = check_count("steps", steps)
    batch_size = check_count("batch_size", batch_size)
    if isinstance(fill, Tensor):
        if fill.shape != inputs.shape and fill.shape != inputs.shape[1:]:
            raise InputError(f"fill: shape {tuple(fill.shape)} is neither that of the inputs {tuple(inputs.shape)} nor one example's")
        filler = fill.to(inputs).expand_as(inputs)
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
        filler = torch.full_like(inputs, float(fill))
    else:
        raise InputTypeError(f"fill: a number or a tensor like the inputs, got {type(fill).__name__}")
    B = inputs.shape[0]
    target = normalize_target(target, B)
    per_unit, to_input, unit_name = unit_scores(inputs, attributions.detach().to(inputs.device), units)
    count = per_unit.shape[1]
    ranked = per_unit.argsort(dim=1, descending=order == "most", stable=True)
    place = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(count, device=ranked.device).expand_as(ranked).contiguous())
    changed_counts = torch.tensor([round(k * count / steps) for k in range(steps + 1)], device=inputs.device)
    fractions = changed_counts.double().cpu() / count
    rows = (steps + 1) * B  # row r: step r // B of example r % B
    scores = torch.empty(rows, dtype=inputs.dtype, device=inputs.device)
    start_from, put = (inputs, filler) if mode == "deletion" else (filler, inputs)
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            index = torch.arange(start, min(start + batch_size, rows), device=inputs.device)
            step, example = index // B, index % B
            mask = to_input(place[example] < changed_counts[step].unsqueeze(1))
            images = torch.where(mask, put[example], start_from[example])
            scores[index] = _score(model, images, target, example, score).to(scores.dtype)
    scores = scores.view(steps + 1, B).T.contiguous()
    auc = torch.trapezoid(scores.double().cpu(), fractions, dim=1)
    return Curve(mode, order, unit_name, fractions, scores, auc)


def _draws(perturbations: Tensor | None, inputs: Tensor, n_samples: int, make: Callable[[tuple], Tensor]) -> Tensor:
    """(S, B, ...) perturbations: the given ones, checked, or ``n_samples`` new ones."""
    if perturbations is None:
        return make((check_count("n_samples", n_samples),) + tuple(inputs.shape))
    if not isinstance(perturbations, Tensor) or perturbations.dim() != inputs.dim() + 1 or perturbations.shape[1:] != inputs.shape:
        raise InputError(f"perturbations: needs shape (samples, {', '.join(map(str, inputs.shape))}), got "
                         f"{tuple(perturbations.shape) if isinstance(perturbations, Tensor) else type(perturbations).__name__}")
    return perturbations.to(inputs)


def infidelity(model: nn.Module, inputs: Tensor, attributions: Tensor, target: TargetType = None, *,
               perturbations: Tensor | None = None, n_samples: int = 32, noise_scale: float = 0.1,
               normalize: bool = False, generator: torch.Generator | None = None, batch_size: int = 256) -> Tensor:
    """Yeh et al.'s infidelity per example, (B,): the mean over perturbations ``I`` of
    ``(sum(I * attributions) - (F(x) - F(x - I)))^2``. ``perturbations`` (S, B, ...) fixes them; else ``n_samples``
    draws of ``N(0, noise_scale^2)`` (from ``generator``). A per-pixel map (B, H, W) of images gets one perturbation
    per pixel, shared by the channels (so the map's channel sum is all that matters). ``normalize`` scales the attributions by the ``beta``
    minimising the error first (then the value no longer depends on their scale)."""
    check_model(model)
    _check_image_like(inputs, attributions)
    B = inputs.shape[0]
    pixel_map = inputs.dim() == 4 and tuple(attributions.shape) in ((B,) + tuple(inputs.shape[2:]), (B, 1) + tuple(inputs.shape[2:]))
    if attributions.shape != inputs.shape and not pixel_map:
        raise InputError(f"attributions: shape {tuple(attributions.shape)} is neither that of the inputs {tuple(inputs.shape)} "
                         "nor a per-pixel map (B, H, W)")
    if attributions.shape != inputs.shape:  # a pixel map: one perturbation per pixel, shared by its channels, so that
        attributions = attributions.reshape(B, 1, *inputs.shape[2:])  # I . (channel sum of Phi) = I . Phi exactly
    shape = tuple(attributions.shape)
    draws = _draws(perturbations, torch.empty(shape, dtype=inputs.dtype, device=inputs.device), n_samples, lambda size: torch.randn(
        size, generator=generator, dtype=inputs.dtype, device="cpu" if generator is None else generator.device).to(inputs) * noise_scale)
    S = draws.shape[0]
    draws = draws.expand((S,) + tuple(inputs.shape)) if shape != inputs.shape else draws
    target = normalize_target(target, B)
    flat = draws.reshape(S * B, *inputs.shape[1:])  # row r: sample r // B of example r % B
    example = torch.arange(S * B, device=inputs.device) % B
    with torch.no_grad():
        at_x = target_scores(model(inputs), target, torch.arange(B, device=inputs.device))
        perturbed = torch.cat([target_scores(model(inputs[example[s]] - flat[s]), target, example[s])
                               for s in _batches(S * B, batch_size)])
    change = (at_x[example] - perturbed).view(S, B).double()
    dot = (flat * attributions.detach().to(inputs)[example]).reshape(S * B, -1).sum(1).view(S, B).double()
    if shape != tuple(inputs.shape):  # the perturbation was counted once per channel
        dot = dot / inputs.shape[1]
    if normalize:
        beta = (dot * change).sum(0) / (dot * dot).sum(0).clamp_min(torch.finfo(torch.float64).tiny)
        dot = beta * dot
    return ((dot - change) ** 2).mean(0)


def _batches(rows: int, size: int) -> list[slice]:
    size = check_count("batch_size", size)
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def max_sensitivity(method: Any, inputs: Tensor, target: TargetType = None, *, perturbations: Tensor | None = None,
                    n_samples: int = 10, radius: float = 0.02, generator: torch.Generator | None = None,
                    **attribute_kwargs: Any) -> Tensor:
    """Max-sensitivity per example, (B,): ``max_s ||Phi(x + u_s) - Phi(x)|| / ||Phi(x)||`` (Frobenius norms; a zero
    explanation counts as norm 1), ``Phi`` being ``method.attribute(..., target=..., **attribute_kwargs)`` (any
    attrib method with an input map) or a callable ``f(inputs, target)``. The S perturbed copies of the batch are
    explained in one call (S·B rows, example-major; per-example tensors among ``attribute_kwargs``, such as
    baselines, are repeated with their example). ``u_s`` uniform in ``[-radius, radius]`` (or ``perturbations``)."""
    _check_image_like(inputs, inputs)
    draws = _draws(perturbations, inputs, n_samples, lambda shape: (torch.rand(
        shape, generator=generator, dtype=inputs.dtype, device="cpu" if generator is None else generator.device).to(inputs) * 2 - 1) * radius)
    S, B = draws.shape[0], inputs.shape[0]
    target = normalize_target(target, B)

    def explain(x: Tensor, rows_target: Any, rows: Tensor | None = None) -> Tensor:
        if callable(getattr(method, "attribute", None)):
            kwargs = attribute_kwargs if rows is None else {  # per-example tensors (baselines) follow their rows
                k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v for k, v in attribute_kwargs.items()}
            result = method.attribute(x, target=rows_target, **kwargs)
            value = result.attributions
        elif callable(method):
            value = method(x, rows_target)
        else:
            raise InputTypeError(f"method: an attrib method or a callable f(inputs, target), got {type(method).__name__}")
        if not isinstance(value, Tensor) or value.shape[0] != x.shape[0]:
            raise InputError("method: its attributions must be one tensor with a row per input row")
        return value.detach()

    order = torch.arange(S * B, device=inputs.device)
    example = order // S  # example-major: the S samples of example 0 first
    sample = order % S
    per_row = [target[i] for i in example.tolist()] if isinstance(target, list) else target
    at_x = explain(inputs, target).reshape(B, -1)
    moved = explain(inputs[example] + draws[sample, example], per_row, example).reshape(S * B, -1)
    norm = at_x.norm(dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return ((moved - at_x[example]).norm(dim=1) / norm[example]).view(B, S).amax(1)
