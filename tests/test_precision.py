"""TrainConfig.precision (fp32 | bf16 autocast) and channels_last on CPU: bf16 ends within 0.05 dB of fp32, every
strategy's forward runs under autocast with its inputs prepared, fp32 stays bit-deterministic, bad values are refused.

Where the CPU has no bf16 kernels (``train.precision_support``), ``fit`` refuses bf16; the tests that need a bf16
run then force the check (``_force_bf16``) and run PyTorch's reference bf16 kernels: the same numbers, slower."""
from __future__ import annotations

import pytest
import torch

from causalir import adms as A
from causalir import attribution, data, distortions, models, train

IMGS = [data.center_crop(data.embedded_image(n), 64) for n in ("astronaut", "coffee")]
SEEN = distortions.distortion_set("noise-dil").seen
SUPPORT = train.precision_support("cpu")
NO_BF16 = f"this CPU has no bf16 kernels ({SUPPORT['machine']}: {SUPPORT['detail']})"


def _cfg(**kw):
    base = dict(steps=2, batch_size=4, patch_size=16, lr=1e-3, seed=3, device="cpu", progress=False)
    base.update(kw)
    return train.TrainConfig(**base)


def _force_bf16(monkeypatch):
    """Let fit run bf16 on a CPU without bf16 kernels (autocast then uses PyTorch's reference kernels)."""
    monkeypatch.setattr(train, "precision_support", lambda device="cpu": {
        "device": "cpu", "bf16": True, "native": False, "machine": "test", "detail": "forced by the test"})


def _weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


# ----------------------------------------------------------------------------------- the field itself
@pytest.mark.parametrize("value", ["fp16", "BF16", "float32", "", None, True, 16])
def test_bad_precision_values_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"TrainConfig\.precision: expected one of 'fp32', 'bf16', got "):
        train.TrainConfig(precision=value)


def test_defaults_are_fp32_and_the_default_memory_format():
    cfg = train.TrainConfig()
    assert cfg.precision == "fp32" and cfg.channels_last is False
    assert not hasattr(cfg, "bf16")


def test_support_is_reported_with_the_machine():
    s = train.precision_support("cpu")
    assert set(s) == {"device", "bf16", "native", "machine", "detail"} and s["device"] == "cpu"
    assert isinstance(s["bf16"], bool) and isinstance(s["native"], bool) and (s["bf16"] or not s["native"])
    assert "CPU capability" in s["detail"] and s["machine"]
    assert train.check_precision("fp32", "cpu") == "fp32"


def test_bf16_is_refused_where_the_cpu_lacks_it_and_falls_back_only_if_asked(monkeypatch):
    monkeypatch.setattr(train, "precision_support", lambda device="cpu": {
        "device": "cpu", "bf16": False, "native": False, "machine": "Some CPU", "detail": "CPU capability AVX2, no AVX-512"})
    monkeypatch.setattr(train.ERM, "step", lambda self, ctx: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"TrainConfig\.precision: 'bf16' needs bfloat16 kernels .*Some CPU: "
                                         r"CPU capability AVX2, no AVX-512; use precision='fp32'"):
        train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm"), IMGS, SEEN,
                  _cfg(precision="bf16"))
    with pytest.warns(RuntimeWarning, match="falling back to 'fp32' as asked"):
        assert train.check_precision("bf16", "cpu", fallback=True) == "fp32"


@pytest.mark.skipif(SUPPORT["bf16"], reason="this CPU has bf16 kernels")
def test_this_cpu_without_bf16_is_named_in_the_refusal():
    with pytest.raises(ValueError, match=r"TrainConfig\.precision: 'bf16' needs bfloat16 kernels"):
        train.check_precision("bf16", "cpu")


# ------------------------------------------------------------------------------------- fp32 unchanged
def test_fp32_is_bit_deterministic_and_runs_without_autocast():
    seen = []

    def run():
        torch.manual_seed(0)
        m = models.build("dncnn", preset="tiny")
        h = m.register_forward_pre_hook(lambda mod, args: seen.append(torch.is_autocast_enabled("cpu")))
        res = train.fit(m, train.build_strategy("erm"), IMGS, SEEN, _cfg(steps=4))
        h.remove()
        return _weights(res.model)

    a, b = run(), run()
    assert torch.equal(a, b)
    assert seen and not any(seen)
    ctx = train.StepContext(None, None, SEEN, None, None, None, train.Counters(), _cfg())
    x = torch.rand(2, 3, 8, 8).transpose(-1, -2)
    assert ctx.prepare(x) is x  # fp32 without channels_last: the inputs are the tensors the strategy made


def test_a_legacy_record_with_the_bf16_flag_resumes_as_what_ran(tmp_path, monkeypatch):
    """run.json configs from before `precision` hold `bf16` (CUDA only): on CPU that run was fp32."""
    import json

    run = tmp_path / "run"
    cfg = _cfg(steps=2, schedule="constant")
    train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm"), IMGS, SEEN, cfg, run_dir=run)
    unit, rec = train.find_checkpoint(run)
    old = {**rec["config"]["train"], "bf16": True, "channels_last": True}
    old.pop("precision")
    legacy = {**rec["config"], "train": old}
    assert train._upgrade_record(legacy, torch.device("cpu"))["train"] == {
        **rec["config"]["train"], "precision": "fp32", "channels_last": False}
    assert train._upgrade_record(legacy, torch.device("cuda"))["train"]["precision"] == "bf16"
    assert train._upgrade_record(rec["config"], torch.device("cpu")) is rec["config"]
    # such a run folder resumes on CPU (the unit's digests cover its weights and state, not run.json)
    (unit / "run.json").write_text(json.dumps({**rec, "config": legacy}))
    res = train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm"), IMGS, SEEN,
                    _cfg(steps=3, schedule="constant"), run_dir=run)
    assert res.counters.steps == 3
    _force_bf16(monkeypatch)  # past the device check: the changed precision itself is refused
    with pytest.raises(ValueError, match="different configuration .*train.precision: saved 'fp32', now 'bf16'"):
        train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm"), IMGS, SEEN,
                  _cfg(steps=4, schedule="constant", precision="bf16"), run_dir=run)


# ---------------------------------------------------------------------------------- bf16 numerics
@pytest.mark.parametrize("kernels", ["native", "reference"])
def test_a_short_bf16_run_ends_within_0_05_db_of_fp32(kernels, monkeypatch):
    """DnCNN-tiny ERM, 40 steps: PSNR on a fixed validation batch within 0.05 dB (the issue's margin). 'native'
    runs on a CPU with bf16 kernels; 'reference' forces PyTorch's reference bf16 kernels where the CPU has none."""
    if kernels == "native" and not SUPPORT["bf16"]:
        pytest.skip(NO_BF16 + ": the 'reference' case checks the margin with PyTorch's reference kernels")
    if kernels == "reference":
        if SUPPORT["bf16"]:
            pytest.skip("this CPU has bf16 kernels: the 'native' case checks the margin")
        _force_bf16(monkeypatch)
    val = {"noise σ=25": distortions.GaussianNoise(25)}
    vimg = [data.center_crop(data.embedded_image("astronaut"), 96)]
    psnr = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = models.build("dncnn", preset="tiny")
        if prec == "fp32":
            before = train.validate(m, vimg, val)["noise σ=25"]
        res = train.fit(m, train.build_strategy("erm"), IMGS, SEEN,
                        _cfg(steps=40, batch_size=8, patch_size=32, lr=2e-3, precision=prec))
        psnr[prec] = train.validate(res.model, vimg, val)["noise σ=25"]
    assert psnr["fp32"] > before + 0.5, (before, psnr)  # the run learned something
    assert abs(psnr["bf16"] - psnr["fp32"]) < 0.05, psnr


# ------------------------------------------------------------------------ every strategy under autocast
def _adms():
    torch.manual_seed(0)
    um = models.build("dncnn", nf=8, depth=3)
    g = torch.Generator().manual_seed(1)
    masks = {d: attribution.select_top({n: torch.rand(p.shape[:2], generator=g) for n, p in um.named_parameters()
                                        if p.dim() == 4}, 0.05) for d in ("noise", "blur")}
    return A.build_adms(um, {"noise": um, "blur": um}, masks, clf_nf=4)


def _case(name):
    """(model, strategy, train_images, distortions) for one step of ``name``."""
    torch.manual_seed(0)
    dn = models.build("dncnn", preset="tiny")
    two = [distortions.GaussianNoise(25.0), distortions.GaussianBlur(2.0)]
    if name == "paired_mse":
        clean = torch.rand(8, 3, 16, 16)
        return dn, train.build_strategy("paired_mse", clean=clean, dist=(clean + 0.1).clamp(0, 1)), None, ()
    if name == "adms":
        return _adms(), A.ADMSStrategy(), IMGS, two
    if name == "sr_x2":
        return (models.build("srresnet", nf=8, nb=1), train.build_strategy("sr_x2", p_blur=0.5, p_noise=0.5), IMGS,
                list(attribution.SR_DEGRADATIONS.values()))
    kw = {"dil_sf_reference": {"n_distortions": 2}, "backdoor_erm": {"probs": (0.5, 0.5)},
          "backdoor_erm_sample": {"probs": (0.5, 0.5), "mode": "sample"}}.get(name, {})
    strat = train.build_strategy("backdoor_erm" if name == "backdoor_erm_sample" else name, **kw)
    return dn, strat, IMGS, two if name.startswith(("backdoor", "confounded")) else SEEN


STRATEGIES = ["erm", "paired_mse", "dil_pf", "dil_ps", "dil_sf", "dil_ss", "dil_sf_reference", "erm_stratified",
              "confounded_erm",
              "backdoor_erm", "backdoor_erm_sample", "adms", "sr_x2"]


def test_the_list_covers_every_registered_strategy():
    assert {s.replace("_sample", "") for s in STRATEGIES} == set(train.strategy_names())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs_a_bf16_step_under_autocast(name, channels_last, monkeypatch):
    """One bf16 step: every forward of the model (and of ADMS's classifier) runs under CPU bf16 autocast with its
    input through ctx.prepare (channels_last when asked), and the update gets an fp32 loss or fp32 gradients."""
    if not SUPPORT["bf16"]:
        _force_bf16(monkeypatch)
    model, strat, imgs, dist = _case(name)
    seen, losses = [], []

    def hook(mod, args):
        x = args[0]
        batched = torch._C._functorch.is_batchedtensor(x)  # under vmap the memory format cannot be queried
        seen.append((type(mod).__name__, torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                     batched or x.is_contiguous(memory_format=torch.channels_last) == channels_last))

    mods = [model] + ([model.classifier] if isinstance(model, A.ADMS) else [])
    for m in mods:
        m.register_forward_pre_hook(hook)
    orig = train.Strategy.update

    def spy(self, ctx, loss_or_grads, n_images, **kw):
        vals = loss_or_grads.values() if isinstance(loss_or_grads, dict) else [loss_or_grads]
        losses.extend(v.dtype for v in vals)
        return orig(self, ctx, loss_or_grads, n_images, **kw)

    monkeypatch.setattr(train.Strategy, "update", spy)
    res = train.fit(model, strat, imgs, dist, _cfg(steps=1, precision="bf16", channels_last=channels_last))
    assert seen, "no forward ran"
    assert all(on and dt == torch.bfloat16 for _, on, dt, _ in seen), seen
    assert all(fmt for *_, fmt in seen), seen
    assert losses and all(dt == torch.float32 for dt in losses), losses
    assert res.counters.steps == 1 and all(torch.isfinite(p).all() for p in res.model.parameters())
    if channels_last:
        convs = [p for p in res.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_channels_last_fp32_runs_on_cpu_and_is_deterministic():
    def run():
        torch.manual_seed(0)
        return _weights(train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm"), IMGS, SEEN,
                                  _cfg(steps=3, channels_last=True)).model)

    a, b = run(), run()
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = _weights(train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm"), IMGS, SEEN,
                           _cfg(steps=3)).model)
    assert torch.allclose(a, c, atol=1e-4)  # another memory format: the same numbers up to summation order
