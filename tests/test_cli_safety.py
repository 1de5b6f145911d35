"""The command line never destroys what it did not write, says what is wrong in one line (exit 2),
shows bugs as bugs (exit 1), and reports what it did: issue 13's hostile-user findings, one test each."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from attrib import cli
from attrib.report_folder import MANIFEST

TESTS = Path(__file__).parent
QUICK = ["--quiet", "--methods", "gradcam"]


def run(args, cwd, **kwargs):
    env = {"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin", "TORCH_HOME": str(Path(cwd) / "torch")}
    return subprocess.run([sys.executable, "-m", "attrib.cli"] + args, capture_output=True, text=True, cwd=cwd, env=env, **kwargs)


def one_line_error(done, *phrases):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attrib: error:"), done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# ------------------------------------------------------------------ 1. --out never destroys data
def test_out_refuses_the_working_folder_a_file_and_a_users_folder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("mine")
    for out, phrase in [(".", "current folder"), ("notes.txt", "is a file"), ("src", "not written by attrib")]:
        one_line_error(run(["explain", "--out", out] + QUICK, tmp_path), "--out", phrase)
    assert (tmp_path / "src" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]  # no staging folder, no torch cache


def test_out_replaces_only_its_own_untouched_report_and_refuses_links(tmp_path):
    out = tmp_path / "report"
    assert cli.main(["explain", "--out", str(out)] + QUICK) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert "index.html" in manifest["files"] and "report.json" in manifest["files"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    first = (out / "report.json").stat().st_mtime_ns
    assert cli.main(["explain", "--out", str(out), "--quiet", "--methods", "ig"]) == 0  # its own: replaced
    assert (out / "report.json").stat().st_mtime_ns != first
    assert json.loads((out / "report.json").read_text())["methods"] == ["ig"]
    (out / "my_notes.txt").write_text("added by the user")
    assert cli.main(["explain", "--out", str(out)] + QUICK) == 2  # now it holds a file attrib did not write
    assert (out / "my_notes.txt").read_text() == "added by the user"
    (tmp_path / "link").symlink_to(out)
    assert cli.main(["explain", "--out", str(tmp_path / "link")] + QUICK) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "report"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_kill_midway_leaves_no_partial_folder_and_the_old_report_intact(tmp_path, signum):
    out = tmp_path / "report"
    assert cli.main(["explain", "--out", str(out)] + QUICK) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    process = subprocess.Popen([sys.executable, "-m", "attrib.cli", "explain", "--out", "report", "--quiet", "--steps", "200"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
                               # a shell's background job ignores SIGINT, and its children inherit that; a user's Ctrl-C
                               # reaches a foreground run, which this one stands for
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(tmp_path.glob(".report.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".report.partial-*")), "the run never started writing"
    time.sleep(0.5)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_under_a_file_or_on_a_read_only_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(run(["explain", "--out", "file/report"] + QUICK, tmp_path), "--out", "is a file")
    one_line_error(run(["explain", "--out", "/proc/attrib-report"] + QUICK, tmp_path), "--out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        one_line_error(run(["explain", "--out", "locked/report"] + QUICK, tmp_path), "--out", "permission denied")


# ------------------------------------------------------------------ 4. one-line errors, bugs as bugs
def test_bad_input_is_named_before_any_work(tmp_path):
    (tmp_path / "folder").mkdir()
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pt")
    cases = [
        (["explain", "folder"], ["image 'folder'", "directory"]),
        (["explain", "--weights", "folder"], ["--weights", "folder, not a weight file"]),
        (["explain", "--weights", "resnet.pt"], ["--weights", "missing keys", "unexpected keys", "another architecture"]),
        (["explain", "--layer", "classifier.0", "--methods", "gradcam"], ["classifier.0", "without spatial dimensions"]),
        (["explain", "--layer", "classifier.0", "--methods", "ascent"], ["classifier.0", "conductance ascent"]),
        (["explain", "--layer", "classifier.0", "--methods", "deconv"], ["classifier.0", "deconvolution"]),
        (["explain", "--model", "cli_models:inplace_input"], ["changes its input tensor in place"]),
        (["layers", "cli_models:one_channel_28"], ["does not accept input of shape (1, 3, 224, 224)", "--channels"]),
        (["explain", "--model", "cli_models:dict_output", "--output", "scores"], ["--output", "'scores'", "logits"]),
    ]
    for args, phrases in cases:
        done = run(args + (["--out", "r"] if args[0] == "explain" else []), tmp_path)
        one_line_error(done, *phrases)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "torch") == ["folder", "resnet.pt"]


def test_an_unexpected_exception_is_a_bug_with_its_traceback(tmp_path):
    done = run(["explain", "--model", "cli_models:buggy", "--methods", "ig", "--out", "r", "--quiet"], tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "an internal bug in the user's model" in done.stderr
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.partial-*"))


def test_a_linear_layer_with_the_default_methods_runs_the_rest_and_says_why_not(tmp_path):
    out = tmp_path / "r"
    assert cli.main(["explain", "--layer", "classifier.0", "--out", str(out), "--quiet", "--steps", "2", "--max-k", "3"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert sorted(data["skipped"]) == ["ascent", "deconv", "gradcam", "heads", "rollout"]
    assert "conductance" in data["methods"] and "lrp" in data["methods"]
    html = (out / "index.html").read_text()
    for method in data["skipped"]:
        assert f"skipped {method}:" in html
    assert "without spatial dimensions" in html


# ------------------------------------------------------------------ 3. audit: completeness only at cuts
def test_audit_checks_completeness_at_cuts_and_shows_shares_elsewhere(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    done = run(["audit", "noise.png", "--model", "cli_models:residual", "--tolerance", "0.05", "--n-steps", "256",
                "--no-exact", "--no-scorecard"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for inner in ("block.0", "block.2"):
        (row,) = [line for line in lines if f"layer conductance @ {inner}" in line]
        assert "not a cut" in row and "share" in row
    for cut in ("stem", "head.3"):
        (row,) = [line for line in lines if f"layer conductance @ {cut} " in line]
        assert row.rstrip().endswith("yes")
    assert "are not cuts" in lines[-1]


# ------------------------------------------------------------------ 5-7. what the report shows
def test_report_marks_checks_shows_the_input_record_and_encodes_file_names(tmp_path):
    name = "a#b%c?d e"
    Image.fromarray(np.full((1, 1), 200, dtype=np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "r"
    assert cli.main(["explain", str(tmp_path / f"{name}.png"), "--out", str(out), "--quiet", "--target", "-1",
                     "--methods", "conductance,deeplift,lrp,ig,ascent", "--steps", "2"]) == 0
    data = json.loads((out / "report.json").read_text())
    (image,) = data["images"]
    assert image["target"] == 9  # -1 is the last class, as in the API
    assert image["input"]["mode"] == "L" and image["input"]["size"] == [1, 1]
    assert any("upscaled" in step and "1×1" in step for step in image["input"]["steps"])
    references = {c["method"]: c["reference_name"] for c in image["checks"]}
    assert references == {"layer conductance": "F(x) - F(x')", "DeepLIFT": "F(x) - F(x')", "LRP epsilon_plus": "F(x)",
                          "integrated gradients": "F(x) - F(x')"}
    for check in image["checks"]:
        if check["method"].startswith("LRP"):  # information: biases absorb relevance by design
            assert check["passed"] is None and "reaches the input" in check["note"]
            continue
        assert check["passed"] == (check["relative_error"] <= check["tolerance"])
    assert image["ascent"]["filter"] == image["top_filters"][0]["filter"]  # the chart's top filter
    assert set(image["seconds"]) >= {"conductance", "ascent", "deeplift", "lrp", "ig", "figures"}
    html = (out / "index.html").read_text()
    sources = re.findall(r"src='([^']+)'", html)
    assert sources and all("#" not in s and "?" not in s for s in sources)
    assert all((out / unquote(s.replace("&amp;", "&"))).is_file() for s in sources)
    assert "upscaled" in html and "F(x) − F(x′)" in html


def test_method_grid_holds_attributions_only(tmp_path, monkeypatch):
    from attrib.viz import figures

    seen = []
    original = figures.method_grid

    def spy(image, maps, *args, **kwargs):
        seen.append(list(maps))
        return original(image, maps, *args, **kwargs)

    monkeypatch.setattr(figures, "method_grid", spy)
    assert cli.main(["explain", "--out", str(tmp_path / "r"), "--quiet", "--methods", "ascent,gradcam,ig", "--steps", "2"]) == 0
    assert seen and all("conductance ascent" not in maps for maps in seen)


# ------------------------------------------------------------------ 9. custom models
def test_a_factory_declares_its_input_and_output(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / "grey.png")
    done = run(["explain", "grey.png", "--model", "cli_models:dict_output", "--out", "r", "--quiet",
                "--methods", "gradcam,ig,conductance", "--layer", "features.2"], tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["model"]["input"] == {"channels": 1, "size": 28, "mean": [0.5], "std": [0.5]}
    assert data["model"]["output"] == "logits" and data["layer"] == "features.2"
    from attrib.cli_inputs import load_model, load_pictures

    sys.path.insert(0, str(TESTS))
    try:
        loaded = load_model("cli_models:dict_output")
    finally:
        sys.path.remove(str(TESTS))
    (picture,) = load_pictures([str(tmp_path / "grey.png")], loaded)
    with torch.no_grad():
        logits = loaded.model(picture.tensor)
    assert data["images"][0]["prediction"]["class"] == int(logits.argmax())
    assert [n for n, _ in loaded.model.named_modules()][1:3] == ["features", "features.0"]  # the model's own names
    done = run(["layers", "cli_models:one_channel_28", "--channels", "1", "--input-size", "28"], tmp_path)
    assert done.returncode == 0 and "(2, 26, 26)" in done.stdout


# ------------------------------------------------------------------ 2. pictures decoded faithfully
def test_a_16_bit_grey_png_reaches_the_model_with_its_value_not_white(tmp_path):
    from attrib.cli_inputs import load_model, load_pictures
    from attrib.models.digits import MEAN, STD

    Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    (picture,) = load_pictures([str(tmp_path / "deep.png")], load_model("digits"))
    expected = (30000 / 65535 - MEAN) / STD  # Pillow's convert("L") would have given (1 - MEAN) / STD
    assert torch.allclose(picture.tensor, torch.full_like(picture.tensor, expected), atol=1e-5)
    assert any("65535" in step for step in picture.record["steps"])


# ------------------------------------------------------------------ the hostile trial's second round
def test_signals_wait_until_the_folders_are_swapped():
    import threading

    from attrib.report_folder import Terminated, _signals_held

    finished = []
    with pytest.raises(Terminated):
        with _signals_held():
            sender = threading.Thread(target=lambda: os.kill(os.getpid(), signal.SIGTERM))  # from another thread
            sender.start()
            sender.join()
            time.sleep(0.2)
            finished.append(True)
    assert finished == [True]


def test_a_report_that_cannot_be_moved_or_was_edited_is_refused_and_kept(tmp_path, monkeypatch):
    out = tmp_path / "report"
    assert cli.main(["explain", "--out", str(out)] + QUICK) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = Path.rename

    def refuse_old(self, target):
        if self == out:
            raise PermissionError(1, "Operation not permitted")
        return original(self, target)

    monkeypatch.setattr(Path, "rename", refuse_old)
    assert cli.main(["explain", "--out", str(out), "--quiet", "--methods", "ig"]) == 2
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging, no hidden old folder
    (out / "index.html").write_text("my notes")  # a file attrib wrote, changed by the user
    assert cli.main(["explain", "--out", str(out)] + QUICK) == 2
    assert (out / "index.html").read_text() == "my notes"
    assert cli.main(["explain", "--out", str(out / "inside")] + QUICK) == 2  # a report inside a report


def test_odd_names_bad_numbers_and_odd_models_are_handled(tmp_path):
    picture = np.random.default_rng(2).integers(0, 256, (12, 12), dtype=np.uint8)
    odd = os.fsencode(tmp_path) + b"/bad\xffname.png"
    Image.fromarray(picture).save(odd.decode("utf-8", "surrogateescape"))
    long_name = tmp_path / ("L" * 240 + ".png")
    Image.fromarray(picture).save(long_name)
    done = run(["explain", odd.decode("utf-8", "surrogateescape"), str(long_name), "--methods", "ig,ig", "--out", "r",
                "--quiet"], tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["methods"] == ["ig"] and data["images"][0]["name"] == "bad\ufffdname"
    assert all(len(f["file"]) < 100 for image in data["images"] for f in image["figures"])
    for args, phrases in [
        (["explain", "--tolerance", "nan"], ["--tolerance", "finite"]),
        (["explain", "--distance", "5"], ["--distance"]),
        (["explain", "--layer", "features.99"], ["--layer:", "not a submodule"]),
        (["explain", "--model", "cli_models:picky"], ["does not fit the model", "ValueError", "expected 8 x 8"]),
        (["audit", "--tolerance", "-1"], ["--tolerance"]),
    ]:
        one_line_error(run(args + (["--out", "x"] if args[0] == "explain" else []), tmp_path), *phrases)
    from attrib.models.digits import DigitsNet

    torch.save({k: torch.full_like(v, float("nan")) for k, v in DigitsNet().state_dict().items()}, tmp_path / "nan.pt")
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Image.new("L", (1, 1))))
    one_line_error(run(["explain", "--weights", "nan.pt", "--out", "x"], tmp_path), "not finite")
    one_line_error(run(["explain", "--weights", "evil.pt", "--out", "x"], tmp_path), "weights_only")
    done = run(["explain", "--model", "cli_models:spare_conv", "--out", "s", "--quiet", "--methods", "gradcam"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "s" / "report.json").read_text())["layer"] == "conv"  # 'spare' never runs
    done = run(["explain", "--model", "cli_models:mlp", "--out", "m", "--quiet", "--steps", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "m" / "report.json").read_text())
    assert data["layer"] is None and set(data["skipped"]) == {"conductance", "ascent", "gradcam", "deconv", "heads", "rollout"}
    assert {"ig", "deeplift", "lrp"} <= set(data["methods"])


def test_an_interrupted_run_removes_the_parent_folders_it_made(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("attrib.viz.report.write_html", interrupted)
    assert cli.main(["explain", "--out", str(tmp_path / "deep" / "er" / "r")] + QUICK) == 130
    assert list(tmp_path.iterdir()) == []


def test_the_command_starts_without_importing_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys, attrib.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip() == "False", done.stderr
