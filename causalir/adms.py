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
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import distortions as dz
from .distortions import Distortion
from .train import STRATEGIES, Strategy, StepContext, TrainConfig, at_least_fp32, make_optimizer, make_scheduler
from .utils import check_choice, check_number

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


def _check_flag(owner: str, field: str, value: Any) -> None:
    check_choice(owner, field, value, (True, False))


def _check_x(x: Any, owner: str, in_ch: Optional[int] = None) -> torch.Tensor:
    """A float batch (N,C,H,W), N >= 1, H, W >= 1 (and ``in_ch`` channels when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: x: expected a torch.Tensor (N,3,H,W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{owner}: x: expected shape (N,3,H,W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x: expected a floating-point tensor, got dtype {x.dtype}")
    if in_ch is not None and x.shape[1] != in_ch:
        raise ValueError(f"{owner}: x: expected {in_ch} channels at dim 1, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or min(x.shape[-2:]) == 0:
        raise ValueError(f"{owner}: x: expected a non-empty batch of non-empty images, got shape {tuple(x.shape)}")
    return x


def _check_mask_dicts(masks: Any, owner: str) -> None:
    """label -> {conv weight name -> bool (out, in) mask}."""
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(f"{owner}: masks: expected a non-empty mapping label -> {{conv weight name -> (out, in) "
                         f"mask}}, got {type(masks).__name__}")
    for d, m in masks.items():
        if not isinstance(m, Mapping):
            raise TypeError(f"{owner}: masks[{d!r}]: expected a mapping conv weight name -> (out, in) mask, got "
                            f"{type(m).__name__}")
        for n, t in m.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{owner}: masks[{d!r}][{n!r}]: expected a bool (out, in) tensor, got {type(t).__name__}")
            if t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all()):
                raise ValueError(f"{owner}: masks[{d!r}][{n!r}]: expected a bool (out, in) mask (or 0/1 values), got "
                                 f"other values of dtype {t.dtype}")


def degradation_set(name: str) -> Dict[str, Dict[str, Distortion]]:
    """{'seen': label -> distortion, 'mixed': ..., 'unseen': ...} for ``rain-blur-noise`` or ``rain-snow-haze``."""
    if not isinstance(name, str) or name not in DEGRADATION_SETS:
        raise KeyError(f"unknown degradation set {name!r}; valid names: {', '.join(DEGRADATION_SETS)}")
    return DEGRADATION_SETS[name]()


# ------------------------------------------------------------------------------------------ classifier
class DegradationClassifier(nn.Module):
    """The DC module (our guess at 'a small CNN'): the image and its high-pass residual x - box3(x) (noise, rain
    and blur differ most there), three conv-LeakyReLU (the last two stride 2), mean / std / max pooling of the
    features, a linear layer -> logits over the K degradations."""

    def __init__(self, num_classes: int, nf: int = 16, in_ch: int = 3) -> None:
        super().__init__()
        check_number("DegradationClassifier", "num_classes", num_classes, lo=2, integer=True)
        check_number("DegradationClassifier", "nf", nf, lo=1, integer=True)
        check_number("DegradationClassifier", "in_ch", in_ch, lo=1, integer=True)
        self.in_ch = in_ch
        self.features = nn.Sequential(
            nn.Conv2d(2 * in_ch, nf, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, 2 * nf, 3, 2, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(2 * nf, 2 * nf, 3, 2, 1), nn.LeakyReLU(0.1))
        self.head = nn.Linear(6 * nf, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, "DegradationClassifier", self.in_ch)
        h, w = x.shape[-2:]
        if ((h + 3) // 4) * ((w + 3) // 4) < 2:  # two stride-2 convs: ceil(h/4) x ceil(w/4) features
            raise ValueError(f"DegradationClassifier: x: an image of {h}x{w} leaves a 1x1 feature map after the two "
                             "stride-2 convs, whose std is undefined; expected at least 5 px on one side")
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
    for fld, m in (("unified", unified), ("individual", individual)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"masked_deltas: {fld}: expected an nn.Module, got {type(m).__name__}")
    _check_mask_dicts({"mask": mask}, "masked_deltas")
    pu, pi = dict(unified.named_parameters()), dict(individual.named_parameters())
    out = {}
    for n, m in mask.items():
        if n not in pu:
            raise KeyError(f"mask key {n!r} is not a parameter of the model; valid names: "
                           f"{', '.join(_conv_weight_names(unified))}")
        if n not in pi or pi[n].shape != pu[n].shape:
            raise ValueError(f"masked_deltas: individual model's {n!r} is missing or has another shape than the "
                             "unified model's (same architecture expected)")
        if pu[n].dim() < 2 or tuple(m.shape) != tuple(pu[n].shape[:2]):
            raise ValueError(f"mask[{n!r}]: expected shape {tuple(pu[n].shape[:2])} (out, in), got {tuple(m.shape)}")
        out[n] = ((pi[n] - pu[n]).detach() * m.to(pu[n].device, pu[n].dtype)[..., None, None])
    return out


def mask_share(mask: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, float]:
    """Masked kernels / all conv kernels, and masked weights / all parameters of ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mask_share: model: expected an nn.Module, got {type(model).__name__}")
    _check_mask_dicts({"mask": mask}, "mask_share")
    params = dict(model.named_parameters())
    convs = set(_conv_weight_names(model))
    for n, m in mask.items():
        if n not in convs:
            raise KeyError(f"mask_share: mask key {n!r} is not a conv weight of the model; valid names: "
                           f"{', '.join(_conv_weight_names(model))}")
        if tuple(m.shape) != tuple(params[n].shape[:2]):
            raise ValueError(f"mask_share: mask[{n!r}]: expected shape {tuple(params[n].shape[:2])} (out, in), got "
                             f"{tuple(m.shape)}")
    if not convs:
        raise ValueError("mask_share: the model has no conv weights")
    kern = sum(int(m.sum()) for m in mask.values())
    total_k = sum(params[n].shape[0] * params[n].shape[1] for n in _conv_weight_names(model))
    w = sum(int(m.sum()) * params[n][0, 0].numel() for n, m in mask.items())
    return {"kernels": kern, "kernel_share": kern / total_k, "weights": w,
            "param_share": w / sum(p.numel() for p in params.values())}


def mix_coefficients(weights: Sequence[float]) -> torch.Tensor:
    """Non-negative weights -> c with sum_d c_d = 1 (for the notebook's sliders)."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) == 0:
        raise ValueError(f"mix_coefficients: expected a non-empty sequence of non-negative weights, got {weights!r}")
    for i, v in enumerate(weights):
        check_number("mix_coefficients", f"weights[{i}]", v, lo=0)
    w = torch.tensor([float(v) for v in weights])
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError(f"mix_coefficients: expected non-negative weights with a positive sum, got {list(weights)}")
    return w / w.sum()


@dataclass(frozen=True)
class ADMSShape:
    """What it takes to rebuild an :class:`ADMS` before its weights are loaded (a shipped model's card): the UM's
    registry name and config, the degradation labels, the conv weights that carry a mask, the classifier width,
    ``mode`` and ``mixing``. The masks themselves, theta_d and the classifier are weights (buffers/parameters)."""

    backbone: str
    backbone_cfg: Dict[str, Any]
    labels: Tuple[str, ...]
    names: Tuple[str, ...]
    clf_nf: int = 16
    mode: str = "offset"
    mixing: str = "soft"

    def __post_init__(self) -> None:
        o = "ADMSShape"
        if not isinstance(self.backbone, str) or not isinstance(self.backbone_cfg, Mapping):
            raise TypeError(f"{o}: expected a registry model name and its config dict, got {self.backbone!r}, "
                            f"{self.backbone_cfg!r}")
        if len(self.labels) < 2 or not all(isinstance(v, str) for v in self.labels):
            raise ValueError(f"{o}.labels: expected at least 2 degradation names, got {self.labels!r}")
        if not self.names or not all(isinstance(v, str) for v in self.names):
            raise ValueError(f"{o}.names: expected the masked conv weight names, got {self.names!r}")
        check_number(o, "clf_nf", self.clf_nf, lo=1, integer=True)
        check_choice(o, "mode", self.mode, ("offset", "replace"))
        check_choice(o, "mixing", self.mixing, ("soft", "hard"))


class ADMS(nn.Module):
    """theta_ads(c) = theta_um + sum_d c_d theta_d ⊙ M_d per input (``mode='offset'``; or ``'replace'``), with
    c = softmax(DC(x)) (``mixing='soft'``) or its argmax one-hot (``'hard'``). theta_um is frozen."""

    @classmethod
    def from_config(cls, shape: ADMSShape) -> "ADMS":
        """An ADMS of ``shape`` with placeholder weights and empty masks, ready for ``load_state_dict`` (the masks,
        the UM copy, theta_d and the classifier are all in its state dict)."""
        from . import models

        if not isinstance(shape, ADMSShape):
            raise TypeError(f"ADMS.from_config: expected an ADMSShape, got {type(shape).__name__}")
        cfg = {k: v for k, v in shape.backbone_cfg.items() if k != "name"}
        unified = models.build(shape.backbone, **cfg)
        w = dict(unified.named_parameters())
        unknown = [n for n in shape.names if n not in w]
        if unknown:
            raise KeyError(f"ADMSShape.names: {unknown[:5]} are not weights of {shape.backbone} {cfg}")
        masks = {d: {n: torch.zeros(w[n].shape[:2], dtype=torch.bool) for n in shape.names} for d in shape.labels}
        return cls(unified, masks, DegradationClassifier(len(shape.labels), shape.clf_nf), mode=shape.mode,
                   mixing=shape.mixing)

    @property
    def cfg(self) -> ADMSShape:
        """This model's :class:`ADMSShape` (needs a registry UM, i.e. one with ``.config``)."""
        ucfg = dict(getattr(self.unified, "config", {}) or {})
        if "name" not in ucfg:
            raise TypeError("ADMS.cfg: the unified model is not a registry model (no .config); it cannot be shipped")
        if not isinstance(self.classifier, DegradationClassifier):
            raise TypeError(f"ADMS.cfg: a {type(self.classifier).__name__} classifier cannot be described; expected "
                            "a DegradationClassifier")
        name = ucfg.pop("name")
        return ADMSShape(name, ucfg, tuple(self.labels), tuple(self.names), self.classifier.features[0].out_channels,
                         self.mode, self.mixing)

    def __init__(self, unified: nn.Module, masks: Mapping[str, Masks], classifier: Optional[nn.Module] = None, *,
                 init: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None, mode: str = "offset",
                 mixing: str = "soft") -> None:
        super().__init__()
        check_choice("ADMS", "mode", mode, ("offset", "replace"))
        check_choice("ADMS", "mixing", mixing, ("soft", "hard"))
        if not isinstance(unified, nn.Module):
            raise TypeError(f"ADMS.unified: expected an nn.Module, got {type(unified).__name__}")
        if classifier is not None and not isinstance(classifier, nn.Module):
            raise TypeError(f"ADMS.classifier: expected an nn.Module or None, got {type(classifier).__name__}")
        if isinstance(masks, Mapping) and not masks:
            raise ValueError("ADMS: expected at least one degradation mask")
        _check_mask_dicts(masks, "ADMS")
        self.labels = list(masks)
        convs = _conv_weight_names(unified)
        for d in self.labels:
            unknown = [n for n in masks[d] if n not in convs]
            if unknown:
                raise KeyError(f"ADMS: masks[{d!r}] has keys {unknown[:5]} that are not conv weights of the unified "
                               f"model; valid names: {', '.join(convs)}")
        if isinstance(classifier, DegradationClassifier) and classifier.head.out_features != len(self.labels):
            raise ValueError(f"ADMS.classifier: predicts {classifier.head.out_features} classes for "
                             f"{len(self.labels)} degradations {self.labels}")
        if init is not None:
            if not isinstance(init, Mapping) or set(init) != set(self.labels):
                raise ValueError(f"ADMS.init: expected a mapping with one entry per degradation {self.labels}, got "
                                 f"{list(init) if isinstance(init, Mapping) else type(init).__name__}")
            pu = dict(unified.named_parameters())
            for d in self.labels:
                for n, t in init[d].items():
                    if n in pu and (not isinstance(t, torch.Tensor) or t.shape != pu[n].shape):
                        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                        raise ValueError(f"ADMS.init[{d!r}][{n!r}]: expected shape {tuple(pu[n].shape)}, got {got}")
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
        logits = self.classifier(x)
        if not isinstance(logits, torch.Tensor) or logits.shape != (x.shape[0], len(self.labels)):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"ADMS.classifier: expected logits of shape ({x.shape[0]}, {len(self.labels)}) (one per "
                             f"degradation {self.labels}), got {got}")
        p = logits.softmax(dim=1)
        if self.mixing == "hard":
            return F.one_hot(p.argmax(1), len(self.labels)).to(p.dtype)
        return p

    def check_c(self, c: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(c, torch.Tensor) or not c.is_floating_point():
            got = c.dtype if isinstance(c, torch.Tensor) else type(c).__name__
            raise TypeError(f"c: expected a float tensor (K,) or (N, K) of mixing weights, got {got}")
        if c.dim() == 1:
            c = c[None].expand(n, -1)
        if c.shape != (n, len(self.labels)):
            raise ValueError(f"c: expected shape ({n}, {len(self.labels)}) (one weight per degradation "
                             f"{self.labels}), got {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("c: expected finite mixing weights, got NaN or infinity")
        return c

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Restore each sample with its own theta_ads(c_i) (vmap over functional_call)."""
        if isinstance(x, torch.Tensor) and x.dim() != 4:
            raise ValueError(f"x: expected shape (N,3,H,W), got {tuple(x.shape)}")
        _check_x(x, "ADMS", getattr(self.unified, "in_ch", None))
        if c is not None and not isinstance(c, torch.Tensor):
            raise TypeError(f"c: expected a float tensor (K,) or (N, K) of mixing weights, got {type(c).__name__}")
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

    def __post_init__(self) -> None:
        check_number("adms", "ce_weight", self.ce_weight, lo=0)
        check_number("adms", "warmup_steps", self.warmup_steps, lo=0, integer=True)
        _check_flag("adms", "teacher_forcing", self.teacher_forcing)
        check_number("adms", "classifier_lr_mult", self.classifier_lr_mult, lo=0, lo_open=True)

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
        x = ctx.prepare(x.clamp(0, 1))
        with ctx.autocast():
            logits = model.classifier(x)
        logits = at_least_fp32(logits)  # the losses in fp32 (bf16 autocast outputs promoted)
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
            with ctx.autocast():
                out = model(x, c)
            rec = ctx.loss_fn(at_least_fp32(out), clean)
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
    check_number("build_adms", "clf_nf", clf_nf, lo=1, integer=True)
    check_choice("build_adms", "mode", mode, ("offset", "replace"))
    check_choice("build_adms", "mixing", mixing, ("soft", "hard"))
    _check_mask_dicts(masks, "build_adms")
    if not isinstance(individuals, Mapping):
        raise TypeError(f"build_adms: individuals: expected a mapping label -> model, got {type(individuals).__name__}")
    missing = [d for d in masks if d not in individuals]
    if missing:
        raise KeyError(f"build_adms: no individual model for degradation(s) {missing}; individuals has "
                       f"{list(individuals)}")
    for d in masks:
        if not isinstance(individuals[d], nn.Module):
            raise TypeError(f"build_adms: individuals[{d!r}]: expected an nn.Module, got {type(individuals[d]).__name__}")
    if len(masks) < 2:
        raise ValueError(f"build_adms: expected at least 2 degradations (the classifier needs 2 classes), got "
                         f"{list(masks)}")
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

    if not isinstance(adms, ADMS):
        raise TypeError(f"classifier_accuracy: adms: expected an ADMS model, got {type(adms).__name__}")
    check_number("classifier_accuracy", "n", n, lo=1, integer=True)
    check_number("classifier_accuracy", "patch", patch, lo=1, integer=True)
    check_number("classifier_accuracy", "seed", seed, integer=True)
    if not isinstance(seen, Mapping):
        raise TypeError(f"classifier_accuracy: seen: expected a mapping label -> Distortion, got {type(seen).__name__}")
    missing = [lab for lab in adms.labels if lab not in seen]
    if missing:
        raise KeyError(f"classifier_accuracy: seen has no distortion for label(s) {missing} of the model "
                       f"({adms.labels}); got {list(seen)}")
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
