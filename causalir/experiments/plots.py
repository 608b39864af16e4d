"""Figure helpers the experiment modules and notebooks share (nbtools re-exports them)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


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
