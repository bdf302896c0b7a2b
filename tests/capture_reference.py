"""Independent float64 reference for the capture tests: minibatch debiased CKA of
explicitly computed features (numpy, cka_reference.center_gram), no hierfast code."""
import numpy as np
import torch

from cka_reference import center_gram


def minibatch_cka_matrix(batches_a, batches_b=None):
    """batches_*: list over batches of lists over layers of (n, d) tensors -> (La, Lb) float64."""
    batches_b = batches_a if batches_b is None else batches_b
    ab = aa = bb = 0.0
    for xa, xb in zip(batches_a, batches_b):
        n = xa[0].shape[0]
        fa = np.stack([center_gram(_np(x) @ _np(x).T, True).ravel() for x in xa])
        fb = np.stack([center_gram(_np(x) @ _np(x).T, True).ravel() for x in xb])
        s = 1.0 / (n * (n - 3))
        ab = ab + fa @ fb.T * s
        aa = aa + (fa * fa).sum(1) * s
        bb = bb + (fb * fb).sum(1) * s
    return torch.from_numpy(ab / np.sqrt(aa[:, None] * bb[None, :]))


def _np(x):
    return x.detach().to(torch.float64).reshape(x.shape[0], -1).numpy()
