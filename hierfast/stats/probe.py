"""Linear probes per layer: ridge regression on one-hot labels (Alain & Bengio 2017), with a
control task (Hewitt & Liang 2019) and the selectivity = accuracy − control accuracy.

* :func:`ridge_probe` — one shot, penalty by exact leave-one-out error over a grid, the
  choice scikit-learn's ``RidgeClassifierCV`` makes (targets ±1, intercept unpenalised).
* :class:`ProbeAccumulator` — streaming: per layer the float64 sufficient statistics of
  the training rows (n, Σx, Σxxᵀ, Σxyᵀ, Σy, Σ‖y‖²; METRICS.md §4.3) and the (reduced)
  features of a seeded held-out split; λ by generalised cross-validation (Golub, Heath &
  Wahba 1979) from the statistics alone; accuracy by predicting the held-out rows.

Which rows are held out, and the control labels, are fixed functions of each input's
identity (its dataset index, or its position in the stream), never of batch order.
"""
from __future__ import annotations

import torch

from ._identity import check_index, hash32, uniform01
from .accumulator import check_options
from ._reduce import Reducer
from ._ridge import RidgePath, gcv_score, loo_mse, resolve_alphas
from ._validate import as_features, as_layers, layer_label


def _labels(y, n: int, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(y, device=device)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer class labels, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({n},), one label per row")
    if n and int(t.min()) < 0:
        raise ValueError(f"{name} has negative labels; use class ids 0..K-1")
    return t.to(torch.int64)


def _targets(y: torch.Tensor, k: int) -> torch.Tensor:
    """±1 one-vs-rest targets (n, k), as scikit-learn's ``RidgeClassifier``."""
    out = torch.full((y.shape[0], k), -1.0, dtype=torch.float64, device=y.device)
    out[torch.arange(y.shape[0], device=y.device), y] = 1.0
    return out


def _add_gram(out: torch.Tensor, x: torch.Tensor, *, exact: bool) -> None:
    """``out += Σ xxᵀ`` for a float64 batch ``x`` ``(b, p)``; ``out`` ``(p, p)`` float64.

    Computed as Xcᵀ Xc + b μμᵀ with Xc the batch centred on its own mean μ: the centred GEMM
    (nearly all the probe's work) runs in float32 unless ``exact`` (float64 features), which
    loses nothing the float32 features held — the batch mean, where cancellation would bite,
    stays in float64 (the pairwise update of Chan, Golub & LeVeque 1979)."""
    b = x.shape[0]
    if b == 0:
        return
    mu = x.mean(0)
    xc = x - mu
    if not exact:
        xc = xc.to(torch.float32)
    out.add_(xc.T @ xc).addr_(mu, mu, alpha=float(b))


def _onehot(y: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(y.shape[0], k, dtype=torch.float64, device=y.device)
    out[torch.arange(y.shape[0], device=y.device), y] = 1.0
    return out


def ridge_probe(x_train, y_train, x_test, y_test, *, alphas=None) -> dict:
    """Fit a ridge classifier on ``(x_train, y_train)``; report held-out accuracy.

    Args:
        x_train, x_test: ``(n, ...)`` features (flattened to (n, d)), any float dtype.
        y_train, y_test: integer labels ``(n,)``; at least 2 classes in ``y_train``.
        alphas: penalties to choose from by exact leave-one-out error; default a
            scale-free grid ``a * tr(XᵀX)/d``, a = 1e-6 ... 1e3.

    Returns:
        ``{"accuracy", "alpha", "alphas", "loo_mse", "train_accuracy", "n_classes"}``.

    Matches ``sklearn.linear_model.RidgeClassifierCV(alphas=...)`` (same grid) in the chosen
    alpha and the predictions.
    """
    xtr = as_features(x_train, "x_train", min_n=2).to(torch.float64)
    xte = as_features(x_test, "x_test", min_n=1).to(torch.float64)
    if xte.shape[1] != xtr.shape[1]:
        raise ValueError(f"x_test has {xte.shape[1]} features per row but x_train has {xtr.shape[1]}")
    ytr = _labels(y_train, xtr.shape[0], "y_train", xtr.device)
    yte = _labels(y_test, xte.shape[0], "y_test", xtr.device)
    classes = torch.unique(ytr)
    if classes.numel() < 2:
        raise ValueError(f"y_train has a single class ({classes.tolist()}): a probe needs at least 2 classes")
    k = int(max(int(ytr.max()), int(yte.max()) if yte.numel() else 0)) + 1
    # fit only the classes present in training (as scikit-learn does); map back for prediction
    remap = torch.full((k,), -1, dtype=torch.int64, device=xtr.device)
    remap[classes] = torch.arange(classes.numel(), device=xtr.device)
    t = _targets(remap[ytr], classes.numel())
    if classes.numel() == 2:
        t = t[:, 1:]  # binary: one ±1 column, as scikit-learn
    mu_x = xtr.mean(0)
    xc = xtr - mu_x
    a = resolve_alphas(alphas, xc.T @ xc)
    scores = loo_mse(xtr, t, a)
    best = int(torch.argmin(scores))
    path = RidgePath(xc.T @ xc, xc.T @ (t - t.mean(0)))
    w = path.weights(float(a[best]))
    b = t.mean(0) - mu_x @ w

    def predict(x):
        s = x @ w + b
        j = (s[:, 0] > 0).long() if classes.numel() == 2 else s.argmax(1)
        return classes[j]

    return {"accuracy": float((predict(xte) == yte).double().mean()) if yte.numel() else float("nan"),
            "train_accuracy": float((predict(xtr) == ytr).double().mean()),
            "alpha": float(a[best]), "alphas": a.tolist(), "loo_mse": scores.tolist(),
            "n_classes": int(classes.numel())}


class _LayerProbe:
    """Training sums and held-out rows of one layer (after width reduction)."""

    def __init__(self, p: int, device) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **z)
        self.sx = torch.zeros(p, **z)
        self.sxx = torch.zeros(p, p, **z)
        self.test_x: list[torch.Tensor] = []

    def state(self) -> dict:
        """Copies: a later update must not change a saved state."""
        return {"n": self.n.clone(), "sx": self.sx.clone(), "sxx": self.sxx.clone(),
                "test_x": torch.cat(self.test_x) if self.test_x else self.sx.new_zeros(0, self.sx.numel())}

    def load(self, s: dict) -> None:
        self.n, self.sx, self.sxx = s["n"].clone(), s["sx"].clone(), s["sxx"].clone()
        self.test_x = [s["test_x"].clone()] if s["test_x"].numel() else []


class ProbeAccumulator:
    """Streaming ridge probes for every layer, with a control task.

    Args:
        test_fraction: share of inputs held out (chosen by a seeded hash of their identity).
        max_test: held-out rows kept per layer (the first ones in stream order; memory is
            ``max_test * min(d, max_dim)`` float32 values per layer).
        max_dim: layers wider than this are reduced by a seeded count-sketch projection
            (conv maps given as ``(n, C, H, W)``: average-pooled first; see ``_reduce``).
        alphas: penalty grid (default scale-free, see :func:`ridge_probe`); λ by GCV.
        control: also fit the control task — random labels fixed per input identity,
            uniform over the classes seen (Hewitt & Liang 2019).
        seed: split, control labels and projections.
        n_classes: number of classes of the control task's labels; default: the classes seen
            in the first batch (at least 2).

    ``update(feats, labels, index=None)``: feats a list/dict of ``(b, ...)`` tensors (layers),
    labels ``(b,)`` ints, index ``(b,)`` dataset ids (default: position in the stream).
    ``compute()`` -> dict of per-layer float64 tensors ``accuracy``, ``control``,
    ``selectivity``, ``alpha``, plus ``chance`` (majority-class rate on the held-out rows),
    ``n_train``, ``n_test``, ``layers``.
    """

    def __init__(self, *, test_fraction: float = 0.25, max_test: int = 5000, max_dim: int = 1024,
                 alphas=None, control: bool = True, seed: int = 0, n_classes: int | None = None) -> None:
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        if not isinstance(max_test, int) or max_test < 1:
            raise ValueError(f"max_test must be a positive int, got {max_test!r}")
        self.test_fraction, self.max_test, self.alphas = float(test_fraction), max_test, alphas
        self.control, self.seed = bool(control), int(seed)
        if n_classes is not None and (not isinstance(n_classes, int) or n_classes < 2):
            raise ValueError(f"n_classes must be an int >= 2 or None, got {n_classes!r}")
        self.n_classes = n_classes
        self.reducer = Reducer(max_dim, seed)
        self.reset()

    def reset(self) -> None:
        self.names = None
        self.layers: list[_LayerProbe] = []
        self.seen = 0
        self.k = 0
        self.k_control = None
        self.sy = None
        self.sxy: list[torch.Tensor] = []
        self.sxy_c: list[torch.Tensor] = []
        self.sy_c = None
        self.test_y = self.test_yc = None

    # ---------------------------------------------------------------- update
    def _grow(self, k: int, device) -> None:
        """More classes seen: pad the label-dependent sums with zero columns."""
        if k <= self.k:
            return
        pad = k - self.k
        z = dict(dtype=torch.float64, device=device)
        self.sy = torch.cat([self.sy, torch.zeros(pad, **z)]) if self.sy is not None else torch.zeros(k, **z)
        for i, m in enumerate(self.sxy):
            self.sxy[i] = torch.cat([m, torch.zeros(m.shape[0], pad, **z)], dim=1)
        self.k = k

    def update(self, feats, labels, index=None) -> None:
        names, xs = as_layers(feats, "feats")
        labs = [layer_label(names, i, "feats") for i in range(len(xs))]
        b = xs[0].shape[0]
        for x, lab in zip(xs, labs):
            if x.shape[0] != b:
                raise ValueError(f"{lab} has {x.shape[0]} rows but the first layer has {b}")
        dev = xs[0].device
        y = _labels(labels, b, "labels", dev)
        idx = (torch.arange(self.seen, self.seen + b, device=dev) if index is None
               else check_index(index, b, dev))
        for x, lab in zip(xs, labs):
            as_features(x, lab, min_n=1, check_finite=False)  # dtype / emptiness checks
        red = [self.reducer(x) for x in xs]  # (n, C, H, W) maps are average-pooled, the rest sketched
        for r, lab in zip(red, labs):
            if not bool(torch.isfinite(r).all()):
                raise ValueError(f"{lab} contains NaN or inf: a probe on non-finite features is undefined")
        if self.names is None and not self.layers:
            self.names = names
            self.layers = [_LayerProbe(r.shape[1], dev) for r in red]
            self.test_y = torch.zeros(0, dtype=torch.int64, device=dev)
            self.test_yc = torch.zeros(0, dtype=torch.int64, device=dev)
        elif len(red) != len(self.layers) or any(r.shape[1] != L.sx.numel() for r, L in zip(red, self.layers)):
            raise ValueError("this batch's layers differ from the first batch's; pass the same layers every time")
        self._grow(int(y.max()) + 1, dev)
        if self.n_classes is not None and self.k > self.n_classes:
            raise ValueError(f"labels go up to {self.k - 1} but n_classes={self.n_classes}")
        held = uniform01(idx, self.seed) < self.test_fraction
        train = ~held
        room = self.max_test - self.test_y.numel()
        keep = held.nonzero().flatten()[:max(room, 0)]
        if self.k_control is None:  # fixed at the first batch so every input keeps its control label
            self.k_control = self.n_classes or max(self.k, 2)
            self.sy_c = torch.zeros(self.k_control, dtype=torch.float64, device=dev)
        yc = hash32(idx, self.seed + 1) % self.k_control  # control label of each input identity
        # 0/1 one-hot targets: a class first seen later is correctly 0 for earlier rows (zero
        # padding), and ridge on (t+1)/2 predicts the same argmax as on ±1 targets
        t, tc = _onehot(y[train], self.k), _onehot(yc[train], self.k_control)
        self.sy += t.sum(0)
        self.sy_c += tc.sum(0)
        for i, (r, L, x) in enumerate(zip(red, self.layers, xs)):
            rt = r[train]
            L.n += rt.shape[0]
            L.sx += rt.sum(0)
            _add_gram(L.sxx, rt, exact=x.dtype == torch.float64)
            if len(self.sxy) <= i:
                self.sxy.append(torch.zeros(r.shape[1], self.k, dtype=torch.float64, device=dev))
                self.sxy_c.append(torch.zeros(r.shape[1], self.k_control, dtype=torch.float64, device=dev))
            self.sxy[i] += rt.T @ t
            self.sxy_c[i] += rt.T @ tc
            if keep.numel():
                L.test_x.append(r[keep].to(torch.float32))
        self.test_y = torch.cat([self.test_y, y[keep]])
        self.test_yc = torch.cat([self.test_yc, yc[keep]])
        self.seen += b

    # ---------------------------------------------------------------- compute
    def _fit_eval(self, L: _LayerProbe, sxy, sy, ytest) -> tuple[float, float]:
        n = float(L.n)
        mu_x, mu_y = L.sx / n, sy / n
        cxx = L.sxx - n * torch.outer(mu_x, mu_x)
        cxy = sxy - n * torch.outer(mu_x, mu_y)
        path = RidgePath(cxx, cxy)
        a = resolve_alphas(self.alphas, cxx)
        # tr(C_yy) = Σ‖y‖² - n‖mu_y‖²; one-hot rows have ‖y‖² = 1
        tr_cyy = n - n * float(mu_y @ mu_y)
        best = int(torch.argmin(gcv_score(path, tr_cyy, n, a)))
        w = path.weights(float(a[best]))
        b = mu_y - mu_x @ w
        xt = torch.cat(L.test_x).to(torch.float64)
        pred = (xt @ w + b).argmax(1)
        return float((pred == ytest).double().mean()), float(a[best])

    def compute(self) -> dict:
        if not self.layers:
            raise ValueError("ProbeAccumulator.compute() called before any update(): feed at least one batch")
        n_train = float(self.layers[0].n)
        if n_train < 2 or self.test_y.numel() == 0:
            raise ValueError(f"probe: {int(n_train)} training and {self.test_y.numel()} held-out rows; feed more "
                             "data (or raise test_fraction) so both splits are non-empty")
        if int((self.sy > 0).sum()) < 2:
            raise ValueError("probe: the training rows hold a single class; a probe needs at least 2 classes")
        acc, ctl, alpha = [], [], []
        for i, L in enumerate(self.layers):
            a, lam = self._fit_eval(L, self.sxy[i], self.sy, self.test_y)
            acc.append(a)
            alpha.append(lam)
            ctl.append(self._fit_eval(L, self.sxy_c[i], self.sy_c, self.test_yc)[0] if self.control else float("nan"))
        acc_t, ctl_t = torch.tensor(acc, dtype=torch.float64), torch.tensor(ctl, dtype=torch.float64)
        chance = float(torch.bincount(self.test_y).max()) / self.test_y.numel()
        return {"layers": self.names or [f"feats[{i}]" for i in range(len(self.layers))],
                "accuracy": acc_t, "control": ctl_t, "selectivity": acc_t - ctl_t,
                "alpha": torch.tensor(alpha, dtype=torch.float64), "chance": chance,
                "n_train": int(n_train), "n_test": int(self.test_y.numel())}

    # ---------------------------------------------------------------- state
    def _options(self) -> dict:
        """Options the state depends on (the split, control labels, projection, kept rows):
        saved, and checked by ``load_state_dict`` and ``merge``. ``alphas`` only enter
        ``compute`` and may differ."""
        return {"test_fraction": self.test_fraction, "seed": self.seed, "control": self.control,
                "max_dim": self.reducer.max_dim, "max_test": self.max_test, "n_classes": self.n_classes}

    def _check_options(self, saved: dict | None, what: str) -> None:
        check_options("ProbeAccumulator", self._options(), saved, what,
                      ": their held-out splits, control labels or projections differ")

    def _like(self) -> "ProbeAccumulator":
        """An empty accumulator with this one's options."""
        return ProbeAccumulator(test_fraction=self.test_fraction, max_test=self.max_test, max_dim=self.reducer.max_dim,
                                alphas=self.alphas, control=self.control, seed=self.seed, n_classes=self.n_classes)

    def state_dict(self) -> dict:
        """A copy of the state (later updates do not change it), with the options."""
        def copy(t):
            return t.clone() if t is not None else None

        return {"names": self.names, "seen": self.seen, "k": self.k, "k_control": self.k_control,
                "sy": copy(self.sy), "sy_c": copy(self.sy_c),
                "sxy": [m.clone() for m in self.sxy], "sxy_c": [m.clone() for m in self.sxy_c],
                "test_y": copy(self.test_y), "test_yc": copy(self.test_yc), "layers": [L.state() for L in self.layers],
                "options": self._options()}

    def load_state_dict(self, state: dict) -> "ProbeAccumulator":
        self._check_options(state.get("options"), "state was saved by")
        self.reset()
        self.names, self.seen, self.k = state["names"], state["seen"], state["k"]
        self.k_control = state["k_control"]
        for key in ("sy", "sy_c", "test_y", "test_yc"):
            setattr(self, key, state[key].clone() if state[key] is not None else None)
        self.sxy = [m.clone() for m in state["sxy"]]
        self.sxy_c = [m.clone() for m in state["sxy_c"]]
        self.layers = []
        for s in state["layers"]:
            L = _LayerProbe(s["sx"].numel(), s["sx"].device)
            L.load(s)
            self.layers.append(L)
        return self

    def merge(self, other: "ProbeAccumulator") -> "ProbeAccumulator":
        """Add another accumulator's training sums and append its held-out rows (up to max_test).

        ``index`` must be given (dataset ids) when merging shards: stream positions restart
        at 0 in every shard. Both must have the same options (:meth:`_options`)."""
        if not isinstance(other, ProbeAccumulator):
            raise TypeError(f"other must be a ProbeAccumulator, got {type(other).__name__}")
        self._check_options(other._options(), "cannot merge a")
        if not other.layers:
            return self
        if not self.layers:
            return self.load_state_dict(other.state_dict())
        self._check_mergeable(other)
        dev = self.sy.device
        self._grow(other.k, dev)
        other = self._like().load_state_dict(other.state_dict())
        other._grow(self.k, dev)
        self.sy += other.sy
        self.sy_c += other.sy_c
        room = max(self.max_test - self.test_y.numel(), 0)
        for i, (L, O) in enumerate(zip(self.layers, other.layers)):
            L.n += O.n
            L.sx += O.sx
            L.sxx += O.sxx
            self.sxy[i] += other.sxy[i]
            self.sxy_c[i] += other.sxy_c[i]
            if O.test_x and room:
                L.test_x.append(torch.cat(O.test_x)[:room])
        self.test_y = torch.cat([self.test_y, other.test_y[:room]])
        self.test_yc = torch.cat([self.test_yc, other.test_yc[:room]])
        self.seen += other.seen
        return self

    def _check_mergeable(self, other: "ProbeAccumulator") -> None:
        """Shards must agree on the layers and on the control task's class count: k_control is
        fixed by each shard's first batch, and shards with different counts draw different
        control labels (hash % k_control) for the same input."""
        if len(other.layers) != len(self.layers) or any(L.sx.numel() != O.sx.numel()
                                                        for L, O in zip(self.layers, other.layers)):
            raise ValueError("cannot merge probes over different layers (or layer widths): every shard must "
                             "see the same layers")
        if other.k_control != self.k_control:
            raise ValueError(f"cannot merge probe shards whose control tasks have {self.k_control} and "
                             f"{other.k_control} classes (each shard fixes it from the labels of its first batch, "
                             "so their control labels differ); construct every shard with "
                             "ProbeAccumulator(n_classes=<number of classes>)")

    def sync(self, group=None) -> "ProbeAccumulator":
        """Gather every rank's state and merge them in rank order (all ranks end equal); no-op
        when not distributed, as for the other accumulators."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, {k: v for k, v in self.state_dict().items()}, group=group)
        merged = self._like()
        for s in states:
            merged.merge(self._like().load_state_dict(s))
        self.load_state_dict(merged.state_dict())
        return self
