"""Per-layer Grams and their centred forms: the building blocks of all-pairs CKA.

A layer's features are centred per batch (float64 means) before the Gram is
formed: float32 Grams of raw post-ReLU features cancel catastrophically in the
unbiased HSIC (DESIGN.md "Traps"). Grams are formed in float32 for float16/
bfloat16/float32 features (fast GEMM) and in float64 for float64 features; every
HSIC sum downstream is float64.
"""
from __future__ import annotations

import torch

from .. import ops


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 features stay float64 (never downcast); everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def centered(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """(n, d) features minus their column means, in the compute dtype."""
    xc, _ = ops.center_columns(x, out_dtype=compute_dtype(x), backend=backend)
    return xc


def linear_gram(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Gram of the column-centred features, (n, n) in the compute dtype."""
    xc = centered(x, backend)
    return xc @ xc.T


def rbf_gram(x: torch.Tensor, threshold: float, backend: str | None = None) -> torch.Tensor:
    """Gaussian-kernel Gram, float64 (n, n).

    sigma^2 = threshold^2 * median of the n x n squared-distance matrix, diagonal
    included (Kornblith et al. 2019 reference code, ``gram_rbf``). Returns None when
    the median is 0 (constant layer): the kernel is then undefined.
    """
    g = linear_gram(x, backend).to(torch.float64)
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    flat = d2.reshape(-1)
    m = flat.numel()
    # numpy's median of an even count averages the two middle values.
    lo = torch.kthvalue(flat, (m + 1) // 2).values
    hi = torch.kthvalue(flat, m // 2 + 1).values if m % 2 == 0 else lo
    med = 0.5 * (lo + hi)
    if med.item() <= 0.0:
        return None
    return torch.exp(d2 / (-2.0 * threshold * threshold * med))


def stacked_centered_grams(layers, *, unbiased: bool, kernel: str = "linear", threshold: float = 1.0,
                           backend: str | None = None) -> torch.Tensor:
    """One centred (biased) or U-centred (unbiased) Gram per layer, as rows of (L, n*n) float64.

    Layers whose kernel is undefined (RBF of a constant layer) get a zero row, which
    the caller turns into NaN with a warning.
    """
    n = layers[0].shape[0]
    F = torch.empty(len(layers), n * n, dtype=torch.float64, device=layers[0].device)
    for i, x in enumerate(layers):
        g = linear_gram(x, backend) if kernel == "linear" else rbf_gram(x, threshold, backend)
        if g is None:
            F[i].zero_()
            continue
        ops.gram_epilogue(g, unbiased=unbiased, out=F[i], backend=backend)
    return F
