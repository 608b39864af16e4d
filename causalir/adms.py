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
a batch gets its own kernel. The experiment (``adms-rbn``) reports IM / UM / ADMS per degradation, the average and
the parameter count next to the seed's table, ADMS on mixed and unseen degradations and the classifier accuracy.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import distortions as dz
from .distortions import Distortion
from .train import STRATEGIES, Strategy, StepContext, TrainConfig, make_optimizer, make_scheduler

Masks = Dict[str, torch.Tensor]

__all__ = ["Snow", "degradation_set", "DEGRADATION_SETS", "DegradationClassifier", "ADMS", "masked_deltas",
           "mask_share", "ADMSStrategy", "ADMSConfig", "ADMS_PROFILES", "build_adms", "adms_pipeline",
           "classifier_accuracy", "evaluate_run", "mix_coefficients", "adms_experiment", "SEED_TABLES"]


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


# ----------------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class ADMSConfig:
    """One ADMS-style run: UM -> IMs -> FAIG masks -> ADMS training -> evaluation."""

    model: str = "dncnn"
    model_cfg: Dict[str, Any] = field(default_factory=lambda: {"nf": 16, "depth": 4})
    tasks: Tuple[str, ...] = ("rain-blur-noise",)
    um_steps: int = 60
    im_steps: int = 20
    adms_steps: int = 20
    warmup_steps: int = 20
    batch_size: int = 4
    patch_size: int = 32
    lr: float = 1e-3
    im_lr: float = 3e-4
    adms_lr: float = 3e-4
    fraction: float = 0.03
    faig_steps: int = 8
    faig_images: int = 2
    faig_side: int = 32
    ce_weight: float = 0.1
    mode: str = "offset"
    mixing: str = "soft"
    clf_nf: int = 8
    eval_side: int = 64
    acc_patches: int = 16
    seeds: int = 1
    seeds_second_task: int = 1


ADMS_PROFILES: Dict[str, ADMSConfig] = {
    "quick": ADMSConfig(warmup_steps=40),
    # The largest honest run this 2-core shared CPU affords (committed as data/results/adms-rbn-medium.json).
    "medium": ADMSConfig(model_cfg={"nf": 16, "depth": 4}, tasks=("rain-blur-noise", "rain-snow-haze"),
                         um_steps=300, im_steps=100, adms_steps=100, warmup_steps=250, batch_size=8, patch_size=40,
                         lr=1e-3, im_lr=3e-4, adms_lr=3e-4, faig_steps=16, faig_images=4, faig_side=48,
                         clf_nf=8, eval_side=128, acc_patches=64, seeds=2, seeds_second_task=1),
    # GPU scale (not run here): DnCNN-17/64 backbone, long schedules, FAIG with N=100 on 16 full crops.
    "full": ADMSConfig(model_cfg={"preset": "paper"}, tasks=("rain-blur-noise", "rain-snow-haze"), um_steps=200_000,
                       im_steps=50_000, adms_steps=50_000, warmup_steps=5_000, batch_size=32, patch_size=96,
                       lr=2e-4, im_lr=5e-5, adms_lr=1e-4, faig_steps=100, faig_images=16, faig_side=128,
                       clf_nf=32, eval_side=512, acc_patches=1000, seeds=3, seeds_second_task=3),
}

# The seed's tables (seed 003; PSNR dB, params in M). Paper numbers, for orientation only.
SEED_TABLES: Dict[str, Dict[str, Dict[str, float]]] = {
    "rain-blur-noise": {
        "NAF IM": {"rain": 33.03, "blur": 30.30, "noise": 31.59, "avg": 31.64, "params_M": 51.3},
        "NAF UM": {"rain": 32.99, "blur": 29.46, "noise": 31.39, "avg": 31.28, "params_M": 17.1},
        "NAF ADMS": {"rain": 33.15, "blur": 29.99, "noise": 31.53, "avg": 31.56, "params_M": 18.9},
        "MSB IM": {"rain": 33.02, "blur": 28.79, "noise": 31.52, "avg": 31.11, "params_M": 83.1},
        "MSB UM": {"rain": 32.12, "blur": 26.61, "noise": 30.97, "avg": 29.90, "params_M": 28.7},
        "MSB ADMS": {"rain": 32.74, "blur": 27.56, "noise": 31.42, "avg": 30.58, "params_M": 31.6},
        "AirNet": {"rain": 32.49, "blur": 26.84, "noise": 31.41, "avg": 30.25, "params_M": 7.6},
    },
    "rain-snow-haze": {
        "MSB IM": {"rain": 34.81, "snow": 31.42, "haze": 31.67, "avg": 32.63, "params_M": 86.1},
        "MSB UM": {"rain": 30.77, "snow": 30.56, "haze": 30.45, "avg": 30.59, "params_M": 28.7},
        "MSB ADMS": {"rain": 32.07, "snow": 32.41, "haze": 30.38, "avg": 31.62, "params_M": 31.6},
        "AirNet": {"rain": 30.08, "snow": 26.91, "haze": 26.11, "avg": 27.70, "params_M": 7.6},
    },
}


def _fit(model: nn.Module, strategy: Strategy, dists: Sequence[Distortion], steps: int, lr: float, cfg: ADMSConfig,
         seed: int, device: str) -> nn.Module:
    from . import data, train

    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, patch_size=cfg.patch_size, lr=lr, seed=seed,
                     device=device, progress=False)
    return train.fit(model, strategy, data.embedded_images("train"), list(dists), tc).model


def _faig_inputs(seen: Mapping[str, Distortion], cfg: ADMSConfig, seed: int, device) -> Tuple[Dict[str, torch.Tensor],
                                                                                               torch.Tensor]:
    """The same ``faig_images`` training crops degraded by every seen degradation (FAIG's x_D / x_other pairs)."""
    from . import data
    from .utils import make_generator, resolve_device

    dev = resolve_device(device)
    g = make_generator(seed, dev)
    clean = data.PatchSampler(data.embedded_images("train"), cfg.faig_side, cfg.faig_images, dev).sample(g)
    return {lab: d(clean, g).clamp(0, 1) for lab, d in seen.items()}, clean


def build_adms(unified: nn.Module, individuals: Mapping[str, nn.Module], masks: Mapping[str, Masks], *,
               clf_nf: int = 16, mode: str = "offset", mixing: str = "soft") -> ADMS:
    """ADMS initialised from the IMs: theta_d = (theta_IM_d - theta_um) ⊙ M_d (offset) or theta_IM_d (replace)."""
    if mode == "offset":
        init = {d: masked_deltas(unified, individuals[d], masks[d]) for d in masks}
    else:
        init = {d: {n: p.detach() for n, p in individuals[d].named_parameters()} for d in masks}
    return ADMS(unified, masks, DegradationClassifier(len(masks), clf_nf), init=init, mode=mode, mixing=mixing)


def adms_pipeline(seen: Mapping[str, Distortion], cfg: ADMSConfig, seed: int, device: str = "auto") -> Dict[str, Any]:
    """UM -> IMs -> FAIG masks (top ``cfg.fraction`` kernels, d vs the others) -> trained ADMS. Returns the models,
    the masks and the untrained ADMS (FAIG-masked IM deltas with an untrained classifier) for ablation."""
    from . import models
    from .attribution import discriminative_filters

    labels = list(seen)
    torch.manual_seed(seed)
    um = _fit(models.build(cfg.model, **cfg.model_cfg), STRATEGIES.build("erm"), list(seen.values()), cfg.um_steps,
              cfg.lr, cfg, seed, device)
    ims = {d: _fit(copy.deepcopy(um), STRATEGIES.build("erm"), [seen[d]], cfg.im_steps, cfg.im_lr, cfg,
                   seed + 1 + i, device) for i, d in enumerate(labels)}
    degraded, clean = _faig_inputs(seen, cfg, seed + 100, device)
    masks: Dict[str, Masks] = {}
    scores: Dict[str, Dict[str, torch.Tensor]] = {}
    for d in labels:
        disc = discriminative_filters(ims[d], um, degraded, clean, fraction=cfg.fraction, method="faig",
                                      n_steps=cfg.faig_steps)
        masks[d], scores[d] = disc.masks[d], disc.scores[d]
    adms = build_adms(um, ims, masks, clf_nf=cfg.clf_nf, mode=cfg.mode, mixing=cfg.mixing)
    untrained = copy.deepcopy(adms)
    torch.manual_seed(seed + 200)
    strat = ADMSStrategy(ce_weight=cfg.ce_weight, warmup_steps=cfg.warmup_steps)
    adms = _fit(adms, strat, [seen[d] for d in labels], cfg.warmup_steps + cfg.adms_steps, cfg.adms_lr, cfg,
                seed + 300, device)
    return {"um": um, "ims": ims, "masks": masks, "scores": scores, "adms": adms.eval(), "untrained": untrained.eval()}


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


def evaluate_run(run: Dict[str, Any], dset: Dict[str, Dict[str, Distortion]], cfg: ADMSConfig, seed: int,
                 device: str = "auto") -> Dict[str, Any]:
    """Held-out test photos: IM / UM / ADMS (predicted c, oracle one-hot c, and the untrained FAIG-masked deltas)
    per seen degradation; UM / ADMS / classifier-routed IM on mixed and unseen ones; classifier accuracy;
    parameter counts and mask shares."""
    import pandas as pd

    from . import data, evaluate, models

    test = data.embedded_images("test", max_side=cfg.eval_side)
    names = data.embedded_names("test")
    seen = dset["seen"]
    labels = list(seen)
    um, ims, adms, untrained = run["um"], run["ims"], run["adms"], run["untrained"]
    k = len(labels)
    rows = []
    for i, d in enumerate(labels):
        onehot = F.one_hot(torch.tensor(i), k).float()
        methods = {"IM": ims[d], "UM": um, "ADMS": adms, "ADMS (oracle c)": adms.with_coefficients(onehot),
                   "FAIG-masked IM delta, untrained (oracle c)": untrained.with_coefficients(onehot)}
        df = evaluate.evaluate(methods, test, {d: seen[d]}, seed=1000 + seed, device=device, image_names=names)
        rows.append(df)

    def routed(x: torch.Tensor) -> torch.Tensor:  # IM chosen per input by the ADMS classifier (argmax)
        j = adms.classifier(x).argmax(1)
        return torch.cat([ims[labels[int(t)]](x[b:b + 1]) for b, t in enumerate(j)])

    other = {**dset["mixed"], **dset["unseen"]}
    df_o = evaluate.evaluate({"UM": um, "ADMS": adms, "IM (routed by DC)": routed}, test, other, seed=1000 + seed,
                             device=device, image_names=names)
    seen_df = pd.concat(rows)
    acc = classifier_accuracy(adms, data.embedded_images("test"), seen, cfg.acc_patches, cfg.patch_size,
                              seed=2000 + seed, device=device)
    n_um = models.count_params(um)
    extra = adms.extra_params()
    share = {d: mask_share(run["masks"][d], um) for d in labels}
    return {"seen": seen_df, "other": df_o, "accuracy": acc,
            "params": {"UM": n_um, "IM": k * n_um, "ADMS": n_um + extra["total"], **{f"ADMS {a}": b
                                                                                  for a, b in extra.items()}},
            "mask_share": share}


def _table(seen_df, labels: Sequence[str]) -> Dict[str, Dict[str, float]]:
    t = seen_df.groupby(["method", "distortion"])["psnr"].mean()
    out: Dict[str, Dict[str, float]] = {}
    for (m, d), v in t.items():
        out.setdefault(m, {})[d] = float(v)
    for m in out:
        out[m]["avg"] = float(sum(out[m][d] for d in labels) / len(labels))
    return out


def adms_experiment(profile: str = "quick", seed: int = 0, device: str = "auto", **overrides: Any) -> Dict[str, Any]:
    """ADMS-style all-in-one on Rain-Blur-Noise (and Rain-Snow-Haze): IM / UM / ADMS per degradation on the
    held-out test photos, ADMS on mixed and unseen degradations, classifier accuracy, parameter counts; claims
    compare the *relations* in the seed's table (ADMS > UM, share of the IM-UM gap recovered, param overhead)."""
    import numpy as np
    import pandas as pd

    from .experiments import direction_claim, numeric_claim

    cfg = dataclasses.replace(ADMS_PROFILES[profile], **overrides)
    results: Dict[str, Any] = {}
    claims: List[Dict[str, Any]] = []
    for t_i, task in enumerate(cfg.tasks):
        dset = degradation_set(task)
        labels = list(dset["seen"])
        n_seeds = cfg.seeds if t_i == 0 else cfg.seeds_second_task
        per_seed, seen_frames, other_frames = [], [], []
        for s in range(seed, seed + n_seeds):
            run = adms_pipeline(dset["seen"], cfg, s, device)
            ev = evaluate_run(run, dset, cfg, s, device)
            ev["seen"]["seed"] = s
            ev["other"]["seed"] = s
            seen_frames.append(ev["seen"])
            other_frames.append(ev["other"])
            per_seed.append({"seed": s, "table": _table(ev["seen"], labels), "accuracy": ev["accuracy"],
                             "params": ev["params"], "mask_share": ev["mask_share"],
                             "other": {f"{m} | {d}": float(v) for (m, d), v in
                                       ev["other"].groupby(["method", "distortion"])["psnr"].mean().items()}})
        seen_all, other_all = pd.concat(seen_frames), pd.concat(other_frames)
        mean_table = {m: {c: round(float(np.mean([p["table"][m][c] for p in per_seed])), 3)
                          for c in per_seed[0]["table"][m]} for m in per_seed[0]["table"]}
        std_table = {m: {c: (round(float(np.std([p["table"][m][c] for p in per_seed], ddof=1)), 3)
                             if len(per_seed) > 1 else None) for c in per_seed[0]["table"][m]}
                     for m in per_seed[0]["table"]}
        results[task] = {"labels": labels, "per_seed": per_seed, "mean": mean_table, "std": std_table,
                         "seen_rows": seen_all.to_dict(orient="records"),
                         "other_summary": other_all.groupby(["method", "distortion"], sort=False)["psnr"]
                         .agg(["mean", "std"]).reset_index().to_dict(orient="records"),
                         "seed_table": SEED_TABLES[task]}
        paper = SEED_TABLES[task]
        bb = "NAF" if task == "rain-blur-noise" else "MSB"
        src = f"seed 003, {task} table ({bb} backbone)"
        gain = [p["table"]["ADMS"]["avg"] - p["table"]["UM"]["avg"] for p in per_seed]
        claims.append(direction_claim(f"[{task}] ADMS beats UM on average PSNR (dB)",
                                      paper[f"{bb} ADMS"]["avg"] - paper[f"{bb} UM"]["avg"], gain, source=src)
                      .as_dict())
        gap = [(p["table"]["ADMS"]["avg"] - p["table"]["UM"]["avg"]) /
               max(p["table"]["IM"]["avg"] - p["table"]["UM"]["avg"], 1e-6) for p in per_seed]
        p_ads, p_um, p_im = (paper[f"{bb} {m}"]["avg"] for m in ("ADMS", "UM", "IM"))
        p_gap = (p_ads - p_um) / (p_im - p_um)
        claims.append(numeric_claim(f"[{task}] share of the IM−UM gap recovered by ADMS, (ADMS−UM)/(IM−UM)",
                                    round(p_gap, 3), gap, tol=0.25, source=src,
                                    note="tolerance ±0.25; meaningless when IM≈UM (see the table)").as_dict())
        if t_i == 0:
            over = [(p["params"]["ADMS"] - p["params"]["UM"]) / p["params"]["UM"] * 100 for p in per_seed]
            claims.append(numeric_claim(f"[{task}] ADMS parameter overhead over UM (%)",
                                        round((paper["NAF ADMS"]["params_M"] / paper["NAF UM"]["params_M"] - 1) * 100,
                                              2), over, tol=3.0, source=src + "; 18.9M vs 17.1M",
                                        note="ours = masked weights + classifier; tolerance ±3 points").as_dict())
            acc = [p["accuracy"]["accuracy"] - 1.0 / len(labels) for p in per_seed]
            claims.append(direction_claim(f"[{task}] degradation classifier beats chance on test patches "
                                          "(accuracy − 1/K)", None, acc,
                                          note="the seed gives no accuracy; sign check only (accuracy in the "
                                          "tables)").as_dict())
            masked = [p["params"]["ADMS masked_weights"] / p["params"]["UM"] * 100 for p in per_seed]
            claims.append(numeric_claim(f"[{task}] masked-filter overhead alone, 3 degradations × ~3% (%)",
                                        round((paper["NAF ADMS"]["params_M"] / paper["NAF UM"]["params_M"] - 1) * 100,
                                              2), masked, tol=3.0, source=src + "; paper's figure includes the DC",
                                        note="ours excludes the classifier; tolerance ±3 points").as_dict())
            oracle = [p["table"]["ADMS (oracle c)"]["avg"] - p["table"]["ADMS"]["avg"] for p in per_seed]
            claims.append(direction_claim(f"[{task}] (ours) the predicted c costs PSNR vs the oracle one-hot "
                                          "(oracle − ADMS, dB)", None, oracle,
                                          note="sign check only; no paper number").as_dict())
    first = results[cfg.tasks[0]]
    return {"config": {**asdict(cfg), "reconstruction": "ADMS-style (our reconstruction; see causalir.adms docstring)",
                       "degradations": {t: {g: {k: v.label for k, v in dset_.items()}
                                            for g, dset_ in degradation_set(t).items()} for t in cfg.tasks}},
            "tables": {"tasks": results, "main": first["mean"]}, "claims": claims}
