"""Ridge core (hierfast.stats._ridge): LOO / K-fold / GCV from statistics vs scikit-learn and direct fits."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.model_selection import PredefinedSplit

from hierfast.stats._ridge import RidgePath, gcv_score, heldout_sse, loo_mse


def _data(n=80, p=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) * 2 + 1
    y = torch.nn.functional.one_hot(torch.randint(0, k, (n,), generator=g), k).double()
    return x, y


def test_weights_match_sklearn_ridge():
    x, y = _data()
    xc, yc = x - x.mean(0), y - y.mean(0)
    path = RidgePath(xc.T @ xc, xc.T @ yc)
    for lam in (0.1, 10.0):
        ref = Ridge(alpha=lam).fit(x.numpy(), y.numpy()).coef_.T
        np.testing.assert_allclose(path.weights(lam).numpy(), ref, atol=1e-10)


def test_loo_choice_matches_ridgecv():
    x, y = _data()
    alphas = np.logspace(-2, 3, 8)
    ours = alphas[int(loo_mse(x, y, torch.tensor(alphas)).argmin())]
    assert ours == RidgeCV(alphas=alphas).fit(x.numpy(), y.numpy()).alpha_


def test_kfold_sse_matches_direct_fit_and_gcv_finite():
    x, y = _data(n=90)
    fold = torch.arange(90) % 3
    alphas = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
    scores = torch.zeros(3, dtype=torch.float64)
    for f in range(3):
        tr, te = x[fold != f], x[fold == f]
        ytr, yte = y[fold != f], y[fold == f]
        mx, my = tr.mean(0), ytr.mean(0)
        path = RidgePath((tr - mx).T @ (tr - mx), (tr - mx).T @ (ytr - my))
        sse = heldout_sse(path, alphas, mx, my, float(te.shape[0]), te.sum(0), te.T @ te, te.T @ yte,
                          yte.sum(0), float((yte ** 2).sum()))
        for i, lam in enumerate(alphas.tolist()):
            pred = Ridge(alpha=lam).fit(tr.numpy(), ytr.numpy()).predict(te.numpy())
            assert sse[i].item() == pytest.approx(((pred - yte.numpy()) ** 2).sum(), rel=1e-10)
        scores += sse / (te.shape[0] * 3)
    ref = RidgeCV(alphas=alphas.numpy(), cv=PredefinedSplit(fold.numpy()), scoring="neg_mean_squared_error")
    assert alphas[int(scores.argmin())].item() == ref.fit(x.numpy(), y.numpy()).alpha_
    xc, yc = x - x.mean(0), y - y.mean(0)
    g = gcv_score(RidgePath(xc.T @ xc, xc.T @ yc), float((yc ** 2).sum()), 90.0, alphas)
    assert torch.isfinite(g).all() and (g > 0).all()
