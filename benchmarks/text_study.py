"""The conductance paper's text analyses (Dhamdhere et al., ICLR 2019, the sentiment CNN) on the embedded
text model: division of labour among the filters, how negation is carried, and agreement of filter
importance with ablation. Every path is interpolated at the embedding (baseline: every token the
padding id, embedding 0). Writes benchmarks/results/issue16/text_study.{json,md} and two figures.

    python benchmarks/text_study.py [--steps 50] [--seed 0]

Data: the held-out template sentences shipped with the model (``check_sentences``: 120 plain, 120
negated, 60 distractor; never seen in training) and a small hand-written set of paired phrases
("the movie was good" / "the movie was not good at all", ...). Every sentence is read as the model's 64
token slots, so they are attributed in batches (``grouped``).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from attrib import LayerConductance, NeuronConductance, filter_scores, token_scores  # noqa: E402
from attrib import evaluate as ev  # noqa: E402
from attrib.hooks import capture  # noqa: E402
from attrib.models.text import check_sentences, load_text_model, load_vocabulary, training_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "issue16"
CONVS = ["convs.0", "convs.1", "convs.2"]
SUBJECTS = ["the movie", "the plot", "the acting", "this film", "the story", "the script"]
WORDS = {"good": 1, "great": 1, "funny": 1, "brilliant": 1, "bad": 0, "terrible": 0, "boring": 0, "awful": 0}
NEGATORS = {"not", "n't", "never", "no", "nothing"}
KS = (5, 10, 20)
RANDOM_DRAWS = 50


def phrases() -> tuple[list[str], list[int], list[str], list[str]]:
    """Paired phrases: '<subject> was <word>' (plain) and '<subject> was not <word> at all' (negated,
    label flipped)."""
    sentences, labels, kinds, words = [], [], [], []
    for subject in SUBJECTS:
        for word, polarity in WORDS.items():
            sentences += [f"{subject} was {word}", f"{subject} was not {word} at all"]
            labels += [polarity, 1 - polarity]
            kinds += ["plain", "negated"]
            words += [word, word]
    return sentences, labels, kinds, words


def grouped(vocabulary, sentences: list[str]) -> dict[int, tuple[list[int], torch.Tensor]]:
    """Sentence indices and ids per encoded length (every sentence fills the 64 slots, so one group;
    kept by length so that a model with another padding rule is attributed correctly)."""
    groups: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for i, sentence in enumerate(sentences):
        ids, _ = vocabulary.encode([sentence])
        groups[ids.shape[1]].append((i, ids[0]))
    return {length: ([i for i, _ in rows], torch.stack([r for _, r in rows])) for length, rows in groups.items()}


def per_sentence(model, vocabulary, sentences, compute) -> list:
    """``compute(ids)`` -> per-row results, gathered back into sentence order."""
    out: list = [None] * len(sentences)
    for indices, ids in grouped(vocabulary, sentences).values():
        for i, value in zip(indices, compute(ids)):
            out[i] = value
    return out


def conductance(model, vocabulary, sentences, targets, steps: int) -> tuple[torch.Tensor, float]:
    """(N, 96): every filter's conductance (summed over time) toward each sentence's target class, and the
    worst |completeness error| of the three convolutions together."""
    targets = torch.as_tensor(targets)
    lc = LayerConductance(model, CONVS, interpolate_at="embedding")
    deltas: list[float] = []
    rows: list = [None] * len(sentences)
    for indices, ids in grouped(vocabulary, sentences).values():
        res = lc.attribute(ids, target=targets[indices].tolist(), baselines=0, n_steps=steps)
        scores = torch.cat([filter_scores(res[name]) for name in CONVS], 1)
        total = scores.sum(1)
        deltas += (total - (res.outputs - res.baseline_outputs)).abs().tolist()
        for i, row in zip(indices, scores):
            rows[i] = row
    return torch.stack(rows), max(deltas)


def through_negators(model, vocabulary, sentences, targets, steps: int) -> torch.Tensor:
    """(N, 96): the part of every filter's conductance that flows through the sentence's negator tokens
    (neuron conductance of the whole filter at the embedding, summed over those tokens)."""
    targets = torch.as_tensor(targets)
    rows: list = [None] * len(sentences)
    for indices, ids in grouped(vocabulary, sentences).values():
        negator = torch.tensor([[vocabulary.tokens[int(t)] in NEGATORS for t in row] for row in ids])
        parts = []
        for conv in CONVS:
            res = NeuronConductance(model, conv, interpolate_at="embedding").attribute(
                ids, [(c, slice(None)) for c in range(32)], target=targets[indices].tolist(), baselines=0, n_steps=steps)
            per_token = token_scores(res["embedding"].flatten(0, 1)).view(32, len(indices), -1)  # (filters, B, T)
            parts.append((per_token * negator).sum(-1).t())
        for i, row in zip(indices, torch.cat(parts, 1)):
            rows[i] = row
    return torch.stack(rows)


def logits(model, vocabulary, sentences, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2) logits, with the filters where ``keep`` (96,) is 0 ablated (their conv output set to 0)."""
    edits = {}
    if keep is not None:
        for j, name in enumerate(CONVS):
            part = keep[32 * j: 32 * (j + 1)].to(torch.float64).view(1, -1, 1)
            edits[name] = (lambda p: (lambda t: t * p))(part)

    def compute(ids):
        with torch.no_grad(), capture(model, list(edits), edit=edits) if edits else _nothing():
            return model(ids)
    return torch.stack(per_sentence(model, vocabulary, sentences, compute))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def ablation_effect(model, vocabulary, sentences, labels, filters: list[int]) -> dict:
    """Ablating ``filters`` together: the share of sentences whose predicted label changes, the mean drop
    of the label's probability, and the mean drop of the label's logit margin (label logit minus the
    other) as a share of the margin before."""
    keep = torch.ones(96)
    keep[filters] = 0
    before, after = logits(model, vocabulary, sentences), logits(model, vocabulary, sentences, keep)
    label = torch.as_tensor(labels)
    flipped = (before.argmax(1) != after.argmax(1)).double().mean()
    rows = torch.arange(len(labels))
    drop = (before.softmax(1)[rows, label] - after.softmax(1)[rows, label]).mean()
    sign = 1 - 2 * label.to(before.dtype)  # margin of the label: logit[label] - logit[other]
    margin_before, margin_after = -sign * (before[:, 1] - before[:, 0]), -sign * (after[:, 1] - after[:, 0])
    margin = ((margin_before - margin_after) / margin_before.abs()).mean()
    return {"flip_rate": float(flipped), "probability_drop": float(drop), "margin_drop": float(margin)}


def name(index: int) -> str:
    return f"{CONVS[index // 32]}:{index % 32}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    model, vocabulary = load_text_model().double().eval(), load_vocabulary()
    sentences, labels_t, kinds, splits = check_sentences()
    labels = labels_t.tolist()
    before = logits(model, vocabulary, sentences)
    accuracy = {kind: float((before.argmax(1)[[k == kind for k in kinds]] == labels_t[[k == kind for k in kinds]]).double().mean())
                for kind in ("plain", "negated", "distractor")}

    # 1. division of labour: per filter, conductance toward the label on positive vs negative sentences
    cond, worst = conductance(model, vocabulary, sentences, labels, args.steps)
    positive = torch.tensor([lab == 1 for lab in labels])
    P, N = cond[positive].mean(0), cond[~positive].mean(0)
    tau = 0.1 * float(torch.cat([P, N]).abs().max())
    groups = {
        "mostly positive": [f for f in range(96) if P[f] >= tau and N[f] < tau],
        "mostly negative": [f for f in range(96) if N[f] >= tau and P[f] < tau],
        "both": [f for f in range(96) if P[f] >= tau and N[f] >= tau],
        "neither": [f for f in range(96) if P[f] < tau and N[f] < tau],
    }
    share = (P.clamp(min=0) / (P.clamp(min=0) + N.clamp(min=0)).clamp(min=1e-12))
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    for j, conv in enumerate(CONVS):
        part = slice(32 * j, 32 * (j + 1))
        ax.scatter(N[part], P[part], s=22, label=f"{conv} (width {j + 3})", alpha=0.8)
    for f in groups["both"]:
        ax.annotate(name(f), (float(N[f]), float(P[f])), fontsize=6)
    ax.axhline(tau, color="#999", lw=0.8, ls="--")
    ax.axvline(tau, color="#999", lw=0.8, ls="--")
    ax.set_xlabel("mean conductance on negative sentences (toward 'negative')")
    ax.set_ylabel("mean conductance on positive sentences (toward 'positive')")
    ax.set_title("division of labour: the 96 filters (dashed: 10% of the largest)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "text_division_of_labour.png", dpi=130)
    plt.close(fig)

    # 2. negation: the filters with the highest conductance for negated phrases; ablate them
    p_sentences, p_labels, p_kinds, p_words = phrases()
    p_before = logits(model, vocabulary, p_sentences)
    p_cond, p_worst = conductance(model, vocabulary, p_sentences, p_labels, args.steps)
    worst = max(worst, p_worst)
    negated_p = torch.tensor([k == "negated" for k in p_kinds])
    p_labels_t = torch.tensor(p_labels)
    phrase_accuracy = {kind: float((p_before.argmax(1)[[k == kind for k in p_kinds]] == p_labels_t[[k == kind for k in p_kinds]])
                                   .double().mean()) for kind in ("plain", "negated")}
    negated_sentences = [s for s, k in zip(p_sentences, p_kinds) if k == "negated"]
    negated_labels = [lab for lab, k in zip(p_labels, p_kinds) if k == "negated"]
    at_negator = through_negators(model, vocabulary, negated_sentences, negated_labels, args.steps).mean(0)
    on_negated, on_plain = p_cond[negated_p].mean(0), p_cond[~negated_p].mean(0)
    by_phrase = {}
    for word in ("good", "bad"):
        rows = [i for i, (k, w) in enumerate(zip(p_kinds, p_words)) if k == "negated" and w == word]
        mean = p_cond[rows].mean(0)
        top = torch.topk(mean, 5).indices.tolist()
        by_phrase[f"not {word} at all"] = [{"filter": name(f), "conductance": float(mean[f])} for f in top]
    negator_top = [{"filter": name(f), "through_negator": float(at_negator[f]), "conductance": float(on_negated[f])}
                   for f in torch.topk(at_negator, 10).indices.tolist()]
    held = {kind: ([s for s, k, sp in zip(sentences, kinds, splits) if k == kind and sp == "template"],
                   [lab for lab, k, sp in zip(labels, kinds, splits) if k == kind and sp == "template"])
            for kind in ("negated", "plain", "distractor")}
    rng = random.Random(args.seed)
    choices = {
        "highest conductance on negated phrases": lambda k: torch.topk(on_negated, k).indices.tolist(),
        "highest conductance through the negator": lambda k: torch.topk(at_negator, k).indices.tolist(),
        "highest conductance on plain phrases (control)": lambda k: torch.topk(on_plain, k).indices.tolist(),
    }
    ablation: dict = {}
    for k in KS:
        for label, pick in choices.items():
            chosen = pick(k)
            ablation[f"{label}, k={k}"] = {"filters": [name(f) for f in chosen], **{
                kind: ablation_effect(model, vocabulary, s, lab, chosen) for kind, (s, lab) in held.items()}}
        draws = [rng.sample(range(96), k) for _ in range(RANDOM_DRAWS)]
        effects = {kind: [ablation_effect(model, vocabulary, s, lab, d) for d in draws] for kind, (s, lab) in held.items()}
        ablation[f"random filters (mean of {RANDOM_DRAWS} draws), k={k}"] = {"filters": None, **{
            kind: {key: sum(e[key] for e in found) / len(found) for key in ("flip_rate", "probability_drop", "margin_drop")}
            for kind, found in effects.items()}}
    fig, axes = plt.subplots(1, len(KS), figsize=(4.2 * len(KS), 4.2), sharey=True)
    for ax, k in zip(axes, KS):
        shown = [key for key in ablation if key.endswith(f"k={k}")]
        width = 0.27
        for j, kind in enumerate(("negated", "plain", "distractor")):
            ax.bar([i + (j - 1) * width for i in range(len(shown))], [ablation[key][kind]["margin_drop"] for key in shown],
                   width, label=f"held-out {kind}")
        ax.set_xticks(range(len(shown)), ["conductance\non negated", "through\nthe negator", "conductance\non plain",
                                          "random"], fontsize=7)
        ax.set_title(f"{k} filters ablated", fontsize=9)
    axes[0].set_ylabel("drop of the label's logit margin (share of it)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "text_negation_ablation.png", dpi=130)
    plt.close(fig)

    # 3. agreement with ablation at the convolutions (Pearson over each sentence's filters, then the mean)
    agreement = {}
    for conv in CONVS:
        scores: dict[str, list[float]] = {m: [] for m in ev.COMPARED_METHODS}
        for indices, ids in grouped(vocabulary, sentences).values():
            target = [labels[i] for i in indices]
            ablated = ev.ablation_scores(model, ids, conv, target)
            for method in ev.COMPARED_METHODS:
                importance = ev.filter_importance(model, ids, conv, target, method, n_steps=args.steps, baselines=0,
                                                  interpolate_at="embedding")
                r = ev.pearson(importance, ablated)
                scores[method] += [float(v) for v in r if v == v]
        agreement[conv] = {m: sum(v) / len(v) for m, v in scores.items()}

    record = training_record()
    result = {
        "model": {"weights": "attrib/models/text.pt", "accuracy": record.get("accuracy")},
        "data": {"held_out": {k: kinds.count(k) for k in ("plain", "negated", "distractor")}, "phrases": len(p_sentences),
                 "accuracy_held_out": accuracy, "accuracy_phrases": phrase_accuracy},
        "settings": {"n_steps": args.steps, "method": "stieltjes_trapezoid", "baseline": "padding id (embedding 0)",
                     "interpolate_at": "embedding", "seed": args.seed, "threshold": tau},
        "completeness": {"worst_abs_delta_over_the_three_convolutions": worst},
        "division_of_labour": {
            "counts": {k: len(v) for k, v in groups.items()},
            "filters": {k: [name(f) for f in v] for k, v in groups.items()},
            "per_filter": [{"filter": name(f), "positive": float(P[f]), "negative": float(N[f]), "share_positive": float(share[f])}
                           for f in range(96)],
        },
        "negation": {"top_filters_by_phrase": by_phrase, "top_filters_through_the_negator": negator_top,
                     "held_out": {kind: len(v[0]) for kind, v in held.items()}, "ablation": ablation},
        "agreement_with_ablation_pearson": agreement,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - started,
    }
    (RESULTS / "text_study.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "text_study.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    d = r["division_of_labour"]["counts"]
    lines = [
        "# The conductance paper's text analyses on the embedded sentiment CNN",
        "",
        "Produced by `python benchmarks/text_study.py` "
        f"({r['seconds']:.0f} s, torch {r['machine']['torch']}, {r['machine']['threads']} threads). Paths interpolated at the "
        "embedding from the padding baseline (embedding 0), "
        f"{r['settings']['n_steps']} steps (stieltjes_trapezoid); worst |completeness error| of the three convolutions "
        f"together over all sentences: {r['completeness']['worst_abs_delta_over_the_three_convolutions']:.2g}.",
        "",
        f"Data: the model's held-out template sentences ({r['data']['held_out']}; accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in r["data"]["accuracy_held_out"].items())
        + f"; 100 of the 300 are the by-word split, whose words the templates never taught, where the model is near chance) and "
        f"{r['data']['phrases']} hand-written paired phrases ('the movie was good' / 'the movie was not good at all'; accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in r["data"]["accuracy_phrases"].items()) + ").",
        "",
        "## Division of labour",
        "",
        "Per filter (96: 32 per width 3/4/5), the mean conductance toward the label on positive sentences and on negative "
        f"ones. A filter carries a class when its mean is at least {r['settings']['threshold']:.3g} (10% of the largest mean).",
        "",
        "| mostly positive | mostly negative | both | neither |",
        "|---|---|---|---|",
        f"| {d['mostly positive']} | {d['mostly negative']} | {d['both']} | {d['neither']} |",
        "",
        "![division of labour](text_division_of_labour.png)",
        "",
        "## Negation",
        "",
        "Filters with the highest mean conductance on the negated phrases:",
        "",
    ]
    for phrase, top in r["negation"]["top_filters_by_phrase"].items():
        lines.append(f"- '{phrase}': " + ", ".join(f"{t['filter']} ({t['conductance']:+.3f})" for t in top))
    lines += ["", "Filters whose conductance flows most through the negator token (neuron conductance of the filter, split over "
              "the tokens; mean over the negated phrases): " + ", ".join(
                  f"{t['filter']} ({t['through_negator']:+.3f} of {t['conductance']:+.3f})" for t in r["negation"]["top_filters_through_the_negator"]),
              "", f"Ablating the chosen filters together (their convolution output set to 0) on held-out template sentences "
              f"({r['negation']['held_out']}): the mean drop of the label's logit margin (logit of the label minus the other) as a "
              "share of the margin before, the mean drop of the label's probability, and the share of predictions that flip.", "",
              "| filters ablated | negated: margin drop | negated: p drop | negated: flips | plain: margin drop | plain: p drop | "
              "plain: flips | distractor: margin drop | distractor: p drop | distractor: flips |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, value in r["negation"]["ablation"].items():
        lines.append(f"| {key} | " + " | ".join(
            f"{value[kind]['margin_drop']:.1%} | {value[kind]['probability_drop']:+.3f} | {value[kind]['flip_rate']:.3f}"
            for kind in ("negated", "plain", "distractor")) + " |")
    lines += ["", "![negation ablation](text_negation_ablation.png)", "", "## Agreement with ablation", "",
              "Pearson correlation, per held-out sentence, between each method's filter importance at the convolution and the "
              "drop of the label's logit when that filter is ablated; mean over sentences.", "",
              "| layer | " + " | ".join(ev.COMPARED_METHODS) + " |", "|---|" + "---|" * len(ev.COMPARED_METHODS)]
    for conv, values in r["agreement_with_ablation_pearson"].items():
        lines.append(f"| {conv} | " + " | ".join(f"{values[m]:.3f}" for m in ev.COMPARED_METHODS) + " |")
    lines += ["", "Gradient × activation and conductance agree almost perfectly here, and that is a property of this network, "
              "not of the methods: after each convolution come a ReLU, the max over time and one dense layer, so the effect of "
              "ablating a filter is exactly the dense weight times its pooled value, which is what gradient × activation at "
              "the convolution computes (the paper's Inception layers have many nonlinear layers above them; there it "
              "reports 0.92 for gradient × activation and 0.79 for conductance). Activation alone does not know the sign of "
              "the filter's weight toward the label, hence its correlation near 0."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
