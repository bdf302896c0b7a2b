"""Small helpers shared by the ops that call the compiled kernels."""
import contextlib

import torch

from .. import _ext


def cpu_kernels():
    mod, reason = _ext.cpu_module()
    if mod is None:  # select() has already checked availability; this is a guard
        raise RuntimeError(reason)
    return mod


def cuda_kernels():
    mod, reason = _ext.cuda_module()
    if mod is None:
        raise RuntimeError(reason)
    return mod


def cuda_stream(t: torch.Tensor) -> int:
    """Raw handle of the current CUDA stream of ``t``'s device."""
    return torch.cuda.current_stream(t.device).cuda_stream


def on_device(t: torch.Tensor):
    """Context making ``t``'s GPU the current device (a no-op for CPU tensors): Triton and our
    CUDA launchers run on the current device, which need not be the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
