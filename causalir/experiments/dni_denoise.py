"""``dni-denoise`` (notebook 07; Wang et al., CVPR'19): deep network interpolation for denoising strength. The
interpolation itself (theta(alpha) = alpha theta_A + (1 - alpha) theta_B, the sweep) lives in
:mod:`causalir.interpolate`; this module trains the family, runs the sweeps, holds the profiles and the claims.

A sigma=15 DnCNN parent (B) is fine-tuned to sigma=50 (the child, A). alpha is swept on val (alpha* per
intermediate sigma) and test; DNI at alpha* is compared with models fine-tuned at that sigma ("dedicated") and with
the better endpoint; the same sweep with an independently trained sigma=50 net shows that uncorrelated nets do not
interpolate.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..interpolate import dni_sweep, weight_distance
from ..utils import check_number
from . import claims as C
from .profiles import check_model, select
from .record import Experiment, envelope

NAME = "dni-denoise"
SOURCE = "DNI paper (Wang et al., CVPR'19), denoising-strength figure and §3 [paper-unverified]"
#: The paper shows curves, no numbers: DNI at the chosen alpha is 'comparable' to a dedicated model (0 dB apart);
#: interpolating beats both endpoints and independent nets fail to interpolate (directions only).
PAPER: Dict[str, Optional[float]] = {"dedicated - DNI@alpha* (dB)": 0.0, "DNI@alpha* - best endpoint (dB)": None,
                                     "correlated - independent, interior alpha (dB)": None}


# ------------------------------------------------------------------------------------------------ profile
@dataclass(frozen=True)
class DNIConfig:
    """DNI denoising recipe: parent at ``parent_sigma``; child fine-tuned to ``child_sigma``; references
    fine-tuned from the same parent at ``ref_sigmas`` with the child's budget; an independent child trained from
    a different initialisation for parent_steps + ft_steps. ``alphas`` must contain both endpoints 0 and 1."""

    model: str = "dncnn"
    model_cfg: Dict[str, Any] = field(default_factory=lambda: {"nf": 16, "depth": 4})
    parent_sigma: float = 15.0
    child_sigma: float = 50.0
    ref_sigmas: Tuple[float, ...] = (25.0, 35.0)
    parent_steps: int = 150
    ft_steps: int = 80
    batch_size: int = 8
    patch_size: int = 40
    lr: float = 1e-3
    ft_lr: float = 3e-4
    alphas: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_side: int = 96
    seeds: int = 1

    def __post_init__(self) -> None:

        o = "DNIConfig"
        check_model(o, self.model, self.model_cfg)
        check_number(o, "parent_sigma", self.parent_sigma, lo=0, lo_open=True, hi=255)
        check_number(o, "child_sigma", self.child_sigma, lo=self.parent_sigma, lo_open=True, hi=255)  # > parent
        if isinstance(self.ref_sigmas, (str, bytes)) or not isinstance(self.ref_sigmas, Sequence) or not self.ref_sigmas:
            raise ValueError(f"DNIConfig: expected 0 < parent_sigma < child_sigma and some ref_sigmas, got "
                             f"{self.parent_sigma!r}, {self.child_sigma!r}, {self.ref_sigmas!r}")
        for i, s in enumerate(self.ref_sigmas):
            check_number(o, f"ref_sigmas[{i}]", s, lo=0, lo_open=True, hi=255)
        if isinstance(self.alphas, (str, bytes)) or not isinstance(self.alphas, Sequence):
            raise ValueError(f"DNIConfig.alphas: expected values in [0, 1] including 0 and 1, got {self.alphas!r}")
        for i, a in enumerate(self.alphas):
            check_number(o, f"alphas[{i}]", a, lo=0, hi=1)
        if 0.0 not in self.alphas or 1.0 not in self.alphas:
            raise ValueError(f"DNIConfig.alphas: expected values in [0, 1] including 0 and 1, got {self.alphas!r}")
        check_number(o, "parent_steps", self.parent_steps, lo=0, integer=True)
        check_number(o, "ft_steps", self.ft_steps, lo=0, integer=True)
        for k in ("batch_size", "eval_side", "seeds"):
            check_number(o, k, getattr(self, k), lo=1, integer=True)
        check_number(o, "patch_size", self.patch_size, lo=8, integer=True)   # as TrainConfig.patch_size
        check_number(o, "lr", self.lr, lo=0, lo_open=True)
        check_number(o, "ft_lr", self.ft_lr, lo=0, lo_open=True)


PROFILES: Dict[str, DNIConfig] = {
    "quick": DNIConfig(ref_sigmas=(30.0,), parent_steps=60, ft_steps=30, batch_size=4, patch_size=32,
                       alphas=(0.0, 0.5, 1.0), eval_side=64),
    # The largest run this 2-core shared CPU affords (committed as data/results/dni-denoise-medium.json).
    "medium": DNIConfig(model_cfg={"nf": 16, "depth": 4}, ref_sigmas=(20.0, 30.0, 40.0), parent_steps=400,
                        ft_steps=200, batch_size=8, patch_size=40, lr=1e-3, ft_lr=3e-4,
                        alphas=tuple(i / 10 for i in range(11)), eval_side=128, seeds=2),
    # The paper's scale (DnCNN-17, 64 features); run on a GPU with `causalir reproduce dni-denoise --profile full`.
    "full": DNIConfig(model_cfg={"preset": "paper"}, ref_sigmas=(20.0, 25.0, 30.0, 35.0, 40.0, 45.0),
                      parent_steps=100_000, ft_steps=30_000, batch_size=64, patch_size=64, lr=1e-3, ft_lr=1e-4,
                      alphas=tuple(i / 20 for i in range(21)), eval_side=512, seeds=3),
}


# ---------------------------------------------------------------------------------------------- training
def _build(cfg: DNIConfig) -> nn.Module:
    from .. import models

    return models.build(cfg.model, **cfg.model_cfg)


def _train(model: nn.Module, sigma: float, steps: int, lr: float, cfg: DNIConfig, seed: int, device: str) -> nn.Module:
    from .. import data, distortions, train

    tc = train.TrainConfig(steps=steps, batch_size=cfg.batch_size, patch_size=cfg.patch_size, lr=lr, seed=seed,
                           device=device, progress=False)
    return train.fit(model, train.build_strategy("erm"), data.embedded_images("train"),
                     [distortions.GaussianNoise(sigma)], tc).model


def train_dni_models(cfg: DNIConfig, seed: int = 0, device: str = "auto") -> Dict[str, Any]:
    """The DNI family: ``parent`` (sigma=parent_sigma, from scratch), ``child`` (fine-tuned to child_sigma),
    ``refs`` (sigma -> fine-tuned from the parent at that sigma, same budget as the child) and ``independent``
    (child_sigma from a different initialisation, parent_steps + ft_steps)."""
    torch.manual_seed(seed)
    parent = _train(_build(cfg), cfg.parent_sigma, cfg.parent_steps, cfg.lr, cfg, seed, device)
    child = _train(copy.deepcopy(parent), cfg.child_sigma, cfg.ft_steps, cfg.ft_lr, cfg, seed + 1, device)
    refs = {r: _train(copy.deepcopy(parent), r, cfg.ft_steps, cfg.ft_lr, cfg, seed + 2, device) for r in cfg.ref_sigmas}
    torch.manual_seed(seed + 10_000)  # a different initialisation: not correlated with the parent
    indep = _train(_build(cfg), cfg.child_sigma, cfg.parent_steps + cfg.ft_steps, cfg.lr, cfg, seed + 3, device)
    return {"parent": parent.eval(), "child": child.eval(), "refs": {r: m.eval() for r, m in refs.items()},
            "independent": indep.eval()}


# ------------------------------------------------------------------------------------------------ tables
def _curve(df) -> Dict[float, Dict[float, float]]:
    """sigma -> alpha -> mean PSNR."""
    t = df.groupby(["sigma", "alpha"])["psnr"].mean()
    out: Dict[float, Dict[float, float]] = {}
    for (s, a), v in t.items():
        out.setdefault(float(s), {})[float(a)] = float(v)
    return out


def _mean_curve(per_seed: List[Dict[str, Any]], key: str) -> Dict[str, Dict[str, float]]:
    out: Dict[str, Dict[str, float]] = {}
    for s, row in per_seed[0][key].items():
        out[f"{s:g}"] = {f"{a:g}": round(float(np.mean([p[key][s][a] for p in per_seed])), 4) for a in row}
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 4)
    return obj


def _rows(df, seed: int, eval_: str, method: Optional[str] = None) -> List[Dict[str, Any]]:
    """Per-image rows of a sweep (alpha, sigma, image, psnr) or of an evaluate() frame (method, distortion...)."""
    out = []
    for r in df.to_dict(orient="records"):
        out.append({"seed": seed, "eval": eval_, "method": method or r["method"],
                    "alpha": float(r["alpha"]) if "alpha" in r else None,
                    "sigma": float(r["sigma"]), "image": r["image"], "psnr": float(r["psnr"])})
    return out


# -------------------------------------------------------------------------------------------- experiment
def run(profile: str = "quick", seed: int = 0, device: str = "auto", keep_models: bool = False,
        **overrides: Any) -> Dict[str, Any]:
    """DNI for denoising strength: sigma=15 parent (B) -> sigma=50 child (A). Sweep alpha on val (choose alpha*
    per intermediate sigma) and test; compare with models fine-tuned at that sigma; repeat with an independently
    trained sigma=50 net (DNI should fail there). ``overrides`` replace fields of the profile's
    :class:`DNIConfig`; ``keep_models=True`` returns the family under ``record["models"]`` (labels
    ``"parent seed S"``, ``"child seed S"``, ``"ref σ=R seed S"``, ``"independent seed S"``)."""
    from .. import data, distortions, evaluate

    t0 = time.perf_counter()
    cfg = select(PROFILES, profile, overrides)
    sigmas = sorted({cfg.parent_sigma, *cfg.ref_sigmas, cfg.child_sigma})
    val = data.embedded_images("val", max_side=cfg.eval_side)
    test = data.embedded_images("test", max_side=cfg.eval_side)
    names = data.embedded_names("test")
    sweep_levels = {f"σ={s:g}": distortions.GaussianNoise(float(s)) for s in sigmas}  # the order dni_sweep uses
    per_seed: List[Dict[str, Any]] = []
    per_image: List[Dict[str, Any]] = []
    kept: Dict[str, nn.Module] = {}
    for s in range(seed, seed + cfg.seeds):
        nets = train_dni_models(cfg, s, device)
        parent, child, refs, indep = nets["parent"], nets["child"], nets["refs"], nets["independent"]
        if keep_models:
            kept.update({f"parent seed {s}": parent, f"child seed {s}": child, f"independent seed {s}": indep,
                         **{f"ref σ={r:g} seed {s}": m for r, m in refs.items()}})
        val_curve = _curve(dni_sweep(child, parent, cfg.alphas, val, sigmas, seed=500 + s, device=device))
        test_df = dni_sweep(child, parent, cfg.alphas, test, sigmas, seed=1000 + s, device=device, image_names=names)
        test_curve = _curve(test_df)
        ind_df = dni_sweep(indep, parent, cfg.alphas, test, sigmas, seed=1000 + s, device=device, image_names=names)
        ind_curve = _curve(ind_df)
        inputs = evaluate.evaluate({}, test, sweep_levels, seed=1000 + s, device=device, image_names=names)
        inputs["sigma"] = inputs["distortion"].map({k: float(v.sigma) for k, v in sweep_levels.items()})
        per_image += _rows(test_df, s, "sweep", "DNI") + _rows(ind_df, s, "sweep", "independent") + \
            _rows(inputs, s, "sweep")
        levels = {f"σ={r:g}": distortions.GaussianNoise(r) for r in cfg.ref_sigmas}
        ref_psnr = {}
        for r, m in refs.items():
            d = evaluate.evaluate({"ref": m}, test, {f"σ={r:g}": levels[f"σ={r:g}"]}, seed=1000 + s, device=device,
                                  image_names=names)
            d["sigma"] = float(r)
            d["method"] = d["method"].replace({"ref": "dedicated"})
            per_image += _rows(d, s, "dedicated")
            ref_psnr[r] = float(d[d.method == "dedicated"]["psnr"].mean())
        chosen = {r: max(val_curve[r], key=val_curve[r].get) for r in cfg.ref_sigmas}
        per_seed.append({
            "seed": s, "test_curve": test_curve, "val_curve": val_curve, "independent_curve": ind_curve,
            "alpha_star": chosen, "dni_at_alpha_star": {r: test_curve[r][chosen[r]] for r in cfg.ref_sigmas},
            "dedicated": ref_psnr,
            "best_endpoint": {r: max(test_curve[r][min(cfg.alphas)], test_curve[r][max(cfg.alphas)])
                              for r in cfg.ref_sigmas},
            "distance_child_parent": weight_distance(child, parent),
            "distance_independent_parent": weight_distance(indep, parent),
        })
    config = {**asdict(cfg), "convention": "theta(alpha) = alpha*theta_A + (1-alpha)*theta_B; "
              f"A = σ={cfg.child_sigma:g} child, B = σ={cfg.parent_sigma:g} parent",
              "sigmas": sigmas, "test_images": names, "seeds": list(range(seed, seed + cfg.seeds))}
    tables = {"per_seed": _jsonable(per_seed), "curve_mean": _mean_curve(per_seed, "test_curve"),
              "independent_mean": _mean_curve(per_seed, "independent_curve"),
              # per-unit table: every test image's PSNR (sweeps, their noisy inputs, dedicated models and theirs)
              "per_image": per_image}
    rec = {"config": config, "tables": tables}
    return envelope(NAME, profile, config=config, tables=tables, claims=claims(rec), device=device, started=t0,
                    models=kept if keep_models else None)


# ------------------------------------------------------------------------------------------------ claims
def _by_unit(rows: Sequence[Mapping[str, Any]], **match: Any) -> Dict[Tuple[Any, Any], float]:
    """(image, seed) -> PSNR of the rows matching ``match``."""
    return {(r["image"], r["seed"]): float(r["psnr"]) for r in C.rows_where(rows, **match)}


def _diff(a: Mapping[Tuple[Any, Any], float], b: Mapping[Tuple[Any, Any], float]) -> Dict[Tuple[Any, Any], float]:
    """a - b on the units both have."""
    return {k: v - b[k] for k, v in a.items() if k in b}


def _unit_means(parts: Sequence[Dict[Tuple[Any, Any], float]]) -> List[float]:
    """Per (image, seed) shared by every part: the mean over the parts."""
    if not parts:
        return []
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return [float(np.mean([p[k] for p in parts])) for k in keys]


def claims(record: Mapping[str, Any]) -> List[C.Claim]:
    """DNI at the val-chosen alpha* against a dedicated model (level, 0 dB 'comparable', ±0.3 dB), DNI beating
    both endpoints (sign only) and the independent pair failing to interpolate (sign only). With one seed the
    units are the test images (means over the intermediate sigmas). When the record holds the per-image table,
    the models a claim compares must also beat their noisy input."""
    cfg, t = record["config"], record["tables"]
    per, rows = t["per_seed"], t.get("per_image") or []
    refs = [float(r) for r in cfg["ref_sigmas"]]
    alphas = [float(a) for a in cfg["alphas"]]
    mid = refs[len(refs) // 2]
    key = lambda v: f"{v:g}"  # noqa: E731  (the per-seed table's keys)
    seeds = [p["seed"] for p in per]
    astar = {(p["seed"], r): float(p["alpha_star"][key(r)]) for p in per for r in refs}

    def dni_at(r: float, pick_alpha) -> Dict[Tuple[Any, Any], float]:
        out = {}
        for s in seeds:
            a = pick_alpha(s, r)
            out.update({k: v for k, v in _by_unit(rows, eval="sweep", method="DNI", sigma=r, alpha=a).items()
                        if k[1] == s})
        return out

    def mean_of(m: Dict[Tuple[Any, Any], float], s: Any) -> float:
        return float(np.mean([v for k, v in m.items() if k[1] == s]))

    def best_endpoint(s: Any, r: float) -> float:
        lo, hi = (mean_of(_by_unit(rows, eval="sweep", method="DNI", sigma=r, alpha=a), s) for a in (0.0, 1.0))
        return 1.0 if hi > lo else 0.0

    def restorer(label: str, m: Dict[Tuple[Any, Any], float], eval_: str, sigma: float) -> C.Precondition:
        inp = _by_unit(rows, eval=eval_, method="input", sigma=sigma)
        return C.restorer(label, [mean_of(m, s) for s in seeds], [mean_of(inp, s) for s in seeds],
                          where=f"σ={sigma:g}")

    note_old = "" if rows else "; this record has no per-image table: restorer checks not possible"
    at_star = {r: dni_at(r, lambda s, r_: astar[(s, r_)]) for r in refs}
    req_star = [restorer("DNI@α*", at_star[r], "sweep", r) for r in refs] if rows else []

    gaps = [float(np.mean([p["dedicated"][key(r)] - p["dni_at_alpha_star"][key(r)] for r in refs])) for p in per]
    ded = {r: _by_unit(rows, eval="dedicated", method="dedicated", sigma=r) for r in refs}
    gap_u = _unit_means([_diff(ded[r], at_star[r]) for r in refs])
    req = ([restorer(f"dedicated σ={r:g}", ded[r], "dedicated", r) for r in refs] + req_star) if rows else []
    out = [C.level(f"DNI at val-chosen α matches a model fine-tuned at that σ (dedicated − DNI, dB, mean over "
                   f"σ∈{[float(r) for r in cfg['ref_sigmas']]})", 0.0, seeds=gaps, units=gap_u, tol=0.3, require=req,
                   source="DNI paper, denoising-strength figure [paper-unverified]: 'comparable'",
                   note="paper shows curves, no number: 0 dB = 'comparable'; tolerance ±0.3 dB" + note_old)]

    gain = [float(np.mean([p["dni_at_alpha_star"][key(r)] - p["best_endpoint"][key(r)] for r in refs])) for p in per]
    ends = {r: dni_at(r, best_endpoint) for r in refs} if rows else {}
    gain_u = _unit_means([_diff(at_star[r], ends[r]) for r in ends])
    out.append(C.effect("Interpolating beats both endpoints at intermediate σ (DNI@α* − best endpoint, dB)", None,
                        seeds=gain, units=gain_u, require=req_star,
                        note="sign only; α chosen on val images" + note_old))

    interior = [a for a in alphas if 0 < a < 1] or alphas
    breaks = [float(np.mean([p["test_curve"][key(mid)][key(a)] - p["independent_curve"][key(mid)][key(a)]
                             for a in interior])) for p in per]
    br_u = _unit_means([_diff(_by_unit(rows, eval="sweep", method="DNI", sigma=mid, alpha=a),
                              _by_unit(rows, eval="sweep", method="independent", sigma=mid, alpha=a))
                        for a in interior])
    child_s = float(cfg["child_sigma"])
    req = [restorer(f"σ={child_s:g} child", _by_unit(rows, eval="sweep", method="DNI", sigma=child_s, alpha=1.0),
                    "sweep", child_s),
           restorer(f"independent σ={child_s:g} net",
                    _by_unit(rows, eval="sweep", method="independent", sigma=child_s, alpha=1.0), "sweep", child_s)
           ] if rows else []
    out.append(C.effect(f"Independently trained nets fail to interpolate (correlated − independent PSNR at σ={mid:g}, "
                        "interior α, dB)", None, seeds=breaks, units=br_u, require=req,
                        source="DNI paper §3 [paper-unverified]", note="sign only" + note_old))
    return out


EXPERIMENT = Experiment(NAME, PROFILES, PAPER, SOURCE, run, claims, notebook="07_network_interpolation.ipynb")
