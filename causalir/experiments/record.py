"""The experiment contract: the :class:`Experiment` spec and the record envelope every ``run`` returns."""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from ..utils import resolve_device
from .claims import Claim, as_rows


@dataclass(frozen=True)
class Experiment:
    """One registered experiment.

    ``run(profile, seed=0, device="auto", keep_models=False, **overrides)`` returns the envelope of
    :func:`envelope`; ``claims(record)`` makes the verdicts from ``record["config"]`` and ``record["tables"]``
    alone; ``load_models(manifest, folder, device)`` rebuilds shipped weights (default: registry models).
    """

    name: str
    profiles: Mapping[str, Any]
    paper: Mapping[str, Any]
    source: str
    run: Callable[..., Dict[str, Any]]
    claims: Callable[[Mapping[str, Any]], List[Claim]]
    notebook: str = ""
    load_models: Callable[..., Dict[str, Any]] = None  # type: ignore[assignment]
    #: ``card_tasks(record) -> {label: distortion}``: the shipped restorers whose model cards carry metrics (the
    #: PSNR they reach under that distortion, and the check a test recomputes); None: no card metrics
    card_tasks: Optional[Callable[[Mapping[str, Any]], Dict[str, Any]]] = None
    #: ``ship_select(record, models) -> models``: which of a run's kept models a committed run ships (e.g. one seed
    #: of a multi-seed run, to keep ``data/models`` small); None: all of them
    ship_select: Optional[Callable[[Mapping[str, Any], Mapping[str, Any]], Dict[str, Any]]] = None

    def __post_init__(self) -> None:
        if set(self.profiles) != {"quick", "medium", "full"}:
            raise ValueError(f"{self.name}: PROFILES must define quick, medium and full, got {sorted(self.profiles)}")
        if self.load_models is None:
            object.__setattr__(self, "load_models", load_registry_models)


def provenance(device: str, precision: str = "fp32") -> Dict[str, Any]:
    """Versions, platform and device of this process, and the ``precision`` the experiment trained with
    (``TrainConfig.precision``: "fp32" or "bf16")."""
    from ..train import PRECISIONS
    from ..utils import check_choice

    check_choice("provenance", "precision", precision, PRECISIONS)
    dev = resolve_device(device)
    info: Dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "device": str(dev),
                            "threads": torch.get_num_threads(), "precision": precision}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def envelope(name: str, profile: str, *, config: Dict[str, Any], tables: Dict[str, Any], claims: List[Any],
             device: str, started: float, models: Optional[Dict[str, Any]] = None, precision: str = "fp32",
             **extra: Any) -> Dict[str, Any]:
    """The record every experiment returns: ``experiment``, ``profile``, ``config``, ``tables``, ``claims``,
    any ``extra`` top-level entries (curves, timings...), ``provenance`` (with the ``precision`` the experiment
    trained with: pass what its ``TrainConfig.precision`` was) and ``wall_time_s`` (since ``started``, a
    ``time.perf_counter()`` value); ``models`` only when the caller asked to keep them."""
    rec: Dict[str, Any] = {"experiment": name, "profile": profile, "config": config, "tables": tables,
                           **extra, "claims": as_rows(claims), "provenance": provenance(device, precision),
                           "wall_time_s": round(time.perf_counter() - started, 2)}
    if models is not None:
        rec["models"] = models
    return rec


def load_registry_models(manifest: Mapping[str, Any], folder: Path, device: str = "cpu") -> Dict[str, Any]:
    """Every model card of a manifest rebuilt (:func:`causalir.experiments.shipping.rebuild`): registry models
    (``{"model": name, "config": {...}, "file": ...}``), the suite's toolbox / agent / Path-Restore networks
    (``{"kind": ..., "cfg": {...}}``) and masks."""
    from .shipping import rebuild

    return {label: rebuild(m, Path(folder), device) for label, m in manifest.get("models", {}).items()}
