"""LayerCapture: forward hooks that record what selected layers return, safely."""
from __future__ import annotations

import torch
from torch import nn

from ._outputs import _takes_three, pick_output, time_major_names
from ._reduce import check_policy, policy_for, reduce_output
from ._select import alias_of, select_layers


class LayerCapture:
    """Record the outputs of selected layers on every forward of ``model``.

    Args:
        model: any ``nn.Module``.
        layers: None (every conv, linear, recurrent and attention block — ``nn.Conv*``,
            ``nn.Linear``, ``nn.RNN/LSTM/GRU`` (+ cells), ``nn.MultiheadAttention``,
            ``nn.Transformer*Layer``, and modules whose class name ends in ``Attention``);
            or exact names, glob patterns (``"layer*.conv1"``), module types, a predicate
            ``f(name, module) -> bool``, or a list of these. Unknown names raise ``ValueError``
            listing the closest real names.
        reduce: how an ``(N, ...)`` output becomes features: ``"flatten"`` (default),
            ``"avgpool"``, ``"mean"``, ``"cls"``, ``"tokens"`` (see ``hierfast.capture._reduce``),
            a callable ``f(x, mask)``, or a dict ``{name or glob: policy}``.
        output_fn: picks the tensor from a module's output, ``f(out)`` or
            ``f(name, module, out)``; it must return ``(N, ...)``. Default: the tensor itself,
            ``last_hidden_state`` of Hugging Face outputs, else the first tensor of a
            tuple/list/dict (``nn.LSTM``: ``output`` of ``(output, (h, c))``); time-major
            outputs of ``batch_first=False`` recurrent/attention blocks (and of the modules inside
            them) are transposed to ``(N, T, ...)``.

    What is recorded is what the layer *returned*: the reduction runs inside the hook and
    its result is copied if it still shares memory with the output, so a later
    ``ReLU(inplace=True)`` cannot change it. A module that runs several times in one
    forward (a shared activation, a recurrent cell) is recorded once per call, as
    ``name``, ``name#1``, ``name#2``, ... Every forward of ``model`` starts a fresh record.
    While active, PyTorch's fused ``nn.TransformerEncoderLayer`` fast path is switched off
    (it skips the submodules' hooks); it is restored on exit.

    Attributes:
        features: ``{name: (M, d) tensor}`` of the last forward, in the order the layers ran.
        shapes: ``{name: per-sample shape}`` of the raw outputs (before reduction).
        attention_mask: optional ``(N, T)`` mask used by ``"mean"``/``"tokens"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(144, 2))
        >>> with LayerCapture(net) as cap:
        ...     _ = net(torch.randn(5, 3, 8, 8))
        >>> {k: tuple(v.shape) for k, v in cap.features.items()}
        {'0': (5, 144), '3': (5, 2)}
    """

    def __init__(self, model: nn.Module, layers=None, *, reduce="flatten", output_fn=None) -> None:
        self.model = model
        self.modules = select_layers(model, layers)
        # exact names the user asked for: analyze checks that they run (a module the forward
        # bypasses, e.g. nn.MultiheadAttention.out_proj, would otherwise be silently absent)
        specs = layers if isinstance(layers, (list, tuple, set)) else [layers]
        self.required = [s if s in self.names else (alias_of(model, s) or s) for s in specs
                         if isinstance(s, str) and not any(c in s for c in "*?[")]
        check_policy(reduce)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable f(out) or f(name, module, out), got {type(output_fn).__name__}")
        self.reduce = reduce
        self._out3 = output_fn is not None and _takes_three(output_fn)
        self.output_fn = output_fn
        self.attention_mask: torch.Tensor | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self._time_major = time_major_names(model)
        self._fastpath = None

    @property
    def names(self) -> list[str]:
        """Names of the selected modules (``named_modules`` order; records follow run order)."""
        return [n for n, _ in self.modules]

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "LayerCapture":
        if self._handles:
            raise RuntimeError("this LayerCapture is already active (nested 'with' on the same object)")
        self._handles.append(self.model.register_forward_pre_hook(lambda m, a: self.reset()))
        for name, mod in self.modules:
            self._handles.append(mod.register_forward_hook(self._make_hook(name)))
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "get_fastpath_enabled"):
            self._fastpath = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def reset(self) -> None:
        """Forget the last forward's records (done automatically when ``model`` is called)."""
        self.features = {}
        self._calls = {}

    def missing(self) -> list[str]:
        """Exactly named layers that did not run in the last forward."""
        ran = {k.split("#")[0] for k in self.features}
        return [n for n in self.required if n not in ran]

    def pop(self) -> dict[str, torch.Tensor]:
        """The last forward's features; the record is emptied."""
        out = self.features
        self.reset()
        return out

    # -- the hook --------------------------------------------------------------------------
    def _make_hook(self, name: str):
        policy = policy_for(self.reduce, name)
        tm = name in self._time_major

        def hook(module, args, out):
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            key = name if k == 0 else f"{name}#{k}"
            if self.output_fn is None:
                t = pick_output(module, out, name, time_major=tm)
            elif self._out3:
                t = pick_output(module, out, name, lambda o: self.output_fn(name, module, o))
            else:
                t = pick_output(module, out, name, self.output_fn)
            r = reduce_output(t, policy, key, self.attention_mask)
            if r.dim() != 2:
                raise ValueError(f"reduce policy for layer {key!r} returned shape {tuple(r.shape)}; features must "
                                 "be 2-D (samples, features)")
            # The output (or a view of it) may be overwritten in place by a later op
            # (ReLU(inplace=True)): keep a private copy of anything sharing its memory.
            if r.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                r = r.clone(memory_format=torch.contiguous_format)
            self.features[key] = r
            if key not in self.shapes:
                self.shapes[key] = tuple(t.shape[1:])

        return hook
