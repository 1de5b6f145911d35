"""LRP, layer conductance and integrated gradients before and after a change, interleaved in one process:
the same inputs, the same machine state.

    python benchmarks/before_after.py --before REV [--models vgg16,resnet50] [--batches 1] [--rounds 7] [--path-rounds 5]

On a shared machine the speed drifts between runs, and ratios to a limit measured minutes apart can
change by more than the change being measured. This script loads the package as it was at ``REV`` under
the name ``attrib_before``, taking the files from ``git show`` into a temporary folder, next to the
working tree's ``attrib``. For every (model, batch, composite), and for LayerConductance at VGG16's
features.28 and IntegratedGradients (n_steps 50, batch 1), it then alternates the two implementations round
by round. It reports their medians, the ratio after / before, and the largest difference between their
maps (0 when the change kept the numbers). Writes ``results/before_after.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
COMPOSITES = ("epsilon", "epsilon_gamma_box", "epsilon_plus_flat")


def load_before(rev: str, folder: Path):
    """The core package (attrib/, which LRP needs; no graphs or viz) at ``rev``, importable as attrib_before."""
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "attrib"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if not name.endswith(".py"):
            continue
        target = folder / "attrib_before" / Path(name).relative_to("attrib")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True).stdout)
    sys.path.insert(0, str(folder))
    return importlib.import_module("attrib_before")


def picture(batch: int) -> torch.Tensor:
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def compare(label: str, old, new, rounds: int) -> dict:
    """Medians of ``rounds`` alternating calls of ``old`` and ``new`` after one warm-up call of each; the
    largest difference of their results relative to the largest value of the old one."""
    maps = [old(), new()]
    difference = float((maps[0] - maps[1]).abs().max() / maps[0].abs().max())
    times: dict[str, list[float]] = {"before": [], "after": []}
    for round_ in range(rounds):
        order = [("before", old), ("after", new)] if round_ % 2 == 0 else [("after", new), ("before", old)]
        for which, call in order:
            started = time.perf_counter()
            call()
            times[which].append(time.perf_counter() - started)
    row = dict(case=label, before_s=statistics.median(times["before"]), after_s=statistics.median(times["after"]),
               runs=times, max_rel_diff=difference)
    row["ratio"] = row["after_s"] / row["before_s"]
    print(f"{label}: before {row['before_s']:.3f} s, after {row['after_s']:.3f} s, ratio {row['ratio']:.3f}, "
          f"max rel diff {difference:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--path-rounds", type=int, default=5, help="0: LRP only")
    parser.add_argument("--skip-ig", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import attrib
    import attrib.lrp

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        before = load_before(args.before, Path(folder))
        import attrib_before.lrp  # noqa: F401  (the lazy package resolves submodules on first use)

        for name in args.models.split(","):
            model = getattr(torchvision.models, name)(weights=None).eval()
            for batch in (int(b) for b in args.batches.split(",")):
                x = picture(batch)
                for composite in COMPOSITES:
                    old, new = before.lrp.LRP(model, composite), attrib.lrp.LRP(model, composite)
                    rows.append(compare(f"{name}@{batch} LRP {composite}", lambda: old.attribute(x, target=3).attributions,
                                        lambda: new.attribute(x, target=3).attributions, args.rounds))
        if args.path_rounds:
            vgg, x = torchvision.models.vgg16(weights=None).eval(), picture(1)
            rows.append(compare("vgg16@1 LayerConductance features.28, n_steps 50",
                                lambda: before.LayerConductance(vgg, "features.28").attribute(x, target=3)["features.28"],
                                lambda: attrib.LayerConductance(vgg, "features.28").attribute(x, target=3)["features.28"],
                                args.path_rounds))
        if args.path_rounds and not args.skip_ig:
            rows.append(compare("vgg16@1 IntegratedGradients, n_steps 50",
                                lambda: before.IntegratedGradients(vgg).attribute(x, target=3).attributions,
                                lambda: attrib.IntegratedGradients(vgg).attribute(x, target=3).attributions, args.path_rounds))
    machine = dict(cpu=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
                   before=args.before, after="working tree")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "before_after.json").write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    lines = ["# Before and after, interleaved in one process", "",
             f"Random-init torchvision models, 3×224×224, target 3; {args.threads} threads, torch {torch.__version__}; "
             f"`before` = `{args.before}`, `after` = the working tree; {args.rounds} alternating rounds (LRP) and "
             f"{args.path_rounds} (path methods) after a warm-up, medians. Generated by `benchmarks/before_after.py`.", "",
             "| case | before | after | after / before | spread after | largest difference of the results (relative) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        runs = r["runs"]["after"]
        spread = (max(runs) - min(runs)) / statistics.median(runs)
        lines.append(f"| {r['case']} | {r['before_s']:.3f} s | {r['after_s']:.3f} s | {r['ratio']:.3f} | {spread:.2f} | "
                     f"{r['max_rel_diff']:.1e} |")
    (RESULTS / "before_after.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
