"""hierfast.stats: per-layer statistics as functions and mergeable streaming accumulators.

CKA (METRICS.md §1): :func:`linear_cka`, :func:`rbf_cka`, :func:`cka_matrix`,
:class:`MinibatchCKA` (Nguyen et al. 2021), :class:`ExactCKA` (exact, feature space).
"""
from ._normalize import ConstantLayerWarning
from .accumulator import Accumulator
from .cka import cka_matrix, linear_cka, rbf_cka
from .exact_cka import ExactCKA
from .minibatch_cka import MinibatchCKA

__all__ = ["linear_cka", "rbf_cka", "cka_matrix", "MinibatchCKA", "ExactCKA", "Accumulator",
           "ConstantLayerWarning"]
