"""Attribution for restoration networks: integrated gradients on pixels and on weights (FAIG).

* :func:`integrated_gradients` -- captum's IntegratedGradients on a restoration net with a scalar objective
  (output sum over a region of interest, or the loss against the clean image) and the named baselines of the
  baseline gallery (black, uniform, Gaussian, blurred, maximum distance); optional NoiseTunnel smoothing.
  IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x'))/dx_i da  (Sundararajan et al. 2017).
* :func:`faig` -- Filter Attribution via Integrated Gradients (Xie et al. 2021): IG in *parameter* space along the
  straight path between the baseline weights theta_b and the target weights theta_t,
  FAIG_i(x) = (theta_t - theta_b)_i * 1/N sum_{k=0}^{N-1} dL(theta(a_k), x)/dtheta_i, theta(a) = a theta_b + (1-a) theta_t,
  a_k = k/N (FAIG's left Riemann sum from the target = captum's ``riemann_right`` from the baseline),
  L = ||F(theta, x) - x_gt||_2^2. Built on captum over a flattened parameter vector; the interpolation steps are
  evaluated with ``torch.func.vmap`` over ``torch.func.functional_call``. Per-kernel score = sum over the kernel's
  taps of |FAIG_i|, one kernel being a slice w[out, in] of a conv weight. :func:`faig_reference` is a plain loop.
* :func:`discriminative_filters` -- score(x_D) - score(x_other) summed over images, top k% kernels, for FAIG and the
  comparison methods (input-space IG, |theta_t - theta_b|, random).
* :func:`mask_kernels` / :func:`modulate` -- replace selected target kernels by the baseline's, or set them to
  lam theta_t + (1 - lam) theta_b. :func:`overlap_score` -- OS(x, D) = |filters_D & filters_x| / |filters_x|.
* :func:`degrade` / :class:`SRStrategy` (registered ``sr_x2``) -- FAIG's x2 SR pipeline (HR -> blur -> bilinear
  x1/2 -> AWGN -> 8 bits) and its training step, with optional masks that re-train only selected kernels.

The experiment that uses all of it (``faig-srresnet``) and the notebook's plots live in
:mod:`causalir.experiments.faig_srresnet`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distortions import Distortion, GaussianBlur
from .train import STRATEGIES, StepContext, Strategy, TrainConfig, make_optimizer, make_scheduler
from .utils import check_images

Scores = Dict[str, torch.Tensor]
Masks = Dict[str, torch.Tensor]
ImagesLike = Union[torch.Tensor, Sequence[torch.Tensor]]

# ------------------------------------------------------------------------------------------ objectives
LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum_mse": lambda out, gt: ((out - gt) ** 2).sum(),     # FAIG: ||F(theta, x) - x_gt||_2^2
    "mse": lambda out, gt: ((out - gt) ** 2).mean(),
    "l1": lambda out, gt: (out - gt).abs().mean(),
    "output_sum": lambda out, gt: out.sum(),                 # no ground truth needed
}


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[loss]


# --------------------------------------------------------------------------------------- kernels helpers
def kernel_names(model: nn.Module) -> List[str]:
    """Names of the conv weights (nn.Conv2d, any kernel size, 1x1 included) in ``named_parameters`` order."""
    convs = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return [n for n, _ in model.named_parameters() if n in convs]


def count_kernels(model_or_scores: Union[nn.Module, Mapping[str, torch.Tensor]]) -> int:
    """Number of kernels (out x in slices) of a model's convs, or of a scores/masks dict."""
    if isinstance(model_or_scores, nn.Module):
        params = dict(model_or_scores.named_parameters())
        return sum(params[n].shape[0] * params[n].shape[1] for n in kernel_names(model_or_scores))
    return sum(int(v.numel()) for v in model_or_scores.values())


def _check_pair(target: nn.Module, baseline: nn.Module) -> None:
    ta, ba = dict(target.named_parameters()), dict(baseline.named_parameters())
    if ta.keys() != ba.keys():
        raise ValueError(f"target and baseline differ in parameters: {sorted(set(ta) ^ set(ba))[:5]}")
    bad = [n for n in ta if ta[n].shape != ba[n].shape]
    if bad:
        raise ValueError(f"target and baseline differ in shape at {bad[:5]}: same architecture expected")


def _pairs(inputs: ImagesLike, references: Optional[ImagesLike], device: torch.device
           ) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(1,C,h,w) input / reference pairs from a batch tensor or a list of (C,h,w) / (1,C,h,w) tensors."""
    def split(t: ImagesLike, name: str) -> List[torch.Tensor]:
        if isinstance(t, torch.Tensor):
            t = t[None] if t.dim() == 3 else t
            check_images(t, name, channels=None, check_range=False)
            return [t[i:i + 1] for i in range(t.shape[0])]
        out = []
        for i, x in enumerate(t):
            x = x[None] if x.dim() == 3 else x
            check_images(x, f"{name}[{i}]", channels=None, check_range=False)
            if x.shape[0] != 1:
                raise ValueError(f"{name}[{i}]: expected one image (C,H,W) or (1,C,H,W), got {tuple(x.shape)}")
            out.append(x)
        return out

    xs = split(inputs, "inputs")
    if references is None:
        return [(x.to(device), None) for x in xs]
    ys = split(references, "references")
    if len(xs) != len(ys):
        raise ValueError(f"got {len(xs)} inputs but {len(ys)} references")
    return [(x.to(device), y.to(device)) for x, y in zip(xs, ys)]


def _flat(model: nn.Module) -> Tuple[List[str], List[torch.Size], torch.Tensor]:
    names, shapes, flat = [], [], []
    for n, p in model.named_parameters():
        names.append(n)
        shapes.append(p.shape)
        flat.append(p.detach().reshape(-1))
    return names, shapes, torch.cat(flat)


def _unflatten(vec: torch.Tensor, names: Sequence[str], shapes: Sequence[torch.Size]) -> Dict[str, torch.Tensor]:
    out, o = {}, 0
    for n, s in zip(names, shapes):
        k = int(torch.Size(s).numel())
        out[n] = vec[..., o:o + k].reshape(*vec.shape[:-1], *s)
        o += k
    return out


def kernel_scores(attributions: Mapping[str, torch.Tensor], model: nn.Module, kernels_only: bool = True) -> Scores:
    """Per-kernel score sum_{taps} |attr| -> (out, in) for conv weights; other params per element |attr| unless
    ``kernels_only``."""
    knames = set(kernel_names(model))
    out: Scores = {}
    for n, a in attributions.items():
        if n in knames:
            out[n] = a.abs().sum(dim=(-1, -2)).float().cpu()
        elif not kernels_only:
            out[n] = a.abs().float().cpu()
    return out


# ------------------------------------------------------------------------------------------------ FAIG
@dataclass
class FAIGAttribution:
    """Signed FAIG attributions (parameter shapes), summed over images, with captum's convergence delta
    (sum(attr) - (L(theta_t) - L(theta_b)) per image) and the endpoint losses."""

    attributions: Dict[str, torch.Tensor]
    per_image_scores: List[Scores]
    delta: torch.Tensor
    loss_target: torch.Tensor
    loss_baseline: torch.Tensor


def faig_attributions(target_model: nn.Module, baseline_model: nn.Module, inputs: ImagesLike,
                      references: Optional[ImagesLike], n_steps: int = 100, *, loss: str = "sum_mse",
                      internal_batch_size: Optional[int] = None, kernels_only: bool = True,
                      method: str = "riemann_right", vectorize: Optional[bool] = None) -> FAIGAttribution:
    """FAIG with captum over the flattened parameter vector, one image at a time, steps vmapped (``vectorize=True``)
    or evaluated one after the other inside captum's forward (``False``: faster on CPU, where the batched-weight
    convolutions that vmap produces become slow grouped convolutions; see benchmarks/bench_faig.py). Default
    (None): vmap on CUDA, sequential on CPU. Both give the same numbers.

    captum's ``riemann_right`` with inputs theta_t and baselines theta_b samples theta_b + s (theta_t - theta_b),
    s = 1/N..1, i.e. FAIG's alpha = 0..(N-1)/N, and weights every step by 1/N (FAIG's mean gradient).
    """
    from captum.attr import IntegratedGradients
    from torch.func import functional_call, vmap

    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    _check_pair(target_model, baseline_model)
    lf = _loss_fn(loss)
    device = next(target_model.parameters()).device
    names, shapes, theta_t = _flat(target_model)
    _, _, theta_b = _flat(baseline_model)
    theta_b = theta_b.to(device)
    model = target_model
    was = model.training
    model.eval()
    pairs = _pairs(inputs, references, device)
    if vectorize is None:
        vectorize = device.type == "cuda"
    if references is None and loss != "output_sum":
        raise ValueError(f"loss {loss!r} needs references (ground truth); use loss='output_sum' without them")
    total = {n: torch.zeros(s, device=device) for n, s in zip(names, shapes)}
    per_image, deltas, lt, lb = [], [], [], []
    try:
        for x, gt in pairs:
            def one(theta: torch.Tensor) -> torch.Tensor:
                out = functional_call(model, _unflatten(theta, names, shapes), (x,))
                return lf(out, gt)

            batched = vmap(one) if vectorize else None

            def forward(thetas: torch.Tensor) -> torch.Tensor:
                if batched is not None:
                    return batched(thetas)
                return torch.stack([one(t) for t in thetas])

            ig = IntegratedGradients(forward)
            attr, delta = ig.attribute(theta_t[None], baselines=theta_b[None], n_steps=n_steps, method=method,
                                       internal_batch_size=internal_batch_size, return_convergence_delta=True)
            a = _unflatten(attr[0].detach(), names, shapes)
            for n in names:
                total[n] += a[n]
            per_image.append(kernel_scores(a, model, kernels_only))
            deltas.append(delta.detach().reshape(-1)[0])
            with torch.no_grad():
                lt.append(forward(theta_t[None])[0])
                lb.append(forward(theta_b[None])[0])
    finally:
        model.train(was)
    return FAIGAttribution({n: v.cpu() for n, v in total.items()}, per_image, torch.stack(deltas).cpu(),
                           torch.stack(lt).cpu(), torch.stack(lb).cpu())


def faig(target_model: nn.Module, baseline_model: nn.Module, inputs: ImagesLike, references: Optional[ImagesLike],
         n_steps: int = 100, *, loss: str = "sum_mse", internal_batch_size: Optional[int] = None,
         kernels_only: bool = True, vectorize: Optional[bool] = None) -> Scores:
    """Per-kernel FAIG scores, name -> (out, in) float32 CPU, summed over the images of per-image scores
    sum_{taps} |FAIG_i(theta, x)| (Xie et al. 2021, Eq. 4 and the per-degradation sum). With
    ``kernels_only=False`` the other parameters (biases) are added with per-element |FAIG|."""
    res = faig_attributions(target_model, baseline_model, inputs, references, n_steps, loss=loss,
                            internal_batch_size=internal_batch_size, kernels_only=kernels_only, vectorize=vectorize)
    return sum_scores(res.per_image_scores)


def faig_reference(target_model: nn.Module, baseline_model: nn.Module, inputs: ImagesLike,
                   references: Optional[ImagesLike], n_steps: int = 100, *, loss: str = "sum_mse",
                   kernels_only: bool = True) -> Scores:
    """The same scores as :func:`faig` by a plain loop: for k = 0..N-1, set the weights of a copy to
    theta(k/N) = (k/N) theta_b + (1 - k/N) theta_t, backpropagate L, accumulate; attr = mean grad * (theta_b - theta_t)."""
    _check_pair(target_model, baseline_model)
    lf = _loss_fn(loss)
    device = next(target_model.parameters()).device
    net = copy.deepcopy(target_model).eval()
    th_t = {n: p.detach().clone() for n, p in target_model.named_parameters()}
    th_b = {n: p.detach().clone().to(device) for n, p in baseline_model.named_parameters()}
    per_image = []
    for x, gt in _pairs(inputs, references, device):
        gsum = {n: torch.zeros_like(p) for n, p in th_t.items()}
        for k in range(n_steps):
            a = k / n_steps
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.copy_(a * th_b[n] + (1 - a) * th_t[n])
            net.zero_grad(set_to_none=True)
            lf(net(x), gt).backward()
            for n, p in net.named_parameters():
                gsum[n] += p.grad
        attr = {n: gsum[n] / n_steps * (th_b[n] - th_t[n]) for n in th_t}
        per_image.append(kernel_scores(attr, net, kernels_only))
    return sum_scores(per_image)


def sum_scores(scores: Sequence[Scores]) -> Scores:
    """Element-wise sum of score dicts with the same keys."""
    if not scores:
        raise ValueError("sum_scores: expected at least one scores dict")
    return {n: torch.stack([s[n] for s in scores]).sum(0) for n in scores[0]}


# ------------------------------------------------------------------------------------ comparison scores
def ig_kernel_scores(model: nn.Module, inputs: ImagesLike, start_inputs: ImagesLike, n_steps: int = 50, *,
                     internal_batch_size: Optional[int] = None) -> Scores:
    """The reference's IG comparison: along the *input* path x(a) = x0 + a (x - x0) from the clean LR image x0 to
    the degraded x, average the gradient of sum(F(theta_t, x(a))) w.r.t. the kernels; score = sum_{taps} |mean grad|
    (no input-difference factor), summed over images. Since the objective is a sum, the mean gradient is the
    gradient of the mean objective over the N interpolated inputs, computed as one batch (chunked)."""
    device = next(model.parameters()).device
    knames = kernel_names(model)
    params = dict(model.named_parameters())
    was = model.training
    model.eval()
    total = {n: torch.zeros(params[n].shape[:2]) for n in knames}
    chunk = internal_batch_size or n_steps
    try:
        for (x, _), (x0, _) in zip(_pairs(inputs, None, device), _pairs(start_inputs, None, device)):
            if x.shape != x0.shape:
                raise ValueError(f"inputs and start_inputs differ in shape: {tuple(x.shape)} vs {tuple(x0.shape)}")
            alphas = torch.arange(1, n_steps + 1, device=device, dtype=x.dtype) / n_steps
            grads = {n: torch.zeros_like(params[n]) for n in knames}
            for i in range(0, n_steps, chunk):
                a = alphas[i:i + chunk].view(-1, 1, 1, 1)
                xs = x0 + a * (x - x0)
                g = torch.autograd.grad(model(xs).sum() / n_steps, [params[n] for n in knames])
                for n, gi in zip(knames, g):
                    grads[n] += gi
            for n in knames:
                total[n] += grads[n].abs().sum(dim=(-1, -2)).float().cpu()
    finally:
        model.train(was)
    return total


def weight_change_scores(target_model: nn.Module, baseline_model: nn.Module, eps: float = 1e-12) -> Scores:
    """|theta - theta_bar| per kernel: sum_taps |theta_t - theta_b| / sum_taps |theta_b| (one ranking for all D)."""
    _check_pair(target_model, baseline_model)
    pt, pb = dict(target_model.named_parameters()), dict(baseline_model.named_parameters())
    return {n: ((pt[n] - pb[n]).abs().sum(dim=(-1, -2)) / (pb[n].abs().sum(dim=(-1, -2)) + eps)).detach().float().cpu()
            for n in kernel_names(target_model)}


def random_scores(model: nn.Module, generator: Optional[torch.Generator] = None) -> Scores:
    """Uniform random per-kernel scores (the random baseline)."""
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape[:2], generator=generator) for n in kernel_names(model)}


# --------------------------------------------------------------------------------------- selection
def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    if not scores:
        raise ValueError("expected a non-empty dict name -> (out, in) scores")
    for n, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"scores[{n!r}]: expected a tensor, got {type(s).__name__}")


def select_top(scores: Mapping[str, torch.Tensor], fraction: float) -> Masks:
    """Boolean masks (same shapes) with exactly round(fraction * total) True at the highest scores, ranked over all
    layers together; ties go to the earlier kernel (dict order, then row-major), so the result is deterministic."""
    _check_scores(scores)
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    k = int(round(float(fraction) * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices
    sel = torch.zeros(flat.numel(), dtype=torch.bool)
    sel[order[:k]] = True
    out, o = {}, 0
    for n, s in scores.items():
        out[n] = sel[o:o + s.numel()].reshape(s.shape)
        o += s.numel()
    return out


def mask_count(mask: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


def mask_union(a: Masks, b: Masks) -> Masks:
    return {n: a[n] | b[n] for n in a}


# ------------------------------------------------------------------------------------- masking, modulation
def modulate(target: nn.Module, baseline: nn.Module, mask: Mapping[str, torch.Tensor], lam: float) -> nn.Module:
    """A new module: selected kernels set to lam * theta_t + (1 - lam) * theta_b, everything else stays the target's.
    lam = 1 is the target, lam = 0 is masking; lam > 1 extrapolates past the target (FAIG's modulation)."""
    _check_pair(target, baseline)
    out = copy.deepcopy(target)
    pt, pb, po = dict(target.named_parameters()), dict(baseline.named_parameters()), dict(out.named_parameters())
    knames = set(kernel_names(target))
    for n, m in mask.items():
        if n not in knames:
            raise KeyError(f"mask key {n!r} is not a conv weight of the model; valid names: {', '.join(sorted(knames))}")
        if tuple(m.shape) != tuple(pt[n].shape[:2]):
            raise ValueError(f"mask[{n!r}]: expected shape {tuple(pt[n].shape[:2])} (out, in), got {tuple(m.shape)}")
        sel = m.to(device=pt[n].device, dtype=torch.bool)[..., None, None]
        with torch.no_grad():
            mixed = lam * pt[n] + (1.0 - lam) * pb[n].to(pt[n].device)
            po[n].copy_(torch.where(sel, mixed, pt[n]))
    return out


def mask_kernels(target: nn.Module, baseline: nn.Module, mask: Mapping[str, torch.Tensor]) -> nn.Module:
    """Masking (FAIG): replace the selected kernels of the target by the baseline's (not by zeros)."""
    return modulate(target, baseline, mask, 0.0)


# ---------------------------------------------------------------------------------- discriminative filters
@dataclass
class Discriminative:
    """Per degradation: the discriminative scores (name -> (out, in)) and the top-``fraction`` masks."""

    scores: Dict[str, Scores]
    masks: Dict[str, Masks]
    fraction: float
    method: str


METHODS = ("faig", "ig", "weight_change", "random")


def discriminative_filters(target: nn.Module, baseline: nn.Module, degraded: Mapping[str, ImagesLike],
                           references: Optional[ImagesLike] = None, *, fraction: float = 0.01,
                           method: str = "faig", n_steps: int = 100, clean_inputs: Optional[ImagesLike] = None,
                           generator: Optional[torch.Generator] = None,
                           internal_batch_size: Optional[int] = None) -> Discriminative:
    """Discriminative kernels for each degradation D in ``degraded`` (label -> the same images degraded by D):
    score_D = sum_x score(x_D) - mean_{D' != D} sum_x score(x_D'), ranked, top ``fraction``.

    method: ``faig`` (needs ``references``), ``ig`` (input-space path from ``clean_inputs``), ``weight_change``
    (|theta_t - theta_b|, the same ranking for every D) or ``random``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    labels = list(degraded)
    if method in ("faig", "ig") and len(labels) < 2:
        raise ValueError("discriminative_filters: expected at least two degradations to contrast")
    per: Dict[str, Scores] = {}
    if method == "faig":
        if references is None:
            raise ValueError("method 'faig' needs references (the clean HR images)")
        for lab in labels:
            per[lab] = faig(target, baseline, degraded[lab], references, n_steps,
                            internal_batch_size=internal_batch_size)
    elif method == "ig":
        if clean_inputs is None:
            raise ValueError("method 'ig' needs clean_inputs (the clean LR images, the start of the input path)")
        for lab in labels:
            per[lab] = ig_kernel_scores(target, degraded[lab], clean_inputs, n_steps,
                                        internal_batch_size=internal_batch_size)
    scores: Dict[str, Scores] = {}
    for lab in labels:
        if method == "weight_change":
            scores[lab] = weight_change_scores(target, baseline)
        elif method == "random":
            scores[lab] = random_scores(target, generator)
        else:
            others = [o for o in labels if o != lab]
            scores[lab] = {n: per[lab][n] - sum(per[o][n] for o in others) / len(others) for n in per[lab]}
    return Discriminative(scores, {lab: select_top(s, fraction) for lab, s in scores.items()}, fraction, method)


def overlap_score(filters_d: Mapping[str, torch.Tensor], filters_x: Mapping[str, torch.Tensor]) -> float:
    """OS(x, D) = |filters_D & filters_x| / |filters_x| (Xie et al. 2021)."""
    inter = sum(int((filters_d[n] & filters_x[n]).sum()) for n in filters_x)
    n_x = mask_count(filters_x)
    if n_x == 0:
        raise ValueError("overlap_score: filters_x is empty")
    return inter / n_x


def predict_degradation(filters: Mapping[str, Masks], filters_x: Masks) -> Tuple[str, Dict[str, float]]:
    """argmax_D OS(x, D) (ties -> the first label) and every OS."""
    os_ = {lab: overlap_score(m, filters_x) for lab, m in filters.items()}
    return max(os_, key=lambda k: os_[k]), os_


# ------------------------------------------------------------------------------------ output-change metric
def gradient_map(x: torch.Tensor) -> torch.Tensor:
    """Per-channel gradient magnitude sqrt(gx^2 + gy^2 + 1e-6) with [-1, 0, 1] differences (replicate borders)."""
    check_images(x, "x", channels=None, check_range=False)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = xp[..., 1:-1, 2:] - xp[..., 1:-1, :-2]
    gy = xp[..., 2:, 1:-1] - xp[..., :-2, 1:-1]
    return torch.sqrt(gx ** 2 + gy ** 2 + 1e-6)


def output_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """FAIG's masking metric: mean squared difference of the gradient maps, x 1000 (the tables' 1e-3 unit)."""
    if a.shape != b.shape:
        raise ValueError(f"output_change: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(((gradient_map(a) - gradient_map(b)) ** 2).mean() * 1000.0)


# ---------------------------------------------------------------------------------------- pixel-space IG
BASELINES = ("black", "uniform", "gaussian", "blur", "max_distance")


def make_baseline(name: str, image: torch.Tensor, generator: Optional[torch.Generator] = None, *,
                  noise_sigma: float = 0.2, blur_sigma: float = 4.0) -> torch.Tensor:
    """The IG baselines of the gallery (Sturmfels et al. 2020): ``black`` zeros, ``uniform`` U[0,1] noise,
    ``gaussian`` the image plus N(0, noise_sigma^2) clipped, ``blur`` a Gaussian-blurred copy, ``max_distance`` the
    farthest image in L1 (1 where x < 0.5, else 0)."""
    x = image[None] if image.dim() == 3 else image
    check_images(x, "image", channels=None)
    if name == "black":
        return torch.zeros_like(x)
    if name == "uniform":
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if name == "gaussian":
        return (x + noise_sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)).clamp(0, 1)
    if name == "blur":
        ks = min(2 * int(3 * blur_sigma) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)
        return GaussianBlur(blur_sigma, kernel_size=max(ks, 3))(x)
    if name == "max_distance":
        return (x < 0.5).to(x.dtype)
    raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")


Roi = Union[None, Tuple[int, int, int, int], torch.Tensor]


def _roi_mask(roi: Roi, shape: torch.Size, device) -> Optional[torch.Tensor]:
    if roi is None:
        return None
    if isinstance(roi, torch.Tensor):
        if tuple(roi.shape) != tuple(shape[-2:]):
            raise ValueError(f"roi mask: expected shape {tuple(shape[-2:])} (the output's H, W), got {tuple(roi.shape)}")
        return roi.to(device=device, dtype=torch.float32)
    if len(roi) != 4:
        raise ValueError(f"roi: expected (top, left, height, width) in output pixels or an (H, W) mask, got {roi!r}")
    t, l, h, w = (int(v) for v in roi)
    H, W = shape[-2:]
    if h <= 0 or w <= 0 or t < 0 or l < 0 or t + h > H or l + w > W:
        raise ValueError(f"roi {roi!r} does not fit in the output of size {(H, W)}")
    m = torch.zeros(H, W, device=device)
    m[t:t + h, l:l + w] = 1.0
    return m


@dataclass
class IGResult:
    """Pixel attributions (1,C,H,W), the baseline used, captum's convergence delta and F at both ends."""

    attributions: torch.Tensor
    baseline: torch.Tensor
    delta: float
    value: float
    baseline_value: float
    baseline_name: str


def objective_fn(model: nn.Module, objective: str = "sum", roi: Roi = None,
                 clean: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A scalar-per-example objective for IG: ``sum`` = sum of the output over the ROI (everything by default),
    ``loss`` = squared error of the output against ``clean`` over the ROI."""
    if objective not in ("sum", "loss"):
        raise ValueError(f"unknown objective {objective!r}; valid objectives: sum, loss")
    if objective == "loss" and clean is None:
        raise ValueError("objective 'loss' needs the clean image (clean=...)")

    def f(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        m = _roi_mask(roi, out.shape, out.device)
        v = out if objective == "sum" else (out - clean.to(out.device)) ** 2
        if m is not None:
            v = v * m
        return v.flatten(1).sum(1)

    return f


def integrated_gradients(model: nn.Module, image: torch.Tensor, *, objective: str = "sum", roi: Roi = None,
                         clean: Optional[torch.Tensor] = None, baseline: Union[str, torch.Tensor] = "black",
                         n_steps: int = 50, method: str = "gausslegendre", nt_samples: int = 0,
                         nt_stdevs: float = 0.05, generator: Optional[torch.Generator] = None,
                         internal_batch_size: Optional[int] = None) -> IGResult:
    """captum IntegratedGradients of a scalar objective of a restoration network w.r.t. the input pixels,
    from a named (or given) baseline. ``nt_samples > 0`` wraps IG in a SmoothGrad NoiseTunnel."""
    from captum.attr import IntegratedGradients, NoiseTunnel

    x = image[None] if image.dim() == 3 else image
    check_images(x, "image", channels=None)
    if x.shape[0] != 1:
        raise ValueError(f"integrated_gradients: expected one image, got a batch of {x.shape[0]}")
    dev = next(model.parameters()).device
    x = x.to(dev)
    if clean is not None:
        clean = (clean[None] if clean.dim() == 3 else clean).to(dev)
    name = baseline if isinstance(baseline, str) else "custom"
    base = make_baseline(baseline, x, generator) if isinstance(baseline, str) else baseline.to(dev).reshape(x.shape)
    f = objective_fn(model, objective, roi, clean)
    was = model.training
    model.eval()
    try:
        ig = IntegratedGradients(f)
        if nt_samples > 0:
            if generator is not None:  # NoiseTunnel draws with the global RNG: seed it from the generator
                torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            attr, delta = NoiseTunnel(ig).attribute(x, baselines=base, nt_type="smoothgrad", nt_samples=nt_samples,
                                                    stdevs=nt_stdevs, n_steps=n_steps, method=method,
                                                    internal_batch_size=internal_batch_size,
                                                    return_convergence_delta=True)
        else:
            attr, delta = ig.attribute(x, baselines=base, n_steps=n_steps, method=method,
                                       internal_batch_size=internal_batch_size, return_convergence_delta=True)
        with torch.no_grad():
            v, vb = float(f(x)[0]), float(f(base)[0])
    finally:
        model.train(was)
    return IGResult(attr.detach().cpu(), base.detach().cpu(), float(delta.abs().max()), v, vb, name)


def baseline_gallery(model: nn.Module, image: torch.Tensor, names: Sequence[str] = BASELINES, *, seed: int = 0,
                     **kw) -> Dict[str, IGResult]:
    """IG from every named baseline (the seed's gallery); each baseline is drawn from its own seeded generator."""
    out = {}
    for i, n in enumerate(names):
        g = torch.Generator(device=image.device).manual_seed(seed + i)
        out[n] = integrated_gradients(model, image, baseline=n, generator=g, **kw)
    return out


def heatmap(attributions: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """(H, W) map in [0, 1]: |attr| summed over channels, clipped at the given percentile."""
    a = attributions.detach().float()
    a = a[0] if a.dim() == 4 else a
    m = a.abs().sum(0)
    hi = torch.quantile(m.flatten(), percentile / 100.0) if m.numel() > 1 else m.max()
    return (m / hi.clamp_min(1e-12)).clamp(0, 1)


# ------------------------------------------------------------------------------- x2 SR degradation, training
def degrade(hr: torch.Tensor, blur: torch.Tensor, noise: torch.Tensor, generator: Optional[torch.Generator] = None, *,
            blur_sigma: float = 2.0, noise_sigma: float = 0.1, kernel_size: int = 21) -> torch.Tensor:
    """FAIG's x2 SR degradation, per sample: I_LR = q8(clamp(down_x2(k_sigma * I_HR if blur) + sigma_n * eps if
    noise)), with k_sigma a Gaussian blur (``kernel_size``, sigma ``blur_sigma``) where ``blur`` (bool (N,)),
    down_x2 bilinear without antialiasing (for an exact factor 2 the mean of each 2x2 block, as OpenCV's
    INTER_LINEAR), AWGN eps ~ N(0, 1) scaled by ``noise_sigma`` (on [0, 1]) where ``noise``, q8 rounding to 8 bits.
    The noise comes from ``generator``."""
    n = hr.shape[0]
    x = hr
    if bool(blur.any()):
        ks = min(kernel_size, 2 * ((min(hr.shape[-2:]) - 1) // 2) - 1)
        xb = GaussianBlur(blur_sigma, kernel_size=max(ks, 3))(hr)
        x = torch.where(blur.view(n, 1, 1, 1).to(hr.device), xb, hr)
    x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x = x + noise.view(n, 1, 1, 1).to(x.device, x.dtype) * noise_sigma * eps
    return (x.clamp(0, 1) * 255).round() / 255


@dataclass(frozen=True)
class SRDegradation(Distortion):
    """A fixed x2 SR degradation (:func:`degrade` with blur and noise on or off for every sample)."""

    blur: bool = False
    noise: bool = False
    blur_sigma: float = 2.0
    noise_sigma: float = 0.1
    name: str = field(default="sr_x2", init=False)

    def __post_init__(self) -> None:
        if not self.blur_sigma > 0 or not self.noise_sigma >= 0:
            raise ValueError(f"SRDegradation: expected blur_sigma > 0 and noise_sigma >= 0, got {self.blur_sigma!r}, "
                             f"{self.noise_sigma!r}")

    def _apply(self, x, g):
        n = x.shape[0]
        return degrade(x, torch.full((n,), self.blur), torch.full((n,), self.noise), g,
                       blur_sigma=self.blur_sigma, noise_sigma=self.noise_sigma)

    @property
    def label(self) -> str:
        parts = ([f"blur σ={self.blur_sigma:g}"] if self.blur else []) + \
                ([f"noise σ={self.noise_sigma:g}"] if self.noise else [])
        return "x2 " + (" + ".join(parts) if parts else "clean")


#: The four x2 degradations of FAIG's pipeline (label -> degradation); the order fixes their seeds.
SR_DEGRADATIONS: Dict[str, SRDegradation] = {"clean": SRDegradation(), "blur": SRDegradation(blur=True),
                                              "noise": SRDegradation(noise=True),
                                              "blur+noise": SRDegradation(blur=True, noise=True)}


@STRATEGIES.register("sr_x2")
@dataclass
class SRStrategy(Strategy):
    """x2 SR training step: HR patches, per-sample blur with ``p_blur`` and noise with ``p_noise`` (independent,
    :func:`degrade`), L(F(I_LR), I_HR) (the loop's loss, L1 by default), one shared update
    (:meth:`Strategy.update`). With ``masks`` only the selected kernels are trained (re-training 1% of the filters):
    after each update every other parameter is restored, so it stays exactly the starting model's."""

    p_blur: float = 0.0
    p_noise: float = 0.0
    betas: tuple = (0.9, 0.99)
    masks: Optional[Dict[str, torch.Tensor]] = None
    name: str = field(default="sr_x2", init=False)

    def __post_init__(self) -> None:
        for k in ("p_blur", "p_noise"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise ValueError(f"sr_x2.{k}: expected a probability in [0, 1], got {getattr(self, k)!r}")

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.opt = make_optimizer(model.parameters(), cfg, betas=self.betas)
        self.sched = make_scheduler(self.opt, cfg)
        if self.masks is not None:
            dev = next(model.parameters()).device
            self._frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
            self._keep = {n: self.masks[n].to(dev)[..., None, None] if n in self.masks else None
                          for n, _ in model.named_parameters()}

    def step(self, ctx: StepContext) -> Dict[str, float]:
        hr = ctx.sample_clean()
        n, g = hr.shape[0], ctx.generator
        blur = torch.rand(n, generator=g, device=hr.device) < self.p_blur
        noise = torch.rand(n, generator=g, device=hr.device) < self.p_noise
        ctx.counters.distorted_batches += 1
        lr = ctx.prepare(degrade(hr, blur, noise, g))
        with ctx.autocast():
            out = ctx.model(lr)
        loss = ctx.loss_fn(out.to(torch.promote_types(out.dtype, torch.float32)), hr)  # bf16 -> fp32
        self.update(ctx, loss, n)
        if self.masks is not None:  # after the update: only the selected kernels may have moved
            with torch.no_grad():
                for name_, p in ctx.model.named_parameters():
                    keep = self._keep[name_]
                    p.copy_(self._frozen[name_] if keep is None else torch.where(keep, p, self._frozen[name_]))
        return {"loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0]}

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "p_blur": self.p_blur, "p_noise": self.p_noise, "betas": list(self.betas),
                "masked": None if self.masks is None else mask_count(self.masks)}
