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

from .distortions import Distortion, GaussianBlur, check_size
from .train import STRATEGIES, StepContext, Strategy, TrainConfig, at_least_fp32, make_optimizer, make_scheduler
from .utils import check_choice, check_images, check_number

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


#: captum's integration rules (``method=``)
IG_METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def _check_flag(owner: str, field: str, value: Any, allow_none: bool = False) -> None:
    check_choice(owner, field, value, (True, False, None) if allow_none else (True, False))


def _check_model(model: Any, owner: str, field: str = "model") -> torch.device:
    """An nn.Module with at least one parameter; returns the device of its first parameter."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: {field}: expected an nn.Module, got {type(model).__name__}")
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"{owner}: {field}: the model has no parameters to attribute to")
    return p.device


def _check_steps(owner: str, n_steps: Any, internal_batch_size: Any = None) -> None:
    check_number(owner, "n_steps", n_steps, lo=1, integer=True)
    check_number(owner, "internal_batch_size", internal_batch_size, lo=1, integer=True, allow_none=True)


def _check_generator(owner: str, generator: Any, device: Optional[torch.device] = None) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if device is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"{owner}: generator is on {generator.device} but the images are on {device}; make the "
                         "generator on the images' device")


def _as_batch(t: Any, name: str) -> torch.Tensor:
    """(C,H,W) -> (1,C,H,W); anything but a tensor is refused before ``.dim()`` is called on it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (C,H,W) or (N,C,H,W), got {type(t).__name__}")
    return t[None] if t.dim() == 3 else t


def _check_tensor_images(x: torch.Tensor, name: str, *, check_range: bool = False, in_ch: Optional[int] = None,
                         min_side: int = 1, why: str = "") -> torch.Tensor:
    """A float (N,C,H,W) batch: not empty, sides >= ``min_side``, finite (and in [0, 1] with ``check_range``)."""
    check_images(x, name, channels=in_ch, check_range=check_range)
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one channel, got shape {tuple(x.shape)}")
    check_size(x, name, min_side, why)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or infinity")
    return x


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[loss]


# --------------------------------------------------------------------------------------- kernels helpers
def kernel_names(model: nn.Module) -> List[str]:
    """Names of the conv weights (nn.Conv2d, any kernel size, 1x1 included) in ``named_parameters`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"kernel_names: expected an nn.Module, got {type(model).__name__}")
    convs = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return [n for n, _ in model.named_parameters() if n in convs]


def count_kernels(model_or_scores: Union[nn.Module, Mapping[str, torch.Tensor]]) -> int:
    """Number of kernels (out x in slices) of a model's convs, or of a scores/masks dict."""
    if isinstance(model_or_scores, nn.Module):
        params = dict(model_or_scores.named_parameters())
        return sum(params[n].shape[0] * params[n].shape[1] for n in kernel_names(model_or_scores))
    return sum(int(v.numel()) for v in model_or_scores.values())


def _check_pair(target: nn.Module, baseline: nn.Module) -> None:
    for fld, m in (("target", target), ("baseline", baseline)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{fld} model: expected an nn.Module, got {type(m).__name__}")
    ta, ba = dict(target.named_parameters()), dict(baseline.named_parameters())
    if ta.keys() != ba.keys():
        raise ValueError(f"target and baseline differ in parameters: {sorted(set(ta) ^ set(ba))[:5]}")
    bad = [n for n in ta if ta[n].shape != ba[n].shape]
    if bad:
        raise ValueError(f"target and baseline differ in shape at {bad[:5]}: same architecture expected")


def _pairs(inputs: ImagesLike, references: Optional[ImagesLike], device: torch.device, model: Optional[nn.Module] = None,
           owner: str = "", input_name: str = "inputs", reference_name: str = "references"
           ) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(1,C,h,w) input / reference pairs from a batch tensor or a list of (C,h,w) / (1,C,h,w) tensors. Every image is
    a finite float tensor, not empty; inputs have the model's ``in_ch`` channels where the model says."""
    pre = f"{owner}: " if owner else ""
    in_ch = getattr(model, "in_ch", None) if model is not None else None
    p0 = next(model.parameters(), None) if model is not None else None

    def split(t: ImagesLike, name: str, ch: Optional[int]) -> List[torch.Tensor]:
        if isinstance(t, torch.Tensor):
            t = _as_batch(t, pre + name)
            _check_tensor_images(t, pre + name, in_ch=ch)
            return [t[i:i + 1] for i in range(t.shape[0])]
        if not isinstance(t, (list, tuple)):
            raise TypeError(f"{pre}{name}: expected a tensor (N,C,H,W) or a sequence of (C,H,W) tensors, got "
                            f"{type(t).__name__}")
        if not t:
            raise ValueError(f"{pre}{name}: expected at least one image, got an empty sequence")
        out = []
        for i, x in enumerate(t):
            x = _as_batch(x, f"{pre}{name}[{i}]")
            _check_tensor_images(x, f"{pre}{name}[{i}]", in_ch=ch)
            if x.shape[0] != 1:
                raise ValueError(f"{pre}{name}[{i}]: expected one image (C,H,W) or (1,C,H,W), got {tuple(x.shape)}")
            out.append(x)
        return out

    xs = split(inputs, input_name, in_ch)
    for i, x in enumerate(xs):
        if p0 is not None and x.dtype != p0.dtype:
            raise TypeError(f"{pre}{input_name}[{i}]: dtype {x.dtype} differs from the model's {p0.dtype}; convert "
                            "one of them (e.g. inputs.to(model dtype))")
    if references is None:
        return [(x.to(device), None) for x in xs]
    ys = split(references, reference_name, None)
    if len(xs) != len(ys):
        raise ValueError(f"{pre}got {len(xs)} {input_name} but {len(ys)} {reference_name}")
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


def _check_output(out: torch.Tensor, gt: Optional[torch.Tensor], owner: str, i: int) -> None:
    """The model's output for image i and its reference must have one shape (no silent broadcasting in the loss)."""
    if gt is not None and out.shape != gt.shape:
        raise ValueError(f"{owner}: references[{i}] has shape {tuple(gt.shape)} but the model's output for inputs[{i}] "
                         f"has shape {tuple(out.shape)}; the reference must be the ground truth of the output")


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


def _faig_module_loop(model: nn.Module, baseline_model: nn.Module, pairs, n_steps: int, lf,
                      kernels_only: bool, method: str) -> "FAIGAttribution":
    """FAIG (Xie et al. 2021, Eq. 3) on a module copy: at captum's sample points theta(s) = theta_b + s (theta_t -
    theta_b) (riemann_right: s = k/N, k = 1..N; riemann_left: k = 0..N-1; riemann_middle: (k+1/2)/N), set the
    copy's weights with two fused multi-tensor ops, backpropagate L and let autograd accumulate the gradients;
    attr = (theta_t - theta_b) * sum_k grad / N. One forward + backward per step and nothing else: the CPU path."""
    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    th_t = [p.detach().clone() for p in model.parameters()]
    th_b = [p.detach().to(th_t[i].device) for i, p in enumerate(baseline_model.parameters())]
    diff = torch._foreach_sub(th_t, th_b)
    offset = {"riemann_right": 1.0, "riemann_left": 0.0, "riemann_middle": 0.5}[method]
    total = {n: torch.zeros_like(t) for n, t in zip(names, th_t)}
    per_image, deltas, lt, lb = [], [], [], []
    for i_img, (x, gt) in enumerate(pairs):
        for p in params:
            p.grad = None
        for k in range(n_steps):
            s = (k + offset) / n_steps
            with torch.no_grad():
                torch._foreach_copy_(params, th_b)
                torch._foreach_add_(params, diff, alpha=s)
            out = net(x)
            if k == 0:
                _check_output(out, gt, "faig", i_img)
            lf(out, gt).backward()
        attr = {n: d * p.grad / n_steps for n, d, p in zip(names, diff, params)}
        with torch.no_grad():
            torch._foreach_copy_(params, th_t)
            l_t = lf(net(x), gt)
            torch._foreach_copy_(params, th_b)
            l_b = lf(net(x), gt)
        for n in names:
            total[n] += attr[n]
        per_image.append(kernel_scores(attr, net, kernels_only))
        deltas.append(sum(a.sum() for a in attr.values()) - (l_t - l_b))
        lt.append(l_t)
        lb.append(l_b)
    return FAIGAttribution({n: v.detach().cpu() for n, v in total.items()}, per_image,
                           torch.stack(deltas).detach().cpu(), torch.stack(lt).cpu(), torch.stack(lb).cpu())


def faig_attributions(target_model: nn.Module, baseline_model: nn.Module, inputs: ImagesLike,
                      references: Optional[ImagesLike], n_steps: int = 100, *, loss: str = "sum_mse",
                      internal_batch_size: Optional[int] = None, kernels_only: bool = True,
                      method: str = "riemann_right", vectorize: Optional[bool] = None) -> FAIGAttribution:
    """FAIG with captum over the flattened parameter vector, one image at a time, steps vmapped (``vectorize=True``)
    or evaluated one after the other inside captum's forward (``False``: faster on CPU, where the batched-weight
    convolutions that vmap produces become slow grouped convolutions; see benchmarks/bench_faig.py). Default
    (None): vmap on CUDA; on a CPU (Riemann rules) the module loop :func:`_faig_module_loop`, one forward +
    backward per step and nothing else (captum's bookkeeping over the flattened parameter vector cost 3x the
    floor there; see ``make bench``). All give the same numbers (tested).

    captum's ``riemann_right`` with inputs theta_t and baselines theta_b samples theta_b + s (theta_t - theta_b),
    s = 1/N..1, i.e. FAIG's alpha = 0..(N-1)/N, and weights every step by 1/N (FAIG's mean gradient).
    """
    from captum.attr import IntegratedGradients
    from torch.func import functional_call, vmap

    _check_steps("faig", n_steps, internal_batch_size)
    check_choice("faig", "method", method, IG_METHODS)
    _check_flag("faig", "kernels_only", kernels_only)
    _check_flag("faig", "vectorize", vectorize, allow_none=True)
    _check_pair(target_model, baseline_model)
    pb = dict(baseline_model.named_parameters())
    dt = [(n, p.dtype, pb[n].dtype) for n, p in target_model.named_parameters() if p.dtype != pb[n].dtype]
    if dt:
        n, a, b = dt[0]
        raise TypeError(f"faig: target and baseline differ in dtype at {n!r} ({a} vs {b}); convert one of them")
    lf = _loss_fn(loss)
    device = _check_model(target_model, "faig", "target_model")
    if references is None and loss != "output_sum":
        raise ValueError(f"loss {loss!r} needs references (ground truth); use loss='output_sum' without them")
    pairs = _pairs(inputs, references, device, target_model, "faig")
    if vectorize is None and device.type != "cuda" and method in ("riemann_right", "riemann_left", "riemann_middle"):
        return _faig_module_loop(target_model, baseline_model, pairs, n_steps, lf, kernels_only, method)
    names, shapes, theta_t = _flat(target_model)
    _, _, theta_b = _flat(baseline_model)
    theta_b = theta_b.to(device)
    model = target_model
    was = model.training
    model.eval()
    if vectorize is None:
        vectorize = device.type == "cuda"
    total = {n: torch.zeros(s, device=device) for n, s in zip(names, shapes)}
    per_image, deltas, lt, lb = [], [], [], []
    try:
        for i_img, (x, gt) in enumerate(pairs):
            def one(theta: torch.Tensor) -> torch.Tensor:
                out = functional_call(model, _unflatten(theta, names, shapes), (x,))
                _check_output(out, gt, "faig", i_img)
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
    _check_steps("faig_reference", n_steps)
    _check_flag("faig_reference", "kernels_only", kernels_only)
    _check_pair(target_model, baseline_model)
    lf = _loss_fn(loss)
    device = _check_model(target_model, "faig_reference", "target_model")
    if references is None and loss != "output_sum":
        raise ValueError(f"loss {loss!r} needs references (ground truth); use loss='output_sum' without them")
    pairs = _pairs(inputs, references, device, target_model, "faig_reference")
    net = copy.deepcopy(target_model).eval()
    th_t = {n: p.detach().clone() for n, p in target_model.named_parameters()}
    th_b = {n: p.detach().clone().to(device) for n, p in baseline_model.named_parameters()}
    per_image = []
    for i_img, (x, gt) in enumerate(pairs):
        gsum = {n: torch.zeros_like(p) for n, p in th_t.items()}
        for k in range(n_steps):
            a = k / n_steps
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.copy_(a * th_b[n] + (1 - a) * th_t[n])
            net.zero_grad(set_to_none=True)
            out = net(x)
            _check_output(out, gt, "faig_reference", i_img)
            lf(out, gt).backward()
            for n, p in net.named_parameters():
                gsum[n] += p.grad
        attr = {n: gsum[n] / n_steps * (th_b[n] - th_t[n]) for n in th_t}
        per_image.append(kernel_scores(attr, net, kernels_only))
    return sum_scores(per_image)


def sum_scores(scores: Sequence[Scores]) -> Scores:
    """Element-wise sum of score dicts with the same keys."""
    if not isinstance(scores, (list, tuple)) or not scores:
        raise ValueError("sum_scores: expected a non-empty sequence of scores dicts")
    for i, sc in enumerate(scores):
        _check_scores(sc, f"sum_scores: scores[{i}]")
        if set(sc) != set(scores[0]) or any(sc[n].shape != scores[0][n].shape for n in sc):
            raise ValueError(f"sum_scores: scores[{i}] differs from scores[0] in names or shapes")
    return {n: torch.stack([s[n] for s in scores]).sum(0) for n in scores[0]}


# ------------------------------------------------------------------------------------ comparison scores
def ig_kernel_scores(model: nn.Module, inputs: ImagesLike, start_inputs: ImagesLike, n_steps: int = 50, *,
                     internal_batch_size: Optional[int] = None) -> Scores:
    """The reference's IG comparison: along the *input* path x(a) = x0 + a (x - x0) from the clean LR image x0 to
    the degraded x, average the gradient of sum(F(theta_t, x(a))) w.r.t. the kernels; score = sum_{taps} |mean grad|
    (no input-difference factor), summed over images. Since the objective is a sum, the mean gradient is the
    gradient of the mean objective over the N interpolated inputs, computed as one batch (chunked)."""
    _check_steps("ig_kernel_scores", n_steps, internal_batch_size)
    device = _check_model(model, "ig_kernel_scores")
    xs = _pairs(inputs, None, device, model, "ig_kernel_scores")
    x0s = _pairs(start_inputs, None, device, model, "ig_kernel_scores", "start_inputs")
    if len(xs) != len(x0s):
        raise ValueError(f"ig_kernel_scores: got {len(xs)} inputs but {len(x0s)} start_inputs (one start per input)")
    knames = kernel_names(model)
    params = dict(model.named_parameters())
    was = model.training
    model.eval()
    total = {n: torch.zeros(params[n].shape[:2]) for n in knames}
    chunk = internal_batch_size or n_steps
    try:
        for (x, _), (x0, _) in zip(xs, x0s):
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
    check_number("weight_change_scores", "eps", eps, lo=0, lo_open=True)
    _check_pair(target_model, baseline_model)
    pt, pb = dict(target_model.named_parameters()), dict(baseline_model.named_parameters())
    return {n: ((pt[n] - pb[n]).abs().sum(dim=(-1, -2)) / (pb[n].abs().sum(dim=(-1, -2)) + eps)).detach().float().cpu()
            for n in kernel_names(target_model)}


def random_scores(model: nn.Module, generator: Optional[torch.Generator] = None) -> Scores:
    """Uniform random per-kernel scores (the random baseline)."""
    _check_generator("random_scores", generator, torch.device("cpu"))
    params = dict(model.named_parameters()) if isinstance(model, nn.Module) else None
    if params is None:
        raise TypeError(f"random_scores: model: expected an nn.Module, got {type(model).__name__}")
    return {n: torch.rand(params[n].shape[:2], generator=generator) for n in kernel_names(model)}


# --------------------------------------------------------------------------------------- selection
def _check_scores(scores: Mapping[str, torch.Tensor], name: str = "scores") -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"{name}: expected a non-empty dict name -> (out, in) scores, got {type(scores).__name__}")
    for n, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}[{n!r}]: expected a tensor, got {type(s).__name__}")
        if s.is_floating_point() and not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name}[{n!r}]: expected finite scores, got NaN or infinity")


def _check_masks(masks: Mapping[str, torch.Tensor], name: str = "mask", allow_empty: bool = False,
                 binary_ok: bool = False) -> None:
    """name -> bool (out, in) tensors (``binary_ok``: any dtype holding only 0 and 1 too)."""
    if not isinstance(masks, Mapping) or (not masks and not allow_empty):
        raise ValueError(f"{name}: expected a non-empty dict name -> bool (out, in) mask, got {type(masks).__name__}")
    for n, m in masks.items():
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name}[{n!r}]: expected a bool tensor (out, in) (see select_top), got {type(m).__name__}")
        if m.dtype == torch.bool or (binary_ok and bool(((m == 0) | (m == 1)).all())):
            continue
        raise TypeError(f"{name}[{n!r}]: expected a bool tensor (out, in) (see select_top)"
                        f"{' or 0/1 values' if binary_ok else ''}, got dtype {m.dtype}")


def select_top(scores: Mapping[str, torch.Tensor], fraction: float) -> Masks:
    """Boolean masks (same shapes) with exactly round(fraction * total) True at the highest scores, ranked over all
    layers together; ties go to the earlier kernel (dict order, then row-major), so the result is deterministic."""
    _check_scores(scores)
    check_number("select_top", "fraction", fraction, lo=0, hi=1)
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
    _check_masks(mask, "mask_count: mask", allow_empty=True, binary_ok=True)
    return int(sum(int(m.sum()) for m in mask.values()))


def mask_union(a: Masks, b: Masks) -> Masks:
    _check_masks(a, "mask_union: a")
    _check_masks(b, "mask_union: b")
    if set(a) != set(b) or any(a[n].shape != b[n].shape for n in a):
        raise ValueError(f"mask_union: a and b must have the same names and shapes; names only in a: "
                         f"{sorted(set(a) - set(b))[:5]}, only in b: {sorted(set(b) - set(a))[:5]}")
    return {n: a[n] | b[n] for n in a}


# ------------------------------------------------------------------------------------- masking, modulation
def modulate(target: nn.Module, baseline: nn.Module, mask: Mapping[str, torch.Tensor], lam: float) -> nn.Module:
    """A new module: selected kernels set to lam * theta_t + (1 - lam) * theta_b, everything else stays the target's.
    lam = 1 is the target, lam = 0 is masking; lam > 1 extrapolates past the target (FAIG's modulation)."""
    check_number("modulate", "lam", lam)
    _check_pair(target, baseline)
    _check_masks(mask, "modulate: mask", allow_empty=True, binary_ok=True)
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
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    check_number("discriminative_filters", "fraction", fraction, lo=0, hi=1)
    _check_steps("discriminative_filters", n_steps, internal_batch_size)
    _check_model(target, "discriminative_filters", "target")
    if not isinstance(degraded, Mapping) or not degraded:
        raise ValueError("discriminative_filters: degraded: expected a non-empty mapping label -> degraded images, got "
                         f"{type(degraded).__name__}")
    if method == "random":
        _check_generator("discriminative_filters", generator, torch.device("cpu"))
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
    _check_masks(filters_d, "overlap_score: filters_d")
    _check_masks(filters_x, "overlap_score: filters_x")
    bad = [n for n in filters_x if n not in filters_d or filters_d[n].shape != filters_x[n].shape]
    if bad:
        raise ValueError(f"overlap_score: filters_x has kernels {bad[:5]} missing from filters_d or of another shape; "
                         "both must come from the same model")
    inter = sum(int((filters_d[n] & filters_x[n]).sum()) for n in filters_x)
    n_x = mask_count(filters_x)
    if n_x == 0:
        raise ValueError("overlap_score: filters_x is empty")
    return inter / n_x


def predict_degradation(filters: Mapping[str, Masks], filters_x: Masks) -> Tuple[str, Dict[str, float]]:
    """argmax_D OS(x, D) (ties -> the first label) and every OS."""
    if not isinstance(filters, Mapping) or not filters:
        raise ValueError("predict_degradation: filters: expected a non-empty mapping label -> masks")
    os_ = {lab: overlap_score(m, filters_x) for lab, m in filters.items()}
    return max(os_, key=lambda k: os_[k]), os_


# ------------------------------------------------------------------------------------ output-change metric
def gradient_map(x: torch.Tensor) -> torch.Tensor:
    """Per-channel gradient magnitude sqrt(gx^2 + gy^2 + 1e-6) with [-1, 0, 1] differences (replicate borders)."""
    _check_tensor_images(x, "gradient_map: x")
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = xp[..., 1:-1, 2:] - xp[..., 1:-1, :-2]
    gy = xp[..., 2:, 1:-1] - xp[..., :-2, 1:-1]
    return torch.sqrt(gx ** 2 + gy ** 2 + 1e-6)


def output_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """FAIG's masking metric: mean squared difference of the gradient maps, x 1000 (the tables' 1e-3 unit)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"output_change: {name}: expected a torch.Tensor (N,C,H,W), got {type(t).__name__}")
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
    if not isinstance(name, str) or name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    x = _as_batch(image, "make_baseline: image")
    _check_tensor_images(x, "make_baseline: image", check_range=True, min_side=2 if name == "blur" else 1,
                         why="the blur baseline's smallest kernel is 3x3")
    check_number("make_baseline", "noise_sigma", noise_sigma, lo=0)
    check_number("make_baseline", "blur_sigma", blur_sigma, lo=0, lo_open=True)
    if name in ("uniform", "gaussian"):
        _check_generator("make_baseline", generator, x.device)
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


def _check_roi(roi: Roi) -> None:
    """The ROI's own form (its fit in the output is checked once the output size is known)."""
    if roi is None:
        return
    if isinstance(roi, torch.Tensor):
        if roi.dim() != 2 or roi.numel() == 0 or not bool(torch.isfinite(roi.float()).all()):
            raise ValueError(f"roi mask: expected a finite (H, W) tensor over the output, got shape {tuple(roi.shape)}")
        return
    if not isinstance(roi, (tuple, list)) or len(roi) != 4:
        raise ValueError(f"roi: expected (top, left, height, width) in output pixels or an (H, W) mask, got {roi!r}")
    for fld, v, lo in zip(("top", "left", "height", "width"), roi, (0, 0, 1, 1)):
        check_number("roi", fld, v, lo=lo, integer=True)


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
    if not isinstance(objective, str) or objective not in ("sum", "loss"):
        raise ValueError(f"unknown objective {objective!r}; valid objectives: sum, loss")
    if objective == "loss" and clean is None:
        raise ValueError("objective 'loss' needs the clean image (clean=...)")
    if not callable(model):
        raise TypeError(f"objective_fn: model: expected an nn.Module or a callable, got {type(model).__name__}")
    _check_roi(roi)
    if clean is not None:
        clean = _check_tensor_images(_as_batch(clean, "clean"), "clean")
        if clean.shape[0] != 1:
            raise ValueError(f"clean: expected one image (C,H,W) or (1,C,H,W), got {tuple(clean.shape)}")

    def f(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if objective == "loss" and clean.shape[1:] != out.shape[1:]:
            raise ValueError(f"clean: expected the shape of the model's output {tuple(out.shape[1:])} (C,H,W), got "
                             f"{tuple(clean.shape[1:])}")
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

    x = _as_batch(image, "integrated_gradients: image")
    check_images(x, "image", channels=None)
    if x.shape[0] != 1:
        raise ValueError(f"integrated_gradients: expected one image, got a batch of {x.shape[0]}")
    _check_tensor_images(x, "integrated_gradients: image", check_range=True)
    dev = _check_model(model, "integrated_gradients")
    in_ch = getattr(model, "in_ch", None)
    if in_ch is not None and x.shape[1] != in_ch:
        raise ValueError(f"integrated_gradients: image: expected {in_ch} channels (the model's in_ch), got shape "
                         f"{tuple(x.shape)}")
    p0 = next(model.parameters())
    if x.dtype != p0.dtype:
        raise TypeError(f"integrated_gradients: image: dtype {x.dtype} differs from the model's {p0.dtype}; convert "
                        "one of them")
    _check_steps("integrated_gradients", n_steps, internal_batch_size)
    check_choice("integrated_gradients", "method", method, IG_METHODS)
    check_number("integrated_gradients", "nt_samples", nt_samples, lo=0, integer=True)
    check_number("integrated_gradients", "nt_stdevs", nt_stdevs, lo=0)
    _check_generator("integrated_gradients", generator)
    if isinstance(baseline, torch.Tensor):
        _as_batch(baseline, "integrated_gradients: baseline")
        if tuple(baseline.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
            raise ValueError(f"integrated_gradients: baseline: expected the image's shape {tuple(x.shape)} or "
                             f"{tuple(x.shape[1:])}, got {tuple(baseline.shape)}")
        if not baseline.is_floating_point() or not bool(torch.isfinite(baseline).all()):
            raise ValueError(f"integrated_gradients: baseline: expected finite floating-point values, got dtype "
                             f"{baseline.dtype}")
    elif not isinstance(baseline, str):
        raise TypeError(f"integrated_gradients: baseline: expected a name ({', '.join(BASELINES)}) or a tensor of the "
                        f"image's shape, got {type(baseline).__name__}")
    x = x.to(dev)
    if clean is not None:
        clean = _as_batch(clean, "integrated_gradients: clean").to(dev)
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
    _as_batch(image, "baseline_gallery: image")
    check_number("baseline_gallery", "seed", seed, integer=True)
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"baseline_gallery: names: expected a non-empty sequence of baseline names, got {names!r}")
    for i, n in enumerate(names):
        if not isinstance(n, str) or n not in BASELINES:
            raise ValueError(f"baseline_gallery: names[{i}]: unknown baseline {n!r}; valid baselines: "
                             f"{', '.join(BASELINES)}")
    out = {}
    for i, n in enumerate(names):
        g = torch.Generator(device=image.device).manual_seed(seed + i)
        out[n] = integrated_gradients(model, image, baseline=n, generator=g, **kw)
    return out


def heatmap(attributions: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """(H, W) map in [0, 1]: |attr| summed over channels, clipped at the given percentile."""
    x = _as_batch(attributions, "heatmap: attributions")
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"heatmap: attributions: expected one image (C,H,W) or (1,C,H,W), got {tuple(x.shape)}")
    _check_tensor_images(x, "heatmap: attributions")
    check_number("heatmap", "percentile", percentile, lo=0, hi=100)
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
    _check_tensor_images(hr, "degrade: hr", check_range=True, min_side=2, why="x2 downsampling")
    n = hr.shape[0]
    for fld, t in (("blur", blur), ("noise", noise)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or tuple(t.shape) != (n,):
            got = f"shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"degrade: {fld}: expected a bool tensor of shape ({n},) (one flag per image), got {got}")
    check_number("degrade", "blur_sigma", blur_sigma, lo=0, lo_open=True)
    check_number("degrade", "noise_sigma", noise_sigma, lo=0)
    check_number("degrade", "kernel_size", kernel_size, lo=3, integer=True)
    if kernel_size % 2 != 1:
        raise ValueError(f"degrade.kernel_size: expected an odd integer >= 3, got {kernel_size!r}")
    _check_generator("degrade", generator, hr.device)
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
        _check_flag("SRDegradation", "blur", self.blur)
        _check_flag("SRDegradation", "noise", self.noise)
        check_number("SRDegradation", "blur_sigma", self.blur_sigma, lo=0, lo_open=True)
        check_number("SRDegradation", "noise_sigma", self.noise_sigma, lo=0)

    def size_need(self) -> Tuple[int, str]:
        return 2, "x2 downsampling"

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
            check_number("sr_x2", k, getattr(self, k), lo=0, hi=1)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"sr_x2.betas: expected a pair (beta1, beta2) in [0, 1), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_number("sr_x2", f"betas[{i}]", b, lo=0, hi=1, hi_open=True)
        if self.masks is not None:
            _check_masks(self.masks, "sr_x2.masks")

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        if self.masks is not None:
            params = dict(model.named_parameters())
            for n, m in self.masks.items():
                if n not in params:
                    raise KeyError(f"sr_x2.masks: key {n!r} is not a parameter of the model; valid names: "
                                   f"{', '.join(kernel_names(model))}")
                if tuple(m.shape) != tuple(params[n].shape[:2]):
                    raise ValueError(f"sr_x2.masks[{n!r}]: expected shape {tuple(params[n].shape[:2])} (out, in), got "
                                     f"{tuple(m.shape)}")
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
        loss = ctx.loss_fn(at_least_fp32(out), hr)  # bf16 -> fp32
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


# ------------------------------------------------------------------------------------------------ the gate
#: What a gate does when a model fails it: stop the run (``GateError``), or record the failure (the claims that
#: rest on the model are then inconclusive through the claims grammar's ``restorer`` precondition).
GATE_ACTIONS = ("stop", "record")


class GateError(RuntimeError):
    """A model that attribution or mixing would use has not learned its task (see :func:`restorer_gate`)."""


@dataclass(frozen=True)
class GateEntry:
    """One model on one degradation, on validation: its PSNR, the distorted input's PSNR and the margin."""

    model: str
    degradation: str
    psnr: float
    input_psnr: float
    margin: float

    @property
    def gain(self) -> float:
        return self.psnr - self.input_psnr

    @property
    def passed(self) -> bool:
        return bool(self.gain > self.margin)

    def describe(self) -> str:
        return (f"{self.model} on {self.degradation}: {self.psnr:.2f} dB vs its distorted input {self.input_psnr:.2f} "
                f"dB (gain {self.gain:+.2f} dB, margin > {self.margin:g} dB)")

    def as_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "degradation": self.degradation, "psnr": round(float(self.psnr), 4),
                "input_psnr": round(float(self.input_psnr), 4), "gain": round(float(self.gain), 4),
                "margin": float(self.margin), "passed": self.passed}


def restorer_gate(entries: Sequence[GateEntry], action: str = "stop", what: str = "attribution") -> List[Dict[str, Any]]:
    """Restorers first, attribution second: every model FAIG or ADMS uses must beat its distorted input on
    validation by more than the margin, PSNR(model) - PSNR(input) > margin, on its own degradation(s).
    ``action='stop'`` raises :class:`GateError` naming each failing model, its PSNR, the input's and the margin;
    ``'record'`` returns the rows all the same (their ``passed`` flags make the claims inconclusive)."""
    check_choice("restorer_gate", "action", action, GATE_ACTIONS)
    if isinstance(entries, GateEntry) or not isinstance(entries, Sequence) or not entries:
        raise ValueError(f"restorer_gate: entries: expected a non-empty sequence of GateEntry, got {entries!r}")
    for i, e in enumerate(entries):
        if not isinstance(e, GateEntry):
            raise TypeError(f"restorer_gate: entries[{i}]: expected a GateEntry, got {type(e).__name__}")
        check_number("GateEntry", "margin", e.margin, lo=0)
        check_number("GateEntry", "psnr", e.psnr)
        check_number("GateEntry", "input_psnr", e.input_psnr)
    failed = [e for e in entries if not e.passed]
    if failed and action == "stop":
        raise GateError(f"gate before {what}: {len(failed)} of {len(entries)} model checks are not restorers yet on "
                        "validation: " + "; ".join(e.describe() for e in failed)
                        + ". Train longer or larger (the profile's budget), or lower the margin knowingly.")
    return [e.as_dict() for e in entries]
