"""Image parameterisations and robustness transforms for activation maximisation
(Olah et al. 2017, "Feature Visualization"; the Lucid library).

- pixel: the image logits are optimised directly;
- fourier: ``rfft2`` coefficients scaled by ``1/frequency``, so that a unit step changes
  all frequencies by a similar visual amount (plain pixel descent is dominated by
  high-frequency noise);
- decorrelated colour: the 3 channels are mixed by the square root of ImageNet's colour
  covariance (Lucid's matrix, normalised by its largest column norm), then a sigmoid maps
  to [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Lucid's ``color_correlation_svd_sqrt`` (ImageNet), normalised like Lucid does.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]], dtype=torch.float64)
COLOR = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


class Image(torch.nn.Module):
    """``n`` images of ``size`` x ``size``; :meth:`forward` returns ``(n, 3, size, size)`` in [0, 1].

    ``param``: ``"fourier"`` or ``"pixel"``; ``decorrelate``: mix colours with :data:`COLOR`.
    Initialised from ``generator`` with small noise (Lucid: sd 0.01).
    """

    def __init__(self, n: int, size: int, param: str, decorrelate: bool, generator: torch.Generator,
                 device, dtype=torch.float32):
        super().__init__()
        self.size, self.param, self.decorrelate = size, param, decorrelate
        if param == "fourier":
            fy = torch.fft.fftfreq(size).unsqueeze(1)
            fx = torch.fft.rfftfreq(size).unsqueeze(0)
            freq = torch.sqrt(fx * fx + fy * fy)
            # 1/f scaling; the DC term gets the smallest non-zero frequency's weight.
            self.register_buffer("scale", (1.0 / freq.clamp_min(1.0 / size)).to(device, dtype) / size)
            shape = (n, 3, size, size // 2 + 1, 2)
        else:
            shape = (n, 3, size, size)
        init = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.01
        self.coeffs = torch.nn.Parameter(init.to(device, dtype))
        self.register_buffer("color", COLOR.to(device, dtype))

    def forward(self) -> torch.Tensor:
        if self.param == "fourier":
            spec = torch.view_as_complex(self.coeffs.float()) * self.scale.float()
            x = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho").to(self.coeffs.dtype)
            x = x * 4.0  # Lucid's fft_image contrast factor
        else:
            x = self.coeffs
        if self.decorrelate:
            x = torch.einsum("nchw,dc->ndhw", x, self.color)
        return torch.sigmoid(x)


def standard_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Lucid's ``standard_transforms`` as one affine warp per image: pad 12 (reflect),
    jitter +/-8 px, scale in [0.9, 1.1], rotation in [-10, 10] degrees, jitter +/-4 px, crop
    back to the input size. One ``grid_sample`` for the whole batch."""
    n, _, h, w = images.shape
    pad = 12
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    H, W = h + 2 * pad, w + 2 * pad
    r = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    scale = 0.9 + 0.2 * r[:, 0]
    angle = (r[:, 1] * 20.0 - 10.0) * math.pi / 180.0
    shift = (torch.randint(-12, 13, (n, 2), generator=generator)).double()  # both jitters combined, pixels
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps the output grid (normalised to the *padded* image) into the input;
    # the output is ``h x w`` so the theta also crops away the padding.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * (w / W), -sin * (h / W)
    theta[:, 1, 0], theta[:, 1, 1] = sin * (w / H), cos * (h / H)
    theta[:, 0, 2] = 2.0 * shift[:, 0] / W
    theta[:, 1, 2] = 2.0 * shift[:, 1] / H
    grid = F.affine_grid(theta.to(images.device, images.dtype), (n, images.shape[1], h, w), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute difference of neighbouring pixels, ``(n,)``."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dh + dw
