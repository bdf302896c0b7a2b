"""Image transforms on ``(N, C, H, W)`` float batches, one random draw per sample.

Magnitudes (so that invariance curves can be drawn over them, METRICS.md §3.8):

===============  ===========================================================
Translate        max shift in pixels; per-axis shift ~ U{-m..m} (integers
                 when ``mode="circular"``, real when ``mode="zeros"``)
Rotate           max angle in degrees; angle ~ U[-m, m]
Scale            zoom factor ~ U[1-m, 1+m] about the centre (0 <= m < 1)
HorizontalFlip   probability of flipping each sample (0..1)
Brightness       additive offset b ~ U[-m, m]  (x + b)
Contrast         factor c ~ U[1-m, 1+m] about each image's mean (0 <= m <= 1)
GaussianNoise    standard deviation of added N(0, m^2) noise
GaussianBlur     standard deviation (pixels) of the blur kernel (deterministic)
Cutout           side of the zeroed square, in pixels, at a random position
===============  ===========================================================

Apply them *before* the model's input normalisation. Geometric transforms other
than circular translation resample with bilinear interpolation (in float32, float64 for
float64 input, whatever the input dtype) and fill outside the image with zeros.
Magnitude 0 is exactly the identity for every transform. Sample i's draw depends only on
the seed and i, never on the batch size or the input dtype (GaussianNoise on a GPU excepted:
CUDA's generator maps its streams by the size of the tensor drawn).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._base import Transform, check_magnitude, uniform


class ImageTransform(Transform):
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch of shape (N, C, H, W), got shape {tuple(x.shape)} "
                             "(add a batch dimension with x[None] or a channel one with x[:, None])")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image batch, got {x.dtype} (convert with .float())")

    def _is_identity(self) -> bool:
        return self.magnitude == 0.0


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` with per-sample 2x3 affine matrices (normalised coordinates).

    Grid and sampling run in float32 (float64 for float64 input): a half-precision grid
    cannot address the pixels of a large image, and CPU grid_sample in float16/bfloat16
    returns NaN; the result is cast back to ``x.dtype``."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = F.affine_grid(theta.to(work), list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


class Translate(ImageTransform):
    """Shift by up to ``magnitude`` pixels per axis.

    ``mode="circular"``: integer shifts with wrap-around (an exact group action: a
    conv net with circular padding and global average pooling is exactly invariant).
    ``mode="zeros"``: shift and fill the uncovered border with zeros (sub-pixel
    shifts are bilinear).
    """

    def __init__(self, magnitude: float, *, mode: str = "circular", seed: int = 0) -> None:
        super().__init__(seed=seed)
        if mode not in ("circular", "zeros"):
            raise ValueError(f"mode={mode!r}; choose 'circular' (wrap-around) or 'zeros' (zero padding)")
        self.magnitude = check_magnitude(magnitude, "magnitude (max shift in pixels)")
        if mode == "circular" and self.magnitude != int(self.magnitude):
            raise ValueError(f"magnitude={magnitude} is not an integer; circular shifts are integer pixels "
                             "(use mode='zeros' for sub-pixel shifts)")
        self.mode = mode

    def _apply(self, x, g):
        n, _, h, w = x.shape
        m = self.magnitude
        if self.mode == "circular":
            k = int(m)
            # (n, 2): sample i's (dy, dx) are draws 2i, 2i+1 whatever the batch size
            s = torch.randint(-k, k + 1, (n, 2), generator=g, device=x.device)
            rows = (torch.arange(h, device=x.device)[None, :] - s[:, 0, None]) % h  # (n, h)
            cols = (torch.arange(w, device=x.device)[None, :] - s[:, 1, None]) % w  # (n, w)
            idx_r = rows[:, None, :, None].expand(n, x.shape[1], h, w)
            out = torch.gather(x, 2, idx_r)
            idx_c = cols[:, None, None, :].expand(n, x.shape[1], h, w)
            return torch.gather(out, 3, idx_c)
        d = uniform((n, 2), -m, m, g, x.device)  # per sample (dy, dx), as in circular mode
        dy, dx = d[:, 0], d[:, 1]
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        # output pixel (i, j) samples input at (i - dy, j - dx); normalised units are 2/size
        theta[:, 0, 2] = -dx * 2.0 / w
        theta[:, 1, 2] = -dy * 2.0 / h
        return _affine(x, theta)


class Rotate(ImageTransform):
    """Rotate about the image centre by an angle ~ U[-m, m] degrees (zeros outside)."""

    def __init__(self, magnitude: float, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (max angle in degrees)", high=180.0)

    def _apply(self, x, g):
        n, _, h, w = x.shape
        a = uniform(n, -self.magnitude, self.magnitude, g, x.device) * (math.pi / 180.0)
        c, s = torch.cos(a), torch.sin(a)
        theta = torch.zeros(n, 2, 3, device=x.device)
        # normalised coordinates scale x by 2/w and y by 2/h: correct the aspect ratio
        theta[:, 0, 0], theta[:, 0, 1] = c, -s * h / w
        theta[:, 1, 0], theta[:, 1, 1] = s * w / h, c
        return _affine(x, theta)


class Scale(ImageTransform):
    """Zoom about the centre by a factor ~ U[1-m, 1+m] (0 <= m < 1; zeros outside)."""

    def __init__(self, magnitude: float, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (relative zoom)", high=1.0, high_inclusive=False)

    def _apply(self, x, g):
        n = x.shape[0]
        z = uniform(n, 1.0 - self.magnitude, 1.0 + self.magnitude, g, x.device)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / z
        return _affine(x, theta)


class HorizontalFlip(ImageTransform):
    """Mirror left-right each sample with probability ``magnitude`` (1 = always; at 0
    and 1 the draw cannot vary, so the transform is deterministic)."""

    def __init__(self, magnitude: float = 0.5, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (flip probability)", high=1.0)

    def _draw_is_fixed(self) -> bool:
        return self.magnitude in (0.0, 1.0)

    def _apply(self, x, g):
        flip = torch.rand(x.shape[0], generator=g, device=x.device) < self.magnitude
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Brightness(ImageTransform):
    """Add an offset ~ U[-m, m] to every pixel of a sample."""

    def __init__(self, magnitude: float, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (max brightness offset)")

    def _apply(self, x, g):
        # drawn in float32 whatever x's dtype, so a seed gives the same offsets in every dtype
        b = uniform(x.shape[0], -self.magnitude, self.magnitude, g, x.device).to(x.dtype)
        return x + b[:, None, None, None]


class Contrast(ImageTransform):
    """Scale each sample about its mean by a factor ~ U[1-m, 1+m] (0 <= m <= 1)."""

    def __init__(self, magnitude: float, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (relative contrast change)", high=1.0)

    def _apply(self, x, g):
        c = uniform(x.shape[0], 1.0 - self.magnitude, 1.0 + self.magnitude, g, x.device).to(x.dtype)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * c[:, None, None, None] + mean


class GaussianNoise(ImageTransform):
    """Add i.i.d. N(0, m^2) noise to every pixel."""

    def __init__(self, magnitude: float, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (noise standard deviation)")

    def _apply(self, x, g):
        # float32 draw: the same noise in every dtype. One block of a multiple of 16 values per
        # sample: the CPU's randn transforms its uniforms 16 at a time and redraws the last 16
        # when the count is no multiple of 16, which made the last sample's noise depend on N
        per = x[0].numel()
        block = torch.randn(x.shape[0], -(-per // 16) * 16, generator=g, device=x.device)
        noise = block[:, :per].reshape(x.shape)
        return x + (self.magnitude * noise).to(x.dtype)


class GaussianBlur(ImageTransform):
    """Separable Gaussian blur of standard deviation ``magnitude`` pixels.

    Kernel radius ceil(3 sigma), reflect padding; deterministic (no random draw).
    """

    def __init__(self, magnitude: float, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (blur sigma in pixels)")

    def _draw_is_fixed(self) -> bool:
        return True  # draws nothing at any sigma

    def _apply(self, x, g):
        sigma = self.magnitude
        r = int(math.ceil(3.0 * sigma))
        if sigma == 0.0 or r == 0:
            return x.clone()
        _, c, h, w = x.shape
        if r >= min(h, w):
            raise ValueError(f"magnitude={sigma} needs a blur radius of {r} pixels, but the image is {h}x{w}; "
                             f"use sigma < {min(h, w) / 3:.3g}")
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        y = F.pad(x, (r, r, r, r), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class Cutout(ImageTransform):
    """Zero a ``m x m`` square (all channels) at a uniformly random position
    (DeVries & Taylor 2017); the square may be clipped at the border."""

    def __init__(self, magnitude: float, *, fill: float = 0.0, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.magnitude = check_magnitude(magnitude, "magnitude (cutout side in pixels)")
        if self.magnitude != int(self.magnitude):
            raise ValueError(f"magnitude={magnitude} must be a whole number of pixels")
        self.fill = float(fill)

    def _apply(self, x, g):
        n, _, h, w = x.shape
        k = int(self.magnitude)
        if k > min(h, w):
            raise ValueError(f"magnitude={k} is larger than the {h}x{w} image")
        # one draw per sample (the centre's flat index), so sample i's square does not
        # depend on the batch size
        pos = torch.randint(0, h * w, (n,), generator=g, device=x.device)
        cy, cx = pos // w, pos % w
        y0, x0 = cy - k // 2, cx - k // 2
        ys = torch.arange(h, device=x.device)[None, :]
        xs = torch.arange(w, device=x.device)[None, :]
        my = (ys >= y0[:, None]) & (ys < (y0 + k)[:, None])  # (n, h)
        mx = (xs >= x0[:, None]) & (xs < (x0 + k)[:, None])  # (n, w)
        mask = (my[:, :, None] & mx[:, None, :])[:, None]
        return x.masked_fill(mask, self.fill)
