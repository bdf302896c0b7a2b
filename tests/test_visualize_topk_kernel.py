"""The fused per-channel spatial max/mean + running top-k merge (hierfast.ops.channel_topk)
against a float64 brute force over the whole stream, ties included, on every backend."""
import pytest
import torch

from conftest import available_backends, devices
from hierfast import ops
from hierfast.ops.channel_topk import new_state


def brute_force(x: torch.Tensor, k: int, reduce: str):
    """(C, k) values, indices, positions over the full (N, C, S) stack, float64, by Python sort:
    key (-score, index); within a row the first maximal position."""
    x = x.to(torch.float64).cpu()
    N, C, S = x.shape
    vals = torch.full((C, k), float("-inf"), dtype=torch.float64)
    idx = torch.full((C, k), -1, dtype=torch.int64)
    pos = torch.full((C, k), -1, dtype=torch.int64)
    for c in range(C):
        entries = []
        for n in range(N):
            row = x[n, c].tolist()
            if reduce == "max":
                m = max(row)
                entries.append((-m, n, row.index(m)))
            else:
                entries.append((-sum(row) / S, n, -1))
        entries.sort()
        for j, (v, n, p) in enumerate(entries[:k]):
            vals[c, j], idx[c, j], pos[c, j] = -v, n, p
    return vals, idx, pos


def _cases():
    return [(d, b) for d in devices() for b in available_backends(d)]


SHAPES = [(23, 5, 7, 3, 4, "bcs", True), (40, 3, 1, 9, 16, "bcs", True), (12, 4, 33, 12, 5, "bsc", False),
          (30, 6, 10, 4, 7, "bcs", False), (9, 2, 300, 2, 9, "bsc", True)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _full_cases():
    # The Triton interpreter costs ~1 s per case on the shared CPU: it runs every shape in
    # float32 and the low-precision loads on the small token-layout shapes (on a GPU: all).
    out = []
    for device, backend in _cases():
        for shape in SHAPES:
            for dtype in DTYPES:
                slow = backend == "triton" and device == "cpu"
                if slow and not (dtype == torch.float32 or (shape[0] * shape[1] <= 48)):
                    continue
                for reduce in ("max", "mean"):
                    out.append((device, backend, reduce, dtype, *shape))
    return out


@pytest.mark.parametrize("device,backend,reduce,dtype,N,C,S,k,batch,layout,ties", _full_cases())
def test_matches_brute_force(device, backend, reduce, dtype, N, C, S, k, batch, layout, ties):
    g = torch.Generator().manual_seed(N * 1000 + C * 10 + S)
    if ties:  # few distinct values: ties across rows, channels and positions
        x = torch.randint(-2, 3, (N, C, S), generator=g).to(dtype)
    else:
        x = torch.randn(N, C, S, generator=g).to(dtype)
    x = x.to(device)
    if layout == "bsc":  # token layout (B, T, C) passed as a transposed view
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    state = new_state(C, k, device)
    for s in range(0, N, batch):
        ops.channel_topk(x[s:s + batch], state, s, reduce=reduce, backend=backend)
    v, i, p = brute_force(x, k, reduce)
    n = min(k, N)
    assert torch.equal(state["idx"].cpu()[:, :n], i[:, :n])
    assert torch.equal(state["pos"].cpu()[:, :n], p[:, :n])
    assert torch.allclose(state["vals"].cpu()[:, :n], v[:, :n], rtol=1e-12, atol=1e-12)
    assert (state["idx"][:, n:] == -1).all()
    assert (state["bad"] == 0).all()


@pytest.mark.parametrize("device,backend", _cases())
def test_nan_rows_are_counted_not_ranked(device, backend):
    x = torch.randn(6, 3, 5, device=device)
    x[2, 1, 3] = float("nan")
    x[4, 1, 0] = float("nan")
    x[2, 1, 0] = 100.0  # would win if NaN rows were merged
    state = new_state(3, 5, device)
    ops.channel_topk(x, state, 0, backend=backend)
    assert state["bad"].tolist() == [0, 2, 0]
    assert sorted(state["idx"][1, :4].tolist()) == [0, 1, 3, 5]
    assert state["idx"][1, 4].item() == -1  # 4 good rows for 5 slots


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_infinite_scores_stay_infinite(device, backend, reduce):
    # +-inf scores rank as +-inf (the reference once clamped them to +-DBL_MAX via nan_to_num)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)
    x[1, 0, 2] = float("inf")
    x[3, 0, :] = float("-inf")
    x[0, 1, :] = float("-inf")
    x[4, 1, 1] = float("inf")
    state = new_state(2, 5, device)
    ops.channel_topk(x.to(device), state, 0, reduce=reduce, backend=backend)
    v, i, p = brute_force(x, 5, reduce)
    assert torch.equal(state["vals"].cpu(), v)
    assert torch.equal(state["idx"].cpu(), i)
    assert torch.equal(state["pos"].cpu(), p)


def _bad_states(C, k):
    """(description, state) pairs that the kernels must never see: wrong dtype, shape, layout."""
    def with_(key, t):
        st = new_state(C, k)
        st[key] = t
        return st
    out = [("vals float32", with_("vals", torch.full((C, k), float("-inf"), dtype=torch.float32))),
           ("idx int32", with_("idx", torch.full((C, k), -1, dtype=torch.int32))),
           ("pos float64", with_("pos", torch.full((C, k), -1.0, dtype=torch.float64))),
           ("bad int32", with_("bad", torch.zeros(C, dtype=torch.int32))),
           ("bad (C, 1)", with_("bad", torch.zeros(C, 1, dtype=torch.int64))),
           ("idx short k", with_("idx", torch.full((C, k - 1), -1, dtype=torch.int64))),
           ("pos wrong C", with_("pos", torch.full((C + 1, k), -1, dtype=torch.int64))),
           ("vals 1-D", with_("vals", torch.full((C,), float("-inf"), dtype=torch.float64)))]
    for key in ("vals", "idx", "pos"):  # transposed (k, C) buffers: right shape, wrong layout
        t = new_state(C, k)[key]
        out.append((f"{key} transposed", with_(key, torch.full((k, C), t.flatten()[0].item(), dtype=t.dtype).T)))
    out.append(("bad strided", with_("bad", torch.zeros(2 * C, dtype=torch.int64)[::2])))
    out.append(("missing key", {kk: v for kk, v in new_state(C, k).items() if kk != "pos"}))
    return out


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("case", range(len(_bad_states(3, 2))))
def test_bad_state_is_refused(backend, case):
    # the kernels index the state as contiguous (C, k) float64/int64 through raw pointers: a
    # float32 vals once corrupted the heap, transposed buffers scrambled the lists
    name, state = _bad_states(3, 2)[case]
    before = {kk: v.clone() for kk, v in state.items()}
    x = torch.randn(6, 3, 5)
    with pytest.raises((ValueError, TypeError), match="state"):
        ops.channel_topk(x, state, 0, backend=backend)
    assert all(torch.equal(state[kk], v) for kk, v in before.items()), name  # nothing written
