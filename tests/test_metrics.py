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


# ------------------------------------------------------------------------ bad inputs (issue 15, defects 4, 9)
METRICS = {"psnr": psnr, "ssim": ssim}


def _ok(n=2, c=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g), torch.rand(n, c, h, w, generator=g)


def _bad_values():
    x, y = _ok()
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    pinf, minf = x.clone(), x.clone()
    pinf[0, 2, 3, 4], minf[0, 1, 2, 3] = float("inf"), float("-inf")
    return {
        "x_0_255": (x * 255, y, r"x: expected values in \[0, 1\].*divide by 255"),
        "y_0_255": (x, y * 255, r"y: expected values in \[0, 1\].*divide by 255"),
        "both_0_255": (x * 255, y * 255, r"expected values in \[0, 1\]"),
        "x_minus_1_1": (x * 2 - 1, y, r"x: expected values in \[0, 1\]"),
        "slightly_over": (x * 1.01, y, r"x: expected values in \[0, 1\].*clamp"),
        "slightly_under": (x - 0.01, y, r"x: expected values in \[0, 1\]"),
        "x_nan": (nan, y, "x has 1 non-finite"),
        "y_nan": (x, nan, "y has 1 non-finite"),
        "all_nan": (torch.full_like(x, float("nan")), y, "non-finite"),
        "x_inf": (pinf, y, "non-finite"),
        "y_minus_inf": (x, minf, "non-finite"),
    }


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("case", sorted(_bad_values()))
def test_range_and_finiteness_refused_not_clamped(metric, case):
    x, y, msg = _bad_values()[case]
    for fn_x, fn_y in ((x, y), (x[0], y[0])):  # batched and single image
        with pytest.raises(ValueError, match=msg):
            METRICS[metric](fn_x, fn_y)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_rounding_overshoot_still_scores_as_clamped(metric):
    """Float rounding just outside [0, 1] (within 1e-3) is accepted and scores exactly as the clamped image."""
    x, y = _ok(seed=4)
    y2 = y.clone()
    y2[0, 0, 0, :3] = torch.tensor([1.0004, -0.0009, 1.0])
    f = METRICS[metric]
    assert f(y2, x) == f(y2.clamp(0, 1), x)
    assert torch.equal(f(y2, x, reduction="none"), f(y2.clamp(0, 1), x, reduction="none"))


def _bad_shapes():
    x, y = _ok()
    return {
        "empty_batch": (torch.rand(0, 3, 16, 16), torch.rand(0, 3, 16, 16), ValueError, "empty batches"),
        "zero_height": (torch.rand(1, 3, 0, 16), torch.rand(1, 3, 0, 16), ValueError, "zero-size"),
        "zero_width": (torch.rand(1, 3, 16, 0), torch.rand(1, 3, 16, 0), ValueError, "zero-size"),
        "zero_channels": (torch.rand(1, 0, 16, 16), torch.rand(1, 0, 16, 16), ValueError, "zero-size"),
        "zero_size_single": (torch.rand(3, 0, 0), torch.rand(3, 0, 0), ValueError, "zero-size"),
        "shape_mismatch": (x, y[:, :, :10], ValueError, "same shape"),
        "batch_mismatch": (x, y[:1], ValueError, "same shape"),
        "2d": (x[0, 0], y[0, 0], ValueError, r"\(N,C,H,W\)"),
        "5d": (x[None], y[None], ValueError, r"\(N,C,H,W\)"),
        "uint8": ((x * 255).byte(), (y * 255).byte(), TypeError, "floating-point"),
        "int64": ((x * 255).long(), (y * 255).long(), TypeError, "floating-point"),
        "bool": (x > 0.5, y > 0.5, TypeError, "floating-point"),
        "numpy_x": (x.numpy(), y, TypeError, "x: expected a torch.Tensor"),
        "list_y": (x, y.tolist(), TypeError, "y: expected a torch.Tensor"),
        "device_mismatch": (x, y.to("meta"), ValueError, "same device"),
    }


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("case", sorted(_bad_shapes()))
def test_bad_shapes_and_types(metric, case):
    x, y, kind, msg = _bad_shapes()[case]
    with pytest.raises(kind, match=msg):
        METRICS[metric](x, y)


BAD_OPTIONS = [
    ({"reduction": "sum"}, ValueError, "reduction: expected one of 'mean', 'none'"),
    ({"reduction": "MEAN"}, ValueError, "reduction"), ({"reduction": None}, ValueError, "reduction"),
    ({"reduction": 0}, ValueError, "reduction"), ({"reduction": ""}, ValueError, "reduction"),
    ({"crop_border": -1}, ValueError, "crop_border"), ({"crop_border": 1.5}, ValueError, "crop_border"),
    ({"crop_border": True}, ValueError, "crop_border"), ({"crop_border": "2"}, TypeError, "crop_border"),
    ({"crop_border": None}, TypeError, "crop_border"), ({"crop_border": float("nan")}, ValueError, "crop_border"),
    ({"crop_border": 8}, ValueError, r"crop_border.*min\(H,W\)/2"), ({"crop_border": 100}, ValueError, "crop_border"),
    ({"y_channel": "yes"}, TypeError, "y_channel"), ({"y_channel": 1}, TypeError, "y_channel"),
    ({"y_channel": None}, TypeError, "y_channel"),
]


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("kw, kind, msg", BAD_OPTIONS)
def test_bad_options(metric, kw, kind, msg):
    x, y = _ok()
    with pytest.raises(kind, match=msg):
        METRICS[metric](x, y, **kw)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_y_channel_needs_rgb(metric):
    x, y = _ok(c=1, h=24, w=24)
    with pytest.raises(ValueError, match="y_channel.*3 RGB channels"):
        METRICS[metric](x, y, y_channel=True)
    assert np.isfinite(METRICS[metric](x, y))  # grey images are fine without y_channel


@pytest.mark.parametrize("h, w, crop", [(10, 16, 0), (16, 10, 0), (1, 1, 0), (16, 16, 3), (12, 40, 1)])
def test_ssim_smaller_than_window(h, w, crop):
    x, y = _ok(h=h, w=w)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, y, crop_border=crop)
    assert np.isfinite(psnr(x, y, crop_border=crop)) or h * w == 1  # PSNR has no window


@pytest.mark.parametrize("img, kind, msg", [
    (torch.rand(1, 3, 4, 4) * 300, ValueError, r"\[0, 255\]"), (-torch.rand(1, 3, 4, 4) - 1, ValueError, r"\[0, 255\]"),
    (torch.full((1, 3, 4, 4), float("nan")), ValueError, r"\[0, 255\]"), (torch.rand(1, 1, 4, 4), ValueError, "channels"),
    (torch.rand(3, 4, 4), ValueError, r"\(N,C,H,W\)"), ((torch.rand(1, 3, 4, 4) * 255).byte(), TypeError, "floating"),
    ([1, 2, 3], TypeError, "torch.Tensor"),
])
def test_rgb_to_y_bad_inputs(img, kind, msg):
    with pytest.raises(kind, match=msg):
        rgb_to_y(img)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("crop, y_ch", [(0, False), (3, False), (0, True), (2, True)])
def test_valid_inputs_still_match_skimage(seed, crop, y_ch):
    """Many valid pairs (odd sizes, batches, dtypes) still give the scikit-image numbers."""
    x, y = _pair(seed, 40 + 7 * seed)
    if y_ch:
        def prep(t):
            return rgb_to_y(torch.from_numpy(_u8(t)).permute(2, 0, 1)[None].double())[0, 0].numpy()
        a, b = prep(x), prep(y)
    else:
        a, b = _u8(x).astype(np.float64), _u8(y).astype(np.float64)
    if crop:
        a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    ref_p = peak_signal_noise_ratio(a, b, data_range=255)
    ref_s = structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, channel_axis=None if y_ch else 2)
    for dt in (torch.float32, torch.float64):
        assert abs(psnr(y.to(dt), x.to(dt), crop_border=crop, y_channel=y_ch) - ref_p) < 1e-3
        assert abs(ssim(y.to(dt), x.to(dt), crop_border=crop, y_channel=y_ch) - ref_s) < 1e-3
