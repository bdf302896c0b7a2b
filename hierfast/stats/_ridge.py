"""Ridge regression on one-hot targets from centred sufficient statistics (METRICS.md §4.3).

With centred sums C_xx = X~'X~ (p, p) and C_xy = X~'Y~ (p, k), one eigendecomposition
C_xx = V diag(s) V' serves every penalty lambda:
W_lambda = V diag(1/(s + lambda)) V' C_xy. The intercept is not penalised (centring),
and lambda multiplies ||W||^2 against the *summed* squared error, as in scikit-learn's
``Ridge(alpha=lambda)``.

Penalty choice:
* ``kfold_mse``: exact K-fold CV from per-fold statistics (train = total - fold);
  score = mean over folds of the fold's mean squared error (scikit-learn's
  ``GridSearchCV(scoring="neg_mean_squared_error")`` average);
* ``gcv_score``: generalised cross-validation (Golub, Heath & Wahba 1979);
* ``loo_mse``: exact leave-one-out error from the data matrix (Allen 1974 PRESS; what
  scikit-learn's ``RidgeCV``/``RidgeClassifierCV`` do by default) — one-shot only.
"""
from __future__ import annotations

import torch

# Scale-free default grid: lambda = a * tr(C_xx) / p, a in 1e-6 .. 1e3 (METRICS.md §4.3):
# layers differ by orders of magnitude in activation scale.
RELATIVE_ALPHAS = torch.logspace(-6, 3, 10, dtype=torch.float64)


class RidgePath:
    """Eigendecomposition of C_xx shared by all penalties."""

    def __init__(self, cxx: torch.Tensor, cxy: torch.Tensor) -> None:
        s, v = torch.linalg.eigh(cxx)
        self.s = s.clamp_min(0)  # round-off can make zero eigenvalues slightly negative
        self.v = v
        self.b = v.T @ cxy  # (p, k)

    def weights(self, lam: float) -> torch.Tensor:
        """``(p, k)`` ridge coefficients for penalty ``lam``."""
        return self.v @ (self.b / (self.s + lam)[:, None])


def resolve_alphas(alphas, cxx: torch.Tensor) -> torch.Tensor:
    """Absolute penalties: the user's grid as is, or the scale-free default."""
    if alphas is None:
        p = cxx.shape[0]
        scale = torch.trace(cxx).clamp_min(torch.finfo(torch.float64).tiny) / p
        return RELATIVE_ALPHAS.to(cxx.device) * scale
    a = torch.as_tensor(alphas, dtype=torch.float64, device=cxx.device).reshape(-1)
    if a.numel() == 0 or not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
        raise ValueError(f"alphas must be a non-empty list of positive finite penalties, got {alphas!r}")
    return a


def gcv_score(path: RidgePath, tr_cyy: float, n: float, alphas: torch.Tensor) -> torch.Tensor:
    """GCV(lambda) = (RSS/n) / (1 - df/n)^2, RSS and df from the statistics alone."""
    s = path.s[None, :]
    lam = alphas[:, None]
    bk = (path.b ** 2).sum(1)[None, :]
    rss = tr_cyy - ((s + 2 * lam) / (s + lam) ** 2 * bk).sum(1)
    df = (s / (s + lam)).sum(1) + 1.0  # + the intercept
    return (rss.clamp_min(0) / n) / (1.0 - df / n).clamp_min(1e-12) ** 2


def heldout_sse(path: RidgePath, alphas: torch.Tensor, mu_x: torch.Tensor, mu_y: torch.Tensor,
                n_f: float, sx_f: torch.Tensor, sxx_f: torch.Tensor, sxy_f: torch.Tensor,
                sy_f: torch.Tensor, syy_f: float) -> torch.Tensor:
    """Summed squared error on a held-out fold, for every lambda, from its raw sums.

    Held-out rows are centred with the *training* means (mu_x, mu_y):
    a = x - mu_x, b = y - mu_y; SSE = tr(B'B) - 2 tr(W'A'B) + tr(W'A'A W).
    """
    ab = sxy_f - torch.outer(mu_x, sy_f) - torch.outer(sx_f, mu_y) + n_f * torch.outer(mu_x, mu_y)
    aa = sxx_f - torch.outer(mu_x, sx_f) - torch.outer(sx_f, mu_x) + n_f * torch.outer(mu_x, mu_x)
    bb = syy_f - 2 * torch.dot(mu_y, sy_f) + n_f * torch.dot(mu_y, mu_y)
    vab = path.v.T @ ab                          # (p, k)
    g = (path.v.T @ aa @ path.v) * (path.b @ path.b.T)  # (p, p)
    d = 1.0 / (path.s[None, :] + alphas[:, None])  # (A, p)
    lin = d @ (path.b * vab).sum(1)
    quad = ((d @ g) * d).sum(1)
    return bb - 2 * lin + quad


def loo_mse(x: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Exact leave-one-out mean squared error per lambda (x (n, p), y (n, k), float64)."""
    n = x.shape[0]
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y
    path = RidgePath(xc.T @ xc, xc.T @ yc)
    z = xc @ path.v  # (n, p)
    out = torch.empty_like(alphas)
    for i, lam in enumerate(alphas.tolist()):
        d = 1.0 / (path.s + lam)
        h = 1.0 / n + (z * z) @ d            # leverage, the unpenalised intercept included
        resid = yc - z @ (path.b * d[:, None])
        out[i] = ((resid / (1.0 - h)[:, None]) ** 2).mean()
    return out
