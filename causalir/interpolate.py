"""Deep network interpolation (DNI; Wang et al., CVPR'19): blend the weights of correlated networks.

Convention used everywhere in causalir (ESRGAN's ``net_interp.py`` writes the same with the roles swapped):

    theta(alpha) = alpha * theta_A + (1 - alpha) * theta_B,        alpha in [0, 1]

so alpha = 0 is model B and alpha = 1 is model A (exactly: 1*a + 0*b == a in IEEE arithmetic). With several nets,
theta = sum_j w_j theta_j with sum_j w_j = 1. Every floating-point state-dict tensor is blended; integer buffers
must agree and are copied. No retraining: a blend costs one pass over the weights, a restoration one forward pass
(:func:`restore_interpolated` uses ``torch.func.functional_call``, no module copy), cheap enough for a slider.

The experiment ``dni-denoise`` (:mod:`causalir.experiments.dni_denoise`) fine-tunes a sigma=15 DnCNN to sigma=50,
sweeps alpha with :func:`dni_sweep`, compares with models fine-tuned at the intermediate sigmas, and interpolates
two independently trained models.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from .utils import check_choice, check_number

State = Mapping[str, torch.Tensor]

__all__ = ["interpolate_states", "blend_states", "interpolate_model", "blend_models", "restore_interpolated",
           "weight_distance", "dni_sweep"]


# ------------------------------------------------------------------------------------------- core maths
def _check_compatible(states: Sequence[State]) -> None:
    ref = states[0]
    for j, s in enumerate(states[1:], 1):
        if set(s) != set(ref):
            missing, extra = sorted(set(ref) - set(s)), sorted(set(s) - set(ref))
            raise ValueError(f"state {j} does not match state 0: missing keys {missing[:5]}, extra keys {extra[:5]} "
                             "(DNI needs the same architecture)")
        for k, v in ref.items():
            if s[k].shape != v.shape:
                raise ValueError(f"state {j}: tensor {k!r} has shape {tuple(s[k].shape)}, expected {tuple(v.shape)}")
            if s[k].dtype != v.dtype:
                raise ValueError(f"state {j}: tensor {k!r} has dtype {s[k].dtype}, expected {v.dtype}")


def _as_state(m: nn.Module | State) -> Dict[str, torch.Tensor]:
    if isinstance(m, nn.Module):
        return {k: v.detach() for k, v in m.state_dict().items()}
    if isinstance(m, Mapping):
        return dict(m)
    raise TypeError(f"expected an nn.Module or a state dict (name -> tensor), got {type(m).__name__}")


def blend_states(states: Sequence[State], weights: Sequence[float] | torch.Tensor, *, atol: float = 1e-6,
                 allow_extrapolation: bool = False) -> Dict[str, torch.Tensor]:
    """theta = sum_j w_j theta_j with sum_j w_j = 1 (DNI for several nets). Integer tensors must be equal."""
    if isinstance(states, (nn.Module, Mapping)) or not isinstance(states, (list, tuple)):
        raise TypeError(f"blend_states: states: expected a sequence of models or state dicts, got "
                        f"{type(states).__name__}")
    states = [_as_state(s) for s in states]
    if isinstance(weights, torch.Tensor) or type(weights).__module__ == "numpy":  # tensors and numpy arrays
        weights = weights.tolist() if getattr(weights, "ndim", 1) == 1 else [weights.tolist()]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"blend_states: weights: expected a sequence of numbers, got {type(weights).__name__}")
    for j, x in enumerate(weights):
        check_number("blend_states", f"weights[{j}]", x)
    check_number("blend_states", "atol", atol, lo=0)
    check_choice("blend_states", "allow_extrapolation", allow_extrapolation, (True, False))
    w = [float(x) for x in weights]
    if len(states) == 0:
        raise ValueError("blend_states: expected at least one state")
    if len(w) != len(states):
        raise ValueError(f"blend_states: {len(w)} weights for {len(states)} states")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"blend_states: weights must be finite, got {w}")
    if abs(sum(w) - 1.0) > atol:
        raise ValueError(f"blend_states: weights must sum to 1, got sum {sum(w):.6g} ({w})")
    if not allow_extrapolation and any(x < 0 or x > 1 for x in w):
        raise ValueError(f"blend_states: weights must lie in [0, 1] (pass allow_extrapolation=True), got {w}")
    _check_compatible(states)
    out: Dict[str, torch.Tensor] = {}
    for k, v0 in states[0].items():
        if not v0.is_floating_point():
            if not all(torch.equal(s[k], v0) for s in states[1:]):
                raise ValueError(f"non-float tensor {k!r} differs between states; it cannot be interpolated")
            out[k] = v0.clone()
            continue
        acc = w[0] * v0
        for wj, s in zip(w[1:], states[1:]):
            acc = acc + wj * s[k]
        out[k] = acc
    return out


def interpolate_states(state_a: State | nn.Module, state_b: State | nn.Module, alpha: float, *,
                       allow_extrapolation: bool = False) -> Dict[str, torch.Tensor]:
    """theta(alpha) = alpha * theta_A + (1 - alpha) * theta_B; alpha=1 -> A and alpha=0 -> B exactly."""
    check_number("interpolate_states", "alpha", alpha)
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not allow_extrapolation and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (pass allow_extrapolation=True to go beyond), got {alpha}")
    return blend_states([state_a, state_b], [alpha, 1.0 - alpha], allow_extrapolation=allow_extrapolation)


def interpolate_model(model_a: nn.Module, model_b: nn.Module, alpha: float, **kw: Any) -> nn.Module:
    """A new module (a copy of ``model_a``) holding theta(alpha)."""
    for fld, mod in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(mod, nn.Module):
            raise TypeError(f"interpolate_model: {fld}: expected an nn.Module, got {type(mod).__name__}")
    m = copy.deepcopy(model_a)
    m.load_state_dict(interpolate_states(model_a, model_b, alpha, **kw))
    return m.eval()


def blend_models(models: Sequence[nn.Module], weights: Sequence[float], **kw: Any) -> nn.Module:
    """A new module holding sum_j w_j theta_j."""
    if not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"blend_models: models: expected a non-empty sequence of nn.Modules, got {models!r}")
    for j, mod in enumerate(models):
        if not isinstance(mod, nn.Module):
            raise TypeError(f"blend_models: models[{j}]: expected an nn.Module, got {type(mod).__name__}")
    m = copy.deepcopy(models[0])
    m.load_state_dict(blend_states(list(models), weights, **kw))
    return m.eval()


def restore_interpolated(model_a: nn.Module, model_b: nn.Module, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """Restore ``x`` (N,3,H,W) with theta(alpha) via ``torch.func.functional_call`` (no module copy); clamped to
    [0,1]. This is the function the notebook's slider calls."""
    from .utils import check_images

    for fld, mod in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(mod, nn.Module):
            raise TypeError(f"restore_interpolated: {fld}: expected an nn.Module, got {type(mod).__name__}")
    check_images(x, "x")
    if x.shape[0] == 0 or min(x.shape[-2:]) == 0:
        raise ValueError(f"x: expected a non-empty batch of non-empty images, got shape {tuple(x.shape)}")
    state = interpolate_states(model_a, model_b, alpha)
    p = next(model_a.parameters(), None)
    if p is None:
        raise ValueError("restore_interpolated: model_a has no parameters")
    dev = p.device
    with torch.no_grad():
        return functional_call(model_a.eval(), state, (x.to(dev),)).clamp(0, 1)


def weight_distance(a: nn.Module | State, b: nn.Module | State) -> Dict[str, float]:
    """||theta_A - theta_B|| and the cosine of the two weight vectors: fine-tuned pairs are close and aligned,
    independently trained ones are not (why DNI needs correlated nets)."""
    sa, sb = _as_state(a), _as_state(b)
    _check_compatible([sa, sb])
    if not any(v.is_floating_point() for v in sa.values()):
        raise ValueError("weight_distance: the states hold no floating-point tensors to compare")
    va = torch.cat([v.flatten().double() for v in sa.values() if v.is_floating_point()])
    vb = torch.cat([sb[k].flatten().double() for k, v in sa.items() if v.is_floating_point()])
    return {"l2": float((va - vb).norm()), "relative_l2": float((va - vb).norm() / va.norm().clamp_min(1e-12)),
            "cosine": float(torch.nn.functional.cosine_similarity(va, vb, dim=0))}


# ---------------------------------------------------------------------------------------------- sweeps
def dni_sweep(model_a: nn.Module, model_b: nn.Module, alphas: Sequence[float], images: Sequence[torch.Tensor],
              sigmas: Sequence[float], *, seed: int = 0, device: str = "auto",
              image_names: Optional[Sequence[str]] = None):
    """PSNR of theta(alpha) for every alpha and noise level: tidy DataFrame (alpha, sigma, image, psnr)."""
    import pandas as pd

    from . import distortions, evaluate

    def as_list(arg: str, seq: Any) -> list:
        if isinstance(seq, (np.ndarray, torch.Tensor)) and seq.ndim == 1:
            seq = seq.tolist()  # a 1-D array (e.g. np.linspace) is a sequence of numbers
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)) or not seq:
            raise ValueError(f"dni_sweep: {arg}: expected a non-empty 1-D sequence of numbers, got {seq!r}")
        return list(seq)

    alphas, sigmas = as_list("alphas", alphas), as_list("sigmas", sigmas)
    for arg, seq in (("alphas", alphas), ("sigmas", sigmas)):
        for j, v in enumerate(seq):
            check_number("dni_sweep", f"{arg}[{j}]", v, lo=0, hi=1 if arg == "alphas" else None)
    for arg, keys in (("alphas", [f"{a:.4f}" for a in alphas]), ("sigmas", [f"{s:g}" for s in sigmas])):
        if len(set(keys)) != len(keys):
            raise ValueError(f"dni_sweep: {arg}: expected distinct values (alphas to 4 decimals, sigmas as printed), "
                             f"got {list(alphas if arg == 'alphas' else sigmas)}")
    levels = {f"σ={s:g}": distortions.GaussianNoise(float(s)) for s in sigmas}
    sig_of = {f"σ={s:g}": float(s) for s in sigmas}
    nets = {f"{a:.4f}": interpolate_model(model_a, model_b, a) for a in alphas}
    df = evaluate.evaluate(nets, images, levels, seed=seed, device=device, image_names=image_names,
                           include_input=False)
    return pd.DataFrame({"alpha": df["method"].astype(float), "sigma": df["distortion"].map(sig_of),
                         "image": df["image"], "psnr": df["psnr"]})
