"""Triton screen for the fused 2-nearest-neighbour search (definition:
hierfast/ops/knn2.py::knn2_reference; the exact certification runs afterwards in
hierfast/ops/knn2.py::certify).

One program per ``BLOCK_M`` query rows walks the references in ``BLOCK_N`` tiles; each
tile of squared distances ``||q||^2 + ||r||^2 - 2 q.r`` (norms in float64, dot products
from ``tl.dot`` in the input precision) is reduced at once to its ``KEEP = 4`` smallest
entries per row (``tl.argmin`` takes the lowest index on ties), each inserted into the
row's running sorted list. Tiles are visited in increasing index order and running entries
win ties, so ties go to the lower index. The n x n matrix is never stored.
"""
import torch
import triton
import triton.language as tl

KEEP = 4


@triton.jit
def _insert(v, g, b1, b2, b3, b4, j1, j2, j3, j4):
    """Insert (v, g) per row into the ascending list b1..b4 (existing entries win ties)."""
    c1 = v < b1
    c2 = v < b2
    c3 = v < b3
    c4 = v < b4
    nb4 = tl.where(c3, b3, tl.where(c4, v, b4))
    nj4 = tl.where(c3, j3, tl.where(c4, g, j4))
    nb3 = tl.where(c2, b2, tl.where(c3, v, b3))
    nj3 = tl.where(c2, j2, tl.where(c3, g, j3))
    nb2 = tl.where(c1, b1, tl.where(c2, v, b2))
    nj2 = tl.where(c1, j1, tl.where(c2, g, j2))
    nb1 = tl.where(c1, v, b1)
    nj1 = tl.where(c1, g, j1)
    return nb1, nb2, nb3, nb4, nj1, nj2, nj3, nj4


@triton.jit
def _knn2_screen_kernel(X, N2, D, J, n, d, s0, s1,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        F64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mr = rows < n
    nq = tl.load(N2 + rows, mask=mr, other=0.0)
    b1 = tl.full([BLOCK_M], float("inf"), tl.float64)
    b2 = tl.full([BLOCK_M], float("inf"), tl.float64)
    b3 = tl.full([BLOCK_M], float("inf"), tl.float64)
    b4 = tl.full([BLOCK_M], float("inf"), tl.float64)
    j1 = tl.full([BLOCK_M], -1, tl.int64)
    j2 = tl.full([BLOCK_M], -1, tl.int64)
    j3 = tl.full([BLOCK_M], -1, tl.int64)
    j4 = tl.full([BLOCK_M], -1, tl.int64)
    lanes = tl.arange(0, BLOCK_N)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + lanes
        mc = cols < n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64 if F64 else tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mk = ks < d
            q = tl.load(X + rows[:, None] * s0 + ks[None, :] * s1, mask=mr[:, None] & mk[None, :], other=0.0)
            r = tl.load(X + cols[None, :] * s0 + ks[:, None] * s1, mask=mc[None, :] & mk[:, None], other=0.0)
            acc += tl.dot(q, r, input_precision="ieee")
        nr = tl.load(N2 + cols, mask=mc, other=0.0)
        dist = nq[:, None] + nr[None, :] - 2.0 * acc.to(tl.float64)
        dist = tl.maximum(dist, 0.0)
        bad = (cols[None, :] == rows[:, None]) | (cols[None, :] >= n)
        dist = tl.where(bad, float("inf"), dist)
        for _ in tl.static_range(4):  # the tile's 4 smallest, in (value, index) order
            m = tl.min(dist, axis=1)
            a = tl.argmin(dist, axis=1)
            g = tl.where(m < float("inf"), (c0 + a).to(tl.int64), -1)
            b1, b2, b3, b4, j1, j2, j3, j4 = _insert(m, g, b1, b2, b3, b4, j1, j2, j3, j4)
            dist = tl.where(lanes[None, :] == a[:, None], float("inf"), dist)
    tl.store(D + rows * 4 + 0, b1, mask=mr)
    tl.store(D + rows * 4 + 1, b2, mask=mr)
    tl.store(D + rows * 4 + 2, b3, mask=mr)
    tl.store(D + rows * 4 + 3, b4, mask=mr)
    tl.store(J + rows * 4 + 0, j1, mask=mr)
    tl.store(J + rows * 4 + 1, j2, mask=mr)
    tl.store(J + rows * 4 + 2, j3, mask=mr)
    tl.store(J + rows * 4 + 3, j4, mask=mr)


def knn2_screen(xc: torch.Tensor, norms: torch.Tensor, cand_d: torch.Tensor, cand_j: torch.Tensor) -> None:
    """Fill ``cand_d`` (n, 4) float64 screened squared distances and ``cand_j`` (n, 4) int64
    indices (-1: none) for centred ``xc`` (n, d) float32/float64 with float64 ``norms`` (n,)."""
    n, d = xc.shape
    block = 32
    _knn2_screen_kernel[(triton.cdiv(n, block),)](xc, norms, cand_d, cand_j, n, d, xc.stride(0), xc.stride(1),
                                                  BLOCK_M=block, BLOCK_N=block, BLOCK_K=32,
                                                  F64=xc.dtype == torch.float64)
