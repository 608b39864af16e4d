
import pytest
import torch

from causalir import distortions as D


def test_names_and_unknown_name():
    for n in ("gaussian_noise", "gaussian_blur", "jpeg", "downsample", "rain", "haze", "spatial_noise", "compose", "snow"):
        assert n in D.names()
    with pytest.raises(KeyError, match="valid names: .*gaussian_noise"):
        D.build("salt_and_pepper")


@pytest.mark.parametrize("name,params", [
    ("gaussian_noise", {"sigma": 25}), ("gaussian_noise", {"sigma": (5, 50)}),
    ("gaussian_blur", {"sigma": 2.0}), ("gaussian_blur", {"sigma": (1, 3), "sigma_y": (0.5, 2), "theta": (0, 3.1)}),
    ("jpeg", {"quality": 20}), ("jpeg", {"quality": (10, 90)}), ("downsample", {"scale": 2}),
    ("downsample", {"scale": (1.5, 3.0)}), ("rain", {}), ("haze", {"beta": (0.5, 2)}),
    ("spatial_noise", {"sigma_map": "linear"}), ("spatial_noise", {"sigma_map": "peaks"}), ("identity", {}),
])
def test_shape_range_determinism(name, params, images):
    d = D.build(name, **params)
    a = d(images, torch.Generator().manual_seed(7))
    b = d(images, torch.Generator().manual_seed(7))
    assert a.shape == images.shape and a.dtype == images.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    if name != "identity":
        assert not torch.equal(a, images)
    assert isinstance(d.label, str) and d.label


def test_noise_statistics():
    x = torch.full((8, 3, 64, 64), 0.5)
    y = D.GaussianNoise(25)(x, torch.Generator().manual_seed(0))
    assert abs(float((y - x).std()) * 255 - 25) < 0.5


def test_per_sample_ranges_differ():
    x = torch.full((64, 3, 32, 32), 0.5)
    y = D.GaussianNoise((5, 50))(x, torch.Generator().manual_seed(0))
    s = (y - x).flatten(1).std(1) * 255
    assert float(s.min()) < 12 and float(s.max()) > 40


def test_blur_kernel_sum_and_isotropy():
    k = D.gaussian_kernels(torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([0.3]), 21)[0]
    assert abs(float(k.sum()) - 1) < 1e-5
    assert torch.allclose(k, k.T, atol=1e-6)
    # variance of the kernel along x equals sigma^2 (truncation negligible at 21 taps)
    ax = torch.arange(21.0) - 10
    var = float((k.sum(0) * ax**2).sum())
    assert abs(var - 4.0) < 0.05


def test_blur_preserves_constant_image():
    x = torch.full((2, 3, 40, 40), 0.3)
    assert torch.allclose(D.GaussianBlur(3.0)(x), x, atol=1e-5)


def test_jpeg_quality_orders_error():
    from causalir import data
    x = data.center_crop(data.embedded_image("astronaut"), 64)[None]
    e_lo = float((D.JPEG(10)(x) - x).abs().mean())
    e_hi = float((D.JPEG(90)(x) - x).abs().mean())
    assert e_lo > e_hi > 0


def test_spatial_noise_maps():
    d = D.SpatialNoise("linear", 0, 50)
    m = d.sigma(8, 16)
    assert float(m[:, 0].max()) == 0 and abs(float(m[:, -1].min()) - 50) < 1e-4
    p = D.SpatialNoise("peaks", 10, 40).sigma(32, 32)
    assert abs(float(p.min()) - 10) < 1e-4 and abs(float(p.max()) - 40) < 1e-4


def test_compose_order(images):
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    c = D.compose([D.GaussianBlur(2.0), D.GaussianNoise(10)])
    manual = D.GaussianNoise(10)(D.GaussianBlur(2.0)(images, g()), g())
    assert torch.allclose(c(images, g()), manual, atol=1e-6)


def test_apply_random_and_sets(images):
    s = D.distortion_set("noise-dil")
    assert [d.sigma for d in s.seen] == [5.0, 10.0, 15.0, 20.0]
    assert s.is_seen("noise σ=15") and not s.is_seen("noise σ=50")
    y, idx = D.apply_random(s.seen, images, torch.Generator().manual_seed(0))
    assert y.shape == images.shape and idx.shape == (4,)
    with pytest.raises(KeyError, match="valid names"):
        D.distortion_set("nope")


def test_bad_inputs(images):
    with pytest.raises(ValueError, match=r"\(N,C,H,W\)"):
        D.GaussianNoise(10)(images[0])
    with pytest.raises(TypeError, match="floating-point"):
        D.GaussianNoise(10)((images * 255).byte())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        D.GaussianNoise(10)(images * 255)
    with pytest.raises(ValueError, match="channels"):
        D.GaussianNoise(10)(images[:, :1])
    with pytest.raises(ValueError, match="sigma"):
        D.GaussianNoise(-3)
    with pytest.raises(ValueError, match="lo <= hi"):
        D.GaussianNoise((30, 10))
    with pytest.raises(TypeError, match="bad parameters"):
        D.build("gaussian_noise", sigmaa=3)


def test_degree_knobs_and_preview():
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, (knob, lo, hi, default) in D.DEGREES.items():
        out, p, s = D.preview(img, name, default)
        assert out.shape == img.shape and 0 < s <= 1 and p > 0
    # a heavier degree gives a lower PSNR for noise and blur
    assert D.preview(img, "gaussian_noise", 10)[1] > D.preview(img, "gaussian_noise", 50)[1]
    with pytest.raises(ValueError, match=r"jpeg.degree \(quality\): expected a number >= 5 and <= 95, got 100"):
        D.with_degree("jpeg", 100)
    with pytest.raises(KeyError, match="valid names"):
        D.with_degree("compose", 1)


@pytest.mark.parametrize("name", ["gaussian_noise", "jpeg", "gaussian_blur"])
def test_degree_for_psnr_finds_the_degree_of_a_reachable_target(name):
    from causalir import data

    img = data.center_crop(data.embedded_image("chelsea"), 64)
    lo, hi = D.DEGREES[name][1:3]
    p_lo, p_hi = (min(D.preview(img, name, v)[1], 60.0) for v in (lo, hi))  # sigma 0: an infinite PSNR
    target = (p_lo + p_hi) / 2
    deg, out, p, s = D.degree_for_psnr(img, name, target)
    assert lo <= deg <= hi and abs(p - target) < 0.3 and out.shape == img.shape
    # an unreachable target gives the nearer end of the range
    far = D.degree_for_psnr(img, name, 1.0)[0]  # below every PSNR of the range: the worst end
    worst = hi if p_hi < p_lo else lo
    assert abs(far - worst) < 1e-3 * (hi - lo)
    with pytest.raises(KeyError, match="valid names"):
        D.degree_for_psnr(img, "bogus", 30.0)
