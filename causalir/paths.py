"""Where things live: the repository's committed data, the ignored artifacts folder, the download cache."""
from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout holding this package (falls back to the current directory for an installed wheel)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    return Path.cwd()


def artifacts_dir() -> Path:
    """Ignored outputs of runs (``$CAUSALIR_ARTIFACTS`` or ``<repo>/artifacts``)."""
    p = Path(os.environ.get("CAUSALIR_ARTIFACTS", repo_root() / "artifacts"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def results_dir() -> Path:
    """Committed result files that notebooks render (``<repo>/data/results``)."""
    return repo_root() / "data" / "results"


def cache_dir() -> Path:
    """Download cache (``$CAUSALIR_CACHE`` or ``~/.cache/causalir``)."""
    return Path(os.environ.get("CAUSALIR_CACHE", Path.home() / ".cache" / "causalir"))


def models_dir() -> Path:
    """Committed weights of trained models that notebooks load (``<repo>/data/models``)."""
    return repo_root() / "data" / "models"


def studies_dir() -> Path:
    """Committed resumable studies: each finished unit's results and weights (``<repo>/data/studies``)."""
    return repo_root() / "data" / "studies"
