"""PSNR and SSIM with the BasicSR conventions: 8-bit quantisation, optional border crop and Y channel,
SSIM with an 11x11 Gaussian window (sigma 1.5), valid filtering, averaged over channels."""
from __future__ import annotations

import math
from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

from .utils import check_choice, check_images, check_number

Reduction = Literal["mean", "none"]


REDUCTIONS = ("mean", "none")
# Values may overshoot [0, 1] by float rounding only (the tolerance of utils.check_images); they are then
# clamped, so a correct image scores exactly as before. Anything further out is refused, never clamped.
RANGE_TOL = 1e-3


def _check_values(fn: str, name: str, t: torch.Tensor) -> None:
    """Refuse non-finite values and values outside [0, 1]: clamping them would give a wrong score silently."""
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(t.detach())).sum())
        raise ValueError(f"{fn}: {name} has {bad} non-finite value(s) (NaN or inf); expected finite values in [0, 1]")
    if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
        hint = " (0-255 data: divide by 255)" if hi > 1.5 else " (clamp model outputs with .clamp(0, 1))"
        raise ValueError(f"{fn}: {name}: expected values in [0, 1]{hint}, got range [{lo:.4g}, {hi:.4g}]")


def _prepare(fn: str, x: torch.Tensor, y: torch.Tensor, crop_border: int, y_channel: bool,
             reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_number(fn, "crop_border", crop_border, lo=0, integer=True)
    if not isinstance(y_channel, (bool, np.bool_)):
        raise TypeError(f"{fn}.y_channel: expected True or False, got {y_channel!r}")
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.shape != y.shape:
        raise ValueError(f"{fn}: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{fn}: x and y must be on the same device, got {x.device} and {y.device}")
    if x.dim() == 3:
        x, y = x[None], y[None]
    check_images(x, "x", channels=None, check_range=False)
    check_images(y, "y", channels=None, check_range=False)
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: x and y are empty batches (shape {tuple(x.shape)}); expected at least one image")
    if min(x.shape[1:]) == 0:
        raise ValueError(f"{fn}: x and y have a zero-size dimension (shape {tuple(x.shape)}); expected at least "
                         "one channel and one pixel")
    for name, t in (("x", x), ("y", y)):
        _check_values(fn, name, t)
    if 2 * crop_border >= min(x.shape[-2:]):
        raise ValueError(f"{fn}.crop_border: expected an integer in [0, min(H,W)/2), got {crop_border} for size "
                         f"{tuple(x.shape[-2:])}")
    # Quantise to 8 bits as an image file would (BasicSR evaluates uint8 images), then work in float64.
    x = (x.detach().clamp(0, 1) * 255.0).round().double()
    y = (y.detach().clamp(0, 1) * 255.0).round().double()
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        if x.shape[1] != 3:
            raise ValueError(f"{fn}.y_channel: True needs 3 RGB channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        x, y = _rgb_to_y(x), _rgb_to_y(y)
    return x, y


def rgb_to_y(img255: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of an RGB image on the 0-255 scale: Y = 16 + (65.481 R + 128.553 G + 24.966 B)/255.
    ``img255``: (N,3,H,W) float with finite values in [0, 255]."""
    check_images(img255, "rgb_to_y: img255", channels=3, check_range=False)
    if img255.numel():
        lo, hi = (float(v) for v in torch.aminmax(img255.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 255:
            raise ValueError(f"rgb_to_y: img255: expected finite values in [0, 255], got range [{lo:.4g}, {hi:.4g}]")
    return _rgb_to_y(img255)


def _rgb_to_y(img255: torch.Tensor) -> torch.Tensor:
    w = img255.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (img255 * w).sum(1, keepdim=True) / 255.0 + 16.0


def per_sample_mse(y: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """MSE of each item of a batch (N,), differentiable and unquantised: a training signal, unlike :func:`psnr`."""
    if not isinstance(y, torch.Tensor) or not isinstance(gt, torch.Tensor) or y.shape != gt.shape or y.dim() < 2:
        raise ValueError(f"per_sample_mse: expected two batches of the same shape (N, ...), got "
                         f"{getattr(y, 'shape', type(y).__name__)} and {getattr(gt, 'shape', type(gt).__name__)}")
    return (y - gt).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, *, crop_border: int = 0, y_channel: bool = False,
         reduction: Reduction = "mean") -> Union[float, torch.Tensor]:
    """PSNR = 10 log10(255^2 / MSE) per image on 8-bit values; mean over the batch (or per image).
    ``x`` and ``y``: (N,C,H,W) or (C,H,W) float in [0, 1], finite; out-of-range values are refused, not clamped."""
    x, y = _prepare("psnr", x, y, crop_border, y_channel, reduction)
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
    C1 = (0.01*255)^2, C2 = (0.03*255)^2, averaged over channels, then over the batch. Inputs as for ``psnr``;
    at least 11x11 pixels after ``crop_border``."""
    x, y = _prepare("ssim", x, y, crop_border, y_channel, reduction)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim: expected images of at least 11x11 (the SSIM window) after crop_border="
                         f"{crop_border}, got {tuple(x.shape[-2:])}")
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
