"""PSNR and SSIM with the BasicSR conventions: 8-bit quantisation, optional border crop and Y channel,
SSIM with an 11x11 Gaussian window (sigma 1.5), valid filtering, averaged over channels."""
from __future__ import annotations

import math
from typing import Literal, Union

import torch
import torch.nn.functional as F

from .utils import check_images

Reduction = Literal["mean", "none"]


def _prepare(x: torch.Tensor, y: torch.Tensor, crop_border: int, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x[None], y[None]
    check_images(x, "x", channels=None, check_range=False)
    check_images(y, "y", channels=None, check_range=False)
    if crop_border < 0 or 2 * crop_border >= min(x.shape[-2:]):
        raise ValueError(f"crop_border must be in [0, min(H,W)/2), got {crop_border} for size {tuple(x.shape[-2:])}")
    # Quantise to 8 bits as an image file would (BasicSR evaluates uint8 images), then work in float64.
    x = (x.detach().clamp(0, 1) * 255.0).round().double()
    y = (y.detach().clamp(0, 1) * 255.0).round().double()
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        if x.shape[1] != 3:
            raise ValueError(f"y_channel=True needs 3 RGB channels, got {x.shape[1]}")
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y


def rgb_to_y(img255: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of an RGB image on the 0-255 scale: Y = 16 + (65.481 R + 128.553 G + 24.966 B)/255."""
    w = img255.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (img255 * w).sum(1, keepdim=True) / 255.0 + 16.0


def psnr(x: torch.Tensor, y: torch.Tensor, *, crop_border: int = 0, y_channel: bool = False,
         reduction: Reduction = "mean") -> Union[float, torch.Tensor]:
    """PSNR = 10 log10(255^2 / MSE) per image on 8-bit values; mean over the batch (or per image)."""
    x, y = _prepare(x, y, crop_border, y_channel)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    out = 10.0 * torch.log10(255.0**2 / mse.clamp_min(1e-10))
    out = torch.where(mse == 0, torch.full_like(out, math.inf), out)
    return float(out.mean()) if reduction == "mean" else out


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, *, crop_border: int = 0, y_channel: bool = False,
         reduction: Reduction = "mean") -> Union[float, torch.Tensor]:
    """SSIM (Wang et al. 2004): mean over the valid-filtered map of
    ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    C1 = (0.01*255)^2, C2 = (0.03*255)^2, averaged over channels, then over the batch."""
    x, y = _prepare(x, y, crop_border, y_channel)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 after cropping, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    win = _gaussian_window(device=x.device).expand(c, 1, 11, 11).contiguous()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    per_image = m.flatten(2).mean(2).mean(1)
    return float(per_image.mean()) if reduction == "mean" else per_image
