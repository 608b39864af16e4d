"""Tests for causalir.causal_experiments: the confounded / back-door samplers, strategies, toy evaluation,
the DIL bridge and the experiment's structure."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from causalir import causal_experiments as ce
from causalir import models, train
from causalir.distortions import GaussianNoise


def _patches(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Patches with a spread of brightness: constant level + texture, (n,3,8,8)."""
    g = torch.Generator().manual_seed(seed)
    level = torch.rand(n, 1, 1, 1, generator=g) * 0.8 + 0.1
    return (level + 0.05 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------------------- samplers
def test_confounded_sampler_ties_noise_to_brightness():
    x = _patches()
    b = ce.brightness(x)
    thr = float(b.median())
    g = torch.Generator().manual_seed(1)
    idx = ce.tied_strata(x, thr, tie=1.0, generator=g)
    dark = b < thr
    assert bool((idx[dark] == 0).all()) and bool((idx[~dark] == 1).all())  # dark -> heavy, bright -> light
    heavy = (ce.tied_strata(x, thr, tie=0.6, generator=g) == 0).double()
    corr = float(np.corrcoef(b.double().numpy(), heavy.numpy())[0, 1])
    assert corr < -0.4  # strongly negative: darker patches carry heavier noise
    p_dark = float(heavy[dark].mean())
    se = np.sqrt(0.8 * 0.2 / int(dark.sum()))
    assert abs(p_dark - 0.8) < 4 * se  # P(heavy | dark) = (1 + tie) / 2
    assert abs(float(heavy[~dark].mean()) - 0.2) < 4 * se
    # tie = 0: no confounding
    idx0 = (ce.tied_strata(x, thr, tie=0.0, generator=g) == 0).double()
    assert abs(float(np.corrcoef(b.double().numpy(), idx0.numpy())[0, 1])) < 0.06


def test_backdoor_sampler_is_independent_of_brightness_with_the_same_marginal():
    x = _patches(6000, seed=3)
    b = ce.brightness(x)
    thr = float(b.median())
    g = torch.Generator().manual_seed(2)
    tied = ce.tied_strata(x, thr, tie=0.9, generator=g)
    p_heavy = float((tied == 0).double().mean())
    idx = ce.independent_strata(len(x), (p_heavy, 1 - p_heavy), generator=g)
    dark = (b < thr).numpy()
    heavy = (idx == 0).numpy()
    # 2x2 contingency table brightness x stratum: Pearson chi-square against independence (1 dof)
    table = np.array([[np.sum(dark & heavy), np.sum(dark & ~heavy)], [np.sum(~dark & heavy), np.sum(~dark & ~heavy)]])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    assert chi2 < 10.83  # p > 0.001
    # the same table for the confounded sampler is wildly dependent
    t_heavy = (tied == 0).numpy()
    tab2 = np.array([[np.sum(dark & t_heavy), np.sum(dark & ~t_heavy)], [np.sum(~dark & t_heavy), np.sum(~dark & ~t_heavy)]])
    exp2 = tab2.sum(1, keepdims=True) * tab2.sum(0, keepdims=True) / tab2.sum()
    assert float(((tab2 - exp2) ** 2 / exp2).sum()) > 1000
    # same marginal over strata (binomial error)
    assert abs(heavy.mean() - p_heavy) < 4 * np.sqrt(p_heavy * (1 - p_heavy) / len(x))


def test_apply_strata_uses_each_samples_stratum():
    x = _patches(64)
    idx = torch.arange(64) % 2
    out = ce.apply_strata(x, (GaussianNoise(60.0), GaussianNoise(0.0)), idx, torch.Generator().manual_seed(0))
    assert torch.equal(out[idx == 1], x[idx == 1])
    assert float((out[idx == 0] - x[idx == 0]).std()) > 0.1
    with pytest.raises(ValueError, match="stratum indices"):
        ce.apply_strata(x, (GaussianNoise(1.0),), idx)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="tie must be in"):
        ce.tied_strata(_patches(4), 0.5, tie=1.5)
    with pytest.raises(ValueError, match="summing to 1"):
        ce.independent_strata(4, (0.3, 0.3))
    with pytest.raises(ValueError, match="mode"):
        ce.BackdoorERM(mode="bogus")
    with pytest.raises(TypeError, match="unknown override"):
        ce.backdoor_toy("quick", stepz=3)
    with pytest.raises(ValueError, match="unknown profile"):
        ce.backdoor_toy("huge")


# ------------------------------------------------------------------------------------------ strategies
def _fit(name: str, seed: int, **kw):
    torch.manual_seed(seed)
    model = models.build("dncnn", nf=8, depth=3)
    strat = train.build_strategy(name, **kw)
    cfg = train.TrainConfig(steps=3, batch_size=4, patch_size=16, lr=1e-3, seed=seed, device="cpu", progress=False)
    imgs = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    return train.fit(model, strat, imgs, (GaussianNoise(40.0), GaussianNoise(10.0)), cfg)


@pytest.mark.parametrize("name,kw", [("confounded_erm", {"threshold": 0.5, "tie": 1.0}),
                                     ("backdoor_erm", {"probs": (0.5, 0.5), "mode": "enumerate"}),
                                     ("backdoor_erm", {"probs": (0.3, 0.7), "mode": "sample"})])
def test_strategies_are_registered_and_deterministic(name, kw):
    a, b, c = _fit(name, 0, **kw), _fit(name, 0, **kw), _fit(name, 1, **kw)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.history[-1]["loss"] == b.history[-1]["loss"]
    assert a.counters.images_forwarded == 3 * 4  # equal budget: B images per step for every strategy


# ---------------------------------------------------------------------------------------- evaluation
def test_tiles_and_identity_model_evaluation():
    imgs = [torch.rand(3, 50, 70), torch.rand(3, 40, 40)]
    t = ce.tiles(imgs, 20)
    assert t.shape == (2 * 3 + 2 * 2, 3, 20, 20)
    assert torch.equal(t[1], imgs[0][:, 0:20, 20:40])
    r = ce.ToyRecipe()
    rows = ce.evaluate_toy({"identity": torch.nn.Identity()}, t, threshold=0.5, r=r, seed=0)
    for row in (x for x in rows if x["method"] == "identity"):
        inp = next(x for x in rows if x["method"] == "input" and x["brightness"] == row["brightness"]
                   and x["noise"] == row["noise"])
        assert row["psnr"] == pytest.approx(inp["psnr"])
        assert row["sigma_hat"] == pytest.approx(0.0, abs=1e-6)  # removes nothing
    heavy = [x for x in rows if x["method"] == "input" and x["noise"] == "heavy"]
    assert all(30 < x["sigma_hat"] < 41 for x in heavy)  # realised noise std ~ 40 (less where clipped)


def test_shortcut_index_and_setting_psnr():
    def cells(dark_heavy, bright_heavy, dark_light, bright_light, method="m"):
        out = []
        for (b, nz), s in {("dark", "heavy"): dark_heavy, ("bright", "heavy"): bright_heavy,
                           ("dark", "light"): dark_light, ("bright", "light"): bright_light}.items():
            out.append({"method": method, "brightness": b, "noise": nz, "sigma_hat": s, "psnr": s, "n_tiles": 1})
        return out
    inp = cells(38, 40, 10, 10, "input")
    follows = cells(38, 40, 10, 10) + inp
    assert ce.shortcut_index(follows, "m") == pytest.approx(0.0)
    brightness_driven = cells(40, 30, 20, 10) + inp  # removes 10 more from dark tiles at either noise level
    assert ce.shortcut_index(brightness_driven, "m") == pytest.approx(0.5 * ((10 + 2) + 10))
    assert ce.setting_psnr(follows, "m", "tied") == pytest.approx((38 + 10) / 2)
    assert ce.setting_psnr(follows, "m", "cut") == pytest.approx((10 + 40) / 2)
    with pytest.raises(ValueError, match="setting"):
        ce.setting_psnr(follows, "m", "other")


# ------------------------------------------------------------------------------------------ toy graph
def test_toy_graph_adjusted_matches_truth_and_naive_does_not():
    rows = ce.toy_graph_table(0.8, seeds=(0, 1, 2), n=20_000)
    for r in rows:
        assert r["true"] == pytest.approx(0.6)
        assert abs(r["adjusted"] - r["true"]) < 4 * r["adjusted_se"]
        assert abs(r["adjusted"] - r["simulated"]) < 4 * np.hypot(r["adjusted_se"], r["simulated_se"])
        assert r["naive"] - r["true"] > 20 * r["naive_se"]
        assert abs(r["naive"] - r["exact_naive"]) < 4 * r["naive_se"]
    curve = ce.gap_curve([0.0, 0.5, 1.0], n=20_000)
    gaps = np.array(curve["naive"]) - np.array(curve["true"])
    assert abs(gaps[0]) < 0.03 and gaps[1] > 0.08 and gaps[2] > 0.2  # gap = 0.27 * strength


# -------------------------------------------------------------------------------------------- bridge
def test_dil_bridge_reduces_to_adjusted_risk_and_matches_taylor():
    d0 = ce.dil_bridge_demo(alpha=0.0)
    assert np.allclose(d0["dil"], d0["adjusted"])
    # argmin of sum_i p_i [(t-1)^2 v + t^2 s_i^2] = v / (v + sum_i p_i s_i^2)
    assert d0["argmin_adjusted"] == pytest.approx(1 / (1 + 0.5 * (0.09 + 1.0)), abs=0.005)
    # quadratic risks: DIL(theta) = R(theta) - alpha R'(theta)^2 + O(alpha^2)
    theta = np.array(d0["theta"])
    R = np.array(d0["adjusted"])
    dR = 2 * (theta - 1) + 2 * theta * 0.5 * (0.09 + 1.0)
    for alpha in (1e-2, 5e-3):
        d = np.array(ce.dil_bridge_demo(alpha=alpha)["dil"])
        err = np.abs(d - (R - alpha * dR**2)).max()
        assert err < 20 * alpha**2
    assert np.abs(np.array(ce.dil_bridge_demo(alpha=0.1)["dil"]) - R).max() > 1e-3


# ---------------------------------------------------------------------------------------- experiment
def test_backdoor_toy_quick_structure():
    res = ce.backdoor_toy("quick", seed=0, device="cpu", steps=2, batch_size=4, patch_size=24,
                          model_cfg={"nf": 8, "depth": 3}, eval_side=96, tile=24, graph_n=4000)
    assert set(res) >= {"config", "tables", "claims", "curves", "timing"}
    assert res["config"]["recipe"]["steps"] == 2
    assert 0 < res["config"]["threshold"] < 1
    assert res["config"]["p_heavy"] == pytest.approx(0.5, abs=0.05)  # threshold = median brightness
    summary = {(r["method"], r["setting"]) for r in res["tables"]["summary"]}
    assert summary == {(m, s) for m in ("input", "confounded_erm", "backdoor_erm") for s in ("tied", "cut")}
    cells = res["tables"]["cells"]
    assert {(c["brightness"], c["noise"]) for c in cells} == {(b, n) for b in ("dark", "bright")
                                                               for n in ("heavy", "light")}
    assert len(res["claims"]) == 6
    for c in res["claims"]:
        assert c["paper"] is None and c["verdict"] in ("reproduced", "mixed across seeds",
                                                       "not reproduced at this scale")
    g = res["tables"]["toy_graph"][0]
    assert g["true"] == pytest.approx(0.6) and g["naive"] > g["adjusted"]
