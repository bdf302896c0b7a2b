"""Dtype codes shared with the compiled core (must match csrc/include/hierfast/common.h)."""
import torch

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
FLOAT_DTYPES = tuple(DTYPE_CODES)


def code(dtype: torch.dtype) -> int:
    """Integer code of a floating dtype for the C++/CUDA kernels."""
    return DTYPE_CODES[dtype]
