"""ONE training loop for every strategy.

The loop owns the device, the data stream, the randomness, validation, progress and checkpoints; a *strategy*
owns the per-step logic (how batches become a parameter update) and its optimiser state. ERM ships here;
DIL's strategies live in :mod:`causalir.dil`. Because the per-step logic sits in the strategy, the same loop can
run under torchrun (see :mod:`causalir.distributed`): every rank draws the same global batch and trains on its
slice (``StepContext.local``); ERM-like strategies run the model wrapped in DistributedDataParallel, the
functional (meta-learning) ones have their gradients averaged in the one update.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save
from tqdm.auto import tqdm

from . import distributed as dist_
from .data import PatchSampler
from .distortions import Distortion, apply_random
from .metrics import per_sample_mse, psnr
from .registry import Registry
from .utils import PathLike, check_choice, check_images, check_number, make_generator, resolve_device


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs; strategies read their own hyper-parameters from their config."""

    steps: int = 1000
    batch_size: int = 16
    patch_size: int = 64
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    schedule: str = "cosine"        # cosine | step | constant
    lr_min_ratio: float = 0.01      # cosine floor as a share of lr
    lr_step_every: int = 0          # step schedule: halve every this many steps
    loss: str = "l1"                # l1 | l2 | psnr (see LOSSES)
    grad_clip: float = 0.0
    val_every: int = 0
    ckpt_every: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"         # fp32 | bf16 (autocast to bfloat16 on CPU or CUDA, losses in fp32)
    channels_last: bool = False     # NHWC memory format for the model and its inputs (CPU and CUDA)
    progress: bool = True

    def __post_init__(self) -> None:
        o = "TrainConfig"
        check_number(o, "steps", self.steps, lo=0, integer=True)
        check_number(o, "batch_size", self.batch_size, lo=1, integer=True)
        check_number(o, "patch_size", self.patch_size, lo=8, integer=True)
        check_number(o, "lr", self.lr, lo=0, lo_open=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise (ValueError if isinstance(self.betas, (tuple, list)) else TypeError)(
                f"{o}.betas: expected a pair (beta1, beta2) of numbers >= 0 and < 1, got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_number(o, f"betas[{i}]", b, lo=0, hi=1, hi_open=True)
        check_choice(o, "schedule", self.schedule, SCHEDULES)
        check_number(o, "lr_min_ratio", self.lr_min_ratio, lo=0, hi=1)
        check_number(o, "lr_step_every", self.lr_step_every, lo=0, integer=True)
        if self.schedule == "step" and self.lr_step_every == 0:
            raise ValueError(f"{o}.lr_step_every: expected an integer >= 1 with schedule='step' (the lr halves every "
                             f"this many steps), got {self.lr_step_every!r}")
        check_choice(o, "loss", self.loss, tuple(LOSSES))
        check_number(o, "grad_clip", self.grad_clip, lo=0)
        check_number(o, "val_every", self.val_every, lo=0, integer=True)
        check_number(o, "ckpt_every", self.ckpt_every, lo=0, integer=True)
        check_number(o, "seed", self.seed, lo=0, integer=True)
        if self.seed >= 2**63:
            raise ValueError(f"{o}.seed: expected an integer >= 0 and < 2**63, got {self.seed!r}")
        if not isinstance(self.device, (str, torch.device)):
            raise TypeError(f"{o}.device: expected 'auto' or a device such as 'cpu', 'cuda' or 'cuda:1', "
                            f"got {self.device!r}")
        if isinstance(self.device, str) and self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"{o}.device: expected 'auto' or a device such as 'cpu', 'cuda' or 'cuda:1', "
                                 f"got {self.device!r}") from None
        check_choice(o, "precision", self.precision, PRECISIONS)
        for name in ("channels_last", "progress"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{o}.{name}: expected True or False, got {getattr(self, name)!r}")


SCHEDULES = ("cosine", "step", "constant")
#: ``TrainConfig.precision``: fp32 (no autocast; the default, bit-deterministic) or bf16 autocast.
PRECISIONS = ("fp32", "bf16")


def psnr_loss(out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Minus the batch's mean per-image PSNR (dB, peak 1): mean_i 10 log10(MSE_i + 1e-10), MSE_i over image i's
    pixels. Every image weighs alike in dB whatever its error, where an L1 / L2 loss over pooled degradations of very
    different error (noise against a light blur) is ruled by the large-error ones (issue 14: the unified model grew
    worse on blur while it learned to denoise)."""
    if out.shape != gt.shape or out.dim() < 2:
        raise ValueError(f"psnr_loss: expected two batches of the same shape (N, ...), got {tuple(out.shape)} and "
                         f"{tuple(gt.shape)}")
    return 10 * torch.log10(per_sample_mse(out, gt) + 1e-10).mean()


#: ``TrainConfig.loss``: l1, l2 (MSE) or psnr (minus the mean per-image PSNR, :func:`psnr_loss`)
LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss,
                                                                         "psnr": psnr_loss}


@dataclass
class Counters:
    """Equal-budget accounting: images forwarded / backpropagated and distorted batches drawn."""

    steps: int = 0
    distorted_batches: int = 0
    images_forwarded: int = 0
    images_backpropagated: int = 0

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class StepContext:
    """What a strategy sees at each step."""

    model: nn.Module
    sample_clean: Callable[[], torch.Tensor]
    distortions: Sequence[Distortion]
    generator: torch.Generator
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager]
    counters: Counters
    cfg: TrainConfig
    #: this process's rank and the number of ranks (torchrun); 1 rank outside a process group
    rank: int = 0
    world: int = 1

    def local(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's slice of a global batch along ``dim`` (the batch itself with one rank): every rank draws
        the same ``world * batch_size`` samples and trains on its own ``batch_size`` of them."""
        return t if self.world == 1 else dist_.local_slice(t, dim, self.rank, self.world)

    def distort(self, clean: torch.Tensor, distortion: Optional[Distortion] = None) -> torch.Tensor:
        """Distort a clean batch with one distortion, or (None) a random seen one per sample; counts the batch."""
        self.counters.distorted_batches += 1
        if distortion is None:
            return apply_random(self.distortions, clean, self.generator)[0]
        return distortion(clean, self.generator)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A model input in the run's memory format: NHWC with ``cfg.channels_last`` (4-D batches), else as is."""
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last and x.dim() == 4 else x


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """A model output for the loss: bf16/fp16 (autocast) -> fp32; fp32 and fp64 unchanged (the same tensor)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def to_channels_last(model: nn.Module) -> nn.Module:
    """Every 4-D parameter and buffer of ``model`` in NHWC (channels_last) memory format, in place (the same
    Parameter objects); others (e.g. ADMS's 5-D per-degradation kernels, which ``Module.to(memory_format=...)``
    refuses) are left as they are."""
    with torch.no_grad():
        for m in model.modules():
            for store in (m._parameters, m._buffers):
                for t in store.values():
                    if t is not None and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                        t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------- precision
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def precision_support(device: str | torch.device = "cpu") -> Dict[str, Any]:
    """Whether bf16 autocast can run on ``device`` with bfloat16 kernels: ``{"device", "bf16", "native", "machine",
    "detail"}``.

    CPU: ``bf16`` is oneDNN's own gate, ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (x86 with AVX-512
    BW/VL/DQ or newer, or an ARM CPU with the BF16 extension), with oneDNN available. It is what PyTorch itself
    checks before it routes a bf16 convolution or matmul to oneDNN; without it autocast falls back to reference
    kernels many times slower than fp32 (12-14x per DnCNN/RRDB step on an AVX2-only CPU, data/results/bench-cpu.md).
    ``torch.backends.cpu.get_cpu_capability()`` is not enough: it names ATen's vector ISA and says "AVX512" also
    on CPUs with no bf16 instructions.
    ``native`` adds whether the CPU has bf16 arithmetic (AVX512_BF16 or AMX), where bf16 beats fp32.
    CUDA: ``torch.cuda.is_bf16_supported()`` without emulation (compute capability 8.0+)."""
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dev.type == "cuda":
        try:
            ok = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # an older signature
            ok = bool(torch.cuda.is_bf16_supported())
        name = torch.cuda.get_device_name(dev)
        cc = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        return {"device": str(dev), "bf16": ok, "native": ok, "machine": name,
                "detail": f"{name}, compute capability {cc}" + ("" if ok else " (bf16 needs 8.0 or newer)")}
    if dev.type == "cpu":
        import platform

        onednn = bool(torch.backends.mkldnn.is_available())
        ok = onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        arm = platform.machine().lower() in ("aarch64", "arm64")  # there oneDNN's gate is the BF16 extension itself
        avx512 = bool(getattr(torch.cpu, "_is_avx512_supported", lambda: False)())
        native = ok and (arm or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
                         or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()))
        parts = [f"CPU capability {torch.backends.cpu.get_cpu_capability()}"]
        if not onednn:
            parts.append("PyTorch built without oneDNN, so no oneDNN bf16 kernels")
        elif not ok:
            parts.append("no BF16 extension, so no oneDNN bf16 kernels" if arm else
                         ("no AVX-512" if not avx512 else "AVX-512 without BW/VL/DQ")
                         + ", so no oneDNN bf16 kernels (they need AVX-512 BW/VL/DQ, AVX512_BF16 or AMX)")
        else:
            parts.append("oneDNN bf16 kernels, " + ("native bf16 arithmetic" if native else
                         "no native bf16 arithmetic (AVX512_BF16/AMX): bf16 may be no faster than fp32"))
        return {"device": "cpu", "bf16": ok, "native": native, "machine": _cpu_name(), "detail": ", ".join(parts)}
    return {"device": str(dev), "bf16": False, "native": False, "machine": dev.type,
            "detail": f"bf16 autocast is supported on CPU and CUDA here, not on {dev.type!r}"}


def check_precision(precision: str, device: str | torch.device = "cpu", *, fallback: bool = False) -> str:
    """The precision a run on ``device`` uses: ``precision`` itself when the device supports it; otherwise a
    ValueError naming ``TrainConfig.precision`` and what the machine lacks, or, with ``fallback=True`` (asked
    for explicitly), "fp32" with a warning."""
    check_choice("TrainConfig", "precision", precision, PRECISIONS)
    if precision == "fp32":
        return precision
    sup = precision_support(device)
    if sup["bf16"]:
        return precision
    msg = (f"TrainConfig.precision: 'bf16' needs bfloat16 kernels on the training device, which this machine lacks: "
           f"{sup['machine']}: {sup['detail']}")
    if fallback:
        warnings.warn(msg + "; falling back to 'fp32' as asked", RuntimeWarning, stacklevel=2)
        return "fp32"
    raise ValueError(msg + "; use precision='fp32' (CLI --precision fp32)")


def make_optimizer(params, cfg: TrainConfig, lr: Optional[float] = None, betas: Optional[tuple] = None):
    return torch.optim.Adam(params, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas if betas is None else betas))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """cosine: lr -> lr*lr_min_ratio over cfg.steps; step: halve every lr_step_every; constant."""
    if cfg.schedule == "cosine":
        total = max(cfg.steps, 1)
        f = lambda s: cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    elif cfg.schedule == "step" and cfg.lr_step_every:
        f = lambda s: 0.5 ** (s // cfg.lr_step_every)  # noqa: E731
    else:
        f = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


class Strategy:
    """Turns batches into a parameter update. Subclasses implement ``configure`` and ``step``."""

    name = "base"
    # Attributes whose state_dict() is checkpointed (optimisers, schedulers); a strategy with more state
    # (e.g. a task network) extends this tuple or overrides state_dict/load_state_dict.
    stateful: ClassVar[tuple] = ("opt", "sched")

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        raise NotImplementedError

    def step(self, ctx: StepContext) -> Dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k).state_dict() for k in self.stateful if hasattr(self, k)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self.stateful:
            if hasattr(self, k):
                if k not in state:
                    raise ValueError(f"checkpointed strategy state has no {k!r} (has {sorted(state)})")
                getattr(self, k).load_state_dict(state[k])

    def describe(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"name": self.name, **d}

    #: True for a strategy that draws its own (e.g. precomputed, paired) data: fit then needs no images.
    owns_data: ClassVar[bool] = False
    #: how the strategy runs under torchrun (see :mod:`causalir.distributed`): "ddp" (the model wrapped in
    #: DistributedDataParallel; only ``loss.backward()`` on the module), "functional" (gradients it computes
    #: itself, averaged over the ranks in :meth:`update`), or "" (not supported: ``fit`` refuses world size > 1).
    distributed: ClassVar[str] = ""

    def data_digest(self) -> Optional[str]:
        """sha256 of the data the strategy owns (None when it owns none): part of a run's data fingerprint, so
        that a resume on other data is refused (see :func:`fit`)."""
        return None

    def update(self, ctx: StepContext, loss_or_grads: torch.Tensor | Mapping[str, torch.Tensor], n_images: int, *,
               n_backprop: Optional[int] = None, opt: Optional[torch.optim.Optimizer] = None,
               sched: Any = None) -> None:
        """The one parameter update every strategy makes: zero the gradients; backpropagate ``loss`` (a tensor)
        or set the gradients to ``grads`` (a dict by parameter name, e.g. a meta-gradient); clip their norm at
        ``cfg.grad_clip`` (0 = off); one optimiser step and one scheduler step; count ``n_images`` forwarded and
        ``n_backprop`` (default ``n_images``) backpropagated. ``opt``/``sched`` default to ``self.opt``/``self.sched``.

        Under torchrun the gradients are the mean over the ranks before clipping (DDP averages them during the
        backward of a wrapped model; any other gradient is averaged here with one all-reduce), and the counts are
        per rank (``n_images`` of this rank's slice) times the number of ranks."""
        opt = self.opt if opt is None else opt
        sched = getattr(self, "sched", None) if sched is None else sched
        model = ctx.model
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        opt.zero_grad(set_to_none=True)
        if isinstance(loss_or_grads, Mapping):
            for n, p in (model.module if ddp else model).named_parameters():
                if n in loss_or_grads:
                    p.grad = loss_or_grads[n].to(p.dtype)
            ddp = False  # DDP never saw these gradients
        else:
            loss_or_grads.backward()
        if ctx.world > 1 and not ddp:
            dist_.average_gradients(model.parameters())
        if ctx.cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], ctx.cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        ctx.counters.images_forwarded += int(n_images) * ctx.world
        ctx.counters.images_backpropagated += int(n_images if n_backprop is None else n_backprop) * ctx.world


STRATEGIES: Registry[Strategy] = Registry("strategy")
# The method modules that register further strategies, imported by build_strategy (an explicit table: core
# names them as strings and never imports them statically, see tests/test_layers.py).
STRATEGY_MODULES = ("causalir.dil", "causalir.backdoor", "causalir.adms", "causalir.attribution")


@STRATEGIES.register("erm")
@dataclass
class ERM(Strategy):
    """Empirical risk minimisation: one batch, each sample distorted by a random seen distortion, one Adam step
    on L(f_theta(I_d), I_c)."""

    name: str = field(default="erm", init=False)
    distributed: ClassVar[str] = "ddp"

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.opt = make_optimizer(model.parameters(), cfg)
        self.sched = make_scheduler(self.opt, cfg)

    def step(self, ctx: StepContext) -> Dict[str, float]:
        clean = ctx.sample_clean()
        noisy = ctx.prepare(ctx.local(ctx.distort(clean)))
        clean = ctx.local(clean)
        with ctx.autocast():
            out = ctx.model(noisy)
        loss = ctx.loss_fn(at_least_fp32(out), clean)  # bf16 -> fp32, keep fp64
        self.update(ctx, loss, clean.shape[0])
        return {"loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0]}


@STRATEGIES.register("paired_mse")
class PairedMSE(Strategy):
    """Minibatches from a fixed paired set (precomputed distortions, e.g. JPEG encoded once): per step
    ``batch_size`` random pairs, a random dihedral transform, one update on L(f(y), x) (``TrainConfig.loss``)."""

    name = "paired_mse"
    owns_data = True
    distributed = "ddp"

    def __init__(self, clean: torch.Tensor, dist: torch.Tensor) -> None:
        if not isinstance(clean, torch.Tensor) or not isinstance(dist, torch.Tensor):
            raise TypeError("paired_mse: clean and dist must be tensors (N,C,H,W)")
        if clean.shape != dist.shape:
            raise ValueError(f"paired_mse: clean {tuple(clean.shape)} and distorted {tuple(dist.shape)} differ")
        self.clean, self.dist = clean, dist

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.opt = make_optimizer(model.parameters(), cfg)
        self.sched = make_scheduler(self.opt, cfg)

    def step(self, ctx: StepContext) -> Dict[str, float]:
        from .data import dihedral

        dev = next(ctx.model.parameters()).device
        idx = torch.randint(len(self.clean), (ctx.cfg.batch_size * ctx.world,), generator=ctx.generator,
                            device=ctx.generator.device).cpu()
        t = torch.randint(8, (len(idx),), generator=ctx.generator, device=ctx.generator.device)
        idx, t = ctx.local(idx), ctx.local(t).to(dev)
        x, y = self.clean[idx].to(dev), self.dist[idx].to(dev)
        x, y = dihedral(x, t), dihedral(y, t)
        y = ctx.prepare(y)
        with ctx.autocast():
            out = ctx.model(y)
        loss = ctx.loss_fn(at_least_fp32(out), x)
        self.update(ctx, loss, len(idx))
        return {"loss": float(loss.detach())}

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "n": len(self.clean)}

    def data_digest(self) -> Optional[str]:
        h = hashlib.sha256()
        for t in (self.clean, self.dist):
            _hash_tensor(h, t)
        return h.hexdigest()


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """A strategy by name (``erm``, ``paired_mse``, ``dil_pf``, ``dil_ps``, ``dil_sf``, ``dil_ss``,
    ``dil_sf_reference``, ``confounded_erm``, ``backdoor_erm``, ``adms``, ``sr_x2``)."""
    _import_strategy_modules()
    return STRATEGIES.build(name, **kwargs)


def _import_strategy_modules() -> None:
    import importlib

    for mod in STRATEGY_MODULES:  # every module exists; a failing import is a real error and propagates
        importlib.import_module(mod)


def strategy_names() -> List[str]:
    """Every registered strategy name."""
    _import_strategy_modules()
    return STRATEGIES.names()


# -------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: nn.Module
    history: List[Dict[str, Any]]
    counters: Counters
    wall_time: float
    run_dir: Optional[Path]


#: :func:`validate`'s default seed: label j of the distortion dict and image i use generator seed VAL_SEED + 1000 j + i
VAL_SEED = 1234


def validate(model: nn.Module, val_images: Sequence[torch.Tensor], val_distortions: Mapping[str, Distortion],
             seed: int = VAL_SEED, device: Optional[torch.device] = None) -> Dict[str, float]:
    """Mean PSNR per distortion label on fixed, seeded distorted copies of the validation images (label j, image i:
    generator seed ``seed + 1000 j + i``)."""
    _check_validation_inputs(model, val_images, val_distortions)
    check_number("validate", "seed", seed, lo=0, integer=True)
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    out: Dict[str, float] = {}
    with torch.no_grad():
        for j, (label, d) in enumerate(val_distortions.items()):
            vals = []
            for i, img in enumerate(val_images):
                x = img[None].to(device)
                g = make_generator(seed + 1000 * j + i, device)
                vals.append(psnr(model(d(x, g)).clamp(0, 1), x))
            out[label] = float(sum(vals) / len(vals))
    model.train(was)
    return out


def autocast_factory(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """``ctx.autocast``: bf16 autocast on the training device (CPU or CUDA) with precision='bf16', else a no-op."""
    if cfg.precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _config_record(model: nn.Module, strategy: Strategy, cfg: TrainConfig, distortions: Sequence[Distortion]) -> dict:
    return {"model": getattr(model, "config", {"name": type(model).__name__}), "strategy": strategy.describe(),
            "train": dataclasses.asdict(cfg), "distortions": [d.label for d in distortions]}


def _comparable(rec: dict) -> dict:
    rec = json.loads(json.dumps(rec, default=str))
    for k in ("progress", "val_every", "ckpt_every", "steps", "device"):
        rec["train"].pop(k, None)
    rec["train"].pop("schedule_steps", None)
    return rec


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _diff(saved: dict, now: dict) -> str:
    a, b = _flat(saved), _flat(now)
    rows = [f"{k}: saved {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, ()) != b.get(k, ())]
    return "; ".join(rows[:8]) + (f"; ... ({len(rows) - 8} more)" if len(rows) > 8 else "")


#: The values ``fit(allow_changed=...)`` (CLI: ``--allow-changed``) accepts.
ALLOW_CHANGED = ("data", "steps")


def fit(model: nn.Module, strategy: Strategy, train_images: Sequence[torch.Tensor] | PatchSampler | None,
        distortions: Sequence[Distortion], cfg: TrainConfig = TrainConfig(), *,
        val_images: Optional[Sequence[torch.Tensor]] = None, val_distortions: Optional[Mapping[str, Distortion]] = None,
        run_dir: Optional[PathLike] = None, resume: bool = True, allow_changed: Collection[str] = (),
        callback: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> TrainResult:
    """Train ``model`` with ``strategy`` on patches of ``train_images`` distorted by the seen ``distortions``.

    **Randomness.** Everything the loop draws (patches, distortions, strategy choices) comes from one
    ``torch.Generator`` seeded with ``cfg.seed``. The global RNGs (torch CPU and the training device, numpy,
    python ``random``) are, for the duration of the call, seeded from a value derived from ``cfg.seed`` and put
    back to the caller's state on return, so a strategy that draws from them is reproducible too and a call
    never depends on (or disturbs) the caller's global RNG state. The model's initial weights are the caller's:
    seed before building it (``causalir train --seed`` does).

    **Checkpoints.** With ``run_dir``, every ``cfg.ckpt_every`` steps and at the end one *unit* is written::

        run_dir/ckpt-00000020/  model.safetensors  state.pt  run.json

    ``state.pt`` holds the strategy state (optimiser moments, schedulers), the loop's generator, the global RNG
    states and the counters; ``run.json`` the format, step, config, data fingerprint, history and the sha256 of
    the two other files. A unit is written complete into ``.ckpt-00000020.tmp/`` (each file fsynced, run.json
    last, the folder fsynced), then put in place with one rename and ``run_dir`` fsynced: a kill at any point
    leaves the previous unit intact. The newest unit and the one before it are kept (older ones are renamed
    to a ``*.tmp`` name, then deleted). On start, orphaned ``*.tmp`` entries of this layout are removed; units
    are tried newest first, and one that fails its check (missing file, digest, format or step mismatch) is
    refused with a warning and the previous good one is used. A run folder in the older three-file layout (no
    units) is refused for resuming (its files cannot be checked as one unit); :func:`find_checkpoint` with
    ``legacy=True`` still reads its weights.

    **Resuming.** With ``resume=True`` a later call continues exactly where the newest good unit stopped (same
    batches, same noise, same optimiser moments: bit-identical to an uninterrupted run). Refused, unless named
    in ``allow_changed``: other training data (``"data"``: fingerprint of the patch sampler's images and of any
    data the strategy owns) and a changed ``cfg.steps`` under the cosine schedule, which spans the step count
    (``"steps"``; with ``constant``/``step`` schedules a longer run continues exactly and needs no permission).
    Always refused: another configuration, a unit past ``cfg.steps`` and a unit written on another device type.
    ``resume=False`` on an existing run is an error: nothing is overwritten silently. ``run_dir`` is checked
    (a writable folder, empty or a run) before anything is trained.

    **torchrun.** Started by ``torchrun --nproc_per_node R`` (``causalir train --nproc R``), ``fit`` joins the
    process group, starts every rank from rank 0's weights and trains data-parallel: ``cfg.batch_size`` is the
    batch of one rank, every rank draws the same global batch of ``R * cfg.batch_size`` and trains on its slice,
    and the gradients are averaged over the ranks (see :mod:`causalir.distributed`), so R ranks x batch B take
    the steps of 1 rank x batch R*B. Rank 0 writes the checkpoints (a run is resumed with the same number of
    ranks); the counters count the images of all ranks.
    """
    _check_fit_inputs(model, strategy, train_images, distortions, cfg, val_images, val_distortions, resume,
                      allow_changed, callback)
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)  # bf16 on a machine without bf16 kernels: refused before anything runs
    dist_.init_from_env(device)  # under torchrun: join the process group (gloo on CPU, nccl on CUDA)
    rank, world = dist_.rank_world()
    if world > 1:
        _check_distributed(strategy, world)
        device = dist_.rank_device(device)
    run_path = None
    if run_dir is not None:  # rank 0 checks (and tidies) the folder first, then the others look at it
        if rank == 0:
            run_path = check_run_dir(run_dir)
        dist_.barrier()
        if rank != 0:
            run_path = check_run_dir(run_dir)
    with _GlobalRNG(cfg.seed, device) as global_rng:
        return _fit(model, strategy, train_images, distortions, cfg, val_images, val_distortions, run_path, resume,
                    set(allow_changed), callback, device, global_rng)


def _fit(model, strategy, train_images, distortions, cfg, val_images, val_distortions, run_path, resume,
         allow_changed, callback, device, global_rng) -> TrainResult:
    model.to(device)
    if cfg.channels_last:
        to_channels_last(model)
    model.train()
    sampler = train_images if isinstance(train_images, PatchSampler) or train_images is None else PatchSampler(
        train_images, cfg.patch_size, cfg.batch_size * dist_.rank_world()[1], device)
    if sampler is not None and sampler.device != device:
        raise ValueError(f"PatchSampler is on {sampler.device} but training runs on {device}")
    rank, world = dist_.rank_world()
    if world > 1 and sampler is not None and sampler.batch_size != cfg.batch_size * world:
        raise ValueError(f"PatchSampler.batch_size is {sampler.batch_size}; with {world} ranks of batch_size "
                         f"{cfg.batch_size} it must draw the global batch of {cfg.batch_size * world}")
    gen = make_generator(cfg.seed, device)
    strategy.configure(model, cfg)
    counters = Counters()
    history: List[Dict[str, Any]] = []
    record = _config_record(model, strategy, cfg, distortions)
    if world > 1:  # a run is resumed with the same number of ranks (the global batch depends on it)
        record["world_size"] = world
    fingerprint = data_fingerprint(sampler, strategy) if run_path is not None else None
    if run_path is not None:
        units, legacy = _units(run_path), (run_path / "run.json").exists()
        if (units or legacy) and not resume:
            raise FileExistsError(f"{run_path} already holds a run; pass resume=True to continue it or choose "
                                  "another run_dir (nothing is overwritten silently)")
        if units:
            unit, saved = _newest_good_unit(run_path, units)
            _check_resumable(run_path, saved, record, fingerprint, cfg, allow_changed, device)
            _load_checkpoint(unit, saved, model, strategy, gen, global_rng, counters, device)
            history = saved.get("history", [])
        elif legacy:
            raise ValueError(f"{run_path} holds a checkpoint in the older three-file layout (run.json, state.pt, "
                             "model.safetensors replaced one after another), which cannot be checked as one unit "
                             "and is not resumed; start a new run_dir (causalir evaluate still reads its weights)")

    def sample_clean() -> torch.Tensor:
        if sampler is None:
            raise RuntimeError(f"strategy {strategy.name!r} owns its data: fit was given no images to sample")
        return sampler.sample(gen)

    dist_.broadcast_module(model)  # every rank starts from rank 0's weights (DDP's start; a resume loads them alike)
    net = model
    if world > 1 and strategy.distributed == "ddp":
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = StepContext(net, sample_clean, tuple(distortions), gen, LOSSES[cfg.loss],
                      autocast_factory(cfg, device), counters, cfg, rank, world)
    t0 = time.perf_counter()
    elapsed0 = history[-1]["wall_time"] if history else 0.0
    bar = tqdm(total=cfg.steps, initial=counters.steps, disable=not cfg.progress, desc=strategy.name, leave=False)
    while counters.steps < cfg.steps:
        stats = strategy.step(ctx)
        counters.steps += 1
        bar.update(1)
        step = counters.steps
        do_val = bool(val_images) and bool(val_distortions) and cfg.val_every and (step % cfg.val_every == 0
                                                                                  or step == cfg.steps)
        if do_val or step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            entry: Dict[str, Any] = {"step": step, **stats, **counters.as_dict(),
                                     "wall_time": elapsed0 + time.perf_counter() - t0}
            if do_val:
                entry["val_psnr"] = validate(model, val_images, val_distortions, device=device)
            history.append(entry)
            bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.4f}")
            if callback is not None and rank == 0:
                callback(step, entry)
        if run_path is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
            if rank == 0:
                _save_checkpoint(run_path, model, strategy, gen, global_rng, counters, record, fingerprint, device,
                                 history)
            dist_.barrier()  # no rank runs ahead of a unit being written
    bar.close()
    wall = elapsed0 + time.perf_counter() - t0
    model.eval()
    return TrainResult(model, history, counters, wall, run_path)


# ------------------------------------------------------------------------------------------ input checks
def _check_distributed(strategy: Strategy, world: int) -> None:
    """A run under torchrun needs a strategy that supports it (``Strategy.distributed``)."""
    if not strategy.distributed:
        _import_strategy_modules()
        ok = sorted(n for n in STRATEGIES.names() if getattr(STRATEGIES.get(n), "distributed", ""))
        raise ValueError(f"strategy {strategy.name!r} does not run under torchrun (world size {world}); strategies "
                         f"that do: {', '.join(ok)}")


def _check_validation_inputs(model: Any, val_images: Any, val_distortions: Any, allow_empty: bool = False) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(val_images, torch.Tensor) or not isinstance(val_images, Sequence):
        raise TypeError(f"val_images: expected a list of (C,H,W) image tensors, got {type(val_images).__name__}")
    if not val_images and not allow_empty:
        raise ValueError("val_images: expected at least one (C,H,W) image tensor, got an empty list")
    for i, im in enumerate(val_images):
        check_images(im, f"val_images[{i}]", batched=False)
    if not isinstance(val_distortions, Mapping):
        raise TypeError(f"val_distortions: expected a mapping label -> distortion, got "
                        f"{type(val_distortions).__name__}")
    if not val_distortions and not allow_empty:
        raise ValueError("val_distortions: expected at least one label -> distortion, got an empty mapping")
    for k, d in val_distortions.items():
        if not callable(d):
            raise TypeError(f"val_distortions[{k!r}]: expected a distortion (callable), got {type(d).__name__}")


def _check_fit_inputs(model, strategy, train_images, distortions, cfg, val_images, val_distortions, resume,
                      allow_changed, callback) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(strategy, Strategy):
        raise TypeError(f"fit: strategy: expected a causalir.train.Strategy (see build_strategy), got "
                        f"{type(strategy).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"fit: cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if isinstance(distortions, (str, bytes)) or not isinstance(distortions, (Sequence, tuple, list)):
        raise TypeError(f"fit: distortions: expected a sequence of distortions, got {type(distortions).__name__}")
    for i, d in enumerate(distortions):
        if not callable(d) or not hasattr(d, "label"):
            raise TypeError(f"fit: distortions[{i}]: expected a distortion (callable with a label), got "
                            f"{type(d).__name__}")
    if not distortions and not strategy.owns_data:
        raise ValueError("fit: expected at least one seen distortion")
    if train_images is None and not strategy.owns_data:
        raise ValueError(f"fit: train_images is None but strategy {strategy.name!r} does not draw its own data")
    if train_images is not None and not isinstance(train_images, PatchSampler) and (
            isinstance(train_images, torch.Tensor) or not isinstance(train_images, Sequence)):
        raise TypeError(f"fit: train_images: expected a list of (C,H,W) image tensors, a PatchSampler or None, "
                        f"got {type(train_images).__name__}")
    if val_images is not None or val_distortions is not None:  # validation runs when both are non-empty
        _check_validation_inputs(model, [] if val_images is None else val_images,
                                 {} if val_distortions is None else val_distortions, allow_empty=True)
    if not isinstance(resume, (bool, np.bool_)):
        raise TypeError(f"fit: resume: expected True or False, got {resume!r}")
    if isinstance(allow_changed, str) or not isinstance(allow_changed, Collection):
        raise TypeError(f"fit: allow_changed: expected a collection of {ALLOW_CHANGED}, got {allow_changed!r}")
    for a in allow_changed:
        check_choice("fit", "allow_changed", a, ALLOW_CHANGED)
    if callback is not None and not callable(callback):
        raise TypeError(f"fit: callback: expected a callable (step, entry) or None, got {type(callback).__name__}")


# ------------------------------------------------------------------------------------------ randomness
class _GlobalRNG:
    """fit's own stream in the global RNGs (torch CPU + the training device, numpy, python ``random``): seeded on
    entry from a value derived from the run's seed, saved in checkpoints, the caller's states restored on exit."""

    def __init__(self, seed: int, device: torch.device) -> None:
        digest = hashlib.sha256(f"causalir.train.fit global RNG {int(seed)}".encode()).digest()
        self.seed = int.from_bytes(digest[:8], "little") >> 1  # not cfg.seed itself: no stream equals the generator's
        self.device = device

    def get(self) -> Dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        py = random.getstate()
        st: Dict[str, Any] = {"torch": torch.get_rng_state(),
                              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                        float(cached)],
                              "python": [py[0], torch.tensor(py[1], dtype=torch.int64), py[2]]}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        elif self.device.type == "mps":
            st["mps"] = torch.mps.get_rng_state()
        return st

    def set(self, st: Mapping[str, Any]) -> None:
        torch.set_rng_state(st["torch"])
        name, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        random.setstate((st["python"][0], tuple(st["python"][1].tolist()), st["python"][2]))
        if self.device.type == "cuda" and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"], self.device)
        elif self.device.type == "mps" and "mps" in st:
            torch.mps.set_rng_state(st["mps"])

    def __enter__(self) -> "_GlobalRNG":
        self._outer = self.get()
        torch.default_generator.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        random.seed(self.seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self.seed)
        elif self.device.type == "mps":
            torch.mps.manual_seed(self.seed)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.set(self._outer)


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def data_fingerprint(sampler: Optional[PatchSampler], strategy: Optional[Strategy] = None) -> str:
    """sha256 of what a run trains on: the patch sampler's images (as the uint8 stack it samples from) with its
    patch/batch size and augmentation, plus :meth:`Strategy.data_digest` of the strategy's own data."""
    h = hashlib.sha256()
    if sampler is not None:
        h.update(json.dumps({"patch_size": sampler.patch_size, "batch_size": sampler.batch_size,
                             "augment": bool(sampler.augment), "sizes": sampler.sizes.tolist()}).encode())
        _hash_tensor(h, sampler.stack)
    own = strategy.data_digest() if strategy is not None else None
    if own is not None:
        h.update(own.encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ run folders
CHECKPOINT_FORMAT = "causalir-checkpoint/2"
#: The files of one unit besides run.json; run.json, written last, holds their sha256.
UNIT_FILES = ("model.safetensors", "state.pt")
_UNIT = re.compile(r"^ckpt-(\d{8,})$")
# Orphans of an interrupted write: a unit in the making / moved aside, a write probe, or the older layout's
# temporary files (utils.atomic_write_bytes). Only these names are ever removed.
_ORPHAN = re.compile(r"^\.(ckpt-\d{8,}(\.(old|refused))?|probe-\w+|(model\.safetensors|state\.pt|run\.json)\.\w+)\.tmp$")
_LEGACY_FILES = ("run.json", "state.pt", "model.safetensors")


def check_run_dir(run_dir: PathLike) -> Path:
    """Make sure ``run_dir`` can hold a run before anything is trained: a folder (created if missing) that is
    writable and empty or a causalir run; orphaned ``*.tmp`` entries of an interrupted checkpoint are removed."""
    if not isinstance(run_dir, (str, os.PathLike)) or str(run_dir) == "":
        raise TypeError(f"run_dir: expected a folder path, got {run_dir!r}")
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"run_dir {run} is a file, expected a folder for the run's checkpoints")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"run_dir {run}: cannot create the folder ({e.strerror or e})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=run, prefix=".probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"run_dir {run} is not writable ({e.strerror or e}): checkpoints could not be "
                              "saved; choose a writable folder") from None
    for p in run.iterdir():
        if _ORPHAN.match(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    foreign = sorted(p.name for p in run.iterdir()
                     if not p.name.startswith(".") and not (_UNIT.match(p.name) and p.is_dir())
                     and p.name not in _LEGACY_FILES)
    if foreign:
        raise ValueError(f"run_dir {run} holds entries that are not part of a causalir run ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); choose an empty or new folder")
    return run


def _units(run: Path) -> List[Tuple[int, Path]]:
    """The checkpoint units of a run folder, newest first."""
    if not run.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in run.iterdir() if (m := _UNIT.match(p.name)) and p.is_dir()]
    return sorted(out, reverse=True)


class _Refused(Exception):
    pass


def _read_unit(unit: Path, step: int) -> dict:
    """A unit's run.json after checking it describes a complete unit; raises _Refused with the reason."""
    try:
        meta = json.loads((unit / "run.json").read_text())
    except FileNotFoundError:
        raise _Refused("no run.json (incomplete unit)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Refused(f"run.json is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise _Refused(f"run.json format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                       f"expected {CHECKPOINT_FORMAT!r}")
    if meta.get("step") != step:
        raise _Refused(f"run.json is for step {meta.get('step')!r}, the folder for step {step}")
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or sorted(digests) != sorted(UNIT_FILES):
        raise _Refused(f"run.json lists digests for {sorted(digests) if isinstance(digests, dict) else None}, "
                       f"expected {sorted(UNIT_FILES)}")
    for name in UNIT_FILES:
        try:
            got = hashlib.sha256((unit / name).read_bytes()).hexdigest()
        except OSError as e:
            raise _Refused(f"{name} is missing or unreadable ({e.strerror or e})") from None
        if got != digests[name]:
            raise _Refused(f"{name} does not match its recorded sha256 (stale or damaged)")
    return meta


def _newest_good_unit(run: Path, units: Sequence[Tuple[int, Path]]) -> Tuple[Path, dict]:
    reasons = []
    for step, unit in units:
        try:
            meta = _read_unit(unit, step)
        except _Refused as e:
            reasons.append(f"{unit.name}: {e}")
            warnings.warn(f"refused checkpoint {unit}: {e}; trying the previous one", RuntimeWarning, stacklevel=3)
            continue
        return unit, meta
    raise ValueError(f"{run} holds no valid checkpoint ({'; '.join(reasons)}); move the folder away to start "
                     "again or choose another run_dir")


def find_checkpoint(run_dir: PathLike, legacy: bool = False) -> Tuple[Path, dict]:
    """The newest valid checkpoint unit of ``run_dir`` and its run.json record (``record["config"]["model"]``
    rebuilds the model, ``unit / "model.safetensors"`` holds its weights); refused units are reported with a
    warning. With ``legacy=True`` a folder in the older three-file layout is returned itself (weights only: it
    is never resumed). Raises FileNotFoundError when ``run_dir`` holds no checkpoint."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a training run (no such folder); train one with `causalir train`")
    units = _units(run)
    if units:
        return _newest_good_unit(run, units)
    if legacy and (run / "run.json").is_file():
        try:
            rec = json.loads((run / "run.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"could not read {run / 'run.json'}: {e}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict) or "model" not in rec["config"]:
            raise ValueError(f"{run / 'run.json'} is not a causalir run record (no config.model)")
        return run, rec
    raise FileNotFoundError(f"{run} is not a training run (no checkpoint); train one with `causalir train`")


def _upgrade_record(rec: dict, device: torch.device) -> dict:
    """A run.json config written before ``TrainConfig.precision`` (a ``bf16`` flag, CUDA only, and channels_last
    CUDA only) as the settings that actually ran on ``device``: bf16/channels_last on CUDA, fp32 and the default
    memory format elsewhere (the flags were ignored there). A record that has ``precision`` is returned as is."""
    tr = rec.get("train") if isinstance(rec, dict) else None
    if not isinstance(tr, dict) or "precision" in tr or "bf16" not in tr:
        return rec
    tr = dict(tr)
    bf16 = tr.pop("bf16")
    cuda = device.type == "cuda"
    tr["precision"] = "bf16" if bf16 is True and cuda else "fp32"
    tr["channels_last"] = bool(tr.get("channels_last")) and cuda
    return {**rec, "train": tr}


def _check_resumable(run: Path, saved: dict, record: dict, fingerprint: Optional[str], cfg: TrainConfig,
                     allow_changed: Collection[str], device: torch.device) -> None:
    saved = {**saved, "config": _upgrade_record(saved["config"], device)}
    if _comparable(saved["config"]) != _comparable(record):
        raise ValueError(f"{run} holds a run with a different configuration ({_diff(_comparable(saved['config']), _comparable(record))}); "
                         "choose another run_dir")
    if saved.get("data_sha256") != fingerprint and "data" not in allow_changed:
        raise ValueError(f"{run} was trained on other data (fingerprint {str(saved.get('data_sha256'))[:12]}, now "
                         f"{str(fingerprint)[:12]}): resuming would mix two data sets; pass allow_changed=('data',) "
                         "(causalir train --allow-changed data) to continue on the new data, or choose another run_dir")
    at, was = int(saved["step"]), int(saved["config"]["train"]["steps"])
    if at > cfg.steps:
        raise ValueError(f"{run} is at step {at}, past TrainConfig.steps={cfg.steps}: a run is not shortened; pass "
                         f"steps >= {at} or choose another run_dir")
    if cfg.steps != was and cfg.schedule == "cosine" and "steps" not in allow_changed:
        raise ValueError(f"{run} was started with steps={was}, now steps={cfg.steps}: the cosine schedule spans the "
                         "step count, so continuing would reshape it (the result matches neither run); pass "
                         "allow_changed=('steps',) (causalir train --allow-changed steps) to continue anyway, or "
                         "choose another run_dir")


# The primitive steps of a checkpoint write (module functions, so that a test can make each fail in turn).
def _mkdir(path: Path) -> None:
    path.mkdir()


def _write(fh: Any, data: bytes) -> None:
    fh.write(data)


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _write_unit(run: Path, step: int, files: Mapping[str, bytes]) -> Path:
    """Write one checkpoint unit: complete in a temporary folder, then swapped in with one rename (see fit)."""
    name = f"ckpt-{step:08d}"
    final, tmp = run / name, run / f".{name}.tmp"
    if tmp.exists():
        _rmtree(tmp)
    _mkdir(tmp)
    for fname, data in files.items():  # run.json comes last
        with open(tmp / fname, "xb") as fh:
            _write(fh, data)
            fh.flush()
            _fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a unit refused on load at this very step: moved aside, deleted below
        aside = run / f".{name}.refused.tmp"
        if aside.exists():
            _rmtree(aside)
        _rename(final, aside)
    _rename(tmp, final)
    _fsync_dir(run)
    # keep this unit and the newest before it; the rest (older ones, refused later ones) go: renamed, then deleted
    units = _units(run)
    older = [p for s, p in units if s < step]
    for s, p in units:
        if p != final and (not older or p != older[0]):
            gone = run / f".{p.name}.old.tmp"
            _rename(p, gone)
            _rmtree(gone)
    if (run / f".{name}.refused.tmp").exists():
        _rmtree(run / f".{name}.refused.tmp")
    return final


def _save_checkpoint(run: Path, model: nn.Module, strategy: Strategy, gen: torch.Generator, global_rng: _GlobalRNG,
                     counters: Counters, record: dict, fingerprint: Optional[str], device: torch.device,
                     history: list) -> Path:
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"strategy": strategy.state_dict(), "generator": gen.get_state(), "global_rng": global_rng.get(),
                "counters": counters.as_dict(), "device": device.type}, buf)
    files = {"model.safetensors": save(weights), "state.pt": buf.getvalue()}
    meta = {"format": CHECKPOINT_FORMAT, "step": counters.steps, "config": record, "data_sha256": fingerprint,
            "counters": counters.as_dict(), "history": history, "torch": torch.__version__,
            "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}}
    from .utils import _json_default

    files["run.json"] = (json.dumps(meta, indent=2, default=_json_default) + "\n").encode()
    return _write_unit(run, counters.steps, files)


def _load_checkpoint(unit: Path, meta: dict, model: nn.Module, strategy: Strategy, gen: torch.Generator,
                     global_rng: _GlobalRNG, counters: Counters, device: torch.device) -> None:
    from .models import load_state

    try:
        state = torch.load(unit / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # the digest matched, so this is a file from another torch or a foreign writer
        raise ValueError(f"could not read {unit / 'state.pt'}: {e}") from None
    if state.get("device") != device.type:
        raise ValueError(f"{unit} was written by a run on {state.get('device')!r}, this one runs on "
                         f"{device.type!r}: the random streams differ, resume on {state.get('device')!r}")
    if int(state["counters"]["steps"]) != int(meta["step"]):
        raise ValueError(f"{unit}: state.pt is for step {state['counters']['steps']}, run.json for {meta['step']}")
    load_state(model, unit / "model.safetensors")
    strategy.load_state_dict(_to_device(state["strategy"], next(model.parameters()).device))
    gen.set_state(state["generator"])
    global_rng.set(state["global_rng"])
    for k, v in state["counters"].items():
        setattr(counters, k, int(v))


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
