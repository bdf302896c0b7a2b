"""Triton column-centring (definition: csrc/cpu/center.cpp).

Kernel 1: one program per block of columns walks the rows and accumulates float64
column sums. Kernel 2: fused cast + subtract + write in 2-D tiles.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _colmean_kernel(X, mean, n, d, s0, s1, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pc = tl.program_id(0)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < d
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for start in range(0, n, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        m = (r < n)[:, None] & mc[None, :]
        acc += tl.load(X + r[:, None] * s0 + c[None, :] * s1, mask=m, other=0.0).to(tl.float64)
    tl.store(mean + c, tl.sum(acc, axis=0) / n.to(tl.float64), mask=mc)


@triton.jit
def _sub_kernel(X, out, mean, n, d, s0, s1, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (r < n)[:, None] & (c < d)[None, :]
    x = tl.load(X + r[:, None] * s0 + c[None, :] * s1, mask=m, other=0.0).to(tl.float64)
    mu = tl.load(mean + c, mask=c < d, other=0.0)
    tl.store(out + r[:, None] * d + c[None, :], (x - mu[None, :]).to(out.dtype.element_ty), mask=m)


def center_columns(x: torch.Tensor, out: torch.Tensor, mean: torch.Tensor) -> None:
    """Fill ``out`` (n, d contiguous) with ``x - mean`` and ``mean`` (d, f64)."""
    n, d = x.shape
    s0, s1 = x.stride()
    _colmean_kernel[(triton.cdiv(d, 64),)](x, mean, n, d, s0, s1, BLOCK_R=32, BLOCK_C=64)
    grid = (triton.cdiv(n, 32), triton.cdiv(d, 64))
    _sub_kernel[grid](x, out, mean, n, d, s0, s1, BLOCK_R=32, BLOCK_C=64)
