"""Centred kernel alignment (CKA) between layers: functions on one batch of features.

References: Kornblith, Norouzi, Lee, Hinton 2019, "Similarity of Neural Network
Representations Revisited" (ICML) for CKA and its RBF bandwidth convention; Song et
al. 2012 (JMLR) for the unbiased HSIC, computed through the U-centring of Szekely &
Rizzo 2014. See ../shared/science/METRICS.md §1.
"""
from __future__ import annotations

import math

import torch

from . import _grams
from ._normalize import cka_from_hsic, label_matrix
from ._validate import as_features, as_layers, check_same_batch, layer_label

KERNELS = ("linear", "rbf")


def _min_n(debiased: bool) -> int:
    return 4 if debiased else 2


def _pair(x, y, debiased, check_finite):
    x = as_features(x, "x", min_n=_min_n(debiased), check_finite=check_finite)
    y = as_features(y, "y", min_n=_min_n(debiased), check_finite=check_finite)
    check_same_batch([x, y], ["x", "y"])
    return x, y


def _helper(xty, a, b, n):
    """Debiased dot-product similarity (Kornblith et al. reference code): equals <Ku, Lu>_F."""
    return xty - n / (n - 2) * torch.dot(a, b) + a.sum() * b.sum() / ((n - 1) * (n - 2))


# Self-HSIC below this (or non-finite) while the layer is not constant: its Gram or HSIC
# under- or overflowed (float32 features ~1e-25, float64 ~1e80): recomputed rescaled. A
# float32 Gram is subnormal (imprecise) well before its HSIC reaches 0: Gram entries of
# 2^-100 give a self-HSIC of about 2^-200.
def _tiny_hsic(x: torch.Tensor) -> float:
    return 2.0 ** -900 if x.dtype == torch.float64 else 2.0 ** -200


def _one_shot_grams(xs, labels, *, unbiased, kernel, threshold, backend, all_pairs=False):
    """``(F, d, hsic)``: :func:`_grams.stacked_centered_grams` for the one-shot functions,
    the self-HSICs ``d`` and, with ``all_pairs``, ``hsic = F @ F.T`` (else None; ``d`` is
    then its diagonal, no extra pass over F). The per-layer normalisation makes each row's
    scale free: a row whose self-HSIC under- or overflowed is recomputed from the layer
    shifted and scaled by a power of two. The check reads the (L,) self-HSICs in one host
    sync, so the normal path does no extra work."""
    F = _grams.stacked_centered_grams(xs, labels, unbiased=unbiased, kernel=kernel, threshold=threshold,
                                      backend=backend, rescalable=True)
    hsic = F @ F.T if all_pairs else None
    d = hsic.diagonal().clone() if all_pairs else torch.einsum("ij,ij->i", F, F)
    redo = [i for i, v in enumerate(d.tolist()) if not (math.isfinite(v) and v >= _tiny_hsic(xs[i]))]
    redo = [i for i in redo if not bool((xs[i] == xs[i][:1]).all())]  # constant: its zero row is right
    if not redo:
        return F, d, hsic
    for i in redo:
        F[i] = _grams.stacked_centered_grams([_grams.rescaled_copy(xs[i])], [labels[i]], unbiased=unbiased,
                                             kernel=kernel, threshold=threshold, backend=backend)[0]
    if all_pairs:
        hsic = F @ F.T
        return F, hsic.diagonal().clone(), hsic
    return F, torch.einsum("ij,ij->i", F, F), None


def _linear_cka_feature_space(x, y, debiased):
    """Feature-space form on centred float64 features: O(n d_x d_y). Exactly constant
    columns are centred to exact zeros (a constant layer: NaN with a warning)."""
    xc = _grams.centred_float64(x)
    yc = _grams.centred_float64(y)
    xy = torch.linalg.matrix_norm(xc.T @ yc) ** 2
    xx = torch.linalg.matrix_norm(xc.T @ xc) ** 2
    yy = torch.linalg.matrix_norm(yc.T @ yc) ** 2
    if debiased:
        n = x.shape[0]
        a = (xc * xc).sum(1)
        b = (yc * yc).sum(1)
        xy, xx, yy = _helper(xy, a, b, n), _helper(xx, a, a, n), _helper(yy, b, b, n)
    return cka_from_hsic(xy.reshape(1, 1), xx.reshape(1), yy.reshape(1), ["x"], ["y"])[0, 0]


def _cka_gram_space(x, y, debiased, kernel, threshold, backend):
    _, _, hsic = _one_shot_grams([x, y], ["x", "y"], unbiased=debiased, kernel=kernel, threshold=threshold,
                                 backend=backend, all_pairs=True)
    return cka_from_hsic(hsic[0:1, 1:2], hsic[0, 0].reshape(1), hsic[1, 1].reshape(1), ["x"], ["y"])[0, 0]


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False, form: str = "auto",
               backend: str | None = None) -> torch.Tensor:
    """Linear CKA between two representations of the same n inputs.

    Args:
        x: ``(n, ...)`` features (trailing dims flattened), float16/bfloat16/float32/float64.
        y: ``(n, ...)`` features of the same inputs, same device.
        debiased: use the unbiased HSIC (Song et al. 2012); needs n >= 4. Biased CKA is
            inflated when n is not much larger than the feature count (METRICS.md §1.8).
        form: ``"auto"`` picks the cheaper of the feature-space form (X^T Y, O(n d_x d_y))
            and the sample-space form (Grams, O(n^2 (d_x + d_y))); ``"feature"`` /
            ``"gram"`` force one. Both give the same value.
        backend: force a kernel backend for the Gram path.

    Returns:
        0-dim float64 tensor in [-1, 1] (NaN with a warning when a layer is constant).

    Example:
        >>> import torch
        >>> from hierfast.stats import linear_cka
        >>> x = torch.randn(100, 10, dtype=torch.float64)
        >>> round(linear_cka(x, 3.7 * x).item(), 12)
        1.0
    """
    if form not in ("auto", "feature", "gram"):
        raise ValueError(f"form must be 'auto', 'feature' or 'gram', got {form!r}")
    x0, y0 = x, y
    x, y = _pair(x, y, debiased, check_finite=False)
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if form == "auto":
        form = "feature" if dx * dy + dx * dx + dy * dy < n * (dx + dy) else "gram"
    if form == "feature":
        _pair(x0, y0, debiased, check_finite=True)  # the Gram path checks finiteness from its means
        return _linear_cka_feature_space(x, y, debiased)
    return _cka_gram_space(x, y, debiased, "linear", 1.0, backend)


def rbf_cka(x: torch.Tensor, y: torch.Tensor, *, threshold: float = 1.0, debiased: bool = False,
            backend: str | None = None) -> torch.Tensor:
    """CKA with Gaussian kernels, sigma = threshold * sqrt(median squared distance).

    The median runs over all n^2 squared distances, diagonal included (the
    convention of Kornblith et al.'s reference code); RBF CKA tends to linear CKA
    as ``threshold`` grows (Alvarez 2021).

    Args:
        x, y: ``(n, ...)`` features of the same inputs.
        threshold: bandwidth as a fraction of the median distance (> 0).
        debiased: unbiased HSIC (n >= 4).

    Returns:
        0-dim float64 tensor.
    """
    if not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    x, y = _pair(x, y, debiased, check_finite=False)  # checked from the centring means
    return _cka_gram_space(x, y, debiased, "rbf", float(threshold), backend)


def cka_matrix(feats_a, feats_b=None, *, kernel: str = "linear", debiased: bool = False,
               threshold: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """CKA between every pair of layers, from one Gram per layer and one small GEMM.

    Each layer's centred (or U-centred) Gram becomes a row of an (L, n^2) matrix F;
    all pairwise HSICs are ``F_a @ F_b.T`` (DESIGN.md "All-pairs CKA") — never a
    per-pair loop.

    Args:
        feats_a: list/tuple/dict of ``(n, ...)`` tensors, one per layer.
        feats_b: a second model's layers on the same inputs, or None for ``feats_a``
            against itself.
        kernel: ``"linear"`` or ``"rbf"``.
        debiased: unbiased HSIC (n >= 4).
        threshold: RBF bandwidth fraction (``kernel="rbf"`` only).

    Returns:
        ``(La, Lb)`` float64 tensor (``(La, La)`` when ``feats_b`` is None) with
        attributes ``row_names`` / ``col_names`` (the dict keys, or None for lists).

    Example:
        >>> import torch
        >>> from hierfast.stats import cka_matrix
        >>> x = torch.randn(64, 20)
        >>> m = cka_matrix({"a": x, "b": x.relu()})
        >>> m.shape, m.row_names
        (torch.Size([2, 2]), ['a', 'b'])
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "rbf" and (not isinstance(threshold, (int, float)) or not threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    names_a, xs_a = as_layers(feats_a, "feats_a")
    labels_a = [layer_label(names_a, i, "feats_a") for i in range(len(xs_a))]
    # finiteness is checked from the centring kernel's float64 means (no extra pass)
    xs_a = [as_features(x, lab, min_n=_min_n(debiased), check_finite=False) for x, lab in zip(xs_a, labels_a)]
    if feats_b is None:
        check_same_batch(xs_a, labels_a)
        _, d, hsic = _one_shot_grams(xs_a, labels_a, unbiased=debiased, kernel=kernel, threshold=threshold,
                                     backend=backend, all_pairs=True)
        shown = names_a or [str(i) for i in range(len(xs_a))]
        return label_matrix(cka_from_hsic(hsic, d, d, shown, shown), names_a, names_a)
    names_b, xs_b = as_layers(feats_b, "feats_b")
    labels_b = [layer_label(names_b, i, "feats_b") for i in range(len(xs_b))]
    xs_b = [as_features(x, lab, min_n=_min_n(debiased), check_finite=False) for x, lab in zip(xs_b, labels_b)]
    check_same_batch(xs_a + xs_b, labels_a + labels_b)
    Fa, sa, _ = _one_shot_grams(xs_a, labels_a, unbiased=debiased, kernel=kernel, threshold=threshold,
                                backend=backend)
    Fb, sb, _ = _one_shot_grams(xs_b, labels_b, unbiased=debiased, kernel=kernel, threshold=threshold,
                                backend=backend)
    cross = Fa @ Fb.T
    return label_matrix(cka_from_hsic(cross, sa, sb, labels_a, labels_b), names_a, names_b)
