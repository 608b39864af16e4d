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


def test_download_offline_and_checksum(tmp_path):
    import zipfile
    src = tmp_path / "src"
    (src / "Set5" / "HR").mkdir(parents=True)
    data.save_image(torch.rand(3, 16, 16), src / "Set5" / "HR" / "x.png")
    z = tmp_path / "set5.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(src / "Set5" / "HR" / "x.png", "Causal-IR-DIL-main/Set5/HR/x.png")
    folder = data.download("Set5", root=tmp_path / "cache", url=z.as_uri())
    assert len(data.folder_images(folder)) == 1
    assert len(data.benchmark_images("Set5", root=tmp_path / "cache")) == 1
    with pytest.raises(ConnectionError, match="offline"):
        data.download("CBSD68", root=tmp_path / "cache", url="http://127.0.0.1:9/none.zip", timeout=2)
    with pytest.raises(FileNotFoundError, match="download"):
        data.benchmark_images("Kodak24", root=tmp_path / "cache")
    # a pinned digest that differs is refused and the archive removed
    (tmp_path / "cache" / "McMaster").mkdir(parents=True)
    (tmp_path / "cache" / "McMaster" / "sha256.json").write_text('{"sha256": "00"}')
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.download("McMaster", root=tmp_path / "cache", url=z.as_uri())
