"""hierfast.analyze: stream a dataset through a model (or two) and accumulate statistics."""
from __future__ import annotations

import contextlib
import itertools
import sys
import warnings
from collections.abc import Mapping
from typing import Iterable

import torch
from torch import nn

from . import _checkpoint
from ._data import call_model, parse_batch, to_device
from .layer_capture import LayerCapture
from .results import Results
from .statistics import BatchContext, get_statistic, min_samples


def _model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _check_models(model, compare_to) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if compare_to is not None and not isinstance(compare_to, nn.Module):
        raise TypeError(f"compare_to must be an nn.Module or None, got {type(compare_to).__name__}")


def _check_data(data) -> None:
    if isinstance(data, (torch.Tensor, Mapping)):
        raise TypeError("data must be an iterable of batches (a list of tensors, a DataLoader, ...), not a single "
                        f"{type(data).__name__}; wrap one batch as [batch]")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of batches (a list of tensors, a DataLoader, ...), got "
                        f"{type(data).__name__}")


def _check_count(v, name: str, *, none_ok: bool = False) -> None:
    """A positive int (bool is an int to Python, but True is no count)."""
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {v!r}")


def _check_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e}); pass e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here; pass device='cpu' (or None)")
    return dev


def _resolve_stats(stats) -> list[tuple[str, dict]]:
    if isinstance(stats, str):
        stats = (stats,)
    if not isinstance(stats, (Mapping, list, tuple)):
        raise TypeError(f"stats must be a statistic name, a list/tuple of names or a dict {{name: options}}, got "
                        f"{type(stats).__name__}; e.g. stats=('cka',)")
    if not isinstance(stats, Mapping) and not all(isinstance(s, str) for s in stats):
        raise TypeError(f"stats entries must be statistic names (str), got {list(stats)!r}")
    items = list(stats.items()) if isinstance(stats, Mapping) else [(s, {}) for s in stats]
    if not items:
        raise ValueError("stats is empty; pass at least one statistic name, e.g. stats=('cka',)")
    out = []
    for name, opts in items:
        get_statistic(name)  # raises for unknown names
        if not isinstance(opts, Mapping):
            raise TypeError(f"stats[{name!r}] must be a dict of options, got {type(opts).__name__}")
        out.append((name, dict(opts)))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"stats lists a statistic twice: {[n for n, _ in out]}")
    return out


def _make_stats(specs, layers_a, layers_b) -> dict:
    """One statistic object per spec; an unknown option names the statistic it was given to."""
    objs = {}
    for name, opts in specs:
        try:
            objs[name] = get_statistic(name)(layers_a, layers_b, **opts)
        except TypeError as e:
            if "argument" not in str(e):  # not a call-signature problem: keep the original error
                raise
            raise TypeError(f"stats[{name!r}] options {sorted(opts)}: {e}") from None
    return objs


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _first_nonfinite(feats: dict) -> tuple[str, int] | None:
    """(layer, first bad sample) of the first layer with NaN/inf, or None. One reduction per
    layer and a single host sync; the exact check only runs when a sum is not finite."""
    if not feats:
        return None
    # in the features' own dtype: a float64 sum would first copy every feature map (measured:
    # 10 % of analyze's time on the ResNet benchmark); an overflowing sum of finite values
    # only costs the exact check below
    sums = torch.stack([(f.sum(dtype=torch.float32) if f.dtype in (torch.float16, torch.bfloat16) else f.sum()).float()
                        for f in feats.values()])
    if bool(torch.isfinite(sums).all()):
        return None
    for name, f in feats.items():
        bad = ~torch.isfinite(f)
        if bool(bad.any()):
            return name, int(bad.reshape(f.shape[0], -1).any(dim=1).nonzero()[0, 0])
    return None


def analyze(model: nn.Module, data: Iterable, *, layers=None, stats=("cka",), compare_to: nn.Module | None = None,
            layers_b=None, reduce="flatten", output_fn=None, device=None, max_batches: int | None = None,
            progress: bool = True, checkpoint=None, checkpoint_every: int = 50, on_nonfinite: str = "raise",
            group=None) -> Results:
    """Measure per-layer statistics of ``model`` over ``data`` in one streaming pass.

    Args:
        model: any ``nn.Module``; run in eval mode under ``torch.inference_mode()`` (the
            ``training`` flag of every submodule is restored afterwards, also on errors).
        data: an iterable of batches — tensors, ``(x, y)`` tuples, dicts of tensors (Hugging
            Face tokenizer output), a ``DataLoader`` (see ``hierfast.capture._data``).
            Resuming from a checkpoint needs the same batches in the same order.
        layers: which layers to record (see :class:`LayerCapture`); default every conv,
            linear, recurrent and attention block.
        stats: statistic names (registered with ``register_statistic``), or a dict
            ``{name: options}``. ``"cka"``: debiased minibatch linear CKA of every pair.
        compare_to: a second model fed the same batches in the same order: statistics are
            model x compare_to (``La x Lb``). Without it, ``L x L`` from one forward per batch.
        layers_b: layer selection in ``compare_to`` (default: ``layers``).
        reduce, output_fn: how outputs become ``(M, d)`` features (see :class:`LayerCapture`).
        device: where to run; the model(s) are moved there (``nn.Module.to``). Default: the
            device of each model's parameters. Batches are moved to the model's device.
        max_batches: stop after this many batches of ``data`` (counting skipped ones). Below
            the batches a checkpoint already holds: ValueError (a checkpoint cannot be rewound).
        progress: tqdm bar on stderr (only when stderr is a terminal).
        checkpoint: file path; states and the next batch index are written atomically every
            ``checkpoint_every`` batches, at the end, and when the run stops on an exception
            (unless it stopped while a batch was half counted: then the last checkpoint stays).
            If the file exists the run resumes from it (earlier batches are read from
            ``data`` and discarded, not run), giving exactly the uninterrupted result. A
            checkpoint written with another configuration (statistics and their options,
            reduce, output_fn, compare_to, selected layers, their parameter shapes) is refused
            with a ValueError saying what differs; an unreadable file, with a ValueError saying
            to delete it. Distributed runs write one file per rank (``name.rank{r}.pt``), each
            with its own shard's sums (never the summed states).
        on_nonfinite: ``"raise"`` (ValueError naming the layer and batch) or ``"skip"`` (the
            batch is left out of every statistic, counted in ``Results.n_skipped``, warned).
        group: ``torch.distributed`` process group for the final sum (default: world).

    Distributed: when ``torch.distributed`` is initialised, every rank must call ``analyze``
    with its own shard of the data — e.g. ``DataLoader(ds, sampler=DistributedSampler(ds,
    shuffle=False), batch_size=b)`` — and at least one batch. Each rank streams its shard;
    the statistic states are summed with one ``all_reduce`` per statistic at the end, and
    every rank returns the same Results. Minibatch CKA sums per-batch HSIC terms, so the
    result equals one process seeing the same batches (up to float64 summation order). A
    statistic for which one rank's batches were all too small gets zeros from that rank; one
    that no rank could use raises the same ValueError on every rank.

    Failures under ``torch.distributed``: a rank whose model or data raises during the pass
    keeps its checkpoint and then joins the others' final agreement with its error, so every
    rank raises (the others a RuntimeError naming the failed rank) once they reach the end of
    their shards. Not covered, and left to the process group's timeout (set a short one with
    ``init_process_group(timeout=...)``) or the launcher: a rank that dies (killed,
    ``os._exit``, out of memory), a Ctrl-C on some ranks only, and errors after the ranks
    agreed (while summing the states or computing the results).

    Returns:
        :class:`Results` with ``.layers``, ``.shapes``, ``.n_samples`` and one attribute per
        statistic (``.cka``: ``(La, Lb)`` float64). A batch with fewer samples than a statistic
        needs (``"cka"``: 4, ``"invariance"``: 2) is left out of that statistic only, with a
        warning, and counted in ``.skipped_small``.

    Example:
        >>> import torch, hierfast
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> data = [torch.randn(32, 8) for _ in range(4)]
        >>> res = hierfast.analyze(net, data, progress=False)
        >>> res.layers, tuple(res.cka.shape), res.n_samples
        (['0', '2'], (2, 2), 128)
    """
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    _check_models(model, compare_to)
    _check_data(data)
    _check_count(max_batches, "max_batches", none_ok=True)
    _check_count(checkpoint_every, "checkpoint_every")
    specs = _resolve_stats(stats)
    device = _check_device(device)
    if device is not None:
        model.to(device)
        if compare_to is not None:
            compare_to.to(device)
    dev_a = _model_device(model)
    dev_b = _model_device(compare_to) if compare_to is not None else None
    cap_a = LayerCapture(model, layers, reduce=reduce, output_fn=output_fn)
    cap_b = None
    if compare_to is not None:
        try:
            cap_b = LayerCapture(compare_to, layers if layers_b is None else layers_b, reduce=reduce,
                                 output_fn=output_fn)
        except ValueError as e:  # say which model the selection failed on
            raise ValueError(f"compare_to: {e} (select its layers with layers_b=)") from None
    token_like = _token_like(reduce)
    dist = _dist()
    rank = dist.get_rank(group) if dist is not None else None
    ckpt_path = _checkpoint.rank_path(checkpoint, rank) if checkpoint is not None else None

    run = _Run(model, compare_to, cap_a, cap_b, dev_a, dev_b, token_like, [n for n, _ in specs])
    mins = {name: min_samples(name, opts) for name, opts in specs}
    try:
        start, objs, config = _setup_checkpoint(ckpt_path, specs, run, max_batches, reduce, output_fn, cap_a, cap_b)
    except Exception as e:
        # a setup error on one rank alone (corrupt file, other configuration) would leave the
        # others waiting in the final agreement until the process group's timeout
        if dist is not None:
            _report_failure(dist, group, e)
        raise

    def save_ckpt():
        _checkpoint.save(ckpt_path, {"next_batch": run.next_batch, "stat_names": [n for n, _ in specs], "config": config,
                                     "states": {k: s.state_dict() for k, s in objs.items()}, **run.meta()})

    flags = _save_modes(model, compare_to)
    total = _length(data)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = _bar(total, start, progress)
    run.next_batch = start
    consistent = True  # statistics and counters describe the same batches: a checkpoint may be written
    agreed = False  # this rank has entered the final agreement: the ranks left the loop together
    synced = False  # states are (being) summed over the ranks: never write them as this rank's own
    labels = None
    try:
        for m in (model, compare_to):
            if m is not None:
                m.eval()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(cap_a)
            if cap_b is not None:
                stack.enter_context(cap_b)
            it = iter(data)
            for _ in itertools.islice(it, start):  # resume: these batches are already counted
                pass
            for i in itertools.count(start):
                if max_batches is not None and i >= max_batches:
                    break
                raw = b = inputs = mask = labels = None  # drop the last batch before loading the next
                try:
                    raw = next(it)
                except StopIteration:
                    break
                b = parse_batch(raw, i)
                inputs = to_device(b.inputs, dev_a)
                mask = b.mask.to(dev_a) if b.mask is not None else None
                fa, fb = run.forward(inputs, mask, i, b.size)
                bad = _first_nonfinite(fa) or _first_nonfinite(fb or {})
                if bad is not None:
                    which = "model" if bad[0] in fa else "compare_to"
                    if on_nonfinite == "raise":
                        raise ValueError(f"layer {bad[0]!r} of {which} produced NaN or inf at batch {i} (first at "
                                         f"sample {bad[1]}); check the model and inputs, or pass "
                                         "on_nonfinite='skip' to leave such batches out")
                    consistent = False  # n_skipped counts batch i before next_batch moves past it
                    run.n_skipped += 1
                    run.next_batch = i + 1
                    consistent = True
                    del fa, fb
                    bar.update(1)
                    continue
                if objs is None:
                    objs = _make_stats(specs, run.layers_a, run.layers_b)
                labels = to_device(b.labels, dev_a) if isinstance(b.labels, torch.Tensor) else b.labels
                # samples = rows of the features (right for time-major models too), or the
                # inputs' N when tokens are the rows
                n = b.size if run.token_like else run.rows
                ctx = BatchContext(index=i, inputs=inputs, labels=labels, attention_mask=mask, batch_size=n,
                                   forward=lambda x: run.forward(to_device(x, dev_a), _mask_of(x, dev_a), i, None))
                small = [name for name in objs if run.rows < mins[name]]
                if small:
                    _warn_small(i, run.rows, small, mins)
                # a failure from here until every counter moved past batch i leaves the statistics
                # and counters out of step: no checkpoint is written from that state
                consistent = False
                for name, s in objs.items():
                    if name not in small:
                        s.update_batch(fa, fb, ctx)
                for name in small:
                    run.small[name] += 1
                del fa, fb, ctx
                run.n_samples += n
                run.n_batches += 1
                run.next_batch = i + 1
                consistent = True
                bar.update(1)
                if ckpt_path is not None and run.next_batch % checkpoint_every == 0:
                    save_ckpt()
            if dist is not None:
                agreed = True
                _agree(dist, group, objs is not None, (run.layers_a, run.layers_b), rank)
            if objs is None:
                raise ValueError(_empty_message(data, start, run.n_skipped, rank))
            if ckpt_path is not None:
                save_ckpt()  # before sync: each rank's file holds its own shard's sums
            if dist is not None:
                synced = True  # from here on the states become global sums, not this shard's
                run.sync(dist, group)
            # after run.sync the counts are global: every rank raises alike, before the statistics' syncs
            _check_used(run, mins)
            if dist is not None:
                for s in objs.values():
                    s.sync(group)
            values = {name: s.compute() for name, s in objs.items()}
    except BaseException as e:
        # keep everything done so far (a model raising mid-run, Ctrl-C): rerunning resumes
        if ckpt_path is not None and objs is not None and consistent and not synced and run.n_batches:
            save_ckpt()
        if dist is not None and not agreed and isinstance(e, Exception):
            _report_failure(dist, group, e)  # the other ranks wait in _agree: let them raise too
        raise
    finally:
        bar.close()
        _restore_modes(flags)
    if run.n_skipped:
        warnings.warn(f"analyze skipped {run.n_skipped} batch(es) with NaN/inf activations (on_nonfinite='skip')",
                      RuntimeWarning, stacklevel=2)
    return Results(layers=run.layers_a, layers_b=run.layers_b, shapes=cap_a.shapes | run.shapes_a,
                   shapes_b=(cap_b.shapes | run.shapes_b) if cap_b is not None else None,
                   n_samples=run.n_samples, n_batches=run.n_batches, n_skipped=run.n_skipped,
                   skipped_small=run.small, values=values,
                   config={"reduce": reduce if isinstance(reduce, str) else repr(reduce),
                           "stats": [n for n, _ in specs], "world_size": dist.get_world_size(group) if dist else 1})


def _setup_checkpoint(ckpt_path, specs, run, max_batches, reduce, output_fn, cap_a, cap_b):
    """``(start, objs, config)`` of a resume from ``ckpt_path``, or ``(0, None, config)``; the
    fingerprint only when checkpointing (a lazy model has no shapes yet: see layer_shapes)."""
    if ckpt_path is None:
        return 0, None, None
    state = _checkpoint.load(ckpt_path)
    config = _checkpoint.fingerprint(specs, reduce, output_fn, cap_a, cap_b)
    if state is None:
        return 0, None, config
    if [n for n, _ in specs] != state["stat_names"]:
        raise ValueError(f"checkpoint={str(ckpt_path)!r} holds statistics {state['stat_names']}, this call asks "
                         f"for {[n for n, _ in specs]}; delete the file or use another path")
    _checkpoint.check_config(ckpt_path, state.get("config"), config)
    start = state["next_batch"]
    if max_batches is not None and max_batches < start:
        raise ValueError(f"max_batches={max_batches} but checkpoint={str(ckpt_path)!r} already holds {start} "
                         f"batches, and a checkpoint cannot be rewound; pass max_batches >= {start} (or None), "
                         "or delete the checkpoint to recompute")
    run.restore(state)
    run.ckpt = ckpt_path
    objs = _make_stats(specs, run.layers_a, run.layers_b)
    for name, s in objs.items():
        s.load_state_dict(state["states"][name])
    return start, objs, config


def _save_modes(*models) -> list[tuple[nn.Module, bool]]:
    """The ``training`` flag of every module of the models: submodules may differ from their
    parent (a frozen BatchNorm in a training model, MC-dropout in an eval one)."""
    return [(m, m.training) for model in models if model is not None for m in model.modules()]


def _restore_modes(flags) -> None:
    # set each flag alone: ``train(was)`` would also overwrite the children's own flags
    for m, was in flags:
        m.training = was


def _warn_small(index: int, rows: int, names: list[str], mins: dict) -> None:
    need = ", ".join(f"{n!r} needs >= {mins[n]}" for n in names)
    warnings.warn(f"batch {index} has {rows} sample(s) ({need}): left out of {names} only (other statistics still "
                  "use it); counted in Results.skipped_small (a ragged last batch? drop_last=True avoids it)",
                  RuntimeWarning, stacklevel=3)


def _check_used(run, mins: dict) -> None:
    """A statistic that left out every batch has nothing to compute: say why."""
    empty = [n for n, k in run.small.items() if k and k == run.n_batches]
    if empty:
        raise ValueError(f"every batch was too small for {empty} (needs >= {[mins[n] for n in empty]} samples per "
                         "batch); use larger batches, or drop these statistics")


def _agree(dist, group, has_data: bool, layout, rank) -> None:
    """Before the all_reduce: no rank failed, every rank has data and the same layers, else
    every rank raises (one rank raising alone would leave the others waiting until the
    process group's timeout)."""
    got = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, (None, has_data, layout), group=group)
    failed = [(r, err) for r, (err, _, _) in enumerate(got) if err is not None]
    if failed:
        raise RuntimeError(f"rank(s) {[r for r, _ in failed]} failed during analyze (rank {failed[0][0]}: "
                           f"{failed[0][1]}); this rank stops too, its checkpoint keeps its progress (see the failing "
                           "rank's traceback)")
    got = [(h, lay) for _, h, lay in got]
    empty = [r for r, (h, _) in enumerate(got) if not h]
    if empty:
        raise ValueError(f"rank(s) {empty} received no batch; every rank needs at least one (shard with "
                         "DistributedSampler, drop_last=False, and fewer ranks than batches)")
    other = [r for r, (_, lay) in enumerate(got) if lay != got[0][1]]
    if other:
        raise ValueError(f"rank(s) {other} recorded other layers than rank 0 ({got[other[0]][1]} vs {got[0][1]}); "
                         "every rank must run the same model(s) with the same selection")


def _report_failure(dist, group, error: Exception) -> None:
    """Take part in the other ranks' :func:`_agree` with this rank's error, so that they raise
    instead of waiting; this rank then raises its own error. Best effort: if the collective
    itself fails (the others are gone, or timed out), the original error still propagates."""
    got = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(got, (f"{type(error).__name__}: {error}"[:500], False, None), group=group)
    except Exception:  # noqa: BLE001 - the error being raised matters more than this one
        pass


def _mask_of(x, dev):
    m = x.get("attention_mask") if isinstance(x, Mapping) else None
    return m.to(dev) if m is not None else None


def _token_like(reduce) -> bool:
    vals = reduce.values() if isinstance(reduce, Mapping) else [reduce]
    return any(v == "tokens" or callable(v) for v in vals)


def _length(data):
    try:
        return len(data)
    except TypeError:
        return None


def _bar(total, start, progress):
    from tqdm.auto import tqdm

    disable = not progress or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, initial=start, disable=disable, desc="hierfast.analyze", unit="batch", leave=False)


def _empty_message(data, start, skipped, rank) -> str:
    if skipped:
        return f"every batch of data had NaN/inf activations ({skipped} skipped); nothing to compute"
    if start:
        return (f"data has no batch after the {start} already in the checkpoint; delete the checkpoint to "
                "recompute, or pass more data")
    where = f" on rank {rank} (give every rank at least one batch)" if rank is not None else ""
    return f"data yielded no batches{where}; pass a non-empty iterable of batches (is the DataLoader empty?)"


class _Run:
    """Per-call state: forwards through the captures, layout checks, counters."""

    def __init__(self, model, model_b, cap_a, cap_b, dev_a, dev_b, token_like, stat_names):
        self.model, self.model_b, self.cap_a, self.cap_b = model, model_b, cap_a, cap_b
        self.dev_a, self.dev_b, self.token_like = dev_a, dev_b, token_like
        self.layers_a: list[str] | None = None
        self.layers_b: list[str] | None = None
        self.shapes_a: dict = {}
        self.shapes_b: dict = {}
        self.n_samples = self.n_batches = self.n_skipped = self.next_batch = 0
        self.small = {n: 0 for n in stat_names}  # batches each statistic left out as too small
        self.rows = 0  # samples (feature rows) of the last forward
        self.ckpt = None  # path of a restored checkpoint until the first forward is checked against it

    def meta(self) -> dict:
        return {"layers_a": self.layers_a, "layers_b": self.layers_b, "n_samples": self.n_samples,
                "n_batches": self.n_batches, "n_skipped": self.n_skipped, "skipped_small": dict(self.small),
                "shapes_a": {k: list(v) for k, v in (self.cap_a.shapes | self.shapes_a).items()},
                "shapes_b": {k: list(v) for k, v in ((self.cap_b.shapes if self.cap_b else {}) | self.shapes_b).items()}}

    def restore(self, state: dict) -> None:
        self.layers_a, self.layers_b = state["layers_a"], state["layers_b"]
        self.n_samples, self.n_batches, self.n_skipped = state["n_samples"], state["n_batches"], state["n_skipped"]
        self.small.update(state.get("skipped_small", {}))  # absent from checkpoints of older versions
        self.shapes_a = {k: tuple(v) for k, v in state["shapes_a"].items()}
        self.shapes_b = {k: tuple(v) for k, v in state["shapes_b"].items()}

    def sync(self, dist, group) -> None:
        t = torch.tensor([self.n_samples, self.n_batches, self.n_skipped, *self.small.values()], dtype=torch.float64,
                         device=self.dev_a if self.dev_a.type == "cuda" else "cpu")
        dist.all_reduce(t, group=group)
        counts = [int(v) for v in t.tolist()]
        self.n_samples, self.n_batches, self.n_skipped = counts[:3]
        self.small = dict(zip(self.small, counts[3:]))

    def _one(self, model, cap, inputs, mask, dev, which, index):
        cap.attention_mask = mask.to(dev) if mask is not None else None
        call_model(model, to_device(inputs, dev))
        missing = cap.missing()
        feats = cap.pop()
        if missing:
            raise ValueError(f"layer(s) {missing} of {which} were selected by name but did not run during the forward "
                             f"of batch {index} (the model's forward bypasses them); select other layers")
        if not feats:
            raise ValueError(f"none of the selected layers of {which} ran during the forward of batch {index}: "
                             f"{cap.names[:10]}; they may be skipped by the model's forward (select others)")
        return feats

    def forward(self, inputs, mask, index: int, batch_size: int | None):
        fa = self._one(self.model, self.cap_a, inputs, mask, self.dev_a, "model", index)
        fb = None
        if self.model_b is not None:
            fb = self._one(self.model_b, self.cap_b, inputs, mask, self.dev_b, "compare_to", index)
            if self.dev_b != self.dev_a:
                fb = {k: v.to(self.dev_a) for k, v in fb.items()}
        self.layers_a = _check_layout(self.layers_a, fa, "model", index, self.ckpt)
        if fb is not None:
            self.layers_b = _check_layout(self.layers_b, fb, "compare_to", index, self.ckpt)
        self.ckpt = None  # checked against the checkpoint once; later batches against the first
        self.rows = self._check_sizes(fa, fb, index, batch_size)
        return fa, fb

    def _check_sizes(self, fa, fb, index, batch_size):
        sizes = [("model", k, v.shape[0]) for k, v in fa.items()]
        sizes += [("compare_to", k, v.shape[0]) for k, v in (fb or {}).items()]
        n0 = sizes[0][2]
        odd = [s for s in sizes if s[2] != n0]
        if odd:
            w, k, n = odd[0]
            raise ValueError(f"mismatched sample counts at batch {index}: layer {sizes[0][1]!r} of {sizes[0][0]} has "
                             f"{n0} samples but layer {k!r} of {w} has {n}; every layer of both models must give one "
                             "row per input sample (time-major output? pass output_fn returning (N, ...))")
        # inputs are (N, ...) unless a model holds time-major (batch_first=False) blocks, whose
        # inputs may be (T, N, ...): only then is the input's first dimension not the batch size
        batch_first = not (self.cap_a._time_major or (self.cap_b is not None and self.cap_b._time_major))
        if batch_size is not None and not self.token_like and batch_first and n0 != batch_size:
            raise ValueError(f"layer {sizes[0][1]!r} of {sizes[0][0]} gave {n0} rows for a batch of {batch_size} "
                             f"samples (batch {index}); its output is not batch-first: pass output_fn returning "
                             "(N, ...) for it")
        return n0


def _check_layout(known, feats, which, index, ckpt=None):
    names = list(feats)
    if known is None:
        return names
    if names != known and ckpt is not None:
        raise ValueError(f"checkpoint={str(ckpt)!r} was written for layers {known} of {which}, but this call records "
                         f"{names}; delete the checkpoint or use another path for a different analysis")
    if names != known:
        raise ValueError(f"{which} recorded layers {names} at batch {index} but {known} before; the recorded layers "
                         "must be the same on every batch (data-dependent control flow? select layers that always "
                         "run)")
    return known
