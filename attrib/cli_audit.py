"""What ``attrib audit`` adds to its completeness table: the exact integrals (piecewise-linear models) and the
faithfulness scorecard.

**Exact rows.** Where the model is piecewise linear, the path's linear regions are found once and give exact
integrated gradients and exact conductance at every audited layer (:mod:`attrib.exact`). Each method's maps at the
audit's ``--n-steps`` are compared with them unit by unit: the per-neuron error is
``max_j |C_j - C_j_exact| / max_j |C_j_exact|``, a check against ``--tolerance``. The n_steps each method needs for
1% and 0.1% are found by doubling from 8 to ``MAX_STEPS``.

**Scorecard.** Per input method (integrated gradients, saliency, input x gradient, DeepLIFT, LRP): deletion and
insertion AUC (most relevant pixel first, filled with the baseline), infidelity and max-sensitivity
(:mod:`attrib.faithfulness`); and per layer method the randomisation check (:func:`attrib.evaluate.sanity_check` at
the last audited layer: Spearman correlation with the map after randomising the whole model from the top down).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .cli_common import _check
from .errors import InputError

TARGETS = (0.01, 0.001)
FIRST_STEPS, MAX_STEPS = 8, 1024
SCORECARD_STEPS = 16  # points of the deletion / insertion curves


def neuron_error(approx: Tensor, exact: Tensor) -> float:
    """``max_j |approx_j - exact_j| / max_j |exact_j|`` over all units (and examples)."""
    scale = float(exact.abs().max())
    return float((approx - exact).abs().max()) / scale if scale > 0 else float((approx - exact).abs().max())


def steps_needed(run: Callable[[int], Tensor], exact: Tensor) -> dict[float, int | None]:
    """The smallest n_steps (doubling from FIRST_STEPS) whose per-neuron error is at most each target; None past MAX_STEPS."""
    found: dict[float, int | None] = {t: None for t in TARGETS}
    n = FIRST_STEPS
    while n <= MAX_STEPS and any(v is None for v in found.values()):
        error = neuron_error(run(n), exact)
        for target in TARGETS:
            if found[target] is None and error <= target:
                found[target] = n
        n *= 2
    return found


def exact_audit(model: Any, x: Tensor, base: Tensor, target: int, layers: list[str], ig_map: Tensor,
                conductance: Any, n_steps: int, tolerance: float, max_regions: int) -> tuple[list[dict], list[str]]:
    """(check rows, lines to print): the exact sums' completeness, each method's per-neuron error against them at
    ``n_steps``, and the n_steps needed for 1% / 0.1%; one line saying why where the model is not piecewise linear."""
    from . import IntegratedGradients, LayerConductance
    from .exact import exact_input_integral, exact_layer_conductance, find_regions
    from .sweep import StraightPath

    path = StraightPath(model, x, base, target)
    try:
        regions = find_regions(path, max_regions=max_regions, method="LayerConductance")
    except InputError as error:
        reason = str(error).replace("max_regions:", "--exact-max-regions:")
        return [], [f"exact: skipped ({reason})"]
    change = float(path.change[0])
    total = exact_input_integral(path, regions, "auto", None)
    exact = {"input": total[path.keys[0]] * path.differences[0]}
    exact.update(exact_layer_conductance(path, regions, layers, "output", "auto", None))
    rows = [_check("exact integrated gradients", "input", float(exact["input"].sum()), change, "F(x) - F(x')", tolerance)]
    rows += [_check("exact conductance", name, float(exact[name].sum()), change, "F(x) - F(x')", tolerance)
             for name in layers if name in exact and torch.is_tensor(exact[name])]
    for row in rows:
        row["note"] = "exact sums over the path's linear regions: completeness up to rounding when they are right"
    ig = IntegratedGradients(model)
    lc = LayerConductance(model, layers)
    compared = [("integrated gradients", "input", neuron_error(ig_map, exact["input"]))]
    compared += [("layer conductance", name, neuron_error(conductance[name], exact[name])) for name in layers if name in exact]
    for method, where, distance in compared:
        rows.append({"method": f"{method} vs exact", "where": where, "value": distance, "reference": 0.0,
                     "reference_name": "exact", "relative_error": distance, "tolerance": tolerance, "passed": distance <= tolerance,
                     "note": f"per-neuron error at n_steps={n_steps}: the worst unit's distance from the exact integral, "
                             "relative to the largest exact attribution of that layer"})
    lines = [f"exact: {int(regions.counts[0])} linear regions on the path ({regions.evaluations} forward rows to find them)"]
    ig_needed = steps_needed(lambda n: ig.attribute(x, target=target, baselines=base, n_steps=n).attributions, exact["input"])
    lines.append(f"  n_steps for a per-neuron error of 1% / 0.1%: integrated gradients (gausslegendre) {_steps(ig_needed)}")
    per_layer: dict[int, dict] = {}

    def conductance_at(n: int) -> dict:
        if n not in per_layer:
            per_layer[n] = lc.attribute(x, target=target, baselines=base, n_steps=n).attributions
        return per_layer[n]
    for name in layers:
        if name in exact:
            needed = steps_needed(lambda n: conductance_at(n)[name], exact[name])
            lines.append(f"  layer conductance (stieltjes_trapezoid) @ {name}: {_steps(needed)}")
    return rows, lines


def _steps(found: dict[float, int | None]) -> str:
    return " / ".join(str(found[t]) if found[t] is not None else f"> {MAX_STEPS}" for t in TARGETS)


def scorecard(model: Any, x: Tensor, base: Tensor, target: int, composite: Any, n_steps: int,
              generator_seed: int = 0) -> list[dict]:
    """One row per input method: deletion / insertion AUC (pixels, most relevant first, filled with the baseline),
    infidelity (16 Gaussian perturbations, sd 0.1 of the input's sd) and max-sensitivity (8 draws, radius 0.02 of
    the input's range), both seeded."""
    from . import DeepLift, InputXGradient, IntegratedGradients, Saliency
    from .faithfulness import infidelity, max_sensitivity, perturbation_curve
    from .lrp import LRP

    one = base  # repeated with the perturbed copies' rows by max_sensitivity
    methods: dict[str, tuple[Any, dict]] = {
        "integrated gradients": (IntegratedGradients(model), dict(baselines=one, n_steps=n_steps)),
        "saliency": (Saliency(model), {}),
        "input x gradient": (InputXGradient(model), {}),
        "DeepLIFT": (DeepLift(model), dict(baselines=one)),
        "LRP": (LRP(model, composite), {}),
    }
    spread = float(x.std()) or 1.0
    width = float(x.max() - x.min()) or 1.0
    rows = []
    for name, (method, kwargs) in methods.items():
        attributions = method.attribute(x, target=target, **kwargs).attributions.detach()
        deletion = perturbation_curve(model, x, attributions, target, mode="deletion", fill=base, steps=SCORECARD_STEPS)
        insertion = perturbation_curve(model, x, attributions, target, mode="insertion", fill=base, steps=SCORECARD_STEPS)
        generator = torch.Generator().manual_seed(generator_seed)
        rows.append({
            "method": name, "deletion_auc": float(deletion.auc[0]), "insertion_auc": float(insertion.auc[0]),
            "deletion_curve": deletion.scores[0].tolist(), "insertion_curve": insertion.scores[0].tolist(),
            "fractions": deletion.fractions.tolist(),
            "infidelity": float(infidelity(model, x, attributions, target, n_samples=16, noise_scale=0.1 * spread,
                                           generator=generator)[0]),
            "max_sensitivity": float(max_sensitivity(method, x, target, n_samples=8, radius=0.02 * width,
                                                     generator=generator, **kwargs)[0]),
        })
    return rows


def randomisation(model: Any, x: Tensor, layer: str, target: int, n_steps: int) -> dict[str, float]:
    """Per layer method, the mean Spearman correlation of its map at ``layer`` with the map after every layer of the
    model is randomised, top down (Adebayo et al.'s cascade; near 0 is what a method that reads the model gives)."""
    from .evaluate import sanity_check

    return {method: steps[-1][1] for method, steps in sanity_check(model, x, layer, target, n_steps=n_steps).items()}


def print_scorecard(picture: str, rows: list[dict]) -> None:
    print(f"faithfulness of {picture} (deletion AUC: lower is better; insertion AUC: higher; infidelity and "
          "max-sensitivity: lower)")
    print(f"  {'method':<22} {'deletion':>9} {'insertion':>9} {'infidelity':>11} {'max-sens.':>9}")
    for row in rows:
        print(f"  {row['method']:<22} {row['deletion_auc']:>9.3f} {row['insertion_auc']:>9.3f} {row['infidelity']:>11.3e} "
              f"{row['max_sensitivity']:>9.3f}")
