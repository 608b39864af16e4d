"""Model x image set x distortion levels -> a tidy table (one row per method, distortion and image).

Every distorted input is generated from a seed derived from (seed, distortion index, image index), so every
method sees exactly the same noisy inputs."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import pandas as pd
import torch
import torch.nn as nn

from .distortions import Distortion, check_size
from .metrics import psnr, ssim
from .utils import check_images, check_number, make_generator, resolve_device

Restorer = Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def _check_images(owner: str, images) -> list:
    """A non-empty sequence of (3,H,W) float images in [0, 1] (a (N,3,H,W) batch counts as N images)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"{owner}: images: expected a sequence of (3,H,W) tensors or an (N,3,H,W) batch, got a "
                             f"tensor of shape {tuple(images.shape)}")
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"{owner}: images: expected a sequence of (3,H,W) tensors, got {type(images).__name__}")
    if not images:
        raise ValueError(f"{owner}: expected at least one image")
    for i, img in enumerate(images):
        check_images(img, f"{owner}: images[{i}]", batched=False)
        check_size(img[None], f"{owner}: images[{i}]")
    return list(images)


def _check_distortions(owner: str, distortions) -> None:
    if not isinstance(distortions, Mapping) or not distortions:
        raise ValueError(f"{owner}: distortions: expected a non-empty mapping label -> Distortion, got {distortions!r}")
    for label, d in distortions.items():
        if not isinstance(d, Distortion):
            raise TypeError(f"{owner}: distortions[{label!r}]: expected a Distortion, got {type(d).__name__}")


def distorted_inputs(images: Sequence[torch.Tensor], distortions: Mapping[str, Distortion], seed: int = 0,
                     device: str | torch.device = "cpu") -> dict[tuple[str, int], torch.Tensor]:
    """The seeded distorted copy (1,3,H,W) of every image under every distortion, keyed (label, image index)."""
    images = _check_images("distorted_inputs", images)
    _check_distortions("distorted_inputs", distortions)
    check_number("distorted_inputs", "seed", seed, integer=True)
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
    images = _check_images("evaluate", images)
    _check_distortions("evaluate", distortions)
    check_number("evaluate", "seed", seed, integer=True)
    check_number("evaluate", "crop_border", crop_border, lo=0, integer=True)
    small = min(min(img.shape[-2:]) for img in images)
    if 2 * crop_border >= small:
        raise ValueError(f"evaluate.crop_border: expected < min(H, W) / 2 = {small / 2:g} (the smallest image is "
                         f"{small} px), got {crop_border}")
    if not isinstance(models, Mapping):
        raise TypeError(f"evaluate: models: expected a mapping name -> model or callable, got {type(models).__name__}")
    for name, m in models.items():
        if not callable(m):
            raise TypeError(f"evaluate: models[{name!r}]: expected an nn.Module or a callable, got {type(m).__name__}")
    if include_input not in (True, False):
        raise ValueError(f"evaluate.include_input: expected True or False, got {include_input!r}")
    if include_input and "input" in models:
        raise ValueError("evaluate: a model is named 'input', which include_input=True uses for the distorted input; "
                         "rename it or pass include_input=False")
    if not include_input and not models:
        raise ValueError("evaluate: expected at least one model (or include_input=True)")
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
                y = model(x)
                if not isinstance(y, torch.Tensor) or y.shape != gt.shape:
                    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(f"evaluate: method {method!r} returned {got} for an input of shape "
                                     f"{tuple(x.shape)}; expected the clean image's shape {tuple(gt.shape)}")
                y = y.float().clamp(0, 1)
                rows.append({"method": method, "distortion": label, "image": names[i],
                             "psnr": psnr(y, gt, crop_border=crop_border),
                             "ssim": ssim(y, gt, crop_border=crop_border)})
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, metric: str = "psnr") -> pd.DataFrame:
    """Mean over images: rows = method, columns = distortion (in first-seen order)."""
    for col in ("method", "distortion"):
        if not isinstance(df, pd.DataFrame) or col not in df.columns:
            raise ValueError(f"summarize: expected a table from evaluate() with columns method, distortion, psnr, ssim; "
                             f"got {type(df).__name__} without {col!r}")
    if not isinstance(metric, str) or metric not in df.columns:
        raise KeyError(f"unknown metric {metric!r}; valid: psnr, ssim")
    order = list(dict.fromkeys(df["distortion"]))
    morder = list(dict.fromkeys(df["method"]))
    t = df.pivot_table(index="method", columns="distortion", values=metric, aggfunc="mean")
    return t.loc[morder, order]
