"""The HTML report: every figure the run wrote, next to the numbers from report.json."""
from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote


def _table(rows: list[list], header: list[str], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
        for row, cls in zip(rows, classes or [""] * len(rows))
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _src(file: str) -> str:
    """A file name as a URL path segment (``#``, ``%``, ``?``, spaces... percent-encoded), then HTML-escaped."""
    return html.escape(quote(file), quote=True)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child { text-align: left; } td:last-child { text-align: left; }
tr.fail td { background: #fde2e2; } tr.pass td:nth-last-child(2) { color: #176417; }
figure { margin: 0.5em 0 1.5em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #a33; } .small { font-size: 0.85em; color: #555; }
"""


def check_table(checks: list[dict]) -> str:
    """The completeness rows as a table: value, reference, relative error and verdict (or share)."""
    rows, classes = [], []
    for c in checks:
        if c.get("passed") is None:
            verdict, error = f"share {c['share']:.3f}", None
        else:
            verdict, error = ("pass" if c["passed"] else "FAIL") + f" (≤ {c['tolerance']:g})", c["relative_error"]
        rows.append([c["method"], c["where"], c["value"], f"{c['reference_name']} = {c['reference']:.4g}", error, verdict,
                     c.get("note", "")])
        classes.append("" if c.get("passed") is None else ("pass" if c["passed"] else "fail"))
    return _table(rows, ["method", "where", "sum of attributions", "should be", "relative error", "verdict", "note"], classes)


def _checks(checks: list[dict]) -> list[str]:
    return ["<h3>completeness and conservation</h3>",
            "<p class='small'>Path methods (integrated gradients, DeepLIFT, conductance) should add up to "
            "F(x) − F(x′), the score change from the baseline (a black image), and are marked pass or fail against the "
            "tolerance. Conductance adds up to F(x) − F(x′) only at a layer every path crosses; elsewhere the row shows "
            "its share. LRP starts from F(x) itself; its row shows the share that reaches the input, the rest being "
            "absorbed by biases and ε by design (information, not a check; <code>attrib audit</code> checks conservation "
            "layer by layer).</p>",
            check_table(checks)]


def _header(report: dict) -> list[str]:
    """The page head and the run's summary: model, layer, methods, settings, notes, skipped methods."""
    model = report["model"]
    cut = report.get("layer_is_cut")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>attrib report: {html.escape(model['name'])}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>attrib report: {html.escape(model['name'])}</h1>",
             f"<p>weights: {html.escape(model['weights'])}; layer explained: <code>{html.escape(str(report['layer']))}</code>"
             + ("" if cut is None else " (every path crosses it)" if cut else " (not a cut: a skip connection bypasses it)")
             + f"; methods: {html.escape(', '.join(report['methods']))}; {report['seconds']:.1f} s in all.</p>"]
    settings = report.get("settings")
    if settings:
        parts.append("<p class='small'>settings: " + html.escape(", ".join(f"{k} = {v}" for k, v in settings.items())) + "</p>")
    for note in model.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for method, reason in report.get("skipped", {}).items():
        parts.append(f"<p class='note'>skipped {html.escape(method)}: {html.escape(reason)}</p>")
    return parts


def _image(image: dict) -> list[str]:
    """One picture's section: input record, prediction, checks, figures, tables."""
    parts: list[str] = []
    prediction = image["prediction"]
    parts.append(f"<h2>{html.escape(image['name'])}</h2>")
    record = image.get("input") or {}
    if record:
        described = [record.get("source", "")]
        if record.get("mode"):
            described.append(f"{record['mode']}, {record['size'][0]}×{record['size'][1]}")
        parts.append("<p class='small'>input: " + html.escape("; ".join(d for d in described if d)) + "</p>")
        if record.get("steps"):
            parts.append("<ul class='small'>" + "".join(f"<li>{html.escape(s)}</li>" for s in record["steps"]) + "</ul>")
    parts.append("<p>prediction: class {} (p = {:.3f}); explained target: {}{}</p>".format(
        prediction["class"], prediction["probability"], image["target"],
        f"; true label {image['label']}" if image.get("label") is not None else ""))
    parts.append(_table([[c, p] for c, p in prediction["top"]], ["class", "probability"]))
    if image.get("checks"):
        parts.extend(_checks(image["checks"]))
    for figure in image["figures"]:
        parts.append(f"<figure><img src='{_src(figure['file'])}' alt='{html.escape(figure['title'])}'>"
                     f"<figcaption>{html.escape(figure['title'])}</figcaption></figure>")
    if image.get("faithfulness"):
        parts.append("<h3>faithfulness of each map</h3>")
        parts.append(_table([[r["method"], r["deletion_auc"], r["insertion_auc"], r["infidelity"]] for r in image["faithfulness"]],
                            ["method", "deletion AUC (lower is better)", "insertion AUC (higher)", "infidelity (lower)"]))
        parts.append("<p class='small'>Pixels in order of the map (most relevant first), replaced by the baseline or put back "
                     "onto it, 16 steps; infidelity (Yeh et al. 2019) with 16 per-pixel Gaussian perturbations. "
                     + ("" if image.get("scorecard") else "<code>--scorecard</code> adds max-sensitivity and the "
                        "randomisation check.") + "</p>")
    if image.get("scorecard"):
        card = image["scorecard"]
        parts.append("<h3>faithfulness scorecard (<code>--scorecard</code>)</h3>")
        parts.append(_table([[r["method"], r["deletion_auc"], r["insertion_auc"], r["infidelity"], r["max_sensitivity"]]
                             for r in card["rows"]],
                            ["method", "deletion AUC (lower is better)", "insertion AUC (higher)", "infidelity (lower)",
                             "max-sensitivity (lower)"]))
        parts.append("<p class='small'>Each method's own input map (IG with the report's n_steps and baseline, saliency, "
                     "input × gradient, DeepLIFT, LRP with the report's composite). Max-sensitivity: the largest change of "
                     "the map, relative to its norm, over 8 draws within 0.02 of the input's range. Infidelity: 16 Gaussian "
                     "perturbations, sd 0.1 of the input's.</p>")
        if card.get("randomisation"):
            parts.append(_table([[m, v] for m, v in card["randomisation"].items()],
                                ["layer method", f"Spearman at {card['randomisation_layer']}, every layer randomised"]))
            parts.append("<p class='small'>Model-randomisation check (Adebayo et al. 2018): the rank correlation of each "
                         "layer method's map with its map after the model's layers are randomised from the top down. Near 0 "
                         "is what a method that reads the model gives; near 1 means the map does not depend on the weights."
                         "</p>")
    if image.get("top_filters"):
        parts.append("<h3>top filters by aggregated conductance</h3>")
        parts.append(_table([[f["filter"], f["conductance"]] for f in image["top_filters"]], ["filter", "max over H x W"]))
    if image.get("paths"):
        parts.append("<h3>critical paths</h3>")
        parts.append(_table([[i + 1, " → ".join(p["nodes"]), p["score"], p["carried"]] for i, p in enumerate(image["paths"])],
                            ["#", "path (class → lowest layer)", "score (product of shares)", "relevance carried"]))
    if image.get("k_curve"):
        parts.extend(_k_curve(image["k_curve"]))
    if image.get("seconds"):
        parts.append("<p class='small'>time: " + html.escape(", ".join(f"{k} {v:.1f} s" for k, v in image["seconds"].items()))
                     + "</p>")
    return parts


def _k_curve(curve: dict) -> list[str]:
    """The K-path curve table and the sentence on the chosen K."""
    parts: list[str] = []
    parts.append("<h3>K-path curves</h3>")
    parts.append("<p class='small'>shape distance: Σ|a/‖a‖₁ − b/‖b‖₁| between the K-path heatmap and the full one "
                 "(0: same shape, 2: nothing in common); shares: what the K paths carry of the full relevance and "
                 "of the score (a path through many layers carries a product of shares, so they are small).</p>")
    parts.append(_table([list(row) for row in zip(curve["ks"], curve["heatmap_distance"], curve["heatmap_share"],
                                                  curve["score_share"], curve["heatmap_smape"], curve["heatmap_mse"])],
                        ["K", "shape distance", "relevance share", "score share", "raw heatmap SMAPE", "raw heatmap MSE"]))
    chosen = curve["chosen_k"]
    plateau = curve.get("plateau_k")
    plateau_text = ""
    if plateau is not None:
        plateau_text = (f"; the curve levels off at K = {plateau} (distance "
                        f"{curve['heatmap_distance'][curve['ks'].index(plateau)]:.3f})")
    chosen_text = "none reaches it"
    if chosen is not None:
        at = curve["ks"].index(chosen)
        chosen_text = (f"{chosen} (distance {curve['heatmap_distance'][at]:.3f}: the shape matches; those paths carry "
                       f"{curve['heatmap_share'][at]:.2%} of the relevance and {curve['score_share'][at]:.2%} of the "
                       "score, so they show where the evidence is, not how much of it)")
    parts.append("<p>chosen K (shape distance ≤ {:g}): {}{}.</p>".format(curve["distance_threshold"], chosen_text,
                                                                         plateau_text))
    return parts


def write_html(report: dict, folder: Path) -> Path:
    """Write ``index.html`` in ``folder``; every image it references must already be there."""
    parts = _header(report)
    for image in report["images"]:
        parts.extend(_image(image))
    parts.append("<p>Every number is in <a href='report.json'>report.json</a>.</p></body></html>")
    path = folder / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
