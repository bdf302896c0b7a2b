"""HSIC sums -> CKA, with undefined (constant-layer) entries turned into NaN and one warning."""
from __future__ import annotations

import warnings

import torch


class ConstantLayerWarning(RuntimeWarning):
    """A layer has zero variance: its CKA is undefined (NaN)."""


def cka_from_hsic(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor,
                  names_a: list[str], names_b: list[str]) -> torch.Tensor:
    """``cross[i, j] / sqrt(self_a[i] * self_b[j])``; NaN rows/columns for zero self-HSIC."""
    dead_a = self_a <= 0
    dead_b = self_b <= 0
    dead = [names_a[i] for i in dead_a.nonzero().flatten().tolist()]
    dead += [names_b[j] for j in dead_b.nonzero().flatten().tolist() if names_b[j] not in dead]
    if dead:
        warnings.warn(f"CKA is undefined for constant (zero-variance) layer(s) {', '.join(dead)}: "
                      "their entries are NaN", ConstantLayerWarning, stacklevel=3)
    den = torch.sqrt(self_a.clamp_min(0)[:, None] * self_b.clamp_min(0)[None, :])
    out = cross / den
    out[dead_a, :] = float("nan")
    out[:, dead_b] = float("nan")
    return out


def label_matrix(m: torch.Tensor, row_names, col_names) -> torch.Tensor:
    """Attach ``row_names`` / ``col_names`` (lists of layer names, or None) to a result."""
    m.row_names = list(row_names) if row_names is not None else None
    m.col_names = list(col_names) if col_names is not None else None
    return m
