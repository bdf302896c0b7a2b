"""What a batch is: inputs for the model, optional labels, an optional attention mask.

- a tensor ``x``: ``model(x)``;
- a tuple/list ``(x, y, ...)``: ``x`` goes to the model (``model(*x)`` if ``x`` is itself a
  tuple/list, ``model(**x)`` if a dict), ``y`` is the labels, the rest is ignored; ``(x,)``
  has no labels;
- a dict (Hugging Face tokenizer output): ``model(**batch)`` without the keys ``labels`` /
  ``label`` (those become the labels); ``attention_mask`` also masks sequence reductions.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

LABEL_KEYS = ("labels", "label")


@dataclass
class Batch:
    inputs: Any
    labels: torch.Tensor | None
    mask: torch.Tensor | None
    size: int


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    vals = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in vals:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def to_device(x, device):
    """``x`` (tensors, nested in dicts/tuples/lists) moved to ``device``. Copies from the host
    may be asynchronous (the stream orders them before the model's kernels); a copy from a GPU
    to the host may not: the host would read the tensor before the copy has landed."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=x.device.type == "cpu")
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def parse_batch(batch, index: int) -> Batch:
    """Split one element of ``data`` into inputs / labels / mask, with its sample count."""
    labels = None
    if isinstance(batch, torch.Tensor):
        inputs = batch
    elif isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    elif isinstance(batch, (tuple, list)) and batch:
        inputs = batch[0]
        labels = batch[1] if len(batch) > 1 else None
    else:
        raise TypeError(f"data batch {index} is a {type(batch).__name__}; batches must be tensors, (inputs, labels) "
                        "tuples or dicts of tensors")
    t = _first_tensor(inputs)
    if t is None or t.dim() == 0:
        raise TypeError(f"data batch {index} holds no (N, ...) input tensor; batches must be tensors, (inputs, "
                        "labels) tuples or dicts of tensors")
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return Batch(inputs, labels, mask, int(t.shape[0]))


def call_model(model, inputs):
    """Call ``model`` the way the batch format prescribes (module docstring)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
