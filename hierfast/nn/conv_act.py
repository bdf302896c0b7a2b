"""``Conv2dAct``: an ``nn.Conv2d`` whose output goes through an activation in the same kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._compile import is_compiling
from ..functional import conv2d_act, needs_torch_ops
from ..ops import activations as A


def _copy_parameters(m: nn.Conv2d, conv: nn.Conv2d) -> None:
    """``m``'s parameters set to copies of ``conv``'s, with their memory format and
    ``requires_grad`` (a frozen layer stays frozen)."""
    w = conv.weight
    if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)  # keep the layout
    with torch.no_grad():
        m.weight.copy_(w)
        if conv.bias is not None:
            m.bias.copy_(conv.bias)
    m.weight.requires_grad_(w.requires_grad)
    if conv.bias is not None:
        m.bias.requires_grad_(conv.bias.requires_grad)


def parameters_shareable(conv: nn.Conv2d) -> bool:
    """Whether ``conv``'s weight and bias are ``nn.Parameter`` objects (or a None bias), which
    a new layer can hold as they are (:meth:`Conv2dAct.from_conv` with ``share_parameters``)."""
    return all(t is None or isinstance(t, nn.Parameter) for t in (conv.weight, conv.bias))


class Conv2dAct(nn.Conv2d):
    """``activation(nn.Conv2d(...)(x))`` fused (hierfast.functional.conv2d_act).

    Same constructor as ``nn.Conv2d`` plus ``activation`` (name, see
    ``hierfast.ops.activations.NAMES``) with its keyword arguments (``negative_slope``,
    ``approximate``), and ``track_stats``: accumulate per-channel mean, variance and
    fraction of positive outputs inside the epilogue (read with :meth:`stats`).
    ``state_dict`` keys are those of ``nn.Conv2d`` (``weight``, ``bias``), so weights
    load both ways. Statistics are eager-only: under ``torch.compile`` and ``torch.func``
    transforms the tap is skipped.
    Each call takes the path measured fastest for it (``hierfast.functional.conv2d_act``).

    Shape: ``(N, C_in, H, W)`` or ``(C_in, H, W)`` -> ``(N, C_out, H_out, W_out)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, activation="relu",
                 track_stats: bool = False, **act_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.activation = A.resolve(activation, **act_kwargs)
        self.track_stats = bool(track_stats)
        self._stats: torch.Tensor | None = None  # (C_out, 3) float64; not a buffer: keys stay nn.Conv2d's
        self._count = 0

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation="relu", *, share_parameters: bool = False,
                  **act_kwargs) -> "Conv2dAct":
        """A ``Conv2dAct`` with ``conv``'s configuration and copies of its parameters (their
        layout and ``requires_grad`` kept), or with ``share_parameters`` its very ``Parameter``
        objects (tied weights stay tied; an optimizer built on ``conv`` trains the new layer)."""
        w = conv.weight
        shared = share_parameters and parameters_shareable(conv)
        if share_parameters and not shared:
            raise TypeError("share_parameters=True needs conv.weight and conv.bias to be nn.Parameter (or a "
                            "None bias); pass share_parameters=False to copy them")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta" if shared else w.device,
                dtype=w.dtype, activation=activation, **act_kwargs)  # meta: no initialisation to throw away
        if shared:
            m.weight, m.bias = w, conv.bias
        else:
            _copy_parameters(m, conv)
        m.train(conv.training)
        return m

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        stats = None
        if (self.track_stats and input.device.type != "meta" and not is_compiling()
                and not needs_torch_ops(input, self.weight)):
            stats = self._stats_buffer(input.device)
        y = conv2d_act(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                       self.activation, stats=stats)
        if stats is not None:
            self._count += y.numel() // self.out_channels
        return y

    def _stats_buffer(self, device: torch.device) -> torch.Tensor:
        """The (C_out, 3) float64 sums on ``device``: created there, or moved there with what they
        hold (``_count`` stays theirs). Never an inference tensor, even when the first tracked call
        runs under ``torch.inference_mode``: those may not be updated in place outside it."""
        if self._stats is None or self._stats.device != device:
            with torch.inference_mode(False):
                self._stats = (torch.zeros(self.out_channels, 3, dtype=torch.float64, device=device)
                               if self._stats is None else self._stats.to(device))
        return self._stats

    def stats(self) -> dict[str, torch.Tensor] | None:
        """Per-channel ``mean``, ``var`` (population) and ``frac_active`` (share of outputs
        > 0) of the activation's output since the last :meth:`reset_stats`, float64
        ``(C_out,)`` each, and ``count`` (outputs per channel). None before any tracked call."""
        if self._stats is None or self._count == 0:
            return None
        s = self._stats / self._count
        mean = s[:, 0]
        return {"mean": mean, "var": (s[:, 1] - mean * mean).clamp_min(0), "frac_active": s[:, 2],
                "count": self._count}

    def reset_stats(self) -> None:
        self._stats, self._count = None, 0

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation}"
        return s + (", track_stats=True" if self.track_stats else "")
