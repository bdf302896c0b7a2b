"""The analysis dict the report renders (every key but ``layers`` is optional).

.. code-block:: text

    layers               [L] layer names, input to output
    cka                  (L, L) CKA between the layers of the analysed network
    cka_vs_reference     (L, Lb) CKA of each layer against each layer of a reference network
                         (e.g. the untrained initialisation; Lb = L unless layers_b is given);
                         when square, the diagonal says how much each layer changed
    layers_b             [Lb] layer names of the reference network (default: layers)
    reference_name       what the reference network is ("initialisation")
    invariance           {transform: {"magnitudes": [M], "score": (M, L)}}  NIS in [.., 1]
    probe                {"accuracy": [L], "control": [L], "selectivity": [L], "chance": float}
    dimension            {"twonn": [L], "twonn_sd": [L], "participation_ratio": [L]}
    sparsity             [L] fraction of active (> 0) units
    meta                 free-form dict (model, data, n_samples, accuracy, seed, timings)

Values are plain lists/floats (JSON-serialisable); tensors and arrays are accepted.
"""
from __future__ import annotations

import numpy as np


def as_array(v) -> np.ndarray:
    """float64 numpy view of a list / tensor / array."""
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def validate(analysis: dict) -> list[str]:
    """Check shapes against ``layers``; returns the layer names. Raises ValueError naming the key."""
    if not isinstance(analysis, dict):
        raise TypeError(f"analysis must be a dict (see hierfast.report.schema), got {type(analysis).__name__}")
    layers = analysis.get("layers")
    if not layers:
        raise ValueError("analysis['layers'] must be a non-empty list of layer names")
    L = len(layers)
    Lb = len(analysis.get("layers_b") or layers)
    for key, shape in (("cka", (L, L)), ("cka_vs_reference", (L, Lb))):
        if key in analysis and as_array(analysis[key]).shape != shape:
            raise ValueError(f"analysis[{key!r}] must be {shape} for {L} layers, got "
                             f"{as_array(analysis[key]).shape}")
    for key, sub in (("probe", ("accuracy", "control", "selectivity")),
                     ("dimension", ("twonn", "twonn_sd", "participation_ratio"))):
        for s in sub:
            if s in analysis.get(key, {}) and as_array(analysis[key][s]).shape != (L,):
                raise ValueError(f"analysis[{key!r}][{s!r}] must have {L} values, one per layer")
    if "sparsity" in analysis and as_array(analysis["sparsity"]).shape != (L,):
        raise ValueError(f"analysis['sparsity'] must have {L} values, one per layer, got shape "
                         f"{as_array(analysis['sparsity']).shape}")
    for t, curve in analysis.get("invariance", {}).items():
        m = len(curve["magnitudes"])
        if as_array(curve["score"]).shape != (m, L):
            raise ValueError(f"analysis['invariance'][{t!r}]['score'] must be ({m} magnitudes, {L} layers), "
                             f"got {as_array(curve['score']).shape}")
    return list(layers)


def from_results(results) -> dict:
    """Analysis dict from a :class:`hierfast.capture.Results` (or its ``to_dict()``).

    Same-model CKA becomes ``cka``; with ``compare_to`` the ``(La, Lb)`` matrix becomes
    ``cka_vs_reference``. Statistics already in the schema's layout (invariance, probe,
    dimension, sparsity) are copied.
    """
    d = results.to_dict() if hasattr(results, "to_dict") else dict(results)
    out = {"layers": list(d["layers"])}
    # layers_b is the marker of a compare_to run, never the values' shape: an invariance
    # family may well be named "a"
    paired = d.get("layers_b") is not None
    if paired:
        out["layers_b"] = list(d["layers_b"])
        if "cka" in d:
            out["cka_vs_reference"] = d["cka"]
            out["reference_name"] = "the compared model"
    elif "cka" in d:
        out["cka"] = d["cka"]
    for key in ("invariance", "probe", "dimension", "sparsity"):
        v = d.get(key)
        if v is not None and paired:  # compare_to: {"a": analysed model, "b": compared model}
            v = v["a"]
        if v is not None:
            out[key] = v
    out["meta"] = {"n_samples": d.get("n_samples"), "n_batches": d.get("n_batches"), "statistics": d.get("stats")}
    return out
