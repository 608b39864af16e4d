import numpy as np
import pytest
import torch

from causalir import data


def test_embedded_splits_disjoint_and_loaded():
    tr, va, te = (set(data.embedded_names(s)) for s in ("train", "val", "test"))
    assert tr and va and te and not (tr & va) and not (tr & te) and not (va & te)
    imgs = data.embedded_images("val")
    assert all(im.shape[0] == 3 and im.dtype == torch.float32 and 0 <= im.min() and im.max() <= 1 for im in imgs)
    with pytest.raises(ValueError, match="valid splits"):
        data.embedded_images("dev")


def test_folder_and_save_roundtrip(tmp_path):
    img = data.center_crop(data.embedded_image("chelsea"), 48)
    data.save_image(img, tmp_path / "a.png")
    with pytest.raises(FileExistsError):
        data.save_image(img, tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not read image"):
        data.folder_images(tmp_path)
    (tmp_path / "bad.png").unlink()
    out = data.folder_images(tmp_path)
    assert len(out) == 1 and torch.allclose(out[0], (img * 255).round() / 255)
    with pytest.raises(NotADirectoryError):
        data.folder_images(tmp_path / "missing")


def test_patch_sampler_vectorised_and_deterministic():
    imgs = [data.center_crop(data.embedded_image(n), 80) for n in ("astronaut", "coffee")]
    s = data.PatchSampler(imgs, patch_size=16, batch_size=32, device="cpu")
    a = s.sample(torch.Generator().manual_seed(3))
    b = s.sample(torch.Generator().manual_seed(3))
    assert a.shape == (32, 3, 16, 16) and torch.equal(a, b)
    # every patch is (a dihedral transform of) a real crop of one of the images
    patch = a[0]
    found = False
    for im in imgs:
        q = (im * 255).round() / 255
        for t in range(8):
            cand = data.dihedral(patch[None], torch.tensor([t]))[0]
            win = q.unfold(1, 16, 1).unfold(2, 16, 1)  # 3, H', W', 16, 16
            if ((win - cand[:, None, None]).abs().amax(dim=(0, 3, 4)) < 1e-6).any():
                found = True
    assert found
    with pytest.raises(ValueError, match="smaller than patch_size"):
        data.PatchSampler(imgs, patch_size=100)


def test_dihedral_group():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    outs = data.dihedral(x, torch.arange(8))
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8


def test_download_from_file_url(tmp_path):
    """The end-to-end path (more in tests/test_download.py): a local zip through a file:// URL."""
    import zipfile
    src = tmp_path / "x.png"
    data.save_image(torch.rand(3, 16, 16), src)
    z = tmp_path / "set5.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(src, "Causal-IR-DIL-main/Set5/HR/x.png")
    with pytest.warns(UserWarning, match="trust on first use"):
        folder = data.download("Set5", root=tmp_path / "cache", url=z.as_uri())
    assert len(data.folder_images(folder)) == 1
    assert len(data.benchmark_images("Set5", root=tmp_path / "cache")) == 1
    with pytest.raises(FileNotFoundError, match="download"):
        data.benchmark_images("Kodak24", root=tmp_path / "cache")


# ------------------------------------------------------------------------------ image files (defects 4, 6)
def _png16(path, arr):
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit colour): grey, grey+alpha, RGB or RGBA."""
    import struct
    import zlib
    arr = np.asarray(arr, dtype=">u2")
    c = 1 if arr.ndim == 2 else arr.shape[2]
    raw = b"".join(b"\x00" + arr[i].tobytes() for i in range(arr.shape[0]))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


U16 = {
    "ramp": lambda r: (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16),
    "dark": lambda r: r.integers(0, 256, (12, 10)).astype(np.uint16),  # all < 256: 8-bit conversion saturated
    "full": lambda r: r.integers(0, 65536, (12, 10)).astype(np.uint16),
    "white": lambda r: np.full((12, 10), 65535, np.uint16),
}


@pytest.mark.parametrize("pattern", sorted(U16))
@pytest.mark.parametrize("writer", ["pillow", "by_hand", "tiff"])
def test_16bit_grey_scaled_not_saturated(tmp_path, pattern, writer):
    import tifffile
    from PIL import Image
    arr = U16[pattern](np.random.default_rng(0))
    p = tmp_path / ("g.tif" if writer == "tiff" else "g.png")
    if writer == "pillow":
        Image.fromarray(arr).save(p)
    elif writer == "by_hand":
        _png16(p, arr)
    else:
        tifffile.imwrite(p, arr)
    t = data.load_image(p)
    want = torch.from_numpy(arr / 65535.0).float()
    assert t.shape == (3, 12, 10) and t.dtype == torch.float32
    assert all(torch.allclose(t[c], want, atol=1e-6, rtol=0) for c in range(3))


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_colour_png_scaled(tmp_path, channels):
    """16-bit colour PNGs reach 8-bit precision (Pillow keeps the high byte): scaled right, never saturated."""
    arr = np.random.default_rng(channels).integers(0, 65536, (9, 7, channels)).astype(np.uint16)
    t = data.load_image(_png16(tmp_path / "c.png", arr))
    rgb = arr[..., [0, 0, 0]] if channels == 2 else arr[..., :3]
    want = torch.from_numpy(rgb / 65535.0).permute(2, 0, 1).float()
    assert t.shape == (3, 9, 7) and (t - want).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(9, 7), (9, 7, 1), (9, 7, 3), (9, 7, 4)])
def test_float_tiff_loads_as_is(tmp_path, dtype, shape):
    import tifffile
    arr = np.random.default_rng(1).random(shape).astype(dtype)
    arr.flat[0], arr.flat[1] = 0.0, 1.0
    tifffile.imwrite(tmp_path / "f.tif", arr)
    t = data.load_image(tmp_path / "f.tif")
    a = arr.reshape(9, 7, -1).astype(np.float32)
    want = torch.from_numpy(np.repeat(a, 3, 2) if a.shape[2] == 1 else a[..., :3]).permute(2, 0, 1)
    assert t.shape == (3, 9, 7) and t.dtype == torch.float32 and torch.equal(t, want)


def test_tiff_first_page_and_8bit_tiff_unchanged(tmp_path):
    import tifffile
    from PIL import Image
    pages = np.random.default_rng(6).random((3, 8, 6, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "p.tif", pages, photometric="rgb")
    assert torch.equal(data.load_image(tmp_path / "p.tif"), torch.from_numpy(pages[0]).permute(2, 0, 1))
    arr = (np.random.default_rng(7).random((8, 6, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "u8.tif", arr, photometric="rgb")
    want = torch.from_numpy(np.asarray(Image.open(tmp_path / "u8.tif").convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(data.load_image(tmp_path / "u8.tif"), want.float() / 255.0)
    assert torch.equal(want, torch.from_numpy(arr).permute(2, 0, 1))


def test_float_tiff_via_pillow_mode_f(tmp_path):
    from PIL import Image
    arr = np.random.default_rng(2).random((6, 5)).astype(np.float32)
    Image.fromarray(arr).save(tmp_path / "f.tif")
    assert torch.equal(data.load_image(tmp_path / "f.tif")[2], torch.from_numpy(arr))


@pytest.mark.parametrize("how, msg", [
    ("x255", r"expected float pixels in \[0, 1\], got range"),
    ("negative", r"expected float pixels in \[0, 1\]"),
    ("slightly_over", r"expected float pixels in \[0, 1\]"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
    ("-inf", "NaN or infinite"),
    ("int32", "not supported"),
    ("int8", "not supported"),
    ("uint32", "not supported"),
    ("planar_2", "shape"),
    ("two_band", "shape"),
    ("five_band_u8", "shape"),
    ("two_band_u16", "shape"),
])
def test_unusable_tiffs_refused(tmp_path, how, msg):
    import tifffile
    r = np.random.default_rng(3)
    arr = {
        "x255": r.random((8, 8, 3)).astype(np.float32) * 255, "negative": r.random((8, 8)).astype(np.float32) - 0.5,
        "slightly_over": r.random((8, 8)).astype(np.float32) + 0.01,
        "nan": np.full((8, 8), np.nan, np.float32), "inf": np.full((8, 8, 3), np.inf, np.float32),
        "-inf": np.full((8, 8), -np.inf, np.float64),
        "int32": r.integers(0, 255, (8, 8)).astype(np.int32), "int8": r.integers(0, 100, (8, 8, 3)).astype(np.int8),
        "uint32": r.integers(0, 255, (8, 8, 3)).astype(np.uint32),
        "planar_2": r.random((2, 8, 6)).astype(np.float32), "two_band": r.random((8, 6, 2)).astype(np.float32),
        "five_band_u8": r.integers(0, 255, (8, 6, 5)).astype(np.uint8),  # Pillow: unidentified; tifffile reads it
        "two_band_u16": r.integers(0, 65535, (8, 6, 2)).astype(np.uint16),
    }[how]
    kw = {"photometric": "minisblack", "planarconfig": "separate" if how == "planar_2" else "contig"}
    tifffile.imwrite(tmp_path / "b.tif", arr, **kw)
    with pytest.raises(ValueError, match=msg):
        data.load_image(tmp_path / "b.tif")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK"])
def test_8bit_images_unchanged(tmp_path, mode):
    """8-bit files load exactly as before (Pillow's RGB conversion / 255)."""
    from PIL import Image
    arr = (np.random.default_rng(4).random((10, 9, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(arr).convert(mode)
    ext = ".jpg" if mode == "CMYK" else ".png"
    im.save(tmp_path / ("a" + ext))
    want = torch.from_numpy(np.asarray(Image.open(tmp_path / ("a" + ext)).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(data.load_image(tmp_path / ("a" + ext)), want.float() / 255.0)


@pytest.mark.parametrize("bad, kind, msg", [
    (3, TypeError, "path"), (None, TypeError, "path"), (["a.png"], TypeError, "path"),
    ("missing.png", FileNotFoundError, "not found"), (".", IsADirectoryError, "folder"),
    ("junk.png", ValueError, "could not read"), ("truncated.png", ValueError, "could not read"),
    ("junk.tif", ValueError, "could not (read|load)"),
])
def test_load_image_bad_paths(tmp_path, monkeypatch, bad, kind, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    data.save_image(torch.rand(3, 32, 32), tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:80])
    with pytest.raises(kind, match=msg):
        data.load_image(bad)


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    from PIL import Image
    data.save_image(torch.rand(3, 40, 40), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        data.load_image(tmp_path / "big.png")


@pytest.mark.parametrize("ext, fmt, exact", [(".png", "PNG", True), (".PNG", "PNG", True), (".bmp", "BMP", True),
                                             (".tif", "TIFF", True), (".tiff", "TIFF", True),
                                             (".webp", "WEBP", True), (".jpg", "JPEG", False),
                                             (".jpeg", "JPEG", False)])
def test_save_image_writes_the_suffix_format(tmp_path, ext, fmt, exact):
    from PIL import Image
    img = torch.rand(3, 11, 13, generator=torch.Generator().manual_seed(5))
    data.save_image(img, tmp_path / ("a" + ext))
    with Image.open(tmp_path / ("a" + ext)) as im:
        assert im.format == fmt
    back = data.load_image(tmp_path / ("a" + ext))
    q = (img * 255).round() / 255
    assert torch.equal(back, q) if exact else (back - q).abs().mean() < 0.2


@pytest.mark.parametrize("name, kind, msg", [
    ("a.gif", ValueError, "GIF"), ("a.GIF", ValueError, "GIF"), ("a.txt", ValueError, "suffix '.txt'"),
    ("noext", ValueError, "suffix ''"), ("a.jp2", ValueError, "suffix"), ("a.png.tmp", ValueError, "suffix"),
    ("sub", IsADirectoryError, "folder"),
])
def test_save_image_refuses_unknown_formats_and_writes_nothing(tmp_path, name, kind, msg):
    (tmp_path / "sub").mkdir()
    with pytest.raises(kind, match=msg):
        data.save_image(torch.rand(3, 8, 8), tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] and not any((tmp_path / "sub").iterdir())


@pytest.mark.parametrize("img, kind, msg", [
    (torch.rand(3, 0, 8), ValueError, "at least 1x1"), (torch.rand(3, 8, 0), ValueError, "at least 1x1"),
    (torch.full((3, 8, 8), float("nan")), ValueError, r"\[0, 1\]"), (torch.rand(3, 8, 8) * 255, ValueError, r"\[0, 1\]"),
    (torch.rand(1, 3, 8, 8), ValueError, "shape"), (torch.rand(8, 8), ValueError, "shape"),
    (torch.rand(1, 8, 8), ValueError, "channels"), ((torch.rand(3, 8, 8) * 255).byte(), TypeError, "floating"),
    (np.zeros((8, 8, 3)), TypeError, "torch.Tensor"),
])
def test_save_image_bad_images(tmp_path, img, kind, msg):
    with pytest.raises(kind, match=msg):
        data.save_image(img, tmp_path / "a.png")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kw, kind, msg", [({"overwrite": "yes"}, TypeError, "overwrite"),
                                           ({"overwrite": 1}, TypeError, "overwrite")])
def test_save_image_bad_options(tmp_path, kw, kind, msg):
    with pytest.raises(kind, match=msg):
        data.save_image(torch.rand(3, 8, 8), tmp_path / "a.png", **kw)
    with pytest.raises(TypeError, match="path"):
        data.save_image(torch.rand(3, 8, 8), 5)


@pytest.mark.parametrize("arr, kind, msg", [
    ([[1, 2]], TypeError, "numpy array"), (np.zeros((0, 5), np.uint8), ValueError, "at least 1x1"),
    (np.zeros((5, 0, 3), np.uint8), ValueError, "at least 1x1"), (np.zeros((4, 4, 2), np.uint8), ValueError, "shape"),
    (np.zeros((4,), np.uint8), ValueError, "shape"), (np.zeros((4, 4, 3), np.float32), TypeError, "uint8"),
    (np.zeros((4, 4, 3), np.uint16), TypeError, "uint8"),
])
def test_to_tensor_bad_arrays(arr, kind, msg):
    with pytest.raises(kind, match=msg):
        data.to_tensor(arr)


# ------------------------------------------------------------------------------ sizes and crops (defect 9)
BAD_SIDES = [(0, ValueError), (-3, ValueError), (2.5, ValueError), (True, ValueError), ("8", TypeError),
             (float("nan"), ValueError)]


@pytest.mark.parametrize("side, kind", BAD_SIDES)
def test_bad_max_side_everywhere(tmp_path, side, kind):
    data.save_image(torch.rand(3, 8, 8), tmp_path / "a.png")
    calls = [lambda: data.center_crop(torch.rand(3, 8, 8), side),
             lambda: data.embedded_images("val", max_side=side),
             lambda: data.folder_images(tmp_path, max_side=side),
             lambda: data.benchmark_images("Set5", root=tmp_path, max_side=side)]
    for call in calls:
        with pytest.raises(kind, match="max_side"):
            call()


@pytest.mark.parametrize("img, kind, msg", [
    (np.zeros((3, 8, 8)), TypeError, "torch.Tensor"), (torch.rand(8), ValueError, "at least 1x1"),
    (torch.rand(3, 0, 8), ValueError, "at least 1x1"), (torch.rand(3, 8, 0), ValueError, "at least 1x1"),
])
def test_center_crop_bad_images(img, kind, msg):
    with pytest.raises(kind, match=msg):
        data.center_crop(img, 4)


def test_center_crop_valid_sizes():
    img = torch.rand(2, 3, 9, 6)
    for side in (1, 5, 6, 9, 100):
        out = data.center_crop(img, side)
        assert out.shape[-2:] == (min(9, side), min(6, side)) and out.shape[:2] == (2, 3)
    assert data.center_crop(img, np.int64(4)).shape[-2:] == (4, 4)


@pytest.mark.parametrize("name", ["", "Chelsea", None, 3, ["chelsea"]])
def test_embedded_image_unknown(name):
    with pytest.raises(KeyError, match="valid names"):
        data.embedded_image(name)


def _imgs():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 20, 24, generator=g), torch.rand(3, 18, 18, generator=g)]


BAD_SAMPLERS = {
    "empty_list": (lambda: ([], {}), ValueError, "at least one image"),
    "empty_tuple": (lambda: ((), {}), ValueError, "at least one image"),
    "empty_tensor": (lambda: (torch.rand(0, 3, 20, 20), {}), ValueError, "at least one image"),
    "single_3d_tensor": (lambda: (torch.rand(3, 20, 20), {}), ValueError, "wrap a single image"),
    "not_iterable": (lambda: (5, {}), TypeError, "list of"),
    "a_string": (lambda: ("img.png", {}), TypeError, "list of"),
    "height_below_patch": (lambda: ([torch.rand(3, 15, 40)], {"patch_size": 16}), ValueError, "smaller than patch_size"),
    "width_below_patch": (lambda: ([torch.rand(3, 40, 15)], {"patch_size": 16}), ValueError, "smaller than patch_size"),
    "one_of_many_small": (lambda: (_imgs() + [torch.rand(3, 8, 8)], {"patch_size": 16}), ValueError, r"images\[2\]"),
    "zero_height": (lambda: ([torch.rand(3, 0, 20)], {"patch_size": 1}), ValueError, "smaller than patch_size"),
    "zero_width": (lambda: ([torch.rand(3, 20, 0)], {"patch_size": 1}), ValueError, "smaller than patch_size"),
    "nan_image": (lambda: ([torch.full((3, 20, 20), float("nan"))], {"patch_size": 8}), ValueError, r"\[0, 1\]"),
    "range_255": (lambda: ([torch.rand(3, 20, 20) * 255], {"patch_size": 8}), ValueError, r"\[0, 1\]"),
    "uint8_image": (lambda: ([(torch.rand(3, 20, 20) * 255).byte()], {"patch_size": 8}), TypeError, "floating"),
    "grey_image": (lambda: ([torch.rand(1, 20, 20)], {"patch_size": 8}), ValueError, "channels"),
    "2d_image": (lambda: ([torch.rand(20, 20)], {"patch_size": 8}), ValueError, "shape"),
    "numpy_image": (lambda: ([np.zeros((3, 20, 20))], {"patch_size": 8}), TypeError, "torch.Tensor"),
}
for _f, _v, _k in [("patch_size", 0, ValueError), ("patch_size", -4, ValueError), ("patch_size", 8.5, ValueError),
                   ("patch_size", True, ValueError), ("patch_size", None, TypeError), ("patch_size", "16", TypeError),
                   ("batch_size", 0, ValueError), ("batch_size", -1, ValueError), ("batch_size", 2.0, ValueError),
                   ("batch_size", None, TypeError), ("augment", "yes", TypeError), ("augment", 1, TypeError),
                   ("device", "gpu", ValueError), ("device", 3, TypeError)]:
    BAD_SAMPLERS[f"{_f}={_v!r}"] = ((lambda f=_f, v=_v: (_imgs(), {"patch_size": 8, f: v})), _k, f"PatchSampler.{_f}")


@pytest.mark.parametrize("case", sorted(BAD_SAMPLERS))
def test_patch_sampler_bad_inputs(case):
    make, kind, msg = BAD_SAMPLERS[case]
    images, kw = make()
    with pytest.raises(kind, match=msg):
        data.PatchSampler(images, **{"batch_size": 4, "device": "cpu", **kw})


def test_patch_sampler_accepts_batches_and_iterables():
    imgs = [torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ref = data.PatchSampler(imgs, 8, 5, "cpu").sample(torch.Generator().manual_seed(1))
    for images in (torch.stack(imgs), tuple(imgs), (im for im in imgs)):
        out = data.PatchSampler(images, 8, 5, "cpu").sample(torch.Generator().manual_seed(1))
        assert torch.equal(out, ref)
    s = data.PatchSampler(imgs, 20, np.int64(2), "cpu")  # patch == image size: one position
    assert s.sample(torch.Generator().manual_seed(0)).shape == (2, 3, 20, 20)


@pytest.mark.parametrize("kw, kind, msg", [
    ({"batch_size": 0}, ValueError, "batch_size"), ({"batch_size": -2}, ValueError, "batch_size"),
    ({"batch_size": 1.5}, ValueError, "batch_size"), ({"batch_size": "4"}, TypeError, "batch_size"),
    ({"generator": 3}, TypeError, "generator"), ({"generator": np.random.default_rng(0)}, TypeError, "generator"),
])
def test_patch_sampler_sample_bad_arguments(kw, kind, msg):
    s = data.PatchSampler(_imgs(), 8, 4, "cpu")
    with pytest.raises(kind, match=msg):
        s.sample(**kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a generator on another device")
def test_patch_sampler_generator_device_mismatch():
    s = data.PatchSampler(_imgs(), 8, 4, "cuda")
    with pytest.raises(ValueError, match="generator is on cpu"):
        s.sample(torch.Generator().manual_seed(0))


@pytest.mark.parametrize("x, t, kind, msg", [
    (torch.rand(2, 3, 4, 4), torch.tensor([0, 8]), ValueError, "0..7"),
    (torch.rand(2, 3, 4, 4), torch.tensor([-1, 0]), ValueError, "0..7"),
    (torch.rand(2, 3, 4, 4), torch.tensor([0.0, 1.0]), TypeError, "integers"),
    (torch.rand(2, 3, 4, 4), torch.tensor([True, False]), TypeError, "integers"),
    (torch.rand(2, 3, 4, 4), torch.tensor([0, 1, 2]), ValueError, "one per sample"),
    (torch.rand(2, 3, 4, 4), torch.tensor([[0, 1]]), ValueError, "one per sample"),
    (torch.rand(2, 3, 4, 4), [0, 1], ValueError, "one per sample"),
    (torch.rand(2, 3, 4, 5), torch.tensor([0, 1]), ValueError, "square"),
    (torch.rand(2, 3, 1, 5), torch.tensor([0, 1]), ValueError, "square"),
    (torch.rand(3, 4, 4), torch.tensor([0, 1, 2]), ValueError, r"\(N,C,H,W\)"),
    (np.zeros((2, 3, 4, 4)), torch.tensor([0, 1]), ValueError, r"\(N,C,H,W\)"),
])
def test_dihedral_bad_inputs(x, t, kind, msg):
    with pytest.raises(kind, match=msg):
        data.dihedral(x, t)
