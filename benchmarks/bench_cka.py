"""CKA benchmark (issue "Package foundation and CKA core", section Benchmarks).

Workload: two CNNs (torch.manual_seed 0 and 1) of 8 x [Conv2d 3x3 pad 1 + ReLU], channels
3-32-32-64-64-128-128-128-128, stride 2 at convs 3, 5, 7, on N = 1024 random 3x32x32
inputs; features = the 8 ReLU outputs flattened (d = 32768 ... 2048), float32. The
features are computed ONCE, outside every timed region (except torch-cka, which runs
the models itself). Each provider then computes the 8 x 8 cross-model CKA matrix, and
its largest absolute deviation from a float64 reference of the SAME estimator is
reported (minibatch debiased vs minibatch; full-batch biased/debiased vs full-batch).

Run: ``python benchmarks/run.py cka [--quick]`` (or this file directly).
"""
from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # the third-party packages draw progress bars

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import bench, row, sgemm_rate  # noqa: E402

WIDTHS = (3, 32, 32, 64, 64, 128, 128, 128, 128)
STRIDE2 = (3, 5, 7)  # 1-based conv indices with stride 2
BATCH = 128
N_FULL, N_QUICK = 1024, 256
INPUT_SEED = 1234
TOL = 1e-5  # issue target: every hierfast entry within 1e-5 of float64


# --------------------------------------------------------------------------- workload
def make_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(8):
        layers += [nn.Conv2d(WIDTHS[i], WIDTHS[i + 1], 3, stride=2 if i + 1 in STRIDE2 else 1, padding=1),
                   nn.ReLU()]
    return nn.Sequential(*layers).eval()


RELU_NAMES = [str(2 * i + 1) for i in range(8)]  # module names of the ReLUs in make_cnn's Sequential


@torch.no_grad()
def extract(model: nn.Sequential, x: torch.Tensor, batch: int):
    """The 8 ReLU outputs, flattened (N, C*H*W), and spatially averaged (N, C); float32."""
    flat, pooled = [[] for _ in range(8)], [[] for _ in range(8)]
    for s in range(0, x.shape[0], batch):
        h = x[s:s + batch]
        k = 0
        for m in model:
            h = m(h)
            if isinstance(m, nn.ReLU):
                flat[k].append(h.reshape(h.shape[0], -1))
                pooled[k].append(h.mean(dim=(2, 3)))
                k += 1
    return [torch.cat(f).contiguous() for f in flat], [torch.cat(p).contiguous() for p in pooled]


# --------------------------------------------------------------------------- float64 references
def _ucentre_(g: torch.Tensor) -> torch.Tensor:
    """U-centring in place (Szekely & Rizzo 2014; Kornblith et al. ``center_gram(unbiased=True)``)."""
    n = g.shape[0]
    g.fill_diagonal_(0)
    means = g.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    g -= means[:, None]
    g -= means[None, :]
    g.fill_diagonal_(0)
    return g


def _centre_(g: torch.Tensor) -> torch.Tensor:
    """Double centring H K H in place (Kornblith et al. ``center_gram(unbiased=False)``)."""
    means = g.mean(0)
    means -= means.mean() / 2
    g -= means[:, None]
    g -= means[None, :]
    return g


def _stacked(xs, debiased: bool, dtype=torch.float64) -> torch.Tensor:
    """One (U-)centred Gram per layer, flattened into the rows of an (L, n^2) matrix."""
    centre = _ucentre_ if debiased else _centre_
    rows = []
    for x in xs:
        x = x.to(dtype)
        rows.append(centre(x @ x.T).reshape(-1))
    return torch.stack(rows)


def _ratio(ab, aa, bb):
    return ab / torch.sqrt(aa[:, None] * bb[None, :])


def ref_step(xs_a, xs_b):
    """One batch of the vectorised float64 minibatch reference: (F_a F_b^T, diag sums)."""
    Fa, Fb = _stacked(xs_a, True), _stacked(xs_b, True)
    return Fa @ Fb.T, (Fa * Fa).sum(1), (Fb * Fb).sum(1)


def ref_minibatch(A, B, batch: int, step=ref_step) -> torch.Tensor:
    """Minibatch CKA (Nguyen et al. 2021), float64; equal batches so 1/(b(b-3)) cancels."""
    ab = aa = bb = 0
    for s in range(0, A[0].shape[0], batch):
        d_ab, d_aa, d_bb = step([x[s:s + batch] for x in A], [y[s:s + batch] for y in B])
        ab, aa, bb = ab + d_ab, aa + d_aa, bb + d_bb
    return _ratio(ab, aa, bb)


def ref_full(A, B, debiased: bool) -> torch.Tensor:
    """Full-batch CKA (biased: Kornblith et al. 2019; debiased: Song et al. 2012), float64."""
    Fa, Fb = _stacked(A, debiased), _stacked(B, debiased)
    return _ratio(Fa @ Fb.T, (Fa * Fa).sum(1), (Fb * Fb).sum(1))


# --------------------------------------------------------------------------- other providers
def naive_minibatch(A, B, batch: int) -> torch.Tensor:
    """Plain torch as naive code writes it: float32, per layer pair and per batch two
    Grams, U-centring, three HSIC sums."""
    out = torch.empty(len(A), len(B))
    for i, x in enumerate(A):
        for j, y in enumerate(B):
            xy = xx = yy = 0.0
            for s in range(0, x.shape[0], batch):
                xb, yb = x[s:s + batch], y[s:s + batch]
                K, L = _ucentre_(xb @ xb.T), _ucentre_(yb @ yb.T)
                xy = xy + (K * L).sum()
                xx = xx + (K * K).sum()
                yy = yy + (L * L).sum()
            out[i, j] = xy / torch.sqrt(xx * yy)
    return out


def ckatorch_minibatch(A, B, batch: int) -> torch.Tensor:
    """``ckatorch.cka_batch(x, y)`` takes (n_batches, b, d) stacks: one call per layer pair
    (this is also how ``ckatorch.CKA`` loops over pairs)."""
    from ckatorch import cka_batch

    nb = A[0].shape[0] // batch
    out = torch.empty(len(A), len(B), dtype=torch.float64)
    for i, x in enumerate(A):
        for j, y in enumerate(B):
            out[i, j] = cka_batch(x.view(nb, batch, -1), y.view(nb, batch, -1))
    return out


def gram_floor(A, B, batch: int) -> None:
    """Not a provider: the float32 Gram GEMMs alone (x @ x.T per layer per batch), the
    floor any Gram-form implementation pays (the issue's GPU target is stated against it)."""
    for s in range(0, A[0].shape[0], batch):
        for x in A + B:
            xb = x[s:s + batch]
            xb @ xb.T


def hierfast_minibatch(A, B, batch: int) -> torch.Tensor:
    from hierfast.stats import MinibatchCKA

    acc = MinibatchCKA()
    for s in range(0, A[0].shape[0], batch):
        acc.update([x[s:s + batch] for x in A], [y[s:s + batch] for y in B])
    return acc.compute()


def hierfast_exact(A, B, batch: int, debiased: bool) -> torch.Tensor:
    from hierfast.stats import ExactCKA

    acc = ExactCKA(debiased=debiased)
    for s in range(0, A[0].shape[0], batch):
        acc.update([x[s:s + batch] for x in A], [y[s:s + batch] for y in B])
    return acc.compute()


# --------------------------------------------------------------------------- helpers
def deviation(m: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(largest |m - ref| over finite entries, number of non-finite entries of m)."""
    m = torch.as_tensor(m).detach().to(torch.float64)
    bad = ~torch.isfinite(m)
    dev = (m - ref).abs()[~bad]
    return (dev.max().item() if dev.numel() else math.nan), int(bad.sum())


def _installed(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run(quick: bool = False) -> list[dict]:
    """All CKA rows. ``quick``: N = 256 (2 batches of 128) and ~1 s per provider."""
    n = N_QUICK if quick else N_FULL
    budget = 1.0 if quick else 6.0
    kw = dict(budget_s=budget, min_repeats=1 if quick else 3, max_repeats=5 if quick else 15)
    nb = n // BATCH
    torch.manual_seed(INPUT_SEED)
    inputs = torch.randn(n, 3, 32, 32)
    m0, m1 = make_cnn(0), make_cnn(1)
    A, PA = extract(m0, inputs, BATCH)
    B, PB = extract(m1, inputs, BATCH)
    dims = [x.shape[1] for x in A]
    sum_d = sum(dims) + sum(x.shape[1] for x in B)
    gemm_mb = 2 * BATCH ** 2 * sum_d * nb  # nominal FLOPs: one full Gram GEMM per layer per batch
    gemm_full = 2 * n ** 2 * sum_d
    pre = (f"features precomputed once, untimed ({n} inputs, d = {dims}, float32, "
           f"{sum(x.numel() for x in A + B) * 4 / 2**20:.0f} MiB)")
    rows: list[dict] = []

    def add(workload, provider, timing, ref, base_t, flops=None, note="", **extra):
        dev, nan = deviation(timing["result"], ref) if ref is not None else (math.nan, 0)
        if nan:
            note = (f"{nan} NaN/inf of {timing['result'].numel()}; " + note).rstrip("; ")
        r = row(workload, provider, timing, ratio=base_t / timing["median"] if base_t else math.nan,
                max_dev=dev, note=note, nan=nan,
                gflops=flops / timing["median"] / 1e9 if flops else math.nan, **extra)
        rows.append(r)
        return r

    # ---- minibatch (debiased), 8 batches of 128
    wl = f"minibatch {nb}×{BATCH}, debiased"
    t_ref = bench(lambda: ref_minibatch(A, B, BATCH), **kw)
    ref_mb = t_ref["result"]
    add(wl, "float64 vectorised reference (torch)", t_ref, ref_mb, t_ref["median"], gemm_mb,
        "baseline & oracle: 1 Gram per layer per batch, U-centring, F_a F_bᵀ", baseline=True)
    t = bench(lambda: hierfast_minibatch(A, B, BATCH), **kw)
    add(wl, "hierfast MinibatchCKA", t, ref_mb, t_ref["median"], gemm_mb, "", hierfast=True)
    t = bench(lambda: gram_floor(A, B, BATCH), **kw)
    rows.append(row(wl, "(floor) float32 Gram GEMMs alone", t, ratio=t_ref["median"] / t["median"],
                    gflops=gemm_mb / t["median"] / 1e9, floor=True,
                    note="x @ x.T per layer per batch, nothing else; not a CKA provider"))
    try:
        step_c = torch.compile(ref_step)
        t = bench(lambda: ref_minibatch(A, B, BATCH, step_c), **kw)
        add(wl, "torch.compile(float64 reference)", t, ref_mb, t_ref["median"], gemm_mb,
            f"compile + first call {t['warmup']:.1f} s (warm-up, untimed)")
    except Exception as e:  # noqa: BLE001
        rows.append(row(wl, "torch.compile(float64 reference)", note=f"failed: {type(e).__name__}: {e}"[:300]))
    t = bench(lambda: naive_minibatch(A, B, BATCH), **kw)
    add(wl, "plain torch per-pair loop (float32)", t, ref_mb, t_ref["median"], gemm_mb,
        "Grams recomputed per pair (8× the GEMMs)")
    v = _installed("ckatorch")
    if v:
        t = bench(lambda: ckatorch_minibatch(A, B, BATCH), **kw)
        add(wl, f"ckatorch {v} cka_batch", t, ref_mb, t_ref["median"], gemm_mb,
            "64 calls (one per pair), float64 Grams", ckatorch=True)
    else:
        rows.append(row(wl, "ckatorch cka_batch", note="not installed (pip install hierfast[bench])"))
    v = _installed("torch-cka")
    if v:
        rows += _torch_cka_rows(wl, v, m0, m1, inputs, ref_mb, t_ref["median"], kw)
    else:
        rows.append(row(wl, "torch-cka CKA.compare", note="not installed (pip install hierfast[bench])"))

    # ---- full batch, biased and debiased
    from hierfast.stats import cka_matrix

    for debiased in (False, True):
        wl = f"full batch N={n}, {'debiased' if debiased else 'biased'}"
        t_ref = bench(lambda: ref_full(A, B, debiased), **kw)
        ref = t_ref["result"]
        add(wl, "float64 vectorised reference (torch)", t_ref, ref, t_ref["median"], gemm_full,
            "baseline & oracle: 1 Gram per layer, (U-)centring, F_a F_bᵀ", baseline=True)
        t = bench(lambda: cka_matrix(A, B, debiased=debiased), **kw)
        add(wl, "hierfast cka_matrix", t, ref, t_ref["median"], gemm_full, "", hierfast=True, full=True)
        if not debiased:  # the floor is the same for both estimators
            t = bench(lambda: gram_floor(A, B, n), **kw)
            rows.append(row(wl, "(floor) float32 Gram GEMMs alone", t, ratio=t_ref["median"] / t["median"],
                            gflops=gemm_full / t["median"] / 1e9, floor=True,
                            note="x @ x.T per layer (full GEMM), nothing else; not a CKA provider"))

    # ---- ExactCKA: pooled (N, C) features; refuses the flattened maps
    for debiased in (False, True):
        wl = f"pooled (N={n}, C), {'debiased' if debiased else 'biased'}"
        t_ref = bench(lambda: ref_full(PA, PB, debiased), **kw)
        ref = t_ref["result"]
        add(wl, "float64 vectorised reference (torch)", t_ref, ref, t_ref["median"], None,
            "full-batch Gram form on the pooled features", baseline=True)
        t = bench(lambda: hierfast_exact(PA, PB, BATCH, debiased), **kw)
        add(wl, "hierfast ExactCKA", t, ref, t_ref["median"], None, f"streamed, {nb} batches of {BATCH}",
            hierfast=True)
        t = bench(lambda: cka_matrix(PA, PB, debiased=debiased), **kw)
        add(wl, "hierfast cka_matrix", t, ref, t_ref["median"], None, "", hierfast=True)
    from hierfast.stats import ExactCKA

    try:
        ExactCKA().update([x[:BATCH] for x in A], [y[:BATCH] for y in B])
        msg = "did NOT raise (expected a ValueError)"
    except ValueError as e:
        msg = f"raises ValueError as intended: {e}"
    rows.append(row(f"flattened (N={n}, d)", "hierfast ExactCKA", note=msg, hierfast_raise=True))
    for r in rows:
        r.setdefault("note", "")
    rows[0]["note"] = rows[0]["note"] + "; " + pre
    rows[0]["sgemm_gflops"] = sgemm_rate()
    rows[0]["quick"] = quick
    return rows


def _torch_cka_rows(wl, version, m0, m1, inputs, ref, base_t, kw):
    """torch-cka runs the models itself: time CKA.compare(loader) (forward passes included)
    and the same forward passes alone (grad enabled, hooks attached, as compare runs them)."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    a, b = copy.deepcopy(m0), copy.deepcopy(m1)  # torch-cka attaches hooks for good
    loader = DataLoader(TensorDataset(inputs), batch_size=BATCH, shuffle=False)
    cka = CKA(a, b, model1_name="cnn_seed0", model2_name="cnn_seed1", model1_layers=RELU_NAMES,
              model2_layers=RELU_NAMES, device="cpu")

    def compare():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cka.compare(loader)
            except AssertionError:  # "HSIC computation resulted in NANs": the matrix is still there
                pass
        return cka.hsic_matrix.clone()

    def forward():
        for (x,) in loader:
            a(x)
            b(x)

    t = bench(compare, **kw)
    tf = bench(forward, **kw)
    dev, nan = deviation(t["result"], ref)
    est = t["median"] - tf["median"]
    note = (f"time includes the forward passes of both models; CKA part ≈ {est * 1e3:.0f} ms "
            f"(≈ {base_t / est:.2f}× vs baseline); float32 Grams; per pair Gram L recomputed")
    if nan:
        note = f"{nan} NaN of {t['result'].numel()}; " + note
    return [row(wl, f"torch-cka {version} CKA.compare", t, ratio=base_t / t["median"], max_dev=dev, note=note,
                nan=nan, torch_cka=True, cka_part_s=est),
            row(wl, "(torch-cka forward passes alone)", tf, note="2 models × batches, grad enabled "
                "as in CKA.compare; not a CKA provider")]


def summary(rows: list[dict]) -> list[str]:
    """Target checks of the issue, as ratios measured in this run."""
    out = []
    get = {(r["workload"], r["provider"]): r for r in rows}
    mb = next(r for r in rows if r["provider"] == "hierfast MinibatchCKA")
    ref = next(r for r in rows if r["workload"] == mb["workload"] and r.get("baseline"))
    ok = lambda c: "MET" if c else "MISSED"  # noqa: E731
    s = ref["time_s"] / mb["time_s"]
    out.append(f"MinibatchCKA vs float64 vectorised minibatch reference: {s:.2f}× faster (target ≥ 2×): {ok(s >= 2)}")
    ck = [r for r in rows if r.get("ckatorch")]
    if ck:
        s = ck[0]["time_s"] / mb["time_s"]
        out.append(f"MinibatchCKA vs ckatorch cka_batch: {s:.1f}× faster (target ≥ 40×): {ok(s >= 40)}")
    else:
        out.append("MinibatchCKA vs ckatorch: ckatorch not installed, not measured")
    floors = {r["workload"]: r for r in rows if r.get("floor")}
    for r in rows:
        if r.get("hierfast") and (r["workload"] in floors or r.get("full")):
            f = floors.get(r["workload"]) or next(v for k, v in floors.items() if k.startswith("full batch"))
            out.append(f"{r['provider']} ({r['workload']}): {r['time_s'] / f['time_s']:.2f}× the time of its "
                       "float32 Gram GEMMs alone (x @ x.T per layer)")
    for r in rows:
        if r.get("full"):
            out.append(f"full-batch 8×8 ({r['workload']}): {r['time_s']:.2f} s (target ≤ 1 s): "
                       f"{ok(r['time_s'] <= 1.0)}")
    hf = [r for r in rows if r.get("hierfast") and math.isfinite(r["time_s"])]
    worst = max(hf, key=lambda r: r["max_dev"])
    bad = [r for r in hf if not (r["max_dev"] <= TOL) or r.get("nan")]
    out.append(f"hierfast entries within {TOL:g} of float64: {len(hf) - len(bad)}/{len(hf)} "
               f"(worst {worst['max_dev']:.1e}, {worst['provider']}, {worst['workload']}): {ok(not bad)}")
    if "sgemm_gflops" in rows[0]:
        out.append(f"measured float32 GEMM rate (torch, 2048³): {rows[0]['sgemm_gflops']:.0f} GFLOP/s — the "
                   "practical peak for the GFLOP/s column (nominal Gram FLOPs 2·n²·d per layer / time)")
    del get
    if rows[0].get("quick"):
        out.insert(0, f"QUICK RUN (N={N_QUICK}): the targets are stated for N={N_FULL}; these checks are indicative only")
    return out


if __name__ == "__main__":
    import sys

    sys.argv.insert(1, "cka")
    from run import main

    main()
