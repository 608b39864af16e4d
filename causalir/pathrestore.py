"""Path-Restore (Yu et al., arXiv 1904.10343): a multi-path restoration network whose path through each dynamic
block is chosen per image region by a small recurrent *pathfinder*, trained by REINFORCE with a
difficulty-regulated reward.

* Dynamic block i:  x_{i+1} = f^i_{a_i}(f^i_S(x_i)),  f_S a shared pre-activation residual block, a_i in
  {0 = bypass, 1.. = residual paths of increasing cost} (``path_blocks`` gives each path's residual blocks).
* Pathfinder: conv 5x5/4 -> conv 5x5/4 -> fc -> LSTM (state carried across the blocks) -> fc -> softmax over
  paths; it looks at the block input x_i (detached) and costs < 3% of the network (:func:`pathfinder_share`).
* Reward (seed talk):  r_i = -p * c(a_i)  (c = 0 for the bypass, 1 for a one-block path)  for i < N, and at
  i = N additionally  d * (-dL2),  -dL2 = L2(input region) - L2(restored region),  d = min(L2(restored)/L_0, 1).
* Inference on whole images by 63x63 regions with stride 53, overlaps averaged (:func:`restore_by_regions`);
  FLOPs counted per region from the paths actually taken, pathfinder included (:func:`region_flops`).

Assumptions (the paper's exact values are not public, see reference/path-restore.md): L_0, p, the discount
(gamma = 1), the REINFORCE baseline (a greedy self-critical rollout by default) and the per-path penalty for paths
costing more than one block (proportional to their blocks).

The ``path-restore`` experiment (profiles, the seed's table, claims, plots) is :mod:`causalir.experiments.path_restore`.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import per_sample_mse
from .train import TrainConfig, make_optimizer, make_scheduler
from .utils import check_choice, check_images, check_number, make_generator

REGION, STRIDE = 63, 53


# ------------------------------------------------------------------------------------------- input checks
def _check_x(x: Any, name: str, *, nonempty: bool = False, check_range: bool = True) -> torch.Tensor:
    """check_images (3 channels), at least 1x1 pixels, a non-empty batch (``nonempty``) and finite values (also
    when the [0, 1] range is not checked)."""
    check_images(x, name, check_range=check_range)
    if nonempty and x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < 1:
        raise ValueError(f"{name}: expected images of at least 1x1 pixels, got shape {tuple(x.shape)}")
    if not check_range and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or infinity")
    return x


def _check_int_tensor(name: str, a: Any, shape: Tuple[int, ...], n_paths: int) -> torch.Tensor:
    """An integer tensor of ``shape`` with values in [0, n_paths)."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of path indices, got {type(a).__name__}")
    if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer path indices in [0, {n_paths - 1}], got dtype {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= n_paths):
        raise ValueError(f"{name}: actions must lie in [0, {n_paths - 1}], got range [{int(a.min())}, "
                         f"{int(a.max())}]")
    return a


def _check_vector(name: str, v: Any, n: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name}: expected shape ({n},), got {got}")
    return v


# ------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class MultiPathConfig:
    """The multi-path network and its pathfinder (reference: nf=64, 6 blocks, paths (0, 1), no global skip)."""

    nf: int = 64
    num_blocks: int = 6
    path_blocks: Tuple[int, ...] = (0, 1)
    global_skip: bool = False
    pf_channels: Tuple[int, int] = (4, 24)
    pf_hidden: int = 32

    def __post_init__(self) -> None:
        o = "MultiPathConfig"
        if isinstance(self.path_blocks, (str, bytes)) or not isinstance(self.path_blocks, Sequence):
            raise ValueError(f"{o}.path_blocks: expected (0, k1, k2, ...) with the bypass first and k >= 1, got "
                             f"{self.path_blocks!r}")
        pb = tuple(self.path_blocks)
        for i, k in enumerate(pb):
            check_number(o, f"path_blocks[{i}]", k, lo=0, integer=True)
        if len(pb) < 2 or pb[0] != 0 or any(int(k) < 1 for k in pb[1:]):
            raise ValueError(f"{o}.path_blocks: expected (0, k1, k2, ...) with the bypass first and k >= 1, got "
                             f"{pb!r}")
        for k in ("nf", "num_blocks", "pf_hidden"):
            check_number(o, k, getattr(self, k), lo=1, integer=True)
        check_choice(o, "global_skip", self.global_skip, (False, True))
        pc = self.pf_channels
        if isinstance(pc, (str, bytes)) or not isinstance(pc, Sequence) or len(pc) != 2:
            raise ValueError(f"{o}.pf_channels: expected 2 integer widths >= 1, got {pc!r}")
        for i, c in enumerate(pc):
            check_number(o, f"pf_channels[{i}]", c, lo=1, integer=True)
        object.__setattr__(self, "path_blocks", pb)
        object.__setattr__(self, "pf_channels", tuple(self.pf_channels))


# ------------------------------------------------------------------------------------------------ network
class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(ReLU(conv(ReLU(x))))."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class LSTMCell(nn.Module):
    """A plain LSTM cell (two linears), so that its FLOPs are visible to torch's flop counter."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(n_in, 4 * n_hidden)
        self.hh = nn.Linear(n_hidden, 4 * n_hidden)

    def forward(self, x: torch.Tensor, state: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class Pathfinder(nn.Module):
    """Policy pi(a_i | x_i, h_i): two 5x5 stride-4 convs, fc, LSTM carried across blocks, fc -> path logits.
    Weights are shared across blocks (one LSTM time step per block)."""

    def __init__(self, cfg: MultiPathConfig) -> None:
        super().__init__()
        c1, c2 = cfg.pf_channels
        self.conv1 = nn.Conv2d(cfg.nf, c1, 5, stride=4, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, stride=4, padding=2)
        self.fc = nn.Linear(16 * c2, cfg.pf_hidden)
        self.lstm = LSTMCell(cfg.pf_hidden, cfg.pf_hidden)
        self.out = nn.Linear(cfg.pf_hidden, len(cfg.path_blocks))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # uniform policy at the start of stage II
        self.hidden = cfg.pf_hidden

    def init_state(self, n: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = like.new_zeros(n, self.hidden)
        return z, z

    def forward(self, x: torch.Tensor, state: Tuple[torch.Tensor, torch.Tensor]):
        z = F.relu(self.conv2(F.relu(self.conv1(x))))
        if z.shape[-2:] != (4, 4):  # 63x63 regions give exactly 4x4; other sizes are pooled to it
            z = F.adaptive_avg_pool2d(z, 4)
        z = F.relu(self.fc(z.flatten(1)))
        h, c = self.lstm(z, state)
        return self.out(h), (h, c)


class DynamicBlock(nn.Module):
    """x_{i+1} = f_{a}(f_S(x_i)) with per-sample a; samples are grouped by path so only chosen paths run."""

    def __init__(self, nf: int, path_blocks: Sequence[int]) -> None:
        super().__init__()
        self.shared = ResBlock(nf)
        self.paths = nn.ModuleList([nn.Sequential(*[ResBlock(nf) for _ in range(k)]) for k in path_blocks])

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return apply_paths(self.paths, self.shared(x), a)


def apply_paths(paths: Sequence[nn.Module], y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """out[n] = paths[a[n]](y[n]), computed by grouping the samples of each path (differentiable gather/scatter)."""
    _check_int_tensor("apply_paths actions", a, (y.shape[0],), len(paths))
    first = int(a[0]) if a.numel() else 0
    if bool((a == first).all()):
        return paths[first](y)
    chunks, idxs = [], []
    for k, path in enumerate(paths):
        idx = (a == k).nonzero().flatten()
        if idx.numel():
            chunks.append(path(y.index_select(0, idx)))
            idxs.append(idx)
    order = torch.cat(idxs)
    return torch.cat(chunks)[torch.argsort(order)]


@dataclass
class Rollout:
    """One pass: output (B,3,H,W), actions (B,N), log-probabilities (B,N) and entropies (B,N) (None w/o policy)."""

    output: torch.Tensor
    actions: torch.Tensor
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


class PathRestore(nn.Module):
    """The multi-path network with its pathfinder. ``forward(x)`` = greedy (argmax) paths, the test-time policy."""

    def __init__(self, cfg: MultiPathConfig = MultiPathConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = nn.Conv2d(3, cfg.nf, 3, padding=1)
        self.blocks = nn.ModuleList([DynamicBlock(cfg.nf, cfg.path_blocks) for _ in range(cfg.num_blocks)])
        self.tail = nn.Conv2d(cfg.nf, 3, 3, padding=1)
        self.pathfinder = Pathfinder(cfg)
        self.config = {"name": "path_restore", **asdict(cfg)}

    @property
    def num_paths(self) -> int:
        return len(self.cfg.path_blocks)

    def rollout(self, x: torch.Tensor, mode: str = "greedy", actions: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> Rollout:
        """Run the network with paths chosen by ``mode``: ``greedy`` / ``sample`` (pathfinder), ``random``
        (uniform, stage I), ``fixed`` (the given (B,N) ``actions``), ``score`` (the given ``actions``, with the
        pathfinder's log-probabilities and entropies of them along the way: the exact expected reward)."""
        modes = ("greedy", "sample", "random", "fixed", "score")
        if mode not in modes:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(modes)}")
        _check_x(x, "PathRestore.rollout x", check_range=False)
        check_number("PathRestore.rollout", "temperature", temperature, lo=0, lo_open=True)
        n, nb = x.shape[0], self.cfg.num_blocks
        if mode in ("fixed", "score"):
            if actions is None or tuple(actions.shape) != (n, nb):
                got = None if actions is None else tuple(actions.shape)
                raise ValueError(f"mode {mode!r} needs actions of shape ({n}, {nb}), got {got}")
            _check_int_tensor("PathRestore.rollout actions", actions, (n, nb), self.num_paths)
            actions = actions.to(x.device).long()
        elif mode == "random":
            actions = torch.randint(self.num_paths, (n, nb), generator=generator, device=x.device)
        use_pf = mode in ("greedy", "sample", "score")
        h = self.head(x)
        state = self.pathfinder.init_state(n, h) if use_pf else None
        acts, logps, ents = [], [], []
        for i, block in enumerate(self.blocks):
            if use_pf:
                logits, state = self.pathfinder(h.detach(), state)
                logp_all = F.log_softmax(logits / temperature, dim=1)
                if mode == "greedy":
                    a = logits.argmax(1)
                elif mode == "score":
                    a = actions[:, i]
                else:
                    a = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
                logps.append(logp_all.gather(1, a[:, None]).squeeze(1))
                ents.append(-(logp_all.exp() * logp_all).sum(1))
            else:
                a = actions[:, i]
            acts.append(a)
            h = block(h, a)
        y = self.tail(F.relu(h))
        if self.cfg.global_skip:
            y = x + y
        return Rollout(y, torch.stack(acts, 1), torch.stack(logps, 1) if logps else None,
                       torch.stack(ents, 1) if ents else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rollout(x, "greedy").output


# ------------------------------------------------------------------------------------------------ FLOPs
def conv_flops(cin: int, cout: int, k: int, h: int, w: int, stride: int = 1, pad: Optional[int] = None) -> int:
    """2 * MACs of a k x k convolution (bias not counted, as torch.utils.flop_counter)."""
    for name, v in (("cin", cin), ("cout", cout), ("k", k), ("h", h), ("w", w), ("stride", stride)):
        check_number("conv_flops", name, v, lo=1, integer=True)
    check_number("conv_flops", "pad", pad, lo=0, integer=True, allow_none=True)
    pad = k // 2 if pad is None else pad
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return 2 * cin * cout * k * k * ho * wo


@dataclass(frozen=True)
class FlopTable:
    """Per-region costs (FLOPs = 2 x MAC) of each part of the network on an h x w region."""

    head_tail: int
    shared: int
    paths: Tuple[int, ...]
    pathfinder_step: int
    num_blocks: int

    @property
    def longest(self) -> int:
        """The network alone with every block on its most expensive path."""
        return self.head_tail + self.num_blocks * (self.shared + max(self.paths))

    @property
    def shortest(self) -> int:
        return self.head_tail + self.num_blocks * (self.shared + min(self.paths))


def flop_table(cfg: MultiPathConfig, h: int = REGION, w: int = REGION) -> FlopTable:
    """Analytic FLOPs of every component on an h x w region."""
    if not isinstance(cfg, MultiPathConfig):
        raise TypeError(f"flop_table cfg: expected a MultiPathConfig, got {type(cfg).__name__}")
    check_number("flop_table", "h", h, lo=1, integer=True)
    check_number("flop_table", "w", w, lo=1, integer=True)
    nf = cfg.nf
    conv = conv_flops(nf, nf, 3, h, w)
    head_tail = 2 * conv_flops(3, nf, 3, h, w)
    c1, c2 = cfg.pf_channels
    h1, w1 = (h - 1) // 4 + 1, (w - 1) // 4 + 1
    pf = conv_flops(nf, c1, 5, h, w, 4, 2) + conv_flops(c1, c2, 5, h1, w1, 4, 2)
    hid = cfg.pf_hidden
    pf += 2 * 16 * c2 * hid + 2 * 2 * hid * 4 * hid + 2 * hid * len(cfg.path_blocks)
    return FlopTable(head_tail, 2 * conv, tuple(2 * conv * k for k in cfg.path_blocks), pf, cfg.num_blocks)


def region_flops(cfg: MultiPathConfig, actions: torch.Tensor, h: int = REGION, w: int = REGION,
                 pathfinder: bool = True) -> torch.Tensor:
    """FLOPs (B,) of each region from the paths it took, actions (B,N): head + tail + sum_i [shared +
    path(a_i) (+ pathfinder step)]."""
    t = flop_table(cfg, h, w)
    if not isinstance(actions, torch.Tensor) or actions.dim() != 2 or actions.shape[1] != cfg.num_blocks:
        got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
        raise ValueError(f"actions: expected shape (B, {cfg.num_blocks}), got {got}")
    _check_int_tensor("region_flops actions", actions, tuple(actions.shape), len(cfg.path_blocks))
    cost = torch.tensor(t.paths, dtype=torch.float64)[actions.cpu().long()].sum(1)
    per_block = t.shared + (t.pathfinder_step if pathfinder else 0)
    return cost + t.head_tail + cfg.num_blocks * per_block


def pathfinder_share(cfg: MultiPathConfig, h: int = REGION, w: int = REGION) -> float:
    """The pathfinder's FLOPs over the whole network's (all paths at their longest): the '< 3%' claim."""
    t = flop_table(cfg, h, w)
    return cfg.num_blocks * t.pathfinder_step / (t.longest + cfg.num_blocks * t.pathfinder_step)


def measured_flops(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """FLOPs of ``fn(x)`` measured by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(x)
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------------------ region tiling
def region_starts(size: int, region: int = REGION, stride: int = STRIDE) -> List[int]:
    """Start offsets along one side: 0, stride, 2*stride, ... plus a last region flush with the border."""
    for name, v in (("size", size), ("region", region), ("stride", stride)):
        check_number("region_starts", name, v, integer=True)
    if size < 1:
        raise ValueError(f"region_starts.size: expected an integer >= 1 (an image side), got {size!r}")
    if region < 1 or stride < 1 or stride > region:
        raise ValueError(f"expected 1 <= stride <= region (no gaps), got region={region}, stride={stride}")
    if size <= region:
        return [0]
    starts = list(range(0, size - region + 1, stride))
    if starts[-1] + region < size:
        starts.append(size - region)
    return starts


def extract_regions(x: torch.Tensor, region: int = REGION, stride: int = STRIDE):
    """(1,C,H,W) -> regions (R,C,rh,rw) and their (top, left) offsets; (rh, rw) = (min(region, H),
    min(region, W)) so that images smaller than a region are one region along that side."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"extract_regions: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"extract_regions: expected one image of shape (1,C,H,W), got {tuple(x.shape)}")
    hgt, wid = x.shape[-2:]
    if min(hgt, wid) < 1:
        raise ValueError(f"extract_regions: expected an image of at least 1x1 pixels, got {hgt}x{wid}")
    check_number("extract_regions", "region", region, lo=1, integer=True)
    check_number("extract_regions", "stride", stride, lo=1, hi=region, integer=True)
    rh, rw = min(region, hgt), min(region, wid)
    tops, lefts = region_starts(hgt, rh, min(stride, rh)), region_starts(wid, rw, min(stride, rw))
    pos = [(t, l) for t in tops for l in lefts]
    regions = torch.stack([x[0, :, t:t + rh, l:l + rw] for t, l in pos])
    return regions, pos, (rh, rw)


def merge_regions(regions: torch.Tensor, pos: Sequence[Tuple[int, int]], shape: Tuple[int, int]) -> torch.Tensor:
    """Put regions (R,C,rh,rw) back at their offsets and average the overlaps -> (1,C,H,W)."""
    if not isinstance(regions, torch.Tensor) or regions.dim() != 4:
        got = tuple(regions.shape) if isinstance(regions, torch.Tensor) else type(regions).__name__
        raise ValueError(f"merge_regions regions: expected (R,C,rh,rw), got {got}")
    if len(pos) != regions.shape[0]:
        raise ValueError(f"merge_regions: {regions.shape[0]} regions but {len(pos)} positions")
    if len(shape) != 2:
        raise ValueError(f"merge_regions shape: expected (H, W), got {shape!r}")
    rh, rw = regions.shape[-2:]
    for t, l in pos:
        if t < 0 or l < 0 or t + rh > shape[0] or l + rw > shape[1]:
            raise ValueError(f"merge_regions: a {rh}x{rw} region at ({t}, {l}) does not fit in the image "
                             f"{shape[0]}x{shape[1]}")
    out = regions.new_zeros(1, regions.shape[1], *shape)
    cnt = regions.new_zeros(1, 1, *shape)
    for k, (t, l) in enumerate(pos):
        out[0, :, t:t + rh, l:l + rw] += regions[k]
        cnt[0, :, t:t + rh, l:l + rw] += 1
    if bool((cnt == 0).any()):
        raise ValueError("regions do not cover the image")
    return out / cnt


@dataclass
class RegionResult:
    """A restored image with per-region paths (R,N) (None for a plain network) and FLOPs (R,)."""

    output: torch.Tensor
    actions: Optional[torch.Tensor]
    flops: torch.Tensor
    positions: List[Tuple[int, int]]
    region: Tuple[int, int]

    @property
    def mean_flops(self) -> float:
        return float(self.flops.double().mean())

    def path_map(self) -> np.ndarray:
        """(rows, cols) grid of the number of non-bypass paths per region."""
        tops = sorted({t for t, _ in self.positions})
        lefts = sorted({l for _, l in self.positions})
        grid = np.zeros((len(tops), len(lefts)))
        if self.actions is not None:
            n = (self.actions > 0).sum(1).cpu().numpy()
            for k, (t, l) in enumerate(self.positions):
                grid[tops.index(t), lefts.index(l)] = n[k]
        return grid


@torch.no_grad()
def restore_by_regions(model: nn.Module, x: torch.Tensor, region: int = REGION, stride: int = STRIDE,
                       batch: int = 64, flops_per_region: Optional[int] = None) -> RegionResult:
    """Restore one image (1,3,H,W) region by region (overlaps averaged). A :class:`PathRestore` runs greedily
    with its pathfinder and FLOPs come from the paths taken; any other model costs ``flops_per_region`` (measured
    with the flop counter on one region when not given)."""
    _check_x(x, "restore_by_regions x")
    if x.shape[0] != 1:
        raise ValueError(f"restore_by_regions x: expected one image of shape (1,C,H,W), got {tuple(x.shape)}")
    check_number("restore_by_regions", "batch", batch, lo=1, integer=True)
    check_number("restore_by_regions", "flops_per_region", flops_per_region, lo=0, allow_none=True)
    regions, pos, (rh, rw) = extract_regions(x, region, stride)
    outs, acts = [], []
    for s in range(0, regions.shape[0], batch):
        xb = regions[s:s + batch]
        if isinstance(model, PathRestore):
            ro = model.rollout(xb, "greedy")
            outs.append(ro.output)
            acts.append(ro.actions)
        else:
            outs.append(model(xb))
    y = merge_regions(torch.cat(outs), pos, tuple(x.shape[-2:])).clamp(0, 1)
    if isinstance(model, PathRestore):
        a = torch.cat(acts)
        flops = region_flops(model.cfg, a, rh, rw)
    else:
        a = None
        if flops_per_region is None:
            flops_per_region = measured_flops(model, regions[:1])
        flops = torch.full((regions.shape[0],), float(flops_per_region), dtype=torch.float64)
    return RegionResult(y, a, flops, pos, (rh, rw))


# --------------------------------------------------------------------------------------------- REINFORCE
def difficulty_rewards(actions: torch.Tensor, mse_in: torch.Tensor, mse_out: torch.Tensor, p: float, l0: float,
                       path_blocks: Sequence[int], difficulty_mse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-step rewards (B,N): r_i = -p * c(a_i), plus d * (-dL2) at i = N with -dL2 = mse_in - mse_out and
    d = min(L_d / L_0, 1), L_d the region's restoration MSE (``difficulty_mse``; default ``mse_out``).
    c = residual blocks of the path (1 for the reference's single complex path, 0 for the bypass).

    Taking L_d from the *same* rollout's output makes the reward d(m) (mse_in - m) grow with a worse output m
    whenever mse_in > 2 m (every noisy region), so training passes L_d from an action-independent rollout
    (the greedy one): d then only weighs regions, it does not reward bad restorations."""
    check_number("difficulty_rewards", "p", p, lo=0)
    check_number("difficulty_rewards", "l0", l0, lo=0, lo_open=True)
    if not isinstance(actions, torch.Tensor) or actions.dim() != 2 or actions.shape[1] < 1:
        got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
        raise ValueError(f"difficulty_rewards actions: expected (B, N) with N >= 1, got {got}")
    for i, k in enumerate(path_blocks):
        check_number("difficulty_rewards", f"path_blocks[{i}]", k, lo=0)
    _check_int_tensor("difficulty_rewards actions", actions, tuple(actions.shape), len(path_blocks))
    b = actions.shape[0]
    _check_vector("difficulty_rewards mse_in", mse_in, b)
    _check_vector("difficulty_rewards mse_out", mse_out, b)
    if difficulty_mse is not None:
        _check_vector("difficulty_rewards difficulty_mse", difficulty_mse, b)
    cost = torch.tensor([float(k) for k in path_blocks], device=actions.device)[actions]
    r = -p * cost
    d = ((mse_out if difficulty_mse is None else difficulty_mse) / l0).clamp(max=1.0)
    r[:, -1] = r[:, -1] + d * (mse_in - mse_out)
    return r


def returns_to_go(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_i = sum_{j >= i} gamma^(j-i) r_j for rewards (B,N)."""
    check_number("returns_to_go", "gamma", gamma, lo=0, hi=1)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] < 1:
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"returns_to_go rewards: expected (B, N) with N >= 1, got {got}")
    g = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[1] - 1, -1, -1):
        g = rewards[:, i] + gamma * g
        out[:, i] = g
    return out


def reinforce_loss(log_probs: torch.Tensor, returns: torch.Tensor, baseline: Optional[torch.Tensor] = None,
                   entropy: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
                   normalize: bool = False) -> torch.Tensor:
    """Surrogate whose gradient is the REINFORCE estimate: -mean_b sum_i log pi(a_i|s_i) (G_i - b_i).
    ``normalize`` divides the advantages by their batch RMS (a positive scalar: the direction is unchanged), so
    that ``entropy_coef`` is on a fixed scale whatever the size of the rewards."""
    check_number("reinforce_loss", "entropy_coef", entropy_coef, lo=0)
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 2 or log_probs.shape[0] == 0:
        got = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
        raise ValueError(f"reinforce_loss log_probs: expected a non-empty (B, N), got {got}")
    want = tuple(log_probs.shape)
    for name, t, bcast in (("returns", returns, False), ("baseline", baseline, True), ("entropy", entropy, False)):
        if t is None and name != "returns":
            continue
        ok = isinstance(t, torch.Tensor) and (tuple(t.shape) == want or bcast and t.dim() == 2 and all(
            a in (1, b) for a, b in zip(t.shape, want)))
        if not ok:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"reinforce_loss {name}: expected shape {want} (as log_probs"
                             f"{', or broadcastable to it' if bcast else ''}), got {got}")
    adv = returns if baseline is None else returns - baseline
    if normalize:
        adv = adv / adv.pow(2).mean().sqrt().clamp_min(1e-12)
    loss = -(log_probs * adv.detach()).sum(1).mean()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy.sum(1).mean()
    return loss


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainRecipe:
    """Stage I (random paths) then stage II (pathfinder by REINFORCE + network, jointly) for one penalty p."""

    stage1_steps: int = 300
    stage2_steps: int = 100
    batch_size: int = 16
    patch_size: int = 48
    lr: float = 1e-3
    lr_stage2: float = 2e-4
    pf_lr: float = 1e-3
    l0: float = 10 ** (-25 / 10)       # MSE threshold of the difficulty (25 dB) [assumption]
    gamma: float = 1.0                 # discount [assumption]
    baseline: str = "greedy"           # greedy (self-critical rollout) | mean (batch mean) [assumption]
    temperature: float = 1.0
    entropy_coef: float = 0.01         # on normalised advantages [assumption: keeps the policy from collapsing]
    normalize_adv: bool = True
    #: ours (issue 12): pathfinder steps on the *frozen* stage-I network before stage II (0 = none, the
    #: reference), each with ``pf_samples`` routings sampled per region and a leave-one-out baseline
    pf_steps: int = 0
    pf_samples: int = 4
    #: the frozen-network pathfinder steps maximise the *exact* expected reward over every routing (M^N of them,
    #: for few blocks) instead of sampling ``pf_samples`` routings (:func:`train_pathfinder`)
    pf_exact: bool = False
    #: with ``pf_exact``: 0 maximises the exact expected return; tau > 0 instead fits the routing policy to
    #: softmax(A / tau), the maximum-entropy optimum of the (standardised) advantages A, by cross-entropy (the
    #: expected return's gradient vanishes once the softmax saturates; the cross-entropy's does not)
    pf_tau: float = 0.0
    #: with ``pf_exact``: standardise the advantages over the whole batch (``batch``) or per region over its
    #: routings (``region``: every region weighs alike; batch-wise, the high-noise regions' large return
    #: differences dominate and the policy learned one route for all, issue 12)
    pf_norm: str = "batch"
    #: ours (issue 12): set ``l0`` from the data instead: this quantile of the stage-I network's per-region output
    #: MSE (all blocks on the longest path) on training patches (:func:`l0_from_regions`); None keeps ``l0``
    l0_quantile: Optional[float] = None
    #: ours (issue 12): the pathfinder's learning rate in stage II (None = ``pf_lr``): after ``pf_steps`` on the
    #: frozen network the joint stage fine-tunes, so its pathfinder steps shrink as ``lr_stage2`` does the network's
    pf_lr_stage2: Optional[float] = None

    def __post_init__(self) -> None:
        o = "TrainRecipe"
        check_number(o, "l0_quantile", self.l0_quantile, lo=0, lo_open=True, hi=1, allow_none=True)
        check_number(o, "pf_lr_stage2", self.pf_lr_stage2, lo=0, lo_open=True, allow_none=True)
        check_choice(o, "pf_exact", self.pf_exact, (False, True))
        check_number(o, "pf_tau", self.pf_tau, lo=0)
        check_choice(o, "pf_norm", self.pf_norm, ("batch", "region"))
        check_number(o, "pf_steps", self.pf_steps, lo=0, integer=True)
        check_number(o, "pf_samples", self.pf_samples, lo=2, integer=True)
        check_choice(o, "baseline", self.baseline, ("greedy", "mean", "none"))
        check_number(o, "stage1_steps", self.stage1_steps, lo=0, integer=True)
        check_number(o, "stage2_steps", self.stage2_steps, lo=0, integer=True)
        check_number(o, "batch_size", self.batch_size, lo=1, integer=True)
        check_number(o, "patch_size", self.patch_size, lo=1, integer=True)
        for k in ("lr", "lr_stage2", "pf_lr", "l0", "temperature"):
            check_number(o, k, getattr(self, k), lo=0, lo_open=True)
        check_number(o, "gamma", self.gamma, lo=0, hi=1)
        check_number(o, "entropy_coef", self.entropy_coef, lo=0)
        check_choice(o, "normalize_adv", self.normalize_adv, (False, True))


#: the cosine schedule's floor as a share of the learning rate (lr -> 0.02 lr over the stage)
LR_FLOOR = 0.02


def _adam_cosine(params, lr: float, steps: int, schedule: bool = True):
    """Adam at ``lr`` and (``schedule``) a cosine decay to ``LR_FLOOR * lr`` over ``steps``, both from
    :func:`causalir.train.make_optimizer` / :func:`causalir.train.make_scheduler` (bit-identical to the
    private schedule these loops had before)."""
    cfg = TrainConfig(steps=steps, lr=lr, schedule="cosine", lr_min_ratio=LR_FLOOR)
    opt = make_optimizer(params, cfg)
    return opt, (make_scheduler(opt, cfg) if schedule else None)


def _check_stage(owner: str, model: Any, sampler: Any, distort: Any, recipe: Any) -> None:
    if not isinstance(model, PathRestore):
        raise TypeError(f"{owner} model: expected a PathRestore, got {type(model).__name__}")
    if not callable(getattr(sampler, "sample", None)):
        raise TypeError(f"{owner} sampler: expected a patch sampler (with .sample(generator)), got "
                        f"{type(sampler).__name__}")
    if not callable(distort):
        raise TypeError(f"{owner} distort: expected a callable (clean, generator) -> distorted, got "
                        f"{type(distort).__name__}")
    if not isinstance(recipe, TrainRecipe):
        raise TypeError(f"{owner} recipe: expected a TrainRecipe, got {type(recipe).__name__}")


def train_stage1(model: PathRestore, sampler, distort: Callable, recipe: TrainRecipe, gen: torch.Generator,
                 log: Optional[List[dict]] = None, fixed_path: Optional[int] = None,
                 steps: Optional[int] = None) -> PathRestore:
    """Stage I: L2 training of the multi-path network with uniformly random paths per region and block.
    With ``fixed_path`` (one path for every block, or one per block) the blocks always take those paths: a static
    network (the all-long baseline, or :func:`matched_static_paths`'s FLOPs-matched one).

    A plain loop, outside :func:`causalir.train.fit` on purpose: it trains a parameter subset (the pathfinder is
    frozen) under routes drawn per sample from the same generator as the batches and the noise, and the random
    stream (batch, distortion, routes per step) is part of what the committed results fix; Adam and the cosine
    schedule come from :func:`causalir.train.make_optimizer` / ``make_scheduler``."""
    _check_stage("train_stage1", model, sampler, distort, recipe)
    check_number("train_stage1", "steps", steps, lo=0, integer=True, allow_none=True)
    route = None if fixed_path is None else block_paths(model, fixed_path, "train_stage1", "fixed_path")
    n_steps = recipe.stage1_steps if steps is None else steps
    params = [p for n, p in model.named_parameters() if not n.startswith("pathfinder.")]
    opt, sched = _adam_cosine(params, recipe.lr, n_steps)
    model.train()
    for step in range(n_steps):
        clean = sampler.sample(gen)
        noisy = distort(clean, gen)
        if route is None:
            out = model.rollout(noisy, "random", generator=gen).output
        else:
            a = torch.tensor(route, dtype=torch.long, device=noisy.device).expand(noisy.shape[0], -1)
            out = model.rollout(noisy, "fixed", actions=a).output
        loss = F.mse_loss(out, clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 50 == 0 or step == n_steps - 1):
            log.append({"stage": 1 if route is None else f"static paths {list(route)}", "step": step,
                        "loss": float(loss.detach())})
    return model


def train_stage2(model: PathRestore, sampler, distort: Callable, recipe: TrainRecipe, p: float,
                 gen: torch.Generator, log: Optional[List[dict]] = None) -> PathRestore:
    """Stage II: pathfinder by REINFORCE on the difficulty-regulated reward, network by L2 on the sampled paths.

    A plain loop, outside :func:`causalir.train.fit` on purpose: one backward of L2 + the policy-gradient surrogate
    (with a greedy self-critical rollout as baseline) feeds two optimisers on disjoint parameter sets (the network
    on a cosine schedule, the pathfinder at a constant rate), which ``Strategy.update``'s one optimiser step does
    not express. Both come from :func:`causalir.train.make_optimizer` / ``make_scheduler``."""
    _check_stage("train_stage2", model, sampler, distort, recipe)
    check_number("train_stage2", "p", p, lo=0)
    net = [q for n, q in model.named_parameters() if not n.startswith("pathfinder.")]
    opt_net, sched = _adam_cosine(net, recipe.lr_stage2, recipe.stage2_steps)
    pf_lr = recipe.pf_lr if recipe.pf_lr_stage2 is None else recipe.pf_lr_stage2
    opt_pf, _ = _adam_cosine(model.pathfinder.parameters(), pf_lr, recipe.stage2_steps, schedule=False)
    model.train()
    for step in range(recipe.stage2_steps):
        clean = sampler.sample(gen)
        noisy = distort(clean, gen)
        ro = model.rollout(noisy, "sample", generator=gen, temperature=recipe.temperature)
        mse_out = per_sample_mse(ro.output, clean)
        mse_in = per_sample_mse(noisy, clean)
        with torch.no_grad():  # greedy rollout: the difficulty L_d (action-independent) and the baseline
            gr = model.rollout(noisy, "greedy")
            gmse = per_sample_mse(gr.output, clean)
        rew = difficulty_rewards(ro.actions, mse_in, mse_out.detach(), p, recipe.l0, model.cfg.path_blocks, gmse)
        ret = returns_to_go(rew, recipe.gamma)
        base = None
        if recipe.baseline == "greedy":
            base = returns_to_go(difficulty_rewards(gr.actions, mse_in, gmse, p, recipe.l0,
                                                    model.cfg.path_blocks, gmse), recipe.gamma)
        elif recipe.baseline == "mean":
            base = ret.mean(0, keepdim=True)
        pg = reinforce_loss(ro.log_probs, ret, base, ro.entropy, recipe.entropy_coef, recipe.normalize_adv)
        loss = mse_out.mean()
        opt_net.zero_grad(set_to_none=True)
        opt_pf.zero_grad(set_to_none=True)
        (loss + pg).backward()  # the pathfinder sees detached features: the two losses touch disjoint weights
        opt_net.step()
        opt_pf.step()
        sched.step()
        if log is not None and (step % 25 == 0 or step == recipe.stage2_steps - 1):
            log.append({"stage": 2, "p": p, "step": step, "loss": float(loss.detach()),
                        "complex_paths": float((ro.actions > 0).float().sum(1).mean())})
    return model


def loo_baseline(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baseline for K sampled routings of each region: ``returns`` (K*B, N), the K samples stacked
    as K blocks of B regions; b = the mean return of the region's *other* K-1 samples at the same block. It does
    not depend on the sample it is subtracted from, so the estimate stays unbiased."""
    check_number("loo_baseline", "k", k, lo=2, integer=True)
    if not isinstance(returns, torch.Tensor) or returns.dim() != 2 or returns.shape[0] % k:
        got = tuple(returns.shape) if isinstance(returns, torch.Tensor) else type(returns).__name__
        raise ValueError(f"loo_baseline returns: expected (K*B, N) with K={k} samples per region, got {got}")
    r = returns.view(k, -1, returns.shape[1])
    return ((r.sum(0, keepdim=True) - r) / (k - 1)).reshape(returns.shape)


def train_pathfinder(model: PathRestore, sampler, distort: Callable, recipe: TrainRecipe, p: float,
                     gen: torch.Generator, log: Optional[List[dict]] = None) -> PathRestore:
    """The pathfinder alone, on the frozen network (``recipe.pf_steps`` steps): per region K = ``pf_samples``
    sampled routings, per-block returns-to-go of the difficulty-regulated reward (the FLOPs penalty of each
    block's own choice and everything after it, the quality term at the end), a leave-one-out baseline
    (:func:`loo_baseline`), REINFORCE with entropy. With one shared reward for four blocks and one sample per
    region the reference's joint stage went to an extreme (all-long or all-bypass); K samples per region cut the
    variance, and a fixed network cannot co-adapt with the policy.

    A plain loop outside :func:`causalir.train.fit` on purpose, like :func:`train_stage2`: the update is a
    policy gradient on routings sampled from the model itself, on a parameter subset."""
    _check_stage("train_pathfinder", model, sampler, distort, recipe)
    check_number("train_pathfinder", "p", p, lo=0)
    if recipe.pf_exact:
        return train_pathfinders({p: model}, sampler, distort, recipe, gen, log)[p]
    net = [q for n, q in model.named_parameters() if not n.startswith("pathfinder.")]
    was = [q.requires_grad for q in net]
    for q in net:
        q.requires_grad_(False)
    opt_pf, _ = _adam_cosine(model.pathfinder.parameters(), recipe.pf_lr, recipe.pf_steps, schedule=False)
    k = recipe.pf_samples
    model.train()
    try:
        for step in range(recipe.pf_steps):
            clean = sampler.sample(gen)
            noisy = distort(clean, gen)
            x, c = noisy.repeat(k, 1, 1, 1), clean.repeat(k, 1, 1, 1)
            ro = model.rollout(x, "sample", generator=gen, temperature=recipe.temperature)
            with torch.no_grad():
                mse_out, mse_in = per_sample_mse(ro.output, c), per_sample_mse(x, c)
                gmse = per_sample_mse(model.rollout(noisy, "greedy").output, clean).repeat(k)
            rew = difficulty_rewards(ro.actions, mse_in, mse_out, p, recipe.l0, model.cfg.path_blocks, gmse)
            ret = returns_to_go(rew, recipe.gamma)
            pg = reinforce_loss(ro.log_probs, ret, loo_baseline(ret, k), ro.entropy, recipe.entropy_coef,
                                recipe.normalize_adv)
            opt_pf.zero_grad(set_to_none=True)
            pg.backward()
            opt_pf.step()
            if log is not None and (step % 25 == 0 or step == recipe.pf_steps - 1):
                log.append({"stage": "pathfinder (frozen network)", "p": p, "step": step,
                            "complex_paths": float((ro.actions > 0).float().sum(1).mean()),
                            "reward": float(ret[:, 0].mean())})
    finally:
        for q, w in zip(net, was):
            q.requires_grad_(w)
    return model


def train_pathfinders(models: Mapping[float, PathRestore], sampler, distort: Callable, recipe: TrainRecipe,
                      gen: torch.Generator, log: Optional[List[dict]] = None) -> Dict[float, PathRestore]:
    """The pathfinders of several penalties p (``models``: p -> a copy of the same frozen network) on the exact
    objective (:func:`tree_policy_loss`), ``recipe.pf_steps`` steps on the same batches: the network is frozen and
    shared, so one :func:`route_tree` per batch serves every p and the cost is nearly that of one p.

    A plain loop outside :func:`causalir.train.fit` like :func:`train_pathfinder`: one optimiser per pathfinder on
    a parameter subset, the objective an expectation over the model's own routing distribution."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"train_pathfinders models: expected a non-empty {{p: PathRestore}} dict, got {models!r}")
    if not recipe.pf_exact:
        raise ValueError("train_pathfinders: needs recipe.pf_exact=True (the sampled objective trains one p at a time: "
                         "train_pathfinder)")
    ps = list(models)
    for p in ps:
        check_number("train_pathfinders", "p", p, lo=0)
        _check_stage("train_pathfinders", models[p], sampler, distort, recipe)
    first = models[ps[0]]
    net0 = {n: q for n, q in first.named_parameters() if not n.startswith("pathfinder.")}
    for p in ps[1:]:
        other = {n: q for n, q in models[p].named_parameters() if not n.startswith("pathfinder.")}
        if other.keys() != net0.keys() or any(not torch.equal(other[n], net0[n]) for n in net0):
            raise ValueError(f"train_pathfinders models[{p!r}]: its network differs from models[{ps[0]!r}]'s; every "
                             "p must start from the same frozen network (copies of one stage-I model)")
    opts = {p: _adam_cosine(models[p].pathfinder.parameters(), recipe.pf_lr, recipe.pf_steps, schedule=False)[0]
            for p in ps}
    for m in models.values():
        m.train()
    for step in range(recipe.pf_steps):
        clean = sampler.sample(gen)
        tree = route_tree(first, distort(clean, gen), clean)
        for p in ps:
            loss, info = tree_policy_loss(models[p].pathfinder, tree, recipe, p, first.cfg.path_blocks)
            opts[p].zero_grad(set_to_none=True)
            loss.backward()
            opts[p].step()
            if log is not None and (step % 25 == 0 or step == recipe.pf_steps - 1):
                log.append({"stage": "pathfinder (frozen network, exact)", "p": p, "step": step, **info})
    return dict(models)


def all_routes(num_paths: int, num_blocks: int, device=None) -> torch.Tensor:
    """Every routing, (M^N, N): row r is r written in base M (block 0 the most significant digit)."""
    check_number("all_routes", "num_paths", num_paths, lo=1, integer=True)
    check_number("all_routes", "num_blocks", num_blocks, lo=1, integer=True)
    r = torch.arange(num_paths ** num_blocks, device=device)
    return torch.stack([(r // num_paths ** (num_blocks - 1 - i)) % num_paths for i in range(num_blocks)], 1)


@dataclass
class RouteTree:
    """Every routing of a batch through a *frozen* multi-path network, computed once as a prefix tree (M + M^2 + ...
    + M^N block evaluations instead of N M^N): ``feats[i]`` (M^i B, nf, H, W) the pathfinder's input before block i
    for every prefix (prefix-major: rows j B ... (j+1) B hold prefix j, whose child by path a is j M + a, the order
    of :func:`all_routes`), ``mse`` (M^N, B) every routing's output MSE, ``mse_in`` (B,) the input's."""

    feats: List[torch.Tensor]
    mse: torch.Tensor
    mse_in: torch.Tensor


@torch.no_grad()
def route_tree(model: PathRestore, noisy: torch.Tensor, clean: torch.Tensor) -> RouteTree:
    """The :class:`RouteTree` of ``noisy`` (B,3,H,W) against ``clean`` through ``model``'s network."""
    _check_x(noisy, "route_tree noisy", nonempty=True, check_range=False)
    if not isinstance(clean, torch.Tensor) or clean.shape != noisy.shape:
        raise ValueError(f"route_tree clean: expected the shape of noisy {tuple(noisy.shape)}, got "
                         f"{getattr(clean, 'shape', type(clean).__name__)}")
    m, b = model.num_paths, noisy.shape[0]
    h = model.head(noisy)
    feats = []
    for block in model.blocks:
        feats.append(h)
        y = block.shared(h)
        shape = y.shape[1:]
        h = torch.stack([path(y).view(-1, b, *shape) for path in block.paths], 1).reshape(-1, *shape)
    nr = h.shape[0] // b
    out = model.tail(F.relu(h))
    if model.cfg.global_skip:
        out = noisy.repeat(nr, 1, 1, 1) + out
    return RouteTree(feats, per_sample_mse(out, clean.repeat(nr, 1, 1, 1)).view(nr, b), per_sample_mse(noisy, clean))


def tree_log_probs(pathfinder: "Pathfinder", tree: RouteTree, temperature: float = 1.0
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """log pi(r | x) of every routing r (M^N, B), the pathfinder's LSTM carried along each prefix (as in
    ``rollout(..., 'score')``), and the greedy routing's index per region (B,): argmax at every block in turn."""
    b, m, nb = tree.feats[0].shape[0], pathfinder.out.out_features, len(tree.feats)
    state = pathfinder.init_state(b, tree.feats[0])
    step_logp = []
    for i, f in enumerate(tree.feats):
        if i:   # each prefix's state goes to its M children
            state = tuple(s.view(-1, b, s.shape[-1]).repeat_interleave(m, 0).reshape(-1, s.shape[-1])
                          for s in state)
        logits, state = pathfinder(f.detach(), state)
        step_logp.append(F.log_softmax(logits / temperature, 1).view(-1, b, m))          # (M^i, B, M)
    routes = all_routes(m, nb, tree.mse.device)
    r = torch.arange(routes.shape[0], device=routes.device)
    logp = tree.mse.new_zeros(routes.shape[0], b)
    for i, lp in enumerate(step_logp):   # routing r's prefix before block i is r // M^(N-i)
        logp = logp + lp[r // m ** (nb - i)].gather(2, routes[:, i, None, None].expand(-1, b, 1)).squeeze(2)
    idx = torch.zeros(b, dtype=torch.long, device=routes.device)
    cols = torch.arange(b, device=routes.device)
    with torch.no_grad():
        for lp in step_logp:
            idx = idx * m + lp[idx, cols].argmax(1)
    return logp, idx


def tree_policy_loss(pathfinder: "Pathfinder", tree: RouteTree, recipe: TrainRecipe, p: float,
                     path_blocks: Sequence[int]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The exact policy objective of :func:`exact_policy_loss` on a computed :class:`RouteTree` (so that one tree
    serves the pathfinders of every penalty p on the same frozen network, :func:`train_pathfinders`)."""
    logp, greedy = tree_log_probs(pathfinder, tree)
    nr, b = logp.shape
    routes = all_routes(len(path_blocks), len(tree.feats), logp.device)
    with torch.no_grad():
        gmse = tree.mse.gather(0, greedy[None]).squeeze(0)          # L_d of the greedy routing (action-independent)
        ret = difficulty_rewards(routes.repeat_interleave(b, 0), tree.mse_in.repeat(nr), tree.mse.flatten(), p,
                                 recipe.l0, path_blocks, gmse.repeat(nr)).sum(1).view(nr, b)
        adv = ret - ret.mean(0, keepdim=True)
        adv = adv / ((adv.std(0, keepdim=True) if recipe.pf_norm == "region" else adv.std()) + 1e-12)
    prob = logp.exp()
    expected = (prob * adv).sum(0)
    entropy = -(prob * logp).sum(0)
    if recipe.pf_tau > 0:   # cross-entropy to the maximum-entropy optimum softmax(A / tau) over the routings
        loss = -(torch.softmax(adv / recipe.pf_tau, 0) * logp).sum(0).mean()
    else:
        loss = -(expected + recipe.entropy_coef * entropy).mean()
    best = ret.argmax(0)
    info = {"expected_adv": float(expected.detach().mean()), "entropy": float(entropy.detach().mean()),
            "greedy_is_best": float((greedy == best).float().mean()),
            "best_routes_distinct": float(len(torch.unique(best)))}
    return loss, info


def exact_policy_loss(model: PathRestore, noisy: torch.Tensor, clean: torch.Tensor, recipe: TrainRecipe,
                      p: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Minus the exact expected return of the pathfinder's routing policy over every routing r of every region,
    E_x = sum_r pi(r | x) R(x, r), R the difficulty-regulated return (:func:`difficulty_rewards`, the difficulty
    L_d from the greedy routing), minus ``entropy_coef`` times the exact entropy of pi(. | x). Returns are centred
    per region and scaled by their standard deviation over the batch or, ``recipe.pf_norm='region'``, over each
    region's routings (neither moves a region's argmax). The gradient is the exact
    policy gradient: no sampling, no baseline (feasible when M^N is small: 16 routings for 4 blocks of 2 paths;
    the network runs once per prefix, :func:`route_tree`).
    With ``recipe.pf_tau`` > 0 the loss is instead the cross-entropy -sum_r softmax(A / tau)_r log pi(r | x)."""
    return tree_policy_loss(model.pathfinder, route_tree(model, noisy, clean), recipe, p, model.cfg.path_blocks)


def l0_from_regions(model: PathRestore, sampler, distort: Callable, q: float, gen: torch.Generator,
                    batches: int = 16) -> float:
    """The difficulty threshold L0 as the ``q``-quantile of the per-region output MSE of ``model`` with every
    block on its longest path, over ``batches`` training batches: with q = 0.5 half the regions count as hard
    (d = min(L_d / L0, 1) = 1) and the easier half are weighted down in proportion to their error."""
    check_number("l0_from_regions", "q", q, lo=0, lo_open=True, hi=1)
    check_number("l0_from_regions", "batches", batches, lo=1, integer=True)
    long_ = FixedPaths(model, model.num_paths - 1)
    errs = []
    with torch.no_grad():
        for _ in range(batches):
            clean = sampler.sample(gen)
            errs.append(per_sample_mse(long_(distort(clean, gen)), clean))
    return float(torch.quantile(torch.cat(errs).double(), q))


def train_dncnn(model: nn.Module, sampler, distort: Callable, steps: int, lr: float, gen: torch.Generator,
                log: Optional[List[dict]] = None) -> nn.Module:
    """The same L2 recipe for the plain comparison network (a plain loop like :func:`train_stage1`, so that both
    networks see the same batches and noise; Adam and the cosine schedule from :mod:`causalir.train`)."""
    check_number("train_dncnn", "steps", steps, lo=0, integer=True)
    check_number("train_dncnn", "lr", lr, lo=0, lo_open=True)
    opt, sched = _adam_cosine(model.parameters(), lr, steps)
    model.train()
    for step in range(steps):
        clean = sampler.sample(gen)
        loss = F.mse_loss(model(distort(clean, gen)), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log.append({"stage": "dncnn", "step": step, "loss": float(loss.detach())})
    model.eval()
    return model


def matched_dncnn_depth(cfg: MultiPathConfig) -> int:
    """DnCNN depth (convs incl. head and tail) whose FLOPs equal the multi-path network's longest path."""
    if not isinstance(cfg, MultiPathConfig):
        raise TypeError(f"matched_dncnn_depth cfg: expected a MultiPathConfig, got {type(cfg).__name__}")
    return 2 + cfg.num_blocks * (2 + 2 * max(cfg.path_blocks))


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_regions(models: Dict[str, nn.Module], images: Sequence[torch.Tensor], distortions: Dict[str, Any],
                     seed: int, device: torch.device, flops: Optional[Dict[str, int]] = None,
                     keep: Optional[Dict[str, Any]] = None) -> List[dict]:
    """PSNR and mean per-region FLOPs of each model on every (distortion, image), region by region. Every model
    sees the same seeded inputs (causalir.evaluate.distorted_inputs). ``keep`` collects RegionResults."""
    from .evaluate import distorted_inputs
    from .metrics import psnr

    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"evaluate_regions images: expected a non-empty sequence of (3,H,W) images, got "
                         f"{type(images).__name__}")
    for i, im in enumerate(images):
        check_images(im, f"evaluate_regions images[{i}]", batched=False)
        if min(im.shape[-2:]) < 1:
            raise ValueError(f"evaluate_regions images[{i}]: expected at least 1x1 pixels, got shape {tuple(im.shape)}")
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"evaluate_regions models: expected a non-empty {{name: model}} dict, got {models!r}")
    inputs = distorted_inputs(images, distortions, seed, device)
    rows = []
    for name, model in models.items():
        model.eval()
        for (label, i), x in inputs.items():
            gt = images[i][None].to(device)
            res = restore_by_regions(model, x, flops_per_region=(flops or {}).get(name))
            rows.append({"method": name, "distortion": label, "image": i, "psnr": psnr(res.output, gt),
                         "input_psnr": psnr(x, gt), "gflops": res.mean_flops / 1e9,
                         "complex_paths": None if res.actions is None else float((res.actions > 0).sum(1)
                                                                                 .float().mean())})
            if keep is not None:
                keep[(name, label, i)] = res
                keep[("__input__", label, i)] = x
    return rows


def long_vs_bypass(net: PathRestore, images: Sequence[torch.Tensor], distortions: Dict[str, Any], seed: int,
                   device: torch.device) -> Dict[str, Any]:
    """The headroom a pathfinder needs: on every region of the (validation) images, the PSNR of the network with
    every block on its longest path minus with every block on the bypass. If the long path does not help most
    regions, all-bypass is optimal for any penalty and a pathfinder that learns it has learned nothing."""
    from .evaluate import distorted_inputs

    inputs = distorted_inputs(images, distortions, seed, device)
    long_, short = FixedPaths(net.eval(), net.num_paths - 1), FixedPaths(net.eval(), 0)
    gains = []
    with torch.no_grad():
        for (label, i), x in inputs.items():
            xr, _, _ = extract_regions(x)
            gr, _, _ = extract_regions(images[i][None].to(device))
            ml = per_sample_mse(long_(xr).clamp(0, 1), gr)
            mb = per_sample_mse(short(xr).clamp(0, 1), gr)
            gains.append(10 * torch.log10(mb.clamp_min(1e-10) / ml.clamp_min(1e-10)))
    g = torch.cat(gains).double()
    return {"regions": int(g.numel()), "share_long_better": float((g > 0).double().mean()),
            "mean_gain_db": float(g.mean()), "se_db": float(g.std() / g.numel() ** 0.5) if g.numel() > 1 else 0.0}


# -------------------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class Task:
    """A training distribution and its evaluation distortions."""

    name: str
    train: Any
    test: Dict[str, Any]
    val: Dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name: expected a non-empty string, got {self.name!r}")
        if not callable(self.train):
            raise TypeError(f"Task.train: expected a distortion (callable), got {self.train!r}")
        for k in ("test", "val"):
            v = getattr(self, k)
            if not isinstance(v, Mapping) or not v:
                raise ValueError(f"Task.{k}: expected a non-empty {{label: distortion}} dict, got {v!r}")
            for lab, d in v.items():
                if not callable(d):
                    raise TypeError(f"Task.{k}[{lab!r}]: expected a distortion (callable), got {d!r}")


def tasks(which: Sequence[str] = ("denoise", "mixed")) -> List[Task]:
    """``denoise``: blind Gaussian noise sigma in [0, 50], tested at sigma 10, 50 and the spatially variant
    'linear' / 'peaks' maps (0-50). ``mixed``: blur -> noise -> JPEG at moderate random levels (RL-Restore style),
    tested at a mild and a moderate fixed triple."""
    from . import distortions as D

    if isinstance(which, str):
        raise ValueError(f"tasks: expected a sequence of task names, got the string {which!r} (write [{which!r}])")
    out = []
    for w in which:
        if w == "denoise":
            test = {d.label: d for d in (D.GaussianNoise(10.0), D.GaussianNoise(50.0),
                                         D.SpatialNoise("linear", 0.0, 50.0), D.SpatialNoise("peaks", 0.0, 50.0))}
            out.append(Task("denoise", D.GaussianNoise((0.0, 50.0)), test, dict(test)))
        elif w == "mixed":
            train = D.compose([D.GaussianBlur((0.2, 2.5)), D.GaussianNoise((0.0, 30.0)), D.JPEG((30, 80))])
            test = {"mixed mild": D.compose([D.GaussianBlur(1.0), D.GaussianNoise(10.0), D.JPEG(60)]),
                    "mixed moderate": D.compose([D.GaussianBlur(2.0), D.GaussianNoise(25.0), D.JPEG(40)])}
            out.append(Task("mixed", train, test, dict(test)))
        else:
            raise ValueError(f"unknown task {w!r}; valid tasks: denoise, mixed")
    return out


@dataclass
class TaskRun:
    """Everything trained for one task: the DnCNN, the stage-I network and one Path-Restore per p."""

    task: Task
    dncnn: nn.Module
    stage1: PathRestore
    by_p: Dict[float, PathRestore]
    log: List[dict] = field(default_factory=list)
    wall: Dict[str, float] = field(default_factory=dict)
    #: the difficulty threshold stage II used (``recipe.l0``, or the one :func:`l0_from_regions` set)
    l0: Optional[float] = None


BASELINES = ("resnet", "dncnn")


def train_task(task: Task, net: MultiPathConfig, recipe: TrainRecipe, p_values: Sequence[float], seed: int,
               device: torch.device, baseline: str = "resnet", baseline_steps: Optional[int] = None) -> TaskRun:
    """Train the FLOPs-matched baseline, stage I once, then stage II from the stage-I weights for every p in
    ``p_values``, all on the embedded train photos with ``task.train``. ``baseline``: ``resnet`` (the static
    network, every block on its longest path, trained as such) or ``dncnn`` (a plain DnCNN whose depth matches
    the longest path's FLOPs); ``baseline_steps`` defaults to ``recipe.stage1_steps``."""
    from . import data, models

    if baseline not in BASELINES:
        raise ValueError(f"baseline: expected one of {', '.join(BASELINES)}, got {baseline!r}")
    if not isinstance(task, Task):
        raise TypeError(f"train_task task: expected a Task (see tasks()), got {type(task).__name__}")
    if not isinstance(net, MultiPathConfig):
        raise TypeError(f"train_task net: expected a MultiPathConfig, got {type(net).__name__}")
    if not isinstance(recipe, TrainRecipe):
        raise TypeError(f"train_task recipe: expected a TrainRecipe, got {type(recipe).__name__}")
    for i, p in enumerate(p_values):
        check_number("train_task", f"p_values[{i}]", p, lo=0)
    check_number("train_task", "seed", seed, integer=True)
    check_number("train_task", "baseline_steps", baseline_steps, lo=0, integer=True, allow_none=True)
    steps = recipe.stage1_steps if baseline_steps is None else int(baseline_steps)
    imgs = data.embedded_images("train")
    sampler = data.PatchSampler(imgs, recipe.patch_size, recipe.batch_size, device)
    distort = lambda c, g: task.train(c, g)  # noqa: E731
    log: List[dict] = []
    wall: Dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if baseline == "dncnn":
        dn = models.build("dncnn", nf=net.nf, depth=matched_dncnn_depth(net), residual=net.global_skip).to(device)
        train_dncnn(dn, sampler, distort, steps, recipe.lr, make_generator(seed, device), log)
    else:
        static = PathRestore(net).to(device)
        last = len(net.path_blocks) - 1
        train_stage1(static, sampler, distort, recipe, make_generator(seed, device), log, fixed_path=last,
                     steps=steps)
        dn = FixedPaths(static.eval(), last)
    wall["dncnn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    s1 = PathRestore(net).to(device)
    train_stage1(s1, sampler, distort, recipe, make_generator(seed, device), log)
    s1.eval()
    wall["stage1"] = time.perf_counter() - t0
    if recipe.l0_quantile is not None:  # L0 from the region-MSE distribution of the trained network
        recipe = dataclasses.replace(recipe, l0=l0_from_regions(s1, sampler, distort, recipe.l0_quantile,
                                                                make_generator(seed + 4241, device)))
    by_p = {}
    shared = {}
    if recipe.pf_steps and recipe.pf_exact:  # every p's pathfinder on the frozen network, one route tree per batch
        t0 = time.perf_counter()
        shared = train_pathfinders({p: copy.deepcopy(s1) for p in p_values}, sampler, distort, recipe,
                                   make_generator(seed + 7907, device), log)
        wall["pathfinders (every p, frozen network)"] = time.perf_counter() - t0
    for k, p in enumerate(p_values):
        t0 = time.perf_counter()
        m = shared[p] if shared else copy.deepcopy(s1)
        g = make_generator(seed + 7919 * (k + 1), device)
        if recipe.pf_steps and not shared:  # the pathfinder on the frozen network first, then stage II
            train_pathfinder(m, sampler, distort, recipe, p, g, log)
        train_stage2(m, sampler, distort, recipe, p, g, log)
        by_p[p] = m.eval()
        wall[f"stage2 p={p:g}"] = time.perf_counter() - t0
    return TaskRun(task, dn, s1, by_p, log, wall, recipe.l0)


def block_paths(net: PathRestore, path: Union[int, Sequence[int]], owner: str, name: str) -> Tuple[int, ...]:
    """One path per block: an int (checked as ``owner.name``) is the same path for every block; a sequence names
    each block's path (``owner.name[i]``)."""
    nb = net.cfg.num_blocks
    if isinstance(path, Sequence) and not isinstance(path, (str, bytes)):
        if len(path) != nb:
            raise ValueError(f"{owner}.{name}: expected one path per block ({nb}), got {len(path)}: {path!r}")
        for i, v in enumerate(path):
            check_number(owner, f"{name}[{i}]", v, lo=0, hi=net.num_paths - 1, integer=True)
        return tuple(int(v) for v in path)
    check_number(owner, name, path, lo=0, hi=net.num_paths - 1, integer=True)
    return (int(path),) * nb


def matched_static_paths(cfg: MultiPathConfig, target_flops: float, h: int = REGION, w: int = REGION) -> Tuple[int, ...]:
    """Per-block paths of the static network that costs at least ``target_flops`` per region (FLOPs of the
    network alone, no pathfinder) with the fewest blocks on their longest path: the first k blocks take the
    longest path, the others the cheapest. The FLOPs-matched static baseline of an adaptive routing whose mean
    cost is ``target_flops`` (rounded up to whole blocks, so the static network never has less computation)."""
    check_number("matched_static_paths", "target_flops", target_flops, lo=0)
    t = flop_table(cfg, h, w)
    step = max(t.paths) - min(t.paths)
    k = cfg.num_blocks if step == 0 else int(np.ceil(max(target_flops - t.shortest, 0) / step - 1e-9))
    k = min(max(k, 0), cfg.num_blocks)
    long_, short = int(np.argmax(t.paths)), int(np.argmin(t.paths))
    return tuple([long_] * k + [short] * (cfg.num_blocks - k))


def train_static(task: "Task", net: MultiPathConfig, recipe: TrainRecipe, paths: Sequence[int], seed: int,
                 device: torch.device, steps: Optional[int] = None) -> "FixedPaths":
    """A static network (the blocks always on ``paths``) trained from scratch like stage I, on the same data and
    steps (``steps`` defaults to ``recipe.stage1_steps``): e.g. the FLOPs-matched baseline."""
    from . import data

    imgs = data.embedded_images("train")
    sampler = data.PatchSampler(imgs, recipe.patch_size, recipe.batch_size, device)
    torch.manual_seed(seed)
    static = PathRestore(net).to(device)
    train_stage1(static, sampler, lambda c, g: task.train(c, g), recipe, make_generator(seed, device),
                 fixed_path=tuple(paths), steps=steps)
    return FixedPaths(static.eval(), tuple(paths))


class FixedPaths(nn.Module):
    """A multi-path network run with fixed paths: the same in every block (e.g. all-bypass or all-longest, an
    int) or one per block (a sequence)."""

    def __init__(self, net: PathRestore, path: Union[int, Sequence[int]]) -> None:
        super().__init__()
        if not isinstance(net, PathRestore):
            raise TypeError(f"FixedPaths net: expected a PathRestore, got {type(net).__name__}")
        self.paths = block_paths(net, path, "FixedPaths", "path")
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tensor(self.paths, dtype=torch.long, device=x.device).expand(x.shape[0], -1)
        return self.net.rollout(x, "fixed", actions=a).output
