"""Confounded vs back-door-adjusted training: content-tied noise samplers and the two strategies.

The DIL poster's causal graph (``causal.restoration_graph``) has the distortion D confounding I_d -> I_o: ERM fits
f on training pairs whose distortion is *chosen together with* the content, so f may learn P(I_o | I_d) through a
shortcut (here: "dark patch => heavy noise"). The back-door adjustment (eq. BD-IR)

    P(I_o | do(I_d)) = sum_i P(I_o | I_d, D = d_i) P(D = d_i)

instead averages over the distortion strata d_i with their *marginal* weights, i.e. every content meets every
stratum. With synthetic distortions we can realise that distribution exactly (counterfactual distortion
augmentation), which is what :class:`BackdoorERM` does; :class:`ConfoundedERM` reproduces the tied data.

* ``confounded_erm``: stratum of each patch drawn from P(D | brightness) (dark -> heavy w.p. (1+tie)/2).
* ``backdoor_erm``: strata independent of content with P(D = d_i) = the confounded data's marginal;
  ``mode="enumerate"`` evaluates the sum over i literally (each clean patch distorted by every d_i, loss weighted
  by P(d_i)); ``mode="sample"`` draws d_i ~ P(D) per patch.

The experiment (``causalir.experiments.backdoor_toy``) trains both with the same budget on a toy whose noise
level is tied to brightness.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .distortions import Distortion
from .train import STRATEGIES, StepContext, Strategy, TrainConfig, at_least_fp32, make_optimizer, make_scheduler
from .utils import check_choice, check_images, check_number, make_generator

__all__ = ["BackdoorERM", "ConfoundedERM", "STRATA_NAMES", "apply_strata", "brightness", "brightness_threshold",
           "independent_strata", "tied_strata"]

STRATA_NAMES = ("heavy", "light")  # stratum 0 = heavy noise, stratum 1 = light noise


# ------------------------------------------------------------------------------------------- samplers
def brightness(x: torch.Tensor) -> torch.Tensor:
    """Mean intensity of each image of a batch (N,C,H,W) -> (N,)."""
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"brightness: expected a batch (N,C,H,W), got shape {tuple(x.shape)}")
    check_images(x, "brightness images", channels=None)
    if min(x.shape[-2:]) < 1:
        raise ValueError(f"brightness images: expected images of at least 1x1 pixels, got shape {tuple(x.shape)}")
    return x.mean(dim=(1, 2, 3))


def _check_tie(tie: float, owner: str = "tied_strata") -> None:
    check_number(owner, "tie", tie)
    if not 0.0 <= float(tie) <= 1.0:
        raise ValueError(f"{owner}.tie: tie must be in [0, 1] (0 = no confounding, 1 = stratum fixed by "
                         f"brightness), got {tie!r}")


def _check_probs(owner: str, probs) -> Tuple[float, ...]:
    """A non-empty vector of finite probabilities >= 0 summing to 1 (each entry checked as ``owner.probs[i]``)."""
    if isinstance(probs, (str, bytes)) or not isinstance(probs, Sequence) and not isinstance(probs, torch.Tensor):
        raise ValueError(f"{owner}.probs: expected a non-negative vector summing to 1, got {probs!r}")
    ps = list(probs.tolist() if isinstance(probs, torch.Tensor) else probs)
    if not ps:
        raise ValueError(f"{owner}.probs: expected a non-negative vector summing to 1, got an empty one")
    for i, p in enumerate(ps):
        check_number(owner, f"probs[{i}]", p, lo=0, hi=1)
    if abs(float(sum(ps)) - 1) > 1e-6:
        raise ValueError(f"{owner}.probs: expected a non-negative vector summing to 1, got {ps} (sum "
                         f"{float(sum(ps)):.6g})")
    return tuple(ps)


def tied_strata(clean: torch.Tensor, threshold: float, tie: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The confounded P(D | content): stratum 0 (heavy) with prob (1+tie)/2 if brightness < threshold, else
    with prob (1-tie)/2; returns a long tensor (N,) of stratum indices (0 heavy, 1 light)."""
    _check_tie(tie)
    check_number("tied_strata", "threshold", threshold, lo=0, hi=1)
    dark = brightness(clean) < threshold
    p_heavy = torch.where(dark, 0.5 * (1 + tie), 0.5 * (1 - tie)).to(clean.dtype)
    u = torch.rand(clean.shape[0], generator=generator, device=clean.device, dtype=clean.dtype)
    return (u >= p_heavy).long()


def independent_strata(n: int, probs: Sequence[float], generator: Optional[torch.Generator] = None,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """The adjusted P(D): strata drawn i.i.d. from ``probs`` independently of content -> long (N,)."""
    check_number("independent_strata", "n", n, lo=1, integer=True)
    if isinstance(probs, (str, bytes)) or not isinstance(probs, (Sequence, torch.Tensor)) or len(probs) == 0:
        raise ValueError(f"probs must be a non-negative vector summing to 1, got {probs!r}")
    for i, q in enumerate(probs.tolist() if isinstance(probs, torch.Tensor) else probs):
        check_number("independent_strata", f"probs[{i}]", q, lo=0, hi=1)
    p = torch.as_tensor(list(probs), dtype=torch.float64, device=device)
    if p.dim() != 1 or len(p) < 1 or bool((p < 0).any()) or abs(float(p.sum()) - 1) > 1e-6:
        raise ValueError(f"probs must be a non-negative vector summing to 1, got {list(probs)}")
    return torch.multinomial(p, n, replacement=True, generator=generator)


def apply_strata(clean: torch.Tensor, strata: Sequence[Distortion], idx: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Distort sample k of ``clean`` with ``strata[idx[k]]`` (one vectorised call per stratum)."""
    check_images(clean, "apply_strata clean")
    if isinstance(strata, (str, bytes)) or not isinstance(strata, Sequence) or not strata:
        raise ValueError(f"apply_strata strata: expected a non-empty sequence of distortions, got {strata!r}")
    for k, d in enumerate(strata):
        if not callable(d):
            raise TypeError(f"apply_strata strata[{k}]: expected a distortion (callable), got {d!r}")
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"apply_strata idx: expected a tensor of stratum indices, got {type(idx).__name__}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"apply_strata idx: expected integer stratum indices in [0, {len(strata)}), got dtype "
                         f"{idx.dtype}")
    if idx.shape != (clean.shape[0],):
        raise ValueError(f"idx must have shape ({clean.shape[0]},), got {tuple(idx.shape)}")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(strata)):
        raise ValueError(f"stratum indices must lie in [0, {len(strata)}), got range [{int(idx.min())}, {int(idx.max())}]")
    out = torch.empty_like(clean)
    for k, d in enumerate(strata):
        sel = (idx == k).nonzero().flatten()
        if sel.numel():
            out[sel] = d(clean[sel], generator)
    return out


def brightness_threshold(images: Sequence[torch.Tensor], patch_size: int, n: int = 4096, seed: int = 0) -> float:
    """Median brightness of ``n`` random training patches: the dark/bright split of the confounded data."""
    from .data import PatchSampler

    check_number("brightness_threshold", "patch_size", patch_size, lo=1, integer=True)
    check_number("brightness_threshold", "n", n, lo=1, integer=True)
    check_number("brightness_threshold", "seed", seed, integer=True)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"brightness_threshold images: expected a non-empty sequence of (3,H,W) images, got "
                         f"{type(images).__name__}" + (" of length 0" if isinstance(images, Sequence) else ""))
    for i, im in enumerate(images):
        check_images(im, f"brightness_threshold images[{i}]", batched=False)
        if min(im.shape[-2:]) < patch_size:
            raise ValueError(f"brightness_threshold images[{i}]: expected at least {patch_size}x{patch_size} pixels "
                             f"(the patch size), got {im.shape[-2]}x{im.shape[-1]}")

    sampler = PatchSampler(images, patch_size, n, "cpu", augment=False)
    return float(brightness(sampler.sample(make_generator(seed))).median())


# ------------------------------------------------------------------------------------------ strategies
class _StrataStrategy(Strategy):
    """Shared Adam/scheduler plumbing; ``ctx.distortions`` are the strata (d_0 heavy, d_1 light, ...)."""

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.opt = make_optimizer(model.parameters(), cfg)
        self.sched = make_scheduler(self.opt, cfg)

    def _update(self, ctx: StepContext, loss: torch.Tensor, n: int) -> Dict[str, float]:
        """The shared :meth:`Strategy.update` on one distorted batch of ``n`` images."""
        self.update(ctx, loss, n)
        ctx.counters.distorted_batches += 1
        return {"loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0]}


@STRATEGIES.register("confounded_erm")
@dataclass
class ConfoundedERM(_StrataStrategy):
    """ERM on the confounded data: min E_{I_c, D ~ P(D | I_c)} L(f(I_d), I_c) with the tie of :func:`tied_strata`."""

    threshold: float = 0.5
    tie: float = 1.0
    name: str = field(default="confounded_erm", init=False)

    def __post_init__(self) -> None:
        _check_tie(self.tie, "ConfoundedERM")
        check_number("ConfoundedERM", "threshold", self.threshold, lo=0, hi=1)

    def step(self, ctx: StepContext) -> Dict[str, float]:
        clean = ctx.sample_clean()
        idx = tied_strata(clean, self.threshold, self.tie, ctx.generator)
        noisy = ctx.prepare(apply_strata(clean, ctx.distortions, idx, ctx.generator))
        with ctx.autocast():
            out = ctx.model(noisy)
        stats = self._update(ctx, ctx.loss_fn(at_least_fp32(out), clean), clean.shape[0])
        return {**stats, "heavy_share": float((idx == 0).float().mean())}


@STRATEGIES.register("backdoor_erm")
@dataclass
class BackdoorERM(_StrataStrategy):
    """Back-door-adjusted training: min sum_i P(D = d_i) E_{I_c} L(f(d_i(I_c)), I_c) (eq. BD-IR).

    ``enumerate``: B // K clean patches, each distorted by every stratum (B images forwarded, as ERM), loss
    ``sum_i probs[i] * L_i``. ``sample``: each of the B patches gets d_i ~ probs independently of its content.
    """

    probs: Tuple[float, ...] = (0.5, 0.5)
    mode: str = "enumerate"
    name: str = field(default="backdoor_erm", init=False)

    def __post_init__(self) -> None:
        check_choice("BackdoorERM", "mode", self.mode, ("enumerate", "sample"))
        _check_probs("BackdoorERM", self.probs)
        self.probs = tuple(float(p) for p in self.probs)

    def step(self, ctx: StepContext) -> Dict[str, float]:
        k = len(ctx.distortions)
        if k != len(self.probs):
            raise ValueError(f"backdoor_erm has {len(self.probs)} stratum probabilities for {k} strata")
        clean = ctx.sample_clean()
        if self.mode == "sample":
            idx = independent_strata(clean.shape[0], self.probs, ctx.generator, clean.device)
            noisy = ctx.prepare(apply_strata(clean, ctx.distortions, idx, ctx.generator))
            with ctx.autocast():
                out = ctx.model(noisy)
            stats = self._update(ctx, ctx.loss_fn(at_least_fp32(out), clean), clean.shape[0])
            return {**stats, "heavy_share": float((idx == 0).float().mean())}
        m = max(clean.shape[0] // k, 1)
        base = clean[:m]
        noisy = ctx.prepare(torch.cat([d(base, ctx.generator) for d in ctx.distortions]))
        with ctx.autocast():
            out = ctx.model(noisy)
        out = at_least_fp32(out)  # the losses in fp32 (bf16 autocast outputs promoted)
        target = base.repeat(k, 1, 1, 1)
        losses = torch.stack([ctx.loss_fn(o, t) for o, t in zip(out.split(m), target.split(m))])
        loss = (losses * losses.new_tensor(self.probs)).sum()
        return {**self._update(ctx, loss, m * k), "heavy_share": self.probs[0]}
