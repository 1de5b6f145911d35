"""``attrib explain --model text``: token heatmaps, filter conductance and completeness for the embedded
sentiment CNN (:mod:`attrib.models.text`), written as a report folder like the image runs.

Per sentence: the prediction; integrated gradients interpolated at the embedding (baseline: every token
the padding id), summed per token; the conductance of every unit of the chosen layers (default: the
three convolutions), through the same kind of sweep; the conductance of the top units split over the
tokens (neuron conductance at the embedding); and the completeness of both against F(x) - F(x').
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

CONVOLUTIONS = ("convs.0", "convs.1", "convs.2")
TOP = 5  # units shown per sentence
STEPS = 50
# options of the image runs, with the value that means "not given"
IMAGE_OPTIONS = {"channels": None, "input_size": None, "mean": None, "std": None, "output": None, "steps": None,
                 "ascent_n_steps": None, "max_k": None, "k": 6, "distance": 1.0, "scorecard": False}


@dataclass
class Sentence:
    text: str
    label: int | None  # known for the shipped samples
    origin: str  # where it came from, for messages: "sentence 2", "reviews.txt line 5"


def _refuse_image_options(args) -> None:
    given = [name for name, default in IMAGE_OPTIONS.items() if getattr(args, name, default) != default]
    if getattr(args, "composite", None) is not None:
        given.append("composite")
    if given:
        option = given[0].replace("_", "-")
        raise InputError(f"--{option}: is an option of the image models; the text model takes sentences (and --layer, "
                         "--n-steps, --target, --weights, --tolerance, --out)")


def _read_lines(given: str) -> list[str]:
    """The lines of a UTF-8 file (a BOM is dropped) or of standard input (``-``); lines are split at
    line feeds only (with or without a carriage return), never at other Unicode separators."""
    if given == "-":
        raw = sys.stdin.buffer.read()
    else:
        path = Path(given)
        if path.is_dir():
            raise InputError(f"--sentences: {path} is a folder, not a file")
        if not path.exists():
            raise InputError(f"--sentences: no such file: {path}")
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise InputError(f"--sentences: cannot read {path} ({error.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"--sentences: {given} is not UTF-8 text (byte {error.start})") from None
    return [line.rstrip("\r") for line in text.split("\n")]


def _sentences(args) -> tuple[list[Sentence], str]:
    """The sentences to explain and where they came from."""
    from .models.text import sample_sentences

    sentences = [Sentence(text, None, f"sentence {i + 1}") for i, text in enumerate(args.images)]
    source = "command line"
    if args.sentences is not None:
        lines = _read_lines(args.sentences)
        shown = "standard input" if args.sentences == "-" else args.sentences
        from_file = [Sentence(line.strip(), None, f"{shown} line {i + 1}") for i, line in enumerate(lines) if line.strip()]
        if not from_file:
            raise InputError(f"--sentences: {shown} holds no sentence (one per line)")
        sentences += from_file
        source = f"command line and {shown}" if args.images else shown
    if not sentences:
        texts, labels = sample_sentences()
        return [Sentence(t, int(v), f"sample {i + 1}") for i, (t, v) in enumerate(zip(texts, labels))], \
            "held-out sentences shipped with the model"
    return sentences, source


def _load(args):
    import torch

    from .cli_inputs import _apply, _state_dict
    from .models.text import PAD_ID, TextCNN, load_text_model, load_vocabulary, training_record

    vocabulary = load_vocabulary()
    if args.weights in (None, "DEFAULT"):
        model, weights = load_text_model(), "embedded (trained by attrib.models.train_text)"
    else:
        state = _state_dict(args.weights)
        if "embedding.weight" not in state or "convs.0.weight" not in state:
            raise InputError(f"--weights: {args.weights} is not a state dict of the text CNN (no embedding.weight, convs.0.weight)")
        bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise InputError(f"--weights: {args.weights} holds NaN or infinite values (in {bad[0]})")
        vocabulary_size, dim = state["embedding.weight"].shape
        if vocabulary_size != len(vocabulary):
            raise InputError(f"--weights: its embedding has {vocabulary_size} rows, but the shipped vocabulary has "
                             f"{len(vocabulary)} words")
        model = TextCNN(vocabulary_size, dim, filters=state["convs.0.weight"].shape[0])
        _apply(model, state, args.weights)
        weights = str(args.weights)
    padding_zero = bool((model.embedding.weight[PAD_ID] == 0).all())
    return model.to(torch.float64).eval(), vocabulary, weights, training_record(), padding_zero


def _layers(model, given: str | None) -> list[str]:
    from .hooks import resolve_layers

    if given is None:
        return list(CONVOLUTIONS)
    names = [part.strip() for part in given.split(",") if part.strip()]
    if not names:
        raise InputError(f"--layer: give a layer name, e.g. {', '.join(CONVOLUTIONS)}")
    resolved = [name for name, _ in resolve_layers(model, names, argument="--layer")]
    if "embedding" in resolved:
        raise InputError("--layer: 'embedding' is where every path is interpolated; its conductance is the integrated "
                         f"gradients the report already shows per token; choose a later layer, e.g. {', '.join(CONVOLUTIONS)}")
    return resolved


def _check_layers(model, ids, layers: list[str]) -> None:
    """Every layer is downstream of the embedding and upstream of the output (else one line, exit 2)."""
    import torch

    from .hooks import capture, frozen_parameters

    with frozen_parameters(model), capture(model, ["embedding"], leaf=True), \
            capture(model, layers, leaf=True, argument="--layer") as cap, torch.enable_grad():
        output = model(ids)
        for name in layers:
            value = cap[name]
            if name in cap.made_leaves or not value.is_floating_point():
                raise InputError(f"--layer: {name!r} does not depend on the embedding (the path is interpolated there), "
                                 f"so it has nothing to explain; choose one of {', '.join(CONVOLUTIONS)} or a later layer")
            grad, = torch.autograd.grad(output.sum(), value, retain_graph=True, allow_unused=True)
            if grad is None:
                raise InputError(f"--layer: {name!r} is not upstream of the output (the prediction does not depend on it); "
                                 f"choose one of {', '.join(CONVOLUTIONS)}")


def _encode(vocabulary, sentence: Sentence):
    """Ids (1, 64) and unknown words, or a one-line error naming where the sentence came from."""
    from .models.text import MAX_LENGTH, tokenize

    tokens = tokenize(sentence.text)
    shown = sentence.text if len(sentence.text) <= 50 else sentence.text[:47] + "..."
    if not tokens:
        raise InputError(f"{sentence.origin} ({shown!r}) is empty (no tokens)")
    if len(tokens) > MAX_LENGTH:
        raise InputError(f"{sentence.origin} ({shown!r}) has {len(tokens)} tokens; the model reads at most {MAX_LENGTH}")
    ids, unknown = vocabulary.encode([sentence.text])
    return ids, unknown[0], tokens


@dataclass
class _Run:
    """What every sentence shares: the model, the layers and whether they are cuts, the settings."""

    model: Any
    vocabulary: Any
    layers: list[str]
    cuts: dict[str, bool]
    steps: int
    args: Any
    folder: Path


def _rows(run: _Run, totals: dict[str, float], change: float) -> list[dict]:
    """Completeness of the layers' conductance: a check where a layer (or the layers together) is a cut,
    else each one's share of the change."""
    from .cli_common import _check, _share

    together = "+".join(run.layers)
    if len(run.layers) > 1 and run.cuts.get(together):
        return [_check("conductance", " + ".join(run.layers) + " (together a cut)", sum(totals.values()), change,
                       "F(x) - F(x')", run.args.tolerance, "each alone carries its branch's share: "
                       + ", ".join(f"{name} {value:+.4g}" for name, value in totals.items()))]
    return [_check("conductance", f"{name} (a cut)", totals[name], change, "F(x) - F(x')", run.args.tolerance)
            if run.cuts.get(name) else
            _share("conductance", name, totals[name], change, short="share of F(x) - F(x')",
                   note="not a cut (other branches bypass it): its conductance is the share of the change that flows "
                        "through it")
            for name in run.layers]


def _explain(run: _Run, sentence: Sentence, index: int) -> dict:
    import torch

    from attrib.viz import figures
    from attrib.viz.text import filter_token_figure, token_figure

    from .cli_common import _check, _file_safe, _target
    from .conductance import LayerConductance, NeuronConductance
    from .gradients import IntegratedGradients
    from .models.text import CLASSES, PAD_ID, UNK, invisible_characters
    from .result import filter_scores, token_scores

    started = time.perf_counter()
    model, steps = run.model, run.steps
    ids, unknown, words = _encode(run.vocabulary, sentence)
    count = len(words)
    read_as = run.vocabulary.decode(ids[0])
    with torch.no_grad():
        logits = model(ids)
    if not torch.isfinite(logits).all():
        raise InputError(f"--weights: the model's scores for {sentence.origin} are not finite")
    probabilities = logits.softmax(1)[0]
    target = _target(run.args, logits)
    baselines = torch.full_like(ids, PAD_ID)
    ig = IntegratedGradients(model, interpolate_at="embedding").attribute(ids, target=target, baselines=baselines, n_steps=steps)
    per_token = token_scores(ig["embedding"])[0]
    assert ig.outputs is not None and ig.baseline_outputs is not None, "integrated gradients report both ends"
    outputs, baseline_outputs = float(ig.outputs[0]), float(ig.baseline_outputs[0])
    change = outputs - baseline_outputs
    conductance = LayerConductance(model, run.layers, interpolate_at="embedding").attribute(
        ids, target=target, baselines=baselines, n_steps=steps)
    checks = [_check("integrated gradients", "embedding (all tokens)", float(per_token.sum()), change, "F(x) - F(x')",
                     run.args.tolerance)]
    checks += _rows(run, {name: float(conductance[name].sum()) for name in run.layers}, change)
    scores = {name: filter_scores(conductance[name])[0] for name in run.layers}
    ranked = sorted(((float(v), name, c) for name, s in scores.items() for c, v in enumerate(s.tolist())),
                    key=lambda item: -abs(item[0]))[:TOP]
    top: list[dict[str, Any]] = []
    for name in dict.fromkeys(name for _, name, _ in ranked):  # one sweep per layer, all its chosen units at once
        chosen = [(value, c) for value, n, c in ranked if n == name]
        tail = (slice(None),) * (conductance[name].dim() - 2)  # the whole filter (a unit, for a dense layer)
        through = NeuronConductance(model, name, interpolate_at="embedding").attribute(
            ids, [(c,) + tail for _, c in chosen], target=target, baselines=baselines, n_steps=steps)
        split = token_scores(through["embedding"].flatten(0, 1)).view(len(chosen), -1)[:, :count]
        top += [{"layer": name, "unit": c, "conductance": value, "tokens": row.tolist(), "sum_over_tokens": float(row.sum())}
                for (value, c), row in zip(chosen, split)]
    top.sort(key=lambda f: -abs(f["conductance"]))
    stem = f"{index:02d}_{_file_safe(sentence.text, 40)}"
    entry: dict[str, Any] = {
        "sentence": sentence.text, "origin": sentence.origin, "tokens": words, "ids": ids[0, :count].tolist(),
        "read_as": read_as[:count], "unknown_words": unknown, "invisible_characters_dropped": invisible_characters(sentence.text),
        "padded_to": int(ids.shape[1]),
        "prediction": {"class": int(logits.argmax(1)), "label": CLASSES[int(logits.argmax(1))],
                       "probabilities": dict(zip(CLASSES, probabilities.tolist()))},
        "target": target, "target_label": CLASSES[target], "label": None if sentence.label is None else CLASSES[sentence.label],
        "token_scores": per_token[:count].tolist(), "outputs": outputs, "baseline_outputs": baseline_outputs,
        "checks": checks, "unit_conductance": {name: s.tolist() for name, s in scores.items()}, "top_units": top,
        "figures": [],
    }
    shown = [w if t != UNK else f"{w}?" for w, t in zip(words, read_as)]
    with warnings.catch_warnings():  # a glyph the font lacks (an emoji) is drawn as a box, not reported 12 times
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        figures.save(token_figure(shown, entry["token_scores"], f"integrated gradients per token for '{CLASSES[target]}' "
                                                                 f"(p = {float(probabilities[target]):.3f})"),
                     run.folder / f"{stem}_tokens.png")
        entry["figures"].append({"file": f"{stem}_tokens.png", "title": "tokens coloured by integrated gradients at the "
                                 "embedding (red adds to the explained class, blue takes from it; ? marks an unknown word)"})
        figures.save(filter_token_figure(shown, [f"{f['layer']}:{f['unit']} ({f['conductance']:+.3f})" for f in top],
                                         [list(f["tokens"]) for f in top], "conductance of the top units, split over the tokens"),
                     run.folder / f"{stem}_units.png")
    entry["figures"].append({"file": f"{stem}_units.png", "title": "the top units' conductance split over the tokens "
                             "(neuron conductance at the embedding; a row's sum is the unit's conductance up to quadrature "
                             "error, both are in the table below)"})
    entry["seconds"] = time.perf_counter() - started
    return entry


def print_layers(args) -> int:
    """``attrib layers text``: every module's name, type and output shape for one sentence."""
    from .cli_common import print_layer_shapes

    _refuse_image_options(args)
    model, vocabulary, *_ = _load(args)
    ids, _ = vocabulary.encode(["the plot was not good at all"])
    print_layer_shapes(model, ids, f"input {tuple(ids.shape[1:])} token ids (every sentence padded to that many slots)")
    return 0


def explain_text(args) -> int:
    from attrib.viz.text import write_text_html

    from .cli_common import _check_numbers
    from .cuts import cut_layers
    from .report_folder import check_out, staged

    started = time.perf_counter()
    _refuse_image_options(args)
    if args.methods is not None:
        raise InputError("--methods: the text model's report has one set of methods (integrated gradients and conductance "
                         "at the embedding); leave --methods out")
    _check_numbers(args)
    steps = args.n_steps if args.n_steps is not None else STEPS
    if not 1 <= steps <= 10_000:
        raise InputError(f"--n-steps: must be 1 to 10000, got {steps}")
    out = check_out(args.out)
    sentences, source = _sentences(args)
    with staged(out) as staging:
        import torch

        torch.manual_seed(0)
        model, vocabulary, weights, record, padding_zero = _load(args)
        layers = _layers(model, args.layer)
        first, _, _ = _encode(vocabulary, sentences[0])
        for sentence in sentences[1:]:  # every sentence is checked before any work
            _encode(vocabulary, sentence)
        _check_layers(model, first, layers)
        cuts = cut_layers(model, first, layers, interpolate_at="embedding", together=len(layers) > 1)
        run = _Run(model, vocabulary, layers, cuts, steps, args, staging)
        entries = [_explain(run, sentence, i) for i, sentence in enumerate(sentences)]
        baseline = ("every token the padding id, whose embedding is 0" if padding_zero else
                    "every token the padding id (its embedding row in these weights is not 0)")
        report = {
            "model": {"name": "text", "weights": weights, "training": record, "notes": [f"baseline: {baseline}, 64 slots"]},
            "kind": "text", "layers": layers, "cuts": cuts, "source": source, "baseline": baseline,
            "settings": {"n_steps": steps, "top_units": TOP}, "tolerance": args.tolerance, "sentences": entries,
            "seconds": time.perf_counter() - started, "argv": sys.argv[1:],
        }
        (staging / "report.json").write_text(json.dumps(report, indent=1))
        write_text_html(report, staging)
    if not args.quiet:
        print(f"wrote {out / 'index.html'} ({len(entries)} sentences, {report['seconds']:.1f} s)")
    return 0
