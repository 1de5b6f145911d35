"""Token heatmaps: a sentence's tokens coloured by their attributions (red adds to the explained class,
blue takes from it), as a matplotlib figure and as HTML, and a filters x tokens table as a figure."""
from __future__ import annotations

import html
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

CMAP = "bwr"  # blue (takes from the class) - white (nothing) - red (adds to it)


def _limit(values: Sequence[float]) -> float:
    """The colour scale's half-width: the largest |value| (1 when every value is 0)."""
    return max((abs(v) for v in values), default=0.0) or 1.0


def colour(value: float, limit: float) -> tuple[float, float, float]:
    """The RGB colour of ``value`` on the symmetric red/blue scale of half-width ``limit``."""
    cmap = plt.get_cmap(CMAP)
    r, g, b, _ = cmap(0.5 + 0.5 * max(-1.0, min(1.0, value / limit)))
    return r, g, b


def token_html(tokens: Sequence[str], scores: Sequence[float], unknown: Sequence[bool] = ()) -> str:
    """The tokens as coloured ``<span>``s, each with its score as a tooltip; unknown words underlined."""
    limit = _limit(scores)
    spans = []
    for i, (token, score) in enumerate(zip(tokens, scores)):
        r, g, b = colour(score, limit)
        style = f"background: rgb({int(255 * r)},{int(255 * g)},{int(255 * b)}); padding: 2px 4px; margin: 1px; border-radius: 3px;"
        if i < len(unknown) and unknown[i]:
            style += " text-decoration: underline dotted;"
        title = f"{score:+.4g}" + (" (unknown word: read as <unk>)" if i < len(unknown) and unknown[i] else "")
        spans.append(f"<span style='{style}' title='{html.escape(title, quote=True)}'>{html.escape(token)}</span>")
    return "<p class='tokens' style='font-size: 1.3em; line-height: 2em;'>" + " ".join(spans) + "</p>"


def token_figure(tokens: Sequence[str], scores: Sequence[float], title: str):
    """The sentence with each token on its colour and its score beneath, wrapped to lines, and a
    colour bar. Tokens are placed by their rendered width, so spacing is even."""
    limit = _limit(scores)
    width_in, margin, gap = 10.0, 0.15, 0.12  # inches
    fig = plt.figure(figsize=(width_in, 1.0))
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = {"boxstyle": "round,pad=0.25", "edgecolor": "#999", "linewidth": 0.4}
    placed: list[tuple[float, int, str, float]] = []  # (x inches, line, token, score)
    x, line = margin, 0
    for token, score in zip(tokens, scores):
        probe = fig.text(0, 0, token, family="monospace", fontsize=12)
        extent = max(probe.get_window_extent(renderer).width / fig.dpi + 0.15, 0.55)  # room for the score beneath
        probe.remove()
        if x > margin and x + extent > width_in - margin:
            x, line = margin, line + 1
        placed.append((x, line, token, score))
        x += extent + gap
    lines = line + 1
    line_in, top_in, bar_in = 0.75, 0.45, 0.75
    height = top_in + lines * line_in + bar_in
    fig.set_size_inches(width_in, height)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    for x, row, token, score in placed:
        y = 1 - (top_in + row * line_in + 0.25) / height
        text = fig.text(x / width_in, y, token, family="monospace", fontsize=12, va="center", ha="left",
                        bbox={**boxes, "facecolor": colour(score, limit)})
        middle = text.get_window_extent(renderer).x0 / fig.dpi + (text.get_window_extent(renderer).width / fig.dpi) / 2
        fig.text(middle / width_in, y - 0.3 / height, "0" if abs(score) < 5e-4 else f"{score:+.3f}", fontsize=7, color="#444",
                 va="center", ha="center")
    bar = fig.add_axes((0.3, 0.42 / height, 0.4, 0.12 / height))
    mappable = plt.cm.ScalarMappable(norm=TwoSlopeNorm(0.0, -limit, limit), cmap=CMAP)
    colourbar = fig.colorbar(mappable, cax=bar, orientation="horizontal")
    colourbar.set_label("attribution to the explained class (red adds, blue takes away)", fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    return fig


def filter_token_figure(tokens: Sequence[str], rows: Sequence[str], matrix: Sequence[Sequence[float]], title: str):
    """A heatmap: one row per filter (``rows`` its labels), one column per token, each cell the
    conductance of that filter that flows through that token."""
    limit = _limit([v for row in matrix for v in row])
    width = min(16.0, max(4.0, 0.55 * len(tokens) + 2.0))
    fig, ax = plt.subplots(figsize=(width, 0.8 + 0.4 * len(rows)))
    image = ax.imshow(matrix, cmap=CMAP, norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto")
    ax.set_xticks(range(len(tokens)), labels=list(tokens), rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    if (width - 2.0) / max(1, len(tokens)) >= 0.4:  # numbers only where a cell has room for them
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if abs(value) >= 0.2 * limit:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _sentence(entry: dict) -> list[str]:
    from .report import _table, check_table

    prediction = entry["prediction"]
    probabilities = ", ".join(f"{label} {p:.3f}" for label, p in prediction["probabilities"].items())
    parts = [f"<h2>“{html.escape(entry['sentence'])}”</h2>",
             f"<p>prediction: <b>{html.escape(prediction['label'])}</b> ({html.escape(probabilities)}); explained: "
             f"{html.escape(entry['target_label'])}" + (f"; true label {html.escape(entry['label'])}" if entry.get("label") else "")
             + f" <span class='small'>({html.escape(entry['origin'])})</span></p>"]
    unknown = [token == "<unk>" for token in entry["read_as"]]
    parts.append(token_html(entry["tokens"], entry["token_scores"], unknown))
    notes = []
    if entry["unknown_words"]:
        notes.append("unknown words, read as the unknown token &lt;unk&gt;: "
                     + ", ".join(f"<code>{html.escape(w)}</code>" for w in entry["unknown_words"]))
    if entry.get("invisible_characters_dropped"):
        notes.append("invisible characters dropped: " + html.escape(", ".join(entry["invisible_characters_dropped"])))
    if entry["padded_to"] > len(entry["tokens"]):
        notes.append(f"padded with the padding id to the {entry['padded_to']} token slots the model always reads; the padding "
                     "equals the baseline there, so it gets 0")
    notes.append("tokens: lower-cased; punctuation and clitics (n't, 's) are tokens of their own")
    parts.append("<ul class='small'>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>")
    parts.append("<h3>completeness</h3>")
    parts.append(check_table(entry["checks"]))
    for figure in entry["figures"]:
        parts.append(f"<figure><img src='{html.escape(figure['file'], quote=True)}' alt='{html.escape(figure['title'])}'>"
                     f"<figcaption>{html.escape(figure['title'])}</figcaption></figure>")
    if entry["top_units"]:
        parts.append("<h3>top units by conductance, split over the tokens</h3>")
        rows = [[f"{f['layer']}:{f['unit']}", f["conductance"], f["sum_over_tokens"]] + [round(v, 4) for v in f["tokens"]]
                for f in entry["top_units"]]
        parts.append(_table(rows, ["unit", "conductance", "sum over tokens"] + entry["tokens"]))
    return parts


def _accuracy(training: dict) -> str:
    """The model's held-out accuracies, the hard sets included."""
    accuracy = training.get("accuracy") or {}
    templates, corpus, by_word = accuracy.get("templates") or {}, accuracy.get("corpus") or {}, accuracy.get("by_word") or {}
    parts = []
    if templates:
        parts.append(f"template sentences {templates.get('all', 0):.3f} (negated {templates.get('negated', 0):.3f})")
    if corpus:
        parts.append(f"real review snippets {corpus.get('all', 0):.3f} (with a negator {corpus.get('with_negator', 0):.3f})")
    if by_word:
        parts.append(f"templates with words no template taught {by_word.get('all', 0):.3f} (negated {by_word.get('negated', 0):.3f})")
    return "; ".join(parts)


def write_text_html(report: dict, folder) -> object:
    """Write ``index.html`` for a text run (``report["sentences"]``); the figures must already be there."""
    from pathlib import Path

    from .report import STYLE

    layers, cuts = report["layers"], report.get("cuts", {})
    together = "+".join(layers)
    if len(layers) > 1 and cuts.get(together):
        where = "Together these layers are a cut (every path from the embedding crosses one of them), so their units' " \
                "conductances add up to the same change; each alone carries its share."
    elif all(cuts.get(name) for name in layers):
        where = "Every path crosses this layer (a cut), so its units' conductances add up to the same change."
    else:
        where = "Other branches bypass some of these layers, so their conductance is the share of the change that flows " \
                "through them."
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>attrib report: text</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>attrib report: text sentiment CNN</h1>",
             f"<p>weights: {html.escape(str(report['model']['weights']))}; sentences from {html.escape(report['source'])}; "
             f"conductance at <code>{html.escape(', '.join(layers))}</code>; {report['seconds']:.1f} s in all.</p>",
             "<p class='small'>Every path is interpolated at the embedding, from the baseline "
             f"({html.escape(report['baseline'])}) to the sentence. Integrated gradients there, summed over the embedding "
             "dimensions, give one number per token; they add up to F(x) − F(x′), the change of the explained class's "
             f"score (a logit). {where} Each top unit's conductance splits over the tokens (neuron conductance at the "
             "embedding).</p>"]
    accuracy = _accuracy(report["model"].get("training") or {})
    if accuracy:
        parts.append(f"<p class='small'>held-out accuracy of the model: {html.escape(accuracy)}</p>")
    for entry in report["sentences"]:
        parts.extend(_sentence(entry))
    parts.append("<p>Every number is in <a href='report.json'>report.json</a>.</p></body></html>")
    path = Path(folder) / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
