"""Small helpers shared by the ops that call the compiled kernels."""
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
