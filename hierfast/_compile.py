"""Cheap "are we being traced by torch.compile?" check."""
import sys

import torch


def is_compiling() -> bool:
    """True inside torch.compile tracing. ``torch.compiler.is_compiling()`` imports
    torch._dynamo on first use (1.9 s measured); when dynamo is not loaded yet we
    cannot be compiling, so look first."""
    if "torch._dynamo" not in sys.modules:
        return False
    return torch.compiler.is_compiling()
