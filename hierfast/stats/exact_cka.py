"""Exact full-dataset linear CKA, streamed in feature space from raw moments.

Biased (Kornblith et al. 2019) and debiased (Song et al. 2012, in the feature-space
form of Kornblith's reference code) linear CKA over the *whole* dataset, in one
mergeable pass (METRICS.md §1.7). Memory is O(d^2) per layer (O(d_a d_b) per pair),
so it suits pooled or moderate-width layers; for wide conv maps use MinibatchCKA.

For each model the layers are concatenated with their squared row norms and a
constant column, Z = [x_1 .. x_L | ||x_1||^2 .. ||x_L||^2 | 1], and the state is
sum_i z_i z_i^T (for two models: Z_a^T Z_b plus each layer's own block). Every
moment the estimator needs is a block of these sums:
n, Σx, Σxx^T, Σxy^T, Σ||x||^2 y, Σ||x||^2||y||^2, Σ||x||^4, ...
Sums are of features shifted by a per-layer reference (the first batch's column
means, :func:`~hierfast.stats.accumulator.reference_shift`): raw sums lose
~1e-16 (|mean|/std)^4 to cancellation in the debiased correction (an offset of 1e4
gave 1.25 for a true 0.34). CKA is shift-invariant, so the shift changes nothing else;
merging states with different references converts one exactly (z -> A z below).
"""
from __future__ import annotations

import torch

from ._normalize import cka_from_hsic, label_matrix
from ._validate import as_features, as_layers, check_same_batch, layer_label
from .accumulator import Accumulator, reference_shift

_GIB = 1024 ** 3


def _augmented(x64: list[torch.Tensor]) -> torch.Tensor:
    """[x_1 .. x_L | q_1 .. q_L | 1] of float64 layers, q_l = squared row norms of layer l."""
    q = torch.stack([(x * x).sum(1) for x in x64], dim=1)
    one = torch.ones(x64[0].shape[0], 1, dtype=torch.float64, device=x64[0].device)
    return torch.cat([*x64, q, one], dim=1)


class _Layout:
    """Column indices of each layer's features, squared norm and the constant in Z."""

    def __init__(self, dims: list[int]):
        self.dims = dims
        starts = [0]
        for d in dims:
            starts.append(starts[-1] + d)
        self.feat = [slice(starts[i], starts[i + 1]) for i in range(len(dims))]
        self.q = [starts[-1] + i for i in range(len(dims))]
        self.one = starts[-1] + len(dims)
        self.width = self.one + 1

    def own(self, i: int) -> "_Layout":
        """Layout of the per-layer block [x_i | q_i | 1]."""
        return _Layout([self.dims[i]])

    def shift_rows(self, M: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """A @ M for the A with z(x - delta) = A z(x), delta the concatenated per-layer shifts:
        x' = x - d 1, q' = q - 2 d.x + ||d||^2 1. A is the identity plus one rank-one block per
        layer, so this costs O(width^2) (a dense A @ M was O(width^3))."""
        out = M.clone()
        one = M[self.one]
        for f, q in zip(self.feat, self.q):
            d = delta[f]
            out[q] += (d @ d) * one - 2.0 * (d @ M[f])  # reads the unshifted rows of M
            out[f] -= torch.outer(d, one)
        return out

    def shift_cols_(self, M: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """M A^T in place (the column form of :meth:`shift_rows`)."""
        one = M[:, self.one].clone()
        for f, q in zip(self.feat, self.q):
            d = delta[f]
            M[:, q] += (d @ d) * one - 2.0 * (M[:, f] @ d)  # before the columns f move
            M[:, f] -= torch.outer(one, d)
        return M

    def shift_both(self, M: torch.Tensor, delta: torch.Tensor, other: "_Layout | None" = None,
                   delta_other: torch.Tensor | None = None) -> torch.Tensor:
        """A M B^T of sums of z z^T: rows shifted by ``delta`` (this layout), columns by
        ``delta_other`` in ``other`` (default: the same)."""
        other, delta_other = (self, delta) if other is None else (other, delta_other)
        return other.shift_cols_(self.shift_rows(M, delta), delta_other)

def _moments(M, la: _Layout, i: int, lb: _Layout, j: int):
    """Cross moments of layer i (rows of M) and layer j (columns of M)."""
    return {
        "Sxy": M[la.feat[i], lb.feat[j]],
        "Uxy": M[la.q[i], lb.feat[j]],   # Σ ||x||^2 y
        "Uyx": M[la.feat[i], lb.q[j]],   # Σ ||y||^2 x
        "P": M[la.q[i], lb.q[j]],        # Σ ||x||^2 ||y||^2
    }


def _own(M, lay: _Layout):
    """Self moments of a single-layer block [x | q | 1]."""
    f, q, o = lay.feat[0], lay.q[0], lay.one
    return {"n": M[o, o], "s": M[f, o], "S": M[f, f], "trS": M[q, o], "U": M[q, f], "P": M[q, q]}


def _check_extreme(self_hsic, owns, what, names) -> None:
    """ValueError for a layer whose float64 self-HSIC overflowed, or underflowed to 0 while its
    sums are not 0 (features beyond ~1e+-125): its CKA would be NaN, or a false constant layer."""
    trs = torch.stack([o["trS"] for o in owns])
    bad = ~torch.isfinite(self_hsic) | ((self_hsic == 0) & (trs > 0) & (trs < 2.0 ** -500))
    idx = bad.nonzero().flatten().tolist()  # one sync per compute, not per batch
    if idx:
        label = names[idx[0]] if names else f"{what}[{idx[0]}]"
        raise ValueError(f"ExactCKA: {label} has features of extreme magnitude: its float64 HSIC sums under- or "
                         "overflow. CKA is scale-invariant: multiply the features by a power of two first "
                         "(cka_matrix and linear_cka rescale such layers themselves)")


def _centered_cross(Sxy, sx, sy, n):
    return Sxy - torch.outer(sx, sy) / n


def _sum_ab(c, ox, oy, n):
    """Σ_i ||x_i - m_x||^2 ||y_i - m_y||^2 from raw moments (METRICS.md §1.7)."""
    mx, my = ox["s"] / n, oy["s"] / n
    mx2, my2 = mx @ mx, my @ my
    return (c["P"] - 2 * (my @ c["Uxy"]) + my2 * ox["trS"] - 2 * (mx @ c["Uyx"]) + 4 * (mx @ c["Sxy"] @ my)
            - 2 * my2 * (ox["s"] @ mx) + mx2 * oy["trS"] - 2 * mx2 * (oy["s"] @ my) + n * mx2 * my2)


def _pair_hsic(c, ox, oy, n, debiased):
    cxy = _centered_cross(c["Sxy"], ox["s"], oy["s"], n)
    num = (cxy * cxy).sum()
    if not debiased:
        return num
    sa = ox["trS"] - ox["s"] @ ox["s"] / n   # Σ_i ||x_i - m_x||^2
    sb = oy["trS"] - oy["s"] @ oy["s"] / n
    return num - n / (n - 2) * _sum_ab(c, ox, oy, n) + sa * sb / ((n - 1) * (n - 2))


def _self_cross(o):
    return {"Sxy": o["S"], "Uxy": o["U"], "Uyx": o["U"], "P": o["P"]}


class ExactCKA(Accumulator):
    """Streaming exact linear CKA over a whole dataset, all layer pairs.

    Args:
        debiased: unbiased HSIC (needs n >= 4 samples in total).
        max_memory: bytes the float64 statistics may take (default 2 GiB); wider
            layers raise a ValueError suggesting MinibatchCKA or pooling.

    Features of extreme magnitude (float64 HSIC sums that overflow, ~1e100 and beyond, or
    underflow, ~1e-125 and below) make ``compute`` raise ValueError naming the layer; the
    one-shot :func:`cka_matrix` rescales such layers instead.

    Example:
        >>> import torch
        >>> from hierfast.stats import ExactCKA, linear_cka
        >>> x, y = torch.randn(200, 8, dtype=torch.float64), torch.randn(200, 5, dtype=torch.float64)
        >>> acc = ExactCKA()
        >>> for i in range(0, 200, 64):
        ...     acc.update([x[i:i + 64]], [y[i:i + 64]])
        >>> bool(torch.allclose(acc.compute()[0, 0], linear_cka(x, y)))
        True
    """

    _sum_states = ("moments", "own_a", "own_b")
    _meta_keys = ("names_a", "names_b", "dims_a", "dims_b", "cross")
    _shift_states = ("shift_a", "shift_b")  # per-layer references, concatenated

    def __init__(self, debiased: bool = False, max_memory: int = 2 * _GIB) -> None:
        if not isinstance(max_memory, int) or max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
        self.debiased = bool(debiased)
        self.max_memory = max_memory
        super().__init__()

    # The per-layer own blocks have different sizes: keep them flattened in one vector.
    def _check_memory(self, dims_a, dims_b, cross):
        wa = sum(dims_a) + len(dims_a) + 1
        if cross:
            wb = sum(dims_b) + len(dims_b) + 1
            n_el = wa * wb + sum((d + 2) ** 2 for d in dims_a) + sum((d + 2) ** 2 for d in dims_b)
        else:
            n_el = wa * wa
        need = 8 * n_el
        if need > self.max_memory:
            widest = max(dims_a + dims_b)
            raise ValueError(
                f"ExactCKA would need {need / _GIB:.2f} GiB of float64 statistics for layers of widths "
                f"{dims_a}{' x ' + str(dims_b) if cross else ''} (widest {widest}), over max_memory="
                f"{self.max_memory / _GIB:.2f} GiB. Use MinibatchCKA (memory O(batch^2)), or pool the "
                "features first (e.g. average over spatial positions), or raise max_memory.")

    def _layers(self, feats, name):
        names, xs = as_layers(feats, name)
        labels = [layer_label(names, i, name) for i in range(len(xs))]
        return names, [as_features(x, lab, min_n=1) for x, lab in zip(xs, labels)], labels

    def update(self, feats_a, feats_b=None) -> None:
        """Add one batch: list/tuple/dict of ``(b, ...)`` tensors per model (any b >= 1)."""
        names_a, xs_a, labels_a = self._layers(feats_a, "feats_a")
        cross = feats_b is not None
        names_b, xs_b, labels_b = self._layers(feats_b, "feats_b") if cross else (names_a, [], [])
        check_same_batch(xs_a + xs_b, labels_a + labels_b)
        layout = {"names_a": names_a, "names_b": names_b, "cross": cross,
                  "dims_a": [x.shape[1] for x in xs_a], "dims_b": [x.shape[1] for x in xs_b] if cross else []}
        if self.initialized:
            if self._meta() != layout:
                raise ValueError(f"this batch's layers {layout} differ from the first batch's {self._meta()}")
        else:
            self._check_memory(layout["dims_a"], layout["dims_b"], cross)
        x64_a = [x.to(torch.float64) for x in xs_a]
        x64_b = [x.to(torch.float64) for x in xs_b]
        if not self.initialized:
            empty = torch.zeros(0, dtype=torch.float64, device=xs_a[0].device)
            self.shift_a = torch.cat([reference_shift(x) for x in x64_a])
            self.shift_b = torch.cat([reference_shift(x) for x in x64_b]) if cross else empty
        xa = self._shifted(x64_a, self.shift_a)
        xb = self._shifted(x64_b, self.shift_b)
        Za = _augmented(xa)
        if cross:
            moments = Za.T @ _augmented(xb)
            own_a = torch.cat([self._own_block(x).reshape(-1) for x in xa])
            own_b = torch.cat([self._own_block(x).reshape(-1) for x in xb])
        else:
            moments = Za.T @ Za
            own_a = own_b = torch.zeros(0, dtype=torch.float64, device=Za.device)
        if not self.initialized:
            for k, v in layout.items():
                setattr(self, k, v)
            self.moments, self.own_a, self.own_b = moments, own_a, own_b.clone()
        else:  # the state stays where it is (a checkpoint loaded on the CPU, GPU batches)
            self.moments += moments.to(self.moments.device)
            self.own_a += own_a.to(self.own_a.device)
            self.own_b += own_b.to(self.own_b.device)

    @staticmethod
    def _shifted(x64: list[torch.Tensor], shift: torch.Tensor) -> list[torch.Tensor]:
        """Each layer minus its slice of the concatenated reference ``shift``."""
        out, off = [], 0
        for x in x64:
            d = x.shape[1]
            out.append(x - shift[off:off + d].to(x.device))
            off += d
        return out

    def _reshifted(self, shifts) -> dict:
        """The sums about the references ``shifts = [shift_a, shift_b]``, this state unchanged
        (tensors returned as they are where a reference does not move)."""
        new_a, new_b = (s.to(self.moments.device) for s in shifts)
        da, db = new_a - self.shift_a, new_b - self.shift_b
        move_a, move_b = bool(da.any()), self.cross and bool(db.any())  # one sync, skips the common no-op
        out = {"moments": self.moments, "own_a": self.own_a, "own_b": self.own_b}
        if not (move_a or move_b):
            return out
        la = _Layout(self.dims_a)
        if self.cross:
            out["moments"] = la.shift_both(self.moments, da, _Layout(self.dims_b), db)
            if move_a:
                out["own_a"] = self._reshift_own(self.own_a, self.dims_a, da)
            if move_b:
                out["own_b"] = self._reshift_own(self.own_b, self.dims_b, db)
        else:
            out["moments"] = la.shift_both(self.moments, da)
        return out

    def _reshift_own(self, flat, dims, delta):
        out, off = [], 0
        for B, d in zip(self._unpack_own(flat, dims), dims):
            out.append(_Layout([d]).shift_both(B, delta[off:off + d]).reshape(-1))
            off += d
        return torch.cat(out)

    def _options(self) -> dict:
        # the estimator: merge, load_state_dict and sync refuse to mix biased and debiased sums
        return {"debiased": self.debiased}

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["debiased"] = self.debiased  # also top level, as states of earlier versions had it
        return out

    def load_state_dict(self, state: dict) -> "ExactCKA":
        saved = state.get("debiased") if isinstance(state, dict) else None
        if isinstance(state, dict) and state.get("options") is None and saved is not None:
            self._check_options({"debiased": bool(saved)}, "state was saved by")  # a state without options
        super().load_state_dict(state)
        if not self.initialized:  # an empty state
            return self
        dev = self.moments.device
        if self.shift_a is None:  # a state saved before shifted sums: raw sums, reference 0
            self.shift_a = torch.zeros(sum(self.dims_a), dtype=torch.float64, device=dev)
        if self.shift_b is None:
            self.shift_b = torch.zeros(sum(self.dims_b) if self.cross else 0, dtype=torch.float64, device=dev)
        return self

    @staticmethod
    def _own_block(x):
        z = _augmented([x])  # x: float64, shifted
        return z.T @ z

    def _unpack_own(self, flat, dims):
        out, off = [], 0
        for d in dims:
            w = d + 2
            out.append(flat[off:off + w * w].view(w, w))
            off += w * w
        return out

    def compute(self) -> torch.Tensor:
        """``(La, Lb)`` float64 CKA with ``row_names`` / ``col_names``."""
        self._require_data("compute")
        la = _Layout(self.dims_a)
        lb = _Layout(self.dims_b) if self.cross else la
        M = self.moments
        n = M[la.one, lb.one]
        if n < (4 if self.debiased else 2):
            raise ValueError(f"ExactCKA has seen n={int(n)} samples; it needs at least "
                             f"{4 if self.debiased else 2}")
        if self.cross:
            own_a = [_own(B, _Layout([d])) for B, d in zip(self._unpack_own(self.own_a, self.dims_a), self.dims_a)]
            own_b = [_own(B, _Layout([d])) for B, d in zip(self._unpack_own(self.own_b, self.dims_b), self.dims_b)]
        else:
            own_a = [self._own_from_full(M, la, i) for i in range(len(self.dims_a))]
            own_b = own_a
        hsic = torch.empty(len(own_a), len(own_b), dtype=torch.float64, device=M.device)
        for i in range(len(own_a)):
            for j in range(len(own_b)):
                hsic[i, j] = _pair_hsic(_moments(M, la, i, lb, j), own_a[i], own_b[j], n, self.debiased)
        self_a = torch.stack([_pair_hsic(_self_cross(o), o, o, n, self.debiased) for o in own_a])
        self_b = torch.stack([_pair_hsic(_self_cross(o), o, o, n, self.debiased) for o in own_b])
        _check_extreme(self_a, own_a, "feats_a", self.names_a)
        if self.cross:
            _check_extreme(self_b, own_b, "feats_b", self.names_b)
        names_a = self.names_a or [f"feats_a[{i}]" for i in range(len(own_a))]
        names_b = (self.names_b or [f"feats_b[{i}]" for i in range(len(own_b))]) if self.cross else names_a
        return label_matrix(cka_from_hsic(hsic, self_a, self_b, names_a, names_b), self.names_a, self.names_b)

    @staticmethod
    def _own_from_full(M, lay: _Layout, i: int):
        f, q, o = lay.feat[i], lay.q[i], lay.one
        return {"n": M[o, o], "s": M[f, o], "S": M[f, f], "trS": M[q, o], "U": M[q, f], "P": M[q, q]}
