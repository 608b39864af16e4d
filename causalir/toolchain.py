"""RL-Restore (Yu et al., CVPR'18): mixed distortions, a toolbox of 12 small CNNs and a Gymnasium environment
in which an agent crafts a toolchain (at most 3 tools, or STOP) for one 63x63 patch.

* Distortions (reference ``generate_train.m``): Gaussian blur -> Gaussian noise -> JPEG, each on a 10-interval grid.
  A level triple (k, m, n) in 1..10 belongs to mild / moderate / severe when k+m+n-2 lies in [9,11] / [12,17] /
  [18,20]; a triple is drawn uniformly among the admissible ones, then each value uniformly inside its interval.
* Tools: deblur / denoise / de-JPEG in 4 bands each; bands 1-2 are the small 3-layer CNN (21,827 params), bands 3-4
  the larger 8-conv residual CNN (50,851 params); every tool predicts a global residual, y = x + f(x).
* Environment: observation = current image + one-hot of the previous tool, actions = 12 tools + STOP, reward
  r_t = PSNR(x_t, gt) - PSNR(x_{t-1}, gt) (dB), at most 3 steps. Registered as ``causalir/Toolchain-v0``.

The agent and deep Q-learning live in :mod:`causalir.rl` (which imports this module, never the reverse); the
``rl-restore`` experiment lives in :mod:`causalir.experiments.rl_restore`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from . import distortions as dz
from .data import PatchSampler
from .utils import check_choice, check_images, check_number, make_generator

# ------------------------------------------------------------------------------------------- distortions
BLUR_GRID = tuple(0.5 * i for i in range(11))                 # sigma_b, 0:0.5:5
NOISE_GRID = tuple(5.0 * i for i in range(11))                # sigma_n on the 0-255 scale, 0:5:50
JPEG_GRID = (100, 80, 60, 50, 40, 35, 30, 25, 20, 15, 10)     # quality, decreasing with the level
SEVERITIES: Dict[str, Tuple[int, int]] = {"mild": (9, 11), "moderate": (12, 17), "severe": (18, 20)}
PATCH = 63
BLUR_MARGIN = 10   # half of the 21x21 kernel: patches are distorted with context, then cropped


#: the blur's reflect border needs images wider than half its 21x21 kernel
MIN_BLUR_SIDE = BLUR_MARGIN + 1


def check_severity(severity: str) -> str:
    if not isinstance(severity, str) or severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; valid: {', '.join(SEVERITIES)}")
    return severity


# ------------------------------------------------------------------------------------------ input checks
def check_batch(x: Any, name: str, *, min_side: int = 1, nonempty: bool = False, check_range: bool = True,
                channels: Optional[int] = 3, why: str = "") -> torch.Tensor:
    """:func:`causalir.utils.check_images` plus sizes: a non-empty batch (``nonempty``) of images at least
    ``min_side`` pixels on each side (``why`` says what needs them). Range and finiteness when ``check_range``."""
    check_images(x, name, channels=channels, check_range=check_range)
    if nonempty and x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if min(h, w) < min_side:
        raise ValueError(f"{name}: expected images of at least {min_side}x{min_side} pixels{why}, got {h}x{w} "
                         f"(shape {tuple(x.shape)})")
    return x


def check_pair(x: torch.Tensor, y: torch.Tensor, xname: str, yname: str) -> None:
    """Two batches of the same shape, or a ValueError naming both."""
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"{xname} {tuple(x.shape)} and {yname} {tuple(y.shape)}: expected the same shape")


def check_per_sample(name: str, v: Any, n: int, *, lo: Optional[float] = None, hi: Optional[float] = None,
                     allow_one: bool = False) -> torch.Tensor:
    """A real tensor of ``n`` per-sample values (or one, ``allow_one``), finite and in [lo, hi]."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of {n} per-sample values, got {type(v).__name__}")
    if v.dtype == torch.bool or v.is_complex():
        raise TypeError(f"{name}: expected real values, got dtype {v.dtype}")
    if v.numel() != n and not (allow_one and v.numel() == 1):
        raise ValueError(f"{name}: expected {n} per-sample values{' (or one)' if allow_one else ''}, got shape "
                         f"{tuple(v.shape)}")
    if v.numel():
        d = v.detach().double()
        a, b = float(d.min()), float(d.max())
        bad = not np.isfinite(a + b) or (lo is not None and a < lo) or (hi is not None and b > hi)
        if bad:
            rng = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
            raise ValueError(f"{name}: expected finite values in {rng}, got range [{a:.4g}, {b:.4g}]")
    return v


def check_image_list(images: Any, name: str, side: int, why: str = "") -> None:
    """A non-empty sequence of (3,H,W) images, each at least ``side`` pixels on each side."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"{name}: expected a non-empty sequence of (3,H,W) images, got {type(images).__name__}"
                         + (" of length 0" if isinstance(images, Sequence) else ""))
    for i, im in enumerate(images):
        check_images(im, f"{name}[{i}]", batched=False, check_range=False)
        h, w = im.shape[-2:]
        if min(h, w) < side:
            raise ValueError(f"{name}[{i}]: expected at least {side}x{side} pixels{why}, got {h}x{w}")


def level_triples(severity: str) -> torch.Tensor:
    """All admissible (k, m, n) in 1..10 with k+m+n-2 in the severity's range, shape (T, 3)."""
    lo, hi = SEVERITIES[check_severity(severity)]
    r = torch.arange(1, 11)
    k, m, n = torch.meshgrid(r, r, r, indexing="ij")
    s = k + m + n - 2
    keep = (s >= lo) & (s <= hi)
    return torch.stack([k[keep], m[keep], n[keep]], 1)


def sample_mixed_params(n: int, severity: str, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Per-sample (sigma_b, sigma_n, quality): a uniform admissible level triple, then uniform within the intervals."""
    check_number("sample_mixed_params", "n", n, lo=0, integer=True)
    tri = level_triples(severity)
    rows = tri[torch.randint(len(tri), (n,), generator=generator)]
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    bg, ng, jg = (torch.tensor(g, dtype=torch.float64) for g in (BLUR_GRID, NOISE_GRID, JPEG_GRID))
    k, m, q = rows[:, 0], rows[:, 1], rows[:, 2]
    sb = bg[k - 1] + u[:, 0] * (bg[k] - bg[k - 1])
    sn = ng[m - 1] + u[:, 1] * (ng[m] - ng[m - 1])
    jq = jg[q - 1] + u[:, 2] * (jg[q] - jg[q - 1])
    return {"blur": sb.float(), "noise": sn.float(), "quality": jq.float(), "levels": rows}


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample isotropic Gaussian blur, 21x21 kernel (the zoo's ``gaussian_kernels`` / ``filter_batch``)."""
    check_batch(x, "blur images", nonempty=True, min_side=MIN_BLUR_SIDE, why=" (the 21x21 blur kernel's reflect border)")
    check_per_sample("blur sigma", sigma, x.shape[0], lo=0.0, allow_one=True)
    s = sigma.to(x.device, torch.float32)
    k = dz.gaussian_kernels(s, s, torch.zeros_like(s), 21)
    return dz.filter_batch(x, k)


def add_noise(x: torch.Tensor, sigma: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """y = clip(x + sigma/255 * n), n ~ N(0, 1) (as the zoo's GaussianNoise, with a per-sample sigma)."""
    check_batch(x, "add_noise images", nonempty=True)
    check_per_sample("add_noise sigma", sigma, x.shape[0], lo=0.0, allow_one=True)
    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + sigma.to(x.device, x.dtype).view(-1, 1, 1, 1) / 255.0 * n).clamp(0, 1)


def jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Real JPEG (the zoo's Pillow codec) with a per-sample quality; samples with equal rounded quality share a call."""
    check_batch(x, "jpeg images", nonempty=True)
    check_per_sample("jpeg quality", quality, x.shape[0], lo=1.0, hi=100.0)
    q = quality.round().clamp(1, 100).int()
    out = torch.empty_like(x)
    for qi in torch.unique(q).tolist():
        sel = (q == qi).nonzero().flatten()
        out[sel.to(x.device)] = dz.JPEG(float(qi))(x[sel.to(x.device)])
    return out


def apply_mixed(x: torch.Tensor, params: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None,
                order: Sequence[str] = ("blur", "noise", "quality")) -> torch.Tensor:
    """Blur, then noise, then JPEG (reference order), each with the sample's own parameter."""
    parts = ("blur", "noise", "quality")
    if isinstance(order, str):
        raise ValueError(f"apply_mixed order: expected a sequence of parts from {', '.join(parts)}, got {order!r}")
    for part in order:
        if part not in parts:
            raise ValueError(f"unknown distortion part {part!r}; valid: blur, noise, quality")
    side = MIN_BLUR_SIDE if "blur" in order else 1
    check_batch(x, "apply_mixed input", nonempty=True, min_side=side, why=" (the 21x21 blur kernel's reflect border)")
    if not isinstance(params, Mapping):
        raise TypeError(f"apply_mixed params: expected a dict of per-sample tensors, got {type(params).__name__}")
    missing = [p for p in order if p not in params]
    if missing:
        raise ValueError(f"apply_mixed params: missing {', '.join(missing)} (has {', '.join(map(str, params))})")
    with torch.no_grad():
        for part in order:
            if part == "blur":
                x = blur(x, params["blur"]).clamp(0, 1)
            elif part == "noise":
                x = add_noise(x, params["noise"], generator)
            elif part == "quality":
                x = jpeg(x, params["quality"])
            else:
                raise ValueError(f"unknown distortion part {part!r}; valid: blur, noise, quality")
    return x


@dataclass(frozen=True)
class MixedDistortion(dz.Distortion):
    """RL-Restore's mixed distortion at a severity (mild / moderate / severe); usable wherever a zoo distortion is."""

    severity: str = "moderate"
    name: str = field(default="mixed", init=False)

    def __post_init__(self) -> None:
        check_severity(self.severity)

    def _apply(self, x, g):
        gcpu = None
        if g is not None:
            gcpu = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g, device=g.device)))
        return apply_mixed(x, sample_mixed_params(x.shape[0], self.severity, gcpu), g)

    @property
    def label(self) -> str:
        return f"mixed {self.severity}"


def make_patches(images: Sequence[torch.Tensor], n: int, severity: str, seed: int, patch: int = PATCH,
                 device: str | torch.device = "cpu", crop_seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clean, distorted) float patches (n,3,p,p): crops of size p + 2*margin are distorted, then centre-cropped,
    so blur sees real image context instead of a padded border. ``crop_seed`` (default ``seed``) fixes the crops,
    so several severities can share the same clean patches."""
    check_number("make_patches", "n", n, lo=1, integer=True)
    check_number("make_patches", "patch", patch, lo=1, integer=True)
    check_number("make_patches", "seed", seed, integer=True)
    check_number("make_patches", "crop_seed", crop_seed, integer=True, allow_none=True)
    check_severity(severity)
    check_image_list(images, "make_patches images", patch + 2 * BLUR_MARGIN,
                     f" (the {patch}x{patch} patch plus its {BLUR_MARGIN}-pixel blur context on each side)")
    g = make_generator(seed)
    gc = make_generator(seed if crop_seed is None else crop_seed)
    big = PatchSampler(images, patch + 2 * BLUR_MARGIN, n, "cpu").sample(gc)
    dist = apply_mixed(big, sample_mixed_params(n, severity, g), g)
    c = slice(BLUR_MARGIN, BLUR_MARGIN + patch)
    return big[..., c, c].contiguous().to(device), dist[..., c, c].contiguous().to(device)


# ----------------------------------------------------------------------------------------------- tools
@dataclass(frozen=True)
class ToolSpec:
    """One tool: the distortion it removes, its band (a parameter range) and its architecture."""

    index: int
    kind: str                       # deblur | denoise | dejpeg
    band: Tuple[float, float]       # sigma_b, sigma_n (0-255) or JPEG quality range
    arch: str                       # small | large

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index % 4 + 1}"


TOOL_SPECS: Tuple[ToolSpec, ...] = tuple(
    ToolSpec(4 * t + b, kind, band, "small" if b < 2 else "large")
    for t, (kind, bands) in enumerate((
        ("deblur", ((0.0, 1.25), (1.25, 2.5), (2.5, 3.75), (3.75, 5.0))),
        ("denoise", ((0.0, 12.5), (12.5, 25.0), (25.0, 37.5), (37.5, 50.0))),
        ("dejpeg", ((60.0, 100.0), (35.0, 60.0), (20.0, 35.0), (10.0, 20.0))),
    )) for b, band in enumerate(bands))
N_TOOLS = len(TOOL_SPECS)
STOP = N_TOOLS                       # action 12
N_ACTIONS = N_TOOLS + 1
ACTION_NAMES = tuple(s.name for s in TOOL_SPECS) + ("STOP",)


#: tool activations: the reference's ReLU, or LeakyReLU(0.1) (ours), which cannot die: with ReLU every
#: second-layer unit of a third of the medium tools died in training and the tool became x + a constant
ACTIVATIONS = ("relu", "leaky")


def _act(kind: str, inplace: bool = True) -> nn.Module:
    return nn.ReLU(inplace=inplace) if kind == "relu" else nn.LeakyReLU(0.1, inplace=inplace)


class SmallTool(nn.Module):
    """conv 9x9 3->c1, ReLU, conv 5x5 c1->c2, ReLU, conv 5x5 c2->3; y = x + f(x). Reference widths (32, 16)."""

    def __init__(self, c1: int = 32, c2: int = 16, act: str = "relu") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, c1, 9, padding=4), _act(act),
                                  nn.Conv2d(c1, c2, 5, padding=2), _act(act),
                                  nn.Conv2d(c2, 3, 5, padding=2))
        self.body[-1].weight.data.mul_(0.1)
        self.body[-1].bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LargeTool(nn.Module):
    """8 convs: 5x5 3->c1, ReLU, 1x1 c1->c2 (= s), two units t <- s + conv3(ReLU(conv3(ReLU(t)))), 1x1 c2->c1,
    ReLU, 5x5 c1->3; y = x + f(x). Reference widths (64, 32)."""

    def __init__(self, c1: int = 64, c2: int = 32, units: int = 2, act: str = "relu") -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, c1, 5, padding=2), _act(act), nn.Conv2d(c1, c2, 1))
        self.units = nn.ModuleList(nn.Sequential(_act(act, False), nn.Conv2d(c2, c2, 3, padding=1), _act(act),
                                                 nn.Conv2d(c2, c2, 3, padding=1)) for _ in range(units))
        self.tail = nn.Sequential(nn.Conv2d(c2, c1, 1), _act(act), nn.Conv2d(c1, 3, 5, padding=2))
        self.tail[-1].weight.data.mul_(0.1)
        self.tail[-1].bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.head(x)
        t = s
        for u in self.units:
            t = s + u(t)
        return x + self.tail(t)


@dataclass(frozen=True)
class ToolboxConfig:
    """Tool widths: the reference is small=(32,16), large=(64,32); ``tiny`` widths make CI fast."""

    small: Tuple[int, int] = (32, 16)
    large: Tuple[int, int] = (64, 32)
    act: str = "relu"

    def __post_init__(self) -> None:
        for k in ("small", "large"):
            check_widths("ToolboxConfig", k, getattr(self, k), 2)
        check_choice("ToolboxConfig", "act", self.act, ACTIVATIONS)


def check_widths(owner: str, name: str, value: Any, n: int) -> None:
    """A tuple of ``n`` integer widths >= 1; each element is checked as ``owner.name[i]``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"{owner}.{name}: expected {n} integer widths >= 1, got {value!r}")
    for i, v in enumerate(value):
        check_number(owner, f"{name}[{i}]", v, lo=1, integer=True)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8 bits, as a saved image would be."""
    return (x.clamp(0, 1) * 255).round() / 255


class Toolbox(nn.Module):
    """The 12 tools. ``apply(actions, x)`` runs each sample's tool (action 12 = STOP = identity), batched per tool,
    and returns images clipped to [0, 1]."""

    def __init__(self, cfg: ToolboxConfig = ToolboxConfig()) -> None:
        super().__init__()
        if not isinstance(cfg, ToolboxConfig):
            raise TypeError(f"Toolbox cfg: expected a ToolboxConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tools = nn.ModuleList(SmallTool(*cfg.small, act=cfg.act) if s.arch == "small" else
                                   LargeTool(*cfg.large, act=cfg.act) for s in TOOL_SPECS)

    def forward(self, x: torch.Tensor, tool: int) -> torch.Tensor:
        check_number("Toolbox.forward", "tool", tool, lo=0, hi=N_TOOLS - 1, integer=True)
        return self.tools[tool](x)

    def apply(self, actions: torch.Tensor | int | Sequence[int], x: torch.Tensor) -> torch.Tensor:
        check_batch(x, "Toolbox.apply images")
        a = torch.as_tensor(actions, device=x.device)
        if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
            raise ValueError(f"Toolbox.apply: actions must be integers in 0..{STOP} (12 tools + STOP), got dtype "
                             f"{a.dtype}")
        a = a.long().flatten()
        if a.numel() == 1 and x.shape[0] != 1:
            a = a.expand(x.shape[0])
        if a.numel() != x.shape[0]:
            raise ValueError(f"Toolbox.apply: expected one action per image ({x.shape[0]}), got {a.numel()}")
        if a.numel() and (int(a.min()) < 0 or int(a.max()) > STOP):
            raise ValueError(f"Toolbox.apply: actions must be in 0..{STOP} (12 tools + STOP), got {a.tolist()}")
        out = x.clone()
        with torch.no_grad():
            for t in torch.unique(a).tolist():
                if t == STOP:
                    continue
                sel = (a == t).nonzero().flatten()
                out[sel] = self.tools[t](x[sel]).clamp(0, 1)
        return out

    def macs(self, patch: int = PATCH) -> List[int]:
        """Multiply-accumulates of each tool on one patch (models.count_flops / 2)."""
        check_number("Toolbox.macs", "patch", patch, lo=1, integer=True)
        from .models import count_flops

        return [count_flops(t, (1, 3, patch, patch)) // 2 for t in self.tools]

    def params(self) -> List[int]:
        return [sum(p.numel() for p in t.parameters()) for t in self.tools]


def tool_distortion(spec: ToolSpec, x: torch.Tensor, g: torch.Generator, extra: float = 0.5) -> torch.Tensor:
    """The tool's own distortion, drawn uniformly in its band; with probability ``extra`` a slight extra
    noise (sigma<=2) + JPEG (Q>=90) for robustness (the paper mentions it without magnitudes)."""
    if not isinstance(spec, ToolSpec):
        raise TypeError(f"tool_distortion spec: expected a ToolSpec (one of TOOL_SPECS), got {type(spec).__name__}")
    check_number("tool_distortion", "extra", extra, lo=0, hi=1)
    check_batch(x, "tool_distortion images", nonempty=True, min_side=MIN_BLUR_SIDE if spec.kind == "deblur" else 1,
                why=" (the 21x21 blur kernel's reflect border)")
    n = x.shape[0]
    lo, hi = spec.band
    v = lo + (hi - lo) * torch.rand(n, generator=g)
    if spec.kind == "deblur":
        y = blur(x, v).clamp(0, 1)
    elif spec.kind == "denoise":
        y = add_noise(x, v, g)
    else:
        y = jpeg(x, v)
    if extra > 0:
        sel = (torch.rand(n, generator=g) < extra).nonzero().flatten()
        if sel.numel():
            ys = add_noise(y[sel], 2.0 * torch.rand(sel.numel(), generator=g), g)
            y[sel] = jpeg(ys, 90 + 10 * torch.rand(sel.numel(), generator=g))
    return y


@dataclass(frozen=True)
class ToolTrainConfig:
    """Per-tool training: a precomputed paired set of ``n_data`` crops, MSE, Adam, cosine schedule."""

    steps: int = 100
    batch_size: int = 16
    patch_size: int = 32
    n_data: int = 512
    lr: float = 1e-3
    extra: float = 0.5
    #: clip the gradient norm (0 = off): with ReLU tools a large early step is what kills the units
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        o = "ToolTrainConfig"
        for k in ("steps", "batch_size", "patch_size", "n_data"):
            check_number(o, k, getattr(self, k), lo=1, integer=True)
        check_number(o, "lr", self.lr, lo=0, lo_open=True)
        check_number(o, "extra", self.extra, lo=0, hi=1)
        check_number(o, "grad_clip", self.grad_clip, lo=0)


def paired_set(images: Sequence[torch.Tensor], spec_or_severity, n: int, patch: int, seed: int,
               extra: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clean, distorted) training crops for a tool (a ToolSpec) or for the mixed data (a severity name)."""
    if not isinstance(spec_or_severity, ToolSpec):
        check_severity(spec_or_severity)
    check_number("paired_set", "n", n, lo=1, integer=True)
    check_number("paired_set", "patch", patch, lo=1, integer=True)
    check_number("paired_set", "seed", seed, integer=True)
    check_number("paired_set", "extra", extra, lo=0, hi=1)
    check_image_list(images, "paired_set images", patch + 2 * BLUR_MARGIN,
                     f" (the {patch}x{patch} crop plus its {BLUR_MARGIN}-pixel blur context on each side)")
    g = make_generator(seed)
    big = PatchSampler(images, patch + 2 * BLUR_MARGIN, n, "cpu").sample(g)
    if isinstance(spec_or_severity, ToolSpec):
        dist = tool_distortion(spec_or_severity, big, g, extra)
    else:
        dist = apply_mixed(big, sample_mixed_params(n, spec_or_severity, g), g)
    c = slice(BLUR_MARGIN, BLUR_MARGIN + patch)
    return big[..., c, c].contiguous(), dist[..., c, c].contiguous()


def fit_paired(model: nn.Module, clean: torch.Tensor, dist: torch.Tensor, cfg: ToolTrainConfig, seed: int,
               device: str | torch.device = "cpu"):
    """Train on a fixed paired set with :class:`causalir.train.PairedMSE` through :func:`causalir.train.fit`, the
    suite's one loop: per step ``batch_size`` random pairs, a random dihedral transform, the MSE ||f(y) - x||^2,
    Adam, cosine schedule. The strategy owns its data, so ``fit`` gets no images and no distortions."""
    from . import train

    if not isinstance(cfg, ToolTrainConfig):
        raise TypeError(f"fit_paired cfg: expected a ToolTrainConfig, got {type(cfg).__name__}")
    check_number("fit_paired", "seed", seed, integer=True)
    check_batch(clean, "fit_paired clean", nonempty=True)
    check_batch(dist, "fit_paired dist", nonempty=True)
    check_pair(clean, dist, "fit_paired clean", "fit_paired dist")

    strat = train.PairedMSE(clean, dist)
    tcfg = train.TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, patch_size=max(8, clean.shape[-1]),
                             lr=cfg.lr, loss="l2", seed=seed, device=str(device), progress=False,
                             grad_clip=cfg.grad_clip)
    return train.fit(model, strat, None, (), tcfg)


def pooled_gain(mse_in: torch.Tensor, mse_out: torch.Tensor) -> Tuple[float, float, List[float]]:
    """The PSNR gain of a set of patches taken as one image, 10 log10(sum MSE_in / sum MSE_out) (dB), its
    jackknife standard error and the n jackknife pseudo-values n g - (n-1) g_(-i) (whose mean and standard error
    are the bias-corrected gain and the jackknife SE, so the claims grammar can take them as units).

    Pooled, not a mean of per-patch PSNR gains: a patch the 8-bit distortion leaves exact (a flat sky, a blur of
    sigma ~ 0) has an input PSNR of 100 dB, and any change of one grey level there is a "gain" of -50 dB that would
    swamp every real patch."""
    a, b = mse_in.double().flatten(), mse_out.double().flatten()
    n = a.numel()
    eps = 1e-12
    g = float(10 * torch.log10((a.sum() + eps) / (b.sum() + eps)))
    if n < 2:
        return g, 0.0, [g]
    loo = 10 * torch.log10((a.sum() - a + eps) / (b.sum() - b + eps))
    pseudo = n * g - (n - 1) * loo
    se = float(((n - 1) / n * (loo - loo.mean()).pow(2).sum()).sqrt())
    return g, se, [float(v) for v in pseudo]


def tool_gains(box: "Toolbox", images: Sequence[torch.Tensor], n: int = 64, patch: int = 32,
               seed: int = 0) -> List[Dict[str, Any]]:
    """Each tool's PSNR gain on ``n`` patches of its own band (drawn from ``images``, e.g. the validation photos;
    8-bit in and out): tool(y) vs y, pooled over the patches (:func:`pooled_gain`, with its jackknife SE; the
    per-patch jackknife pseudo-values under ``per_patch``). A tool that gains nothing is dead (an identity, or
    x + a constant that the 8-bit rounding removes): its gain is exactly 0."""
    out = []
    for spec in TOOL_SPECS:
        clean, dist = paired_set(images, spec, n, patch, 7000 + seed * 100 + spec.index, extra=0.0)
        y = quantize(dist)
        with torch.no_grad():
            restored = quantize(box.apply([spec.index] * n, y))
        mse = lambda u: (u.double() - clean.double()).pow(2).flatten(1).mean(1)  # noqa: E731
        gain, se, pseudo = pooled_gain(mse(y), mse(restored))
        out.append({"tool": spec.name, "band": list(spec.band), "gain_db": round(gain, 4), "gain_se": round(se, 4),
                    "n": n, "per_patch": [round(v, 4) for v in pseudo]})
    return out


def train_toolbox(box: Toolbox, images: Sequence[torch.Tensor], cfg: ToolTrainConfig, seed: int = 0,
                  device: str | torch.device = "cpu") -> List[Dict[str, Any]]:
    """Train each of the 12 tools on its own band (independently, as in the paper). Returns per-tool records."""
    if not isinstance(box, Toolbox):
        raise TypeError(f"train_toolbox box: expected a Toolbox, got {type(box).__name__}")
    if not isinstance(cfg, ToolTrainConfig):
        raise TypeError(f"train_toolbox cfg: expected a ToolTrainConfig, got {type(cfg).__name__}")
    check_number("train_toolbox", "seed", seed, integer=True)
    check_image_list(images, "train_toolbox images", cfg.patch_size + 2 * BLUR_MARGIN,
                     f" (the {cfg.patch_size}x{cfg.patch_size} crop plus its {BLUR_MARGIN}-pixel blur context)")
    recs = []
    for spec in TOOL_SPECS:
        clean, dist = paired_set(images, spec, cfg.n_data, cfg.patch_size, seed * 1000 + spec.index, cfg.extra)
        res = fit_paired(box.tools[spec.index], clean, dist, cfg, seed * 1000 + spec.index, device)
        recs.append({"tool": spec.name, "final_loss": res.history[-1]["loss"], "wall_time": round(res.wall_time, 2)})
    box.eval()
    return recs


# --------------------------------------------------------------------------------------------- metrics
def patch_psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of images in [0,1]: 10 log10(1 / (MSE + 1e-10)) (the reference reward's PSNR)."""
    check_batch(x, "patch_psnr x", channels=None)
    check_batch(y, "patch_psnr y", channels=None)
    if x.shape != y.shape:
        raise ValueError(f"patch_psnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / (mse + 1e-10))


# ------------------------------------------------------------------------------------------ environment
ENV_ID = "causalir/Toolchain-v0"


class ToolchainEnv(gym.Env):
    """One episode = one distorted patch. Observation {"image": (3,p,p) float32 in [0,1], "prev_action":
    one-hot (12,) of the previous tool, zeros at t=0}; actions 0..11 apply a tool, 12 = STOP.
    Reward r_t = PSNR(x_t) - PSNR(x_{t-1}) against the clean patch (STOP: 0); terminated on STOP, after
    ``max_steps`` tools, or (``end_on_drop``, training only) when PSNR falls below its initial value.
    States are quantised to 8 bits after every tool (``quantize``), as saved images would be."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(self, toolbox: Optional[Toolbox] = None, clean: Optional[torch.Tensor] = None,
                 distorted: Optional[torch.Tensor] = None, max_steps: int = 3, end_on_drop: bool = False,
                 quantize_states: bool = True, render_mode: Optional[str] = None, n_default: int = 8,
                 severity: str = "moderate", seed: int = 0) -> None:
        super().__init__()
        o = "ToolchainEnv"
        check_number(o, "max_steps", max_steps, lo=1, integer=True)
        check_choice(o, "end_on_drop", end_on_drop, (False, True))
        check_choice(o, "quantize_states", quantize_states, (False, True))
        check_choice(o, "render_mode", render_mode, (None, "rgb_array"))
        check_number(o, "n_default", n_default, lo=1, integer=True)
        check_number(o, "seed", seed, integer=True)
        check_severity(severity)
        if toolbox is not None and not isinstance(toolbox, Toolbox):
            raise TypeError(f"ToolchainEnv toolbox: expected a Toolbox or None, got {type(toolbox).__name__}")
        if (clean is None) != (distorted is None):
            raise ValueError("ToolchainEnv: give both clean and distorted patches, or neither")
        if clean is None:
            from .data import embedded_images

            clean, distorted = make_patches(embedded_images("train"), n_default, severity, seed)
        check_batch(clean, "clean patches", nonempty=True)
        check_batch(distorted, "distorted patches", nonempty=True)
        if clean.shape != distorted.shape:
            raise ValueError(f"clean {tuple(clean.shape)} and distorted {tuple(distorted.shape)} must match")
        if toolbox is None:
            torch.manual_seed(seed)
            toolbox = Toolbox(ToolboxConfig(small=(8, 8), large=(8, 8))).eval()
        self.toolbox = toolbox.eval()
        self.device = next(toolbox.parameters()).device
        self.clean, self.distorted = clean.to(self.device), distorted.to(self.device)
        self.max_steps, self.end_on_drop, self.quantize_states = int(max_steps), end_on_drop, quantize_states
        self.render_mode = render_mode
        p = clean.shape[-1]
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0.0, 1.0, (3, clean.shape[-2], p), np.float32),
            "prev_action": gym.spaces.MultiBinary(N_TOOLS)})
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self._state: Optional[torch.Tensor] = None

    def _obs(self) -> Dict[str, np.ndarray]:
        prev = np.zeros(N_TOOLS, np.int8)
        if self.chain:
            prev[self.chain[-1]] = 1
        return {"image": self._state[0].cpu().numpy().astype(np.float32), "prev_action": prev}

    def _info(self) -> Dict[str, Any]:
        return {"psnr": self.psnr, "psnr_initial": self.psnr0, "index": self.index, "chain": list(self.chain),
                "tools": [ACTION_NAMES[a] for a in self.chain]}

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None):
        super().reset(seed=seed)
        n = len(self.clean)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"ToolchainEnv.reset options: expected a dict or None, got {type(options).__name__}")
        unknown = sorted(set(options or {}) - {"index"})
        if unknown:
            raise ValueError(f"ToolchainEnv.reset options: unknown key(s) {unknown}; valid: 'index'")
        idx = (options or {}).get("index")
        check_number("ToolchainEnv.reset", "options['index']", idx, integer=True, allow_none=True)
        self.index = int(self.np_random.integers(n)) if idx is None else int(idx)
        if not 0 <= self.index < n:
            raise IndexError(f"options['index'] must be in [0, {n}), got {idx}")
        x = self.distorted[self.index:self.index + 1]
        self._state = quantize(x) if self.quantize_states else x.clone()
        self._gt = quantize(self.clean[self.index:self.index + 1])   # ground truth as an 8-bit image
        self.psnr0 = self.psnr = float(patch_psnr(self._state, self._gt))
        self.chain: List[int] = []
        self._done = False
        return self._obs(), self._info()

    def step(self, action):
        if self._state is None or self._done:
            raise RuntimeError("ToolchainEnv.step: the episode is over (or never started); call reset() first")
        if isinstance(action, (bool, np.bool_)) or not self.action_space.contains(action):
            raise ValueError(f"ToolchainEnv.step: expected an action in 0..{N_ACTIONS - 1}, got {action!r}")
        a = int(action)
        if a == STOP:
            self._done = True
            return self._obs(), 0.0, True, False, {**self._info(), "stopped": True}
        y = self.toolbox.apply([a], self._state)
        self._state = quantize(y) if self.quantize_states else y
        new = float(patch_psnr(self._state, self._gt))
        reward = new - self.psnr
        self.psnr = new
        self.chain.append(a)
        self._done = len(self.chain) >= self.max_steps or (self.end_on_drop and new < self.psnr0)
        return self._obs(), float(reward), self._done, False, {**self._info(), "stopped": False}

    def render(self):
        if self._state is None:
            return None
        return (self._state[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def register_env() -> str:
    """Register the environment with Gymnasium (idempotent); returns its id."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="causalir.toolchain:ToolchainEnv")
    return ENV_ID


register_env()
