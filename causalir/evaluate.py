"""Model x image set x distortion levels -> a tidy table (one row per method, distortion and image).

Every distorted input is generated from a seed derived from (seed, distortion index, image index), so every
method sees exactly the same noisy inputs."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import pandas as pd
import torch
import torch.nn as nn

from .distortions import Distortion
from .metrics import psnr, ssim
from .utils import make_generator, resolve_device

Restorer = Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def distorted_inputs(images: Sequence[torch.Tensor], distortions: Mapping[str, Distortion], seed: int = 0,
                     device: str | torch.device = "cpu") -> dict[tuple[str, int], torch.Tensor]:
    """The seeded distorted copy (1,3,H,W) of every image under every distortion, keyed (label, image index)."""
    dev = resolve_device(device)
    out = {}
    for j, (label, d) in enumerate(distortions.items()):
        for i, img in enumerate(images):
            g = make_generator(seed * 1_000_003 + 1009 * j + i, dev)
            out[(label, i)] = d(img[None].to(dev), g)
    return out


def evaluate(models: Mapping[str, Restorer], images: Sequence[torch.Tensor], distortions: Mapping[str, Distortion],
             *, seed: int = 0, crop_border: int = 0, device: str | torch.device = "auto",
             image_names: Optional[Sequence[str]] = None, include_input: bool = True) -> pd.DataFrame:
    """PSNR/SSIM of each model on each distorted image. Columns: method, distortion, image, psnr, ssim.
    With ``include_input`` the distorted input itself is scored as method ``input``."""
    if not images:
        raise ValueError("evaluate: expected at least one image")
    dev = resolve_device(device)
    names = list(image_names) if image_names is not None else [str(i) for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"image_names has {len(names)} entries for {len(images)} images")
    inputs = distorted_inputs(images, distortions, seed, dev)
    rows = []
    methods: dict[str, Restorer] = ({"input": lambda x: x} if include_input else {}) | dict(models)
    for method, model in methods.items():
        if isinstance(model, nn.Module):
            model.eval().to(dev)
        with torch.no_grad():
            for (label, i), x in inputs.items():
                gt = images[i][None].to(dev)
                y = model(x).float().clamp(0, 1)
                rows.append({"method": method, "distortion": label, "image": names[i],
                             "psnr": psnr(y, gt, crop_border=crop_border),
                             "ssim": ssim(y, gt, crop_border=crop_border)})
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, metric: str = "psnr") -> pd.DataFrame:
    """Mean over images: rows = method, columns = distortion (in first-seen order)."""
    if metric not in df.columns:
        raise KeyError(f"unknown metric {metric!r}; valid: psnr, ssim")
    order = list(dict.fromkeys(df["distortion"]))
    morder = list(dict.fromkeys(df["method"]))
    t = df.pivot_table(index="method", columns="distortion", values=metric, aggfunc="mean")
    return t.loc[morder, order]
