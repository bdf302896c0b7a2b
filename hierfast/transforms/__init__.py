"""hierfast.transforms: seeded, batched input transforms parameterised by a magnitude
(METRICS.md §3.8), for invariance scores and their curves over magnitude.

Every transform is a callable ``T(x, *, generator=None) -> Tx`` drawing one random
parameter per sample from its own ``torch.Generator`` (seeded by ``seed=``) on the
batch's device; calling it twice gives two independent draws ``T``, ``T'``.

Example:
    >>> import torch
    >>> from hierfast.transforms import Translate
    >>> t = Translate(2, mode="circular", seed=0)
    >>> x = torch.randn(4, 3, 8, 8)
    >>> t(x).shape
    torch.Size([4, 3, 8, 8])
"""
from ._base import Lambda, Transform, as_transform
from .image import (Brightness, Contrast, Cutout, GaussianBlur, GaussianNoise, HorizontalFlip, Rotate, Scale,
                    Translate)
from .sequence import LocalShuffle, TokenDropout, TokenMask


def sweep(factory, magnitudes, **kwargs) -> list[Transform]:
    """One transform per magnitude, e.g. ``sweep(Rotate, [0, 5, 10, 20], seed=1)``
    (for invariance curves over magnitude)."""
    return [factory(m, **kwargs) for m in magnitudes]


__all__ = ["Transform", "Lambda", "as_transform", "sweep", "Translate", "Rotate", "Scale", "HorizontalFlip",
           "Brightness", "Contrast", "GaussianNoise", "GaussianBlur", "Cutout", "TokenMask", "TokenDropout",
           "LocalShuffle"]
