"""Triton Gram epilogue (definition: csrc/cpu/gram_epilogue.cpp).

Kernel 1 computes the float64 row sums (one program per row); kernel 2 writes the
centred / U-centred Gram in (BLOCK_M, BLOCK_N) tiles. Runs on CUDA tensors, and on
CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rowsum_kernel(K, rowsum, n, s0, s1, UNBIASED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
        keep = j < n
        if UNBIASED:
            keep = keep & (j != i)
        v = tl.load(K + i * s0 + j * s1, mask=keep, other=0.0)
        acc += v.to(tl.float64)
    tl.store(rowsum + i, tl.sum(acc, axis=0))


@triton.jit
def _write_kernel(K, out, rowsum, total, n, s0, s1, UNBIASED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    i = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mi = i < n
    mj = j < n
    t = tl.load(total)
    nf = n.to(tl.float64)
    if UNBIASED:
        a = 1.0 / (nf - 2.0)
        c = t / ((nf - 1.0) * (nf - 2.0))
    else:
        a = 1.0 / nf
        c = t / (nf * nf)
    ri = tl.load(rowsum + i, mask=mi, other=0.0)
    rj = tl.load(rowsum + j, mask=mj, other=0.0)
    m2 = mi[:, None] & mj[None, :]
    k = tl.load(K + i[:, None] * s0 + j[None, :] * s1, mask=m2, other=0.0).to(tl.float64)
    v = k - a * ri[:, None] - a * rj[None, :] + c
    if UNBIASED:
        v = tl.where(i[:, None] == j[None, :], 0.0, v)
    tl.store(out + i[:, None] * n + j[None, :], v.to(out.dtype.element_ty), mask=m2)


def gram_epilogue(gram: torch.Tensor, out: torch.Tensor, rowsum: torch.Tensor, total: torch.Tensor,
                  unbiased: bool) -> None:
    """Fill ``out`` (n*n contiguous), ``rowsum`` (n, f64) and ``total`` (1, f64)."""
    n = gram.shape[0]
    s0, s1 = gram.stride()
    _rowsum_kernel[(n,)](gram, rowsum, n, s0, s1, UNBIASED=unbiased, BLOCK=256)
    torch.sum(rowsum, dim=0, keepdim=True, out=total)
    grid = (triton.cdiv(n, 64), triton.cdiv(n, 64))
    _write_kernel[grid](gram, out, rowsum, total, n, s0, s1, UNBIASED=unbiased, BLOCK_M=64, BLOCK_N=64)
