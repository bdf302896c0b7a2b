"""hierfast.stats: per-layer statistics as functions and mergeable streaming accumulators.

CKA (METRICS.md §1): :func:`linear_cka`, :func:`rbf_cka`, :func:`cka_matrix`,
:class:`MinibatchCKA` (Nguyen et al. 2021), :class:`ExactCKA` (exact, feature space).

Invariance (§3): :func:`normalized_invariance`, :class:`InvarianceAccumulator` (NIS and CKA invariance).
"""
from ._normalize import ConstantLayerWarning
from .accumulator import Accumulator
from .cka import cka_matrix, linear_cka, rbf_cka
from .exact_cka import ExactCKA
from .invariance import InvarianceAccumulator, invariance_curve, normalized_invariance
from .minibatch_cka import MinibatchCKA

__all__ = ["linear_cka", "rbf_cka", "cka_matrix", "MinibatchCKA", "ExactCKA", "Accumulator",
           "ConstantLayerWarning",
           "InvarianceAccumulator", "normalized_invariance", "invariance_curve"]
from .probe import ProbeAccumulator, ridge_probe  # noqa: E402

__all__ += ["ProbeAccumulator", "ridge_probe"]
from .dimension import DimensionAccumulator, effective_rank, participation_ratio, twonn  # noqa: E402

__all__ += ["DimensionAccumulator", "twonn", "participation_ratio", "effective_rank"]
