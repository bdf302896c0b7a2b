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
