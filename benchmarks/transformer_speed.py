"""LRP for transformers on torchvision's vit_b_16 (random init, 3x224x224): attrib's ``attnlrp`` and ``cp_lrp``
against the limit, one plain forward + backward to the input with the parameters frozen (PyTorch's own attention
kernels), side by side, threads fixed, one warm-up, median of interleaved rounds. A second limit runs the same
forward + backward with attention as explicit modules (``explicit_attention``: the math LRP needs), which shows
what the explicit attention costs by itself. Writes benchmarks/results/issue17/transformer_speed.{json,md}.

    python benchmarks/transformer_speed.py [--batches 1,16] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torchvision
from common import device_label, imagenet_pictures, limit_fn, side_by_side

from attrib import explicit_attention
from attrib.lrp import LRP

RESULTS = Path(__file__).resolve().parent / "results" / "issue17"
GOAL = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    with torch.no_grad():  # torchvision starts the classifier at zero, which would leave LRP nothing to pass
        model.heads.head.weight.normal_(0, 0.01)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = imagenet_pictures(batch)
        limit = limit_fn(model, x, 3)

        def explicit_limit():
            with explicit_attention(model):
                return limit()

        fns = {
            "limit (forward + backward)": limit,
            "limit, attention as explicit modules": explicit_limit,
            "attnlrp": lambda: LRP(model, "attnlrp").attribute(x, target=3, conservation=False).attributions,
            "attnlrp + conservation report": lambda: LRP(model, "attnlrp").attribute(x, target=3).attributions,
            "cp_lrp": lambda: LRP(model, "cp_lrp").attribute(x, target=3, conservation=False).attributions,
        }
        timed = side_by_side(fns, args.repeats, "cpu")
        base = timed["limit (forward + backward)"][0]
        for name, (median, runs, _) in timed.items():
            rows.append({"batch": batch, "method": name, "median_s": median, "runs_s": runs, "vs_limit": median / base})
            print(f"batch {batch:>3}  {name:<40} {median:8.3f} s  {median / base:5.2f}x limit", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"model": "torchvision vit_b_16, random init, float32, 3x224x224, target 3", "device": device_label("cpu"),
              "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "torchvision": torchvision.__version__, "python": platform.python_version(), "goal_vs_limit": GOAL,
              "rows": rows}
    (RESULTS / "transformer_speed.json").write_text(json.dumps(result, indent=1))
    lines = ["# LRP on vit_b_16: time against the limit", "",
             f"{result['model']}; {result['device']}, {args.threads} threads, torch {torch.__version__}; one warm-up, median "
             f"of {args.repeats} interleaved rounds. The limit is one plain forward + backward to the input with the "
             "parameters frozen (PyTorch's fused attention). Goal: LRP within 2x of it.", "",
             "| batch | method | median (s) | × limit | within the goal |", "|---|---|---|---|---|"]
    for row in rows:
        goal = "" if row["method"].startswith("limit") else ("yes" if row["vs_limit"] <= GOAL else "no")
        lines.append(f"| {row['batch']} | {row['method']} | {row['median_s']:.3f} | {row['vs_limit']:.2f} | {goal} |")
    (RESULTS / "transformer_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
