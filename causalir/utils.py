"""Small shared helpers: device choice, seeding, input validation, atomic writes."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is passed to ``torch.device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def check_images(x: Any, name: str = "images", *, batched: bool = True, channels: int | None = 3,
                 check_range: bool = True) -> torch.Tensor:
    """Validate a float image tensor in [0, 1] of shape (N,C,H,W) (or (C,H,W) when ``batched`` is False)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    want = 4 if batched else 3
    layout = "(N,C,H,W)" if batched else "(C,H,W)"
    if x.dim() != want:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor in [0, 1], got dtype {x.dtype} "
                        "(convert uint8 images with x.float() / 255)")
    if channels is not None and x.shape[-3] != channels:
        raise ValueError(f"{name}: expected {channels} channels at dim -3 of {layout}, got shape {tuple(x.shape)}")
    if check_range and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3 or not np.isfinite(lo + hi):
            raise ValueError(f"{name}: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------ field checks
def check_number(owner: str, field: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False, integer: bool = False,
                 allow_none: bool = False) -> Any:
    """Validate one numeric config field; the error names ``owner.field``, the value and the valid range.

    ``lo``/``hi`` bound the value (inclusive unless ``lo_open``/``hi_open``); ``integer`` requires an int (bools
    are refused); NaN and infinities are always refused. Returns ``value`` unchanged."""
    if value is None and allow_none:
        return value
    what = "an integer" if integer else "a number"
    lo_s = "" if lo is None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
    hi_s = "" if hi is None else (f"< {hi:g}" if hi_open else f"<= {hi:g}")
    rng = " and ".join(s for s in (lo_s, hi_s) if s)
    expected = what + (f" {rng}" if rng else "") + (" or None" if allow_none else "")
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not ok_type:
        raise (TypeError if not isinstance(value, (int, float, np.number)) else ValueError)(
            f"{owner}.{field}: expected {expected}, got {value!r}")
    v = float(value)
    bad = not np.isfinite(v)
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v >= hi if hi_open else v > hi
    if bad:
        raise ValueError(f"{owner}.{field}: expected {expected}, got {value!r}")
    return value


def check_choice(owner: str, field: str, value: Any, choices: Any) -> Any:
    """Validate a field that takes one of ``choices``; the error names the field, the value and the choices."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}.{field}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
