"""DIL: distortion-invariant representation learning (Li et al., CVPR'23, arXiv 2303.06859) as strategies for
the one training loop of :mod:`causalir.train`.

Two families live here, labelled on purpose:

* **The paper's equations** (``dil_pf``, ``dil_ps``, ``dil_sf``, ``dil_ss``; project interpretation, see
  ``shared/reference/dil.md`` Sec. 1). For each sampled seen distortion :math:`d_i` a virtual model

  .. math:: \\phi_{d_i} = \\theta - \\alpha \\nabla_\\theta \\mathcal{L}(f_\\theta(I_{d_i}), I_c)

  is scored on a batch distorted by a *different* seen distortion :math:`d`, and
  :math:`\\theta \\leftarrow \\arg\\min_\\theta \\sum_i \\mathcal{L}(f_{\\phi_{d_i}}(I_d), I_c)` (one meta-Adam step).
  *Parallel* (p): every :math:`\\phi_{d_i}` starts from :math:`\\theta` (vmapped over the K distortions).
  *Serial* (s): :math:`\\phi_{d_i}` starts from :math:`\\phi_{d_{i-1}}` (the virtual updates are chained).
  *First-order* (f): no gradient through the inner step (:math:`\\partial\\phi/\\partial\\theta := I`, FOMAML).
  *Second-order* (s): the exact meta-gradient through the inner step(s) (MAML, double backward).

* **The released code** (``dil_sf_reference``; ``lixinustc/Causal-IR-DIL`` @158ce57, reference Sec. 3.1): the task
  net :math:`\\phi` is copied from :math:`\\theta`; K chained inner *Adam* steps (betas (0, 0.999), moments kept
  across iterations) over the shuffled seen distortions, each on its own batch; then the Reptile displacement
  :math:`\\theta - \\phi` is fed as the gradient to a meta-Adam. No outer loss is ever computed.

Equal-budget accounting: every strategy adds to ``ctx.counters`` the distorted batches it draws and the images it
forwards and backpropagates (a second-order inner batch is backpropagated twice: once for the inner gradient and
once more in the double backward).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from .distributed import all_mean_dict, average_gradients
from .train import STRATEGIES, StepContext, Strategy, TrainConfig, at_least_fp32, make_optimizer, make_scheduler
from .utils import check_choice, check_number

Params = Dict[str, torch.Tensor]

#: which strategy implements what (shown in notebooks and result files)
PROVENANCE: Dict[str, str] = {
    "dil_pf": "paper equation (project interpretation): parallel, first-order",
    "dil_ps": "paper equation (project interpretation): parallel, second-order",
    "dil_sf": "paper equation (project interpretation): serial, first-order",
    "dil_ss": "paper equation (project interpretation): serial, second-order",
    "dil_sf_reference": "released code (Causal-IR-DIL @158ce57): chained inner Adam, Reptile displacement, meta Adam",
}
PAPER_VARIANTS = ("dil_pf", "dil_ps", "dil_sf", "dil_ss")
ALL_VARIANTS = PAPER_VARIANTS + ("dil_sf_reference",)


class Tasks(NamedTuple):
    """K inner/outer batch pairs, stacked on dim 0: ``x_in[i] = d_i(y_in[i])``, ``x_out[i] = d'_i(y_out[i])``."""

    x_in: torch.Tensor
    y_in: torch.Tensor
    x_out: torch.Tensor
    y_out: torch.Tensor
    inner: List[str]
    outer: List[str]


def _check_flag(owner: str, field: str, value: Any) -> None:
    check_choice(owner, field, value, (True, False))


def _check_betas(owner: str, field: str, betas: Any) -> None:
    """Adam's (beta1, beta2), each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}.{field}: expected a pair (beta1, beta2) in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        check_number(owner, f"{field}[{i}]", b, lo=0, hi=1, hi_open=True)


def check_tasks(tasks: Any, owner: str = "tasks") -> "Tasks":
    """K >= 1 inner/outer batch pairs: float tensors (K, B, ...) with one K, matching batch sizes, finite values."""
    if not isinstance(tasks, Tasks):
        raise TypeError(f"{owner}: expected a dil.Tasks (see sample_tasks), got {type(tasks).__name__}")
    k = None
    for f in ("x_in", "y_in", "x_out", "y_out"):
        t = getattr(tasks, f)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}.{f}: expected a tensor (K, B, C, H, W), got {type(t).__name__}")
        if t.dim() != 5 or not t.is_floating_point():
            raise ValueError(f"{owner}.{f}: expected a floating-point tensor (K, B, C, H, W), got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype}")
        if k is None:
            k = t.shape[0]
        if t.shape[0] != k or k < 1:
            raise ValueError(f"{owner}.{f}: expected K >= 1 tasks on dim 0, the same for every tensor; got shape "
                             f"{tuple(t.shape)} (x_in has K={k})")
        if t.shape[1] < 1 or t.numel() == 0:
            raise ValueError(f"{owner}.{f}: expected non-empty batches, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{owner}.{f}: expected finite values, got NaN or infinity")
    for a, b in (("x_in", "y_in"), ("x_out", "y_out")):
        if getattr(tasks, a).shape[1] != getattr(tasks, b).shape[1]:
            raise ValueError(f"{owner}: {a} and {b} differ in batch size: {tuple(getattr(tasks, a).shape)} vs "
                             f"{tuple(getattr(tasks, b).shape)}")
    return tasks


def _perm(n: int, generator: torch.Generator) -> List[int]:
    """The order in which the seen distortions are visited this step (drawn from the loop's generator)."""
    return torch.randperm(n, generator=generator, device=generator.device).tolist()


def sample_tasks(ctx: StepContext, k: int, paired: bool = True) -> Tasks:
    """Draw K distinct seen distortions d_1..d_K in random order; the outer distortion of d_i is the next one in
    the permutation of *all* seen distortions (so it differs from d_i whenever more than one is seen).
    ``paired``: one clean batch I_c serves every inner and outer batch (the poster's notation); otherwise each
    distorted batch gets its own clean batch."""
    seen = ctx.distortions
    n = len(seen)
    if n == 0:
        raise ValueError("sample_tasks: the context has no seen distortions; DIL needs at least one")
    check_number("sample_tasks", "k", k, integer=True)
    _check_flag("sample_tasks", "paired", paired)
    if not 1 <= k <= n:
        raise ValueError(f"n_distortions: expected 1..{n} (the number of seen distortions), got {k}")
    perm = _perm(n, ctx.generator)
    clean = ctx.sample_clean() if paired else None
    xi, yi, xo, yo = [], [], [], []
    for i in range(k):
        d_in, d_out = seen[perm[i]], seen[perm[(i + 1) % n]]
        c = clean if paired else ctx.sample_clean()
        xi.append(ctx.prepare(ctx.local(ctx.distort(c, d_in))))  # this rank's slice of the global batch
        yi.append(ctx.local(c))
        c = clean if paired else ctx.sample_clean()
        xo.append(ctx.prepare(ctx.local(ctx.distort(c, d_out))))
        yo.append(ctx.local(c))
    return Tasks(torch.stack(xi), torch.stack(yi), torch.stack(xo), torch.stack(yo),
                 [seen[perm[i]].label for i in range(k)], [seen[perm[(i + 1) % n]].label for i in range(k)])


def _loss_fn(model: nn.Module, buffers: Params, loss_fn, autocast):
    def loss_at(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = functional_call(model, (p, buffers), (x,))
        return loss_fn(_at_least_fp32(out), y)
    return loss_at


#: bf16/fp16 autocast outputs -> fp32 for the loss; fp32/fp64 unchanged (gradient checks run in fp64).
_at_least_fp32 = at_least_fp32


def meta_gradient(model: nn.Module, tasks: Tasks, alpha: float, *, serial: bool, second_order: bool,
                  loss_fn=torch.nn.functional.l1_loss, use_vmap: bool = True, autocast=None,
                  params: Optional[Params] = None) -> tuple[Params, Dict[str, float]]:
    """The meta-gradient of :math:`J(\\theta) = \\sum_i \\mathcal{L}(f_{\\phi_{d_i}}(x^{out}_i), y^{out}_i)` w.r.t.
    the parameters of ``model`` (or ``params``), with the inner step(s) of the paper's equation.

    first-order: :math:`\\sum_i \\nabla_\\phi \\mathcal{L}(f_\\phi(x^{out}_i))|_{\\phi=\\phi_{d_i}}` (inner gradients
    treated as constants); second-order: the exact :math:`\\nabla_\\theta J` through every inner step.

    Under torchrun each rank holds its slice of every task's batch: the inner gradient is averaged over the ranks
    (:func:`causalir.distributed.all_mean_dict`, differentiable) so every rank takes the global virtual step, and
    the returned meta-gradient is this rank's share (the one update averages it)."""
    import contextlib

    check_number("meta_gradient", "alpha", alpha, lo=0)
    _check_flag("meta_gradient", "serial", serial)
    _check_flag("meta_gradient", "second_order", second_order)
    _check_flag("meta_gradient", "use_vmap", use_vmap)
    check_tasks(tasks, "meta_gradient: tasks")
    autocast = autocast or contextlib.nullcontext
    theta = {k: v.detach() for k, v in (params or dict(model.named_parameters())).items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    loss_at = _loss_fn(model, buffers, loss_fn, autocast)
    g_loss = grad(loss_at)
    gv_loss = torch.func.grad_and_value(loss_at)
    k = tasks.x_in.shape[0]

    def step(p: Params, g: Params) -> Params:
        g = all_mean_dict(g)  # the global batch's inner gradient (identity with one rank)
        return {n: p[n] - alpha * g[n] for n in p}

    if not second_order:
        if serial:
            total = {n: torch.zeros_like(v) for n, v in theta.items()}
            phi, inner, outer = theta, [], []
            for i in range(k):
                gi, li = gv_loss(phi, tasks.x_in[i], tasks.y_in[i])
                phi = step(phi, gi)
                go, lo = gv_loss(phi, tasks.x_out[i], tasks.y_out[i])
                inner.append(li.detach())
                outer.append(lo.detach())
                total = {n: total[n] + go[n] for n in total}
            stats = {"loss": float(torch.stack(outer).mean()), "inner_loss": float(torch.stack(inner).mean())}
            return total, stats
        # parallel: every phi_i from theta
        def one(xi, yi, xo, yo):
            gi = g_loss(theta, xi, yi)
            phi = step(theta, gi)
            return gv_loss(phi, xo, yo)
        if use_vmap:
            gos, los = vmap(one)(tasks.x_in, tasks.y_in, tasks.x_out, tasks.y_out)
            total = {n: v.sum(0) for n, v in gos.items()}
        else:
            outs = [one(tasks.x_in[i], tasks.y_in[i], tasks.x_out[i], tasks.y_out[i]) for i in range(k)]
            total = {n: sum(o[0][n] for o in outs) for n in theta}
            los = torch.stack([o[1] for o in outs])
        return total, {"loss": float(los.mean())}

    # second order: differentiate the whole meta-objective (double backward through the inner step)
    def objective(th: Params) -> torch.Tensor:
        if serial:
            phi, tot = th, 0.0
            for i in range(k):
                phi = step(phi, g_loss(phi, tasks.x_in[i], tasks.y_in[i]))
                tot = tot + loss_at(phi, tasks.x_out[i], tasks.y_out[i])
            return tot

        def one(xi, yi, xo, yo):
            return loss_at(step(th, g_loss(th, xi, yi)), xo, yo)
        if use_vmap:
            return vmap(one)(tasks.x_in, tasks.y_in, tasks.x_out, tasks.y_out).sum()
        return sum(one(tasks.x_in[i], tasks.y_in[i], tasks.x_out[i], tasks.y_out[i]) for i in range(k))

    g, val = torch.func.grad_and_value(objective)(theta)
    return g, {"loss": float(val) / k}


def first_order_module(model: nn.Module, task_net: nn.Module, tasks: Tasks, alpha: float, *, serial: bool,
                       loss_fn=torch.nn.functional.l1_loss, autocast=None) -> tuple[Params, Dict[str, float]]:
    """The first-order meta-gradient of :func:`meta_gradient` computed on a module copy ``task_net`` instead of
    ``torch.func``: its weights are set to theta (parallel: before every task; serial: once), each inner step
    phi <- phi - alpha grad L(f_phi(x_in_i)) and each outer gradient grad L(f_phi(x_out_i)) are plain module
    forward/backward passes (in-place activations, no functional transform), and the parameter updates are fused
    multi-tensor ops (``torch._foreach_*``). The same numbers as the functional path (tested), at ERM's cost per
    batch on a CPU, where the functional path is 1.2-1.3x slower (see ``make bench``)."""
    import contextlib

    from .distributed import all_mean_dict

    autocast = autocast or contextlib.nullcontext
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach() for p in model.parameters()]
    phi = list(task_net.parameters())
    total = [torch.zeros_like(t) for t in theta]
    inner, outer = [], []

    def grads(x: torch.Tensor, y: torch.Tensor) -> tuple[List[torch.Tensor], torch.Tensor]:
        with autocast():
            out = task_net(x)
        loss = loss_fn(_at_least_fp32(out), y)
        return list(torch.autograd.grad(loss, phi)), loss.detach()

    with torch.no_grad():
        torch._foreach_copy_(phi, theta)
    for i in range(tasks.x_in.shape[0]):
        if not serial and i:
            with torch.no_grad():
                torch._foreach_copy_(phi, theta)
        gi, li = grads(tasks.x_in[i], tasks.y_in[i])
        gi = list(all_mean_dict(dict(zip(names, gi))).values())  # the global batch's inner gradient
        with torch.no_grad():
            torch._foreach_add_(phi, gi, alpha=-alpha)
        go, lo = grads(tasks.x_out[i], tasks.y_out[i])
        torch._foreach_add_(total, go)
        inner.append(li)
        outer.append(lo)
    stats = {"loss": float(torch.stack(outer).mean())}
    if serial:
        stats["inner_loss"] = float(torch.stack(inner).mean())
    return dict(zip(names, total)), stats


def meta_objective(model: nn.Module, tasks: Tasks, alpha: float, *, serial: bool, params: Optional[Params] = None,
                   loss_fn=torch.nn.functional.l1_loss) -> torch.Tensor:
    """:math:`J(\\theta)` itself (no gradient), for finite-difference checks of :func:`meta_gradient`."""
    import contextlib

    check_number("meta_objective", "alpha", alpha, lo=0)
    _check_flag("meta_objective", "serial", serial)
    check_tasks(tasks, "meta_objective: tasks")
    theta = {k: v.detach() for k, v in (params or dict(model.named_parameters())).items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    loss_at = _loss_fn(model, buffers, loss_fn, contextlib.nullcontext)
    tot, phi = 0.0, theta
    for i in range(tasks.x_in.shape[0]):
        start = phi if serial else theta
        g = grad(loss_at)(start, tasks.x_in[i], tasks.y_in[i])
        phi = {n: start[n] - alpha * g[n] for n in start}
        tot = tot + loss_at(phi, tasks.x_out[i], tasks.y_out[i])
    return tot.detach()


# ------------------------------------------------------------------------------------- the paper's variants
@dataclass
class _PaperDIL(Strategy):
    """Shared body of the four paper variants (see module doc). Hyper-parameters:

    alpha: inner (virtual) SGD step size; meta_lr: meta-Adam lr (None = TrainConfig.lr); n_distortions: K seen
    distortions sampled per step (None = all); paired: one clean batch for every distorted batch of a step;
    use_vmap: vmap the parallel inner updates (False = a Python loop, same numbers, less memory; None = choose:
    vmap on CUDA; on a CPU the loop, and for the first-order variants the module path
    :func:`first_order_module`, which is faster there)."""

    alpha: float = 0.01
    meta_lr: Optional[float] = None
    n_distortions: Optional[int] = None
    paired: bool = True
    use_vmap: Optional[bool] = None
    serial: bool = field(default=False, init=False)
    second_order: bool = field(default=False, init=False)
    name: str = field(default="dil", init=False)

    def __post_init__(self) -> None:
        check_number(self.name, "alpha", self.alpha, lo=0)
        check_number(self.name, "meta_lr", self.meta_lr, lo=0, lo_open=True, allow_none=True)
        check_number(self.name, "n_distortions", self.n_distortions, lo=1, integer=True, allow_none=True)
        _check_flag(self.name, "paired", self.paired)
        if self.use_vmap is not None:
            _check_flag(self.name, "use_vmap", self.use_vmap)

    distributed = "functional"

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.opt = make_optimizer(model.parameters(), cfg, lr=self.meta_lr)
        self.sched = make_scheduler(self.opt, cfg)
        dev = next(model.parameters()).device
        self._vmap = (dev.type == "cuda") if self.use_vmap is None else self.use_vmap
        # the module path: first order, on a CPU, unless vmap or the loop was asked for
        self._task = copy.deepcopy(model).train() if (self.use_vmap is None and not self.second_order
                                                      and dev.type != "cuda") else None

    def step(self, ctx: StepContext) -> Dict[str, float]:
        k = self.n_distortions or len(ctx.distortions)
        tasks = sample_tasks(ctx, k, self.paired)
        if self._task is not None:
            g, stats = first_order_module(ctx.model, self._task, tasks, self.alpha, serial=self.serial,
                                          loss_fn=ctx.loss_fn, autocast=ctx.autocast)
        else:
            g, stats = meta_gradient(ctx.model, tasks, self.alpha, serial=self.serial,
                                     second_order=self.second_order, loss_fn=ctx.loss_fn, use_vmap=self._vmap,
                                     autocast=ctx.autocast)
        b = tasks.x_in.shape[1]
        self.update(ctx, g, 2 * k * b, n_backprop=(3 if self.second_order else 2) * k * b)
        return {**stats, "lr": self.sched.get_last_lr()[0]}

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "implements": PROVENANCE[self.name]}


@STRATEGIES.register("dil_pf")
@dataclass
class DILParallelFirst(_PaperDIL):
    """DIL-pf (paper eq.): parallel virtual updates from theta, first-order meta-gradient."""
    name: str = field(default="dil_pf", init=False)


@STRATEGIES.register("dil_ps")
@dataclass
class DILParallelSecond(_PaperDIL):
    """DIL-ps (paper eq.): parallel virtual updates from theta, second-order meta-gradient."""
    second_order: bool = field(default=True, init=False)
    name: str = field(default="dil_ps", init=False)


@STRATEGIES.register("dil_sf")
@dataclass
class DILSerialFirst(_PaperDIL):
    """DIL-sf (paper eq.): virtual updates chained through the sampled distortions, first-order."""
    serial: bool = field(default=True, init=False)
    name: str = field(default="dil_sf", init=False)


@STRATEGIES.register("dil_ss")
@dataclass
class DILSerialSecond(_PaperDIL):
    """DIL-ss (paper eq.): chained virtual updates, second-order (gradient through the whole chain)."""
    serial: bool = field(default=True, init=False)
    second_order: bool = field(default=True, init=False)
    name: str = field(default="dil_ss", init=False)


# ----------------------------------------------------------------------------------- the released algorithm
@STRATEGIES.register("dil_sf_reference")
@dataclass
class DILSerialFirstReference(Strategy):
    """DIL-sf **as released** (Causal-IR-DIL @158ce57, ``DIL_sf_noise.py``), not the paper's equation:

    1. phi <- theta; 2. the task-Adam moments persist across iterations; 3. shuffle the seen distortions;
    4. for each (K of them): its own clean batch (``paired=False`` like the code), L(f_phi(I_d), I_c), one Adam step
    on phi (``inner_lr``, ``inner_betas``); 5. meta gradient := theta - phi (Reptile); 6. one meta-Adam step
    (``meta_lr``, default betas, schedule from TrainConfig)."""

    inner_lr: float = 1e-4
    inner_betas: tuple = (0.0, 0.999)
    meta_lr: float = 1e-4
    meta_betas: tuple = (0.9, 0.999)
    n_distortions: Optional[int] = None
    paired: bool = False
    name: str = field(default="dil_sf_reference", init=False)
    distributed = "functional"

    def __post_init__(self) -> None:
        check_number(self.name, "inner_lr", self.inner_lr, lo=0, lo_open=True)
        check_number(self.name, "meta_lr", self.meta_lr, lo=0, lo_open=True)
        _check_betas(self.name, "inner_betas", self.inner_betas)
        _check_betas(self.name, "meta_betas", self.meta_betas)
        check_number(self.name, "n_distortions", self.n_distortions, lo=1, integer=True, allow_none=True)
        _check_flag(self.name, "paired", self.paired)

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.task = copy.deepcopy(model)
        self.task.train()
        self.task_opt = torch.optim.Adam(self.task.parameters(), lr=self.inner_lr, betas=tuple(self.inner_betas))
        self.opt = make_optimizer(model.parameters(), cfg, lr=self.meta_lr, betas=self.meta_betas)
        self.sched = make_scheduler(self.opt, cfg)

    def step(self, ctx: StepContext) -> Dict[str, float]:
        seen = ctx.distortions
        k = self.n_distortions or len(seen)
        if k > len(seen):
            raise ValueError(f"n_distortions: expected 1..{len(seen)} (the number of seen distortions), got {k}")
        with torch.no_grad():
            for pt, pm in zip(self.task.parameters(), ctx.model.parameters()):
                pt.copy_(pm)
        perm = _perm(len(seen), ctx.generator)
        clean = ctx.sample_clean() if self.paired else None
        losses = []
        for i in range(k):
            c = clean if self.paired else ctx.sample_clean()
            x = ctx.prepare(ctx.local(ctx.distort(c, seen[perm[i]])))  # this rank's slice of the global batch
            c = ctx.local(c)
            with ctx.autocast():
                out = self.task(x)
            loss = ctx.loss_fn(_at_least_fp32(out), c)
            self.task_opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(self.task.parameters())  # the global batch's gradient (no-op with one rank)
            self.task_opt.step()
            losses.append(float(loss.detach()))
            ctx.counters.images_forwarded += c.shape[0] * ctx.world
            ctx.counters.images_backpropagated += c.shape[0] * ctx.world
        with torch.no_grad():  # Reptile meta-gradient theta - phi
            delta = {n: (pm - pt).detach().clone() for (n, pm), pt in
                     zip(ctx.model.named_parameters(), self.task.parameters())}
        self.update(ctx, delta, 0)  # the inner steps above counted the images
        return {"loss": sum(losses) / len(losses), "lr": self.sched.get_last_lr()[0]}

    def state_dict(self) -> Dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "task_opt": self.task_opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.task_opt.load_state_dict(state["task_opt"])

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "implements": PROVENANCE[self.name]}


# ------------------------------------------------------------------------------------------ the control
@STRATEGIES.register("erm_stratified")
@dataclass
class StratifiedERM(Strategy):
    """ERM with K*B images per step, one slice of B per seen distortion (the K outer distortions of a DIL-pf
    step, in the same random order): one Adam step on sum_i L(f_theta(d_i(I_c)), I_c). This is DIL-pf's
    meta-gradient at alpha = 0 on the outer batches, so it separates DIL's meta-learning term from the extra data
    DIL sees per iteration. ``paired``: one clean batch for every slice (as the paper variants)."""

    n_distortions: Optional[int] = None
    paired: bool = True
    name: str = field(default="erm_stratified", init=False)
    distributed = "ddp"

    def __post_init__(self) -> None:
        check_number(self.name, "n_distortions", self.n_distortions, lo=1, integer=True, allow_none=True)
        _check_flag(self.name, "paired", self.paired)

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.opt = make_optimizer(model.parameters(), cfg)
        self.sched = make_scheduler(self.opt, cfg)

    def step(self, ctx: StepContext) -> Dict[str, float]:
        seen = ctx.distortions
        n = len(seen)
        k = self.n_distortions or n
        if not 1 <= k <= n:
            raise ValueError(f"n_distortions: expected 1..{n} (the number of seen distortions), got {k}")
        perm = _perm(n, ctx.generator)
        clean = ctx.sample_clean() if self.paired else None
        xs, ys = [], []
        for i in range(k):
            c = clean if self.paired else ctx.sample_clean()
            xs.append(ctx.local(ctx.distort(c, seen[perm[(i + 1) % n]])))
            ys.append(ctx.local(c))
        x, y = ctx.prepare(torch.cat(xs)), torch.cat(ys)
        with ctx.autocast():
            out = ctx.model(x)
        loss = k * ctx.loss_fn(_at_least_fp32(out), y)  # = sum of the K slices' mean losses (equal slices)
        self.update(ctx, loss, x.shape[0])
        return {"loss": float(loss.detach()) / k, "lr": self.sched.get_last_lr()[0]}


def batches_per_step(strategy: str, n_seen: int, n_distortions: Optional[int] = None) -> int:
    """Distorted batches one step of ``strategy`` draws (ERM 1; paper variants 2K; released sf and stratified
    ERM K)."""
    check_number("batches_per_step", "n_seen", n_seen, lo=1, integer=True)
    check_number("batches_per_step", "n_distortions", n_distortions, lo=1, integer=True, allow_none=True)
    k = n_distortions or n_seen
    if strategy == "erm":
        return 1
    if strategy in PAPER_VARIANTS:
        return 2 * k
    if strategy in ("dil_sf_reference", "erm_stratified"):
        return k
    raise KeyError(f"unknown strategy {strategy!r}; valid names: erm, erm_stratified, {', '.join(ALL_VARIANTS)}")
