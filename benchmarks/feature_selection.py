"""The conductance paper's feature-selection study (Dhamdhere et al., ICLR 2019, Table 1) by its protocol.

Protocol, as the paper describes it: sets of 5 labels (two of thematically similar labels, two random); per
label 30 training and 20 evaluation images; each method's importance of every filter of the layer for every
training image (target: its label), aggregated per label (mean over the label's training images); the top k
filters by aggregate for any label (a filter's score is its largest per-label aggregate); a linear classifier
(multinomial logistic regression, ``attrib.evaluate.linear_probe``) on those filters' pooled activations of the
training images; its accuracy on the evaluation images; the mean over the four sets, for k = 5, 10, 15, 20.

- **Digits CNN** (shipped weights), layer ``features.7`` (32 filters; pooled = mean over positions): training images
  from the model's own training split, evaluation images from its held-out split, the first 30 / 20 of each label.
  Similar sets: {3, 5, 6, 8, 9} (closed loops and curves), {1, 2, 4, 7, 9}... see SETS; random sets drawn with seed 0.
- **Text model** (shipped weights): it has two labels, so there is no 5-label set; the protocol runs on the one
  2-label set, four times, each with a different random draw of 30 + 20 sentences per label from the held-out
  check sentences (plain, negated, distractor), and the mean is over the four draws. Filters: the 3 x F filters of
  the three convolutions (pooled = max over time, the model's own features), importance interpolated at the
  embedding.

    python benchmarks/feature_selection.py [--steps 32]

Writes benchmarks/results/issue19/feature_selection.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attrib import evaluate as ev  # noqa: E402
from attrib.hooks import capture  # noqa: E402
from attrib.models.digits import digits_split, load_digits_model, preprocess  # noqa: E402
from common import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "issue19"
KS = (5, 10, 15, 20)
METHODS = ("conductance", "gradient_x_activation", "internal_influence", "activation")
PAPER = {"conductance": (68.9, 81.6, 86.0, 87.8), "gradient_x_activation": (56.9, 76.0, 79.7, 84.4),
         "internal_influence": (48.5, 62.2, 71.4, 72.5), "activation": (46.5, 48.5, 55.8, 60.5)}
SIMILAR = [[3, 5, 6, 8, 9], [1, 2, 4, 7, 9]]  # loops and curves; mostly straight strokes
TRAIN, EVALUATE = 30, 20


def label_sets(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return SIMILAR + [sorted(rng.sample(range(10), 5)) for _ in range(2)]


def select(importance: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The top k filters by aggregate for any label: each filter's score is its largest per-label mean importance."""
    per_label = torch.stack([importance[labels == c].mean(0) for c in labels.unique()])
    return per_label.amax(0).argsort(descending=True, stable=True)[:k]


def probe(features_train, y_train, features_eval, y_eval, importance, k: int) -> float:
    chosen = select(importance, y_train, k)
    classes = y_train.unique()
    remap = {int(c): i for i, c in enumerate(classes)}
    to = lambda y: torch.tensor([remap[int(v)] for v in y])  # noqa: E731
    return ev.linear_probe(features_train[:, chosen], to(y_train), features_eval[:, chosen], to(y_eval), len(classes))


def digits(steps: int) -> dict:
    model = load_digits_model().double().eval()
    images, labels, train, test = digits_split()
    layer = "features.7"
    rows = {}
    for labels_set in label_sets():
        def pick(index, count):
            chosen = [i for c in labels_set for i in [j for j in index.tolist() if int(labels[j]) == c][:count]]
            return preprocess(images[chosen]).double(), labels[chosen]
        x_train, y_train = pick(train, TRAIN)
        x_eval, y_eval = pick(test, EVALUATE)
        f_train, f_eval = ev.pooled_activations(model, x_train, layer), ev.pooled_activations(model, x_eval, layer)
        row = {"all_filters": ev.linear_probe(f_train, _index(y_train), f_eval, _index(y_eval), 5)}
        for method in METHODS:
            importance = ev.filter_importance(model, x_train, layer, y_train.tolist(), method, n_steps=steps)
            row[method] = {str(k): probe(f_train, y_train, f_eval, y_eval, importance, k) for k in KS}
        rows[str(labels_set)] = row
        print("digits", labels_set, {m: row[m] for m in METHODS}, flush=True)
    return {"layer": layer, "filters": 32, "sets": rows}


def _index(y: torch.Tensor) -> torch.Tensor:
    classes = y.unique()
    return torch.searchsorted(classes, y)


def text(steps: int) -> dict:
    from attrib.models.text import check_sentences, load_text_model, load_vocabulary

    model = load_text_model().double().eval()
    vocabulary = load_vocabulary()
    sentences, labels, kinds, _ = check_sentences()
    convs = ["convs.0", "convs.1", "convs.2"]
    rows = {}
    for draw in range(4):
        rng = random.Random(draw)
        chosen_train, chosen_eval = [], []
        for c in (0, 1):
            pool = [i for i in range(len(sentences)) if int(labels[i]) == c]
            rng.shuffle(pool)
            chosen_train += pool[:TRAIN]
            chosen_eval += pool[TRAIN:TRAIN + EVALUATE]
        ids_train, _ = vocabulary.encode([sentences[i] for i in chosen_train])
        ids_eval, _ = vocabulary.encode([sentences[i] for i in chosen_eval])
        y_train, y_eval = labels[chosen_train], labels[chosen_eval]
        f_train, f_eval = pooled(model, ids_train), pooled(model, ids_eval)
        importance = {}
        for method in METHODS:
            importance[method] = torch.cat([
                ev.filter_importance(model, ids_train, conv, y_train.tolist(), method, n_steps=steps, baselines=torch.zeros_like(ids_train),
                                     interpolate_at="embedding" if method in ("conductance", "internal_influence") else None)
                for conv in convs], 1)
        row = {"all_filters": ev.linear_probe(f_train, y_train, f_eval, y_eval, 2),
               **{m: {str(k): probe(f_train, y_train, f_eval, y_eval, importance[m], k) for k in KS} for m in METHODS}}
        rows[f"draw {draw}"] = row
        print("text", draw, {m: row[m] for m in METHODS}, flush=True)
    return {"layers": convs, "filters": int(f_train.shape[1]), "sets": rows}


def pooled(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own features: every filter's max over time (the pools' outputs), (B, 3 F)."""
    names = ["pools.0", "pools.1", "pools.2"]
    with torch.no_grad(), capture(model, names) as cap:
        model(ids)
        return torch.cat([cap[n].flatten(1) for n in names], 1)


def summarise(result: dict) -> dict:
    sets = list(result["sets"].values())
    return {m: {str(k): 100 * statistics.mean(s[m][str(k)] for s in sets) for k in KS} for m in METHODS} | {
        "all_filters": 100 * statistics.mean(s["all_filters"] for s in sets)}


def markdown(report: dict) -> str:
    lines = ["# Feature selection by the conductance paper's protocol (Table 1)", "",
             f"Produced by `python benchmarks/feature_selection.py --steps {report['steps']}` ({report['machine']}, torch "
             f"{report['torch']}, {report['seconds']:.0f} s). Accuracy (%) of a linear classifier on the k filters each method "
             "picks, mean over the four label sets (digits) or four draws (text); 30 training and 20 evaluation images per label.", ""]
    for name, title in (("paper", "Paper, Inception v1 on ImageNet, four 5-label sets"),
                        ("digits", "Digits CNN, `features.7` (32 filters), four 5-label sets " + str(label_sets())),
                        ("text", "Text CNN, the 3 convolutions' filters, the 2-label set, four draws")):
        lines += [f"## {title}", "", "| method | k = 5 | 10 | 15 | 20 |", "|---|---|---|---|---|"]
        table = PAPER if name == "paper" else {m: [report[name]["summary"][m][str(k)] for k in KS] for m in METHODS}
        for method in METHODS:
            lines.append(f"| {method} | " + " | ".join(f"{v:.1f}" for v in table[method]) + " |")
        if name != "paper":
            lines.append(f"| all {report[name]['filters']} filters | {report[name]['summary']['all_filters']:.1f} | | | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {"steps": args.steps, "machine": f"{cpu_model()}, {args.threads} threads", "torch": torch.__version__}
    for name, run in (("digits", digits), ("text", text)):
        result = run(args.steps)
        result["summary"] = summarise(result)
        report[name] = result
    report["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feature_selection.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "feature_selection.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
