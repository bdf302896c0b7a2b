"""Triton per-channel spatial max/mean + running top-k merge (definition and tie
rules: csrc/cpu/channel_topk.cpp).

One program per channel owns its (k,) list. For each row ``b`` it reduces
``x[b, c, :]`` block by block (max with the lowest argmax, or the sum), then merges
the score with vector ops: the insertion rank ``r`` is the number of kept entries
``>= score`` (ties go after existing entries), and the shifted list is read from the
same row at offset ``j - 1``.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _channel_topk_kernel(X, vals, idx, pos, bad, B, S, sb, sc, ss, base, K,
                         MODE: tl.constexpr, BLOCK_S: tl.constexpr, KP: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    mk = j < K
    row_state = c * K
    nbad = tl.zeros([], dtype=tl.int64)
    for b in range(0, B):
        best = tl.full([], float("-inf"), tl.float64)
        arg = tl.full([], -1, tl.int64)
        acc = tl.zeros([], dtype=tl.float64)
        nan = tl.zeros([], dtype=tl.int32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ms = s < S
            a = tl.load(X + b * sb + c * sc + s * ss, mask=ms, other=float("-inf")).to(tl.float64)
            isn = a != a
            nan += tl.sum(isn.to(tl.int32), axis=0)
            if MODE == 0:
                a = tl.where(isn, float("-inf"), a)
                m = tl.max(a, axis=0)
                first = tl.min(tl.where((a == m) & ms, s, S), axis=0).to(tl.int64)
                upd = (m > best) | (arg < 0)
                best = tl.where(upd, m, best)
                arg = tl.where(upd, first, arg)
            else:
                acc += tl.sum(tl.where(ms, a, 0.0), axis=0)
        if MODE == 1:
            best = acc / S
            arg = tl.full([], -1, tl.int64)
        v = tl.load(vals + row_state + j, mask=mk, other=float("-inf"))
        i = tl.load(idx + row_state + j, mask=mk, other=-1)
        p = tl.load(pos + row_state + j, mask=mk, other=-1)
        mprev = mk & (j > 0)
        vp = tl.load(vals + row_state + j - 1, mask=mprev, other=float("-inf"))
        ip = tl.load(idx + row_state + j - 1, mask=mprev, other=-1)
        pp = tl.load(pos + row_state + j - 1, mask=mprev, other=-1)
        r = tl.sum(((i >= 0) & (v >= best) & mk).to(tl.int32), axis=0)
        ok = (nan == 0) & (best == best)  # a mean can be NaN from +inf + -inf
        nbad += (~ok).to(tl.int64)
        do = ok & (r < K)
        wmask = mk & (tl.full([KP], 1, tl.int1) & do)
        new_v = tl.where(j < r, v, tl.where(j == r, best, vp))
        new_i = tl.where(j < r, i, tl.where(j == r, base + b, ip))
        new_p = tl.where(j < r, p, tl.where(j == r, arg, pp))
        tl.store(vals + row_state + j, new_v, mask=wmask)
        tl.store(idx + row_state + j, new_i, mask=wmask)
        tl.store(pos + row_state + j, new_p, mask=wmask)
        tl.debug_barrier()  # the next row reads what this one wrote
    tl.store(bad + c, tl.load(bad + c) + nbad)


def channel_topk(x: torch.Tensor, vals, idx, pos, bad, base: int, mode: int) -> None:
    """Merge the rows of ``x`` (B, C, S) into the per-channel lists (see the op)."""
    B, C, S = x.shape
    K = vals.shape[1]
    if B == 0:
        return
    sb, sc, ss = x.stride()
    block = min(1024, triton.next_power_of_2(S))
    _channel_topk_kernel[(C,)](x, vals, idx, pos, bad, B, S, sb, sc, ss, base, K,
                               MODE=mode, BLOCK_S=block, KP=max(2, triton.next_power_of_2(K)))
