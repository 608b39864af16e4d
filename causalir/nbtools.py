"""Small helpers the notebooks share: parameter checking, result tables, image grids."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .experiments.plots import show_images  # noqa: F401  (re-exported for the notebooks)
from .experiments.profiles import check_profile
from .utils import resolve_device, seed_everything


def setup(profile: str = "quick", seed: int = 0, device: str = "auto", threads: Optional[int] = None) -> torch.device:
    """Validate the notebook parameters, seed everything and return the device."""
    check_profile(profile)
    seed_everything(int(seed))
    if threads:
        torch.set_num_threads(int(threads))
    try:  # claims read as sentences: show them whole
        import pandas as pd

        pd.set_option("display.max_colwidth", 160)
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    dev = resolve_device(device)
    print(f"profile={profile} seed={seed} device={dev} torch={torch.__version__}")
    return dev


def claims_frame(results: Dict[str, Any]):
    """The claims of a results record as a DataFrame: paper, ours, 95% interval, over what, tolerance, verdict
    and, for an inconclusive claim, why (the failed precondition)."""
    import pandas as pd

    cols = ["claim", "paper", "ours", "low", "high", "n", "over", "tolerance", "verdict", "why"]
    return pd.DataFrame(results.get("claims", []), columns=cols)


def headless() -> bool:
    """True when notebooks run unattended (papermill/nbval via ``make``; ``CAUSALIR_HEADLESS=1``)."""
    import os

    return os.environ.get("CAUSALIR_HEADLESS", "") not in ("", "0")


def interact(fn, **controls):
    """``ipywidgets.interact(fn, **controls)`` in a live notebook. Unattended (``CAUSALIR_HEADLESS=1``), call ``fn``
    once with each control's current value instead: nbclient can hang on Output widgets (jupyter/nbclient#312), and
    the figure then lands in the executed notebook as an ordinary output."""
    if not headless():
        import ipywidgets

        return ipywidgets.interact(fn, **controls)
    kwargs = {k: _default_value(v) for k, v in controls.items()}
    print("(headless run: the widget is shown as one call with its default values; "
          f"open the notebook in JupyterLab to move the controls) {fn.__name__}({kwargs})")
    fn(**kwargs)
    return None


def _default_value(control):
    """The value a control would start with, for widgets, (min, max[, step]) tuples, lists and scalars."""
    if hasattr(control, "value"):
        return control.value
    if isinstance(control, tuple) and len(control) in (2, 3) and all(isinstance(v, (int, float)) for v in control):
        lo, hi = control[:2]
        mid = (lo + hi) / 2
        return type(lo)(mid) if isinstance(lo, int) and isinstance(hi, int) else mid
    if isinstance(control, dict):
        return next(iter(control.values()))
    if isinstance(control, (list, tuple)):
        return control[0]
    return control
