"""Wall time of the default `attrib explain` run per image (issue 13: <= 90 s per 224 px image on 2 cores).

Each model runs the console command as a user would (`python -m attrib.cli explain IMAGE --model M`), in a
fresh process, interleaved rounds, median; the time of each part comes from the run's report.json. With
`--baseline REV` the same commands run once from that revision (checked out in a temporary git worktree),
side by side, to show what the change bought. Writes results/explain.json and results/explain.md.

    python benchmarks/explain_speed.py [--repeats 3] [--baseline ff33567]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = [("digits", "digits", []), ("resnet18", "resnet18", ["chelsea"]), ("vgg16", "vgg16", ["chelsea"])]


def run_once(source: Path, model: str, images: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "attrib.cli", "explain", *images, "--model", model, "--out", str(out),
                           "--quiet"], cwd=out.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{model}: {done.stderr}")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)
    images_done = len(report["images"])
    return {"wall": wall, "per_image": wall / images_done, "images": images_done, "parts": report["images"][0].get("seconds"),
            "settings": report.get("settings"), "layer": report["layer"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="a git revision to time once, side by side")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite explain.md from explain.json")
    parser.add_argument("--keep-baseline", action="store_true",
                        help="take the baseline runs from the last explain.json instead of running them again")
    args = parser.parse_args()
    kept = {}
    if args.keep_baseline:
        last = json.loads((HERE / "results" / "explain.json").read_text())
        kept = {label: row["baseline"] for label, row in last["cases"].items() if "baseline" in row}
        args.baseline = last.get("baseline")
    if args.markdown_only:
        write_markdown(json.loads((HERE / "results" / "explain.json").read_text()))
        return
    work = Path(tempfile.mkdtemp(prefix="explain-bench-"))
    baseline_tree = None
    try:
        if args.baseline and not kept:
            baseline_tree = work / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(baseline_tree), args.baseline], cwd=ROOT, check=True,
                           capture_output=True)
        rows = {}
        for model, label, images in CASES:
            runs = []
            for round_ in range(args.repeats):
                runs.append(run_once(ROOT, model, images, work / f"{label}-{round_}"))
            row = {"median_wall": statistics.median(r["wall"] for r in runs), "walls": [r["wall"] for r in runs],
                   "images": runs[0]["images"], "layer": runs[0]["layer"], "settings": runs[0]["settings"],
                   "parts": runs[len(runs) // 2]["parts"]}
            row["median_per_image"] = row["median_wall"] / row["images"]
            if baseline_tree is not None:
                before = run_once(baseline_tree, model, images, work / f"{label}-baseline")
                row["baseline"] = {"wall": before["wall"], "per_image": before["per_image"], "revision": args.baseline}
            elif label in kept:
                row["baseline"] = kept[label]
            rows[label] = row
            print(label, f"{row['median_per_image']:.1f} s per image", flush=True)
    finally:
        if baseline_tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline_tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    machine = {"device": f"CPU: {cpu_model()}", "threads": 2, "python": sys.version.split()[0]}
    import torch

    machine["torch"] = torch.__version__
    data = {"machine": machine, "repeats": args.repeats, "baseline": args.baseline, "cases": rows}
    (HERE / "results" / "explain.json").write_text(json.dumps(data, indent=1))
    write_markdown(data)


def write_markdown(data: dict) -> None:
    machine, rows, baseline = data["machine"], data["cases"], data.get("baseline")
    lines = ["# `attrib explain` wall time per image (default methods)", "",
             f"{machine['device']}, 2 threads, torch {machine['torch']}; the console command in a fresh process (imports, "
             f"model build and image decoding included), median of {data['repeats']} interleaved runs. Goal: <= 90 s per "
             "224 px image.", ""]
    if baseline:
        lines += [f"'before': revision {baseline} (the code before issue 13), one run, with its own defaults for every input "
                  "size (32 integration steps, 30 ascent iterations of 8-step conductance, K up to 50, a separate "
                  "conductance pass for the ascent's filter and for the K-path figure). Inputs over 64 px now get 16 "
                  "steps, 6 iterations of 4-step conductance and K up to 11 (the report lists them); the digits "
                  "settings are unchanged but for K up to 100 (was 50), and take about 0.6 s more per image for the "
                  "checks made before any work starts (a cut test, a deconvolution and an LRP pass), the colour bars "
                  "and the longer K curve.", ""]
    lines += ["| model (image) | layer | s per image | runs (s, whole command) | before | settings |", "|---|---|---|---|---|---|"]
    for label, row in rows.items():
        before = f"{row['baseline']['per_image']:.1f} s" if "baseline" in row else "-"
        settings = ", ".join(f"{k} {v}" for k, v in (row["settings"] or {}).items() if k != "lrp_composite")
        lines.append(f"| {label} | `{row['layer']}` | **{row['median_per_image']:.1f}** | "
                     f"{', '.join(f'{w:.1f}' for w in row['walls'])} | {before} | {settings} |")
    parts = sorted({p for row in rows.values() for p in (row["parts"] or {})})
    lines += ["", "Where the time goes (seconds, first image of the median run; the rest of a run is imports, model "
              "building, image decoding and the checks before any work):", "",
              "| model | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{(row['parts'] or {}).get(p, 0):.1f}" for p in parts) + " |")
    (HERE / "results" / "explain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
