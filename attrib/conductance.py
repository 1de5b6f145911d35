"""Conductance (Dhamdhere et al., "How important is a neuron?", ICLR 2019).

Layer conductance of unit j of layer y, Eq. 3, as a Riemann-Stieltjes sum over the path:
``Cond_j = integral dF/dy_j dy_j ~ sum_k G_k (y_j(alpha_{k+1}) - y_j(alpha_k))``.
Neuron conductance, Eq. 2 — input i's attribution through unit j:
``Cond_ij = (x_i - x'_i) integral dF/dy_j dy_j/dx_i dalpha``; a set of units (a filter) sums them.
"""
from __future__ import annotations

import bisect
import math
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import adaptive
from .checks import check_count
from .errors import InputError, InputTypeError
from .exact import (
    DEFAULT_MAX_REGIONS,
    EXACT,
    exact_evaluations,
    exact_info,
    exact_layer_conductance,
    kink_census,
    Regions,
    TooManyRegions,
    check_complete,
    find_regions,
    with_changes,
)
from .hooks import resolve_layers
from .layer_attribution import PathLayerMethod
from .memory import budget_bytes
from .neuron import selected_layer, selections_to_inputs, zero_selections
from .quadrature import (
    STIELTJES,
    check_method,
    stieltjes_rule,
    uniform_nodes,
    weighted_rule,
)
from .result import Attribution
from .sums import StieltjesSum, WeightedSum, step_terms
from .sweep import Chunk, ConvergenceDelta, Differentiate, StraightPath, interpolation_layer
from .targets import selector_weights
from .types import Baselines, Inputs, LayerSpec, NeuronSelector, TargetType


class LayerConductance(PathLayerMethod, ConvergenceDelta):
    """Conductance of every unit of one or more layers, all from one batched forward+backward pass.

    >>> res = LayerConductance(model, ["features.26", "features.28"]).attribute(x, target=3)
    >>> res["features.28"].sum() - (res.outputs - res.baseline_outputs)   # == res.delta["features.28"]

    ``method``: ``"stieltjes_trapezoid"`` (default; see :mod:`attrib.paths`) or one of Captum's five,
    which reproduce Captum's LayerConductance numbers, or ``"exact"`` on piecewise-linear models: the sum over
    the path's linear regions, ``sum_r dF/dy(midpoint) (y(t_r+1) - y(t_r))``, with no quadrature error
    (:mod:`attrib.exact`; ``info["regions"]`` per example). ``tolerance`` (stieltjes_trapezoid only) adds
    nodes until every layer's |delta| is at most ``tolerance`` for every example: ``refine="bisect"``
    splits the steps with the largest completeness residuals first, ``"double"`` halves every step;
    every evaluated node is reused. That mode keeps every node's activations and gradients
    (nodes x B x layer sizes); the plain mode streams with memory independent of ``n_steps``.
    ``n_steps="auto"`` (with ``tolerance``) chooses the nodes: a uniform pilot; the exact sums where a kink census
    shows few linear regions; bisection with reuse while the nodes fit half the memory budget; then streamed runs
    sized and placed from the residuals (:mod:`attrib.adaptive`; ``info["runs"]``, ``info["exact_attempt"]``).

    ``interpolate_at="embedding"`` interpolates that layer's output instead of the inputs (token
    models): every later layer's conductance comes from the same sweep, and the interpolated layer's
    own conductance is its integrated gradients (``baselines`` are inputs, ``layer_baselines`` values
    at the layer; see :class:`~attrib.sweep.StraightPath`).
    """

    def attribute(
        self,
        inputs: Inputs,
        target: TargetType = None,
        baselines: Baselines = None,
        n_steps: int | str = 50,
        method: str = STIELTJES,
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
        attribute_to_layer_input: bool = False,
        additional_forward_args: Any = None,
        tolerance: float | None = None,
        refine: str | None = None,
        max_steps: int = 4096,
        layer_baselines: Baselines = None,
        layer_noise: Tensor | None = None,
        max_regions: int = DEFAULT_MAX_REGIONS,
    ) -> Attribution:
        path = self.path(inputs, baselines, target, additional_forward_args, layer_baselines, layer_noise)
        if method == EXACT:
            if tolerance is not None:
                raise InputError("tolerance: method='exact' has no quadrature error to bound; give one or the other")
            return self._exact(path, attribute_to_layer_input, internal_batch_size, memory_budget, max_regions)
        options = dict(layers=self.layers, attribute_to_layer_input=attribute_to_layer_input,
                       internal_batch_size=internal_batch_size, memory_budget=memory_budget)
        if isinstance(n_steps, str):
            if n_steps != adaptive.AUTO:
                raise InputTypeError(f"n_steps must be an int or 'auto', got {n_steps!r}")
            return self._auto(path, options, method, tolerance, refine, max_steps)
        if refine is not None and tolerance is None:
            raise InputError("refine: it applies to refinement to a tolerance; give tolerance= as well")
        alphas, form = stieltjes_rule(method, n_steps)
        if tolerance is not None:
            return self._refine(path, options, method, n_steps, tolerance, refine or "bisect", max_steps)
        maps, delta, residuals = self._sweep(path, alphas, form, options)
        return Attribution(
            attributions=maps, delta=delta, outputs=path.outputs, baseline_outputs=path.baseline_outputs, method=method,
            n_steps=n_steps, evaluations=alphas.shape[0], info={"step_residuals": residuals},
        )

    def _sweep(self, path: StraightPath, alphas: Tensor, form: str, options: dict
               ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
        """One streamed sweep over ``alphas``: the maps, each layer's delta and its per-step residuals (steps, B)."""
        sums = StieltjesSum(form, alphas.shape[0], path.batch)
        path.evaluate(alphas, sums.add_scores, consume=sums.add_layer, **options)
        maps = path.gather(self.layers, sums.total)
        steps = path.gather(self.layers, sums.step_sums)
        assert sums.step_score_change is not None, "the sweep ran (n_steps >= 1)"
        delta = {name: path.layer_total(maps[name]) - path.change for name in self.layers}
        return maps, delta, {name: _summed(steps[name]) - sums.step_score_change for name in self.layers}

    def _auto(self, path: StraightPath, options: dict, method: str, tolerance: float | None, refine: str | None,
              max_steps: int) -> Attribution:
        """``n_steps="auto"``: a uniform pilot (nodes kept); once, the exact sums if the kink census finds few
        regions; then the worst steps bisected with every node reused while the nodes fit half the memory budget,
        else streamed runs sized and placed from the last run's per-step residuals (:mod:`attrib.adaptive`), until
        every layer's |delta| is at most ``tolerance`` for every example."""
        if tolerance is None:
            raise InputError("n_steps='auto' needs tolerance=: the largest |delta| allowed at any layer")
        if method != STIELTJES:
            raise InputError(f"n_steps='auto' places its own nodes for method='{STIELTJES}', got method={method!r}")
        if refine is not None:
            raise InputError("refine: n_steps='auto' sizes and places its own runs; leave refine out")
        if not (isinstance(tolerance, (int, float)) and tolerance > 0 and math.isfinite(tolerance)):
            raise InputError(f"tolerance must be a positive number, got {tolerance!r}")
        max_steps = check_count("max_steps", max_steps, minimum=adaptive.PILOT)
        runs: list[dict[str, Any]] = []
        attempt: dict[str, Any] = {"exact": "not tried: the pilot run met the tolerance", "evaluations": 0}
        # first reuse: every node kept, the worst steps bisected, the tolerance checked after each round
        store = _NodeStore(path, options)
        store.evaluate(uniform_nodes(adaptive.PILOT))
        room = budget_bytes(path.inputs[0].device, options["memory_budget"]) // 2
        while True:
            sums, residuals = store.step_sums(self.layers)
            delta = {name: total.sum(0) - path.change for name, total in sums.items()}
            steps = len(store.alphas) - 1
            alphas = torch.tensor(store.alphas, dtype=torch.float64)
            columns, worst = _note_run(runs, "kept", delta, residuals)
            if worst <= tolerance or steps >= max_steps:
                return self._auto_result(path, path.gather(self.layers, store.totals()), delta, residuals, alphas,
                                         steps + 1 + attempt["evaluations"], worst <= tolerance, runs, attempt, tolerance)
            chosen = _worst_steps(residuals, steps, max_steps)
            if len(runs) == 1:
                size = adaptive.next_steps(steps, columns, tolerance, max_steps)
                exact = self._try_exact(path, options, alphas, size, attempt)
                if exact is not None:  # few linear regions: the exact sums cost less than the quadrature run
                    exact.evaluations = steps + 1 + attempt["evaluations"]
                    exact.info.update(converged=True, refine=adaptive.AUTO, runs=runs, exact_attempt=attempt)
                    return exact
                needed = adaptive.next_steps(steps, columns, tolerance, max_steps, safety=1.0)
                if store.bytes_per_node() * 2 * needed > room:
                    break  # the nodes it would take do not fit: sized runs, streamed
            elif store.bytes_per_node() * (steps + 1 + len(chosen)) > room:
                break
            store.evaluate([(store.alphas[k] + store.alphas[k + 1]) / 2 for k in chosen])
        # then sized runs, each a fresh streamed sweep: memory independent of the steps
        evaluations = steps + 1 + attempt["evaluations"]
        alphas = adaptive.place(alphas, adaptive.density(alphas, columns), adaptive.next_steps(steps, columns, tolerance, max_steps))
        del store
        while True:
            maps, delta, residuals = self._sweep(path, alphas, "trapezoid", options)
            steps = alphas.shape[0] - 1
            evaluations += steps + 1
            columns, worst = _note_run(runs, "streamed", delta, residuals)
            if worst <= tolerance or steps >= max_steps:
                return self._auto_result(path, maps, delta, residuals, alphas, evaluations, worst <= tolerance, runs,
                                         attempt, tolerance)
            alphas = adaptive.place(alphas, adaptive.density(alphas, columns),
                                    adaptive.next_steps(steps, columns, tolerance, max_steps))

    def _auto_result(self, path: StraightPath, maps: dict[str, Any], delta: dict[str, Tensor], residuals: dict[str, Tensor],
                     alphas: Tensor, evaluations: int, converged: bool, runs: list[dict[str, Any]], attempt: dict[str, Any],
                     tolerance: float) -> Attribution:
        if not converged:
            worst = max(float(d.abs().max()) for d in delta.values())
            warnings.warn(f"tolerance {tolerance} not reached with {alphas.shape[0] - 1} steps (max_steps); worst |delta| "
                          f"{worst:.3g}")
        return Attribution(
            attributions=maps, delta=delta, outputs=path.outputs, baseline_outputs=path.baseline_outputs, method=STIELTJES,
            n_steps=alphas.shape[0] - 1, evaluations=evaluations,
            info={"step_residuals": residuals, "alphas": alphas.tolist(), "converged": converged, "refine": adaptive.AUTO,
                  "runs": runs, "exact_attempt": attempt},
        )

    def _exact(self, path: StraightPath, attribute_to_layer_input: bool, internal_batch_size: int | str | None,
               memory_budget: int | None, max_regions: int) -> Attribution:
        regions = find_regions(path, internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                               max_regions=max_regions, method="LayerConductance")
        return self._exact_sums(path, regions, attribute_to_layer_input, internal_batch_size, memory_budget)

    def _exact_sums(self, path: StraightPath, regions: Regions, attribute_to_layer_input: bool,
                    internal_batch_size: int | str | None, memory_budget: int | None) -> Attribution:
        on = "input" if attribute_to_layer_input else "output"
        totals = exact_layer_conductance(path, regions, self.layers, on, internal_batch_size, memory_budget)
        maps = path.gather(self.layers, totals)
        delta = {name: path.layer_total(maps[name]) - path.change for name in self.layers}
        check_complete(path, delta, "LayerConductance")
        return Attribution(
            attributions=maps, delta=delta, outputs=path.outputs, baseline_outputs=path.baseline_outputs, method=EXACT,
            evaluations=exact_evaluations(regions, 3, path.batch), info=exact_info(regions),
        )

    def _refine(self, path: StraightPath, options: dict, method: str, n_steps: int, tolerance: float, refine: str,
                max_steps: int) -> Attribution:
        if method != STIELTJES:
            raise InputError(f"tolerance: adaptive refinement needs method='{STIELTJES}', got {method!r}")
        if refine not in ("bisect", "double"):
            raise InputError(f"refine must be 'bisect' or 'double', got {refine!r}")
        if not tolerance > 0:
            raise InputError(f"tolerance must be positive, got {tolerance!r}")
        nodes = _NodeStore(path, options)
        nodes.evaluate(uniform_nodes(n_steps))
        change = path.change
        while True:
            sums, residuals = nodes.step_sums(self.layers)
            delta = {name: s.sum(0) - change for name, s in sums.items()}
            worst = max(float(d.abs().max()) for d in delta.values())
            steps = len(nodes.alphas) - 1
            if worst <= tolerance or steps >= max_steps:
                break
            chosen = list(range(steps)) if refine == "double" else _worst_steps(residuals, steps, max_steps)
            nodes.evaluate([(nodes.alphas[k] + nodes.alphas[k + 1]) / 2 for k in chosen])
        converged = worst <= tolerance
        if not converged:
            warnings.warn(f"tolerance {tolerance} not reached with {steps} steps (max_steps); worst |delta| {worst:.3g}")
        return Attribution(
            attributions=path.gather(self.layers, nodes.totals()), delta=delta, outputs=path.outputs, baseline_outputs=path.baseline_outputs,
            method=method, n_steps=steps, evaluations=len(nodes.alphas),
            info={"step_residuals": residuals, "alphas": list(nodes.alphas), "converged": converged, "refine": refine},
        )


    def _try_exact(self, path: StraightPath, options: dict, alphas: Tensor, size: int, note: dict[str, Any]
                   ) -> Attribution | None:
        """The exact sums, where the pilot's nodes see about ``size / 4`` breakpoints per path or fewer (a census of
        the kinks that change side between neighbouring nodes, one graph-free forward) and the search finds at most
        ``size / 2`` linear regions per example: the search takes about 1.7 forward rows per region and the sums
        3, so they cost at most about what the quadrature run of ``size`` steps would. None otherwise, with the
        reason and the evaluations spent noted in ``note``."""
        budget = dict(internal_batch_size=options["internal_batch_size"], memory_budget=options["memory_budget"])
        try:
            seen = kink_census(path, alphas, method="LayerConductance", **budget)
            note["evaluations"] = alphas.shape[0]
            note["breakpoints_seen"] = [int(c) for c in seen.sum(0)]
            if 4 * (1 + int(seen.sum(0).max())) > size:
                note["exact"] = f"not tried: about {1 + int(seen.sum(0).max())} linear regions, against {size} steps"
                return None
            regions = find_regions(path, max_regions=size * path.batch // 2, method="LayerConductance", **budget)
            result = self._exact_sums(path, regions, options["attribute_to_layer_input"], **budget)
        except TooManyRegions as stop:
            note.update(exact=f"stopped: more than {size // 2} linear regions per example",
                        evaluations=note["evaluations"] + -(-stop.evaluations // path.batch))
            return None
        except InputError as refused:  # not piecewise linear, or a hidden product (completeness)
            note["exact"] = f"not used: {refused}"
            return None
        note.update(exact="used", regions=[int(c) for c in regions.counts],
                    evaluations=note["evaluations"] + (result.evaluations or 0))
        return result


def _note_run(runs: list[dict[str, Any]], nodes: str, delta: dict[str, Tensor], residuals: dict[str, Tensor]
              ) -> tuple[Tensor, float]:
    """One run of ``n_steps="auto"`` noted in ``runs``; its residuals as (steps, layers x B) and its worst |delta|."""
    steps = next(iter(residuals.values())).shape[0]
    columns = torch.cat([r.reshape(steps, -1) for r in residuals.values()], 1)
    worst = max(float(d.abs().max()) for d in delta.values())
    runs.append({"steps": steps, "worst_abs_delta": worst, "nodes": nodes,
                 "error_measure": float(adaptive.error_measure(columns).max())})
    return columns, worst


def _worst_steps(residuals: dict[str, Tensor], steps: int, max_steps: int) -> list[int]:
    """The steps to bisect: the largest residuals (worst layer and example) that make up half of their total."""
    badness = torch.stack([r.abs().reshape(steps, -1).amax(1) for r in residuals.values()]).amax(0)  # (steps,)
    order = torch.argsort(badness, descending=True).tolist()
    cumulative = torch.cumsum(badness[order], 0)
    count = int((cumulative < 0.5 * cumulative[-1]).sum()) + 1
    return order[: min(count, max_steps - steps)]


def _summed(value: Any) -> Tensor:
    """A layer's tensor, or the sum of its parts' (n_steps, B) tensors."""
    return torch.stack(value).sum(0) if isinstance(value, tuple) else value


class _NodeStore:
    """Activations, gradients and scores at every evaluated node, kept sorted by alpha.

    Each step's Stieltjes sum is computed once, when both of its ends exist, and cached by the
    step's two alphas, so an iteration costs only the steps it creates.
    """

    def __init__(self, path: StraightPath, options: dict) -> None:
        self.path, self.options = path, options
        self.alphas: list[float] = []
        self.states: list[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]] = []
        self._steps: dict[tuple[float, float], tuple[dict[str, Tensor], Tensor]] = {}

    def evaluate(self, alphas: list[float]) -> None:
        B = self.path.batch
        pieces: list[Chunk] = []
        self.path.evaluate(torch.tensor(alphas, dtype=torch.float64), pieces.append, **self.options)
        scores = torch.cat([c.scores for c in pieces]).view(len(alphas), B)
        values = {n: torch.cat([c.values[n] for c in pieces]) for n in pieces[0].values}
        grads = {n: torch.cat([c.grads[n] for c in pieces]) for n in pieces[0].grads}
        for k, alpha in enumerate(alphas):
            rows = slice(k * B, (k + 1) * B)
            position = bisect.bisect_left(self.alphas, alpha)
            self.alphas.insert(position, alpha)
            self.states.insert(position, (scores[k], {n: v[rows] for n, v in values.items()}, {n: g[rows] for n, g in grads.items()}))

    def _step(self, k: int) -> tuple[dict[str, Tensor], Tensor]:
        """Step k's Stieltjes sum per layer, (B,), and the score change over it."""
        key = (self.alphas[k], self.alphas[k + 1])
        if key not in self._steps:
            (f0, y0, g0), (f1, y1, g1) = self.states[k], self.states[k + 1]
            sums = {name: step_terms("trapezoid", g0[name], g1[name], y0[name], y1[name]).flatten(1).sum(1) for name in y0}
            self._steps[key] = (sums, f1 - f0)
        return self._steps[key]

    def bytes_per_node(self) -> int:
        """What one kept node holds: every layer's activations and gradients, for the whole batch."""
        _, values, grads = self.states[0]
        return sum(t.numel() * t.element_size() for t in (*values.values(), *grads.values()))

    def step_sums(self, layers: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per layer, (steps, B): each step's Stieltjes sum, and that minus the score change."""
        steps = [self._step(k) for k in range(len(self.alphas) - 1)]
        change = torch.stack([c for _, c in steps])
        stacked = {name: torch.stack([s[name] for s, _ in steps]) for name in steps[0][0]}
        stacked = {name: _summed(value) for name, value in self.path.gather(layers, stacked).items()}
        return stacked, {name: s - change for name, s in stacked.items()}

    def totals(self) -> dict[str, Tensor]:
        totals = {name: torch.zeros_like(y) for name, y in self.states[0][1].items()}
        for (_, y0, g0), (_, y1, g1) in zip(self.states[:-1], self.states[1:]):
            for name in totals:
                totals[name] += step_terms("trapezoid", g0[name], g1[name], y0[name], y1[name])
        return totals


class NeuronConductance:
    """Input attribution through selected neurons (Dhamdhere et al. Eq. 2), many selections per call.

    ``neuron_selector``: an index tuple; a tuple with slices (the selected neurons' conductances are
    summed, so ``(c, slice(None), slice(None))`` is filter c); a callable on the layer output giving
    one value per example (its gradient weights the units); or a list of these, in which case
    ``attributions`` gets a leading dimension, one input map per selector. The forward pass is shared;
    each selection costs one backward pass from the layer to the input.

    With ``stieltjes_trapezoid`` (default), ``delta`` is sum over inputs minus the selection's layer
    conductance (same nodes), per selector and example; None for Captum's methods and callables.
    ``method="exact"`` (piecewise-linear models) sums the path's linear regions exactly, and ``delta`` is then
    against the selection's exact layer conductance (:mod:`attrib.exact`).
    ``multiply_by_inputs=False`` leaves out the factor ``x - x'`` (``delta`` stays that of the full maps).
    ``interpolate_at="embedding"`` attributes to that layer's units instead of the inputs (token models).
    Note: for a slice selector Captum multiplies the summed gradient by the gradient of the summed
    neurons, which is not the sum of the neurons' conductances; single neurons agree.

    >>> res = NeuronConductance(model, 'features.28').attribute(x, [(5, 3, 3), (7, slice(None), slice(None))], target=3)
    >>> res.attributions.shape   # (2, *x.shape): one input map per selection
    """

    def __init__(self, model: nn.Module, layer: LayerSpec, multiply_by_inputs: bool = True,
                 interpolate_at: LayerSpec | None = None) -> None:
        self.model = model
        (self.layer, _), = resolve_layers(model, [layer], elements=True)
        self.multiply_by_inputs = multiply_by_inputs
        self.interpolate_at = interpolation_layer(model, interpolate_at)

    def attribute(
        self,
        inputs: Inputs,
        neuron_selector: NeuronSelector | list[NeuronSelector],
        target: TargetType = None,
        baselines: Baselines = None,
        n_steps: int = 50,
        method: str = STIELTJES,
        internal_batch_size: int | str | None = "auto",
        memory_budget: int | None = None,
        attribute_to_neuron_input: bool = False,
        additional_forward_args: Any = None,
        layer_baselines: Baselines = None,
        layer_noise: Tensor | None = None,
        max_regions: int = DEFAULT_MAX_REGIONS,
    ) -> Attribution:
        path = StraightPath(self.model, inputs, baselines, target, additional_forward_args,
                            interpolate_at=self.interpolate_at, layer_baselines=layer_baselines, layer_noise=layer_noise)
        exact = method == EXACT
        if not exact:
            check_method(method)
        selectors = neuron_selector if isinstance(neuron_selector, list) else [neuron_selector]
        if not selectors:
            raise InputError("neuron_selector: the list is empty")
        layer = self.layer
        keys = [[f"<selector {i}> {key}" for key in path.keys] for i in range(len(selectors))]
        differentiate = _through_selectors(layer, selectors, path.keys, keys)
        info: dict[str, Any] = {}
        conductance: Tensor | None
        if exact:
            regions = find_regions(path, internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                                   max_regions=max_regions, method="NeuronConductance")
            totals, conductance = self._exact(path, regions, keys, differentiate, attribute_to_neuron_input,
                                              internal_batch_size, memory_budget)
            evaluations, info = exact_evaluations(regions, 3, path.batch), exact_info(regions)
        else:
            alphas, weights = weighted_rule(method, n_steps)
            integral = WeightedSum(weights, path.batch)
            layer_sum = StieltjesSum("trapezoid", alphas.shape[0], path.batch)

            def add(chunk: Chunk) -> None:
                integral.add(chunk, {key: chunk.grads[key] for row in keys for key in row})
                if method == STIELTJES:
                    layer_sum.add(chunk, [layer])

            path.evaluate(
                alphas, add, layers=[layer], attribute_to_layer_input=attribute_to_neuron_input, input_grad=True,
                internal_batch_size=internal_batch_size, memory_budget=memory_budget, differentiate=differentiate,
            )
            totals, evaluations = integral.total, alphas.shape[0]
            conductance = layer_sum.total.get(layer) if method == STIELTJES else None
        per_input = [torch.stack([totals[row[j]] * d for row in keys]) for j, d in enumerate(path.differences)]
        local = [torch.stack([totals[row[j]] for row in keys]) for j in range(len(path.keys))]
        delta = None
        if conductance is not None and not any(callable(s) for s in selectors):
            totals_per_input = torch.stack([maps.reshape(len(selectors), path.batch, -1).sum(2) for maps in per_input])
            delta = totals_per_input.sum(0) - conductance_totals(conductance, selectors)
        chosen = per_input if self.multiply_by_inputs else local
        if not isinstance(neuron_selector, list):
            chosen = [m[0] for m in chosen]
            delta = None if delta is None else delta[0]
        maps = path.as_given(chosen)
        if exact and delta is not None and conductance is not None:
            check_complete(path, delta, "NeuronConductance", against=conductance_totals(conductance, selectors))
        return Attribution(
            attributions=maps, delta=delta, outputs=path.outputs, baseline_outputs=path.baseline_outputs,
            method=method, n_steps=None if exact else n_steps, evaluations=evaluations, info=info,
        )

    def _exact(self, path: StraightPath, regions: Regions, keys: list[list[str]], differentiate: Differentiate,
               attribute_to_neuron_input: bool, internal_batch_size: int | str | None, memory_budget: int | None
               ) -> tuple[dict[str, Tensor], Tensor]:
        """Per selector key, ``sum_r l_r dF/dx through the selection`` at the midpoints; and the layer's exact
        conductance (for delta)."""
        layer = self.layer
        totals: dict[str, Tensor] = {}
        conductance: list[Tensor] = []

        def work(group: slice, change: dict[str, Tensor]) -> None:
            integral = WeightedSum(regions.lengths[group], path.batch)

            def add(chunk: Chunk) -> None:
                integral.add(chunk, {key: chunk.grads[key] for row in keys for key in row})
                term = chunk.grads[layer] * change[layer][chunk.node]
                conductance.append(term.new_zeros((path.batch,) + term.shape[1:]).index_add_(0, chunk.example, term))
            path.evaluate(regions.midpoints[group], add, layers=[layer], attribute_to_layer_input=attribute_to_neuron_input,
                          input_grad=True, examples=regions.example[group], internal_batch_size=None,
                          differentiate=differentiate)
            for key, value in integral.total.items():
                totals[key] = totals[key] + value if key in totals else value

        with_changes(path, regions, [layer], "input" if attribute_to_neuron_input else "output", internal_batch_size,
                     memory_budget, work)
        return totals, torch.stack(conductance).sum(0)


def conductance_totals(conductance: Tensor, selectors: list) -> Tensor:
    """The selections' layer conductance per selector and example, (K, B)."""
    return torch.stack([(conductance * selector_weights(s, conductance)).reshape(conductance.shape[0], -1).sum(1)
                        for s in selectors])


def _through_selectors(layer: str, selectors: list, inputs: Sequence[str], keys: list[list[str]]) -> Differentiate:
    """dF/d(layer), and under ``keys[i][j]`` dF/d(input j) through selector i's units of the layer
    only: one backward pass to the layer, then one per selector from the layer to the inputs."""
    def differentiate(scores: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        value = selected_layer(tensors, layer)
        interpolated = [tensors[key] for key in inputs]
        if not (scores.requires_grad and value.requires_grad):
            return {layer: torch.zeros_like(value), **zero_selections(interpolated, keys)}
        upstream, = torch.autograd.grad(scores.sum(), value, retain_graph=True)
        return {layer: upstream, **selections_to_inputs(value, interpolated, selectors, keys, upstream)}
    return differentiate
