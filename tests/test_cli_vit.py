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
