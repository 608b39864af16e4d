"""Small helpers the notebooks share: parameter checking, result tables, image grids."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from .experiments import check_profile
from .utils import resolve_device, seed_everything


def setup(profile: str = "quick", seed: int = 0, device: str = "auto", threads: Optional[int] = None) -> torch.device:
    """Validate the notebook parameters, seed everything and return the device."""
    check_profile(profile)
    seed_everything(int(seed))
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    print(f"profile={profile} seed={seed} device={dev} torch={torch.__version__}")
    return dev


def claims_frame(results: Dict[str, Any]):
    """The claims of a results record as a DataFrame (paper, ours, ±, verdict)."""
    import pandas as pd

    cols = ["claim", "paper", "ours", "spread", "verdict", "note"]
    return pd.DataFrame(results.get("claims", []), columns=cols)


def show_images(images: Sequence[torch.Tensor], titles: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
                size: float = 3.0):
    """Plot (3,H,W) or (1,3,H,W) tensors in a row/grid; returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        t = img[0] if img.dim() == 4 else img
        axes.flat[i].imshow(t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        if titles is not None:
            axes.flat[i].set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return fig
