"""``attrib explain --model text``: the numbers in report.json against Captum's LayerIntegratedGradients and
completeness, what the report says about the input, and one-line errors (exit 2) for bad input."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from attrib.cli import main
from attrib.cli_text import _check_layers
from attrib.errors import InputError
from attrib.models.text import load_text_model, load_vocabulary, sample_sentences

captum_attr = pytest.importorskip("captum.attr")


def _run(tmp_path, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "report"
    code = main(["explain", "--model", "text", "--quiet", "--out", str(out), *args])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return code, report


def test_token_scores_are_captums_layer_integrated_gradients_and_the_report_says_what_was_read(tmp_path):
    code, report = _run(tmp_path, "The plot was not good at all, zorblax!", "--n-steps", "16")
    assert code == 0 and report is not None
    entry, = report["sentences"]
    assert entry["unknown_words"] == ["zorblax"] and entry["read_as"][-2] == "<unk>"
    assert entry["tokens"] == ["the", "plot", "was", "not", "good", "at", "all", ",", "zorblax", "!"]
    model, vocabulary = load_text_model().double(), load_vocabulary()
    ids, _ = vocabulary.encode(["The plot was not good at all, zorblax!"])
    target = int(model(ids).argmax(1))
    assert entry["target"] == target and entry["prediction"]["class"] == target
    lig = captum_attr.LayerIntegratedGradients(model, model.embedding)
    expected = lig.attribute(ids, torch.zeros_like(ids), target=target, n_steps=16).sum(-1)[0]
    assert max(abs(a - b) for a, b in zip(entry["token_scores"], expected[:10].tolist())) < 1e-8
    assert float(expected[10:].abs().max()) == 0.0  # padding equals the baseline: nothing to attribute
    ig, cut = entry["checks"]
    change = entry["outputs"] - entry["baseline_outputs"]
    assert abs(ig["value"] - sum(entry["token_scores"])) < 1e-9 and abs(ig["reference"] - change) < 1e-12
    assert cut["passed"] and cut["relative_error"] < 0.05  # the three convolutions together: a cut (16 steps)
    assert len(entry["top_units"]) == 5 and all(len(f["tokens"]) == 10 for f in entry["top_units"])
    for unit in entry["top_units"]:  # a unit's split over the tokens adds up to its conductance, up to quadrature error
        assert abs(unit["sum_over_tokens"] - unit["conductance"]) <= 0.05 * abs(unit["conductance"])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "zorblax" in page and "unknown words" in page
    for figure in entry["figures"]:
        assert (tmp_path / "report" / figure["file"]).stat().st_size > 1000


def test_no_sentence_explains_the_shipped_held_out_sentences_and_a_file_is_read_line_by_line(tmp_path):
    code, report = _run(tmp_path, "--n-steps", "4")
    sentences, labels = sample_sentences()
    assert code == 0 and report is not None
    assert [e["sentence"] for e in report["sentences"]] == sentences
    assert [e["label"] for e in report["sentences"]] == [["negative", "positive"][int(v)] for v in labels]
    listed = tmp_path / "sentences.txt"
    listed.write_text("This film was wonderful!\n\n   \nThe ending was really boring.\n", encoding="utf-8")
    code, report = _run(tmp_path, "--sentences", str(listed), "--n-steps", "4", "--target", "1")
    assert code == 0 and report is not None
    assert [e["sentence"] for e in report["sentences"]] == ["This film was wonderful!", "The ending was really boring."]
    assert [e["target"] for e in report["sentences"]] == [1, 1]


@pytest.mark.parametrize("args, message", [
    (("",), r"sentence 1 \(''\) is empty"),
    ((" ".join(["word"] * 70),), r"sentence 1 \('word word .*\.\.\.'\) has 70 tokens; the model reads at most 64"),
    (("ok", "--layer", "embedding"), r"--layer: 'embedding' is where every path is interpolated"),
    (("ok", "--layer", "convs.9"), r"--layer: 'convs.9' is not a submodule"),
    (("ok", "--channels", "3"), r"--channels: is an option of the image models"),
    (("ok", "--k", "3"), r"--k: is an option of the image models"),
    (("ok", "--composite", "epsilon"), r"--composite: is an option of the image models"),
    (("ok", "--scorecard"), r"--scorecard: is an option of the image models"),
    (("ok", "--layer", " , "), r"--layer: give a layer name"),
    (("ok", "--target", "2"), r"--target: 2 is out of range for 2 classes"),
    (("--sentences", "/nonexistent/file.txt"), r"--sentences: no such file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code, report = _run(tmp_path, *args)
    error = capsys.readouterr().err
    assert code == 2 and report is None and not (tmp_path / "report").exists()
    assert error.count("\n") == 1
    assert re.search(message, error), error


def test_sentences_are_refused_for_image_models(tmp_path, capsys):
    assert main(["explain", "--quiet", "--out", str(tmp_path / "r"), "--sentences", "x.txt"]) == 2
    assert "--sentences: only the text model" in capsys.readouterr().err


def test_a_layer_that_does_not_reach_the_output_is_refused():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 4)
            self.side = nn.Linear(4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids):
            e = self.embedding(ids)
            self.side(e)  # computed, but the output does not depend on it
            return self.fc(e.mean(1))

    model = Unused().double().eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match=r"--layer: 'side' is not upstream of the output"):
        _check_layers(model, ids, ["side"])
    _check_layers(model, ids, ["fc"])  # reaches the output: no error
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_file_is_decoded_as_written_and_errors_name_its_line(tmp_path, capsys):
    listed = tmp_path / "sentences.txt"
    # a BOM, Windows line ends, a zero-width space and a line separator (U+2028) inside a line
    listed.write_bytes("\ufeffThe film was great.\r\nThe plot\u200b was\u2028 boring.\r\n".encode("utf-8"))
    code, report = _run(tmp_path, "--sentences", str(listed), "--n-steps", "4")
    assert code == 0 and report is not None
    first, second = report["sentences"]
    assert first["tokens"] == ["the", "film", "was", "great", "."] and first["unknown_words"] == []
    assert second["tokens"] == ["the", "plot", "was", "boring", "."]
    assert second["invisible_characters_dropped"] == ["U+200B"] and second["origin"] == f"{listed} line 2"
    alone, _ = _run(tmp_path / "again", "The film was great.", "--n-steps", "4")
    assert alone == 0
    single = json.loads((tmp_path / "again" / "report" / "report.json").read_text())["sentences"][0]
    assert single["token_scores"] == first["token_scores"]  # the BOM changed nothing
    listed.write_text("fine\n\n" + "word " * 65 + "\n", encoding="utf-8")
    assert _run(tmp_path / "third", "--sentences", str(listed))[0] == 2
    assert f"{listed} line 3 ('word word" in capsys.readouterr().err


def test_weights_with_nan_are_refused(tmp_path, capsys):
    state = load_text_model().state_dict()
    state["fc.bias"] = torch.tensor([float("nan"), 0.0])
    torch.save(state, tmp_path / "nan.pt")
    code, report = _run(tmp_path, "ok", "--weights", str(tmp_path / "nan.pt"))
    assert code == 2 and report is None
    assert "--weights: " in capsys.readouterr().err


def test_a_cut_layer_gets_a_completeness_check_and_layers_lists_the_text_model(tmp_path, capsys):
    code, report = _run(tmp_path, "The film was great.", "--layer", "fc", "--n-steps", "32")
    assert code == 0 and report is not None
    assert report["cuts"] == {"fc": True}
    _, row = report["sentences"][0]["checks"]
    assert row["where"] == "fc (a cut)" and row["passed"] and row["relative_error"] < 0.01
    code, report = _run(tmp_path / "b", "The film was great.", "--layer", "convs.0", "--n-steps", "4")
    assert report is not None and report["cuts"] == {"convs.0": False}
    assert report["sentences"][0]["checks"][1]["passed"] is None  # one branch: a share, not a check
    capsys.readouterr()
    assert main(["layers", "text"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("input (64,)")
    assert any(line.split()[0] == "convs.0" and line.endswith("(32, 62)") for line in lines)  # 64 - 3 + 1 positions
    assert any(line.split()[0] == "fc" and line.endswith("(2,)") for line in lines)
