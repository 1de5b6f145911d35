"""attrib audit's exact rows and faithfulness scorecard (attrib/cli_audit.py), against the library run directly."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import attrib
from attrib.cli import main
from attrib.cli_audit import neuron_error, steps_needed
from attrib.faithfulness import perturbation_curve


@pytest.fixture
def picture(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    return tmp_path / "noise.png"


def _value(out: str, label: str) -> float:
    (line,) = [line for line in out.splitlines() if f"{label} " in line and "@" in line]
    return float(line.split()[-2])


def _loaded(picture):
    from attrib.cli import parser
    from attrib.cli_common import load_for_cli
    from attrib.cli_inputs import load_pictures

    loaded = load_for_cli(parser().parse_args(["audit", str(picture), "--model", "cli_models:pl_small"]))
    return loaded, load_pictures([str(picture)], loaded)[0].tensor


def test_the_audit_reports_each_methods_per_neuron_error_against_exact_and_the_steps_it_needs(picture, capsys):
    assert main(["audit", str(picture), "--model", "cli_models:pl_small", "--n-steps", "32", "--no-scorecard"]) == 0
    out = capsys.readouterr().out
    loaded, x = _loaded(picture)
    model = loaded.model
    target = int(model(x).argmax(1))
    from attrib.cli import _baseline
    base = _baseline(loaded, x)
    exact_ig = attrib.IntegratedGradients(model).attribute(x, target=target, baselines=base, method="exact")
    ig = attrib.IntegratedGradients(model).attribute(x, target=target, baselines=base, n_steps=32)
    assert _value(out, "integrated gradients vs exact @ input") == pytest.approx(neuron_error(ig.attributions, exact_ig.attributions), rel=1e-3)
    layers = ["0", "3", "6"]
    exact_lc = attrib.LayerConductance(model, layers).attribute(x, target=target, baselines=base, method="exact")
    lc = attrib.LayerConductance(model, layers).attribute(x, target=target, baselines=base, n_steps=32)
    for name in layers:
        assert _value(out, f"layer conductance vs exact @ {name}") == pytest.approx(neuron_error(lc[name], exact_lc[name]), rel=1e-3, abs=1e-9)
        assert _value(out, f"exact conductance @ {name}") < 1e-3  # completeness of the exact sums (float32 model)
    assert f"exact: {int(exact_ig.info['regions'][0])} linear regions" in out
    needed = steps_needed(lambda n: attrib.IntegratedGradients(model).attribute(x, target=target, baselines=base, n_steps=n).attributions,
                          exact_ig.attributions)
    expected = " / ".join(str(needed[t]) if needed[t] else "> 1024" for t in (0.01, 0.001))
    assert f"integrated gradients (gausslegendre) {expected}" in out
    # the doubling stops at the first n under each target: check the 1% one against the errors around it
    n = needed[0.01]
    assert n is not None and neuron_error(attrib.IntegratedGradients(model).attribute(
        x, target=target, baselines=base, n_steps=n).attributions, exact_ig.attributions) <= 0.01
    if n > 8:
        assert neuron_error(attrib.IntegratedGradients(model).attribute(
            x, target=target, baselines=base, n_steps=n // 2).attributions, exact_ig.attributions) > 0.01


def test_the_audit_skips_exact_on_a_model_that_is_not_piecewise_linear_and_says_why(picture, capsys):
    assert main(["audit", str(picture), "--model", "cli_models:sigmoid_small", "--no-scorecard"]) == 0
    out = capsys.readouterr().out
    assert "exact: skipped (method='exact': module '1' computes a Sigmoid" in out and "vs exact" not in out
    assert main(["audit", str(picture), "--model", "cli_models:pl_small", "--no-scorecard", "--exact-max-regions", "3"]) == 0
    assert "exact: skipped (--exact-max-regions: the paths have more than 3 linear regions" in capsys.readouterr().out


def test_the_scorecard_is_the_faithfulness_metrics_run_directly(picture, capsys):
    assert main(["audit", str(picture), "--model", "cli_models:pl_small", "--no-exact", "--n-steps", "16", "--tolerance", "1"]) == 0
    out = capsys.readouterr().out
    loaded, x = _loaded(picture)
    model = loaded.model
    target = int(model(x).argmax(1))
    from attrib.cli import _baseline
    base = _baseline(loaded, x)
    ig = attrib.IntegratedGradients(model).attribute(x, target=target, baselines=base, n_steps=16).attributions
    deletion = perturbation_curve(model, x, ig, target, mode="deletion", fill=base, steps=16)
    insertion = perturbation_curve(model, x, ig, target, mode="insertion", fill=base, steps=16)
    (row,) = [line for line in out.splitlines() if line.strip().startswith("integrated gradients ") and "@" not in line]
    numbers = [float(v) for v in row.split()[2:]]
    assert numbers[0] == pytest.approx(float(deletion.auc[0]), abs=1e-3) and numbers[1] == pytest.approx(float(insertion.auc[0]), abs=1e-3)
    assert re.search(r"randomisation check at 3 .*conductance [+-]\d\.\d\d", out)


def test_the_explain_report_scores_each_panels_map(picture, tmp_path, capsys):
    import json

    out = tmp_path / "report"
    assert main(["explain", str(picture), "--model", "cli_models:pl_small", "--methods", "ig,deeplift", "--n-steps", "16",
                 "--quiet", "--out", str(out)]) == 0
    image = json.loads((out / "report.json").read_text())["images"][0]
    rows = {row["method"]: row for row in image["faithfulness"]}
    assert set(rows) == {"integrated gradients", "DeepLIFT"}
    loaded, x = _loaded(picture)
    from attrib.cli import _baseline
    base = _baseline(loaded, x)
    ig = attrib.IntegratedGradients(loaded.model).attribute(x, target=image["target"], baselines=base, n_steps=16).attributions
    for mode in ("deletion", "insertion"):
        curve = perturbation_curve(loaded.model, x, ig.sum(1), image["target"], mode=mode, fill=base, steps=16)
        assert rows["integrated gradients"][f"{mode}_auc"] == pytest.approx(float(curve.auc[0]), abs=1e-6)
    assert any(f["file"].endswith("_faithfulness.png") for f in image["figures"])
    assert "faithfulness of each map" in (out / "index.html").read_text()


def test_explain_scorecard_puts_max_sensitivity_and_the_randomisation_check_in_the_report(picture, tmp_path, capsys):
    import json

    import torch

    from attrib.cli import _baseline
    from attrib.evaluate import sanity_check
    from attrib.faithfulness import infidelity, max_sensitivity

    out = tmp_path / "report"
    assert main(["explain", str(picture), "--model", "cli_models:pl_small", "--methods", "ig", "--n-steps", "16",
                 "--scorecard", "--quiet", "--out", str(out)]) == 0
    image = json.loads((out / "report.json").read_text())["images"][0]
    card = image["scorecard"]
    rows = {row["method"]: row for row in card["rows"]}
    assert set(rows) == {"integrated gradients", "saliency", "input x gradient", "DeepLIFT", "LRP"}
    loaded, x = _loaded(picture)
    model, target, base = loaded.model, image["target"], _baseline(loaded, x)
    # IG's infidelity and max-sensitivity as the scorecard draws them: one generator seeded 0, infidelity first
    generator = torch.Generator().manual_seed(0)
    ig = attrib.IntegratedGradients(model).attribute(x, target=target, baselines=base, n_steps=16).attributions
    fidelity = infidelity(model, x, ig, target, n_samples=16, noise_scale=0.1 * float(x.std()), generator=generator)
    assert rows["integrated gradients"]["infidelity"] == pytest.approx(float(fidelity[0]), rel=1e-5)
    width = float(x.max() - x.min())
    expected = max_sensitivity(attrib.IntegratedGradients(model), x, target, n_samples=8, radius=0.02 * width,
                               generator=generator, baselines=base, n_steps=16)
    assert rows["integrated gradients"]["max_sensitivity"] == pytest.approx(float(expected[0]), rel=1e-5)
    layer = card["randomisation_layer"]
    found = sanity_check(model, x, layer, target, n_steps=16)
    assert card["randomisation"] == pytest.approx({m: steps[-1][1] for m, steps in found.items()}, abs=1e-6)
    html = (out / "index.html").read_text()
    assert "faithfulness scorecard" in html and "max-sensitivity (lower)" in html and f"Spearman at {layer}" in html
