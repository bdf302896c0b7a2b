"""The measurable hierarchy patterns the report states, each with its evidence.

Every check returns ``{"name", "holds" (bool | None when not measured or undefined),
"statement", "evidence"}``; the report prints the statement whether or not it holds, with
the numbers, so a pattern that fails is shown, not hidden. Values that are NaN (CKA or
invariance of a layer with constant features) are left out of the means, and the evidence
names those layers; when too few values are defined to decide, ``holds`` is None and the
result carries ``"undefined": [layers]`` (shown as "undefined", not as failed).
"""
from __future__ import annotations

import numpy as np

from .schema import as_array, validate


def spearman(a) -> float:
    """Rank correlation of the values with their position (depth); ties get average ranks.

    Only the finite values are ranked, against the ranks of their depths (argsort would
    put NaN last, i.e. rank it highest); NaN when fewer than two are finite."""
    v = as_array(a)
    v = v[np.isfinite(v)]
    depth = np.arange(v.size, dtype=np.float64)  # depth order of the finite values
    if v.size < 2:
        return float("nan")
    if np.all(v == v[0]):
        return 0.0
    ranks = np.empty(v.size)
    order = np.argsort(v, kind="mergesort")
    ranks[order] = np.arange(v.size, dtype=np.float64)
    for u in np.unique(v):  # average ranks of ties
        m = v == u
        ranks[m] = ranks[m].mean()
    return float(np.corrcoef(depth, ranks)[0, 1])


def _nanmean(v: np.ndarray) -> float:
    """Mean over the defined (finite) entries; NaN when there is none."""
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _thirds(v: np.ndarray) -> tuple[float, float]:
    k = max(1, v.size // 3)
    return _nanmean(v[:k]), _nanmean(v[-k:])


def _bad_layers(analysis: dict, bad: np.ndarray) -> tuple[list[str], int]:
    """Names of the layers whose value is not finite (``bad``: one bool per layer), and how
    many layers have a finite one."""
    bad = np.asarray(bad, dtype=bool)
    return [str(n) for n, b in zip(analysis["layers"], bad) if b], int((~bad).sum())


def _result(name, statement, holds, evidence, values, bad: tuple[list[str], int]) -> dict:
    """The check's dict; NaN means (too few defined values) make the verdict undefined."""
    bad, n_defined = bad
    note = f" (left out, undefined: constant features? layers {bad})" if bad else ""
    if any(not np.isfinite(v) for v in values.values()):
        why = f"not finite for layers {bad} (constant features?)" if bad else "too few layers to compare"
        return {"name": name, "holds": None, "statement": statement, "undefined": bad,
                "evidence": f"undefined: {n_defined} layer(s) with a defined value, too few to decide; {why}",
                "values": values}
    return {"name": name, "holds": bool(holds()), "statement": statement, "evidence": evidence + note,
            "values": values}


def probe_rises(analysis: dict) -> dict:
    name, statement = "probe_rises_with_depth", "Linear-probe accuracy rises with depth."
    acc = analysis.get("probe", {}).get("accuracy")
    if acc is None:
        return {"name": name, "holds": None, "statement": statement, "evidence": "not measured"}
    a = as_array(acc)
    bad = ~np.isfinite(a)
    defined = a[~bad]  # first and last *defined* layers; NaN ones are left out as in the other checks
    first, last = (float(defined[0]), float(defined[-1])) if defined.size else (float("nan"), float("nan"))
    rho = spearman(a)
    return _result(name, statement, lambda: last > first and rho >= 0.5,
                   f"first layer {first:.3f}, last layer {last:.3f}, rank correlation with depth {rho:+.2f}",
                   {"first": first, "last": last, "spearman": rho}, _bad_layers(analysis, bad))


def translation_invariance_rises(analysis: dict, transform: str | None = None) -> dict:
    """Invariance at the smallest magnitude, top third vs bottom third of the layers. The
    transform is ``translate`` unless the analysis names another in
    ``analysis["invariance_pattern"] = {"transform": key, "label": "words"}`` (token models)."""
    spec = analysis.get("invariance_pattern") or {}
    transform = transform or spec.get("transform", "translate")
    label = spec.get("label", "small translations")
    name = "translation_invariance_rises" if transform == "translate" else f"{transform}_invariance_rises"
    statement = f"Invariance to {label} is higher in the top layers than in the bottom layers."
    curve = analysis.get("invariance", {}).get(transform)
    if curve is None:
        return {"name": name, "holds": None, "statement": statement, "evidence": "not measured"}
    mags = as_array(curve["magnitudes"])
    score = as_array(curve["score"])
    usable = np.isfinite(mags) & (mags > 0)
    # smallest non-zero magnitude; the first transform when none is known (Lambda's NaN)
    i = int(np.argmin(np.where(usable, mags, np.inf))) if usable.any() else 0
    where = f"at magnitude {mags[i]:g}" if np.isfinite(mags[i]) else "for the first transform (magnitude not given)"
    bottom, top = _thirds(score[i])
    out = _result(name, statement, lambda: top > bottom,
                  f"{where}: mean invariance bottom third {bottom:.3f}, top third {top:.3f}",
                  {"bottom": bottom, "top": top}, _bad_layers(analysis, ~np.isfinite(score[i])))
    out["values"]["magnitude"] = float(mags[i])  # a label, not a value to decide on: NaN is no "undefined"
    return out


def adjacent_more_similar(analysis: dict) -> dict:
    name = "adjacent_layers_more_similar"
    statement = "Adjacent layers are more similar (CKA) than distant ones."
    if "cka" not in analysis:
        return {"name": name, "holds": None, "statement": statement, "evidence": "not measured"}
    c = as_array(analysis["cka"])
    L = c.shape[0]
    if L < 3:
        return {"name": name, "holds": None, "statement": statement, "evidence": "fewer than 3 layers"}
    gap = np.abs(np.subtract.outer(np.arange(L), np.arange(L)))
    adjacent, distant = _nanmean(c[gap == 1]), _nanmean(c[gap >= 2])
    return _result(name, statement, lambda: adjacent > distant,
                   f"mean CKA of adjacent layers {adjacent:.3f}, of layers two or more apart {distant:.3f}",
                   {"adjacent": adjacent, "distant": distant}, _bad_layers(analysis, ~np.isfinite(np.diag(c))))


def training_changes_top(analysis: dict) -> dict:
    name = "training_changes_upper_layers"
    ref = analysis.get("reference_name", "the reference network")
    statement = f"The trained network differs from {ref} mostly in its upper layers."
    if "cka_vs_reference" not in analysis:
        return {"name": name, "holds": None, "statement": statement, "evidence": "not measured"}
    m = as_array(analysis["cka_vs_reference"])
    if m.shape[0] != m.shape[1] or list(analysis.get("layers_b") or analysis["layers"]) != list(analysis["layers"]):
        return {"name": name, "holds": None, "statement": statement,
                "evidence": "the reference network has different layers: no layer-to-same-layer comparison"}
    d = np.diag(m)
    bottom, top = _thirds(d)
    return _result(name, statement, lambda: top < bottom,
                   f"CKA(layer, same layer of {ref}): bottom third {bottom:.3f}, top third {top:.3f} "
                   "(lower = changed more)", {"bottom": bottom, "top": top}, _bad_layers(analysis, ~np.isfinite(d)))


def verdict_word(p: dict) -> str:
    """The verdict of one check in words, the same in the HTML table and the demos' printout."""
    if p["holds"] is None:
        # measured, but NaN values (constant layers) left nothing to decide on
        return "undefined" if p.get("undefined") is not None else "not measured"
    return "holds" if p["holds"] else "does not hold"


def check_patterns(analysis: dict) -> list[dict]:
    """All pattern checks on one analysis dict (see :mod:`hierfast.report.schema`)."""
    validate(analysis)
    return [probe_rises(analysis), translation_invariance_rises(analysis), adjacent_more_similar(analysis),
            training_changes_top(analysis)]
