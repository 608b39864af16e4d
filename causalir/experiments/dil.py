"""The DIL experiments (notebooks 02 and 03): ``dil-denoise``, ``dil-deblur``, ``dil-types``, ``dil-backbones``.

Every method gets the same number of *distorted batches* (ERM: 1 per step; the paper's variants 2K per step; the
released sf K per step, :func:`causalir.dil.batches_per_step`), is validated along the way on the **validation
photos**, and the checkpoint used for the test table is chosen on validation only: the mean validation PSNR at
the selection distortions (for noise: σ=25 and σ=35, levels that are neither seen nor test levels). Test photos
and test levels are never used to choose anything. Curves (validation PSNR at the curve distortion, e.g. σ=50,
against distorted batches and wall time) are recorded per strategy and seed. Paper numbers come from seed 000
(the CVPR'23 poster tables).

Each experiment is an :class:`~causalir.experiments.record.Experiment` (``DENOISE``, ``DEBLUR``, ``TYPES``,
``BACKBONES``) with its own profile table (``PROFILES_DENOISE``...), paper table (``PAPER_DENOISE``...), ``run``
and ``claims``. The claims are made from a record's config and ``per_image`` table alone: "X beats ERM" is the
per-seed (>= 2 seeds) or paired per-image (1 seed) PSNR difference, and needs both models to beat their distorted
input at that distortion.
"""
from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import data, dil, distortions, evaluate, models, train
from ..utils import atomic_write_json, check_choice, check_number
from . import claims as C
from .plots import show_images
from .profiles import check_model, select
from .record import Experiment, envelope

DENOISE_NAME, DEBLUR_NAME, TYPES_NAME, BACKBONES_NAME = "dil-denoise", "dil-deblur", "dil-types", "dil-backbones"
SOURCE = "seed 000 (CVPR'23 poster tables)"
#: CBSD68, RRDB, unseen σ (seed 000, denoising table): PSNR (dB) per method
PAPER_DENOISE: Dict[str, Dict[int, float]] = {
    "erm": {30: 24.90, 40: 21.12, 50: 18.96},
    "dil_sf": {30: 30.29, 40: 28.35, 50: 26.64},
    "dil_pf": {30: 29.92, 40: 28.10, 50: 26.61},
    "dil_ss": {30: 27.48, 40: 25.90, 50: 24.63},
    "dil_ps": {30: 29.14, 40: 25.74, 50: 23.34},
}
#: Set5 deblurring at unseen blur σ (seed 000): PSNR (dB); 'DIL' is the paper's (unnamed) variant
PAPER_DEBLUR: Dict[str, Dict[float, float]] = {"erm": {4.2: 29.31, 4.4: 26.55, 4.6: 24.43, 4.8: 22.96, 5.0: 22.00},
                                               "dil": {4.2: 29.58, 4.4: 27.52, 4.6: 25.66, 4.8: 24.38, 5.0: 23.46}}
#: hybrid distortions, RealSR V3 (unseen), PSNR (dB) (seed 000); the other unseen types have no matching column
PAPER_TYPES: Dict[str, float] = {"erm": 27.65, "dil_sf": 27.94}
#: CBSD68 σ=30 (unseen) across backbones, PSNR (dB) (seed 000)
PAPER_BACKBONES: Dict[str, Dict[str, float]] = {"rrdb": {"erm": 24.90, "dil": 30.28},
                                                "swinir": {"erm": 24.22, "dil": 29.08}}

LABEL = {"erm": "ERM", "dil_pf": "DIL-pf", "dil_ps": "DIL-ps", "dil_sf": "DIL-sf", "dil_ss": "DIL-ss",
         "dil_sf_reference": "DIL-sf (released code)",
         "erm_oracle": "ERM oracle", "erm_stratified": "ERM stratified",
         "dil_sf_reference_lr": "DIL-sf (released code, ERM's lr)"}
#: the baselines of the protocol (issue 13): the oracle (ERM trained on the test conditions: the headroom), the
#: stratified ERM (K*B images per step, one slice per seen distortion: DIL-pf at alpha = 0) and the released
#: algorithm at ERM's learning rate (beside its released 1e-4 / 1e-4)
BASELINES = ("erm_oracle", "erm_stratified", "dil_sf_reference_lr")
#: budget arms: equal distorted batches (ours) and equal iterations (the paper's protocol)
BUDGETS = ("batches", "iterations")
ARM_SUFFIX = {"batches": "", "iterations": " [equal iterations]"}
#: the released code's learning rates (reference Sec. 3.1): inner Adam 1e-4, meta Adam 1e-4
RELEASED_LR = 1e-4
TEST_SET = "embedded-test"


def strategy_of(method: str) -> str:
    """The training strategy a method runs (the oracle is ERM on other distortions; the released sf at ERM's lr
    is the released strategy)."""
    return {"erm_oracle": "erm", "dil_sf_reference_lr": "dil_sf_reference"}.get(method, method)


# --------------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class DILProfile:
    """One profile of a DIL experiment. ``budget`` = distorted batches per method (equal for all)."""

    model: str = "rrdb"
    model_cfg: Dict[str, Any] = field(default_factory=lambda: {"nf": 16, "nb": 1, "gc": 8})
    batch_size: int = 4
    patch_size: int = 32
    lr: float = 1e-3
    budget: int = 64
    checkpoints: int = 2
    strategies: Tuple[str, ...] = ("erm", "dil_pf", "dil_ps", "dil_sf", "dil_ss", "dil_sf_reference")
    alpha: float = 0.05
    n_distortions: Optional[int] = 2
    meta_lr: Optional[float] = None           # paper variants; None = lr (same as ERM)
    ref_inner_lr: Optional[float] = None      # released sf; None = lr (the code: 1e-4 = the full recipe's lr)
    ref_meta_lr: Optional[float] = None
    ref_n_distortions: Optional[int] = None   # released sf: all seen (4 for noise), as coded
    seeds: int = 1
    eval_side: int = 96
    val_side: int = 64
    sweep: Dict[str, Any] = field(default_factory=dict)
    #: budget arms run: "batches" (equal distorted batches, ours) and/or "iterations" (the paper's protocol)
    budgets: Tuple[str, ...] = ("batches",)
    #: > 0: validate on this many val_side tiles of the validation photos (a grid), instead of 2 centre crops
    val_tiles: int = 0
    #: an alpha candidate is accepted only if its theta beats the noisy input on validation at the seen levels
    #: by more than this (dB)
    gate_db: float = 0.0
    #: torch threads during the run (0 = leave as is); fixed so that a rerun is bit-identical
    threads: int = 0
    #: a folder for a resumable study ("" = none): each method's training checkpoints, its selected weights and,
    #: once evaluated, its results; an interrupted run started again with the same profile continues where it
    #: stopped and skips the finished methods (not part of the science: excluded from the record's profile)
    run_root: str = ""

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_model(o, self.model, self.model_cfg)
        if isinstance(self.budgets, str) or not self.budgets or any(b not in BUDGETS for b in self.budgets):
            raise ValueError(f"{o}.budgets: expected a non-empty subset of {', '.join(BUDGETS)}, got {self.budgets!r}")
        object.__setattr__(self, "budgets", tuple(self.budgets))
        for k in ("val_tiles", "threads"):
            check_number(o, k, getattr(self, k), lo=0, integer=True)
        if not isinstance(self.run_root, str):
            raise TypeError(f"{o}.run_root: expected a folder path (str) or '', got {self.run_root!r}")
        check_number(o, "gate_db", self.gate_db)
        if not isinstance(self.sweep, Mapping):
            raise TypeError(f"{o}.sweep: expected a dict, got {self.sweep!r}")
        if "arm" in self.sweep:
            check_choice(o, "sweep['arm']", self.sweep["arm"], BUDGETS)
        if isinstance(self.strategies, str):
            raise ValueError(f"{o}.strategies: expected a non-empty subset of {', '.join(LABEL)}, got the string "
                             f"{self.strategies!r} (write ({self.strategies!r},))")
        object.__setattr__(self, "strategies", tuple(self.strategies))
        for k in ("batch_size", "budget", "checkpoints", "seeds", "eval_side", "val_side"):
            check_number(o, k, getattr(self, k), lo=1, integer=True)
        check_number(o, "patch_size", self.patch_size, lo=8, integer=True)   # as TrainConfig.patch_size
        bad = [s for s in self.strategies if s not in LABEL]
        if not self.strategies or bad:
            raise ValueError(f"DILProfile.strategies: expected a non-empty subset of {', '.join(LABEL)}, got "
                             f"{list(self.strategies)}")
        check_number(o, "lr", self.lr, lo=0, lo_open=True)
        for k in ("meta_lr", "ref_inner_lr", "ref_meta_lr"):      # None = lr
            check_number(o, k, getattr(self, k), lo=0, lo_open=True, allow_none=True)
        check_number(o, "alpha", self.alpha, lo=0)
        for k in ("n_distortions", "ref_n_distortions"):          # None = all seen
            check_number(o, k, getattr(self, k), lo=1, integer=True, allow_none=True)

    def strategy_kwargs(self, name: str) -> Dict[str, Any]:
        """The strategy options of method ``name`` (a strategy or a baseline of :data:`BASELINES`)."""
        if name in ("erm", "erm_oracle"):
            return {}
        if name == "erm_stratified":
            return {"n_distortions": self.n_distortions}
        if name == "dil_sf_reference":
            return {"inner_lr": self.ref_inner_lr or self.lr, "meta_lr": self.ref_meta_lr or self.lr,
                    "n_distortions": self.ref_n_distortions}
        if name == "dil_sf_reference_lr":
            return {"inner_lr": self.lr, "meta_lr": self.lr, "n_distortions": self.ref_n_distortions}
        return {"alpha": self.alpha, "meta_lr": self.meta_lr, "n_distortions": self.n_distortions}

    def steps(self, name: str, n_seen: int, arm: str = "batches") -> int:
        """Optimiser steps of method ``name``: budget / distorted batches per step (arm "batches"), or the budget
        itself for every method (arm "iterations": ERM's step count)."""
        check_choice(type(self).__name__, "arm", arm, BUDGETS)
        if arm == "iterations":
            return self.budget
        strat = strategy_of(name)
        k = self.ref_n_distortions if strat == "dil_sf_reference" else self.n_distortions
        return max(1, self.budget // dil.batches_per_step(strat, n_seen, k))


@dataclass(frozen=True)
class BackbonesProfile(DILProfile):
    """A :class:`DILProfile` plus the backbones compared: model name -> its config."""

    backbones: Dict[str, Dict[str, Any]] = field(
        default_factory=lambda: {"rrdb": {"nf": 16, "nb": 1, "gc": 8}, "swinir": {"preset": "tiny"}})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.backbones, Mapping) or not self.backbones:
            raise ValueError(f"BackbonesProfile.backbones: expected at least one backbone (a {{model: config}} dict), "
                             f"got {self.backbones!r}")
        for name, cfg in self.backbones.items():
            check_choice("BackbonesProfile", "backbones", name, models.names())
            if not isinstance(cfg, Mapping):
                raise TypeError(f"BackbonesProfile.backbones[{name!r}]: expected a dict of model options, got {cfg!r}")

    def base(self) -> Dict[str, Any]:
        """The profile's fields without ``backbones`` (what the record's ``config["profile"]`` holds)."""
        return {k: v for k, v in asdict(self).items() if k != "backbones"}


def _with_backbones(p: DILProfile, backbones: Dict[str, Dict[str, Any]]) -> BackbonesProfile:
    return BackbonesProfile(**{f.name: getattr(p, f.name) for f in fields(p)}, backbones=backbones)


_QUICK = DILProfile()
# The largest honest CPU run this session could afford (2 shared cores): still tiny, see the notes in the results.
_MEDIUM = DILProfile(model_cfg={"nf": 16, "nb": 1, "gc": 8}, batch_size=4, patch_size=32, lr=1e-3, budget=128,
                     checkpoints=4, alpha=0.05, n_distortions=2, seeds=3, eval_side=128, val_side=64,
                     sweep={"budget": 64, "alpha": [0.01, 0.1], "ref_meta_lr": [1e-3, 3e-3]})
# The paper-scale configuration (not run in this session: no GPU). RRDB 64/23/32, 64x64 patches, batch 32, the
# released code's lrs (1e-4), 3 seeds; 1.2M distorted batches = 300k released-sf iterations (K=4), ~the code's
# 30 epochs at batch 32 on 4 GPUs (reference Sec. 3.1).
_FULL = DILProfile(model_cfg={"preset": "paper"}, batch_size=32, patch_size=64, lr=1e-4, budget=1_200_000,
                   checkpoints=40, alpha=0.01, n_distortions=None, seeds=3, eval_side=512, val_side=256,
                   ref_inner_lr=1e-4, ref_meta_lr=1e-4,
                   sweep={"budget": 200_000, "alpha": [0.001, 0.01, 0.1], "ref_meta_lr": [1e-4, 3e-4]})
_THREE = ("erm", "dil_sf", "dil_sf_reference")

#: dil-denoise: all five DIL strategies. Medium is issue 13's CPU protocol study (data/studies/dil-denoise-medium/,
#: resumable, every finished unit committed): the residual DnCNN 32/8 (the tiny no-skip RRDB of the first study had
#: no oracle headroom), 1600 distorted batches of 8 x 32^2 per method in the equal-batches arm and 1600 steps in the
#: equal-iterations arm, the three baselines, the released sf at its released 1e-4 / 1e-4, alpha swept on
#: validation at a quarter of the equal-iterations budget with the restorer gate (0.01 is kept if no candidate
#: passes), 16 validation tiles, one thread (bit-identical reruns), 3 seeds.
_DENOISE_STUDY = replace(_MEDIUM, model="dncnn", model_cfg={"nf": 32, "depth": 8}, budget=1600, batch_size=8,
                         alpha=0.01, ref_inner_lr=RELEASED_LR, ref_meta_lr=RELEASED_LR,
                         strategies=("erm", "erm_oracle", "erm_stratified", "dil_pf", "dil_ps", "dil_sf", "dil_ss",
                                     "dil_sf_reference", "dil_sf_reference_lr"),
                         budgets=("batches", "iterations"), val_tiles=16, threads=1,
                         sweep={"fraction": 0.25, "arm": "iterations",
                                "alpha": [0.0001, 0.0003, 0.001, 0.003, 0.01]})
PROFILES_DENOISE: Dict[str, DILProfile] = {
    "quick": _QUICK,
    "medium": _DENOISE_STUDY,
    "full": _FULL,
}
#: the deblur and types studies (data/studies/dil-deblur-medium/, dil-types-medium/): the denoise study's
#: protocol (DnCNN 32/8, both budget arms, the three baselines, the released sf at both rates, alpha swept on
#: validation with the restorer gate, 3 seeds) with the first-order paper variants only: the paper reports one
#: unnamed "DIL" for deblurring and DIL-sf for types, and the second-order ps / ss cost 2-3x a first-order run
_STUDY_METHODS = ("erm", "erm_oracle", "erm_stratified", "dil_pf", "dil_sf", "dil_sf_reference",
                  "dil_sf_reference_lr")
#: dil-deblur: seen blur σ 1-3.8, unseen 4.2-5.0
PROFILES_DEBLUR: Dict[str, DILProfile] = {
    "quick": replace(_QUICK, strategies=_THREE),
    "medium": replace(_DENOISE_STUDY, strategies=_STUDY_METHODS),
    "full": _FULL,
}
#: dil-types: every seen type (noise, blur, JPEG) in each DIL step (n_distortions=None)
PROFILES_TYPES: Dict[str, DILProfile] = {
    "quick": replace(_QUICK, strategies=_THREE, n_distortions=None),
    "medium": replace(_DENOISE_STUDY, strategies=_STUDY_METHODS, n_distortions=None),
    "full": _FULL,
}
#: dil-backbones: RRDB vs the window-attention transformer (its size per profile)
PROFILES_BACKBONES: Dict[str, BackbonesProfile] = {
    "quick": _with_backbones(replace(_QUICK, strategies=_THREE),
                             {"rrdb": {"nf": 16, "nb": 1, "gc": 8}, "swinir": {"preset": "tiny"}}),
    "medium": _with_backbones(replace(_MEDIUM, strategies=_THREE, seeds=1, sweep={}, budget=96),
                              {"rrdb": {"nf": 16, "nb": 1, "gc": 8},
                               "swinir": {"dim": 16, "depths": (2,), "heads": 2, "window": 8}}),
    "full": _with_backbones(_FULL, {"rrdb": {"preset": "paper"}, "swinir": {"preset": "paper"}}),
}


# ------------------------------------------------------------------------------------------- one training
@dataclass
class Trained:
    model: torch.nn.Module
    final_state: Dict[str, torch.Tensor]
    selected_step: int
    curve: List[Dict[str, Any]]
    counters: Dict[str, int]
    wall_time: float
    strategy: Dict[str, Any]


def train_one(strategy: str, prof: DILProfile, seen: Sequence[distortions.Distortion], seed: int, device: str,
              val_sel: Dict[str, distortions.Distortion], val_curve: Dict[str, distortions.Distortion],
              strategy_kwargs: Optional[Dict[str, Any]] = None, budget: Optional[int] = None,
              model_name: Optional[str] = None, model_cfg: Optional[Dict[str, Any]] = None, arm: str = "batches",
              train_on: Optional[Sequence[distortions.Distortion]] = None,
              val_gate: Optional[Dict[str, distortions.Distortion]] = None,
              run_dir: Optional[Path] = None) -> Trained:
    """Train one method (a strategy or a baseline of :data:`BASELINES`) at the profile's budget (``arm``:
    equal distorted batches or equal iterations), validate at ``checkpoints`` evenly spaced points and keep the
    checkpoint with the best mean validation PSNR over ``val_sel`` (validation photos only). ``train_on``: the
    distortions it trains on (default ``seen``; the oracle's are the test conditions); ``val_gate``: further
    validation distortions recorded at every checkpoint (the seen levels, for the restorer gate). ``run_dir``:
    checkpoints (``fit``'s, every validation) and the best weights so far, so that a killed run resumes."""
    prof = replace(prof, budget=budget or prof.budget)
    steps = prof.steps(strategy, len(seen), arm)
    every = max(1, steps // prof.checkpoints)
    torch.manual_seed(seed)
    model = models.build(model_name or prof.model, **(model_cfg if model_cfg is not None else prof.model_cfg))
    cfg = train.TrainConfig(steps=steps, batch_size=prof.batch_size, patch_size=prof.patch_size, lr=prof.lr,
                            seed=seed, device=device, val_every=every, progress=False,
                            ckpt_every=every if run_dir is not None else 0)
    kwargs = strategy_kwargs if strategy_kwargs is not None else prof.strategy_kwargs(strategy)
    strat = train.build_strategy(strategy_of(strategy), **kwargs)
    val = validation_images(prof)
    best = {"score": -np.inf, "state": None, "step": 0}
    best_file = None if run_dir is None else Path(run_dir) / "best.safetensors"
    if best_file is not None and best_file.is_file():  # a resumed run: the best checkpoint before the stop
        meta = json.loads(best_file.with_suffix(".json").read_text())
        best.update(score=meta["score"], step=meta["step"], state=load_file(str(best_file)))

    def keep_best(step: int, entry: Dict[str, Any]) -> None:
        v = entry.get("val_psnr")
        if not v:
            return
        score = float(np.mean([v[k] for k in val_sel]))
        entry["val_select"] = score
        if score >= best["score"]:  # ties go to the later checkpoint (trained longer)
            best.update(score=score, step=step, state=copy.deepcopy(model.state_dict()))
            if best_file is not None:  # weights first, then the json that vouches for them
                save_file({k: v.detach().cpu().contiguous() for k, v in best["state"].items()}, str(best_file))
                atomic_write_json(best_file.with_suffix(".json"), {"score": score, "step": step})

    res = train.fit(model, strat, data.embedded_images("train"), list(train_on or seen), cfg, val_images=val,
                    val_distortions={**val_sel, **val_curve, **(val_gate or {})},
                    run_dir=None if run_dir is None else Path(run_dir) / "fit", callback=keep_best)
    final = copy.deepcopy(res.model.state_dict())
    if best["state"] is not None:
        res.model.load_state_dict(best["state"])
    curve = [{"step": h["step"], "distorted_batches": h["distorted_batches"], "wall_time": h["wall_time"],
              "images_forwarded": h["images_forwarded"], "loss": h.get("loss"),
              "val_select": h.get("val_select"), **{f"val {k}": h["val_psnr"][k] for k in h.get("val_psnr", {})}}
             for h in res.history if "val_psnr" in h]
    return Trained(res.model, final, best["step"], curve, res.counters.as_dict(), res.wall_time, strat.describe())


def validation_images(prof: DILProfile) -> List[torch.Tensor]:
    """The validation photos as checkpoint selection sees them: ``val_tiles`` tiles of ``val_side`` px on a grid
    over the photos (> 0), else one centre crop per photo."""
    if not prof.val_tiles:
        return data.embedded_images("val", max_side=prof.val_side)
    side, tiles = prof.val_side, []
    for im in data.embedded_images("val"):
        h, w = im.shape[-2:]
        for i in range(h // side):
            for j in range(w // side):
                tiles.append(im[:, i * side:(i + 1) * side, j * side:(j + 1) * side])
    if len(tiles) < prof.val_tiles:
        raise ValueError(f"DILProfile.val_tiles: the validation photos hold {len(tiles)} tiles of {side} px, "
                         f"got val_tiles={prof.val_tiles}")
    step = len(tiles) / prof.val_tiles
    return [tiles[int(i * step)] for i in range(prof.val_tiles)]


def virtual_outputs(model: torch.nn.Module, x_in: torch.Tensor, y_in: torch.Tensor, x: torch.Tensor,
                    alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The outputs on ``x`` of theta (``model``) and of its virtual model phi = theta - alpha grad L1(f_theta(x_in),
    y_in), the paper's inner step (no gradient kept)."""
    from torch.func import functional_call, grad

    theta = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    gi = grad(lambda p: torch.nn.functional.l1_loss(functional_call(model, (p, buffers), (x_in,)), y_in))(theta)
    phi = {k: theta[k] - alpha * gi[k] for k in theta}
    with torch.no_grad():
        return functional_call(model, (theta, buffers), (x,)), functional_call(model, (phi, buffers), (x,))


def theta_phi(model: torch.nn.Module, prof: DILProfile, seen: Sequence[distortions.Distortion], alpha: float,
              seed: int) -> Dict[str, float]:
    """What the meta-objective sees: on validation tiles at the seen distortions, the L1 loss of theta and of
    the virtual model phi = theta - alpha grad L(theta) (its inner step taken on a *different* validation
    batch), and theta's mean output offset (output - clean, grey levels); a theta whose offset the inner step
    removes scores well on the meta-objective while theta itself stays biased."""
    val = validation_images(prof)
    g = torch.Generator().manual_seed(10_000 + seed)
    clean = torch.stack([v[:, :prof.patch_size, :prof.patch_size] for v in val if min(v.shape[-2:]) >= prof.patch_size])
    if len(clean) < 2:
        raise ValueError("theta_phi: needs at least 2 validation tiles of patch_size")
    half = len(clean) // 2
    model = model.eval().cpu()
    out = {"L_theta": 0.0, "L_phi": 0.0, "offset_grey": 0.0}
    for d in seen:
        xa, xb = d(clean[:half], g), d(clean[half:], g)
        y_t, y_p = virtual_outputs(model, xa, clean[:half], xb, alpha)
        out["L_theta"] += float(torch.nn.functional.l1_loss(y_t, clean[half:])) / len(seen)
        out["L_phi"] += float(torch.nn.functional.l1_loss(y_p, clean[half:])) / len(seen)
        out["offset_grey"] += float((y_t - clean[half:]).mean()) * 255 / len(seen)
    return {k: round(v, 5) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ helpers
#: the profile fields that set one method's strategy options (replaced in a unit's key by that method's own
#: resolved options, :meth:`DILProfile.strategy_kwargs`), and the fields that never change what one unit trains
_STRATEGY_FIELDS = ("alpha", "meta_lr", "n_distortions", "ref_inner_lr", "ref_meta_lr", "ref_n_distortions")
_NOT_IN_UNIT = ("run_root", "seeds", "sweep", "strategies", "budgets", "gate_db")


def _done_key(prof: DILProfile, with_input: bool, name: str) -> Dict[str, Any]:
    """What method ``name``'s cached results depend on: the shared training fields (the budget among them, which
    sets its steps in either arm) and its own resolved strategy options (a changed profile trains it again). Fields that only other methods use (alpha
    for ERM, say), the list of methods and the sweep are not part of it, so that the baselines of a study can
    start before the sweep has chosen alpha."""
    d = asdict(prof) if not isinstance(prof, BackbonesProfile) else prof.base()
    shared = {k: v for k, v in d.items() if k not in _NOT_IN_UNIT + _STRATEGY_FIELDS}
    return json.loads(json.dumps({**shared, "method": name, "options": prof.strategy_kwargs(name),
                                  "with_input": with_input}, default=str))


def _same_key(stored: Any, current: Dict[str, Any]) -> bool:
    """A cached unit's key matches the current one; a profile field added to the code after the unit was written
    (absent from the stored key) matches while it is at its default, so that committed studies survive new
    options (the values such a unit ran with are the defaults: the field did not exist)."""
    if not isinstance(stored, Mapping):
        return False
    defaults = json.loads(json.dumps(asdict(DILProfile()), default=str))
    return set(stored) <= set(current) and all(
        stored[k] == v if k in stored else (k in defaults and v == defaults[k]) for k, v in current.items())


def _load_done(unit: Optional[Path], prof: DILProfile, name: str, with_input: bool, model_name, model_cfg):
    """A finished method's results from a resumable study's folder (None: train it)."""
    import pandas as pd

    if unit is None or not (unit / "done.json").is_file():
        return None
    rec = json.loads((unit / "done.json").read_text())
    if not _same_key(rec.get("key"), _done_key(prof, with_input, name)):
        raise ValueError(f"{unit} holds results of another profile; choose another run_root or remove the folder")
    model = models.build(model_name or prof.model, **(model_cfg if model_cfg is not None else prof.model_cfg))
    models.load_state(model, unit / "selected.safetensors")
    return {"model": model.eval(), "curve": rec["curve"], "row": rec["row"],
            "frame": pd.DataFrame(rec["frame"])}


def _save_done(unit: Optional[Path], prof: DILProfile, name: str, done: Dict[str, Any], with_input: bool) -> None:
    if unit is None:
        return
    unit.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in done["model"].state_dict().items()},
              str(unit / "selected.safetensors"))
    atomic_write_json(unit / "done.json", {"key": _done_key(prof, with_input, name), "curve": done["curve"],
                                           "row": done["row"], "frame": done["frame"].to_dict(orient="records")})


class _threads:
    """``torch.set_num_threads(n)`` for the duration (n = 0: unchanged): a profile fixes its thread count so that
    a rerun of a committed seed gives the committed numbers bit for bit (reductions depend on it)."""

    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> "_threads":
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.old)


def _test_sets(eval_side: int, benchmarks: Sequence[str]) -> Dict[str, Tuple[List[torch.Tensor], List[str]]]:
    sets = {TEST_SET: (data.embedded_images("test", max_side=eval_side), data.embedded_names("test"))}
    for b in benchmarks:
        imgs = data.folder_images(b, max_side=eval_side) if Path(b).is_dir() else data.benchmark_images(b, max_side=eval_side)
        sets[Path(b).name] = (imgs, [str(i) for i in range(len(imgs))])
    return sets


def _summary(df) -> List[Dict[str, Any]]:
    per_seed = df.groupby(["set", "method", "distortion", "seed"], sort=False)["psnr"].mean().reset_index()
    s = per_seed.groupby(["set", "method", "distortion"], sort=False)["psnr"].agg(["mean", "std", "count"])
    return s.reset_index().round(3).to_dict(orient="records")


def _equal_wall(curves: Dict[str, List[List[Dict[str, Any]]]], key: str) -> Dict[str, Any]:
    """Validation PSNR (``key``) of each method at the largest wall time every method reached (last checkpoint at
    or before it), mean over seeds."""
    ends = [c[-1]["wall_time"] for runs in curves.values() for c in runs if c]
    if not ends:
        return {}
    t = min(ends)
    out = {"wall_time_s": round(t, 2), "val": {}}
    for m, runs in curves.items():
        vals = []
        for c in runs:
            pts = [p for p in c if p["wall_time"] <= t + 1e-9]
            if pts:
                vals.append(pts[-1][key])
        if vals:
            out["val"][m] = round(float(np.mean(vals)), 3)
    return out


def _unit_dir(root: Path, seed: int, tag: str, single: bool, arm: str, name: str) -> Path:
    """A method's folder in a resumable study: ``seed-S/[backbone/]both|batches|iterations/<method>``."""
    return root / f"seed-{seed}" / tag.strip(": ") / ("both" if single else arm) / name


def _units(prof: DILProfile, n_seen: int, seed: int):
    """The units of a study in training order: (seed, arm, method, single) for every seed from ``seed``, budget
    arm and method; a method with the same steps in both arms (``single``: ERM, the oracle) only in the first."""
    for s in range(seed, seed + prof.seeds):
        for arm in prof.budgets:
            for name in prof.strategies:
                single = prof.steps(name, n_seen, "batches") == prof.steps(name, n_seen, "iterations")
                if arm == prof.budgets[0] or not single:
                    yield s, arm, name, single


#: the distortion split each experiment trains on (its seen distortions set the DIL variants' steps per arm)
SPLIT = {DENOISE_NAME: "noise-dil", DEBLUR_NAME: "blur-dil", TYPES_NAME: "types-dil", BACKBONES_NAME: "noise-dil"}


def committed_study(name: str, strategies: Sequence[str], seeds: int = 1, budgets: Sequence[str] = ("batches",),
                    sub: str = "", **overrides: Any) -> Optional[Dict[str, Any]]:
    """The record of a committed study's finished units (``data/studies/<name>-medium/``, issue 13's protocol;
    ``sub``: a side arm in a subfolder of it, e.g. ``alpha-0.01``), rebuilt from them without training: the medium
    profile with these ``strategies``, ``seeds`` and ``budgets`` (and ``overrides``, e.g. the alpha its sweep
    chose). None when a unit is not committed yet; a unit of another profile raises (:func:`_load_done`). What
    notebooks 02 and 03 show of a side arm or a study still under way."""
    from .. import experiments
    from ..paths import studies_dir

    exp = experiments.get(name)
    root = studies_dir() / f"{name}-medium" / sub
    overrides = {**overrides, "strategies": tuple(strategies), "seeds": seeds, "budgets": tuple(budgets),
                 "sweep": {}, "run_root": str(root)}
    prof = select(exp.profiles, "medium", overrides)
    n_seen = len(distortions.distortion_set(SPLIT[name]).seen)
    if not all((_unit_dir(root, s, "", single, arm, m) / "done.json").is_file()
               for s, arm, m, single in _units(prof, n_seen, 0)):
        return None
    return exp.run("medium", seed=0, device="cpu", **overrides)


def _run_methods(prof: DILProfile, seen, tests: Dict[str, distortions.Distortion], val_sel, val_curve, seed: int,
                 device: str, benchmarks: Sequence[str], strategy_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
                 model_name: Optional[str] = None, model_cfg: Optional[Dict[str, Any]] = None,
                 tag: str = "", oracle: Optional[Sequence[distortions.Distortion]] = None) -> Dict[str, Any]:
    """Train and test every method of ``prof`` for ``prof.seeds`` seeds from ``seed``, in every budget arm of
    ``prof.budgets`` (a method with one distorted batch per step, ERM and the oracle, takes the same steps in
    both arms and is trained once): the per-image frame, curves, budgets (with theta-vs-phi diagnostics for the
    paper variants) and the models of the first seed, ``seed`` (label -> model). ``oracle``: the distortions the oracle
    baseline trains on (the test conditions)."""
    import pandas as pd

    sets = _test_sets(prof.eval_side, benchmarks)
    frames, curves, budgets, kept = [], {}, {}, {}
    prev = None
    for s, arm, name, single in _units(prof, len(seen), seed):
        first, prev = s != prev, s          # the seed's first unit also scores the distorted input
        if name == "erm_oracle" and not oracle:
            raise ValueError("the oracle baseline needs the test conditions to train on (oracle=...)")
        label = tag + LABEL[name] + ("" if single else ARM_SUFFIX[arm])
        unit = None if not prof.run_root else _unit_dir(Path(prof.run_root), s, tag, single, arm, name)
        done = _load_done(unit, prof, name, first, model_name, model_cfg)
        if done is None:
            kw = (strategy_kwargs or {}).get(name)
            tr = train_one(name, prof, seen, s, device, val_sel, val_curve, kw, model_name=model_name,
                           model_cfg=model_cfg, arm=arm, train_on=oracle if name == "erm_oracle" else None,
                           run_dir=unit)
            row = {"seed": s, "arm": "both" if single else arm, **tr.counters,
                   "wall_time_s": round(tr.wall_time, 2), "selected_step": tr.selected_step,
                   "strategy": tr.strategy}
            if name in dil.PAPER_VARIANTS:
                row["theta_phi"] = theta_phi(tr.model, prof, seen, tr.strategy["alpha"], s)
            parts = []
            for set_name, (imgs, names_) in sets.items():
                df = evaluate.evaluate({label: tr.model}, imgs, tests, seed=1000 + s, device=device,
                                       image_names=names_, include_input=first)
                df["seed"], df["set"] = s, set_name
                parts.append(df)
            done = {"model": tr.model, "curve": tr.curve, "row": row, "frame": pd.concat(parts)}
            _save_done(unit, prof, name, done, first)
        if s == seed:   # the first seed's models: what --ship writes to seed-<seed>/
            kept[label] = done["model"]
        curves.setdefault(label, []).append(done["curve"])
        budgets.setdefault(label, []).append(done["row"])
        frames.append(done["frame"])
    full = pd.concat(frames, ignore_index=True)
    return {"df": full, "curves": curves, "budgets": budgets, "models": kept}


def _sweep(prof: DILProfile, seen, val_sel, val_curve, seed: int, device: str) -> Dict[str, Any]:
    """Choose alpha (paper variants, on dil_pf) and, if listed, the released sf's meta lr, on the validation
    photos only, each candidate trained on ``sweep["budget"]`` distorted batches (or ``sweep["fraction"]`` of
    the main budget; ``sweep["arm"]`` = "iterations": that many optimiser steps, as ERM takes). The restorer gate: a candidate is accepted only if its selected theta beats the noisy
    input on validation at every seen level by more than ``prof.gate_db``; the best accepted candidate (mean
    validation PSNR at ``val_sel``) wins. If none passes, the profile's own value is kept and the sweep says so."""
    rows, chosen = [], {}
    if not prof.sweep:
        return {"rows": rows, "chosen": chosen}
    budget = int(prof.sweep.get("budget") or max(1, round(prof.sweep.get("fraction", 0.5) * prof.budget)))
    arm = prof.sweep.get("arm", "batches")  # "iterations": each candidate takes ``budget`` optimiser steps
    gate = {f"seen {d.label}": d for d in seen}
    val = validation_images(prof)
    inputs = train.validate(torch.nn.Identity(), val, {**val_sel, **val_curve, **gate}, device=torch.device("cpu"))

    def one(strategy: str, key: str, value: float, kwargs: Dict[str, Any]) -> None:
        unit = (Path(prof.run_root) / f"sweep-seed-{seed}" / f"{strategy}-{key}-{value:g}") if prof.run_root else None
        # a finished candidate's row is kept beside its checkpoints (and in git, under data/studies/): a study
        # resumed on another machine does not train the sweep again
        ukey = {**_done_key(prof, False, strategy), "options": kwargs, "budget": budget, "arm": arm, "seed": seed}
        ukey = json.loads(json.dumps(ukey, default=str))
        cached = None if unit is None or not (unit / "row.json").is_file() else json.loads((unit / "row.json").read_text())
        if cached is not None and _same_key(cached.get("key"), ukey):
            row = cached["row"]
        else:
            tr = train_one(strategy, prof, seen, seed, device, val_sel, val_curve, kwargs, budget=budget,
                           val_gate=gate, run_dir=unit, arm=arm)
            sel = next(p for p in tr.curve if p["step"] == tr.selected_step) if tr.selected_step else tr.curve[-1]
            row = {"strategy": strategy, key: value, "val_select": round(sel["val_select"], 3),
                   "gate_margin_db": round(min(sel[f"val {k}"] - inputs[k] for k in gate), 3),
                   "selected_step": tr.selected_step, "wall_time_s": round(tr.wall_time, 2)}
            if unit is not None:
                atomic_write_json(unit / "row.json", {"key": ukey, "row": row})
        rows.append({**row, "accepted": bool(row["gate_margin_db"] > prof.gate_db)})

    def pick(strategy: str, key: str, default: float) -> None:
        ok = [r for r in rows if r["strategy"] == strategy and key in r and r["accepted"]]
        chosen[key] = max(ok, key=lambda r: (r["val_select"], r[key]))[key] if ok else default
        if not ok:
            chosen[f"{key}_note"] = (f"no {key} candidate beat the noisy input on validation by > {prof.gate_db} dB "
                                     f"at every seen level: the profile's {default:g} is kept")

    for a in prof.sweep.get("alpha", []):
        one("dil_pf", "alpha", a, {**prof.strategy_kwargs("dil_pf"), "alpha": a})
    if prof.sweep.get("alpha"):
        pick("dil_pf", "alpha", prof.alpha)
    for m in prof.sweep.get("ref_meta_lr", []):
        one("dil_sf_reference", "meta_lr", m, {**prof.strategy_kwargs("dil_sf_reference"), "meta_lr": m})
    if prof.sweep.get("ref_meta_lr"):
        pick("dil_sf_reference", "meta_lr", prof.ref_meta_lr or prof.lr)
        chosen["ref_meta_lr"] = chosen.pop("meta_lr")
    return {"rows": rows, "chosen": chosen, "budget": budget, "arm": arm, "seed": seed, "gate_db": prof.gate_db,
            "input_val": {k: round(v, 3) for k, v in inputs.items()},
            "criterion": f"max over checkpoints of mean validation PSNR at {', '.join(val_sel)} (validation photos), "
                         f"among candidates whose theta beats the noisy input at every seen level by > "
                         f"{prof.gate_db} dB"}


def _swept(prof: DILProfile, seen, val_sel, val_curve, seed: int, device: str) -> Tuple[DILProfile, Dict[str, Any]]:
    """Run the profile's validation sweep (:func:`_sweep`, nothing without one) and return the profile with the
    chosen alpha / released meta lr, and the sweep's table (with its wall time)."""
    ts = time.perf_counter()
    sweep = _sweep(prof, seen, val_sel, val_curve, seed, device)
    prof = replace(prof, **{k: v for k, v in sweep["chosen"].items() if k in ("alpha", "ref_meta_lr")})
    sweep["wall_time_s"] = round(time.perf_counter() - ts, 2)
    return prof, sweep


def _parts(prof: DILProfile, out: Dict[str, Any], extra_config: Dict[str, Any], seed: int,
           sweep: Optional[Dict[str, Any]] = None, curve_key: str = "") -> Tuple[Dict, Dict, Dict]:
    """(config, tables, extra top-level entries) of a record."""
    df = out["df"]
    prof_d = prof.base() if isinstance(prof, BackbonesProfile) else asdict(prof)
    prof_d.pop("run_root", None)  # where it ran, not what it did
    config = {"profile": prof_d, "seeds": list(range(seed, seed + prof.seeds)),
              "implements": {LABEL[k]: v for k, v in dil.PROVENANCE.items()}, **extra_config}
    tables = {"summary": _summary(df), "per_image": df.round(4).to_dict(orient="records"),
              "budgets": out["budgets"], "equal_wall_time": _equal_wall(out["curves"], curve_key),
              **({"sweep": sweep} if sweep is not None else {})}
    return config, tables, {"curves": out["curves"], "curve_key": curve_key}


def _finish(name: str, profile: str, parts: Tuple[Dict, Dict, Dict], claims_fn, device: str, started: float,
            models_: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    config, tables, extra = parts
    cl = claims_fn({"config": config, "tables": tables})
    return envelope(name, profile, config=config, tables=tables, claims=cl, device=device, started=started,
                    models=models_, **extra)


# ------------------------------------------------------------------------------------------------ claims
def _test_rows(record: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The per-image rows on the embedded test photos (other benchmark sets are not judged)."""
    return C.rows_where(record["tables"]["per_image"], set=TEST_SET)


def _restorer(rows, label: str, where: str) -> C.Precondition:
    return C.restorer(label, C.seed_means(rows, method=label, distortion=where),
                      C.seed_means(rows, method="input", distortion=where), where=where)


def _has(rows, where: Optional[str], *labels: str) -> bool:
    """Every method in ``labels`` has rows (at distortion ``where``, if given): no evidence, no claim."""
    present = {r["method"] for r in rows if where is None or r["distortion"] == where}
    return all(lab in present for lab in labels)


def _headroom(rows, where: str, baseline: str = "ERM", oracle: str = "ERM oracle") -> List[C.Precondition]:
    """The oracle (ERM trained on the test conditions) beats ``baseline`` at ``where``: no headroom, no test of a
    generalisation claim. Empty when the record has no oracle (older records)."""
    if not _has(rows, where, oracle, baseline):
        return []
    return [C.headroom(C.seed_means(rows, method=oracle, distortion=where),
                       C.seed_means(rows, method=baseline, distortion=where), where=where, oracle=oracle,
                       baseline=baseline)]


def _beats(rows, claim: str, paper: Optional[float], a: str, b: str, where: str, note: str,
           require: Sequence[C.Precondition] = ()) -> C.Claim:
    """``a`` beats ``b`` at ``where`` (dB): per-seed differences of means (>= 2 seeds) or paired per-image
    differences (1 seed); both must be restorers there (and ``require`` must hold, e.g. the oracle headroom)."""
    A, B = {"method": a, "distortion": where}, {"method": b, "distortion": where}
    return C.effect(claim, paper, seeds=C.seed_diffs(rows, A, B), units=C.paired_diffs(rows, A, B),
                    unit="images", require=[_restorer(rows, a, where), _restorer(rows, b, where), *require],
                    source=SOURCE, note=note)


def _arms(record: Mapping[str, Any]) -> List[str]:
    return list(record["config"]["profile"].get("budgets", ["batches"]))


def _strategies(record: Mapping[str, Any]) -> List[str]:
    return list(record["config"]["profile"]["strategies"])


_STRATIFIED_NOTE = ("ours: the stratified ERM is DIL-pf at alpha = 0 (the same data per step without the virtual "
                    "update)")


def _study_claims(rows, strategies: Sequence[str], arms: Sequence[str], where: str, at: str,
                  paper_gain: Mapping[str, Optional[float]], paper_note: str, tag: str = "") -> List[C.Claim]:
    """The protocol's claims at one test distortion ``where`` (written ``at``, e.g. "at unseen σ=30"), for one
    backbone (``tag``): the oracle's headroom over ERM (ours, sign only), then per budget arm every trained method
    against ERM (``paper_gain[name]``, None = sign only; each needing the headroom where the record has an oracle)
    and each paper variant against the stratified ERM of its own arm (the meta-learning term, sign only)."""
    erm, oracle = tag + "ERM", tag + "ERM oracle"
    if not _has(rows, where, erm, "input"):
        return []
    out: List[C.Claim] = []
    if _has(rows, where, oracle):
        out.append(_beats(rows, f"{oracle} beats ERM {at} (headroom, dB)", None, oracle, erm, where,
                          note="ours: the oracle trains on the test conditions; a gain a generalisation method "
                               "can at most close"))
    need = _headroom(rows, where, erm, oracle)
    for arm in arms:
        for name in strategies:
            me = tag + LABEL[name] + ARM_SUFFIX[arm]
            if name in ("erm", "erm_oracle", "erm_stratified") or not _has(rows, where, me):
                continue
            note = paper_note + ("; ours: equal distorted batches" if arm == "batches" else "") + (
                "; ours: the released code vs the paper's DIL-sf" if name.startswith("dil_sf_reference") else "")
            out.append(_beats(rows, f"{me} beats ERM {at} (dB gain)", paper_gain.get(name), me, erm, where,
                              note=note, require=need))
            strat = tag + "ERM stratified" + ARM_SUFFIX[arm]      # the control of the same budget arm
            if name in dil.PAPER_VARIANTS and _has(rows, where, strat):
                out.append(_beats(rows, f"{me} beats {strat[len(tag):]} {at} (meta-learning term, dB)", None, me, strat,
                                  where, require=need, note=_STRATIFIED_NOTE))
    return out


def claims_denoise(record: Mapping[str, Any]) -> List[C.Claim]:
    """ERM's PSNR at unseen σ = 30, 40, 50 (levels, ±1 dB); each DIL strategy's gain over ERM there (the paper's
    gain, within a factor 2) in every budget arm, each needing the oracle's headroom over ERM where the record
    has an oracle; first- over second-order at σ=50 (pf - ps, sf - ss). Ours (sign only): the oracle's headroom
    itself and each DIL variant against the stratified ERM (the meta-learning term beyond the extra data)."""
    rows = _test_rows(record)
    strategies = _strategies(record)
    lab = {s: distortions.GaussianNoise(float(s)).label for s in (30, 40, 50)}
    out: List[C.Claim] = []
    if not _has(rows, None, "ERM"):
        return out
    for s in (30, 40, 50):
        if not _has(rows, lab[s], "ERM", "input"):
            continue
        out.append(C.level(f"ERM PSNR at unseen σ={s} (paper: CBSD68; ours: embedded test photos)",
                           PAPER_DENOISE["erm"][s], seeds=C.seed_means(rows, method="ERM", distortion=lab[s]),
                           units=[r["psnr"] for r in C.rows_where(rows, method="ERM", distortion=lab[s])],
                           tol=1.0, require=[_restorer(rows, "ERM", lab[s])], source=SOURCE,
                           note="absolute PSNR depends on the test images: ours are the embedded photos"))
    for s in (30, 40, 50):
        gains = {n: PAPER_DENOISE["dil_sf" if n.startswith("dil_sf_reference") else n][s] - PAPER_DENOISE["erm"][s]
                 for n in strategies if n.startswith("dil_")}
        out += _study_claims(rows, strategies, _arms(record), lab[s], f"at unseen σ={s}", gains,
                             "paper: CBSD68, RRDB, equal iterations")
    for arm in _arms(record):
        for fo, so in (("dil_pf", "dil_ps"), ("dil_sf", "dil_ss")):
            a, b = LABEL[fo] + ARM_SUFFIX[arm], LABEL[so] + ARM_SUFFIX[arm]
            if fo in strategies and so in strategies and _has(rows, lab[50], a, b, "input"):
                out.append(_beats(rows, f"{a} beats {b} at unseen σ=50 (first- > second-order)",
                                  PAPER_DENOISE[fo][50] - PAPER_DENOISE[so][50], a, b, lab[50],
                                  note="paper: CBSD68, RRDB"))
    return out


def claims_deblur(record: Mapping[str, Any]) -> List[C.Claim]:
    """At each unseen blur width σ = 4.2-5.0: the oracle's headroom, each DIL strategy's gain over ERM (the paper's
    Set5 gain of its unnamed "DIL") in every budget arm, each paper variant against the stratified ERM."""
    rows = _test_rows(record)
    out: List[C.Claim] = []
    strategies = _strategies(record)
    for s in PAPER_DEBLUR["dil"]:
        gain = PAPER_DEBLUR["dil"][s] - PAPER_DEBLUR["erm"][s]
        out += _study_claims(rows, strategies, _arms(record), distortions.GaussianBlur(s).label,
                             f"at unseen blur σ={s:g}", {n: gain for n in strategies if n.startswith("dil_")},
                             "paper: Set5, 'DIL' (variant unnamed); ours: embedded test photos")
    return out


def claims_types(record: Mapping[str, Any]) -> List[C.Claim]:
    """On every unseen type: the oracle's headroom, each DIL strategy's gain over ERM (sign only; on the hybrid,
    the paper's RealSR V3 gain of DIL-sf, +0.29 dB) in every budget arm, each paper variant against the stratified
    ERM."""
    rows = _test_rows(record)
    unseen = list(record["config"]["unseen"])
    strategies = _strategies(record)
    out: List[C.Claim] = []
    for i, d in enumerate(unseen):
        hybrid = i == len(unseen) - 1
        gain = PAPER_TYPES["dil_sf"] - PAPER_TYPES["erm"] if hybrid else None
        out += _study_claims(rows, strategies, _arms(record), d, f"on unseen type {d}",
                             {n: gain for n in strategies if n.startswith("dil_")},
                             "paper: RealSR V3 hybrid, DIL-sf +0.29 dB" if hybrid else
                             "paper: DIL generalizes to unseen types (no matching column); sign only")
    return out


def claims_backbones(record: Mapping[str, Any]) -> List[C.Claim]:
    """Per backbone at unseen σ=30: the oracle's headroom, each DIL strategy's gain over ERM (the paper's gain per
    backbone) in every budget arm, each paper variant against the stratified ERM."""
    rows = _test_rows(record)
    lab30 = distortions.GaussianNoise(30.0).label
    strategies = _strategies(record)
    out: List[C.Claim] = []
    for bb in record["config"]["backbones"]:
        if bb not in PAPER_BACKBONES:
            continue
        gain = PAPER_BACKBONES[bb]["dil"] - PAPER_BACKBONES[bb]["erm"]
        out += _study_claims(rows, strategies, _arms(record), lab30, "at unseen σ=30",
                             {n: gain for n in strategies if n.startswith("dil_")},
                             "paper: CBSD68, 'DIL' per backbone; ours: embedded test photos", tag=f"{bb}: ")
    return out


# ------------------------------------------------------------------------------------------ experiments
def run_denoise(profile: str = "quick", seed: int = 0, device: str = "auto", keep_models: bool = False,
                benchmarks: Sequence[str] = (), **overrides: Any) -> Dict[str, Any]:
    """ERM and the five DIL strategies on AWGN σ∈{5,10,15,20}; tested at 15, 20 (seen), 30-70 (unseen).
    With a ``sweep`` in the profile, alpha and the released sf's meta lr are first chosen on validation."""
    t0 = time.perf_counter()
    prof = select(PROFILES_DENOISE, profile, overrides)
    dset = distortions.distortion_set(SPLIT[DENOISE_NAME])
    tests = {d.label: d for d in (distortions.GaussianNoise(s) for s in (15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0))}
    val_sel = {d.label: d for d in (distortions.GaussianNoise(25.0), distortions.GaussianNoise(35.0))}
    val_curve = {"σ=50": distortions.GaussianNoise(50.0)}
    with _threads(prof.threads):
        prof, sweep = _swept(prof, dset.seen, val_sel, val_curve, seed, device)
        out = _run_methods(prof, dset.seen, tests, val_sel, val_curve, seed, device, benchmarks,
                           oracle=list(tests.values()))
    return _finish(DENOISE_NAME, profile, _denoise_parts(prof, out, sweep, seed, list(benchmarks)), claims_denoise,
                   device, t0, out["models"] if keep_models else None)


def _denoise_parts(prof: DILProfile, out: Dict[str, Any], sweep: Dict[str, Any], seed: int,
                   benchmarks: List[str]) -> Tuple[Dict, Dict, Dict]:
    tests = list(dict.fromkeys(out["df"]["distortion"]))
    return _parts(prof, out, {"seen": [d.label for d in distortions.distortion_set(SPLIT[DENOISE_NAME]).seen],
                              "test_levels": tests, "val_select": [distortions.GaussianNoise(25.0).label,
                                                                   distortions.GaussianNoise(35.0).label],
                              "val_curve": ["σ=50"], "test_images": data.embedded_names("test"),
                              "benchmarks": benchmarks, "paper": {LABEL[k]: v for k, v in PAPER_DENOISE.items()}},
                  seed, sweep, curve_key="val σ=50")


def merge_seed_records(records: Sequence[Dict[str, Any]], sweep: Optional[Dict[str, Any]] = None,
                       note: str = "") -> Dict[str, Any]:
    """Merge ``dil-denoise`` records of the same profile run with one seed each (e.g. in parallel processes)
    into one multi-seed record; the claims are recomputed over all seeds. ``sweep``: a separately run
    validation sweep to attach."""
    import pandas as pd

    if not records:
        raise ValueError("merge_seed_records: expected at least one record")
    profs = [{k: v for k, v in r["config"]["profile"].items() if k not in ("seeds", "sweep")} for r in records]
    if any(p != profs[0] for p in profs):
        raise ValueError("merge_seed_records: the records were run with different profiles")
    seeds = [s for r in records for s in r["config"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge_seed_records: duplicate seeds {seeds}")
    pd_ = records[0]["config"]["profile"]
    prof = DILProfile(**{**pd_, "model_cfg": dict(pd_["model_cfg"]), "strategies": tuple(pd_["strategies"]),
                         "seeds": len(seeds), "sweep": {}})
    out = {"df": pd.concat([pd.DataFrame(r["tables"]["per_image"]) for r in records], ignore_index=True),
           "curves": {}, "budgets": {}}
    for r in records:
        for k, v in r["curves"].items():
            out["curves"].setdefault(k, []).extend(v)
        for k, v in r["tables"]["budgets"].items():
            out["budgets"].setdefault(k, []).extend(v)
    config, tables, extra = _denoise_parts(prof, out, sweep or {"rows": [], "chosen": {}}, min(seeds),
                                           records[0]["config"]["benchmarks"])
    config["seeds"] = sorted(seeds)
    config["note"] = note
    rec: Dict[str, Any] = {"experiment": DENOISE_NAME, "profile": records[0].get("profile"), "config": config,
                           "tables": tables, **extra}
    rec["claims"] = C.as_rows(claims_denoise(rec))
    rec["provenance_per_seed"] = [{"seed": r["config"]["seeds"], **r.get("provenance", {}),
                                   "wall_time_s": r.get("wall_time_s")} for r in records]
    return rec


def run_deblur(profile: str = "quick", seed: int = 0, device: str = "auto", keep_models: bool = False,
               benchmarks: Sequence[str] = (), **overrides: Any) -> Dict[str, Any]:
    """Seen Gaussian blur σ∈{1,2,3,3.8}; unseen 4.2-5.0 (the paper's Set5 columns)."""
    t0 = time.perf_counter()
    prof = select(PROFILES_DEBLUR, profile, overrides)
    dset = distortions.distortion_set(SPLIT[DEBLUR_NAME])
    tests = {d.label: d for d in (distortions.GaussianBlur(3.8), *dset.unseen)}
    val_sel = {distortions.GaussianBlur(4.0).label: distortions.GaussianBlur(4.0)}
    val_curve = {distortions.GaussianBlur(5.0).label: distortions.GaussianBlur(5.0)}
    with _threads(prof.threads):
        prof, sweep = _swept(prof, dset.seen, val_sel, val_curve, seed, device)
        out = _run_methods(prof, dset.seen, tests, val_sel, val_curve, seed, device, benchmarks,
                           oracle=list(tests.values()))
    parts = _parts(prof, out, {"seen": [d.label for d in dset.seen], "test_levels": list(tests),
                               "val_select": list(val_sel), "val_curve": list(val_curve),
                               "paper": PAPER_DEBLUR, "benchmarks": list(benchmarks)},
                   seed, sweep if prof.sweep else None, curve_key=f"val {next(iter(val_curve))}")
    return _finish(DEBLUR_NAME, profile, parts, claims_deblur, device, t0, out["models"] if keep_models else None)


def run_types(profile: str = "quick", seed: int = 0, device: str = "auto", keep_models: bool = False,
              benchmarks: Sequence[str] = (), **overrides: Any) -> Dict[str, Any]:
    """Trained on noise + blur + JPEG; tested on unseen rain, haze and a hybrid blur+noise+JPEG pipeline."""
    t0 = time.perf_counter()
    prof = select(PROFILES_TYPES, profile, overrides)
    dset = distortions.distortion_set(SPLIT[TYPES_NAME])
    tests = {d.label: d for d in (*dset.seen, *dset.unseen)}
    # selection on the validation photos with a held-out *combination* of seen types (not a test distortion)
    sel = distortions.compose((distortions.GaussianBlur(1.0), distortions.JPEG(40)))
    val_sel = {sel.label: sel}
    val_curve = {dset.unseen[-1].label: dset.unseen[-1]}
    with _threads(prof.threads):
        prof, sweep = _swept(prof, dset.seen, val_sel, val_curve, seed, device)
        out = _run_methods(prof, dset.seen, tests, val_sel, val_curve, seed, device, benchmarks,
                           oracle=list(tests.values()))
    parts = _parts(prof, out, {"seen": [d.label for d in dset.seen], "unseen": [d.label for d in dset.unseen],
                               "val_select": list(val_sel), "val_curve": list(val_curve),
                               "benchmarks": list(benchmarks)},
                   seed, sweep if prof.sweep else None, curve_key=f"val {next(iter(val_curve))}")
    return _finish(TYPES_NAME, profile, parts, claims_types, device, t0, out["models"] if keep_models else None)


def run_backbones(profile: str = "quick", seed: int = 0, device: str = "auto", keep_models: bool = False,
                  benchmarks: Sequence[str] = (), **overrides: Any) -> Dict[str, Any]:
    """RRDB vs the window-attention transformer, ERM vs DIL, on dil-denoise's unseen levels."""
    import pandas as pd

    t0 = time.perf_counter()
    prof = select(PROFILES_BACKBONES, profile, overrides)
    dset = distortions.distortion_set(SPLIT[BACKBONES_NAME])
    tests = {d.label: d for d in (distortions.GaussianNoise(s) for s in (15.0, 30.0, 40.0, 50.0))}
    val_sel = {d.label: d for d in (distortions.GaussianNoise(25.0), distortions.GaussianNoise(35.0))}
    val_curve = {"σ=50": distortions.GaussianNoise(50.0)}
    outs = []
    with _threads(prof.threads):
        for bb, cfg in prof.backbones.items():
            outs.append(_run_methods(prof, dset.seen, tests, val_sel, val_curve, seed, device, benchmarks,
                                     model_name=bb, model_cfg=cfg, tag=f"{bb}: ", oracle=list(tests.values())))
    out = {"df": pd.concat([o["df"] for o in outs], ignore_index=True),
           "curves": {k: v for o in outs for k, v in o["curves"].items()},
           "budgets": {k: v for o in outs for k, v in o["budgets"].items()},
           "models": {k: v for o in outs for k, v in o["models"].items()}}
    out["df"] = out["df"][~((out["df"].method == "input") & out["df"].duplicated(["method", "distortion", "image", "seed", "set"]))]
    parts = _parts(prof, out, {"backbones": {k: dict(v) for k, v in prof.backbones.items()},
                               "params": {k: models.count_params(models.build(k, **v))
                                          for k, v in prof.backbones.items()},
                               "seen": [d.label for d in dset.seen], "test_levels": list(tests),
                               "paper": PAPER_BACKBONES, "benchmarks": list(benchmarks)},
                   seed, curve_key="val σ=50")
    return _finish(BACKBONES_NAME, profile, parts, claims_backbones, device, t0,
                   out["models"] if keep_models else None)


# ------------------------------------------------------------------------------------- notebook helpers
def results_table(res: Dict[str, Any], set_name: str = TEST_SET, stat: str = "mean"):
    """method x distortion table (mean or std over seeds) of a results record."""
    import pandas as pd

    df = pd.DataFrame(res["tables"]["summary"])
    df = df[df["set"] == set_name]
    order = list(dict.fromkeys(df["distortion"]))
    morder = list(dict.fromkeys(df["method"]))
    return df.pivot(index="method", columns="distortion", values=stat).loc[morder, order]


def paper_vs_ours(res: Dict[str, Any], levels: Sequence[float] = (30, 40, 50)):
    """dil-denoise: the paper's CBSD68 numbers next to ours (mean ± std over seeds) at unseen σ."""
    import pandas as pd

    mean, std = results_table(res), results_table(res, stat="std")
    rows = []
    for key, base in LABEL.items():
        for lab in (base, base + ARM_SUFFIX["iterations"]):
            if lab in mean.index:
                rows.append(_paper_row(key, lab, mean, std, levels))
    return pd.DataFrame(rows).set_index("method")


def _paper_row(key: str, lab: str, mean, std, levels: Sequence[float]) -> Dict[str, Any]:
    """One row of :func:`paper_vs_ours`: the paper's number where it has the method (the released sf is compared
    with its DIL-sf; our baselines have none), ours as mean ± std over seeds."""
    import pandas as pd

    pkey = "dil_sf" if key.startswith("dil_sf_reference") else key
    row: Dict[str, Any] = {"method": lab}
    for s in levels:
        col = next(c for c in mean.columns if c.endswith(f"={s:g}"))
        row[f"paper σ={s:g}"] = PAPER_DENOISE[pkey][s] if pkey in PAPER_DENOISE else float("nan")
        sd = std.loc[lab, col]
        row[f"ours σ={s:g}"] = f"{mean.loc[lab, col]:.2f}" + ("" if pd.isna(sd) else f" ± {sd:.2f}")
    return row


def _columns(levels: Sequence[Any]) -> Dict[str, str]:
    """Column name -> distortion label of the study tables: a number is a noise σ (dil-denoise, written "σ=30"), a
    string is a distortion label itself (e.g. "blur σ=4.2")."""
    return {(lv if isinstance(lv, str) else f"σ={lv:g}"):
            (lv if isinstance(lv, str) else distortions.GaussianNoise(float(lv)).label) for lv in levels}


def unseen_labels(res: Mapping[str, Any]) -> List[str]:
    """The record's unseen test distortions (labels): its ``unseen`` list, else its test levels minus the seen."""
    cfg = res["config"]
    if "unseen" in cfg:
        return list(cfg["unseen"])
    return [t for t in cfg.get("test_levels", []) if t not in set(cfg.get("seen", []))]


def psnr_table(res: Dict[str, Any], levels: Optional[Sequence[Any]] = (15, 20, 30, 40, 50), set_name: str = TEST_SET):
    """Every method's PSNR (dB) at each test distortion as "mean ± SE": over seeds (the per-seed mean over the test
    photos) with >= 2 seeds, over the photos with one; the distorted input first. The study's closing table.
    ``levels``: noise σ's or distortion labels (:func:`_columns`); None = every test distortion of the record."""
    import pandas as pd

    rows = C.rows_where(res["tables"]["per_image"], set=set_name)
    labs = _columns(levels if levels is not None else list(dict.fromkeys(r["distortion"] for r in rows)))
    out: Dict[str, Dict[str, str]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        row = {}
        for col, lab in labs.items():
            e = C.pick(seeds=C.seed_means(rows, method=method, distortion=lab),      # as the level claims do
                       units=[r["psnr"] for r in C.rows_where(rows, method=method, distortion=lab)])
            row[col] = "" if not e.n else f"{e.mean:.2f}" + ("" if e.se is None else f" ± {e.se:.2f}")
        out[method] = row
    return pd.DataFrame(out).T


def arm_of(label: str) -> Optional[str]:
    """The budget arm a method label belongs to: "iterations" (suffix ``[equal iterations]``), "batches" for the
    paper variants without it, None for methods trained once for both arms (one distorted batch per step)."""
    if label.endswith(ARM_SUFFIX["iterations"]):
        return "iterations"
    return None if label in ("ERM", "ERM oracle", "input") else "batches"


def _difference(rows, a: str, b: str, where: str) -> C.Estimate:
    """``a`` minus ``b`` at distortion ``where`` (dB), estimated as the claims estimate it: per-seed differences of
    means with >= 2 seeds, else paired per image."""
    A, B = {"method": a, "distortion": where}, {"method": b, "distortion": where}
    return C.pick(seeds=C.seed_diffs(rows, A, B), units=C.paired_diffs(rows, A, B))


def headroom_table(res: Dict[str, Any], levels: Optional[Sequence[Any]] = (30, 40, 50)):
    """The study in one table (dB, test photos, mean ± SE over seeds): the oracle's headroom over ERM at each
    unseen distortion (``levels``: noise σ's or labels; None = the record's unseen ones), then every other method
    against ERM and, for the paper variants, against the stratified ERM of the same arm (the meta-learning term
    beyond the extra data per step)."""
    import pandas as pd

    rows = _test_rows(res)
    present = list(dict.fromkeys(r["method"] for r in rows))
    labs = _columns(levels if levels is not None else unseen_labels(res))
    out = []

    def add(name: str, a: str, b: str) -> None:
        row: Dict[str, Any] = {"comparison": name}
        for col, lab in labs.items():
            e = _difference(rows, a, b, lab)
            row[col] = f"{e.mean:+.2f} ± {e.se:.2f}" if e.se is not None else (f"{e.mean:+.2f}" if e.n else "")
        out.append(row)

    if "ERM oracle" in present and "ERM" in present:
        add("ERM oracle - ERM (headroom)", "ERM oracle", "ERM")
    for lab in present:
        if lab in ("input", "ERM", "ERM oracle") or "ERM" not in present:
            continue
        add(f"{lab} - ERM", lab, "ERM")
        strat = "ERM stratified" + ("" if arm_of(lab) == "batches" else ARM_SUFFIX["iterations"])
        if lab.startswith(("DIL-pf", "DIL-ps", "DIL-sf", "DIL-ss")) and "released" not in lab and strat in present:
            add(f"{lab} - {strat}", lab, strat)
    return pd.DataFrame(out).set_index("comparison")


def study_summary(res: Dict[str, Any]) -> str:
    """What a dil-denoise record ran, read from the record (backbone, budget, arms, methods, seeds, the alpha the
    sweep chose, the released sf's rates, validation, precision, wall time): the notebook's description of a
    committed study, so that the prose cannot drift from the numbers."""
    cfg, prof = res["config"], res["config"]["profile"]
    sw = res["tables"].get("sweep", {}) or {}
    prov = res.get("provenance", {})
    methods = [LABEL.get(m, m) for m in prof["strategies"]]
    ref = f"inner {prof.get('ref_inner_lr') or prof['lr']:g}, meta {prof.get('ref_meta_lr') or prof['lr']:g}"
    alphas = sorted({float(r["alpha"]) for r in sw.get("rows", []) if "alpha" in r})
    val = (f"{prof['val_tiles']} validation tiles of {prof['val_side']} px" if prof.get("val_tiles")
           else f"validation crops of {prof['val_side']} px")
    lines = [
        f"backbone: {prof['model']} {prof['model_cfg']}; {prof['budget']} distorted batches of "
        f"{prof['batch_size']} x {prof['patch_size']}^2 per method; lr {prof['lr']:g}",
        f"budget arms: {', '.join(prof.get('budgets', ['batches']))}; seeds: {cfg['seeds']}",
        f"methods: {', '.join(methods)}",
        f"alpha: {prof['alpha']:g}" + (f" (validation sweep over {', '.join(f'{a:g}' for a in alphas)}: "
                                        f"{(sw.get('chosen') or {}).get('alpha_note', 'the best accepted candidate')})"
                                        if alphas else " (no sweep)") + f"; released sf: {ref}",
        f"checkpoints: {prof['checkpoints']} per run, selected on {val}; threads {prof.get('threads', 0) or 'as set'}; "
        f"precision {prov.get('precision', 'fp32')} on {prov.get('device', '?')} (torch {prov.get('torch', '?')})",
        f"training wall time, summed over methods and seeds: "
        f"{sum(r.get('wall_time_s', 0.0) for runs in res['tables']['budgets'].values() for r in runs) / 3600:.2f} h "
        f"(+ the sweep's {sum(r.get('wall_time_s', 0.0) for r in sw.get('rows', [])) / 60:.1f} min); this record's "
        f"process: "
        f"{res.get('wall_time_s', float('nan')):.0f} s (a resumed study reloads the finished methods)",
    ]
    return "\n".join(lines)


def _paper_gains(res: Mapping[str, Any], where: str) -> List[float]:
    """The paper's gains (dB) of its DIL variants over ERM at test distortion ``where`` (a label) in the record's
    experiment; empty where the paper has no matching column."""
    exp = res.get("experiment")
    if exp == DENOISE_NAME:
        s = next((s for s in PAPER_DENOISE["erm"] if distortions.GaussianNoise(float(s)).label == where), None)
        return [] if s is None else [PAPER_DENOISE[k][s] - PAPER_DENOISE["erm"][s] for k in dil.PAPER_VARIANTS]
    if exp == DEBLUR_NAME:
        return [PAPER_DEBLUR["dil"][s] - PAPER_DEBLUR["erm"][s] for s in PAPER_DEBLUR["dil"]
                if distortions.GaussianBlur(s).label == where]
    if exp == TYPES_NAME and unseen_labels(res)[-1:] == [where]:
        return [PAPER_TYPES["dil_sf"] - PAPER_TYPES["erm"]]
    return []


def study_findings(res: Dict[str, Any], sigma: Any = 50.0, headroom_at: Optional[Sequence[Any]] = None) -> str:
    """What a DIL study record found, as markdown bullets computed from it (nothing typed in): whether every
    model restores, the oracle's headroom at each unseen distortion (``headroom_at``: noise σ's or labels; None =
    σ 30/40/50 for dil-denoise, else the record's unseen ones), per budget arm the DIL variants against ERM and
    against the stratified ERM at ``sigma`` (a noise σ or a label; mean ± SE and 95% interval, as the claims
    estimate them), the released sf at its released and at ERM's learning rates, and the verdict counts."""
    rows = _test_rows(res)
    present = list(dict.fromkeys(r["method"] for r in rows))
    (at, lab), = _columns([sigma]).items()
    if headroom_at is None:
        headroom_at = (30, 40, 50) if res.get("experiment") == DENOISE_NAME else unseen_labels(res)

    def fmt(e: C.Estimate) -> str:
        if e.se is None:
            return f"{e.mean:+.2f} dB ({e.n} {e.over})"
        return f"{e.mean:+.2f} ± {e.se:.2f} dB (95% [{e.low:+.2f}, {e.high:+.2f}], {e.n} {e.over})"

    def sign(e: C.Estimate) -> str:
        if not e.decidable:
            return "undecided"
        return "above" if e.low > 0 else "below" if e.high < 0 else "indistinguishable from"

    out = []
    gains = gain_over_input(res, TEST_SET)
    bad = [(m, c) for m in gains.index for c in gains.columns if gains.loc[m, c] <= 0]
    out.append("Every model beats the distorted input at every test distortion." if not bad else
               "Below the distorted input (claims there are inconclusive): "
               + "; ".join(f"{m} at {c}" for m, c in bad) + ".")
    if "ERM oracle" in present and "ERM" in present:
        parts = []
        for col, where in _columns(headroom_at).items():
            e = _difference(rows, "ERM oracle", "ERM", where)
            parts.append(f"{col}: {fmt(e)}, {sign(e)} zero")
        out.append("Headroom (the oracle minus ERM): " + "; ".join(parts) + ".")
    for arm in BUDGETS:
        suffix = "" if arm == "batches" else ARM_SUFFIX["iterations"]
        name = {"batches": "Equal distorted batches (ours)", "iterations": "Equal iterations (the paper's)"}[arm]
        variants = [LABEL[k] + suffix for k in dil.PAPER_VARIANTS if LABEL[k] + suffix in present]
        if not variants or "ERM" not in present:
            continue
        vs_erm = {v: _difference(rows, v, "ERM", lab) for v in variants}
        best = max(vs_erm, key=lambda v: vs_erm[v].mean)
        line = (f"{name}, {at}: the best paper variant against ERM is {best} at {fmt(vs_erm[best])}; "
                f"{sum(sign(e) == 'above' for e in vs_erm.values())} of {len(vs_erm)} variants are above ERM, "
                f"{sum(sign(e) == 'below' for e in vs_erm.values())} below")
        paper = _paper_gains(res, lab)
        line += "." if not paper else (f" (paper: {paper[0]:+.2f} dB)." if len(set(paper)) == 1 else
                                       f" (paper: {min(paper):+.2f} to {max(paper):+.2f} dB).")
        strat = "ERM stratified" + suffix
        if strat in present:
            vs_s = {v: _difference(rows, v, strat, lab) for v in variants}
            line += (" Against the stratified ERM (the meta-learning term): "
                     + "; ".join(f"{v.replace(suffix, '')} {fmt(e)}" for v, e in vs_s.items()) + ".")
        out.append(line)
        refs = [r + suffix for r in (LABEL["dil_sf_reference"], LABEL["dil_sf_reference_lr"]) if r + suffix in present]
        if refs:
            out.append(f"{name}, the released sf against ERM at {at}: "
                       + "; ".join(f"{r.replace(suffix, '')} {fmt(_difference(rows, r, 'ERM', lab))}" for r in refs)
                       + ".")
    counts = {v: sum(c["verdict"] == v for c in res.get("claims", [])) for v in C.VERDICTS}
    out.append("Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" (of {len(res.get('claims', []))}).")
    return "\n".join(f"- {line}" for line in out)


def verdict_counts(res: Dict[str, Any]):
    """How many of the record's claims got each verdict, per kind of claim and budget arm (the claim's text before
    "at unseen", every DIL strategy written "DIL")."""
    import pandas as pd

    dil_labels = sorted((v for v in LABEL.values() if v.startswith("DIL-")), key=len, reverse=True)
    rows = []
    for c in res.get("claims", []):
        kind = re.split(" (?:at|on) unseen", c["claim"])[0]
        arm = "iterations" if ARM_SUFFIX["iterations"] in kind else "batches / both"
        kind = kind.replace(ARM_SUFFIX["iterations"], "")
        for lab in dil_labels:
            kind = kind.replace(lab, "DIL")
        rows.append({"kind": kind, "arm": arm, "verdict": c["verdict"]})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    return pd.crosstab([df["kind"], df["arm"]], df["verdict"])


def theta_phi_table(res: Dict[str, Any]):
    """Per method (mean over seeds): optimiser steps, distorted batches and wall time of its budget, and for the
    paper variants L(theta), L(phi) on validation tiles at the seen levels and theta's mean output offset (grey
    levels): what the meta-objective sees (:func:`theta_phi`)."""
    import pandas as pd

    out = {}
    for label, runs in res["tables"]["budgets"].items():
        row: Dict[str, Any] = {"arm": runs[0].get("arm", "batches")}
        for k in ("steps", "distorted_batches", "images_backpropagated", "wall_time_s"):
            row[k] = float(np.mean([r[k] for r in runs])) if all(k in r for r in runs) else float("nan")
        tp = [r["theta_phi"] for r in runs if "theta_phi" in r]
        for k in ("L_theta", "L_phi", "offset_grey"):
            row[k] = float(np.mean([t[k] for t in tp])) if tp else float("nan")
        row["seeds"] = len(runs)
        out[label] = row
    return pd.DataFrame(out).T


def plot_curves(res: Dict[str, Any], x: str = "distorted_batches", ax=None, arm: Optional[str] = None):
    """Validation PSNR at the curve distortion vs distorted batches (or wall_time), mean ± spread over seeds;
    ``arm`` ("batches" / "iterations"): only that budget arm's methods and those trained once for both."""
    import matplotlib.pyplot as plt

    key = res.get("curve_key", "val σ=50")
    if arm is not None:
        check_choice("plot_curves", "arm", arm, BUDGETS)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    bases = list(dict.fromkeys(lab.replace(ARM_SUFFIX["iterations"], "") for lab in res["curves"]))
    colour = {b: f"C{i % 10}" for i, b in enumerate(bases)}     # a method keeps its colour in both arms
    for label, runs in res["curves"].items():
        if arm is not None and arm_of(label) not in (None, arm):
            continue
        n = min(len(c) for c in runs)
        if n == 0:
            continue
        xs = np.mean([[p[x] for p in c[:n]] for c in runs], 0)
        ys = np.array([[p[key] for p in c[:n]] for c in runs])
        line, = ax.plot(xs, ys.mean(0), marker="o", ms=3, label=label,
                        color=colour[label.replace(ARM_SUFFIX["iterations"], "")])
        if len(runs) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel({"distorted_batches": "distorted batches seen", "wall_time": "wall time (s)"}.get(x, x))
    ax.set_ylabel(f"PSNR (dB), {key} (validation photos)")
    if arm is not None:
        ax.set_title({"batches": "equal distorted batches (ours)", "iterations": "equal iterations (the paper)"}[arm],
                     fontsize=10)
    ax.legend(fontsize=7)
    return ax


def restore_examples(models_: Dict[str, torch.nn.Module], distortion: Any, image: str = "chelsea",
                     side: int = 128, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Restorations of one embedded test photo by each model: {'clean', <distorted label>, name: output}.
    ``distortion`` is a Distortion or a noise σ (0-255)."""
    d = distortion if isinstance(distortion, distortions.Distortion) else distortions.GaussianNoise(float(distortion))
    img = data.center_crop(data.embedded_image(image), side)[None]
    g = torch.Generator().manual_seed(seed)
    bad = d(img, g)
    out = {"clean": img, f"input: {d.label}": bad}
    with torch.no_grad():
        for name, m in models_.items():
            m.eval()
            dev = next(m.parameters()).device
            out[name] = m(bad.to(dev)).float().clamp(0, 1).cpu()
    return out


def show_restorations(models_: Dict[str, torch.nn.Module], strategy: str, distortion: Any,
                      image: str = "chelsea", side: int = 128):
    """Side by side: clean, distorted, ERM and the chosen strategy's restoration (PSNR in the titles).
    ``models_``: e.g. ``experiments.run(..., keep_models=True)["models"]``."""
    from ..metrics import psnr

    if strategy not in models_:
        raise KeyError(f"unknown strategy {strategy!r}; valid: {', '.join(models_)}")
    pick = {k: models_[k] for k in dict.fromkeys([k for k in models_ if k.endswith("ERM")] + [strategy])}
    ex = restore_examples(pick, distortion, image=image, side=side)
    clean = ex["clean"]
    titles = [k if k == "clean" else f"{k}\n{psnr(v, clean):.2f} dB" for k, v in ex.items()]
    return show_images(list(ex.values()), titles)


def show_theta_phi(model: torch.nn.Module, sigma: float = 30.0, alpha: float = 0.01, inner_sigma: float = 15.0,
                   image: str = "chelsea", side: int = 96, seed: int = 0):
    """What the meta-objective sees, on one photo: theta's restoration of a noisy copy (noise ``sigma``), and that
    of the virtual model phi = theta - alpha grad L after one inner step on a *different* noisy copy (seen level
    ``inner_sigma``), with PSNRs and theta's mean output offset (grey levels) in the titles (the widget's
    function)."""
    from ..metrics import psnr

    check_number("show_theta_phi", "alpha", alpha, lo=0)
    img = data.center_crop(data.embedded_image(image), side)[None]
    g = torch.Generator().manual_seed(seed)
    x_in = distortions.GaussianNoise(float(inner_sigma))(img, g)
    x = distortions.GaussianNoise(float(sigma))(img, g)
    out_t, out_p = virtual_outputs(model.eval().cpu(), x_in, img, x, alpha)
    y_t, y_p, off = out_t.clamp(0, 1), out_p.clamp(0, 1), float((out_t - img).mean()) * 255
    titles = [f"noisy σ={sigma:g}\n{psnr(x, img):.2f} dB", f"θ\n{psnr(y_t, img):.2f} dB, offset {off:+.1f}",
              f"φ = θ - {alpha:g}·∇L (σ={inner_sigma:g})\n{psnr(y_p, img):.2f} dB", "clean"]
    return show_images([x, y_t, y_p, img], titles)


def plot_sampling_diagram(k: int = 3):
    """Parallel vs serial sampling: every virtual model from theta, or chained through the distortions."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, serial in zip(axes, (False, True)):
        ax.set_xlim(-0.5, k + 1.2)
        ax.set_ylim(-0.8, k + 0.2)
        ax.axis("off")
        ax.set_title(("serial (dil_sf / dil_ss): chained virtual updates" if serial else
                      "parallel (dil_pf / dil_ps): every φ from θ"), fontsize=10)
        ax.text(0, k - 0.5, "θ", ha="center", va="center", fontsize=14, bbox=dict(boxstyle="circle", fc="#dde"))
        prev = (0, k - 0.5)
        for i in range(k):
            pos = (i + 1, k - 0.5) if serial else (1, k - 1.5 - i + 1)
            if not serial:
                pos = (1.2, k - 0.5 - i)
            ax.annotate("", xy=pos, xytext=prev if serial else (0, k - 0.5),
                        arrowprops=dict(arrowstyle="->", color="C0"))
            ax.text(*pos, f"φ$_{{d_{i + 1}}}$", ha="center", va="center", fontsize=12,
                    bbox=dict(boxstyle="round", fc="#efe"))
            lx, ly = ((prev[0] + pos[0]) / 2, pos[1] + 0.25) if serial else ((0 + pos[0]) / 2 + 0.1, (k - 0.5 + pos[1]) / 2 + 0.15)
            ax.text(lx, ly, f"−α∇L(I$_{{d_{i + 1}}}$)", fontsize=8, ha="center", color="C0")
            tgt = (pos[0], pos[1] - 0.75) if serial else (pos[0] + 0.8, pos[1])
            ax.annotate("", xy=tgt, xytext=pos, arrowprops=dict(arrowstyle="->", color="C3"))
            ax.text(tgt[0] + (0 if serial else 0.05), tgt[1], f"L(f$_φ$(I$_{{d'_{i + 1}}}$), I$_c$)", fontsize=8,
                    ha="center" if serial else "left", va="top" if serial else "center", color="C3")
            prev = pos
    fig.tight_layout()
    return fig


def gain_over_input(res: Dict[str, Any], set_name: str = TEST_SET):
    """Sanity table: each method's mean PSNR minus the distorted input's (dB). A negative row means the model is
    not yet a restorer at that distortion: the claims comparing it are inconclusive."""
    t = results_table(res, set_name)
    if "input" not in t.index:
        raise KeyError("the record has no 'input' rows")
    return (t.drop(index="input") - t.loc["input"]).round(2)


# ------------------------------------------------------------------------------------------ the registry
DENOISE = Experiment(DENOISE_NAME, PROFILES_DENOISE, PAPER_DENOISE, SOURCE, run_denoise, claims_denoise,
                     notebook="02_dil_denoising.ipynb")
DEBLUR = Experiment(DEBLUR_NAME, PROFILES_DEBLUR, PAPER_DEBLUR, SOURCE, run_deblur, claims_deblur,
                    notebook="03_dil_generalization.ipynb")
TYPES = Experiment(TYPES_NAME, PROFILES_TYPES, PAPER_TYPES, SOURCE, run_types, claims_types,
                   notebook="03_dil_generalization.ipynb")
BACKBONES = Experiment(BACKBONES_NAME, PROFILES_BACKBONES, PAPER_BACKBONES, SOURCE, run_backbones, claims_backbones,
                       notebook="03_dil_generalization.ipynb")
