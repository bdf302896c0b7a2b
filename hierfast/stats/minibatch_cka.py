"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the
Same Things?", ICLR): per batch the unbiased HSIC of every layer pair, summed over
batches, CKA from the sums. Consistent as the number of batches grows at fixed batch
size, and needs one batch of features in memory.
"""
from __future__ import annotations

import torch

from . import _grams
from ._normalize import cka_from_hsic, label_matrix
from ._validate import as_features, as_layers, check_same_batch, layer_label
from .accumulator import Accumulator


class MinibatchCKA(Accumulator):
    """Streaming debiased linear CKA for all layer pairs.

    Each ``update`` U-centres one Gram per layer (rows of F, shape (L, b^2)) and adds
    ``F_a F_b^T / (b (b - 3))`` — the unbiased HSIC of every pair in one GEMM. The
    1/(b(b-3)) factor makes batches of different sizes (a ragged last batch) weigh as
    the estimator prescribes.

    Features of extreme magnitude (a centred Gram trace beyond 2^+-500, or below the
    Gram dtype's smallest normal number: float64 ~1e+-125 and beyond, float32 below ~1e-20)
    raise ValueError naming the layer instead of summing inf/0 into NaN: a streamed layer
    cannot be rescaled per batch. The one-shot :func:`cka_matrix` / :func:`linear_cka`
    rescale such layers by a power of two and return the exact CKA.

    Example:
        >>> import torch
        >>> from hierfast.stats import MinibatchCKA
        >>> acc = MinibatchCKA()
        >>> for _ in range(3):
        ...     x = torch.randn(32, 10)
        ...     acc.update({"x": x, "2x": 2 * x})
        >>> acc.compute().shape
        torch.Size([2, 2])
    """

    _sum_states = ("hsic_ab", "hsic_aa", "hsic_bb", "n_samples", "n_batches")
    _meta_keys = ("names_a", "names_b", "n_layers", "cross")

    def __init__(self, *, backend: str | None = None) -> None:
        self.backend = backend
        self._workspace = _grams.Workspace()
        super().__init__()

    def _layers(self, feats, name):
        names, xs = as_layers(feats, name)
        labels = [layer_label(names, i, name) for i in range(len(xs))]
        # finiteness is checked from the centring kernel's float64 means (no extra pass)
        return names, [as_features(x, lab, min_n=4, check_finite=False) for x, lab in zip(xs, labels)], labels

    def update(self, feats_a, feats_b=None) -> None:
        """Add one batch.

        Args:
            feats_a: list/tuple/dict of ``(b, ...)`` tensors, one per layer, b >= 4.
            feats_b: the same inputs through a second model (cross-model mode), or None.
                The mode and layer layout are fixed by the first call.
        """
        names_a, xs_a, labels_a = self._layers(feats_a, "feats_a")
        cross = feats_b is not None
        if cross:
            names_b, xs_b, labels_b = self._layers(feats_b, "feats_b")
        else:
            names_b, xs_b, labels_b = names_a, [], []
        b, device = check_same_batch(xs_a + xs_b, labels_a + labels_b)
        layout = {"names_a": names_a, "names_b": names_b, "cross": cross,
                  "n_layers": [len(xs_a), len(xs_b) if cross else len(xs_a)]}
        if self.initialized:
            mine = self._meta()
            if mine != layout:
                raise ValueError(f"this batch's layers {layout} differ from the first batch's {mine}; every "
                                 "update must pass the same layers (and the same number of models)")
        Fa = _grams.stacked_centered_grams(xs_a, labels_a, unbiased=True, backend=self.backend,
                                           workspace=self._workspace, slot_prefix="a")
        scale = 1.0 / (b * (b - 3))
        if cross:
            Fb = _grams.stacked_centered_grams(xs_b, labels_b, unbiased=True, backend=self.backend,
                                               workspace=self._workspace, slot_prefix="b")
            ab = (Fa @ Fb.T) * scale
            aa = torch.einsum("ij,ij->i", Fa, Fa) * scale
            bb = torch.einsum("ij,ij->i", Fb, Fb) * scale
        else:
            ab = (Fa @ Fa.T) * scale
            aa = ab.diagonal().clone()
            bb = aa
        counts = torch.tensor([float(b)], dtype=torch.float64, device=device), \
            torch.ones(1, dtype=torch.float64, device=device)
        if not self.initialized:
            for k, v in layout.items():
                setattr(self, k, v)
            self.hsic_ab, self.hsic_aa, self.hsic_bb = ab, aa, bb.clone()
            self.n_samples, self.n_batches = counts
        else:
            self.hsic_ab += ab.to(self.hsic_ab.device)
            self.hsic_aa += aa.to(self.hsic_aa.device)
            self.hsic_bb += bb.to(self.hsic_bb.device)
            self.n_samples += counts[0].to(self.n_samples.device)
            self.n_batches += counts[1].to(self.n_batches.device)

    def compute(self) -> torch.Tensor:
        """``(La, Lb)`` float64 CKA (``(L, L)`` in single-model mode) with ``row_names``/``col_names``."""
        self._require_data("compute")
        la = self.names_a or [f"feats_a[{i}]" for i in range(self.n_layers[0])]
        lb = (self.names_b or [f"feats_b[{i}]" for i in range(self.n_layers[1])]) if self.cross else la
        out = cka_from_hsic(self.hsic_ab.clone(), self.hsic_aa, self.hsic_bb, la, lb)
        return label_matrix(out, self.names_a, self.names_b)
