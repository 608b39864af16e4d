import json

import pytest
import torch

from causalir import data, distortions, models, train

IMGS = [data.center_crop(data.embedded_image(n), 64) for n in ("astronaut", "coffee")]
SEEN = distortions.distortion_set("noise-dil").seen


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, patch_size=16, lr=1e-3, seed=3, device="cpu", progress=False)
    base.update(kw)
    return train.TrainConfig(**base)


def _model(seed=0):
    torch.manual_seed(seed)
    return models.build("dncnn", preset="tiny")


def _weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_determinism_under_seed():
    a = train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg())
    b = train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg())
    assert torch.equal(_weights(a.model), _weights(b.model))
    c = train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(seed=4))
    assert not torch.equal(_weights(a.model), _weights(c.model))


def test_resume_continues_exactly(tmp_path):
    straight = train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=8, schedule="constant"))
    run = tmp_path / "run"
    train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=4, schedule="constant"), run_dir=run)
    resumed = train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=8, schedule="constant"),
                        run_dir=run)
    assert torch.equal(_weights(straight.model), _weights(resumed.model))
    assert resumed.counters.steps == 8 and resumed.counters.images_forwarded == 32
    unit, rec = train.find_checkpoint(run)
    assert unit.name == "ckpt-00000008" and rec["counters"]["distorted_batches"] == 8
    assert rec == json.loads((unit / "run.json").read_text())


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=2), run_dir=run)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=2), run_dir=run, resume=False)
    with pytest.raises(ValueError, match="different configuration .*train.lr: saved 0.001, now 0.0005"):
        train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=2, lr=5e-4), run_dir=run)
    (run / "ckpt-00000002" / "state.pt").write_bytes(b"corrupt")
    with pytest.warns(RuntimeWarning, match="state.pt does not match its recorded sha256"), \
            pytest.raises(ValueError, match="holds no valid checkpoint"):
        train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=2), run_dir=run)


def test_erm_learns_and_validates():
    torch.manual_seed(0)
    m = models.build("dncnn", nf=16, depth=4)
    val = {"noise σ=20": distortions.GaussianNoise(20)}
    before = train.validate(m, [IMGS[0]], val)["noise σ=20"]
    res = train.fit(m, train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=60, batch_size=8, patch_size=32,
                    lr=2e-3, val_every=30), val_images=[IMGS[1]], val_distortions=val)
    after = train.validate(res.model, [IMGS[0]], val)["noise σ=20"]
    assert after > before + 1.0
    assert [h["step"] for h in res.history if "val_psnr" in h] == [30, 60]


def test_psnr_loss_is_minus_the_mean_per_image_psnr_of_scikit_image():
    """train.LOSSES['psnr'] = -mean_i PSNR_i (peak 1), checked against skimage on images of very different error;
    its gradient weighs each image by 1/MSE_i, so a low-error image is not drowned by a high-error one."""
    from skimage.metrics import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64)
    out = (gt + torch.tensor([0.01, 0.05, 0.2], dtype=torch.float64)[:, None, None, None]
           * torch.randn(gt.shape, generator=g, dtype=torch.float64))
    want = sum(peak_signal_noise_ratio(gt[i].numpy(), out[i].numpy(), data_range=1.0) for i in range(3)) / 3
    assert float(-train.LOSSES["psnr"](out, gt)) == pytest.approx(want, abs=1e-4)   # eps 1e-10 inside the log
    x = out.clone().requires_grad_(True)
    train.LOSSES["psnr"](x, gt).backward()
    per_image = x.grad.flatten(1).norm(dim=1)
    assert per_image[0] > per_image[1] > per_image[2]          # the smallest error pulls hardest
    assert train.TrainConfig(loss="psnr").loss == "psnr"
    with pytest.raises(ValueError, match="psnr_loss: expected two batches"):
        train.psnr_loss(out, gt[:2])


def test_config_and_strategy_errors():
    with pytest.raises(ValueError, match="schedule"):
        train.TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="loss"):
        train.TrainConfig(loss="huber")
    with pytest.raises(KeyError, match="valid names: .*erm"):
        train.build_strategy("sgd")
    with pytest.raises(ValueError, match="seen distortion"):
        train.fit(_model(), train.build_strategy("erm"), IMGS, [], _cfg())


def test_lr_schedules():
    m = _model()
    opt = train.make_optimizer(m.parameters(), _cfg(steps=10, lr=1.0, lr_min_ratio=0.1))
    sch = train.make_scheduler(opt, _cfg(steps=10, lr=1.0, lr_min_ratio=0.1))
    lrs = []
    for _ in range(10):
        opt.step()
        sch.step()
        lrs.append(sch.get_last_lr()[0])
    assert abs(lrs[-1] - 0.1) < 1e-9 and all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.gpu
def test_cuda_bf16_channels_last():
    res = train.fit(_model(), train.build_strategy("erm"), IMGS, SEEN,
                    _cfg(device="cuda", precision="bf16", channels_last=True))
    assert next(res.model.parameters()).is_cuda


STRATS = {"erm": {}, "dil_pf": {"alpha": 0.01}, "dil_ps": {"alpha": 0.01}, "dil_sf": {"alpha": 0.01},
          "dil_ss": {"alpha": 0.01}, "dil_sf_reference": {"n_distortions": 2}, "confounded_erm": {},
          "backdoor_erm": {"probs": (0.25, 0.25, 0.25, 0.25)}}


@pytest.mark.parametrize("name", sorted(STRATS))
def test_every_strategy_goes_through_the_one_update(name, monkeypatch):
    """grad_clip holds for every strategy (the shared Strategy.update clips), and update is the only step."""
    calls = []
    orig = train.Strategy.update

    def spy(self, ctx, loss_or_grads, n_images, **kw):
        orig(self, ctx, loss_or_grads, n_images, **kw)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ctx.model.parameters()
                                                     if p.grad is not None]))
        calls.append(float(norm))

    monkeypatch.setattr(train.Strategy, "update", spy)
    res = train.fit(_model(), train.build_strategy(name, **STRATS[name]), IMGS, SEEN, _cfg(steps=2, grad_clip=1e-4))
    assert len(calls) == 2 and all(c <= 1e-4 * (1 + 1e-4) for c in calls), calls
    assert res.counters.images_forwarded > 0 and res.counters.images_backpropagated > 0


def test_update_sets_a_gradient_dict_and_counts():
    m = _model()
    strat = train.build_strategy("erm")
    cfg = _cfg(grad_clip=0.0, schedule="constant")
    strat.configure(m, cfg)
    ctx = train.StepContext(m, lambda: None, SEEN, torch.Generator(), train.LOSSES["l1"], lambda: None,
                            train.Counters(), cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: torch.ones_like(p) for n, p in m.named_parameters()}
    strat.update(ctx, grads, 5, n_backprop=7)
    # Adam's first step moves every weight by -lr * sign(grad) (up to eps)
    for n, p in m.named_parameters():
        assert torch.allclose(p.detach(), before[n] - cfg.lr, atol=1e-6)
    assert (ctx.counters.images_forwarded, ctx.counters.images_backpropagated) == (5, 7)


def test_a_strategy_that_owns_its_data_needs_no_images():
    torch.manual_seed(0)
    clean = torch.rand(32, 3, 16, 16)
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    m = _model()
    res = train.fit(m, train.build_strategy("paired_mse", clean=clean, dist=noisy), None, (), _cfg(loss="l2"))
    assert res.counters.steps == 6 and res.counters.images_forwarded == 6 * 4
    with pytest.raises(ValueError, match="train_images is None but strategy 'erm'"):
        train.fit(_model(), train.build_strategy("erm"), None, SEEN, _cfg())
    assert "paired_mse" in train.strategy_names() and "sr_x2" in train.strategy_names()


def _bad_fit_args():
    m, erm = _model(), train.build_strategy("erm")
    val = {"noise": distortions.GaussianNoise(20)}
    return {
        "model": (dict(model="dncnn"), TypeError, "model: expected a torch.nn.Module"),
        "strategy": (dict(strategy="erm"), TypeError, "strategy: expected a causalir.train.Strategy"),
        "cfg": (dict(cfg={"steps": 2}), TypeError, "cfg: expected a TrainConfig"),
        "distortions str": (dict(distortions="noise"), TypeError, "distortions: expected a sequence"),
        "distortions item": (dict(distortions=[3]), TypeError, r"distortions\[0\]: expected a distortion"),
        "distortions empty": (dict(distortions=[]), ValueError, "at least one seen distortion"),
        "train_images tensor": (dict(train_images=torch.rand(2, 3, 32, 32)), TypeError, "train_images: expected a list"),
        "train_images 4d item": (dict(train_images=[torch.rand(1, 3, 32, 32)]), ValueError, r"images\[0\]: expected shape"),
        "train_images uint8": (dict(train_images=[torch.zeros(3, 32, 32, dtype=torch.uint8)]), TypeError, "floating-point"),
        "train_images range": (dict(train_images=[torch.rand(3, 32, 32) * 255]), ValueError, r"expected values in \[0, 1\]"),
        "train_images nan": (dict(train_images=[torch.full((3, 32, 32), float("nan"))]), ValueError, "expected values"),
        "train_images empty": (dict(train_images=[]), ValueError, "at least one image"),
        "val_images tensor": (dict(val_images=torch.rand(1, 3, 16, 16), val_distortions=val), TypeError, "val_images: expected a list"),
        "val_images item": (dict(val_images=[torch.rand(3, 16)], val_distortions=val), ValueError, r"val_images\[0\]: expected shape"),
        "val_images range": (dict(val_images=[torch.rand(3, 16, 16) + 2], val_distortions=val), ValueError, r"val_images\[0\]: expected values"),
        "val_distortions list": (dict(val_images=[IMGS[0]], val_distortions=[val["noise"]]), TypeError, "val_distortions: expected a mapping"),
        "val_distortions item": (dict(val_images=[IMGS[0]], val_distortions={"x": 3}), TypeError, r"val_distortions\['x'\]"),
        "resume": (dict(resume="yes"), TypeError, "resume: expected True or False"),
        "callback": (dict(callback=3), TypeError, "callback: expected a callable"),
        "run_dir": (dict(run_dir=3), TypeError, "run_dir: expected a folder path"),
    }, m, erm


@pytest.mark.parametrize("case", sorted(_bad_fit_args()[0]))
def test_fit_refuses_bad_arguments_before_training(case, monkeypatch):
    bad, m, erm = _bad_fit_args()
    kw, exc, msg = bad[case]
    args = dict(model=m, strategy=erm, train_images=IMGS, distortions=SEEN, cfg=_cfg())
    args.update(kw)
    monkeypatch.setattr(train.ERM, "step", lambda self, ctx: pytest.fail("training started"))
    with pytest.raises(exc, match=msg):
        train.fit(args.pop("model"), args.pop("strategy"), args.pop("train_images"), args.pop("distortions"),
                  args.pop("cfg"), **args)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(val_images=[]), ValueError, "val_images: expected at least one"),
    (dict(val_distortions={}), ValueError, "val_distortions: expected at least one"),
    (dict(seed=-1), ValueError, "validate.seed: expected an integer >= 0"),
    (dict(seed=1.5), ValueError, "validate.seed"),
    (dict(model="dncnn"), TypeError, "model: expected a torch.nn.Module"),
    (dict(val_images=[torch.rand(2, 3, 8, 8)]), ValueError, r"val_images\[0\]: expected shape \(C,H,W\)"),
])
def test_validate_refuses_bad_arguments(kw, exc, msg):
    args = dict(model=_model(), val_images=[IMGS[0]], val_distortions={"n": distortions.GaussianNoise(20)})
    args.update(kw)
    with pytest.raises(exc, match=msg):
        train.validate(**args)
