"""Independent float64 numpy reference for CKA, written from Kornblith et al.'s
reference code description (METRICS.md §1.5) — the oracle for hierfast.stats."""
import numpy as np


def gram_linear(x):
    return x @ x.T


def gram_rbf(x, threshold=1.0):
    dot = x @ x.T
    sq = np.diag(dot)
    d2 = -2 * dot + sq[:, None] + sq[None, :]
    return np.exp(-d2 / (2 * threshold ** 2 * np.median(d2)))


def center_gram(g, unbiased=False):
    g = g.astype(np.float64).copy()
    if unbiased:
        n = g.shape[0]
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None]
        g -= means[None, :]
        np.fill_diagonal(g, 0)
    else:
        means = g.mean(0)
        means -= means.mean() / 2
        g -= means[:, None]
        g -= means[None, :]
    return g


def cka(gx, gy, debiased=False):
    gx, gy = center_gram(gx, debiased), center_gram(gy, debiased)
    return gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy))


def minibatch_cka(batches_x, batches_y):
    """Nguyen et al. 2021 with the 1/(n(n-3)) factor per batch."""
    xy = xx = yy = 0.0
    for x, y in zip(batches_x, batches_y):
        n = x.shape[0]
        kx, ky = center_gram(gram_linear(x), True), center_gram(gram_linear(y), True)
        xy += kx.ravel() @ ky.ravel() / (n * (n - 3))
        xx += kx.ravel() @ kx.ravel() / (n * (n - 3))
        yy += ky.ravel() @ ky.ravel() / (n * (n - 3))
    return xy / np.sqrt(xx * yy)
