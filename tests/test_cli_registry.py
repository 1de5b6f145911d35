"""`attrib explain` takes its methods from the CLI's registry and its LRP composites from
`attrib.lrp.COMPOSITES`: `--composite` changes what LRP and the path graph compute, an unknown name
is one line and exit 2, and a method registered in one place runs, is listed and is preflighted."""
import json
import subprocess
import sys

import pytest
import torch

from attrib import cli
from attrib.cli_inputs import load_model, load_pictures
from attrib.errors import InputError
from attrib.lrp import COMPOSITES, LRP

QUICK = ["--quiet", "--steps", "2", "--max-k", "3"]


def explain(tmp_path, name, *options):
    out = tmp_path / name
    assert cli.main(["explain", "--out", str(out)] + QUICK + list(options)) == 0
    return json.loads((out / "report.json").read_text()), out


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    loaded = load_model("digits")
    return loaded, load_pictures([], loaded)


@pytest.mark.parametrize("composite, conv_rule", [(None, "ZPlus"), ("epsilon", "Epsilon"), ("epsilon_plus_flat", "ZPlus")])
def test_composite_sets_the_lrp_rules_and_numbers(tmp_path, digits, composite, conv_rule):
    loaded, pictures = digits
    report, _ = explain(tmp_path, "r", "--methods", "lrp", *(["--composite", composite] if composite else []))
    composite = composite or "epsilon_plus"  # explain's default
    assert report["settings"]["lrp_composite"] == composite
    for image, picture in zip(report["images"], pictures):
        [row] = image["checks"]
        assert row["method"] == f"LRP {composite}"
        rules = {layer["layer"]: layer["rule"] for layer in image["lrp_layers"]}
        assert rules["features.7"].startswith(conv_rule) and rules["classifier.3"].startswith("Epsilon")
        if composite == "epsilon_plus_flat":  # the first layer gets Flat
            assert rules["features.0"].startswith("Flat")
        # the relevance reaching the input is the library's own, under that composite
        direct = LRP(loaded.model, composite).attribute(picture.tensor, target=image["target"])
        assert row["value"] == pytest.approx(float(direct.attributions.sum()), rel=1e-5)
        assert row["reference"] == pytest.approx(float(direct.outputs[0]), rel=1e-6)


def test_composite_changes_the_reported_relevance(tmp_path):
    default, _ = explain(tmp_path, "default", "--methods", "lrp")
    epsilon, _ = explain(tmp_path, "epsilon", "--methods", "lrp", "--composite", "epsilon")
    for a, b in zip(default["images"], epsilon["images"]):
        assert a["checks"][0]["reference"] == pytest.approx(b["checks"][0]["reference"])  # the same F(x)
        assert abs(a["checks"][0]["share"] - b["checks"][0]["share"]) > 1e-3  # a different share reaches the input


def test_the_path_graph_is_built_under_the_chosen_composite(tmp_path):
    paths = {}
    for composite in ("epsilon", "epsilon_plus"):
        report, out = explain(tmp_path, composite, "--model", "cli_models:residual", "--methods", "graph", "--k", "2",
                              "--composite", composite)
        [image] = report["images"]
        graph = json.loads((out / f"00_{image['name']}_graph.json").read_text())["graph"]
        assert graph["method"] == "lrp" and graph["composite"] == composite
        paths[composite] = [p["carried"] for p in image["paths"]]
    assert paths["epsilon"] != paths["epsilon_plus"]


@pytest.mark.parametrize("command", ["explain", "audit"])
def test_an_unknown_composite_is_one_line_and_exit_2(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--composite", "epsilon_plu"] + (["--out", str(tmp_path / "x")] if command == "explain" else []))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attrib: error: argument --composite: invalid choice: 'epsilon_plu'")
    assert all(repr(name) in lines[0] for name in COMPOSITES)
    assert not (tmp_path / "x").exists()


def test_help_and_errors_list_the_registries(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"comma-separated from {', '.join(cli.EXPLAIN_METHODS)} (default" in help_text
    assert f"one of {', '.join(sorted(COMPOSITES))} (default epsilon_plus; attnlrp for a model with nn.MultiheadAttention)" in help_text
    assert list(cli.EXPLAIN_METHODS) == ["conductance", "ascent", "gradcam", "deeplift", "lrp", "heads", "rollout", "ig",
                                         "guided", "deconv", "graph"]
    with pytest.raises(InputError, match="choose from " + ", ".join(cli.EXPLAIN_METHODS)):
        cli._methods("ig,magic")


def test_a_composite_registered_by_the_user_is_a_choice(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(COMPOSITES, "all_epsilon", COMPOSITES["epsilon"])
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    assert "all_epsilon" in capsys.readouterr().out
    report, _ = explain(tmp_path, "r", "--methods", "lrp", "--composite", "all_epsilon")
    assert report["images"][0]["checks"][0]["method"] == "LRP all_epsilon"


def test_a_method_registered_in_one_place_runs(monkeypatch, tmp_path, digits, capsys):
    """One registration: listed by --help, run in registry order, its panel in the grid, its needs met."""
    from attrib import InputXGradient

    monkeypatch.setattr(cli, "EXPLAIN_METHODS", dict(cli.EXPLAIN_METHODS))
    seen = []

    @cli.register_method("ixg", "input x gradient", panel=True)
    def ixg(image):
        result = InputXGradient(image.model).attribute(image.x, target=image.target)
        image.entry["ixg_sum"] = float(result.attributions.sum())
        return result.attributions[0]

    @cli.register_method("top", "top filter", layer=True, spatial=True, conductance=True)
    def top(image):  # reads the conductance computed once before the methods run
        seen.append(image.scores.clone())
        image.entry["top_score"] = float(image.scores.max())

    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    assert "deconv, graph, ixg, top (default" in " ".join(capsys.readouterr().out.split())

    report, _ = explain(tmp_path, "r", "--methods", "top,ixg,deeplift")
    assert report["methods"] == ["top", "ixg", "deeplift"]
    loaded, pictures = digits
    for image, picture, scores in zip(report["images"], pictures, seen):
        direct = InputXGradient(loaded.model).attribute(picture.tensor, target=image["target"])
        assert image["ixg_sum"] == pytest.approx(float(direct.attributions.sum()), rel=1e-6)
        assert image["top_score"] == pytest.approx(image["top_filters"][0]["conductance"]) == pytest.approx(float(scores.max()))
        assert [c["method"] for c in image["checks"]] == ["layer conductance", "DeepLIFT"]  # conductance first, once
        figures = [f["file"].rsplit("_", 1)[-1] for f in image["figures"]]
        assert figures == ["grid.png", "faithfulness.png"]  # one grid for both panels (deeplift's and ixg's), then their scores
        assert [row["method"] for row in image["faithfulness"]] == ["DeepLIFT", "input x gradient"]
    # the preflight reads the registration: a spatial method is refused at a layer without H x W
    code = cli.main(["explain", "--out", str(tmp_path / "refused"), "--layer", "classifier.3", "--methods", "top"] + QUICK)
    assert code == 2
    assert "without spatial dimensions; top filter needs a convolutional layer" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_building_the_parser_does_not_import_torch(tmp_path):
    code = ("import sys; from attrib import cli; cli.parser().parse_args(['explain', '--out', 'x']); "
            "cli.parser().format_help(); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.stdout.strip() == "False", done.stderr
