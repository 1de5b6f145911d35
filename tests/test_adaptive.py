"""``n_steps="auto"``: runs sized and placed from the per-step residuals (attrib.adaptive), or the exact sums."""
import math
import warnings

import pytest
import torch
from conftest import make_cnn
from torch import nn

import attrib
from attrib import adaptive
from attrib.errors import InputError, InputTypeError
from attrib.exact import kink_census, linear_regions


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3)).double().eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.5)
    x = 2 * torch.randn(2, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x, -x


def _stieltjes_by_hand(model, layer, x, baseline, target, alphas):
    """sum_k (g_k + g_k+1)/2 (y_k+1 - y_k) at the given nodes, one node at a time (dense re-implementation)."""
    ys, gs = [], []
    for a in alphas.tolist():
        seen = {}
        handle = model[int(layer)].register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
        out = model(baseline + a * (x - baseline))
        handle.remove()
        y = seen["y"]
        (g,) = torch.autograd.grad(out[:, target].sum(), y)
        ys.append(y.detach())
        gs.append(g)
    return sum(0.5 * (gs[k] + gs[k + 1]) * (ys[k + 1] - ys[k]) for k in range(len(ys) - 1))


@pytest.mark.parametrize("budget", [None, 200_000])
def test_auto_meets_the_tolerance_with_its_own_nodes_and_counts_every_evaluation(budget):
    """With room for the nodes it bisects the worst steps, reusing every node; with a memory budget too small for
    them (2 x 128 x 8 bytes per node here) it streams runs sized and placed from the residuals."""
    model, x, baseline = _mlp()
    run = attrib.LayerConductance(model, ["0", "2"])
    tolerance = 1e-3
    res = run.attribute(x, target=1, baselines=baseline, n_steps="auto", tolerance=tolerance, memory_budget=budget)
    attempt, runs = res.info["exact_attempt"], res.info["runs"]
    assert res.method == "stieltjes_trapezoid" and res.info["converged"] and len(runs) >= 2
    regions = linear_regions(model, x, baseline, target=1).counts
    assert attempt["exact"].startswith("not tried") and 4 * max(regions) > runs[1]["steps"]  # exact would cost more
    assert all(0 < seen < int(r) for seen, r in zip(attempt["breakpoints_seen"], regions))  # coarse nodes miss some
    kept = [r for r in runs if r["nodes"] == "kept"]
    streamed = [r for r in runs if r["nodes"] == "streamed"]
    assert (len(kept), bool(streamed)) == ((1, True) if budget else (len(runs), False))
    # the kept nodes count once (the last round holds them all), every streamed run in full, and the census
    assert res.evaluations == kept[-1]["steps"] + 1 + sum(r["steps"] + 1 for r in streamed) + attempt["evaluations"]
    assert res.n_steps == runs[-1]["steps"] == len(res.info["alphas"]) - 1
    with torch.no_grad():
        change = model(x)[:, 1] - model(baseline)[:, 1]
    for name in ["0", "2"]:  # completeness to the tolerance, at every layer and example (the axiom it promises)
        assert float((res[name].sum(1) - change).abs().max()) <= tolerance
        assert torch.allclose(res.delta[name], res[name].sum(1) - change, rtol=0, atol=1e-12)
    # the nodes are not uniform, and the sums are the Stieltjes trapezoid at exactly those nodes
    alphas = torch.tensor(res.info["alphas"], dtype=torch.float64)
    steps = alphas[1:] - alphas[:-1]
    assert float(steps.max() / steps.min()) > 1.05
    by_hand = _stieltjes_by_hand(model, "2", x, baseline, 1, alphas)
    assert torch.allclose(res["2"], by_hand, rtol=1e-10, atol=1e-13)
    assert runs[0]["steps"] == adaptive.PILOT and runs[0]["worst_abs_delta"] > tolerance


def test_auto_uses_the_exact_sums_where_the_path_has_few_regions():
    model, x, baseline = _mlp()
    run = attrib.LayerConductance(model, ["0", "2"])
    res = run.attribute(x, target=1, baselines=baseline, n_steps="auto", tolerance=1e-5)
    exact = run.attribute(x, target=1, baselines=baseline, method="exact")
    assert res.method == "exact" and res.info["exact_attempt"]["exact"] == "used"
    assert res.info["exact_attempt"]["regions"] == [int(c) for c in linear_regions(model, x, baseline, target=1).counts]
    for name in ["0", "2"]:
        assert torch.equal(res[name], exact[name])
        assert float(res.delta[name].abs().max()) < 1e-12
    assert res.evaluations == adaptive.PILOT + 1 + res.info["exact_attempt"]["evaluations"]


def test_auto_on_a_smooth_model_streams_a_run_sized_at_second_order():
    model = make_cnn(1, nn.Softplus, pool=nn.AvgPool2d)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    baseline = torch.full_like(x, 0.3)
    res = attrib.LayerConductance(model, ["0", "3"]).attribute(x, target=2, baselines=baseline, n_steps="auto",
                                                               tolerance=1e-9, memory_budget=10_000)
    assert res.info["converged"] and max(float(d.abs().max()) for d in res.delta.values()) <= 1e-9
    assert "not used" in res.info["exact_attempt"]["exact"] and "Softplus" in res.info["exact_attempt"]["exact"]
    # second order: one streamed run after the pilot, far fewer steps than first order would ask for
    pilot = res.info["runs"][0]
    assert [r["nodes"] for r in res.info["runs"]] == ["kept", "streamed"]
    assert res.n_steps < adaptive.PILOT * adaptive.SAFETY * pilot["error_measure"] / 1e-9 / 10


def test_next_steps_by_hand():
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(64, 3, dtype=torch.float64, generator=generator) * 1e-4  # kinks: uncorrelated residuals
    assert torch.equal(adaptive.error_measure(noisy), torch.maximum(noisy.sum(0).abs(), noisy.pow(2).sum(0).sqrt()))
    sigma = noisy.pow(2).sum(0).sqrt()  # a random walk's scale: first order
    wanted = math.ceil(float((64 * adaptive.SAFETY * sigma / 1e-5).max()))
    assert adaptive.next_steps(64, noisy, 1e-5, 10**6) == wanted
    smooth = torch.full((64, 1), 2e-6, dtype=torch.float64) * torch.linspace(1, 2, 64, dtype=torch.float64).unsqueeze(1)
    s = float(smooth.sum())
    assert adaptive.next_steps(64, smooth, 1e-6, 10**6) == math.ceil(64 * math.sqrt(adaptive.SAFETY * s / 1e-6))
    assert adaptive.next_steps(64, smooth, 1e-6, 200) == 200  # max_steps
    assert adaptive.next_steps(64, smooth * 1e-9, 1e-6, 10**6) == 96  # at least 1.5x a run that missed


def test_density_and_placement_by_hand():
    alphas = torch.linspace(0, 1, 41, dtype=torch.float64)
    flat = torch.ones(40, 2, dtype=torch.float64)
    phi = adaptive.density(alphas, flat)
    assert torch.allclose(phi, torch.ones(40, dtype=torch.float64), rtol=1e-12)
    nodes = adaptive.place(alphas, phi, 10)
    expected = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected[0] = 2.0 ** -60
    assert torch.allclose(nodes, expected, rtol=0, atol=1e-15)
    # 8x the variance on the first half: density ratio 8^(1/3) = 2 away from the smoothing window
    r = torch.ones(40, 1, dtype=torch.float64)
    r[:20] = math.sqrt(8)
    phi = adaptive.density(alphas, r)
    assert torch.allclose(phi[:17] / phi[23:].mean(), torch.full((17,), 2.0, dtype=torch.float64), rtol=1e-12)
    assert abs(float((phi * 0.025).sum()) - 1) < 1e-12
    nodes = adaptive.place(alphas, phi, 300)
    assert 190 <= int((nodes < 0.5).sum()) <= 210  # about 2/3 of the nodes in the first half
    # the floor: a stretch with no residual at all keeps FLOOR of the mean density
    r[:20] = 0
    phi = adaptive.density(alphas, r)
    assert torch.allclose(phi[:17], phi[0].expand(17), rtol=1e-12)
    # FLOOR of the mean, then normalised: FLOOR / 2 against the plateau (the smoothed boundary steps move it a little)
    assert float(phi[0] / phi[23:].mean()) == pytest.approx(adaptive.FLOOR / 2, rel=0.1)


def test_kink_census_counts_the_regions_of_an_mlp_and_does_not_depend_on_chunks():
    model, x, baseline = _mlp()
    path = attrib.LayerConductance(model, ["0"]).path(x, baseline, 1, None, None, None)
    fine = torch.linspace(0, 1, 4097, dtype=torch.float64)
    counts = kink_census(path, fine)
    regions = linear_regions(model, x, baseline, target=1).counts
    assert torch.equal(counts.sum(0) + 1, regions)
    coarse = kink_census(path, fine[::128])
    assert bool((coarse.sum(0) + 1 <= regions).all())
    assert torch.equal(kink_census(path, fine[::128], internal_batch_size=6), coarse)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n_steps="auto"), InputError, "n_steps='auto' needs tolerance="),
    (dict(n_steps="auto", tolerance=1e-3, method="riemann_left"), InputError, "places its own nodes"),
    (dict(n_steps="auto", tolerance=1e-3, refine="double"), InputError, "refine: n_steps='auto'"),
    (dict(n_steps="auto", tolerance=-1.0), InputError, "tolerance must be a positive number"),
    (dict(n_steps="auto", tolerance=1e-3, max_steps=8), InputError, "max_steps must be an int >= 16"),
    (dict(n_steps="fast"), InputTypeError, "n_steps must be an int or 'auto'"),
    (dict(n_steps=8, refine="double"), InputError, "refine: it applies to refinement to a tolerance"),
])
def test_auto_argument_errors_name_the_argument(kwargs, error, match):
    model, x, baseline = _mlp()
    with pytest.raises(error, match=match):
        attrib.LayerConductance(model, "0").attribute(x, target=1, baselines=baseline, **kwargs)


def test_auto_stops_at_max_steps_with_a_warning():
    model, x, baseline = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="not reached with 40 steps"):
            attrib.LayerConductance(model, ["0"]).attribute(x, target=1, baselines=baseline, n_steps="auto",
                                                           tolerance=1e-3, max_steps=40)
