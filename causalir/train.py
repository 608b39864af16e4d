"""ONE training loop for every strategy.

The loop owns the device, the data stream, the randomness, validation, progress and checkpoints; a *strategy*
owns the per-step logic (how batches become a parameter update) and its optimiser state. ERM ships here;
DIL's strategies live in :mod:`causalir.dil`. Because the per-step logic sits in the strategy, the same loop can
run under torchrun with the model wrapped in DistributedDataParallel without rewriting any strategy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save
from tqdm.auto import tqdm

from .data import PatchSampler
from .distortions import Distortion, apply_random
from .metrics import psnr
from .registry import Registry
from .utils import PathLike, atomic_write_bytes, atomic_write_json, make_generator, resolve_device


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
    loss: str = "l1"                # l1 | l2
    grad_clip: float = 0.0
    val_every: int = 0
    ckpt_every: int = 0
    seed: int = 0
    device: str = "auto"
    bf16: bool = False              # autocast to bfloat16 (CUDA only; ignored elsewhere)
    channels_last: bool = False     # NHWC memory format (CUDA only)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule: expected 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.steps < 0 or self.batch_size < 1 or self.patch_size < 8:
            raise ValueError("steps >= 0, batch_size >= 1 and patch_size >= 8 are required")


LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss}


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

    def distort(self, clean: torch.Tensor, distortion: Optional[Distortion] = None) -> torch.Tensor:
        """Distort a clean batch with one distortion, or (None) a random seen one per sample; counts the batch."""
        self.counters.distorted_batches += 1
        if distortion is None:
            return apply_random(self.distortions, clean, self.generator)[0]
        return distortion(clean, self.generator)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last and x.is_cuda else x


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

    def update(self, ctx: StepContext, loss_or_grads: torch.Tensor | Mapping[str, torch.Tensor], n_images: int, *,
               n_backprop: Optional[int] = None, opt: Optional[torch.optim.Optimizer] = None,
               sched: Any = None) -> None:
        """The one parameter update every strategy makes: zero the gradients; backpropagate ``loss`` (a tensor)
        or set the gradients to ``grads`` (a dict by parameter name, e.g. a meta-gradient); clip their norm at
        ``cfg.grad_clip`` (0 = off); one optimiser step and one scheduler step; count ``n_images`` forwarded and
        ``n_backprop`` (default ``n_images``) backpropagated. ``opt``/``sched`` default to ``self.opt``/``self.sched``."""
        opt = self.opt if opt is None else opt
        sched = getattr(self, "sched", None) if sched is None else sched
        model = ctx.model
        opt.zero_grad(set_to_none=True)
        if isinstance(loss_or_grads, Mapping):
            for n, p in model.named_parameters():
                if n in loss_or_grads:
                    p.grad = loss_or_grads[n].to(p.dtype)
        else:
            loss_or_grads.backward()
        if ctx.cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], ctx.cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        ctx.counters.images_forwarded += int(n_images)
        ctx.counters.images_backpropagated += int(n_images if n_backprop is None else n_backprop)


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

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.opt = make_optimizer(model.parameters(), cfg)
        self.sched = make_scheduler(self.opt, cfg)

    def step(self, ctx: StepContext) -> Dict[str, float]:
        clean = ctx.sample_clean()
        noisy = ctx.prepare(ctx.distort(clean))
        with ctx.autocast():
            out = ctx.model(noisy)
        loss = ctx.loss_fn(out.to(torch.promote_types(out.dtype, torch.float32)), clean)  # bf16 -> fp32, keep fp64
        self.update(ctx, loss, clean.shape[0])
        return {"loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0]}


@STRATEGIES.register("paired_mse")
class PairedMSE(Strategy):
    """Minibatches from a fixed paired set (precomputed distortions, e.g. JPEG encoded once): per step
    ``batch_size`` random pairs, a random dihedral transform, one update on L(f(y), x) (``TrainConfig.loss``)."""

    name = "paired_mse"
    owns_data = True

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
        idx = torch.randint(len(self.clean), (ctx.cfg.batch_size,), generator=ctx.generator,
                            device=ctx.generator.device).cpu()
        x, y = self.clean[idx].to(dev), self.dist[idx].to(dev)
        t = torch.randint(8, (len(idx),), generator=ctx.generator, device=ctx.generator.device).to(dev)
        x, y = dihedral(x, t), dihedral(y, t)
        y = ctx.prepare(y)
        with ctx.autocast():
            out = ctx.model(y)
        loss = ctx.loss_fn(out.to(torch.promote_types(out.dtype, torch.float32)), x)
        self.update(ctx, loss, len(idx))
        return {"loss": float(loss.detach())}

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "n": len(self.clean)}


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


def validate(model: nn.Module, val_images: Sequence[torch.Tensor], val_distortions: Mapping[str, Distortion],
             seed: int = 1234, device: Optional[torch.device] = None) -> Dict[str, float]:
    """Mean PSNR per distortion label on fixed, seeded distorted copies of the validation images."""
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


def _autocast_factory(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if cfg.bf16 and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
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


def fit(model: nn.Module, strategy: Strategy, train_images: Sequence[torch.Tensor] | PatchSampler | None,
        distortions: Sequence[Distortion], cfg: TrainConfig = TrainConfig(), *,
        val_images: Optional[Sequence[torch.Tensor]] = None, val_distortions: Optional[Mapping[str, Distortion]] = None,
        run_dir: Optional[PathLike] = None, resume: bool = True,
        callback: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> TrainResult:
    """Train ``model`` with ``strategy`` on patches of ``train_images`` distorted by the seen ``distortions``.

    With ``run_dir``, checkpoints (``model.safetensors``, ``state.pt``, ``run.json``) are written atomically every
    ``cfg.ckpt_every`` steps and at the end; a later call with ``resume=True`` continues exactly where it stopped
    (same batches, same noise, same optimiser moments). An existing run with a different config is an error,
    never silently overwritten.
    """
    if not distortions and not strategy.owns_data:
        raise ValueError("fit: expected at least one seen distortion")
    if train_images is None and not strategy.owns_data:
        raise ValueError(f"fit: train_images is None but strategy {strategy.name!r} does not draw its own data")
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.train()
    sampler = train_images if isinstance(train_images, PatchSampler) or train_images is None else PatchSampler(
        train_images, cfg.patch_size, cfg.batch_size, device)
    if sampler is not None and sampler.device != device:
        raise ValueError(f"PatchSampler is on {sampler.device} but training runs on {device}")
    gen = make_generator(cfg.seed, device)
    strategy.configure(model, cfg)
    counters = Counters()
    history: List[Dict[str, Any]] = []
    record = _config_record(model, strategy, cfg, distortions)
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None and (run_path / "run.json").exists():
        saved = json.loads((run_path / "run.json").read_text())
        if not resume:
            raise FileExistsError(f"{run_path} already holds a run; pass resume=True to continue it or choose "
                                  "another run_dir (nothing is overwritten silently)")
        if _comparable(saved["config"]) != _comparable(record):
            raise ValueError(f"{run_path} holds a run with a different configuration; choose another run_dir.\n"
                             f"saved: {saved['config']}\nnow:   {record}")
        _load_checkpoint(run_path, model, strategy, gen, counters)
        history = saved.get("history", [])

    def sample_clean() -> torch.Tensor:
        if sampler is None:
            raise RuntimeError(f"strategy {strategy.name!r} owns its data: fit was given no images to sample")
        return sampler.sample(gen)

    ctx = StepContext(model, sample_clean, tuple(distortions), gen, LOSSES[cfg.loss],
                      _autocast_factory(cfg, device), counters, cfg)
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
            if callback is not None:
                callback(step, entry)
        if run_path is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
            _save_checkpoint(run_path, model, strategy, gen, counters, record, history)
    bar.close()
    wall = elapsed0 + time.perf_counter() - t0
    model.eval()
    return TrainResult(model, history, counters, wall, run_path)


def _save_checkpoint(run: Path, model: nn.Module, strategy: Strategy, gen: torch.Generator, counters: Counters,
                     record: dict, history: list) -> None:
    import io

    run.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(run / "model.safetensors", save(weights))
    buf = io.BytesIO()
    torch.save({"strategy": strategy.state_dict(), "generator": gen.get_state(), "counters": counters.as_dict()}, buf)
    atomic_write_bytes(run / "state.pt", buf.getvalue())
    atomic_write_json(run / "run.json", {"config": record, "counters": counters.as_dict(), "history": history,
                                         "torch": torch.__version__})


def _load_checkpoint(run: Path, model: nn.Module, strategy: Strategy, gen: torch.Generator, counters: Counters) -> None:
    from .models import load_state

    load_state(model, run / "model.safetensors")
    try:
        state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run} has run.json but no state.pt: the checkpoint is incomplete") from None
    except Exception as e:  # corrupt pickle
        raise ValueError(f"could not read {run / 'state.pt'}: {e}") from None
    strategy.load_state_dict(_to_device(state["strategy"], next(model.parameters()).device))
    gen.set_state(state["generator"])
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
