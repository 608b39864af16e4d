import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from causalir import data
from causalir.metrics import psnr, rgb_to_y, ssim


def _pair(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    x = data.center_crop(data.embedded_image("astronaut"), size)
    y = (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


def _u8(t):
    return (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_matches_skimage(crop):
    x, y = _pair()
    a, b = _u8(x), _u8(y)
    if crop:
        a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    ref = peak_signal_noise_ratio(a, b, data_range=255)
    assert abs(psnr(y, x, crop_border=crop) - ref) < 1e-3


def test_ssim_matches_skimage():
    x, y = _pair(1, 96)
    ref = structural_similarity(_u8(x).astype(np.float64), _u8(y).astype(np.float64), data_range=255,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2)
    assert abs(ssim(y, x) - ref) < 1e-3


def test_y_channel_psnr_matches_skimage():
    x, y = _pair(2)
    def y_np(t):
        return rgb_to_y(torch.from_numpy(_u8(t)).permute(2, 0, 1)[None].double())[0, 0].numpy()
    ref = peak_signal_noise_ratio(y_np(x), y_np(y), data_range=255)
    assert abs(psnr(y, x, y_channel=True) - ref) < 1e-3


def test_batch_mean_and_per_image():
    x1, y1 = _pair(0)
    x2, y2 = _pair(3)
    per = psnr(torch.stack([y1, y2]), torch.stack([x1, x2]), reduction="none")
    assert per.shape == (2,)
    assert abs(float(per.mean()) - psnr(torch.stack([y1, y2]), torch.stack([x1, x2]))) < 1e-9
    assert abs(float(per[0]) - psnr(y1, x1)) < 1e-9


def test_identical_images():
    x, _ = _pair()
    assert psnr(x, x) == float("inf")
    assert abs(ssim(x, x) - 1.0) < 1e-12


def test_bad_input():
    x, y = _pair()
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:, :10])
    with pytest.raises(TypeError, match="floating-point"):
        psnr((x * 255).byte(), (y * 255).byte())
    with pytest.raises(ValueError, match="crop_border"):
        psnr(x, y, crop_border=40)
