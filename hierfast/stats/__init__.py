"""hierfast.stats: per-layer statistics as functions and mergeable streaming accumulators."""
