"""``attrib explain --model text``: token heatmaps, filter conductance and completeness for the embedded
sentiment CNN (:mod:`attrib.models.text`), written as a report folder like the image runs.

Per sentence: the prediction; integrated gradients interpolated at the embedding (baseline: every token
the padding id, whose embedding is 0), summed per token; the conductance of every filter of the
convolutions, through the same kind of sweep; the conductance of the top filters split over the tokens
(neuron conductance at the embedding); and the completeness of both against F(x) - F(x').
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import InputError

CONVOLUTIONS = ("convs.0", "convs.1", "convs.2")
TOP = 5  # filters shown per sentence
STEPS = 50
IMAGE_OPTIONS = ("channels", "input_size", "mean", "std", "output")


def _sentences(args) -> tuple[list[str], list[int | None], str]:
    """The sentences to explain, their labels where known, and where they came from."""
    from .models.text import sample_sentences

    given = list(args.images)
    labels: list[int | None] = [None] * len(given)
    source = "command line"
    if args.sentences is not None:
        path = Path(args.sentences)
        if not path.is_file():
            raise InputError(f"--sentences: {'is a folder, not a file' if path.is_dir() else 'no such file'}: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise InputError(f"--sentences: {path} is not UTF-8 text (byte {error.start})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise InputError(f"--sentences: {path} holds no sentence (one per line)")
        given += from_file
        labels += [None] * len(from_file)
        source = "command line and " + str(path) if args.images else str(path)
    if not given:
        sentences, known = sample_sentences()
        return sentences, [int(v) for v in known], "held-out sentences shipped with the model"
    return given, labels, source


def _load(args):
    import torch

    from .cli_inputs import _apply, _state_dict
    from .models.text import TextCNN, load_text_model, load_vocabulary, training_record

    vocabulary = load_vocabulary()
    if args.weights in (None, "DEFAULT"):
        model, weights = load_text_model(), "embedded (trained by attrib.models.train_text)"
    else:
        state = _state_dict(args.weights)
        if "embedding.weight" not in state or "convs.0.weight" not in state:
            raise InputError(f"--weights: {args.weights} is not a state dict of the text CNN (no embedding.weight, convs.0.weight)")
        vocabulary_size, dim = state["embedding.weight"].shape
        if vocabulary_size != len(vocabulary):
            raise InputError(f"--weights: its embedding has {vocabulary_size} rows, but the shipped vocabulary has "
                             f"{len(vocabulary)} words")
        model = TextCNN(vocabulary_size, dim, filters=state["convs.0.weight"].shape[0])
        _apply(model, state, args.weights)
        weights = str(args.weights)
    return model.to(torch.float64).eval(), vocabulary, weights, training_record()


def _layers(model, given: str | None) -> list[str]:
    from .hooks import resolve_layers

    if given is None:
        return list(CONVOLUTIONS)
    try:
        names = [name for name, _ in resolve_layers(model, [part.strip() for part in given.split(",") if part.strip()])]
    except InputError as error:
        raise InputError(f"--layer: {str(error).split(': ', 1)[-1]}") from None
    if "embedding" in names:
        raise InputError("--layer: 'embedding' is where every path is interpolated; its conductance is the integrated "
                         f"gradients the report already shows per token; choose a later layer, e.g. {', '.join(CONVOLUTIONS)}")
    return names


def _check_layers(model, ids, layers: list[str]) -> None:
    """Every layer is downstream of the embedding and upstream of the output (else one line, exit 2)."""
    import torch

    from .hooks import capture, frozen_parameters

    with frozen_parameters(model), capture(model, ["embedding"], leaf=True) as embedded, \
            capture(model, layers, leaf=True) as cap, torch.enable_grad():
        output = model(ids)
        for name in layers:
            if name == "embedding":
                continue
            value = cap[name]
            if name in cap.made_leaves:
                raise InputError(f"--layer: {name!r} does not depend on the embedding (the path is interpolated there), "
                                 f"so it has nothing to explain; choose one of {', '.join(CONVOLUTIONS)} or a later layer")
            grad, = torch.autograd.grad(output.sum(), value, retain_graph=True, allow_unused=True)
            if grad is None:
                raise InputError(f"--layer: {name!r} is not upstream of the output (the prediction does not depend on it); "
                                 f"choose one of {', '.join(CONVOLUTIONS)}")
        del embedded


def _check(method: str, where: str, value: float, reference: float, tolerance: float, note: str = "") -> dict:
    from .cli_common import _check as check

    return check(method, where, value, reference, "F(x) - F(x')", tolerance, note)


def _encode(vocabulary, sentence: str, index: int):
    try:
        return vocabulary.encode([sentence])
    except InputError as error:
        detail = str(error).split(" ", 1)[-1] if str(error).startswith("sentences[0]") else str(error)
        shown = sentence if len(sentence) <= 50 else sentence[:47] + "..."
        detail = detail.replace("max_length=", "the model's limit of ")
        raise InputError(f"sentence {index + 1} ({shown!r}) {detail}" + (" tokens" if "limit of" in detail else "")) from None


def _explain(model, vocabulary, sentence: str, label: int | None, args, layers: list[str], folder: Path, index: int,
             steps: int) -> dict:
    import torch

    from attrib.viz import figures
    from attrib.viz.text import filter_token_figure, token_figure

    from .cli_common import _file_safe, _target
    from .conductance import LayerConductance, NeuronConductance
    from .gradients import IntegratedGradients
    from .models.text import CLASSES, PAD_ID, UNK
    from .result import filter_scores, token_scores

    started = time.perf_counter()
    ids, unknown = _encode(vocabulary, sentence, index)
    tokens = vocabulary.decode(ids[0])
    words = [token for token in _tokens(sentence)]
    count = len(words)
    with torch.no_grad():
        logits = model(ids)
    probabilities = logits.softmax(1)[0]
    target = _target(args, logits)
    baselines = torch.full_like(ids, PAD_ID)
    ig = IntegratedGradients(model, interpolate_at="embedding").attribute(ids, target=target, baselines=baselines, n_steps=steps)
    per_token = token_scores(ig["embedding"])[0]
    assert ig.outputs is not None and ig.baseline_outputs is not None, "integrated gradients report both ends"
    outputs, baseline_outputs = float(ig.outputs[0]), float(ig.baseline_outputs[0])
    change = outputs - baseline_outputs
    conductance = LayerConductance(model, layers, interpolate_at="embedding").attribute(
        ids, target=target, baselines=baselines, n_steps=steps)
    checks = [_check("integrated gradients", "embedding (all tokens)", float(per_token.sum()), change, args.tolerance)]
    scores = {name: filter_scores(conductance[name])[0] for name in layers if conductance[name].dim() >= 2}
    totals = {name: float(conductance[name].sum()) for name in layers}
    if set(layers) == set(CONVOLUTIONS):
        checks.append(_check("conductance", " + ".join(layers) + " (together a cut)", sum(totals.values()), change,
                             args.tolerance, "each convolution alone carries its branch's share: " + ", ".join(
                                 f"{name} {value:+.4g}" for name, value in totals.items())))
    else:
        from .cli_common import _share

        for name in layers:
            checks.append(_share("conductance", name, totals[name], change, short="share of F(x) - F(x')",
                                 note="one branch or layer: its conductance is the share of the change that flows through it"))
    ranked = sorted(((float(v), name, c) for name, s in scores.items() for c, v in enumerate(s.tolist())),
                    key=lambda item: -abs(item[0]))[:TOP]
    top: list[dict[str, Any]] = []
    for value, name, channel in ranked:
        selector = (channel,) + (slice(None),) * (conductance[name].dim() - 2)  # the whole filter (or unit, for a dense layer)
        through = NeuronConductance(model, name, interpolate_at="embedding").attribute(
            ids, selector, target=target, baselines=baselines, n_steps=steps)
        top.append({"layer": name, "filter": channel, "conductance": value,
                    "tokens": token_scores(through["embedding"])[0, :count].tolist()})
    stem = f"{index:02d}_{_file_safe(sentence, 40)}"
    entry: dict[str, Any] = {
        "sentence": sentence, "tokens": words, "ids": ids[0, :count].tolist(), "read_as": tokens[:count],
        "unknown_words": unknown[0], "padded_to": int(ids.shape[1]),
        "prediction": {"class": int(logits.argmax(1)), "label": CLASSES[int(logits.argmax(1))],
                       "probabilities": dict(zip(CLASSES, probabilities.tolist()))},
        "target": target, "target_label": CLASSES[target], "label": None if label is None else CLASSES[label],
        "token_scores": per_token[:count].tolist(), "outputs": outputs, "baseline_outputs": baseline_outputs,
        "checks": checks, "filter_conductance": {name: s.tolist() for name, s in scores.items()}, "top_filters": top,
        "figures": [],
    }
    shown = [f"{w}" if t != UNK else f"{w}?" for w, t in zip(words, tokens)]
    fig = token_figure(shown, entry["token_scores"], f"integrated gradients per token for '{CLASSES[target]}' "
                                                      f"(p = {float(probabilities[target]):.3f})")
    figures.save(fig, folder / f"{stem}_tokens.png")
    entry["figures"].append({"file": f"{stem}_tokens.png", "title": "tokens coloured by integrated gradients at the "
                             "embedding (red adds to the explained class, blue takes from it; ? marks an unknown word)"})
    if top:
        fig = filter_token_figure(shown, [f"{f['layer']}:{f['filter']} ({f['conductance']:+.3f})" for f in top],
                                  [list(f["tokens"]) for f in top], "conductance of the top filters, split over the tokens")
        figures.save(fig, folder / f"{stem}_filters.png")
        entry["figures"].append({"file": f"{stem}_filters.png", "title": "the top filters' conductance split over the "
                                 "tokens (neuron conductance at the embedding; each row adds up to the filter's conductance)"})
    entry["seconds"] = time.perf_counter() - started
    return entry


def _tokens(sentence: str) -> list[str]:
    from .models.text import tokenize

    return tokenize(sentence)


def explain_text(args) -> int:
    from attrib.viz.text import write_text_html

    from .report_folder import check_out, staged

    started = time.perf_counter()
    for option in IMAGE_OPTIONS:
        if getattr(args, option, None) is not None:
            raise InputError(f"--{option.replace('_', '-')}: is an image-model option; the text model takes sentences")
    if args.methods is not None:
        raise InputError("--methods: the text model's report has one set of methods (integrated gradients and conductance "
                         "at the embedding); leave --methods out")
    from .cli_common import _check_numbers

    _check_numbers(args)
    steps = args.n_steps if args.n_steps is not None else STEPS
    if not 1 <= steps <= 10_000:
        raise InputError(f"--n-steps: must be 1 to 10000, got {steps}")
    out = check_out(args.out)
    sentences, labels, source = _sentences(args)
    with staged(out) as staging:
        import torch

        torch.manual_seed(0)
        model, vocabulary, weights, record = _load(args)
        layers = _layers(model, args.layer)
        for i, sentence in enumerate(sentences):  # every sentence is checked before any work
            ids, _ = _encode(vocabulary, sentence, i)
            if i == 0:
                _check_layers(model, ids, layers)
        entries = [_explain(model, vocabulary, s, label, args, layers, staging, i, steps)
                   for i, (s, label) in enumerate(zip(sentences, labels))]
        report = {
            "model": {"name": "text", "weights": weights, "training": record,
                      "notes": ["baseline: every token the padding id (embedding 0), same length"]},
            "kind": "text", "layers": layers, "source": source, "settings": {"n_steps": steps, "top_filters": TOP},
            "tolerance": args.tolerance, "sentences": entries, "seconds": time.perf_counter() - started,
            "argv": sys.argv[1:],
        }
        (staging / "report.json").write_text(json.dumps(report, indent=1))
        write_text_html(report, staging)
    if not args.quiet:
        print(f"wrote {out / 'index.html'} ({len(entries)} sentences, {report['seconds']:.1f} s)")
    return 0
