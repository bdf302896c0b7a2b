"""Feature visualisation: what each channel of each layer responds to.

- :func:`top_activating`: the dataset examples that excite each channel most (one
  streaming pass, fused per-channel top-k kernel), with receptive-field crops for conv
  layers and token context for sequence models;
- :func:`activation_maximization`: synthesised images maximising each channel, all
  channels in one batched optimisation stopped at the target layer;
- :func:`plot_channels`: image grids.
"""
from .maximize import Visualization, activation_maximization
from .plot import plot_channels
from .top_activating import TopActivating, top_activating

__all__ = ["activation_maximization", "Visualization", "top_activating", "TopActivating", "plot_channels"]
