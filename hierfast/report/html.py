"""One self-contained ``report.html`` (figures embedded as PNG data URIs) plus the PNGs and
``results.json`` beside it."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from . import figures
from .patterns import check_patterns, verdict_word
from .schema import as_array, validate

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid
#ddd}figure{margin:1em 0}img{max-width:100%}figcaption,.note{color:#555;font-size:.92em}table{border-collapse:collapse;
font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}.yes{color:#17692b;font-weight:600}
.no{color:#a3261a;font-weight:600}.na{color:#777}"""

_TEXT = {
    "cka": "Linear CKA (Kornblith et al. 2019) between every pair of layers: 1 means two layers hold the same "
           "representation up to rotation and scale, 0 unrelated. A hierarchy shows as a bright band along the "
           "diagonal: each layer resembles its neighbours, and the resemblance fades with distance.",
    "cka_vs_reference": "CKA between each layer of the analysed network and each layer of {ref}. When both have "
                        "the same layers, the diagonal says how much each layer differs: values near 1 mean the "
                        "layer holds the same representation; low values mean it was rewritten.",
    "invariance": "Normalised invariance score per layer, x′ being another input: for a random transform the "
                  "two-view 1 − E‖f(Tx) − f(T′x)‖² / E‖f(x) − f(x′)‖², T and T′ two independent draws; for a "
                  "deterministic one (blur, a flip with probability 1, magnitude 0) the one-view "
                  "1 − E‖f(Tx) − f(x)‖² / E‖f(x) − f(x′)‖². 1 = the layer ignores the transform; 0 = the "
                  "transform moves the layer as far as swapping in a different input.",
    "probe": "Held-out accuracy of a ridge linear probe trained on each layer's features (solid), of the same "
             "probe on a control task with random labels fixed per input (Hewitt & Liang 2019), and their "
             "difference, the selectivity. Rising accuracy means the class becomes linearly readable with depth.",
    "dimension": "Intrinsic dimension by TwoNN (Facco et al. 2017, Ansuini et al. 2019 protocol; mean ± sd over "
                 "resamples) and the participation ratio (Σλ)²/Σλ² of the feature covariance: how many "
                 "directions the representation really uses.",
    "sparsity": "Fraction of active (> 0) units per layer.",
}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _json_ready(v):
    """Plain lists and numbers; NaN/inf become null (strict JSON; ``schema.as_array`` reads
    null back as NaN). Numpy integers and booleans keep their type; anything else JSON has
    no type for (a Path, a dtype, in the free-form ``meta``) becomes ``str(v)``."""
    if isinstance(v, dict):
        return {str(k): _json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_ready(x) for x in v]
    if isinstance(v, (np.bool_, np.integer)):
        return v.item()
    if hasattr(v, "detach") or isinstance(v, (np.ndarray, np.floating)):
        a = as_array(v)
        return _json_ready(a.tolist() if a.ndim else float(a))
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _figures(a: dict) -> list[tuple[str, str, str, bytes]]:
    """(key, title, explanation, png) for every section the analysis has data for."""
    layers = a["layers"]
    ref = a.get("reference_name", "the reference network")
    out = []
    if "cka" in a:
        out.append(("cka", "Layer × layer similarity", _TEXT["cka"],
                    _png(figures.cka_heatmap(a["cka"], layers, title="CKA between layers"))))
    if "cka_vs_reference" in a:
        out.append(("cka_vs_reference", f"Analysed network vs {ref}", _TEXT["cka_vs_reference"].format(ref=ref),
                    _png(figures.cka_heatmap(a["cka_vs_reference"], layers, a.get("layers_b") or layers,
                                             title=f"CKA: analysed model vs {ref}", ylabel="analysed model",
                                             xlabel=ref))))
    if a.get("invariance"):
        out.append(("invariance", "Invariance vs depth", _TEXT["invariance"],
                    _png(figures.invariance_curves(layers, a["invariance"]))))
    p = a.get("probe", {})
    if "accuracy" in p:
        series = {k: p[k] for k in ("accuracy", "control", "selectivity") if k in p}
        out.append(("probe", "Linear probes vs depth", _TEXT["probe"],
                    _png(figures.depth_curves(layers, series, ylabel="held-out accuracy", title="Linear probes",
                                              hline=p.get("chance"), hline_label="chance"))))
    d = a.get("dimension", {})
    if "twonn" in d or "participation_ratio" in d:
        series = {k: d[k] for k in ("twonn", "participation_ratio") if k in d}
        errs = {"twonn": d["twonn_sd"]} if "twonn_sd" in d else None
        out.append(("dimension", "Dimension vs depth", _TEXT["dimension"],
                    _png(figures.depth_curves(layers, series, errors=errs, ylabel="dimension",
                                              title="Intrinsic dimension (TwoNN) and participation ratio"))))
    if "sparsity" in a:
        out.append(("sparsity", "Sparsity vs depth", _TEXT["sparsity"],
                    _png(figures.depth_curves(layers, {"fraction active": a["sparsity"]}, ylabel="fraction",
                                              title="Active units", ylim=(0, 1)))))
    return out


def _pattern_table(patterns: list[dict]) -> str:
    rows = []
    for p in patterns:
        cls, word = {True: "yes", False: "no", None: "na"}[p["holds"]], verdict_word(p)
        rows.append(f"<tr><td>{html.escape(p['statement'])}</td><td class='{cls}'>{word}</td>"
                    f"<td>{html.escape(str(p['evidence']))}</td></tr>")
    return ("<table><tr><th>pattern</th><th>verdict</th><th>evidence</th></tr>" + "".join(rows) + "</table>")


def write_report(analysis: dict, out_dir, *, title: str = "hierfast: the hierarchy of representations",
                 intro: str = "", extra_sections: list[tuple[str, str]] | None = None) -> dict:
    """Write ``report.html``, one PNG per figure and ``results.json`` into ``out_dir``.

    Args:
        analysis: the analysis dict (:mod:`hierfast.report.schema`).
        out_dir: created when missing; must be writable.
        intro: a paragraph of HTML-escaped text under the title.
        extra_sections: ``(title, raw_html)`` appended as further sections (e.g. feature visualisation).

    Returns:
        ``{"html": path, "json": path, "figures": [paths], "patterns": [...]}``.
    """
    validate(analysis)
    patterns = check_patterns(analysis)
    # serialised before anything is written: a value JSON cannot hold fails here, never
    # after report.html is on disk without its results.json
    payload = json.dumps({"analysis": _json_ready(analysis), "patterns": _json_ready(patterns)}, indent=1,
                         allow_nan=False)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir {str(out)!r} cannot be created ({e.strerror}); choose a writable directory") from e
    if not os.access(out, os.W_OK):
        raise ValueError(f"out_dir {str(out)!r} is not writable; choose a writable directory")
    figs = _figures(analysis)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    meta = analysis.get("meta", {})
    if meta:
        parts.append("<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                                         for k, v in meta.items()) + "</table>")
    parts.append("<h2>What the hierarchy shows</h2><p class='note'>Each statement is checked on the numbers below; "
                 "one that does not hold for this network is reported as such.</p>" + _pattern_table(patterns))
    paths = []
    for key, heading, text, png in figs:
        p = out / f"{key}.png"
        p.write_bytes(png)
        paths.append(str(p))
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{html.escape(heading)}</h2><figure><img alt='{html.escape(heading)}' src='{uri}'>"
                     f"<figcaption>{html.escape(text)}</figcaption></figure>")
    for heading, raw in extra_sections or []:
        parts.append(f"<h2>{html.escape(heading)}</h2>{raw}")
    parts.append("<p class='note'>Made with hierfast.</p></body></html>")
    html_path = out / "report.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    os.replace(tmp, html_path)  # atomic: an interrupted write never leaves half a report
    json_path = out / "results.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(payload, encoding="utf-8")
    os.replace(tmp, json_path)
    return {"html": str(html_path), "json": str(json_path), "figures": paths, "patterns": patterns}
