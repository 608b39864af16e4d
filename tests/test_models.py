import pytest
import torch

from causalir import models


@pytest.mark.parametrize("name", ["dncnn", "rrdb", "swinir"])
def test_restorers_keep_shape(name):
    m = models.build(name, preset="tiny")
    for hw in ((32, 32), (20, 28)):
        x = torch.rand(2, 3, *hw)
        assert m(x).shape == x.shape


def test_srresnet_x2_and_paper_counts():
    m = models.build("srresnet", preset="tiny")
    assert m(torch.rand(1, 3, 12, 16)).shape == (1, 3, 24, 32)
    p = models.build("srresnet", preset="paper")
    kernels = sum(w.shape[0] * w.shape[1] for n, w in p.named_parameters() if w.dim() == 4)
    assert kernels == 151_936  # FAIG's count for MSRResNet 64/16
    assert abs(models.count_params(models.build("rrdb", preset="paper")) - 16.62e6) < 0.01e6  # DIL's RRDB


def test_flops_match_conv_formula():
    m = models.build("dncnn", nf=8, depth=3)
    h = w = 16
    macs = h * w * 9 * (3 * 8 + 8 * 8 + 8 * 3)
    assert models.count_flops(m, (1, 3, h, w)) == 2 * macs


def test_swin_shift_mask_blocks_cross_region_attention():
    blk = models.SwinBlock(8, 2, 4, 2)
    mask = blk._mask(8, 8, "cpu")
    assert mask.shape == (4, 16, 16) and (mask[0] == 0).all() and (mask[-1] < 0).any()


def test_unknown_names_and_bad_config():
    with pytest.raises(KeyError, match="valid names: dncnn"):
        models.build("unet")
    with pytest.raises(KeyError, match="valid presets"):
        models.build("rrdb", preset="huge")
    with pytest.raises(TypeError, match="bad config"):
        models.build("rrdb", blocks=3)


def test_save_load_roundtrip_and_errors(tmp_path):
    m = models.build("rrdb", preset="tiny")
    models.save_model(m, tmp_path / "m")
    with pytest.raises(FileExistsError):
        models.save_model(m, tmp_path / "m")
    m2 = models.load_model(tmp_path / "m")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(ValueError, match="does not match"):
        models.load_state(models.build("rrdb", nf=8, nb=1, gc=4), tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        models.load_state(m, tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        models.load_state(m, tmp_path / "none.safetensors")
