"""Images: the photographs bundled with scikit-image (the embedded default data), any folder of images,
standard benchmarks downloaded only on request, and a vectorised patch sampler that yields batches on the device."""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .paths import cache_dir
from .registry import Registry
from .utils import PathLike, atomic_write_bytes, atomic_write_json, check_images, check_number, resolve_device

# name -> (skimage.data function, split, is_colour). Documented in data/README.md; never change a split silently.
EMBEDDED: Dict[str, Tuple[str, str, bool]] = {
    "astronaut": ("astronaut", "train", True),
    "coffee": ("coffee", "train", True),
    "hubble_deep_field": ("hubble_deep_field", "train", True),
    "immunohistochemistry": ("immunohistochemistry", "train", True),
    "retina": ("retina", "train", True),
    "camera": ("camera", "train", False),
    "brick": ("brick", "train", False),
    "grass": ("grass", "train", False),
    "gravel": ("gravel", "train", False),
    "moon": ("moon", "train", False),
    "rocket": ("rocket", "val", True),
    "coins": ("coins", "val", False),
    "chelsea": ("chelsea", "test", True),
    "motorcycle_left": ("stereo_motorcycle", "test", True),
    "motorcycle_right": ("stereo_motorcycle", "test", True),
}
SPLITS = ("train", "val", "test", "all")


def _check_path(owner: str, field: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{owner}: {field}: expected a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)


def _check_side(owner: str, max_side: Any) -> None:
    if max_side is not None:
        check_number(owner, "max_side", max_side, lo=1, integer=True)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H,W[,C]) array -> float (3,H,W) in [0,1]; grey is replicated to RGB, alpha dropped."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"to_tensor: arr: expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an image array (H,W), (H,W,3) or (H,W,4), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"to_tensor: arr: expected an image of at least 1x1 pixels, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float() / 255.0


def _array_to_tensor(arr: np.ndarray, what: str) -> torch.Tensor:
    """Decoded pixels of any supported depth -> (3,H,W) float in [0, 1]: uint8 / 255 (as ``to_tensor``),
    uint16 / 65535, floats as they are (finite and in [0, 1]); grey is replicated, alpha dropped; other depths
    and layouts are refused."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"could not load {what}: expected pixels (H,W), (H,W,1), (H,W,3) or (H,W,4), got shape "
                         f"{arr.shape} (planar or multi-band images are not supported)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"could not load {what}: expected an image of at least 1x1 pixels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return to_tensor(arr)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        unit = arr.astype(np.float64) / 65535.0
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"could not load {what}: it has {int((~np.isfinite(arr)).sum())} NaN or infinite pixel "
                             "value(s); expected finite float pixels in [0, 1]")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"could not load {what}: expected float pixels in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                             "rescale it (e.g. divide 0-255 data by 255) or save it as an 8- or 16-bit image")
        unit = np.clip(arr.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"could not load {what}: {arr.dtype} pixels are not supported; expected 8- or 16-bit unsigned "
                         "integers or floats in [0, 1]")
    if unit.ndim == 2:
        unit = np.repeat(unit[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(unit[..., :3], dtype=np.float32)).permute(2, 0, 1).contiguous()


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Pillow modes whose convert("RGB") is exact (8 bits per channel); 16-bit colour PNG/TIFF also arrive as
# RGB/RGBA (Pillow keeps the high byte: correctly scaled, 8-bit precision).
_PIL_8BIT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_PIL_16BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def _read_tiff(path: Path) -> torch.Tensor:
    """The first page of a TIFF via tifffile (a scikit-image dependency)."""
    try:
        import tifffile
    except ImportError:
        raise ValueError(f"could not read image {path}: Pillow cannot decode this TIFF and tifffile is not "
                         "installed") from None
    try:
        arr = np.asarray(tifffile.imread(path, key=0))
    except Exception as e:  # tifffile raises many types for a bad file
        raise ValueError(f"could not read image {path}: not a readable TIFF ({type(e).__name__}: {e})") from None
    return _array_to_tensor(arr, f"image {path}")


def load_image(path: PathLike) -> torch.Tensor:
    """Read an image file as (3,H,W) float in [0,1], with a clear error when it cannot be read.
    8-bit images are divided by 255 and 16-bit grey by 65535 (16-bit colour PNGs are read by Pillow at 8-bit
    precision); 16-bit and float TIFFs are read exactly (floats must be finite and in [0, 1]); 32-bit integer
    images and multi-band layouts are refused."""
    path = _check_path("load_image", "path", path)
    if path.is_dir():
        raise IsADirectoryError(f"load_image: {path} is a folder, expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    what = f"image {path}"
    try:
        with Image.open(path) as im:
            # 16-bit and float TIFFs: tifffile reads the exact values (and the layouts Pillow does not know)
            if im.format == "TIFF" and (im.mode in _PIL_16BIT or im.mode == "F"):
                tiff = True
            else:
                tiff = False
                if im.mode in _PIL_16BIT or im.mode == "F":
                    return _array_to_tensor(np.asarray(im), what)
                if im.mode == "I" and im.format == "PNG":  # older Pillow opens 16-bit grey PNG as 32-bit "I"
                    return _array_to_tensor(np.asarray(im).astype(np.uint16), what)
                if im.mode not in _PIL_8BIT:
                    raise ValueError(f"could not load {what}: Pillow mode {im.mode!r} (e.g. 32-bit integer pixels) "
                                     "is not supported; expected 8- or 16-bit integer or float pixels")
                arr = np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise ValueError(f"could not read {what}: it is larger than Pillow's decompression-bomb limit "
                         f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {e}") from None
    except PermissionError:
        raise PermissionError(f"could not read {what}: permission denied") from None
    except UnidentifiedImageError as e:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _read_tiff(path)
        raise ValueError(f"could not read image {path}: expected one of {', '.join(IMAGE_EXTS)} ({e})") from None
    except OSError as e:
        raise ValueError(f"could not read image {path}: expected one of {', '.join(IMAGE_EXTS)} ({e})") from None
    if tiff:
        return _read_tiff(path)
    return to_tensor(arr)


# suffix -> (Pillow format, save options). WebP is written lossless so the saved pixels are the computed ones;
# GIF is refused (a 256-colour palette would change the pixels).
SAVE_FORMATS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    ".png": ("PNG", {}), ".jpg": ("JPEG", {}), ".jpeg": ("JPEG", {}), ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {}), ".tiff": ("TIFF", {}), ".webp": ("WEBP", {"lossless": True}),
}


def save_image(img: torch.Tensor, path: PathLike, *, overwrite: bool = False) -> None:
    """Write a (3,H,W) image in [0,1] atomically in the format its suffix names (``SAVE_FORMATS``: PNG, JPEG,
    BMP, TIFF, lossless WebP); other suffixes (GIF included) are refused. Refuses to overwrite unless asked."""
    check_images(img, "img", batched=False)
    if min(img.shape[-2:]) == 0:
        raise ValueError(f"save_image: img: expected an image of at least 1x1 pixels, got shape {tuple(img.shape)}")
    path = _check_path("save_image", "path", path)
    if not isinstance(overwrite, (bool, np.bool_)):
        raise TypeError(f"save_image.overwrite: expected True or False, got {overwrite!r}")
    if path.is_dir():
        raise IsADirectoryError(f"save_image: {path} is a folder, expected an image file name")
    suffix = path.suffix.lower()
    if suffix == ".gif":
        raise ValueError(f"save_image: cannot save {path} as GIF: GIF stores at most 256 colours, so the pixels "
                         f"would change; use one of {', '.join(SAVE_FORMATS)}")
    if suffix not in SAVE_FORMATS:
        raise ValueError(f"save_image: cannot tell the image format of {path} from its suffix {suffix!r}; "
                         f"expected one of {', '.join(SAVE_FORMATS)}")
    fmt, options = SAVE_FORMATS[suffix]
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        raise ValueError(f"save_image: cannot save {path}: this Pillow has no WebP support; use .png")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    arr = (img.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **options)
    atomic_write_bytes(path, buf.getvalue())


def embedded_names(split: str = "train") -> List[str]:
    """Names of the bundled photos in a split (``train``, ``val``, ``test`` or ``all``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return [n for n, (_, s, _) in EMBEDDED.items() if split in (s, "all")]


def embedded_image(name: str) -> torch.Tensor:
    """One bundled photo as (3,H,W) float in [0,1]."""
    import skimage.data as skd

    if not isinstance(name, str) or name not in EMBEDDED:
        raise KeyError(f"unknown embedded image {name!r}; valid names: {', '.join(EMBEDDED)}")
    fn, _, _ = EMBEDDED[name]
    arr = getattr(skd, fn)()
    if fn == "stereo_motorcycle":
        arr = arr[0] if name == "motorcycle_left" else arr[1]
    return to_tensor(arr)


def embedded_images(split: str = "train", *, max_side: Optional[int] = None) -> List[torch.Tensor]:
    """The scikit-image photos of a split, each (3,H,W) float in [0,1]; ``max_side`` centre-crops large ones."""
    _check_side("embedded_images", max_side)
    imgs = [embedded_image(n) for n in embedded_names(split)]
    return [center_crop(im, max_side) for im in imgs] if max_side else imgs


def center_crop(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """Centre crop so that neither side exceeds ``max_side``."""
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"center_crop: img: expected a torch.Tensor, got {type(img).__name__}")
    if img.dim() < 2 or min(img.shape[-2:]) == 0:
        raise ValueError(f"center_crop: img: expected an image (...,H,W) of at least 1x1 pixels, got shape "
                         f"{tuple(img.shape)}")
    check_number("center_crop", "max_side", max_side, lo=1, integer=True)
    h, w = img.shape[-2:]
    th, tw = min(h, max_side), min(w, max_side)
    t, l = (h - th) // 2, (w - tw) // 2
    return img[..., t:t + th, l:l + tw]


def folder_images(path: PathLike, *, max_side: Optional[int] = None) -> List[torch.Tensor]:
    """Every image file in a folder (sorted by name) as (3,H,W) float tensors."""
    path = _check_path("folder_images", "path", path)
    _check_side("folder_images", max_side)
    if not path.is_dir():
        raise NotADirectoryError(f"not a folder of images: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in {path}")
    imgs = [load_image(p) for p in files]
    return [center_crop(im, max_side) for im in imgs] if max_side else imgs


# ------------------------------------------------------------------------------------------ benchmarks
@dataclass(frozen=True)
class Benchmark:
    """A standard test set: where it comes from and how to check it. ``sha256`` is a digest the source publishes;
    None where it publishes none (every source below today: GitHub branch archives are regenerated and carry no
    digest, the Hugging Face and ETH pages list none): then the first download that passes the contents check
    records its digest in the cache (trust on first use) and later downloads must match it."""

    name: str
    url: str
    sha256: Optional[str]
    subdir: str
    description: str


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def _bench(name: str, url: str, subdir: str, description: str, sha256: Optional[str] = None) -> None:
    BENCHMARKS.register(name)(lambda: Benchmark(name, url, sha256, subdir, description))


_bench("CBSD68", "https://github.com/clausmichele/CBSD68-dataset/archive/refs/heads/master.zip",
       "CBSD68-dataset-master/CBSD68/original_png", "68 colour BSD test images (denoising)")
_bench("Kodak24", "https://github.com/MohamedBakrAli/Kodak-Lossless-True-Color-Image-Suite/archive/refs/heads/master.zip",
       "Kodak-Lossless-True-Color-Image-Suite-master/PhotoCD_PCD0992", "24 Kodak PhotoCD images")
_bench("McMaster", "https://github.com/cszn/FFDNet/archive/refs/heads/master.zip",
       "FFDNet-master/testsets/McMaster", "18 McMaster colour images (demosaicking/denoising)")
_bench("Set5", "https://github.com/lixinustc/Causal-IR-DIL/archive/refs/heads/main.zip",
       "Causal-IR-DIL-main/Set5/HR", "5 images (the DIL repo ships Set5/HR)")
_bench("Set14", "https://huggingface.co/datasets/eugenesiow/Set14/resolve/main/data/Set14_HR.tar.gz",
       "Set14_HR", "14 images (SR validation)")
_bench("Urban100", "https://huggingface.co/datasets/eugenesiow/Urban100/resolve/main/data/Urban100_HR.tar.gz",
       "Urban100_HR", "100 urban scenes")
_bench("DIV2K", "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip", "DIV2K_valid_HR",
       "DIV2K validation HR (100 images)")

LOCK_NAME = "sha256.json"
_STAGING = ".download-"
URL_SCHEMES = ("https", "http", "file")


def benchmark_names() -> List[str]:
    return BENCHMARKS.names()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into the new file ``dest``. The one place that touches the network (tests replace it)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as fh:
        shutil.copyfileobj(resp, fh, 1 << 20)
        fh.flush()
        os.fsync(fh.fileno())


def _fetch_checked(name: str, src: str, dest: Path, timeout: float, folder: Path) -> None:
    """``_fetch`` with its failures told apart: missing (404 / no such file), offline, server error, local disk."""
    by_hand = f"download the archive by hand, unpack it so that the images are in {folder}, and retry"
    try:
        _fetch(src, dest, timeout)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(f"could not download {name}: {src} answered HTTP {e.code} ({e.reason}): the "
                                    f"archive is not there (moved or removed); pass url= a current copy or "
                                    f"{by_hand}") from None
        raise ConnectionError(f"could not download {name}: {src} answered HTTP {e.code} ({e.reason}); retry "
                              f"later or {by_hand}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, FileNotFoundError):
            raise FileNotFoundError(f"could not download {name}: no such file {src} ({reason.strerror})") from None
        if isinstance(reason, PermissionError):
            raise PermissionError(f"could not download {name}: permission denied reading {src}") from None
        if isinstance(reason, OSError):  # DNS failure, refused, unreachable, timed out
            raise ConnectionError(f"could not download {name} from {src} ({reason}). You seem to be offline or the "
                                  f"server is unreachable: {by_hand}.") from None
        raise ConnectionError(f"could not download {name} from {src} ({reason}); {by_hand}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise ConnectionError(f"the download of {name} from {src} broke off ({type(e).__name__}: {e}); you may be "
                              f"offline or the server slow: retry, or {by_hand}") from None
    except OSError as e:  # the local side: disk full, permissions
        raise OSError(f"could not write the download of {name} to {dest.parent}: {e}") from None


def _check_member(name: str, member: str) -> None:
    n = member.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        raise ValueError(f"{name}: refusing the archive: member {member!r} has an absolute path; nothing was kept")
    if ".." in n.split("/"):
        raise ValueError(f"{name}: refusing the archive: member {member!r} points outside the folder ('..'); "
                         "nothing was kept")


def _safe_extract(name: str, archive: Path, dest: Path) -> None:
    """Unpack a zip or tar into ``dest``, refusing absolute or '..' member names, links and special files
    (devices, FIFOs); tars are extracted with the ``data`` filter besides."""
    dest.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(name, info.filename)
                    kind = stat.S_IFMT(info.external_attr >> 16)
                    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                        what = "a symbolic link" if kind == stat.S_IFLNK else "a device or other special file"
                        raise ValueError(f"{name}: refusing the archive: member {info.filename!r} is {what}; "
                                         "nothing was kept")
                zf.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for m in tf.getmembers():
                    _check_member(name, m.name)
                    if not (m.isfile() or m.isdir()):
                        what = ("a symbolic link" if m.issym() else "a hard link" if m.islnk() else
                                "a device" if (m.ischr() or m.isblk()) else "a FIFO" if m.isfifo() else
                                "a special file")
                        raise ValueError(f"{name}: refusing the archive: member {m.name!r} is {what}; nothing "
                                         "was kept")
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:  # Python without extraction filters: the checks above already refuse what it would
                    tf.extractall(dest)
        else:
            raise ValueError(f"{name}: the download is neither a zip nor a tar archive; nothing was kept")
    except getattr(tarfile, "FilterError", ()) as e:
        raise ValueError(f"{name}: refusing the archive: {e}; nothing was kept") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{name}: the archive is corrupt ({type(e).__name__}: {e}); nothing was kept") from None


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there: treat every owner as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_staging(target: Path) -> None:
    """Staging folders of downloads whose process died (killed mid-download) are removed on the next start."""
    for p in target.glob(_STAGING + "*"):
        m = re.match(re.escape(_STAGING) + r"(\d+)-", p.name)
        if p.is_dir() and m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _pinned(name: str, bench: Benchmark, lock: Path) -> Tuple[Optional[str], str]:
    """The digest the archive must have and where it comes from."""
    if bench.sha256 is not None:
        return bench.sha256, "published by the source and pinned in causalir"
    if not lock.exists():
        return None, ""
    try:
        rec = json.loads(lock.read_text())
        digest = rec["sha256"]
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ValueError(digest)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{name}: the recorded digest file {lock} is unreadable or malformed ({e!r}); delete it "
                         "to download again (trust on first use)") from None
    return digest, f"recorded in {lock} at the first download (trust on first use: the source publishes none)"


def download(name: str, *, root: Optional[PathLike] = None, url: Optional[str] = None, timeout: float = 60) -> Path:
    """Download and unpack a benchmark into ``root`` (default the cache); only ever called explicitly.
    Verifies sha256 (published and pinned, else recorded at the first download: trust on first use), unpacks
    zip/tar safely (no links, devices, absolute or '..' members), checks that the images are there, and only
    then records the digest and moves the images into place. A failed download leaves nothing on disk.
    Returns the image folder."""
    bench = BENCHMARKS.build(name)
    check_number("download", "timeout", timeout, lo=0, lo_open=True)
    if url is not None:
        if not isinstance(url, str):
            raise TypeError(f"download: url: expected a str, got {type(url).__name__}")
        if urllib.parse.urlsplit(url).scheme not in URL_SCHEMES:
            raise ValueError(f"download: url: expected a {'/'.join(URL_SCHEMES)} URL, got {url!r}")
    root = _check_path("download", "root", root) if root is not None else cache_dir() / "benchmarks"
    target = root / name
    folder = target / bench.subdir
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    src = url if url is not None else bench.url
    created = []  # folders this call creates: removed again (when empty) after a failure, deepest first
    p = target
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(target)
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=target))
    except OSError as e:
        raise OSError(f"download {name}: cannot write to the benchmark cache {target}: {e}") from None
    lock = target / LOCK_NAME
    ok = pinned_now = False
    try:
        archive = staging / "archive"
        _fetch_checked(name, src, archive, timeout, folder)
        digest = _sha256(archive)
        expected, origin = _pinned(name, bench, lock)
        if expected is not None and digest != expected:
            raise ValueError(f"checksum mismatch for {name}: expected sha256 {expected} ({origin}), got {digest}; "
                             f"nothing was kept. The source may have changed or the download is not the archive: "
                             f"check it, then delete {lock} to re-pin.")
        unpacked = staging / "unpacked"
        _safe_extract(name, archive, unpacked)
        sub = unpacked / bench.subdir
        if not sub.is_dir() or not any(p.suffix.lower() in IMAGE_EXTS for p in sub.iterdir()):
            raise ValueError(f"{name}: the archive from {src} has no images ({', '.join(IMAGE_EXTS)}) in "
                             f"{bench.subdir}; nothing was kept and no digest was recorded")
        # The contents check passed: only now pin a first-use digest, then move the images into place.
        first_use = bench.sha256 is None and expected is None
        if first_use:
            atomic_write_json(lock, {"name": name, "url": src, "sha256": digest,
                                     "pinned": "trust on first use (the source publishes no sha256)"})
            pinned_now = True
        top = Path(bench.subdir).parts[0]
        dest = target / top
        if dest.exists() or dest.is_symlink():  # a stale partial folder (its images are missing): replace it
            os.replace(dest, staging / "stale")
        os.replace(unpacked / top, dest)
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            if pinned_now:
                lock.unlink(missing_ok=True)
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    pass
    if first_use:
        warnings.warn(f"{name}: the source publishes no sha256, so this first download was trusted as it is "
                      f"(trust on first use); its sha256 {digest} is recorded in {lock} and later downloads must "
                      "match it", stacklevel=2)
    return folder


def benchmark_images(name: str, *, root: Optional[PathLike] = None, max_side: Optional[int] = None) -> List[torch.Tensor]:
    """Images of a benchmark that has been downloaded before (never downloads)."""
    bench = BENCHMARKS.build(name)
    _check_side("benchmark_images", max_side)
    root = _check_path("benchmark_images", "root", root) if root is not None else cache_dir() / "benchmarks"
    folder = root / name / bench.subdir
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark {name} is not in {folder}; fetch it explicitly with "
                                f"causalir.data.download({name!r}) or `causalir download {name}`")
    return folder_images(folder, max_side=max_side)


# ---------------------------------------------------------------------------------------- patch sampler
class PatchSampler:
    """Random square patches from a list of images, with the 8 flips/rotations, sampled as one vectorised
    gather on the device. Images are kept as one padded uint8 stack; all randomness comes from ``generator``.
    ``images``: a list of (3,H,W) float tensors in [0, 1] (or one (N,3,H,W) tensor), each at least
    ``patch_size`` on both sides."""

    def __init__(self, images: Sequence[torch.Tensor], patch_size: int = 64, batch_size: int = 16,
                 device: str | torch.device = "auto", augment: bool = True) -> None:
        own = "PatchSampler"
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"{own}.images: expected a list of (3,H,W) tensors or one (N,3,H,W) tensor, got a "
                                 f"tensor of shape {tuple(images.shape)} (wrap a single image in a list)")
            images = list(images.unbind(0))
        elif isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
            raise TypeError(f"{own}.images: expected a list of (3,H,W) image tensors, got {type(images).__name__}")
        else:
            images = list(images)
        if not images:
            raise ValueError(f"{own}.images: expected at least one image, got none")
        check_number(own, "patch_size", patch_size, lo=1, integer=True)
        check_number(own, "batch_size", batch_size, lo=1, integer=True)
        if not isinstance(augment, (bool, np.bool_)):
            raise TypeError(f"{own}.augment: expected True or False, got {augment!r}")
        _check_device(own, device)
        for i, im in enumerate(images):
            check_images(im, f"images[{i}]", batched=False)
            if min(im.shape[-2:]) < patch_size:
                raise ValueError(f"images[{i}] of size {tuple(im.shape[-2:])} is smaller than patch_size={patch_size}")
        self.device = resolve_device(device)
        self.patch_size, self.batch_size, self.augment = int(patch_size), int(batch_size), augment
        hmax = max(im.shape[-2] for im in images)
        wmax = max(im.shape[-1] for im in images)
        stack = torch.zeros(len(images), 3, hmax, wmax, dtype=torch.uint8)
        for i, im in enumerate(images):
            stack[i, :, : im.shape[-2], : im.shape[-1]] = (im * 255).round().byte()
        self.stack = stack.to(self.device)
        self.sizes = torch.tensor([[im.shape[-2], im.shape[-1]] for im in images], device=self.device)
        # Sample images in proportion to the number of patch positions they hold.
        pos = (self.sizes[:, 0] - patch_size + 1) * (self.sizes[:, 1] - patch_size + 1)
        self.weights = pos.double() / pos.sum()
        self._ar = torch.arange(patch_size, device=self.device)

    def sample(self, generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None) -> torch.Tensor:
        """A batch (N,3,p,p) float in [0,1] on the sampler's device; ``generator`` must live on that device."""
        if batch_size is not None:
            check_number("PatchSampler.sample", "batch_size", batch_size, lo=1, integer=True)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"PatchSampler.sample: generator: expected a torch.Generator or None, got "
                                f"{type(generator).__name__}")
            if generator.device.type != self.device.type:
                raise ValueError(f"PatchSampler.sample: generator is on {generator.device} but the sampler is on "
                                 f"{self.device}; make it with causalir.utils.make_generator(seed, {str(self.device)!r})")
        n, p, dev = batch_size or self.batch_size, self.patch_size, self.device
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        hmax = (self.sizes[idx, 0] - p + 1).double()
        wmax = (self.sizes[idx, 1] - p + 1).double()
        top = (torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * hmax).long()
        left = (torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * wmax).long()
        rows = (top[:, None] + self._ar)[:, None, :, None]
        cols = (left[:, None] + self._ar)[:, None, None, :]
        ch = torch.arange(3, device=dev)[None, :, None, None]
        x = self.stack[idx[:, None, None, None], ch, rows, cols].float().div_(255.0)
        if self.augment:
            t = torch.randint(8, (n,), generator=generator, device=dev)
            x = _dihedral(x, t)
        return x


def _check_device(owner: str, device: Any) -> None:
    if isinstance(device, torch.device) or device is None or device == "auto":
        return
    if not isinstance(device, str):
        raise TypeError(f"{owner}.device: expected 'auto', a device name or a torch.device, got {type(device).__name__}")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"{owner}.device: expected 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device, "
                         f"got {device!r}") from None


def dihedral(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips/rotations per sample (t in 0..7: bit0 h-flip, bit1 v-flip, bit2 transpose).
    ``x``: (N,C,H,W) with H == W (a transpose must keep the shape); ``t``: N integers in 0..7."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"dihedral: x: expected a tensor (N,C,H,W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"dihedral: t: expected a 1-D integer tensor of {x.shape[0]} transforms (one per sample), "
                         f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"dihedral: t: expected integers in 0..7, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"dihedral: t is on {t.device} but x is on {x.device}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral: x: expected square images (the transpose must keep the shape), got "
                         f"{tuple(x.shape[-2:])}")
    if t.numel() and bool(((t < 0) | (t > 7)).any()):
        raise ValueError(f"dihedral: t: expected integers in 0..7, got range [{int(t.min())}, {int(t.max())}]")
    return _dihedral(x, t)


def _dihedral(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    m = lambda b: ((t >> b) & 1).bool().view(-1, 1, 1, 1)  # noqa: E731
    x = torch.where(m(0), x.flip(-1), x)
    x = torch.where(m(1), x.flip(-2), x)
    return torch.where(m(2), x.transpose(-1, -2), x)
