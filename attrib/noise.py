"""Noise tunnels around any attribution method: SmoothGrad, SmoothGrad² and VarGrad (Smilkov et al.,
2017; Adebayo et al., 2018), and GradientSHAP (Lundberg & Lee, 2017) as a noise tunnel with baselines
drawn from a distribution.

Every example is repeated ``nt_samples`` times (example-major: row ``e * S + s`` is sample ``s`` of
example ``e``, Captum's order), noise is added, and the wrapped method runs once on the whole
expanded batch, so noise samples x integration steps are one step-major sweep, chunked to the memory
budget like any other. Targets, per-example baselines and per-example forward arguments are repeated
the same way. ``nt_samples_batch_size`` splits the samples into several such calls (the sweep's
chunking already bounds memory; this only bounds the expanded inputs themselves).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .checks import as_args, check_count, check_input_tuple, check_model
from .errors import InputError, InputTypeError
from .result import Attribution
from .sweep import layer_output
from .targets import normalize_target
from .types import Inputs

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")
STDEV_MODES = ("absolute", "range")


def _stdevs(stdevs: Any, count: int) -> tuple[float, ...]:
    values = stdevs if isinstance(stdevs, tuple) else (stdevs,) * count
    if len(values) != count:
        raise InputError(f"stdevs: {len(values)} given for {count} inputs; give one number or one per input")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InputError(f"stdevs must be numbers >= 0, got {stdevs!r}")
    return tuple(float(v) for v in values)


def noise_scale(x: Tensor, stdev: float, stdev_mode: str) -> Tensor:
    """The noise's standard deviation per example, (B,): ``stdev`` itself (``"absolute"``) or
    ``stdev * (max - min)`` of that example (``"range"``)."""
    if stdev_mode == "absolute":
        return x.new_full((x.shape[0],), stdev)
    spread = x.reshape(x.shape[0], -1)
    return (spread.amax(1) - spread.amin(1)) * stdev


def draw_noise(x: Tensor, samples: int, sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``N(0, sigma_e^2)`` for ``samples`` copies of each example, (B * samples, ...), example-major.
    Drawn as ``torch.normal`` over the expanded shape in the default float dtype (Captum's draw, so
    that a seeded run reproduces Captum's NoiseTunnel numbers), then cast to the input's dtype."""
    shape = (x.shape[0] * samples,) + tuple(x.shape[1:])
    device = generator.device if generator is not None else x.device
    std = sigma.to(device=device, dtype=torch.get_default_dtype()).repeat_interleave(samples)
    std = std.view((-1,) + (1,) * (x.dim() - 1)).expand(shape).contiguous()
    return torch.normal(torch.zeros_like(std), std, generator=generator).to(device=x.device, dtype=x.dtype)


def _repeat(value: Any, n: int, samples: int) -> Any:
    """A per-example tensor (first dimension ``n``) repeated ``samples`` times per example; others as is."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.repeat_interleave(samples, 0)
    return value


def expand_options(options: dict[str, Any], n: int, samples: int) -> dict[str, Any]:
    """``target``, ``baselines`` and ``additional_forward_args`` for the expanded batch."""
    expanded = dict(options)
    if "target" in options:
        target = normalize_target(options["target"], n)
        expanded["target"] = [t for t in target for _ in range(samples)] if isinstance(target, list) else target
    for name in ("baselines", "layer_baselines"):
        if options.get(name) is not None:
            baselines = options[name]
            expanded[name] = (tuple(_repeat(b, n, samples) for b in baselines) if isinstance(baselines, tuple)
                              else _repeat(baselines, n, samples))
    if options.get("additional_forward_args") is not None:
        expanded["additional_forward_args"] = tuple(_repeat(a, n, samples) for a in as_args(options["additional_forward_args"]))
    return expanded


class _Moments:
    """Sums of attributions and of their squares over samples, per example, for any result shape
    (a tensor, a tuple of tensors, a dict of either), with the batch at ``batch_dim``."""

    def __init__(self, n: int, batch_dim: int) -> None:
        self.n, self.batch_dim = n, batch_dim
        self.first: Any = None
        self.second: Any = None

    def _per_example(self, t: Tensor, power: int) -> Tensor:
        d = self.batch_dim
        grouped = t.reshape(t.shape[:d] + (self.n, -1) + t.shape[d + 1:])
        return grouped.pow(power).sum(d + 1) if power > 1 else grouped.sum(d + 1)

    def _map(self, f: Callable[..., Tensor], *values: Any) -> Any:
        head = values[0]
        if isinstance(head, dict):
            return {k: self._map(f, *(v[k] for v in values)) for k in head}
        if isinstance(head, tuple):
            return tuple(self._map(f, *parts) for parts in zip(*values))
        return f(*values)

    def add(self, attributions: Any) -> None:
        first = self._map(lambda t: self._per_example(t, 1), attributions)
        second = self._map(lambda t: self._per_example(t, 2), attributions)
        if self.first is None:
            self.first, self.second = first, second
        else:
            self.first = self._map(torch.add, self.first, first)
            self.second = self._map(torch.add, self.second, second)

    def reduce(self, nt_type: str, samples: int) -> Any:
        mean = self._map(lambda t: t / samples, self.first)
        if nt_type == "smoothgrad":
            return mean
        square = self._map(lambda t: t / samples, self.second)
        if nt_type == "smoothgrad_sq":
            return square
        return self._map(lambda sq, m: sq - m * m, square, mean)


def _per_sample(value: Any, n: int) -> Any:
    """A (B * S,) vector, or a dict of them, as (B, S)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v.reshape(n, -1) for k, v in value.items()}
    return value.reshape(value.shape[:-1] + (n, -1)) if value.dim() > 1 else value.reshape(n, -1)


class NoiseTunnel:
    """Average a method's attributions over noisy copies of the inputs (any method of attrib).

    ``nt_type``: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares) or ``"vargrad"``
    (variance). ``stdevs`` (one number, or one per input) is the noise's standard deviation: absolute
    by default, Captum's meaning, so a Captum user gets the same numbers; ``stdev_mode="range"`` makes
    it a fraction of each example's input range (the SmoothGrad paper's 10-20 %, the default of
    :class:`attrib.SmoothGrad`). The other keyword arguments go to the wrapped method. For
    ``"smoothgrad"``, ``delta`` is the mean of the samples' deltas, which is the averaged map's
    completeness error against the averaged score change; ``info["sample_deltas"]`` holds them all,
    (B, nt_samples). Layers a method records beside its map (LRP's ``layers``) are smoothed the same way;
    the wrapped method's other ``info`` is not kept. ``generator`` makes the noise reproducible.
    Around a method that interpolates at a layer (``interpolate_at``, token models), the noise is added
    to that layer's value at the inputs (the embeddings), not to the inputs, and ``stdevs`` is one number.

    >>> nt = NoiseTunnel(IntegratedGradients(model))
    >>> res = nt.attribute(x, nt_type="smoothgrad", nt_samples=10, stdevs=0.1, target=3, n_steps=50)
    >>> res.attributions.shape == x.shape, res.delta     # the mean map, and its completeness error
    """

    def __init__(self, method: Any) -> None:
        if not callable(getattr(method, "attribute", None)):
            raise InputTypeError(f"method must be an attribution method (with .attribute), got {type(method).__name__}")
        self.method = method
        self.model = getattr(method, "model", None)

    def attribute(
        self,
        inputs: Inputs,
        nt_type: str = "smoothgrad",
        nt_samples: int = 5,
        nt_samples_batch_size: int | None = None,
        stdevs: float | tuple[float, ...] = 1.0,
        stdev_mode: str = "absolute",
        draw_baseline_from_distrib: bool = False,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> Attribution:
        layer = getattr(self.method, "interpolate_at", None)
        if self.model is not None:
            check_model(self.model)
            checked, single = check_input_tuple(self.model, inputs, differentiable=layer is None)
        else:
            checked, single = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs), isinstance(inputs, Tensor)
        if nt_type not in NT_TYPES:
            raise InputError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}")
        if stdev_mode not in STDEV_MODES:
            raise InputError(f"stdev_mode must be one of {STDEV_MODES}, got {stdev_mode!r}")
        samples = check_count("nt_samples", nt_samples)
        per_call = samples if nt_samples_batch_size is None else min(samples, check_count("nt_samples_batch_size", nt_samples_batch_size))
        n = checked[0].shape[0]
        noised = checked
        if layer is not None:  # the noise goes on the interpolated layer's value at the inputs
            assert self.model is not None, "a method that interpolates at a layer has a model"
            if "layer_noise" in options:
                raise InputError("layer_noise: the noise tunnel draws the noise at the interpolated layer itself; leave it out")
            if isinstance(stdevs, tuple) and len(stdevs) != 1:
                raise InputError(f"stdevs: the noise goes on layer {layer!r} (interpolate_at), not on each input; give one "
                                 f"number, got {len(stdevs)}")
            noised = (layer_output(self.model, layer, checked, as_args(options.get("additional_forward_args")), n),)
        sigmas = [noise_scale(x, s, stdev_mode) for x, s in zip(noised, _stdevs(stdevs, len(noised)))]
        batch_dim = 1 if isinstance(options.get("neuron_selector"), list) else 0
        moments, layer_moments = _Moments(n, batch_dim), _Moments(n, batch_dim)
        results = []
        for start in range(0, samples, per_call):
            count = min(per_call, samples - start)
            expanded = expand_options(options, n, count)
            if layer is None:
                noisy = tuple(x.repeat_interleave(count, 0) + draw_noise(x, count, sigma, generator)
                              for x, sigma in zip(checked, sigmas))
            else:
                noisy = tuple(x.repeat_interleave(count, 0) for x in checked)
                expanded["layer_noise"] = draw_noise(noised[0], count, sigmas[0], generator)
            if draw_baseline_from_distrib:
                expanded["baselines"] = _draw_baselines(options.get("baselines"), n * count, generator)
            result = self.method.attribute(noisy[0] if single else noisy, **expanded)
            moments.add(result.attributions)
            if result.layers:
                layer_moments.add(result.layers)
            # only what the summary needs is kept: the maps are already in the moments
            results.append(Attribution(attributions=(), delta=result.delta, outputs=result.outputs,
                                       baseline_outputs=result.baseline_outputs, method=result.method,
                                       n_steps=result.n_steps, evaluations=result.evaluations))
            del result
        summary = self._result(results, moments.reduce(nt_type, samples), nt_type, n, samples, sigmas, single or layer is not None)
        if layer_moments.first is not None:
            summary.layers = layer_moments.reduce(nt_type, samples)
        return summary

    def _result(self, results: list[Attribution], attributions: Any, nt_type: str, n: int, samples: int,
                sigmas: list[Tensor], single: bool) -> Attribution:
        def joined(field: str) -> Any:
            values = [getattr(r, field) for r in results]
            if values[0] is None:
                return None
            if isinstance(values[0], dict):
                return {k: torch.cat([_per_sample(v[k], n) for v in values], -1) for k in values[0]}
            return torch.cat([_per_sample(v, n) for v in values], -1)

        sample_deltas, outputs, baseline_outputs = joined("delta"), joined("outputs"), joined("baseline_outputs")

        def mean(value: Any) -> Any:
            if value is None:
                return None
            return {k: v.mean(-1) for k, v in value.items()} if isinstance(value, dict) else value.mean(-1)

        first = results[0]
        return Attribution(
            attributions=attributions, delta=mean(sample_deltas) if nt_type == "smoothgrad" else None,
            outputs=mean(outputs), baseline_outputs=mean(baseline_outputs), method=f"{nt_type}:{first.method}",
            n_steps=first.n_steps, evaluations=None if first.evaluations is None else first.evaluations * samples,
            info={"nt_samples": samples, "sigma": sigmas[0] if single else tuple(sigmas), "sample_deltas": sample_deltas,
                  "sample_outputs": outputs},
        )


def _draw_baselines(baselines: Any, rows: int, generator: torch.Generator | None) -> Any:
    """One baseline per row, drawn uniformly from the distribution's examples (one tensor, or one per input)."""
    if baselines is None:
        raise InputError("baselines: draw_baseline_from_distrib needs a tensor of baseline examples (N, ...)")
    parts = baselines if isinstance(baselines, tuple) else (baselines,)
    if not all(isinstance(b, Tensor) and b.dim() > 0 for b in parts):
        raise InputTypeError("baselines: a baseline distribution is a tensor of N examples (or one such tensor per input)")
    count = parts[0].shape[0]
    if any(b.shape[0] != count for b in parts):
        raise InputError(f"baselines: every input's distribution needs the same number of examples, got {[b.shape[0] for b in parts]}")
    device = generator.device if generator is not None else parts[0].device
    index = torch.randint(count, (rows,), generator=generator, device=device).to(parts[0].device)
    drawn = tuple(b[index] for b in parts)
    return drawn if isinstance(baselines, tuple) else drawn[0]
