"""The distortion zoo: counterfactual distortion augmentation on float batches (N,3,H,W) in [0,1].

Every distortion is a small frozen dataclass called as ``d(images, generator=None)``. It runs on the batch's
device, vectorised over the batch, and is deterministic given a ``torch.Generator`` (on the batch's device).
A parameter given as a pair ``(lo, hi)`` is drawn per sample, uniformly in that range.
``build(name, **params)`` makes one by name; ``names()`` lists them.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .registry import Registry
from .utils import check_choice, check_images, check_number

Param = Union[float, Tuple[float, float]]
REGISTRY: Registry["Distortion"] = Registry("distortion")


def _check_param(name: str, p: Param, lo: float, hi: float) -> None:
    """``name`` ('owner.field') is a number in [lo, hi] or a pair (a, b) of them with a <= b (a per-sample range)."""
    owner, _, fld = name.partition(".")
    if isinstance(p, (tuple, list)):
        if len(p) != 2:
            raise ValueError(f"{name}: a range must be a pair (lo, hi), got {p!r}")
        for i, v in enumerate(p):
            check_number(owner, f"{fld}[{i}]", v, lo=lo, hi=hi)
        if p[0] > p[1]:
            raise ValueError(f"{name}: range must satisfy lo <= hi, got {p!r}")
    else:
        check_number(owner, fld, p, lo=lo, hi=hi)


def _check_flag(owner: str, field: str, value) -> None:
    check_choice(owner, field, value, (True, False))


def _check_odd(owner: str, field: str, value, lo: int) -> None:
    check_number(owner, field, value, lo=lo, integer=True)
    if value % 2 != 1:
        raise ValueError(f"{owner}.{field}: expected an odd integer >= {lo}, got {value!r}")


def check_size(x: torch.Tensor, owner: str, min_side: int = 1, why: str = "") -> torch.Tensor:
    """A validated (N,C,H,W) batch is not empty and every side is >= ``min_side`` (``why`` says what needs it)."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    if n == 0:
        raise ValueError(f"{owner}: expected at least one image, got an empty batch of shape {tuple(x.shape)}")
    if min(h, w) < max(min_side, 1):
        need = f"H and W >= {max(min_side, 1)}" + (f" ({why})" if why else "")
        raise ValueError(f"{owner}: expected {need}, got an image of {h}x{w}")
    return x


def _kernel_need(size: int) -> Tuple[int, str]:
    """Reflect padding of a size x size kernel (size // 2 px) must be smaller than every image side."""
    return size // 2 + 1, f"a {size}x{size} kernel pads {size // 2} px by reflection"


def draw(p: Param, n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Per-sample values (n,) for a scalar or a uniform range ``(lo, hi)``."""
    if isinstance(p, (tuple, list)):
        u = torch.rand(n, generator=generator, device=device)
        return p[0] + (p[1] - p[0]) * u
    return torch.full((n,), float(p), device=device)


def _fmt(p: Param) -> str:
    if isinstance(p, (tuple, list)):
        return f"{p[0]:g}-{p[1]:g}"
    return f"{p:g}"


class Distortion:
    """Base class: subclasses implement ``_apply(x, generator)`` on a validated batch."""

    name: str = "distortion"

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_images(images, f"{self.name} input")
        check_size(images, f"{self.name} input", *self.size_need())
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{self.name}: generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator is not None and torch.device(generator.device).type != images.device.type:
            raise ValueError(f"{self.name}: generator is on {generator.device} but images are on {images.device}; "
                             "make the generator on the images' device")
        with torch.no_grad():
            return self._apply(images, generator).clamp_(0.0, 1.0)

    def _apply(self, x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def size_need(self) -> Tuple[int, str]:
        """(smallest image side accepted, why): a kernel's reflect padding must be smaller than the image."""
        return 1, ""

    @property
    def label(self) -> str:
        return self.name


# ----------------------------------------------------------------------------------------------- noise
@REGISTRY.register("gaussian_noise")
@dataclass(frozen=True)
class GaussianNoise(Distortion):
    """Additive white Gaussian noise, y = x + n, n ~ N(0, (sigma/255)^2); sigma on the 0-255 scale."""

    sigma: Param = 15.0
    clip: bool = True
    name: str = field(default="gaussian_noise", init=False)

    def __post_init__(self) -> None:
        _check_param("gaussian_noise.sigma", self.sigma, 0, 255)
        _check_flag("gaussian_noise", "clip", self.clip)

    def _apply(self, x, g):
        s = draw(self.sigma, x.shape[0], g, x.device).view(-1, 1, 1, 1) / 255.0
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return x + s * noise

    @property
    def label(self) -> str:
        return f"noise σ={_fmt(self.sigma)}"


def _peaks(h: int, w: int, device) -> torch.Tensor:
    """MATLAB's peaks surface on [-3,3]^2, rescaled to [0,1]."""
    yy, xx = torch.meshgrid(torch.linspace(-3, 3, h, device=device), torch.linspace(-3, 3, w, device=device),
                            indexing="ij")
    z = (3 * (1 - xx) ** 2 * torch.exp(-(xx**2) - (yy + 1) ** 2)
         - 10 * (xx / 5 - xx**3 - yy**5) * torch.exp(-(xx**2) - yy**2)
         - 1 / 3 * torch.exp(-((xx + 1) ** 2) - yy**2))
    return (z - z.min()) / (z.max() - z.min())


@REGISTRY.register("spatial_noise")
@dataclass(frozen=True)
class SpatialNoise(Distortion):
    """Spatially variant Gaussian noise with a sigma map (Path-Restore): ``linear`` ramps from sigma_min
    (left) to sigma_max (right); ``peaks`` follows MATLAB's peaks surface scaled to [sigma_min, sigma_max]."""

    sigma_map: str = "linear"
    sigma_min: float = 0.0
    sigma_max: float = 50.0
    name: str = field(default="spatial_noise", init=False)

    def __post_init__(self) -> None:
        check_choice("spatial_noise", "sigma_map", self.sigma_map, ("linear", "peaks"))
        _check_param("spatial_noise.sigma_min", self.sigma_min, 0, 255)
        _check_param("spatial_noise.sigma_max", self.sigma_max, 0, 255)

    def sigma(self, h: int, w: int, device=None) -> torch.Tensor:
        """The (H, W) sigma map on the 0-255 scale."""
        check_number("spatial_noise.sigma", "h", h, lo=1, integer=True)
        check_number("spatial_noise.sigma", "w", w, lo=1, integer=True)
        if self.sigma_map == "linear":
            base = torch.linspace(0, 1, w, device=device).expand(h, w)
        else:
            base = _peaks(h, w, device)
        return self.sigma_min + (self.sigma_max - self.sigma_min) * base

    def _apply(self, x, g):
        s = self.sigma(x.shape[-2], x.shape[-1], x.device).to(x.dtype) / 255.0
        return x + s * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    @property
    def label(self) -> str:
        return f"{self.sigma_map} noise σ={self.sigma_min:g}-{self.sigma_max:g}"


# ------------------------------------------------------------------------------------------------ blur
def gaussian_kernels(sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Batched anisotropic Gaussian kernels (n, size, size), k(u) ∝ exp(-u^T Σ^-1 u / 2),
    Σ = R(θ) diag(σx², σy²) R(θ)^T, normalised to sum 1."""
    check_number("gaussian_kernels", "size", size, lo=1, integer=True)
    r = (size - 1) / 2
    ax = torch.arange(size, device=sigma_x.device, dtype=torch.float32) - r
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    sx = sigma_x.clamp_min(1e-3).view(-1, 1, 1)
    sy = sigma_y.clamp_min(1e-3).view(-1, 1, 1)
    k = torch.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return k / k.sum(dim=(-1, -2), keepdim=True)


def filter_batch(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel (kornia.filters.filter2d, reflect borders)."""
    check_images(x, "filter_batch input", channels=None, check_range=False)
    if not isinstance(kernels, torch.Tensor) or kernels.dim() != 3 or kernels.shape[-1] != kernels.shape[-2] \
            or kernels.shape[0] not in (1, x.shape[0]):
        got = tuple(kernels.shape) if isinstance(kernels, torch.Tensor) else type(kernels).__name__
        raise ValueError(f"filter_batch: kernels: expected shape (N, k, k) or (1, k, k) for N={x.shape[0]} images, "
                         f"got {got}")
    check_size(x, "filter_batch input", *_kernel_need(kernels.shape[-1]))
    return kornia.filters.filter2d(x, kernels.to(x.dtype), border_type="reflect")


@REGISTRY.register("gaussian_blur")
@dataclass(frozen=True)
class GaussianBlur(Distortion):
    """Gaussian blur y = k * x with a 21x21 kernel; isotropic (sigma) or anisotropic (sigma_y, theta)."""

    sigma: Param = 2.0
    sigma_y: Optional[Param] = None
    theta: Param = 0.0
    kernel_size: int = 21
    name: str = field(default="gaussian_blur", init=False)

    def __post_init__(self) -> None:
        _check_param("gaussian_blur.sigma", self.sigma, 0.0, 50)
        if self.sigma_y is not None:
            _check_param("gaussian_blur.sigma_y", self.sigma_y, 0.0, 50)
        _check_param("gaussian_blur.theta", self.theta, -2 * math.pi, 2 * math.pi)
        _check_odd("gaussian_blur", "kernel_size", self.kernel_size, 3)

    def size_need(self) -> Tuple[int, str]:
        need, why = _kernel_need(self.kernel_size)
        return need, why + "; use a smaller kernel_size for smaller images"

    def kernels(self, n: int, g: Optional[torch.Generator], device) -> torch.Tensor:
        sx = draw(self.sigma, n, g, device)
        sy = sx if self.sigma_y is None else draw(self.sigma_y, n, g, device)
        th = draw(self.theta, n, g, device)
        return gaussian_kernels(sx, sy, th, self.kernel_size)

    def _apply(self, x, g):
        return filter_batch(x, self.kernels(x.shape[0], g, x.device))

    @property
    def label(self) -> str:
        if self.sigma_y is None:
            return f"blur σ={_fmt(self.sigma)}"
        return f"blur σ=({_fmt(self.sigma)},{_fmt(self.sigma_y)}) θ={_fmt(self.theta)}"


# ------------------------------------------------------------------------------------------------ jpeg
@REGISTRY.register("jpeg")
@dataclass(frozen=True)
class JPEG(Distortion):
    """JPEG compression with the real codec (Pillow), quality in [1, 95]; per image on the CPU."""

    quality: Param = 30
    name: str = field(default="jpeg", init=False)

    def __post_init__(self) -> None:
        _check_param("jpeg.quality", self.quality, 1, 100)

    def _apply(self, x, g):
        q = draw(self.quality, x.shape[0], g, x.device).round().int().tolist()
        arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for img, qi in zip(arr, q):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=int(qi))
            buf.seek(0)
            out.append(np.asarray(Image.open(buf).convert("RGB")))
        y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0
        return y

    @property
    def label(self) -> str:
        return f"JPEG q={_fmt(self.quality)}"


# ------------------------------------------------------------------------------------------ downsample
@REGISTRY.register("downsample")
@dataclass(frozen=True)
class Downsample(Distortion):
    """Downscale by ``scale`` (bicubic/bilinear, antialiased) and, with keep_size, upscale back to the input
    size with the same kernel (the pre-upsampled setting of restoration-as-SR)."""

    scale: Param = 2.0
    mode: str = "bicubic"
    antialias: bool = True
    keep_size: bool = True
    name: str = field(default="downsample", init=False)

    def __post_init__(self) -> None:
        _check_param("downsample.scale", self.scale, 1.0, 16.0)
        check_choice("downsample", "mode", self.mode, ("bicubic", "bilinear"))
        _check_flag("downsample", "antialias", self.antialias)
        _check_flag("downsample", "keep_size", self.keep_size)
        if isinstance(self.scale, (tuple, list)) and not self.keep_size:
            raise ValueError("downsample.keep_size: a per-sample scale range needs keep_size=True (sizes would "
                             f"differ), got keep_size=False with scale={self.scale!r}")

    def _one(self, x: torch.Tensor, s: float) -> torch.Tensor:
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(max(1, round(h / s)), max(1, round(w / s))), mode=self.mode,
                              antialias=self.antialias, align_corners=False)
        if not self.keep_size:
            return small
        return F.interpolate(small, size=(h, w), mode=self.mode, align_corners=False)

    def _apply(self, x, g):
        s = draw(self.scale, x.shape[0], g, x.device)
        if not isinstance(self.scale, (tuple, list)):
            return self._one(x, float(s[0]))
        if not self.keep_size:
            raise ValueError("downsample: a per-sample scale range needs keep_size=True (sizes would differ)")
        return torch.cat([self._one(x[i:i + 1], float(si)) for i, si in enumerate(s.tolist())])

    @property
    def label(self) -> str:
        return f"down ×{_fmt(self.scale)}"


# ------------------------------------------------------------------------------------------------ rain
def line_kernels(length: torch.Tensor, angle_deg: torch.Tensor, size: int) -> torch.Tensor:
    """Batched motion-line kernels (n, size, size): a soft line of the given length through the centre."""
    check_number("line_kernels", "size", size, lo=1, integer=True)
    r = (size - 1) / 2
    ax = torch.arange(size, device=length.device, dtype=torch.float32) - r
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    a = torch.deg2rad(angle_deg).view(-1, 1, 1)
    along = xx * torch.sin(a) + yy * torch.cos(a)
    across = xx * torch.cos(a) - yy * torch.sin(a)
    half = (length / 2).view(-1, 1, 1)
    k = torch.exp(-(across**2) / (2 * 0.5**2)) * (along.abs() <= half).float()
    return k / k.sum(dim=(-1, -2), keepdim=True).clamp_min(1e-8)


def smeared_drops(density: Param, length: Param, angle: Param, min_brightness: float, kernel_size: int, n: int,
                  h: int, w: int, g: Optional[torch.Generator], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse drops (Bernoulli ``density``, brightness in [min_brightness, 1]) smeared by per-sample line kernels of
    ``length`` px at ``angle`` degrees; returns the (n,1,h,w) layer and the lengths shaped (n,1,1,1)."""
    dens = draw(density, n, g, device).view(-1, 1, 1, 1)
    drops = (torch.rand((n, 1, h, w), generator=g, device=device) < dens).float()
    drops = drops * (min_brightness + (1 - min_brightness) * torch.rand((n, 1, h, w), generator=g, device=device))
    lengths = draw(length, n, g, device)
    k = line_kernels(lengths, draw(angle, n, g, device), kernel_size)
    return filter_batch(drops, k), lengths.view(-1, 1, 1, 1)


def screen_blend(x: torch.Tensor, layer: torch.Tensor, intensity: Param, g: Optional[torch.Generator]) -> torch.Tensor:
    """Screen blending of a bright layer: y = 1 - (1 - x)(1 - a s), a drawn per sample from ``intensity``."""
    a = draw(intensity, x.shape[0], g, x.device).view(-1, 1, 1, 1).to(x.dtype)
    return 1 - (1 - x) * (1 - a * layer.to(x.dtype))


def _nhw(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.shape[0], x.shape[-2], x.shape[-1]


@REGISTRY.register("rain")
@dataclass(frozen=True)
class Rain(Distortion):
    """Synthetic rain streaks: sparse drops (Bernoulli ``density``) smeared by a line kernel of ``length`` px at
    ``angle`` degrees from vertical; added with screen blending y = 1 - (1 - x)(1 - a * s)."""

    density: Param = 0.02
    length: Param = 15.0
    angle: Param = 10.0
    intensity: Param = 0.8
    name: str = field(default="rain", init=False)

    def __post_init__(self) -> None:
        _check_param("rain.density", self.density, 0, 1)
        _check_param("rain.length", self.length, 1, 41)
        _check_param("rain.angle", self.angle, -90, 90)
        _check_param("rain.intensity", self.intensity, 0, 1)

    def size_need(self) -> Tuple[int, str]:
        return _kernel_need(41)  # the streaks' line kernel

    def streaks(self, n: int, h: int, w: int, g: Optional[torch.Generator], device) -> torch.Tensor:
        """The streak layer s in [0,1], shape (n,1,h,w)."""
        s, length = smeared_drops(self.density, self.length, self.angle, 0.5, 41, n, h, w, g, device)
        return (s * length / 3.0).clamp(0, 1)

    def _apply(self, x, g):
        return screen_blend(x, self.streaks(*_nhw(x), g, x.device), self.intensity, g)

    @property
    def label(self) -> str:
        return f"rain ρ={_fmt(self.density)}"


@REGISTRY.register("snow")
@dataclass(frozen=True)
class Snow(Distortion):
    """Snow-like streaks built from the zoo's rain machinery (ours, not a physical snow model): sparse flakes smeared by
    a *short* line kernel (``length`` px) at a *widely varied* ``angle``, widened by a ``size`` x ``size`` max
    filter, and screen-blended *bright*: y = 1 - (1 - x)(1 - a s)."""

    density: Param = (0.002, 0.006)
    length: Param = (1.0, 5.0)
    angle: Param = (-60.0, 60.0)
    intensity: Param = (0.8, 1.0)
    size: int = 3
    name: str = field(default="snow", init=False)

    def __post_init__(self) -> None:
        for n, p, lo, hi in (("density", self.density, 0, 1), ("length", self.length, 1, 9),
                             ("angle", self.angle, -90, 90), ("intensity", self.intensity, 0, 1)):
            _check_param(f"snow.{n}", p, lo, hi)
        _check_odd("snow", "size", self.size, 1)

    def size_need(self) -> Tuple[int, str]:
        return _kernel_need(9)  # the flakes' line kernel

    def flakes(self, n: int, h: int, w: int, g: Optional[torch.Generator], device) -> torch.Tensor:
        """The flake layer s in [0,1], shape (n,1,h,w)."""
        s, length = smeared_drops(self.density, self.length, self.angle, 0.7, 9, n, h, w, g, device)
        s = s * length  # undo the kernel's normalisation: peak ~ 1
        if self.size > 1:
            s = F.max_pool2d(s, self.size, stride=1, padding=self.size // 2)
        return s.clamp(0, 1)

    def _apply(self, x, g):
        return screen_blend(x, self.flakes(*_nhw(x), g, x.device), self.intensity, g)

    @property
    def label(self) -> str:
        return f"snow ρ={_fmt(self.density)}"


# ------------------------------------------------------------------------------------------------ haze
@REGISTRY.register("haze")
@dataclass(frozen=True)
class Haze(Distortion):
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), with a synthetic smooth depth map d in [0,1]
    (a vertical ramp, far at the top, plus low-frequency random relief)."""

    beta: Param = 1.5
    airlight: Param = 0.9
    name: str = field(default="haze", init=False)

    def __post_init__(self) -> None:
        _check_param("haze.beta", self.beta, 0, 10)
        _check_param("haze.airlight", self.airlight, 0, 1)

    def depth(self, n: int, h: int, w: int, g: Optional[torch.Generator], device) -> torch.Tensor:
        ramp = torch.linspace(1, 0, h, device=device).view(1, 1, h, 1).expand(n, 1, h, w)
        relief = torch.rand((n, 1, 4, 4), generator=g, device=device)
        relief = F.interpolate(relief, size=(h, w), mode="bicubic", align_corners=False)
        return (0.7 * ramp + 0.3 * relief).clamp(0, 1)

    def _apply(self, x, g):
        n, _, h, w = x.shape
        beta = draw(self.beta, n, g, x.device).view(-1, 1, 1, 1)
        a = draw(self.airlight, n, g, x.device).view(-1, 1, 1, 1)
        t = torch.exp(-beta * self.depth(n, h, w, g, x.device)).to(x.dtype)
        return x * t + a.to(x.dtype) * (1 - t)

    @property
    def label(self) -> str:
        return f"haze β={_fmt(self.beta)}"


# ---------------------------------------------------------------------------------------------- compose
@dataclass(frozen=True)
class Compose(Distortion):
    """Apply distortions in order (e.g. blur -> noise -> JPEG)."""

    parts: Tuple[Distortion, ...] = ()
    name: str = field(default="compose", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.parts, (tuple, list)) or not self.parts:
            raise ValueError(f"compose.parts: expected a non-empty sequence of distortions, got {self.parts!r}")
        for i, p in enumerate(self.parts):
            if not isinstance(p, Distortion):
                raise TypeError(f"compose.parts[{i}]: expected a Distortion, got {type(p).__name__}")

    def size_need(self) -> Tuple[int, str]:
        return max((p.size_need() for p in self.parts), key=lambda t: t[0])

    def _apply(self, x, g):
        for p in self.parts:
            x = p._apply(x, g).clamp(0, 1)
        return x

    @property
    def label(self) -> str:
        return " → ".join(p.label for p in self.parts)


@dataclass(frozen=True)
class Identity(Distortion):
    """No distortion (clean input)."""

    name: str = field(default="identity", init=False)

    def _apply(self, x, g):
        return x.clone()

    @property
    def label(self) -> str:
        return "clean"


REGISTRY.register("identity")(Identity)


def compose(parts: Sequence[Distortion]) -> Compose:
    """Chain distortions: compose([blur, noise, jpeg])."""
    return Compose(tuple(parts))


REGISTRY.register("compose")(lambda parts: compose(parts))


def build(name: str, **params) -> Distortion:
    """Make a distortion by name, e.g. ``build('gaussian_noise', sigma=(5, 20))``."""
    try:
        return REGISTRY.build(name, **params)
    except TypeError as e:
        raise TypeError(f"bad parameters for distortion {name!r}: {e}") from None


def names() -> list[str]:
    """Registered distortion names."""
    return REGISTRY.names()


# ------------------------------------------------------------------------------------- distortion sets
def apply_random(distortions: Sequence[Distortion], images: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give every sample one distortion drawn uniformly from ``distortions``; returns (distorted, index)."""
    if not isinstance(distortions, (tuple, list)) or not distortions:
        raise ValueError(f"apply_random: distortions: expected a non-empty sequence of distortions, got {distortions!r}")
    for i, d in enumerate(distortions):
        if not isinstance(d, Distortion):
            raise TypeError(f"apply_random: distortions[{i}]: expected a Distortion, got {type(d).__name__}")
    # structure here; values (range, finiteness) are checked once per subset by each distortion's __call__
    check_images(images, "apply_random images", check_range=False)
    check_size(images, "apply_random images")
    n = images.shape[0]
    idx = torch.randint(len(distortions), (n,), generator=generator, device=images.device)
    out = torch.empty_like(images)
    for k, d in enumerate(distortions):
        sel = (idx == k).nonzero().flatten()
        if sel.numel():
            out[sel] = d(images[sel], generator)
    return out, idx


@dataclass(frozen=True)
class DistortionSet:
    """The distortions an experiment trains on (seen) and holds out (unseen)."""

    name: str
    seen: Tuple[Distortion, ...]
    unseen: Tuple[Distortion, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not self.seen:
            raise ValueError(f"DistortionSet {self.name!r}: needs at least one seen distortion")
        for field_, ds in (("seen", self.seen), ("unseen", self.unseen)):
            if not isinstance(ds, (tuple, list)):
                raise TypeError(f"DistortionSet.{field_}: expected a sequence of distortions, got {type(ds).__name__}")
            for i, d in enumerate(ds):
                if not isinstance(d, Distortion):
                    raise TypeError(f"DistortionSet.{field_}[{i}]: expected a Distortion, got {type(d).__name__}")

    def sample(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Distort each sample with a seen distortion drawn uniformly (the ERM training distribution)."""
        return apply_random(self.seen, images, generator)[0]

    def all(self) -> dict[str, Distortion]:
        """label -> distortion for every seen and unseen one (evaluation order)."""
        return {d.label: d for d in (*self.seen, *self.unseen)}

    def is_seen(self, label: str) -> bool:
        return label in {d.label for d in self.seen}


SETS: Registry[DistortionSet] = Registry("distortion set")


@SETS.register("noise-dil")
def _noise_dil() -> DistortionSet:
    return DistortionSet(
        "noise-dil",
        seen=tuple(GaussianNoise(s) for s in (5.0, 10.0, 15.0, 20.0)),
        unseen=tuple(GaussianNoise(s) for s in (30.0, 40.0, 50.0, 60.0, 70.0)),
        description="DIL denoising: train on AWGN σ∈{5,10,15,20}; test also at unseen σ∈{30,...,70}.",
    )


@SETS.register("blur-dil")
def _blur_dil() -> DistortionSet:
    return DistortionSet(
        "blur-dil",
        seen=tuple(GaussianBlur(s) for s in (1.0, 2.0, 3.0, 3.8)),
        unseen=tuple(GaussianBlur(s) for s in (4.2, 4.4, 4.6, 4.8, 5.0)),
        description="DIL deblurring: seen blur σ below 4.0; unseen σ 4.2-5.0 (the paper's columns).",
    )


@SETS.register("types-dil")
def _types_dil() -> DistortionSet:
    return DistortionSet(
        "types-dil",
        seen=(GaussianNoise((5.0, 20.0)), GaussianBlur((0.5, 3.0)), JPEG((30, 70))),
        unseen=(Rain(), Haze(), Compose((GaussianBlur(1.5), GaussianNoise(15.0), JPEG(50)))),
        description="Unseen types: train on noise, blur and JPEG; test on rain, haze and a hybrid pipeline.",
    )


def distortion_set(name: str) -> DistortionSet:
    """A registered experiment split by name (``noise-dil``, ``blur-dil``, ``types-dil``)."""
    return SETS.build(name)


# ------------------------------------------------------------------------------ one knob per distortion
# The parameter a "degree" slider moves for each type, with its range and a sensible default.
DEGREES: dict[str, tuple[str, float, float, float]] = {
    "gaussian_noise": ("sigma", 0.0, 75.0, 25.0),
    "gaussian_blur": ("sigma", 0.2, 5.0, 2.0),
    "jpeg": ("quality", 5.0, 95.0, 30.0),
    "downsample": ("scale", 1.0, 4.0, 2.0),
    "rain": ("density", 0.0, 0.08, 0.03),
    "haze": ("beta", 0.0, 3.0, 1.5),
    "snow": ("density", 0.0, 0.02, 0.004),
    "spatial_noise": ("sigma_max", 0.0, 75.0, 50.0),
}


def with_degree(name: str, degree: float, **params) -> Distortion:
    """The distortion ``name`` with its main knob (see ``DEGREES``) set to ``degree``."""
    if not isinstance(name, str) or name not in DEGREES:
        raise KeyError(f"no degree knob for {name!r}; valid names: {', '.join(DEGREES)}")
    knob, lo, hi, _ = DEGREES[name]
    check_number(name, f"degree ({knob})", degree, lo=lo, hi=hi)
    return build(name, **{knob: degree}, **params)


def preview(image: torch.Tensor, name: str, degree: float, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Distort one (3,H,W) image at a degree and score it: returns (distorted, PSNR, SSIM) against the clean image."""
    from .metrics import psnr, ssim

    check_images(image, "image", batched=False)
    check_number("preview", "seed", seed, integer=True)
    g = torch.Generator(device=image.device).manual_seed(seed)
    out = with_degree(name, degree)(image[None], g)[0]
    return out, psnr(out, image), ssim(out, image)


def degree_for_psnr(image: torch.Tensor, name: str, target_db: float, seed: int = 0,
                    iters: int = 20) -> tuple[float, torch.Tensor, float, float]:
    """The degree of distortion ``name`` (its main knob, within its ``DEGREES`` range) at which ``image`` scores
    ``target_db`` PSNR, by bisection on the monotone PSNR(degree) curve (seeded, as :func:`preview`). A target
    outside the range's PSNRs gives the nearer end. Returns (degree, distorted, PSNR, SSIM): two distortions at
    the same PSNR, side by side, show how differently the same number can look."""
    check_number("degree_for_psnr", "target_db", target_db, lo=0)
    check_number("degree_for_psnr", "iters", iters, lo=1, integer=True)
    if not isinstance(name, str) or name not in DEGREES:
        raise KeyError(f"unknown distortion {name!r} for degree_for_psnr; valid names: {', '.join(DEGREES)}")
    from .metrics import psnr

    check_images(image, "image", batched=False)
    _, lo, hi, _ = DEGREES[name]

    def p_at(degree: float) -> float:  # PSNR only (SSIM, the slow part of preview, once at the end)
        g = torch.Generator(device=image.device).manual_seed(seed)
        return psnr(with_degree(name, degree)(image[None], g)[0], image)

    p_lo, p_hi = p_at(lo), p_at(hi)
    rising = p_hi > p_lo  # e.g. JPEG quality: more is better
    a, b = lo, hi
    for _ in range(iters):
        mid = (a + b) / 2
        if (p_at(mid) < target_db) == rising:
            a = mid
        else:
            b = mid
    deg = (a + b) / 2
    out, p, s = preview(image, name, deg, seed)
    return deg, out, p, s
