"""ADMS-style all-in-one restoration (Park, Lee, Chun, CVPR'23): adaptive degradation-specific filters.

**Our reconstruction** (no public code; see shared/reference/adms.md Sec. 3, [paper-unverified] steps):

1. a unified model (UM, theta_um) is trained on all degradations;
2. an individual model (IM) per degradation d is fine-tuned from it;
3. FAIG (:mod:`causalir.attribution`) with UM = baseline and IM_d = target, d contrasted with the other
   degradations, ranks the 3x3 kernels; the top ``fraction`` (~3%) form the binary mask M_d;
4. the adaptive kernel (the seed's equation)

       theta_ads = theta_um + sum_d c_d * theta_d ⊙ M_d,     c = softmax(DC(x)),  sum_d c_d = 1,

   with theta_d initialised to the IM's masked delta (theta_IM_d - theta_um) ⊙ M_d (``mode='offset'``), or
   ``mode='replace'``: theta_ads = theta_um ⊙ (1 - sum_d c_d M_d) + sum_d c_d theta_d ⊙ M_d with theta_d the
   absolute weights (initialised to theta_IM_d). ``mixing='hard'`` uses the argmax one-hot instead of c;
5. theta_um stays frozen; the masked theta_d and the small degradation classifier (DC) are trained with
   L1 restoration loss + ``ce_weight`` x cross-entropy (after ``warmup_steps`` of cross-entropy alone).

The per-input weights are applied with ``torch.func.vmap`` over ``torch.func.functional_call``: every sample in
a batch gets its own kernel. The experiment (``adms-rbn``: the UM -> IMs -> masks -> ADMS pipeline, its profiles,
the seed's tables and the claims) lives in :mod:`causalir.experiments.adms_rbn`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import distortions as dz
from .distortions import Distortion
from .train import STRATEGIES, Strategy, StepContext, TrainConfig, make_optimizer, make_scheduler

Masks = Dict[str, torch.Tensor]

__all__ = ["Snow", "degradation_set", "DEGRADATION_SETS", "DegradationClassifier", "ADMS", "masked_deltas",
           "mask_share", "ADMSStrategy", "build_adms", "classifier_accuracy", "mix_coefficients"]


Snow = dz.Snow  # the zoo's snow-like streaks (first written for ADMS)


# ----------------------------------------------------------------------------------- degradation sets
def _rain() -> Distortion:
    return dz.Rain(density=(0.01, 0.03), length=(10.0, 25.0), angle=(-20.0, 20.0), intensity=(0.6, 0.9))


DEGRADATION_SETS: Dict[str, Callable[[], Dict[str, Any]]] = {
    # The seed's Rain-Blur-Noise (our synthetic versions; the paper's data sets and levels are unknown).
    "rain-blur-noise": lambda: {
        "seen": {"rain": _rain(), "blur": dz.GaussianBlur((1.0, 2.5)), "noise": dz.GaussianNoise((15.0, 35.0))},
        "mixed": {"rain+noise": dz.compose([_rain(), dz.GaussianNoise(25.0)]),
                  "blur+noise": dz.compose([dz.GaussianBlur(1.5), dz.GaussianNoise(25.0)])},
        "unseen": {"haze": dz.Haze(beta=(0.8, 1.6)), "jpeg q=20": dz.JPEG(20)}},
    # Rain-Snow-Haze: the zoo's rain and haze plus our snow-like streaks.
    "rain-snow-haze": lambda: {
        "seen": {"rain": _rain(), "snow": Snow(), "haze": dz.Haze(beta=(0.8, 2.0), airlight=(0.7, 1.0))},
        "mixed": {"rain+haze": dz.compose([dz.Haze(beta=1.2), _rain()]),
                  "snow+haze": dz.compose([dz.Haze(beta=1.2), Snow()])},
        "unseen": {"noise σ=25": dz.GaussianNoise(25.0), "blur σ=1.5": dz.GaussianBlur(1.5)}},
}


def degradation_set(name: str) -> Dict[str, Dict[str, Distortion]]:
    """{'seen': label -> distortion, 'mixed': ..., 'unseen': ...} for ``rain-blur-noise`` or ``rain-snow-haze``."""
    if name not in DEGRADATION_SETS:
        raise KeyError(f"unknown degradation set {name!r}; valid names: {', '.join(DEGRADATION_SETS)}")
    return DEGRADATION_SETS[name]()


# ------------------------------------------------------------------------------------------ classifier
class DegradationClassifier(nn.Module):
    """The DC module (our guess at 'a small CNN'): the image and its high-pass residual x - box3(x) (noise, rain
    and blur differ most there), three conv-LeakyReLU (the last two stride 2), mean / std / max pooling of the
    features, a linear layer -> logits over the K degradations."""

    def __init__(self, num_classes: int, nf: int = 16, in_ch: int = 3) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DegradationClassifier: expected at least 2 classes, got {num_classes}")
        self.features = nn.Sequential(
            nn.Conv2d(2 * in_ch, nf, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, 2 * nf, 3, 2, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(2 * nf, 2 * nf, 3, 2, 1), nn.LeakyReLU(0.1))
        self.head = nn.Linear(6 * nf, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hp = x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        f = self.features(torch.cat([x, 4.0 * hp], dim=1))
        return self.head(torch.cat([f.mean(dim=(-1, -2)), f.std(dim=(-1, -2)), f.amax(dim=(-1, -2))], dim=1))


# ------------------------------------------------------------------------------------------- ADMS model
def _conv_weight_names(model: nn.Module) -> List[str]:
    convs = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return [n for n, _ in model.named_parameters() if n in convs]


def _key(name: str) -> str:
    return name.replace(".", "__")


def masked_deltas(unified: nn.Module, individual: nn.Module,
                  mask: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """(theta_IM - theta_um) ⊙ M per conv weight (the kernel mask (out, in) broadcast over the taps)."""
    pu, pi = dict(unified.named_parameters()), dict(individual.named_parameters())
    out = {}
    for n, m in mask.items():
        if n not in pu:
            raise KeyError(f"mask key {n!r} is not a parameter of the model; valid names: "
                           f"{', '.join(_conv_weight_names(unified))}")
        out[n] = ((pi[n] - pu[n]).detach() * m.to(pu[n].device, pu[n].dtype)[..., None, None])
    return out


def mask_share(mask: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, float]:
    """Masked kernels / all conv kernels, and masked weights / all parameters of ``model``."""
    params = dict(model.named_parameters())
    kern = sum(int(m.sum()) for m in mask.values())
    total_k = sum(params[n].shape[0] * params[n].shape[1] for n in _conv_weight_names(model))
    w = sum(int(m.sum()) * params[n][0, 0].numel() for n, m in mask.items())
    return {"kernels": kern, "kernel_share": kern / total_k, "weights": w,
            "param_share": w / sum(p.numel() for p in params.values())}


def mix_coefficients(weights: Sequence[float]) -> torch.Tensor:
    """Non-negative weights -> c with sum_d c_d = 1 (for the notebook's sliders)."""
    w = torch.tensor([float(v) for v in weights])
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError(f"mix_coefficients: expected non-negative weights with a positive sum, got {list(weights)}")
    return w / w.sum()


class ADMS(nn.Module):
    """theta_ads(c) = theta_um + sum_d c_d theta_d ⊙ M_d per input (``mode='offset'``; or ``'replace'``), with
    c = softmax(DC(x)) (``mixing='soft'``) or its argmax one-hot (``'hard'``). theta_um is frozen."""

    def __init__(self, unified: nn.Module, masks: Mapping[str, Masks], classifier: Optional[nn.Module] = None, *,
                 init: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None, mode: str = "offset",
                 mixing: str = "soft") -> None:
        super().__init__()
        if mode not in ("offset", "replace"):
            raise ValueError(f"mode: expected 'offset' or 'replace', got {mode!r}")
        if mixing not in ("soft", "hard"):
            raise ValueError(f"mixing: expected 'soft' or 'hard', got {mixing!r}")
        self.labels = list(masks)
        if len(self.labels) < 1:
            raise ValueError("ADMS: expected at least one degradation mask")
        self.mode, self.mixing = mode, mixing
        self.unified = copy.deepcopy(unified).eval()
        for p in self.unified.parameters():
            p.requires_grad_(False)
        self.classifier = classifier if classifier is not None else DegradationClassifier(len(self.labels))
        params = dict(self.unified.named_parameters())
        self.names = [n for n in _conv_weight_names(self.unified) if any(n in masks[d] for d in self.labels)]
        self.deltas = nn.ParameterDict()
        for n in self.names:
            w = params[n]
            ms = []
            for d in self.labels:
                m = masks[d].get(n)
                if m is None:
                    m = torch.zeros(w.shape[:2], dtype=torch.bool)
                if tuple(m.shape) != tuple(w.shape[:2]):
                    raise ValueError(f"mask[{d!r}][{n!r}]: expected shape {tuple(w.shape[:2])} (out, in), got "
                                     f"{tuple(m.shape)}")
                ms.append(m.to(torch.bool))
            self.register_buffer(f"mask_{_key(n)}", torch.stack(ms).to(w.dtype)[..., None, None])
            if init is not None:
                theta = torch.stack([init[d][n].to(w) if n in init[d] else torch.zeros_like(w) for d in self.labels])
            elif mode == "offset":
                theta = torch.zeros((len(self.labels), *w.shape), dtype=w.dtype)
            else:
                theta = w.detach()[None].repeat(len(self.labels), *([1] * w.dim()))
            self.deltas[_key(n)] = nn.Parameter(theta.clone())

    # -- weights
    def mask(self, name: str) -> torch.Tensor:
        """(K, out, in, 1, 1) float mask of conv weight ``name``."""
        return getattr(self, f"mask_{_key(name)}")

    def kernel_masks(self) -> Dict[str, Masks]:
        """The masks M_d the model was built with: label -> conv weight name -> bool (out, in) (names absent from
        every mask are left out, as they were when the model was built)."""
        return {d: {n: self.mask(n)[i, ..., 0, 0].bool().cpu() for n in self.names} for i, d in enumerate(self.labels)}

    def weights(self, c: torch.Tensor) -> Dict[str, torch.Tensor]:
        """theta_ads for ONE coefficient vector c (K,): name -> tensor, every parameter and buffer of the UM."""
        out = {n: p for n, p in self.unified.named_parameters()}
        out.update({n: b for n, b in self.unified.named_buffers()})
        shape = (-1,) + (1,) * 4
        for n in self.names:
            cm = c.view(shape).to(out[n].dtype) * self.mask(n)        # c_d M_d, (K, out, in, 1, 1)
            mixed = (cm * self.deltas[_key(n)]).sum(0)                # sum_d c_d theta_d ⊙ M_d
            if self.mode == "offset":
                out[n] = out[n] + mixed
            else:
                out[n] = out[n] * (1 - cm.sum(0)) + mixed
        return out

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """c (N, K): softmax of the classifier's logits, or the argmax one-hot with ``mixing='hard'``."""
        p = self.classifier(x).softmax(dim=1)
        if self.mixing == "hard":
            return F.one_hot(p.argmax(1), len(self.labels)).to(p.dtype)
        return p

    def check_c(self, c: torch.Tensor, n: int) -> torch.Tensor:
        if c.dim() == 1:
            c = c[None].expand(n, -1)
        if c.shape != (n, len(self.labels)):
            raise ValueError(f"c: expected shape ({n}, {len(self.labels)}) (one weight per degradation "
                             f"{self.labels}), got {tuple(c.shape)}")
        return c

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Restore each sample with its own theta_ads(c_i) (vmap over functional_call)."""
        if x.dim() != 4:
            raise ValueError(f"x: expected shape (N,3,H,W), got {tuple(x.shape)}")
        c = self.coefficients(x) if c is None else self.check_c(c.to(x.device), x.shape[0])

        def one(ci: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
            return functional_call(self.unified, self.weights(ci), (xi[None],))[0]

        return vmap(one)(c, x)

    def with_coefficients(self, c: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A restorer that ignores the classifier and uses the fixed c (e.g. the oracle one-hot)."""
        return lambda x: self(x, c)

    def extra_params(self) -> Dict[str, int]:
        """Stored parameters beyond the UM: masked weights of every theta_d and the classifier."""
        masked = sum(int(self.mask(n).sum()) * self.deltas[_key(n)][0, 0, 0].numel() for n in self.names)
        clf = sum(p.numel() for p in self.classifier.parameters())
        return {"masked_weights": masked, "classifier": clf, "total": masked + clf}


# ------------------------------------------------------------------------------------------- training
@STRATEGIES.register("adms")
@dataclass
class ADMSStrategy(Strategy):
    """Train the ADMS model's masked theta_d and its classifier: per sample a random seen degradation (its index is
    the class label); loss = L1(ADMS(x; c), y) + ce_weight * CE(DC(x), label); the first ``warmup_steps`` train
    the classifier alone with CE. ``teacher_forcing`` uses the true one-hot c for the restoration term. The classifier
    learns at ``classifier_lr_mult`` x the lr (it starts from scratch; the masked theta_d start from the IMs)."""

    ce_weight: float = 0.1
    warmup_steps: int = 0
    teacher_forcing: bool = False
    classifier_lr_mult: float = 10.0
    name: str = field(default="adms", init=False)

    def configure(self, model: nn.Module, cfg: TrainConfig) -> None:
        if not isinstance(model, ADMS):
            raise TypeError(f"ADMSStrategy trains an ADMS model, got {type(model).__name__}")
        clf = list(model.classifier.parameters())
        ids = {id(p) for p in clf}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self.opt = make_optimizer([{"params": rest, "lr": cfg.lr},
                                   {"params": clf, "lr": cfg.lr * self.classifier_lr_mult}], cfg)
        self.sched = make_scheduler(self.opt, cfg)
        self._step = 0

    def step(self, ctx: StepContext) -> Dict[str, float]:
        model: ADMS = ctx.model  # type: ignore[assignment]
        clean = ctx.sample_clean()
        ctx.counters.distorted_batches += 1
        x, idx = dz.apply_random(ctx.distortions, clean, ctx.generator)
        x = x.clamp(0, 1)
        logits = model.classifier(x)
        ce = F.cross_entropy(logits, idx)
        stats = {"ce": float(ce.detach())}
        if self._step < self.warmup_steps:
            loss = ce
        else:
            if self.teacher_forcing:
                c = F.one_hot(idx, len(model.labels)).to(x.dtype)
            elif model.mixing == "hard":
                p = logits.softmax(1)
                c = F.one_hot(p.argmax(1), len(model.labels)).to(p.dtype) + p - p.detach()  # straight-through
            else:
                c = logits.softmax(1)
            rec = ctx.loss_fn(model(x, c), clean)
            loss = rec + self.ce_weight * ce
            stats["rec"] = float(rec.detach())
        warm = self._step < self.warmup_steps  # classifier-only steps backpropagate no restoration
        self.update(ctx, loss, clean.shape[0], n_backprop=0 if warm else clean.shape[0])
        self._step += 1
        return {"loss": float(loss.detach()), "acc": float((logits.argmax(1) == idx).float().mean()), **stats}

    def state_dict(self) -> Dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self._step = int(state["step"])


def build_adms(unified: nn.Module, individuals: Mapping[str, nn.Module], masks: Mapping[str, Masks], *,
               clf_nf: int = 16, mode: str = "offset", mixing: str = "soft") -> ADMS:
    """ADMS initialised from the IMs: theta_d = (theta_IM_d - theta_um) ⊙ M_d (offset) or theta_IM_d (replace)."""
    if mode == "offset":
        init = {d: masked_deltas(unified, individuals[d], masks[d]) for d in masks}
    else:
        init = {d: {n: p.detach() for n, p in individuals[d].named_parameters()} for d in masks}
    return ADMS(unified, masks, DegradationClassifier(len(masks), clf_nf), init=init, mode=mode, mixing=mixing)


def classifier_accuracy(adms: ADMS, images: Sequence[torch.Tensor], seen: Mapping[str, Distortion], n: int,
                        patch: int, seed: int = 0, device: str = "auto") -> Dict[str, Any]:
    """Accuracy of the DC module on ``n`` random patches per seen degradation, and the confusion matrix
    (rows = true, columns = predicted, in ``adms.labels`` order)."""
    from . import data
    from .utils import make_generator, resolve_device

    dev = resolve_device(device)
    g = make_generator(seed, dev)
    sampler = data.PatchSampler(images, patch, n, dev)
    k = len(adms.labels)
    conf = torch.zeros(k, k, dtype=torch.long)
    adms.eval().to(dev)
    with torch.no_grad():
        for i, lab in enumerate(adms.labels):
            x = seen[lab](sampler.sample(g), g).clamp(0, 1)
            pred = adms.classifier(x).argmax(1).cpu()
            conf[i] += torch.bincount(pred, minlength=k)
    return {"accuracy": float(conf.diag().sum() / conf.sum()), "confusion": conf.tolist(), "labels": adms.labels}
