"""``attrib explain --model digits-vit``: the embedded tiny ViT gets the transformer composite by default and the
per-head conductance figure, whose numbers obey the axioms (blocks' heads after the last one that feeds the class
token carry nothing at the patch tokens)."""
from __future__ import annotations

import json

import torch

from attrib import HeadConductance
from attrib.cli import main
from attrib.models import load_digits_vit, preprocess, sample_digits


def test_digits_vit_explains_with_attnlrp_and_conductance_per_head(tmp_path):
    out = tmp_path / "report"
    assert main(["explain", "--model", "digits-vit", "--methods", "heads,lrp", "--n-steps", "8", "--quiet",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["lrp_composite"] == "attnlrp" and report["skipped"] == {}
    image = report["images"][0]
    heads = image["heads"]
    assert sorted(heads) == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(4)]
    assert all(len(block["per_head"]) == 4 for block in heads.values())
    # the same numbers from the library, for the first held-out digit and its predicted class
    images, _ = sample_digits()
    x = preprocess(images[3:4])
    model = load_digits_vit()
    blank = preprocess(images[3:4] * 0)
    res = HeadConductance(model).attribute(x, target=image["target"], baselines=blank, n_steps=8)
    last = res["encoder.layers.encoder_layer_3.self_attention"][0]
    assert last[:, 1:].abs().max() == 0  # after the last block only the class token reaches the classifier
    for name, block in heads.items():
        assert max(abs(a - b) for a, b in zip(block["per_head"], res[name][0].sum(-1).tolist())) < 1e-5
    assert any(f["file"].endswith("_heads.png") for f in image["figures"])
    assert main(["explain", "--model", "digits", "--methods", "heads", "--quiet", "--out", str(tmp_path / "cnn")]) == 2
    assert torch.isfinite(res.outputs).all()


def test_digits_vit_report_has_attention_rollout_and_lrp_with_zbox_at_the_digits_bounds(tmp_path):
    from attrib import attention_rollout
    from attrib.models import pixel_bounds

    out = tmp_path / "report"
    assert main(["explain", "--model", "digits-vit", "--methods", "rollout,lrp", "--quiet", "--out", str(out)]) == 0
    image = json.loads((out / "report.json").read_text())["images"][0]
    images, _ = sample_digits()
    expected = attention_rollout(load_digits_vit(), preprocess(images[3:4]))[0]
    rollout = image["rollout"]
    assert rollout["grid"] == [8, 8]
    assert max(abs(a - b) for a, b in zip(rollout["patches"], expected.tolist())) < 1e-6
    assert abs(rollout["class_token_share"] + sum(rollout["patches"]) - 1) < 1e-5  # rows of the rollout sum to 1
    first = image["lrp_layers"][0]
    low, high = pixel_bounds()
    assert first["layer"] == "conv_proj" and first["rule"].startswith("ZBox(")
    assert f"{low:.4f}" in first["rule"] and f"{high:.4f}" in first["rule"]
    assert any(f["file"].endswith("_grid.png") for f in image["figures"])
    # a model without attention: rollout named explicitly is refused before any work
    assert main(["explain", "--model", "digits", "--methods", "rollout", "--quiet", "--out", str(tmp_path / "cnn")]) == 2
    assert not (tmp_path / "cnn").exists()


def test_a_box_composite_gets_the_models_own_bounds_on_the_digits_cnn(tmp_path):
    from attrib.models import pixel_bounds

    out = tmp_path / "report"
    assert main(["explain", "--model", "digits", "--methods", "lrp", "--composite", "epsilon_gamma_box", "--quiet",
                 "--out", str(out)]) == 0  # refused before: ImageNet's three-channel bounds on a one-channel digit
    first = json.loads((out / "report.json").read_text())["images"][0]["lrp_layers"][0]
    assert first["rule"].startswith("ZBox(") and f"{pixel_bounds()[0]:.4f}" in first["rule"]


def test_audit_of_the_digits_vit_shows_what_the_class_token_and_position_embedding_keep(capsys):
    assert main(["audit", "--model", "digits-vit", "--no-scorecard"]) == 1  # DeepLIFT is not complete on attention
    out = capsys.readouterr().out
    assert "exact: skipped (method='exact': module 'encoder.layers.encoder_layer_0.ln_1' computes a LayerNorm" in out
    failed = [line for line in out.splitlines() if line.rstrip().endswith(" NO")]
    assert failed and all("DeepLIFT @ input" in line for line in failed)
    assert "the products of attention" in out  # the reason, printed under the first failure
    for row in ("cat (class_token)", "encoder.add (encoder.pos_embedding)"):
        assert f"LRP attnlrp @ {row}" in out and "kept by a constant" in out
    assert "self_attention.out_proj" in out  # the attention's parts are audited as LRP sees them


def test_a_custom_model_with_attention_gets_attnlrp_with_its_own_bounds_unless_told(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from attrib.normalization import normalized_range

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sys.modules.pop("cli_models", None)
    out = tmp_path / "vit"
    assert main(["explain", "--model", "cli_models:tiny_vit", "--methods", "lrp,rollout", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["lrp_composite"] == "attnlrp"
    image = report["images"][0]
    first = image["lrp_layers"][0]
    low, _ = normalized_range()  # ImageNet's normalisation, the default of a custom model
    assert first["layer"] == "conv_proj" and first["rule"].startswith("ZBox(") and f"{float(low[0]):.4f}" in first["rule"]
    assert image["rollout"]["grid"] == [2, 2]
    assert main(["explain", "--model", "cli_models:tiny_vit", "--methods", "lrp", "--composite", "epsilon", "--quiet",
                 "--out", str(tmp_path / "eps")]) == 2  # told: epsilon has no LayerNorm rule, refused naming the layer
