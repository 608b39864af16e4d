"""Images: the photographs bundled with scikit-image (the embedded default data), any folder of images,
standard benchmarks downloaded only on request, and a vectorised patch sampler that yields batches on the device."""
from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .paths import cache_dir
from .registry import Registry
from .utils import PathLike, atomic_write_bytes, atomic_write_json, check_images, resolve_device

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


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H,W[,C]) array -> float (3,H,W) in [0,1]; grey is replicated to RGB, alpha dropped."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an image array (H,W), (H,W,3) or (H,W,4), got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float() / 255.0


def embedded_names(split: str = "train") -> List[str]:
    """Names of the bundled photos in a split (``train``, ``val``, ``test`` or ``all``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return [n for n, (_, s, _) in EMBEDDED.items() if split in (s, "all")]


def embedded_image(name: str) -> torch.Tensor:
    """One bundled photo as (3,H,W) float in [0,1]."""
    import skimage.data as skd

    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded image {name!r}; valid names: {', '.join(EMBEDDED)}")
    fn, _, _ = EMBEDDED[name]
    arr = getattr(skd, fn)()
    if fn == "stereo_motorcycle":
        arr = arr[0] if name == "motorcycle_left" else arr[1]
    return to_tensor(arr)


def embedded_images(split: str = "train", *, max_side: Optional[int] = None) -> List[torch.Tensor]:
    """The scikit-image photos of a split, each (3,H,W) float in [0,1]; ``max_side`` centre-crops large ones."""
    imgs = [embedded_image(n) for n in embedded_names(split)]
    return [center_crop(im, max_side) for im in imgs] if max_side else imgs


def center_crop(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """Centre crop so that neither side exceeds ``max_side``."""
    h, w = img.shape[-2:]
    th, tw = min(h, max_side), min(w, max_side)
    t, l = (h - th) // 2, (w - tw) // 2
    return img[..., t:t + th, l:l + tw]


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_image(path: PathLike) -> torch.Tensor:
    """Read an image file as (3,H,W) float in [0,1], with a clear error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"could not read image {path}: expected one of {', '.join(IMAGE_EXTS)} ({e})") from None
    return to_tensor(arr)


def save_image(img: torch.Tensor, path: PathLike, *, overwrite: bool = False) -> None:
    """Write a (3,H,W) image in [0,1] as PNG/JPEG atomically; refuses to overwrite unless asked."""
    check_images(img, "img", batched=False)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    arr = (img.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    import io

    buf = io.BytesIO()
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(arr).save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


def folder_images(path: PathLike, *, max_side: Optional[int] = None) -> List[torch.Tensor]:
    """Every image file in a folder (sorted by name) as (3,H,W) float tensors."""
    path = Path(path)
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
    """A standard test set: where it comes from and how to check it. ``sha256`` None = not pinned yet
    (the first download records the digest in the cache and later downloads must match it)."""

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


def benchmark_names() -> List[str]:
    return BENCHMARKS.names()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, *, root: Optional[PathLike] = None, url: Optional[str] = None, timeout: float = 60) -> Path:
    """Download and unpack a benchmark into ``root`` (default the cache); only ever called explicitly.
    Verifies sha256 (pinned, or recorded at first download); returns the image folder."""
    bench = BENCHMARKS.build(name)
    root = Path(root) if root is not None else cache_dir() / "benchmarks"
    target = root / name
    folder = target / bench.subdir
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    target.mkdir(parents=True, exist_ok=True)
    src = url or bench.url
    archive = target / ("archive" + "".join(Path(src).suffixes[-2:]))
    try:
        with urllib.request.urlopen(src, timeout=timeout) as resp:
            atomic_write_bytes(archive, resp.read())
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"could not download {name} from {src} ({e}). You seem to be offline: download the "
                              f"archive by hand, unpack it so that the images are in {folder}, and retry.") from None
    digest = _sha256(archive)
    lock = target / "sha256.json"
    expected = bench.sha256
    if expected is None and lock.exists():
        import json

        expected = json.loads(lock.read_text()).get("sha256")
    if expected is not None and digest != expected:
        archive.unlink()
        raise ValueError(f"checksum mismatch for {name}: expected sha256 {expected}, got {digest}; the archive was "
                         "removed. The source may have changed: check it, then delete sha256.json to re-pin.")
    atomic_write_json(lock, {"name": name, "url": src, "sha256": digest})
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    else:
        shutil.unpack_archive(str(archive), str(target))
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: unpacked archive has no folder {bench.subdir} under {target}")
    return folder


def benchmark_images(name: str, *, root: Optional[PathLike] = None, max_side: Optional[int] = None) -> List[torch.Tensor]:
    """Images of a benchmark that has been downloaded before (never downloads)."""
    bench = BENCHMARKS.build(name)
    root = Path(root) if root is not None else cache_dir() / "benchmarks"
    folder = root / name / bench.subdir
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark {name} is not in {folder}; fetch it explicitly with "
                                f"causalir.data.download({name!r}) or `causalir download {name}`")
    return folder_images(folder, max_side=max_side)


# ---------------------------------------------------------------------------------------- patch sampler
class PatchSampler:
    """Random square patches from a list of images, with the 8 flips/rotations, sampled as one vectorised
    gather on the device. Images are kept as one padded uint8 stack; all randomness comes from ``generator``."""

    def __init__(self, images: Sequence[torch.Tensor], patch_size: int = 64, batch_size: int = 16,
                 device: str | torch.device = "auto", augment: bool = True) -> None:
        if not images:
            raise ValueError("PatchSampler: expected at least one image")
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
        """A batch (N,3,p,p) float in [0,1] on the sampler's device."""
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
            x = dihedral(x, t)
        return x


def dihedral(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips/rotations per sample (t in 0..7: bit0 h-flip, bit1 v-flip, bit2 transpose)."""
    m = lambda b: ((t >> b) & 1).bool().view(-1, 1, 1, 1)  # noqa: E731
    x = torch.where(m(0), x.flip(-1), x)
    x = torch.where(m(1), x.flip(-2), x)
    return torch.where(m(2), x.transpose(-1, -2), x)
