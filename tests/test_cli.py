"""The `attrib` command end to end on the embedded digits model, its exit codes for bad input, and
the figure functions (pixels follow the attribution; same input, same pixels)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attrib import cli

FAST = ["--quiet", "--steps", "4", "--max-k", "6"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "report"
    assert cli.main(["explain", "--out", str(out)] + FAST) == 0
    return out


def test_explain_writes_figures_numbers_and_html(report):
    data = json.loads((report / "report.json").read_text())
    assert data["model"]["name"] == "digits" and data["layer"] == "features.7"
    assert [image["name"] for image in data["images"]] == ["digit_3", "digit_5", "digit_8"]
    for image in data["images"]:
        assert image["prediction"]["class"] == image["label"] == image["target"]
        checks = {c["method"]: c for c in image["checks"]}
        # completeness from the numbers alone: DeepLIFT exact (float32), IG and conductance to quadrature error
        assert checks["DeepLIFT"]["relative_error"] < 1e-5
        assert checks["integrated gradients"]["relative_error"] < 0.05
        assert checks["layer conductance"]["relative_error"] < 0.05
        for check in image["checks"]:
            if check["passed"] is None:  # information (LRP: the share of F(x) reaching the input), not a check
                assert abs(check["share"] - check["value"] / check["reference"]) < 1e-12
                continue
            assert abs(check["relative_error"] - abs(check["value"] - check["reference"]) / abs(check["reference"])) < 1e-9
        assert len(image["paths"]) == 5 and image["k_curve"]["ks"] == list(range(1, 7))
        names = {Path(f["file"]).name for f in image["figures"]}
        assert {f"{n}.png" for n in ("grid", "conductance", "ascent", "deconv", "graph", "kpaths", "kcurves")} <= {
            n.rsplit("_", 1)[-1] for n in names}
        for name in names:
            assert (report / name).read_bytes()[:4] == b"\x89PNG"
    html = (report / "index.html").read_text()
    referenced = re.findall(r"(?:src|href)='([^']+)'", html)
    assert referenced and all((report / ref).is_file() for ref in referenced)
    assert not list(report.parent.glob(".report.partial-*"))


def test_explain_replaces_an_old_report_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli.main(["explain", "--out", str(out), "--methods", "gradcam"] + FAST) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("attrib.viz.report.write_html", interrupted)
    code = cli.main(["explain", "--out", str(out), "--methods", "ig"] + FAST)
    assert code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written folder left behind
    monkeypatch.undo()
    assert cli.main(["explain", "--out", str(out), "--methods", "gradcam,ig"] + FAST) == 0
    assert json.loads((out / "report.json").read_text())["methods"] == ["gradcam", "ig"]


def one_channel():
    """A factory for --model: a 1-channel network (images arrive with 3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))


def run(args, tmp_path):
    done = subprocess.run([sys.executable, "-m", "attrib.cli"] + args, capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).parent), "TORCH_HOME": str(tmp_path / "torch"),
                               "PATH": "/usr/bin:/bin"})
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("args, message", [
    (["explain", "missing.png"], "no such file"),
    (["explain", "notes.png"], "not an image"),
    (["explain", "--model", "test_cli:one_channel", "digit.png"], "does not fit the model"),
    (["explain", "--weights", "nowhere.pt"], "no such file"),
    (["explain", "--weights", "notes.png"], "weights_only"),
    (["explain", "--layer", "features.99"], "not a submodule"),
    (["explain", "--methods", "gradcam,magic"], "unknown"),
    (["explain", "--target", "10"], "out of range"),
    (["explain", "--model", "nonet"], "unknown model"),
    (["explain", "--model", "resnet18", "--weights", "DEFAULT"], "never downloads"),
    (["layers"], "the following arguments are required"),
    (["bench", "--dir", "nowhere"], "does not hold"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "notes.png").write_text("not a picture")
    from PIL import Image

    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(tmp_path / "digit.png")
    code, stdout, stderr = run(args + ["--out", "x"] if args[0] == "explain" else args, tmp_path)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attrib: error:") and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("notes.png", "digit.png")) in ([], ["torch"])


def test_layers_lists_names_and_shapes(capsys):
    assert cli.main(["layers", "digits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["features.7", "Conv2d"] and "(32, 16, 16)" in line for line in lines)
    assert any(line.startswith("classifier.3") and "(10,)" in line for line in lines)


def test_audit_exit_status_follows_the_tolerance(capsys):
    assert cli.main(["audit", "--quiet", "--tolerance", "0.2", "--no-exact", "--no-scorecard"]) == 0
    out = capsys.readouterr().out
    assert "0 of" in out.splitlines()[-1]
    assert cli.main(["audit", "--quiet", "--tolerance", "1e-12", "--no-exact", "--no-scorecard"]) == 1
    assert "NO" in capsys.readouterr().out


def test_figures_follow_the_attribution_and_are_deterministic():
    from attrib.viz import figures

    image = torch.rand(3, 16, 16)
    first = torch.zeros(3, 16, 16)
    first[:, 2:6, 2:6] = 1.0
    second = torch.zeros(3, 16, 16)
    second[:, 9:13, 9:13] = -1.0
    a = figures.figure_pixels(figures.method_grid(image, {"m": first}))
    b = figures.figure_pixels(figures.method_grid(image, {"m": second}))
    c = figures.figure_pixels(figures.method_grid(image, {"m": first}))
    assert np.array_equal(a, c) and not np.array_equal(a, b)
    # 0-255, 0-1 and normalised inputs give the same picture
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.float64)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    normalised = torch.tensor(((pixels / 255 - mean) / std).transpose(2, 0, 1))
    assert np.allclose(figures.to_display(pixels), pixels / 255)
    assert np.allclose(figures.to_display(pixels / 255), pixels / 255)
    assert np.allclose(figures.to_display(normalised, mean, std), pixels / 255)
    scores = torch.tensor([0.1, 0.9, 0.3])
    low = figures.figure_pixels(figures.conductance_distribution(scores))
    high = figures.figure_pixels(figures.conductance_distribution(torch.tensor([0.9, 0.1, 0.3])))
    assert not np.array_equal(low, high)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_html_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1300,2400", (report / "index.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[:2] == (2400, 1300)
    assert picture.std() > 10  # not a blank page: figures and tables are drawn


def test_weights_default_come_from_the_local_torch_cache(tmp_path):
    """With the file where torch keeps torchvision's weights, DEFAULT loads it (weights_only); the
    report names the file."""
    import torchvision

    from attrib.cli_inputs import cached_torchvision_weights

    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    import os

    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(tmp_path / "torch")
    try:
        path = cached_torchvision_weights("resnet18")
    finally:
        if old is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = old
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(tmp_path / "grey.png")
    code, _, stderr = run(["explain", "grey.png", "--model", "resnet18", "--weights", "DEFAULT", "--methods", "gradcam",
                           "--out", "r", "--quiet"], tmp_path)
    assert code == 0, stderr
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["model"]["weights"] == str(path)
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(state)
    from attrib.cli_inputs import Loaded, load_pictures

    picture = load_pictures([str(tmp_path / "grey.png")], Loaded(model.eval(), "resnet18", 3, 224, (0.485, 0.456, 0.406),
                                                                  (0.229, 0.224, 0.225)))[0]
    with torch.no_grad():
        assert data["images"][0]["prediction"]["class"] == int(model(picture.tensor).argmax())


def test_weights_default_go_through_torchvisions_own_builder(tmp_path, monkeypatch):
    """DenseNet's published file uses old key names that torchvision renames while loading, and
    GoogLeNet's weights need transform_input=True: DEFAULT builds the way torchvision does, from a
    dict loaded with weights_only, without fetching anything."""
    import torchvision

    from attrib.cli_inputs import cached_torchvision_weights, load_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    dense = torchvision.models.densenet121(weights=None)
    old_names = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in dense.state_dict().items() if not k.endswith("num_batches_tracked")}  # as published
    assert any(".norm.1." in k for k in old_names)
    path = cached_torchvision_weights("densenet121")
    path.parent.mkdir(parents=True)
    torch.save(old_names, path)
    loaded = load_model("densenet121", "DEFAULT")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), dense.state_dict().values()))
    google = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    torch.save(google.state_dict(), cached_torchvision_weights("googlenet"))
    assert load_model("googlenet", "DEFAULT").model.transform_input is True
