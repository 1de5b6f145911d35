"""``n_steps="auto"`` against uniform steps and the residual bisection: evaluations to a completeness tolerance.

The case of benchmarks/results/conductance.md (its "refine" rows): random VGG16 with random biases
(N(0, 0.05²)), 64 px, a random input, baseline 0, target 3, float32, the conductance of all 13 conv layers at once;
the tolerance is a share of |F(x) − F(x')| and must hold at every layer. There the bisection stopped at its
512-node cap (it keeps every node's activations and gradients) short of 0.1%.

- **auto**: ``LayerConductance(...).attribute(x, n_steps="auto", tolerance=t)``; every run it made is counted.
- **uniform**: ``n_steps = n`` for n on a ladder (powers of two and 1.5x them, 16..2048): the smallest n that
  meets the tolerance (a user who knew it in advance), and what finding it by doubling from 8 costs (8, 16, ...
  each run from scratch, until one meets it).
- **bisect**: ``tolerance=t`` from 8 steps, ``max_steps`` 512 (as in conductance.md) and 1024.

Then the digits CNN (shipped weights, 3 held-out digits, blank baseline, float64, 4 layers), where the exact
conductance exists: auto's per-neuron error against it, beside uniform's at the same evaluations.

    python benchmarks/adaptive_steps.py            # about 15 min on 2 cores
    python benchmarks/adaptive_steps.py --quick    # a smoke run: 32 px, 1% only

Writes benchmarks/results/issue19/adaptive_steps.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import attrib  # noqa: E402
from attrib.models.digits import load_digits_model, preprocess, sample_digits  # noqa: E402
from common import cpu_model  # noqa: E402
from conductance import TARGET, convs, image, vgg16  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "issue19"
LADDER = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]


def worst(res) -> float:
    return max(float(d.abs().max()) for d in res.delta.values())


def timed(fn):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fn()
    return res, time.perf_counter() - start


def vgg_case(size: int, shares: list[float], bisect_caps: list[int]) -> dict:
    model, x = vgg16("random"), image(size)
    layers = convs(model)
    run = attrib.LayerConductance(model, layers)
    coarse = run.attribute(x, target=TARGET, n_steps=8)
    change = abs(float(coarse.outputs - coarse.baseline_outputs))
    # uniform runs do not depend on the auto code: kept between runs of this script (the machine's temp folder)
    cache_file = Path(tempfile.gettempdir()) / f"attrib_adaptive_uniform_{size}_{torch.__version__}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    uniform: dict[int, dict] = {int(n): v for n, v in cache.items() if n.isdigit()}

    def uniform_at(n: int) -> dict:
        if n not in uniform:
            res, seconds = timed(lambda: run.attribute(x, target=TARGET, n_steps=n))
            uniform[n] = {"worst_abs_delta": worst(res), "seconds": seconds, "evaluations": n + 1}
            cache[str(n)] = uniform[n]
            cache_file.write_text(json.dumps(cache))
        print(f"  uniform {n}: {uniform[n]['worst_abs_delta'] / change:.2e} of the change", flush=True)
        return uniform[n]

    out: dict = {"score_change": change, "layers": layers, "size": size, "cases": {}}
    for share in shares:
        tolerance = share * change
        entry: dict = {"tolerance": tolerance, "share": share}
        res, seconds = timed(lambda: run.attribute(x, target=TARGET, n_steps="auto", tolerance=tolerance))
        entry["auto"] = {"evaluations": res.evaluations, "converged": res.info["converged"], "seconds": seconds,
                         "method": res.method,
                         "worst_abs_delta": worst(res), "runs": res.info["runs"], "exact_attempt": res.info["exact_attempt"]}
        print(f"share {share}: auto {res.evaluations} evaluations, {worst(res) / change:.2e}", flush=True)
        meets = {n: uniform_at(n)["worst_abs_delta"] <= tolerance for n in LADDER}
        first = next((n for n in LADDER if meets[n]), None)
        reliable = next((n for i, n in enumerate(LADDER) if all(meets[m] for m in LADDER[i:])), None)
        doubling, n = 0, 8
        while n <= LADDER[-1]:
            doubling += n + 1
            if uniform_at(n)["worst_abs_delta"] <= tolerance:
                break
            n *= 2
        entry["uniform"] = {"first_meeting": first, "evaluations": None if first is None else first + 1,
                            "reliable_from": reliable,
                            "doubling_search_evaluations": doubling if n <= LADDER[-1] else None,
                            "doubling_search_steps": n if n <= LADDER[-1] else None}
        for cap in bisect_caps:  # nor does the bisection: cached with the uniform runs
            key = f"bisect_{share}_{cap}"
            if key not in cache:
                res, seconds = timed(lambda: run.attribute(x, target=TARGET, n_steps=8, tolerance=tolerance, max_steps=cap))
                cache[key] = {"evaluations": res.evaluations, "converged": res.info["converged"],
                              "seconds": seconds, "worst_abs_delta": worst(res)}
                cache_file.write_text(json.dumps(cache))
            entry[f"bisect_{cap}"] = cache[key]
            print(f"  bisect {cap}: {cache[key]}", flush=True)
        out["cases"][str(share)] = entry
    out["uniform"] = {str(n): v for n, v in sorted(uniform.items())}
    return out


def digits_case(shares: list[float]) -> dict:
    torch.set_default_dtype(torch.float64)
    try:
        model = load_digits_model().double().eval()
        raw, labels = sample_digits()
        x, blank = preprocess(raw[:3]).double(), preprocess(torch.zeros_like(raw[:3])).double()
        target = labels[:3]
        layers = ["features.0", "features.5", "features.7", "classifier.0"]
        run = attrib.LayerConductance(model, layers)
        cache_file = Path(tempfile.gettempdir()) / f"attrib_adaptive_digits_exact_{torch.__version__}.pt"
        if cache_file.exists():  # the exact sums take minutes and do not depend on the auto code
            cached = torch.load(cache_file, weights_only=True)
        else:
            exact = run.attribute(x, target=target, baselines=blank, method="exact")
            cached = {"maps": {n: exact[n] for n in layers}, "regions": exact.info["regions"],
                      "change": exact.outputs - exact.baseline_outputs}
            torch.save(cached, cache_file)
        maps = cached["maps"]
        change = float(cached["change"].abs().min())

        def neuron_error(res) -> float:
            return max(float(((res[n] - maps[n]).flatten(1).abs().amax(1) / maps[n].flatten(1).abs().amax(1)).max())
                       for n in layers)

        ladder = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
        uniform = {m: worst(run.attribute(x, target=target, baselines=blank, n_steps=m)) for m in ladder}
        out: dict = {"regions": [int(c) for c in cached["regions"]], "smallest_change": change, "cases": {},
                     "uniform": {str(m): v for m, v in uniform.items()}}
        for share in shares:
            tolerance = share * change
            auto, seconds = timed(lambda: run.attribute(x, target=target, baselines=blank, n_steps="auto", tolerance=tolerance))
            n = auto.n_steps or 0
            same = run.attribute(x, target=target, baselines=blank, n_steps=max(n, 1)) if n else None
            first = next((m for m in ladder if uniform[m] <= tolerance), None)
            reliable = next((m for i, m in enumerate(ladder) if all(uniform[k] <= tolerance for k in ladder[i:])), None)
            out["cases"][str(share)] = {
                "tolerance": tolerance, "auto_evaluations": auto.evaluations, "auto_steps": n, "seconds": seconds,
                "auto_worst_abs_delta": worst(auto), "auto_neuron_error": neuron_error(auto),
                "uniform_same_steps_worst_abs_delta": None if same is None else worst(same),
                "uniform_same_steps_neuron_error": None if same is None else neuron_error(same),
                "uniform_first_meeting": first, "uniform_reliable_from": reliable, "method": auto.method,
                "exact_attempt": auto.info["exact_attempt"], "auto_runs": auto.info["runs"]}
            print(f"digits {share}: {out['cases'][str(share)]}", flush=True)
        return out
    finally:
        torch.set_default_dtype(torch.float32)


def write_markdown(results: dict, path: Path) -> None:
    v = results["vgg16"]
    lines = [
        "# `n_steps=\"auto\"`: evaluations to a completeness tolerance (issue 19, item 5)", "",
        f"{results['machine']}. Generated by `benchmarks/adaptive_steps.py`. Evaluations are model evaluations per "
        "example (auto and bisect: every run they made, the census's forward rows included); seconds are wall time.", "",
        f"## Random VGG16 with random biases, {v['size']} px, all 13 conv layers, float32 "
        f"(|F(x) − F(x')| = {v['score_change']:.4g})", "",
        "| tolerance (share of the change) | auto | uniform: smallest n that meets it | uniform: n from which every n "
        "meets it | uniform: doubling from 8 | bisect, max 512 | bisect, max 1024 |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(e: dict | None) -> str:
        if not e:
            return "—"
        mark = "" if e.get("converged", True) else " (not met)"
        return f"{e['evaluations']}{mark}, {e['worst_abs_delta'] / v['score_change']:.1e}, {e['seconds']:.0f} s"

    for share, e in v["cases"].items():
        u = e["uniform"]
        first = "not met by 2048" if u["first_meeting"] is None else (
            f"{u['evaluations']} (n = {u['first_meeting']}), {v['uniform'][str(u['first_meeting'])]['worst_abs_delta'] / v['score_change']:.1e}")
        doubling = "—" if u["doubling_search_evaluations"] is None else f"{u['doubling_search_evaluations']} (to n = {u['doubling_search_steps']})"
        reliable = "not by 2048" if u.get("reliable_from") is None else f"{u['reliable_from'] + 1} (n = {u['reliable_from']})"
        lines.append(f"| {share} | {cell(e['auto'])} | {first} | {reliable} | {doubling} | {cell(e.get('bisect_512'))} | "
                     f"{cell(e.get('bisect_1024'))} |")
    lines += ["", "Each cell: evaluations, the worst |delta| over the 13 layers as a share of the change, time.", "",
              "How to read it. On a ReLU network the completeness error of n uniform steps is a random walk over the "
              "kinks (σ = √Σr² falls as 1/n, and |delta| is one draw of it), so whether one n meets a tolerance is "
              "chance (in the uniform row below a passing n can be followed by a failing one). The \"smallest n\" column "
              "is known only after the whole ladder has run; a user without it doubles n until it passes (the "
              "\"doubling\" column), or overshoots. auto runs a pilot of 16 steps and then one run sized from its σ "
              "(twice the tolerance's worth of safety), or, when the nodes fit half the memory budget, bisects the "
              "worst steps and checks after every round. The bisection keeps every node's activations and gradients "
              "(about 9 MB per node here), which is why it is capped.", "",
              "auto's runs:", ""]
    for share, e in v["cases"].items():
        runs = ", ".join(f"{r['steps']} steps → {r['worst_abs_delta'] / v['score_change']:.1e}" for r in e["auto"]["runs"])
        lines.append(f"- {share}: {runs}; exact: {e['auto']['exact_attempt']['exact']}")
    lines += ["", "Uniform steps (worst |delta| / change): " + ", ".join(
        f"{n}: {u['worst_abs_delta'] / v['score_change']:.1e}" for n, u in v["uniform"].items()), ""]
    d = results.get("digits")
    if d:
        lines += [f"## Digits CNN (shipped weights), 3 held-out digits, float64, regions {d['regions']}", "",
                  "Tolerance as a share of the smallest |F(x) − F(x')| of the three. Per-neuron error: max over units and "
                  "examples of |C − C_exact| / max |C_exact|, worst of the 4 layers.", "",
                  "| tolerance | auto: evaluations (steps) | auto: worst delta | auto: per-neuron error | uniform, same steps: "
                  "worst delta | uniform, same steps: per-neuron error | uniform: smallest n that meets it | uniform: n "
                  "from which every n meets it |",
                  "|---|---|---|---|---|---|---|---|"]
        for share, c in d["cases"].items():
            same = "—" if c["uniform_same_steps_worst_abs_delta"] is None else f"{c['uniform_same_steps_worst_abs_delta']:.1e}"
            same_n = "—" if c["uniform_same_steps_neuron_error"] is None else f"{c['uniform_same_steps_neuron_error']:.1e}"
            lines.append(f"| {share} | {c['auto_evaluations']} ({c['auto_steps']}, {c['method']}) | {c['auto_worst_abs_delta']:.1e} | "
                         f"{c['auto_neuron_error']:.1e} | {same} | {same_n} | {c['uniform_first_meeting'] or 'not by 4096'} | "
                         f"{c.get('uniform_reliable_from') or 'not by 4096'} |")
        lines += ["", "Uniform steps (worst |delta|, absolute): " + ", ".join(f"{n}: {v:.1e}" for n, v in d["uniform"].items()), ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse-digits", action="store_true", help="keep the digits section of the last results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, Python {platform.python_version()}"}
    if args.quick:
        results["vgg16"] = vgg_case(32, [1e-2], [512])
    else:
        results["vgg16"] = vgg_case(64, [1e-2, 1e-3], [512, 1024])
        previous = RESULTS / "adaptive_steps.json"
        results["digits"] = (json.loads(previous.read_text())["digits"] if args.reuse_digits and previous.exists()
                             else digits_case([1e-3, 1e-4]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "adaptive_steps_quick" if args.quick else "adaptive_steps"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, RESULTS / f"{stem}.md")
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
