"""Restoration backbones: DnCNN, RRDB (ESRGAN trunk without upsampler, as in DIL), SRResNet x2 (MSRResNet, as in
FAIG) and a small window-attention transformer in the spirit of SwinIR. ``build(name, **cfg)`` / ``names()``;
every built model carries ``model.config`` so checkpoints can rebuild it."""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .registry import Registry
from .utils import PathLike, atomic_write_bytes, atomic_write_json, check_choice, check_number

REGISTRY: Registry[nn.Module] = Registry("model")

PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "rrdb": {"paper": dict(nf=64, nb=23, gc=32), "small": dict(nf=32, nb=2, gc=16), "tiny": dict(nf=16, nb=1, gc=8)},
    "dncnn": {"paper": dict(nf=64, depth=17), "small": dict(nf=32, depth=8), "tiny": dict(nf=16, depth=4)},
    "srresnet": {"paper": dict(nf=64, nb=16), "small": dict(nf=32, nb=6), "tiny": dict(nf=16, nb=2)},
    "swinir": {"paper": dict(dim=96, depths=(6, 6, 6, 6), heads=6, window=8),
               "small": dict(dim=32, depths=(2, 2), heads=4, window=8),
               "tiny": dict(dim=16, depths=(2,), heads=2, window=4)},
}


# ------------------------------------------------------------------------------------------------ checks
def _check_sizes(owner: str, **sizes: Any) -> None:
    """Every model size is an integer >= 1 (``depth``-like minima are checked by the caller)."""
    for field, value in sizes.items():
        check_number(owner, field, value, lo=1, integer=True)


def _check_flag(owner: str, field: str, value: Any) -> None:
    check_choice(owner, field, value, (True, False))


def check_input(x: Any, owner: str, in_ch: int, min_side: int = 1, why: str = "") -> torch.Tensor:
    """A model input: a float tensor (N, in_ch, H, W) with N >= 1 and H, W >= ``min_side`` (``why`` says what
    needs that size). Checked before any layer runs, so a bad input never fails inside torch."""
    name = f"{owner} input"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (N,{in_ch},H,W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected shape (N,{in_ch},H,W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != in_ch:
        raise ValueError(f"{name}: expected {in_ch} channels at dim 1 of (N,{in_ch},H,W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got an empty batch of shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if min(h, w) < max(min_side, 1):
        need = f"H and W >= {max(min_side, 1)}" + (f" ({why})" if why else "")
        raise ValueError(f"{name}: expected {need}, got an image of {h}x{w}")
    return x


# ------------------------------------------------------------------------------------------------- DnCNN
class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017) without batch norm: conv-ReLU, (depth-2) x conv-ReLU, conv; predicts the
    residual so that y = x - f(x) when ``residual``."""

    def __init__(self, in_ch: int = 3, nf: int = 64, depth: int = 17, residual: bool = True) -> None:
        super().__init__()
        _check_sizes("dncnn", in_ch=in_ch, nf=nf)
        check_number("dncnn", "depth", depth, lo=2, integer=True)  # head + tail convs
        _check_flag("dncnn", "residual", residual)
        self.in_ch = in_ch
        layers: list[nn.Module] = [nn.Conv2d(in_ch, nf, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(nf, nf, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(nf, in_ch, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "dncnn", self.in_ch)
        r = self.body(x)
        return x - r if self.residual else r


# -------------------------------------------------------------------------------------------------- RRDB
def _scaled_kaiming(module: nn.Module, scale: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            m.weight.data.mul_(scale)
            if m.bias is not None:
                m.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs, LeakyReLU 0.2, residual scaled by 0.2 (ESRGAN)."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, padding=1) for i in range(5)])
        self.act = nn.LeakyReLU(0.2, inplace=True)
        _scaled_kaiming(self, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(self.act(out))
        return x + 0.2 * out


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs, residual scaled by 0.2."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdbs = nn.Sequential(*[ResidualDenseBlock(nf, gc) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdbs(x)


class RRDBNet(nn.Module):
    """ESRGAN RRDBNet with the upsampler removed (DIL's backbone): conv_first, nb RRDBs, trunk conv (+skip),
    HR conv, conv_last. Like the reference, the output is the image itself (no skip from the input).

    ``skip=True`` (ours, not the paper's): y = x + f(x), a residual from the input. Without it the network starts
    with an output near 0 (a black image, -13 to -25 grey levels after a few steps of a small net), an offset
    that a MAML objective scoring only phi = theta - alpha g never trains out of theta (see notebook 02)."""

    def __init__(self, in_ch: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, skip: bool = False) -> None:
        super().__init__()
        _check_sizes("rrdb", in_ch=in_ch, nf=nf, nb=nb, gc=gc)
        _check_flag("rrdb", "skip", skip)
        self.in_ch, self.skip = in_ch, skip
        self.conv_first = nn.Conv2d(in_ch, nf, 3, padding=1)
        self.trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.hr_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, in_ch, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "rrdb", self.in_ch)
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.trunk(fea))
        out = self.conv_last(self.act(self.hr_conv(fea)))
        return x + out if self.skip else out


# ---------------------------------------------------------------------------------------------- SRResNet
class ResidualBlockNoBN(nn.Module):
    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)
        _scaled_kaiming(self, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class SRResNet(nn.Module):
    """MSRResNet (BasicSR) for x2: conv_first, nb residual blocks, conv + pixel shuffle, HR conv, conv_last,
    plus the bilinearly upsampled input. With nf=64, nb=16: 151,936 3x3 kernels (FAIG's count)."""

    def __init__(self, in_ch: int = 3, nf: int = 64, nb: int = 16, scale: int = 2) -> None:
        super().__init__()
        _check_sizes("srresnet", in_ch=in_ch, nf=nf, nb=nb)
        check_number("srresnet", "scale", scale, integer=True)
        if scale != 2:
            raise ValueError(f"srresnet.scale: expected 2 (only x2 is implemented), got {scale!r}")
        self.in_ch = in_ch
        self.scale = scale
        self.conv_first = nn.Conv2d(in_ch, nf, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(nf) for _ in range(nb)])
        self.upconv = nn.Conv2d(nf, nf * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, in_ch, 3, padding=1)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "srresnet", self.in_ch)
        fea = self.act(self.conv_first(x))
        fea = self.body(fea)
        fea = self.act(self.shuffle(self.upconv(fea)))
        out = self.conv_last(self.act(self.conv_hr(fea)))
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)


# -------------------------------------------------------------------------------- window transformer
class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        c = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape  # b = batch * windows, n = window^2
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[self.rel_index].permute(2, 0, 1)  # heads, n, n
        if mask is not None:  # (windows, n, n) -> broadcast over the batch
            nw = mask.shape[0]
            bias = (bias[None, None] + mask[None, :, None]).expand(b // nw, nw, self.heads, n, n).reshape(b, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _mask(self, h: int, w: int, device) -> Optional[torch.Tensor]:
        if not self.shift:
            return None
        ws, s = self.window, self.shift
        img = torch.zeros(h, w, device=device)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[hs, wsl] = cnt
                cnt += 1
        win = img.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        diff = win[:, None, :] - win[:, :, None]
        return torch.where(diff != 0, torch.tensor(-100.0, device=device), torch.tensor(0.0, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.window
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(y, self._mask(h, w, x.device))
        y = y.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class WindowTransformer(nn.Module):
    """A small SwinIR-style restorer: conv embedding, residual groups of (shifted) window-attention blocks each
    closed by a conv, conv reconstruction, plus the input (global residual). Pads to a multiple of the window."""

    def __init__(self, in_ch: int = 3, dim: int = 32, depths: tuple = (2, 2), heads: int = 4, window: int = 8) -> None:
        super().__init__()
        _check_sizes("swinir", in_ch=in_ch, dim=dim, heads=heads, window=window)
        if not isinstance(depths, (tuple, list)) or not depths:
            raise (ValueError if isinstance(depths, (tuple, list)) else TypeError)(
                f"swinir.depths: expected a non-empty sequence of integers >= 1 (blocks per group), got {depths!r}")
        for i, d in enumerate(depths):
            check_number("swinir", f"depths[{i}]", d, lo=1, integer=True)
        if dim % heads:
            raise ValueError(f"swinir.heads: expected a divisor of dim={dim} (dim must be divisible by heads), "
                             f"got {heads!r}")
        self.in_ch = in_ch
        self.window = window
        self.embed = nn.Conv2d(in_ch, dim, 3, padding=1)
        self.groups = nn.ModuleList()
        self.group_convs = nn.ModuleList()
        for d in depths:
            self.groups.append(nn.ModuleList([SwinBlock(dim, heads, window, (window // 2) if i % 2 else 0)
                                              for i in range(d)]))
            self.group_convs.append(nn.Conv2d(dim, dim, 3, padding=1))
        self.norm = nn.LayerNorm(dim)
        self.conv_after = nn.Conv2d(dim, dim, 3, padding=1)
        self.out = nn.Conv2d(dim, in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.window
        # reflect padding to a multiple of the window needs every side > window / 2
        check_input(x, "swinir", self.in_ch, ws // 2 + 1,
                    f"reflect padding to a multiple of window={ws} needs each side > {ws / 2:g}")
        h, w = x.shape[-2:]
        ph, pw = (-h) % ws, (-w) % ws
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect") if (ph or pw) else x
        fea = self.embed(xp)
        y = fea
        for blocks, conv in zip(self.groups, self.group_convs):
            z = y.permute(0, 2, 3, 1)
            for blk in blocks:
                z = blk(z)
            y = y + conv(z.permute(0, 3, 1, 2))
        y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = fea + self.conv_after(y)
        return (xp + self.out(y))[..., :h, :w]


# ----------------------------------------------------------------------------------------------- factory
_CLASSES = {"dncnn": DnCNN, "rrdb": RRDBNet, "srresnet": SRResNet, "swinir": WindowTransformer}


def _factory(name: str):
    def make(preset: Optional[str] = None, **cfg: Any) -> nn.Module:
        full: Dict[str, Any] = {}
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS[name]:
                raise KeyError(f"unknown preset {preset!r} for {name}; valid presets: {', '.join(PRESETS[name])}")
            full.update(PRESETS[name][preset])
        full.update(cfg)
        fields = [p for p in inspect.signature(_CLASSES[name]).parameters]
        unknown = sorted(set(full) - set(fields))
        if unknown:
            raise TypeError(f"bad config for model {name!r}: unknown field(s) {', '.join(unknown)}; valid fields: "
                            f"{', '.join(fields)}")
        if isinstance(full.get("depths"), (tuple, list)):
            full["depths"] = tuple(full["depths"])
        model = _CLASSES[name](**full)
        model.config = {"name": name, **full}  # type: ignore[attr-defined]
        return model

    return make


for _n in _CLASSES:
    REGISTRY.register(_n)(_factory(_n))


def build(name: str, preset: Optional[str] = None, **cfg: Any) -> nn.Module:
    """Build a backbone, e.g. ``build('rrdb', preset='small')`` or ``build('dncnn', nf=32, depth=8)``."""
    return REGISTRY.get(name)(preset=preset, **cfg)


def names() -> list[str]:
    return REGISTRY.names()


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, input_shape: tuple = (1, 3, 64, 64)) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter; one multiply-accumulate = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 4:
        raise ValueError(f"count_flops.input_shape: expected (N, C, H, W), got {input_shape!r}")
    for i, v in enumerate(input_shape):
        check_number("count_flops", f"input_shape[{i}]", v, lo=1, integer=True)
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("count_flops: the model has no parameters (its device and dtype are unknown)")
    x = torch.zeros(input_shape, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


# ----------------------------------------------------------------------------------------- persistence
def save_model(model: nn.Module, path: PathLike, *, overwrite: bool = False, extra: Optional[dict] = None) -> None:
    """Weights as ``<path>.safetensors`` + config ``<path>.json``, both atomic; never overwrites silently."""
    path = Path(path)
    st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not overwrite and (st.exists() or js.exists()):
        raise FileExistsError(f"{st} exists; pass overwrite=True to replace it")
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("model has no .config; build it with causalir.models.build so it can be reloaded")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(st, save(state))
    atomic_write_json(js, {"config": cfg, **(extra or {})})


def load_state(model: nn.Module, path: PathLike) -> nn.Module:
    """Load safetensors weights into ``model``; missing, corrupt or mismatched files get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"could not read checkpoint {path}: not a valid safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state)
    return model


def load_model(path: PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved with :func:`save_model` (``path`` with or without suffix)."""
    path = Path(path)
    js = path.with_suffix(".json")
    if not js.is_file():
        raise FileNotFoundError(f"model config not found: {js}")
    try:
        cfg = dict(json.loads(js.read_text())["config"])
        name = cfg.pop("name")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"could not read model config {js}: {type(e).__name__}: {e}") from None
    model = build(name, **cfg)
    return load_state(model, path.with_suffix(".safetensors")).to(device)
