"""The experiments: one module per notebook, one contract, one claims grammar.

Every experiment is an :class:`~causalir.experiments.record.Experiment`: ``PROFILES`` (quick / medium / full,
frozen dataclasses, chosen only by :func:`profiles.select`), one ``PAPER`` table with its ``SOURCE``, a ``run``
that trains and evaluates and returns one record envelope (config, tables, claims, provenance, wall time), and
a ``claims`` function that makes the verdicts from a record's config and tables alone (so committed results
are re-judged without retraining; :mod:`~causalir.experiments.claims` is the only place a verdict is made).

Notebooks and the CLI reach every experiment through :func:`run`, :func:`load_results` and
:func:`load_models`. The table below is explicit on purpose: it is the list of what the suite reproduces.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..paths import artifacts_dir, results_dir
from ..utils import atomic_write_json
from . import claims as claims_mod
from . import shipping
from .profiles import NAMES as PROFILES
from .profiles import check_profile
from .record import Experiment, provenance

__all__ = ["EXPERIMENTS", "PROFILES", "Experiment", "get", "names", "run", "load_results", "load_models",
           "rejudge", "check_profile", "provenance", "collect_claims", "claims_markdown"]

# name -> "module:attribute" of its Experiment. Explicit on purpose (no import magic).
EXPERIMENTS: Dict[str, str] = {
    "erm-denoise": "causalir.experiments.erm_denoise:EXPERIMENT",
    "backdoor-toy": "causalir.experiments.backdoor_toy:EXPERIMENT",
    "dil-denoise": "causalir.experiments.dil:DENOISE",
    "dil-deblur": "causalir.experiments.dil:DEBLUR",
    "dil-types": "causalir.experiments.dil:TYPES",
    "dil-backbones": "causalir.experiments.dil:BACKBONES",
    "faig-srresnet": "causalir.experiments.faig_srresnet:EXPERIMENT",
    "adms-rbn": "causalir.experiments.adms_rbn:EXPERIMENT",
    "dni-denoise": "causalir.experiments.dni_denoise:EXPERIMENT",
    "rl-restore": "causalir.experiments.rl_restore:EXPERIMENT",
    "path-restore": "causalir.experiments.path_restore:EXPERIMENT",
}


def get(name: str) -> Experiment:
    """The registered experiment ``name`` (a KeyError lists the valid names). Import errors are not swallowed."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; valid names: {', '.join(EXPERIMENTS)}")
    mod, attr = EXPERIMENTS[name].split(":")
    exp = getattr(importlib.import_module(mod), attr)
    if not isinstance(exp, Experiment) or exp.name != name:
        raise TypeError(f"{EXPERIMENTS[name]} is not the Experiment {name!r}")
    return exp


def names() -> List[str]:
    """Every registered experiment name."""
    return list(EXPERIMENTS)


def _result_path(folder: Path, name: str, profile: str) -> Path:
    return Path(folder) / f"{name}-{profile}.json"


def run(name: str, profile: str = "quick", seed: int = 0, device: str = "auto", *, commit: bool = False,
        out_dir: Optional[Path] = None, overwrite: bool = False, keep_models: bool = False, ship: bool = False,
        **overrides: Any) -> Dict[str, Any]:
    """Run experiment ``name`` and write its record to ``artifacts/results/NAME-PROFILE.json`` (``out_dir``, or
    ``data/results/`` with ``commit=True``, where an existing committed file is only replaced with
    ``overwrite=True``, checked before running). ``keep_models=True`` puts the trained models in the returned
    record under ``"models"`` (never in the file). ``ship=True`` (with ``commit``) also writes them with their
    model cards to ``data/models/NAME/PROFILE/seed-SEED/`` (:mod:`.shipping`; what cannot be shipped is listed in
    the record's ``_not_shipped``). Returns the record (with ``_path``)."""
    check_profile(profile)
    exp = get(name)
    if ship and not commit:
        raise ValueError("ship=True ships the models of a committed run: pass commit=True too")
    folder = Path(out_dir) if out_dir is not None else (results_dir() if commit else artifacts_dir() / "results")
    path = _result_path(folder, name, profile)
    if commit and not overwrite and path.exists():
        raise FileExistsError(f"{path} exists (a committed result); pass overwrite=True (CLI --overwrite) to "
                              "replace it")
    rec = exp.run(profile, seed=seed, device=device, keep_models=keep_models or ship, **overrides)
    atomic_write_json(path, {k: v for k, v in rec.items() if k != "models"})
    rec["_path"] = str(path)
    if ship:
        sets = " ".join(f"'{k}={json.dumps(v)}'" for k, v in overrides.items())
        command = (f"causalir reproduce {name} --profile {profile} --seed {seed} --device {device} --commit --ship"
                   + (f" --set {sets}" if sets else ""))
        kept = rec.get("models") or {}
        chosen = exp.ship_select(rec, kept) if exp.ship_select is not None else kept
        ok, skipped = shipping.shippable(chosen)
        skipped.update({k: "not shipped: the experiment ships a subset (Experiment.ship_select)"
                        for k in kept if k not in chosen})
        if ok:
            tasks = exp.card_tasks(rec) if exp.card_tasks is not None else None
            shipping.save(name, profile, seed, ok, record=rec, command=command, overwrite=overwrite, tasks=tasks,
                          folder=None if out_dir is None else Path(out_dir) / "models")
        rec["_not_shipped"] = skipped
    return rec


def load_results(name: str, profile: str = "medium", *, folder: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """A results record (the committed one in data/results by default), its claims re-judged by the current
    grammar from its tables; None if the file is absent."""
    path = _result_path(Path(folder or results_dir()), name, profile)
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    return rejudge(rec)


def rejudge(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` with its claims recomputed from its config and tables by the experiment's ``claims``."""
    name = record.get("experiment")
    if name not in EXPERIMENTS:
        raise KeyError(f"record: unknown experiment {name!r}; valid names: {', '.join(EXPERIMENTS)}")
    exp = get(name)
    return {**record, "claims": claims_mod.as_rows(exp.claims(record))}


def load_models(name: str, profile: str = "medium", seed: int = 0, device: str = "cpu", *,
                folder: Optional[Path] = None) -> Dict[str, Any]:
    """The trained models of a committed run, rebuilt from ``data/models/NAME/PROFILE/seed-SEED/`` (a
    ``models.json`` manifest of model cards and one safetensors file per model; see :mod:`.shipping`). Raises
    FileNotFoundError naming missing files and ValueError for a file whose sha256 differs from its card."""
    exp = get(name)
    spec = shipping.read_manifest(name, profile, seed, folder)
    return exp.load_models(spec, shipping.model_dir(name, profile, seed, folder), device)


def collect_claims(folders, rejudge_records: bool = False) -> List[Dict[str, Any]]:
    """Every claim in every results file under ``folders`` (see :func:`claims.collect`); with
    ``rejudge_records`` the claims are first recomputed from each file's tables by the current grammar."""
    def judge(rec: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
        return rejudge(rec)["claims"] if rec.get("experiment") in EXPERIMENTS else None

    return claims_mod.collect(folders, judge=judge if rejudge_records else None)


def claims_markdown(rows) -> str:
    return claims_mod.markdown(rows)
