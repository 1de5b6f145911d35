"""The HTML report: every figure the run wrote, next to the numbers from report.json."""
from __future__ import annotations

import html
from pathlib import Path


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child { text-align: left; }
figure { margin: 0.5em 0 1.5em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #a33; }
"""


def write_html(report: dict, folder: Path) -> Path:
    """Write ``index.html`` in ``folder``; every image it references must already be there."""
    model = report["model"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>attrib report: {html.escape(model['name'])}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>attrib report: {html.escape(model['name'])}</h1>",
             f"<p>weights: {html.escape(model['weights'])}; layer explained: <code>{html.escape(report['layer'])}</code>; "
             f"methods: {html.escape(', '.join(report['methods']))}; {report['seconds']:.1f} s.</p>"]
    for note in model.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for image in report["images"]:
        prediction = image["prediction"]
        parts.append(f"<h2>{html.escape(image['name'])}</h2>")
        parts.append("<p>prediction: class {} (p = {:.3f}); explained target: {}{}</p>".format(
            prediction["class"], prediction["probability"], image["target"],
            f"; true label {image['label']}" if image.get("label") is not None else ""))
        parts.append(_table([[c, p] for c, p in prediction["top"]], ["class", "probability"]))
        checks = image.get("checks", [])
        if checks:
            parts.append("<h3>completeness and conservation</h3>")
            parts.append(_table([[c["method"], c["where"], c["value"], c["reference"], c["relative_error"]] for c in checks],
                                ["method", "where", "sum of attributions", "should be", "relative error"]))
        for figure in image["figures"]:
            parts.append(f"<figure><img src='{html.escape(figure['file'])}' alt='{html.escape(figure['title'])}'>"
                         f"<figcaption>{html.escape(figure['title'])}</figcaption></figure>")
        if image.get("top_filters"):
            parts.append("<h3>top filters by aggregated conductance</h3>")
            parts.append(_table([[f["filter"], f["conductance"]] for f in image["top_filters"]], ["filter", "max over H x W"]))
        if image.get("paths"):
            parts.append("<h3>critical paths</h3>")
            parts.append(_table([[i + 1, " → ".join(p["nodes"]), p["score"], p["carried"]] for i, p in enumerate(image["paths"])],
                                ["#", "path (class → lowest layer)", "score (product of shares)", "relevance carried"]))
        if image.get("k_curve"):
            curve = image["k_curve"]
            parts.append("<h3>K-path curves</h3>")
            parts.append(_table([[k, a, b, c, d] for k, a, b, c, d in zip(curve["ks"], curve["score_mse"], curve["score_smape"],
                                                                        curve["heatmap_mse"], curve["heatmap_smape"])],
                                ["K", "score MSE", "score SMAPE", "heatmap MSE", "heatmap SMAPE"]))
    parts.append("<p>Every number is in <a href='report.json'>report.json</a>.</p></body></html>")
    path = folder / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
