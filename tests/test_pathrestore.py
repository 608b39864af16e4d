"""Path-Restore: region tiling, FLOPs accounting, REINFORCE, shapes and errors, the training schedules, and the
``path-restore`` experiment (profiles, record, claims and their preconditions, plots)."""
import copy
import math

import numpy as np
import pytest

import torch
import torch.nn as nn

from causalir import pathrestore as pr
from causalir.experiments import claims as C
from causalir.experiments import path_restore as X
from causalir.experiments import profiles

CFG = pr.MultiPathConfig(nf=8, num_blocks=3, path_blocks=(0, 1, 2), global_skip=True)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return pr.PathRestore(CFG).eval()


# ------------------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize("shape", [(63, 63), (100, 131), (116, 64), (40, 90), (200, 170)])
def test_tiling_identity_is_exact(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, *shape, generator=g)
    res = pr.restore_by_regions(nn.Identity(), x, flops_per_region=0)
    assert res.output.shape == x.shape
    assert torch.allclose(res.output, x, atol=1e-6)
    # every pixel covered; regions as prescribed: 63 (or the short side), stride 53, last flush with the border
    rh, rw = min(63, shape[0]), min(63, shape[1])
    assert res.region == (rh, rw)
    for t, l in res.positions:
        assert 0 <= t <= shape[0] - rh and 0 <= l <= shape[1] - rw


def test_region_starts():
    assert pr.region_starts(63) == [0]
    assert pr.region_starts(116) == [0, 53]
    assert pr.region_starts(117) == [0, 53, 54]
    assert pr.region_starts(200) == [0, 53, 106, 137]
    with pytest.raises(ValueError, match="stride"):
        pr.region_starts(100, 63, 0)
    with pytest.raises(ValueError, match="no gaps"):
        pr.region_starts(100, 20, 53)


def test_merge_averages_overlaps():
    x = torch.zeros(1, 1, 63, 116)
    regions, pos, r = pr.extract_regions(x)
    vals = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, *r)
    out = pr.merge_regions(vals, pos, (63, 116))
    assert float(out[0, 0, 0, 0]) == 1.0 and float(out[0, 0, 0, 115]) == 3.0
    assert float(out[0, 0, 0, 60]) == 2.0  # covered by both regions (53..62)


def test_extract_regions_rejects_batches():
    with pytest.raises(ValueError, match=r"\(1,C,H,W\)"):
        pr.extract_regions(torch.rand(2, 3, 70, 70))


# ------------------------------------------------------------------------------------------------- FLOPs
def test_flops_fixed_paths_match_flop_counter(model):
    g = torch.Generator().manual_seed(2)
    a = torch.randint(3, (6, CFG.num_blocks), generator=g)
    x = torch.rand(6, 3, 37, 45, generator=g)
    measured = pr.measured_flops(lambda z: model.rollout(z, "fixed", actions=a), x)
    analytic = pr.region_flops(CFG, a, 37, 45, pathfinder=False)
    assert measured == int(analytic.sum())
    # and equals the sum over the chosen paths, block by block
    t = pr.flop_table(CFG, 37, 45)
    by_hand = sum(t.head_tail + sum(t.shared + t.paths[int(k)] for k in row) for row in a)
    assert by_hand == measured
    assert t.paths[0] == 0 and t.paths[2] == 2 * t.paths[1]


def test_flops_with_pathfinder_match_flop_counter(model):
    x = torch.rand(5, 3, 63, 63, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        nn.init.normal_(model.pathfinder.out.weight, std=2.0)  # make greedy choices differ across regions
    ro = model.rollout(x, "greedy")
    measured = pr.measured_flops(lambda z: model.rollout(z, "greedy"), x)
    assert measured == int(pr.region_flops(CFG, ro.actions).sum())


def test_flops_of_whole_image_inference(model):
    x = torch.rand(1, 3, 100, 120, generator=torch.Generator().manual_seed(4))
    res = pr.restore_by_regions(model, x)
    assert res.flops.shape == (len(res.positions),)
    assert torch.equal(res.flops, pr.region_flops(CFG, res.actions))
    # a plain network costs what the flop counter measures on one region
    dn = nn.Conv2d(3, 3, 3, padding=1)
    res2 = pr.restore_by_regions(dn, x)
    assert res2.mean_flops == pr.conv_flops(3, 3, 3, 63, 63)


def test_pathfinder_is_under_three_percent_in_reference_config():
    share = pr.pathfinder_share(pr.MultiPathConfig())
    assert 0 < share < 0.03
    t = pr.flop_table(pr.MultiPathConfig())
    # reference: 146M MAC per 64->64 conv on 63x63, ~1.77 GMAC all-bypass, ~3.53 GMAC all-on
    assert abs(pr.conv_flops(64, 64, 3, 63, 63) / 2 - 146.3e6) < 0.1e6
    assert abs(t.shortest / 2 - 1.77e9) < 0.01e9 and abs(t.longest / 2 - 3.53e9) < 0.01e9


def test_matched_dncnn_has_longest_path_flops():
    from causalir import models

    cfg = pr.MultiPathConfig(nf=8, num_blocks=2)
    dn = models.build("dncnn", nf=8, depth=pr.matched_dncnn_depth(cfg))
    assert pr.measured_flops(dn, torch.zeros(1, 3, 63, 63)) == pr.flop_table(cfg).longest


# --------------------------------------------------------------------------------------------- REINFORCE
def test_reinforce_gradient_sign_on_two_armed_bandit():
    """Arm 1 pays more: one gradient-descent step on the surrogate must raise log pi(arm 1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(2, requires_grad=True)
    pay = torch.tensor([0.0, 1.0])
    logp = torch.log_softmax(logits, 0)
    a = torch.multinomial(logp.exp().detach().expand(4000, 2), 1, generator=g).squeeze(1)
    ret = pay[a][:, None]
    loss = pr.reinforce_loss(logp[a][:, None], ret, baseline=ret.mean().expand_as(ret))
    loss.backward()
    assert logits.grad[1] < 0 < logits.grad[0]  # descent increases logit 1
    # the estimate matches the exact gradient of -E[R] = -sum_a pi_a R_a (which is (0.25, -0.25) at uniform)
    assert torch.allclose(logits.grad, torch.tensor([0.25, -0.25]), atol=0.05)


def test_reinforce_learns_two_armed_bandit():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    pay = torch.tensor([1.0, 0.2])  # arm 0 better
    for _ in range(60):
        logp = torch.log_softmax(logits, 0)
        a = torch.multinomial(logp.exp().detach().expand(64, 2), 1, generator=g).squeeze(1)
        ret = (pay[a] + 0.1 * torch.randn(64, generator=g))[:, None]
        opt.zero_grad()
        pr.reinforce_loss(logp[a][:, None], ret, baseline=ret.mean().expand_as(ret)).backward()
        opt.step()
    assert torch.softmax(logits, 0)[0] > 0.9


def test_difficulty_rewards_and_returns():
    a = torch.tensor([[0, 1, 1], [1, 0, 2]])
    mse_in = torch.tensor([0.01, 0.02])
    mse_out = torch.tensor([0.002, 0.01])
    r = pr.difficulty_rewards(a, mse_in, mse_out, p=0.5, l0=0.004, path_blocks=(0, 1, 2))
    d = torch.tensor([0.5, 1.0])  # min(mse_out / L0, 1)
    gain = mse_in - mse_out
    expected = torch.tensor([[0.0, -0.5, -0.5], [-0.5, 0.0, -1.0]])
    expected[:, -1] += d * gain
    assert torch.allclose(r, expected)
    # with an action-independent difficulty, a better restoration always earns more (not so with d = d(mse_out))
    m = torch.linspace(1e-4, 4e-3, 50)
    mse_in = torch.full((50,), 0.03)
    a0 = torch.zeros(50, 3, dtype=torch.long)
    fixed = pr.difficulty_rewards(a0, mse_in, m, 0.0, 0.004, (0, 1), difficulty_mse=torch.full((50,), 2e-3))[:, -1]
    own = pr.difficulty_rewards(a0, mse_in, m, 0.0, 0.004, (0, 1))[:, -1]
    assert bool((fixed.diff() < 0).all()) and bool((own.diff() > 0).all())
    G = pr.returns_to_go(r)
    assert torch.allclose(G[:, 0], r.sum(1)) and torch.allclose(G[:, -1], r[:, -1])
    G2 = pr.returns_to_go(r, gamma=0.5)
    assert torch.allclose(G2[:, 1], r[:, 1] + 0.5 * r[:, 2])


def test_larger_penalty_favours_bypass_gradient(model):
    """With p > 0 and no loss gain, the policy gradient pushes every block towards the bypass."""
    x = torch.rand(32, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    ro = model.rollout(x, "sample", generator=torch.Generator().manual_seed(6))
    zero = torch.zeros(32)
    r = pr.difficulty_rewards(ro.actions, zero, zero, p=1.0, l0=1.0, path_blocks=CFG.path_blocks)
    loss = pr.reinforce_loss(ro.log_probs, pr.returns_to_go(r))
    loss.backward()
    gb = model.pathfinder.out.bias.grad
    assert gb[0] < 0 and gb[0] < gb[1] and gb[0] < gb[2]  # descent raises the bypass logit most


# ----------------------------------------------------------------------------------- shapes, ranges, errors
def test_rollout_shapes_and_modes(model):
    x = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(7))
    for mode in ("greedy", "sample", "random"):
        ro = model.rollout(x, mode, generator=torch.Generator().manual_seed(0))
        assert ro.output.shape == x.shape and ro.actions.shape == (6, CFG.num_blocks)
        assert int(ro.actions.min()) >= 0 and int(ro.actions.max()) < 3
    ro = model.rollout(x, "sample", generator=torch.Generator().manual_seed(0))
    assert ro.log_probs.shape == (6, 3) and bool((ro.log_probs <= 0).all())
    assert torch.allclose(ro.log_probs, torch.full_like(ro.log_probs, -np.log(3)), atol=1e-6)  # uniform init
    assert torch.allclose(model(x), model.rollout(x, "greedy").output)


def test_grouped_paths_equal_per_sample(model):
    """Grouping samples by path gives the same output as running each sample alone, and gradients flow."""
    x = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(8), requires_grad=True)
    a = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 1], [0, 0, 0], [2, 1, 0]])
    y = model.rollout(x, "fixed", actions=a).output
    for n in range(5):
        yn = model.rollout(x[n:n + 1], "fixed", actions=a[n:n + 1]).output
        assert torch.allclose(y[n], yn[0], atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_restore_keeps_shape_and_range(model):
    x = torch.rand(1, 3, 90, 70, generator=torch.Generator().manual_seed(9))
    res = pr.restore_by_regions(model, x)
    assert res.output.shape == x.shape
    assert float(res.output.min()) >= 0 and float(res.output.max()) <= 1
    assert res.path_map().shape == (2, 2)


def test_determinism_under_seed(model):
    x = torch.rand(4, 3, 24, 24)
    a1 = model.rollout(x, "sample", generator=torch.Generator().manual_seed(3)).actions
    a2 = model.rollout(x, "sample", generator=torch.Generator().manual_seed(3)).actions
    assert torch.equal(a1, a2)


def test_clear_errors(model):
    with pytest.raises(ValueError, match="bypass first"):
        pr.MultiPathConfig(path_blocks=(1, 2))
    with pytest.raises(ValueError, match="unknown mode"):
        model.rollout(torch.rand(1, 3, 16, 16), "best")
    with pytest.raises(ValueError, match=r"actions of shape \(2, 3\)"):
        model.rollout(torch.rand(2, 3, 16, 16), "fixed", actions=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in"):
        model.rollout(torch.rand(1, 3, 16, 16), "fixed", actions=torch.full((1, 3), 5))
    with pytest.raises(ValueError, match=r"\(N,C,H,W\)"):
        model.rollout(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pr.restore_by_regions(model, torch.full((1, 3, 70, 70), 2.0))
    with pytest.raises(ValueError, match="baseline"):
        pr.TrainRecipe(baseline="critic")
    with pytest.raises(ValueError, match="unknown task"):
        pr.tasks(["sr"])


def _tiny_training(batch: int):
    """A 2-block, 4-feature Path-Restore, a patch sampler over two random images and a noise range."""
    from causalir import data, distortions as D

    torch.manual_seed(0)
    cfg = pr.MultiPathConfig(nf=4, num_blocks=2, global_skip=True)
    imgs = [torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return cfg, pr.PathRestore(cfg), data.PatchSampler(imgs, 16, batch, "cpu"), D.GaussianNoise((0.0, 50.0))


def test_training_stages_run_and_change_weights():
    cfg, m, s, noise = _tiny_training(4)
    rec = pr.TrainRecipe(stage1_steps=3, stage2_steps=3, batch_size=4, patch_size=16)
    pf0 = [p.clone() for p in m.pathfinder.parameters()]
    head0 = m.head.weight.clone()
    pr.train_stage1(m, s, lambda c, g: noise(c, g), rec, torch.Generator().manual_seed(0))
    assert not torch.equal(head0, m.head.weight)
    assert all(torch.equal(a, b) for a, b in zip(pf0, m.pathfinder.parameters()))  # stage I: random paths only
    static = pr.PathRestore(cfg)
    w0 = static.blocks[0].paths[1][0].conv1.weight.clone()
    pr.train_stage1(static, s, lambda c, g: noise(c, g), rec, torch.Generator().manual_seed(0), fixed_path=1, steps=2)
    assert not torch.equal(w0, static.blocks[0].paths[1][0].conv1.weight)  # the long path is trained
    log = []
    pr.train_stage2(m, s, lambda c, g: noise(c, g), rec, 1e-5, torch.Generator().manual_seed(1), log)
    assert not all(torch.equal(a, b) for a, b in zip(pf0, m.pathfinder.parameters()))
    assert log and log[-1]["stage"] == 2
    # pf_lr_stage2 sets the pathfinder's stage-II rate: the same run's pathfinder moves in proportion to it
    moves = []
    for lr in (None, 1e-4):
        m2 = copy.deepcopy(m)
        before = [q.clone() for q in m2.pathfinder.parameters()]
        r2 = pr.TrainRecipe(stage2_steps=3, batch_size=4, patch_size=16, pf_lr=1e-2, pf_lr_stage2=lr)
        pr.train_stage2(m2, s, lambda c, g: noise(c, g), r2, 1e-5, torch.Generator().manual_seed(1))
        moves.append(max(float((a - b).abs().max()) for a, b in zip(before, m2.pathfinder.parameters())))
    assert 0 < moves[1] < moves[0] / 20, moves


def test_choose_penalty_prefers_the_baseline_then_the_own_all_long_network():
    v = {"DnCNN": {"psnr": 29.0, "gflops": 0.30}, "all long": {"psnr": 28.5, "gflops": 0.30},
         "PR p=0": {"psnr": 28.52, "gflops": 0.30}, "PR p=1e-05": {"psnr": 28.49, "gflops": 0.25},
         "PR p=2e-05": {"psnr": 28.44, "gflops": 0.17}, "PR p=4e-05": {"psnr": 28.3, "gflops": 0.15}}
    assert X.choose_penalty(v, "DnCNN", "all long", 0.1) == ("PR p=2e-05", "all-long")
    assert X.choose_penalty(v, "DnCNN", "all long", 0.05) == ("PR p=1e-05", "all-long")
    assert X.choose_penalty(v, "DnCNN", "all long", 0.75) == ("PR p=4e-05", "baseline")
    low = {**v, "all long": {"psnr": 30.0, "gflops": 0.3}}
    assert X.choose_penalty(low, "DnCNN", "all long", 0.1) == ("PR p=0", "best PSNR")
    with pytest.raises(ValueError, match="no 'PR p=...' method"):
        X.choose_penalty({"DnCNN": v["DnCNN"]}, "DnCNN", "all long", 0.1)
    with pytest.raises(ValueError, match="the reference 'nope'"):
        X.choose_penalty(v, "nope", "all long", 0.1)


def test_path_map_overlay_and_widget_function():
    import matplotlib

    matplotlib.use("Agg")
    img = torch.rand(3, 100, 120)
    _, pos, r = pr.extract_regions(img[None])
    grid = [[0, 1, 2], [3, 0, 1]]
    res = {"config": {"net": {"num_blocks": 3}},
           "tables": {"path_maps": {"denoise": {"PR p=0": {"n10": {"grid": grid, "region": list(r), "stride": 53,
                                                                    "positions": [list(q) for q in pos]}}}}}}
    m = X.path_map_overlay(res, img)
    assert m.shape == (100, 120)
    assert m[0, 0] == 0 and m[99, 119] == 1 and m[0, 119] == 2
    fig = X.show_path_map(res, img, 0)
    assert fig is not None
    with pytest.raises(IndexError, match="p_index"):
        X.show_path_map(res, img, 3)


def test_stage_schedule_is_the_former_private_cosine():
    """The stages use train.make_optimizer / make_scheduler; the learning rates are bit-identical to the private
    cosine they had before (0.02 + 0.98 * (1 + cos(pi * min(s, T) / T)) / 2), at every step."""
    for steps in (1, 7, 40):
        w = nn.Parameter(torch.zeros(1))
        opt, sched = pr._adam_cosine([w], 2e-3, steps)
        assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.9, 0.999)
        for s in range(steps + 3):
            old = 2e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
            assert opt.param_groups[0]["lr"] == old, (steps, s)
            opt.step()
            sched.step()
    _, none = pr._adam_cosine([nn.Parameter(torch.zeros(1))], 1e-3, 5, schedule=False)
    assert none is None


def test_profiles_and_train_task_validation():
    p = profiles.select(X.PROFILES, "quick", {"recipe": {"stage1_steps": 3}, "tasks": ["denoise"]})
    assert p.recipe.stage1_steps == 3 and p.tasks == ("denoise",)
    with pytest.raises(TypeError, match="unknown override"):
        profiles.select(X.PROFILES, "quick", {"bogus": 1})
    with pytest.raises(ValueError, match="p_grid"):
        profiles.select(X.PROFILES, "quick", {"tasks": ["denoise", "mixed"], "p_grid": {"denoise": (0.0,)}})
    with pytest.raises(ValueError, match="baseline"):
        pr.train_task(pr.tasks(["denoise"])[0], CFG, pr.TrainRecipe(), (0.0,), 0, torch.device("cpu"), "vgg")


# ------------------------------------------------------------------------------------------------ claims
def _record(gain=0.0, routes=((0, 1, 1), (1, 1, 1)), restores=True, with_regions=True):
    """A synthetic path-restore record: 4 test images, the chosen PR p=1e-05 vs the static baseline."""
    g = np.random.default_rng(0)
    base, sel = X.BASELINE_NAMES["resnet"], "PR p=1e-05"
    labels = ["noise σ=10", "noise σ=50", "linear noise σ=0-50", "peaks noise σ=0-50"]
    test, regions = [], []
    for lab in labels:
        for i in range(4):
            inp = 20.0 + g.normal(0, 1)
            out = inp + (2.0 if restores else -1.0)
            test.append({"task": "denoise", "method": base, "distortion": lab, "image": i, "psnr": out,
                         "input_psnr": inp, "gflops": 0.3, "complex_paths": None})
            test.append({"task": "denoise", "method": sel, "distortion": lab, "image": i,
                         "psnr": out + gain + g.normal(0, 0.01), "input_psnr": inp, "gflops": 0.2,
                         "complex_paths": 1.0})
            for k in range(6):
                a = list(routes[k % len(routes)])
                regions.append({"task": "denoise", "method": sel, "distortion": lab, "image": i, "region": k,
                                "paths": a, "complex_paths": sum(v > 0 for v in a),
                                "input_mse": 0.01 * (1 + sum(v > 0 for v in a)) + 1e-4 * k, "gflops": 0.2})
    tables = {"test": test, "selected": {"denoise": {"method": sel, "matched_on_val": True}},
              "flops": {"pathfinder_per_block": 1e6, "pathfinder_share_paper_config": 0.0029},
              "path_maps": {"denoise": {sel: {lab: {"grid": [[1.0, 2.0]]} for lab in labels}}}}
    if with_regions:
        tables["regions"] = regions
    config = {"baseline": base, "tol_db": 0.05, "net": {"num_blocks": 3, "nf": 8},
              "tasks": {"denoise": {"train": "noise", "test": labels}}}
    return {"config": config, "tables": tables}


def test_claims_use_paired_images_and_preconditions():
    good = X.claims(_record())
    assert len(good) == 8 and all(c.verdict in C.VERDICTS for c in good)
    mix = next(c for c in good if "mixes paths" in c.claim)      # half the regions take (0, 1, 1): 0.5 - 0.3
    assert mix.ours == pytest.approx(0.2) and mix.verdict == C.REPRODUCED and mix.n == 4
    gap = next(c for c in good if "at noise σ=50" in c.claim)
    assert gap.verdict == C.REPRODUCED and gap.n == 4 and gap.over == "images"   # |gap - 0.0| <= 0.1
    speed = next(c for c in good if "faster" in c.claim)
    assert speed.ours == pytest.approx(0.5) and speed.verdict == C.REPRODUCED and speed.n == 16
    hard = next(c for c in good if "harder regions" in c.claim)
    assert hard.verdict == C.REPRODUCED and hard.n == 16
    # one route on every region: every pathfinder claim is inconclusive
    one = X.claims(_record(routes=((1, 1, 1),)))
    assert all(c.verdict == C.INCONCLUSIVE and "degenerate" in c.why for c in one if "pathfinder <" not in c.claim)
    # neither model restores: the comparisons are inconclusive
    hollow = X.claims(_record(restores=False))
    assert all("not a restorer yet" in c.why for c in hollow if "gap" in c.claim or "faster" in c.claim)
    # far worse PSNR: the speed-up is not at comparable PSNR
    worse = next(c for c in X.claims(_record(gain=-0.5)) if "faster" in c.claim)
    assert worse.verdict == C.INCONCLUSIVE and "below -0.1 dB" in worse.why


def test_claims_on_a_record_without_regions():
    """Records written before the per-region table existed are re-judged without crashing."""
    old = X.claims(_record(with_regions=False))
    hard = next(c for c in old if "harder regions" in c.claim)
    assert hard.verdict == C.INCONCLUSIVE and "per-region table" in hard.why and hard.ours is None
    gap = next(c for c in old if "at noise σ=50" in c.claim)
    assert gap.verdict == C.REPRODUCED                     # per-image rows were there already


def test_path_restore_run_records_regions_and_keeps_models():
    tiny = {"recipe": {"stage1_steps": 2, "stage2_steps": 2, "batch_size": 2, "patch_size": 16},
            "dncnn_steps": 2, "p_grid": {"denoise": [0.0]}, "eval_side": 64}
    rec = X.run("quick", 0, "cpu", keep_models=True, **tiny)
    t = rec["tables"]
    assert set(rec["models"]) == {"denoise/baseline", "denoise/stage I", "denoise/PR p=0",
                                  "denoise/FLOPs-matched static"}
    # 7 claims of the seed + ours: the route mixes paths, saves FLOPs against the all-long network, beats the
    # FLOPs-matched static network
    assert len(rec["claims"]) == 10 and all(c["verdict"] in C.VERDICTS for c in rec["claims"])
    sel = t["selected"]["denoise"]
    matched = next(c for c in rec["claims"] if "FLOPs-matched static" in c["claim"])
    assert sel["static_matched"] in {r["method"] for r in t["test"]}
    assert "static has at least the FLOPs" in [p["name"] for p in matched["checks"]]
    # the shipped denoisers whose model cards carry metrics are models the run keeps
    assert set(X.card_tasks(rec)) == {"denoise/PR p=0"} and set(X.card_tasks(rec)) <= set(rec["models"])
    assert X.EXPERIMENT.card_tasks is X.card_tasks
    static = X.FixedPaths(rec["models"]["denoise/FLOPs-matched static"], tuple(sel["static_paths"]))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(static(x)).all()
    head = t["stage1_headroom"]["denoise"]
    assert head["regions"] > 0 and 0 <= head["share_long_better"] <= 1
    saving = next(c for c in rec["claims"] if "all-long" in c["claim"])
    assert [p["name"] for p in saving["checks"]] == ["non-degenerate", "long path helps", "<= 0.1 dB loss"]
    n_img, n_dist = len(rec["config"]["test_images"]), len(rec["config"]["tasks"]["denoise"]["test"])
    assert {(r["distortion"], r["image"]) for r in t["regions"]} == {(d, i) for d in rec["config"]["tasks"][
        "denoise"]["test"] for i in range(n_img)}
    assert len({r["distortion"] for r in t["regions"]}) == n_dist
    r0 = t["regions"][0]
    assert len(r0["paths"]) == rec["config"]["net"]["num_blocks"] and r0["complex_paths"] == sum(
        v > 0 for v in r0["paths"])


# --------------------------------------------------------------- the pathfinder on a frozen network (issue 12)
def test_loo_baseline_is_the_mean_of_the_other_samples():
    ret = torch.arange(12.0).view(6, 2)          # K=3 samples of B=2 regions, N=2 blocks
    b = pr.loo_baseline(ret, 3)
    r = ret.view(3, 2, 2)
    for k in range(3):
        others = [j for j in range(3) if j != k]
        torch.testing.assert_close(b.view(3, 2, 2)[k], r[others].mean(0))
    with pytest.raises(ValueError, match="K=4"):
        pr.loo_baseline(ret, 4)


def test_frozen_network_pathfinder_training_moves_only_the_pathfinder_toward_cheap_paths_under_a_big_penalty():
    _, m, s, noise = _tiny_training(8)
    net0 = {n: q.clone() for n, q in m.named_parameters() if not n.startswith("pathfinder.")}
    x = s.sample(torch.Generator().manual_seed(5))

    def p_bypass():
        with torch.no_grad():
            ro = m.rollout(x.repeat(8, 1, 1, 1), "sample", generator=torch.Generator().manual_seed(0))
        return float((ro.actions == 0).float().mean())

    before = p_bypass()
    rec = pr.TrainRecipe(pf_steps=40, pf_samples=4, batch_size=8, patch_size=16, pf_lr=1e-2, entropy_coef=0.0)
    log = []
    pr.train_pathfinder(m, s, lambda c, g: noise(c, g), rec, 10.0, torch.Generator().manual_seed(1), log)
    assert all(torch.equal(q, net0[n]) for n, q in m.named_parameters() if n in net0)   # the network is frozen
    assert all(q.requires_grad for q in m.parameters())                                  # and given back
    assert p_bypass() > before + 0.2 and log[-1]["stage"].startswith("pathfinder")


# ------------------------------------------------------------------ FLOPs-matched static network, data-set L0
def test_matched_static_paths_round_up_to_whole_blocks_and_cost_at_least_the_target(model):
    t = pr.flop_table(CFG)
    step = max(t.paths) - min(t.paths)
    assert pr.matched_static_paths(CFG, t.shortest) == (0, 0, 0)
    assert pr.matched_static_paths(CFG, t.longest) == (2, 2, 2)
    assert pr.matched_static_paths(CFG, 10 * t.longest) == (2, 2, 2)        # never more than every block
    for target in (t.shortest + 0.5 * step, t.shortest + step, t.shortest + 1.01 * step, t.shortest + 2.5 * step):
        paths = pr.matched_static_paths(CFG, target)
        k = sum(1 for q in paths if q == 2)
        assert paths == (2,) * k + (0,) * (3 - k)
        cost = pr.measured_flops(pr.FixedPaths(model, paths), torch.zeros(1, 3, pr.REGION, pr.REGION))
        assert cost >= target                                      # the static net never has less computation
        if k:                                                      # ... and one long block fewer would have
            fewer = (2,) * (k - 1) + (0,) * (4 - k)
            assert pr.measured_flops(pr.FixedPaths(model, fewer), torch.zeros(1, 3, pr.REGION, pr.REGION)) < target


def test_fixed_paths_per_block_equal_a_fixed_rollout_and_reject_bad_routes(model):
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    a = torch.tensor([[2, 0, 1], [2, 0, 1]])
    torch.testing.assert_close(pr.FixedPaths(model, (2, 0, 1))(x), model.rollout(x, "fixed", actions=a).output)
    torch.testing.assert_close(pr.FixedPaths(model, 1)(x), pr.FixedPaths(model, (1, 1, 1))(x))
    with pytest.raises(ValueError, match=r"FixedPaths.path: expected one path per block \(3\)"):
        pr.FixedPaths(model, (1, 1))
    with pytest.raises(ValueError, match=r"FixedPaths.path\[1\]"):
        pr.FixedPaths(model, (1, 7, 0))


def test_l0_from_regions_is_the_quantile_of_the_long_path_error():
    cfg, m, s, noise = _tiny_training(8)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    l0 = pr.l0_from_regions(m, s, lambda c, gg: noise(c, gg), 0.5, g(), batches=3)
    gen, errs = g(), []
    long_ = pr.FixedPaths(m, m.num_paths - 1)
    with torch.no_grad():
        for _ in range(3):
            c = s.sample(gen)
            errs.append(pr.per_sample_mse(long_(noise(c, gen)), c))
    assert l0 == pytest.approx(float(np.quantile(torch.cat(errs).double().numpy(), 0.5)), rel=1e-9)
    hi = pr.l0_from_regions(m, s, lambda c, gg: noise(c, gg), 0.9, g(), batches=3)
    assert hi > l0
    with pytest.raises(ValueError, match="TrainRecipe.l0_quantile"):
        pr.TrainRecipe(l0_quantile=1.5)


# ------------------------------------------------------ the exact expected reward over every routing (issue 12)
def test_all_routes_enumerates_every_routing_once():
    r = pr.all_routes(3, 2)
    assert r.tolist() == [[a, b] for a in range(3) for b in range(3)]
    assert len({tuple(v) for v in pr.all_routes(2, 4).tolist()}) == 16


def test_exact_policy_loss_is_the_expected_return_and_training_on_it_raises_it():
    cfg, m, s, noise = _tiny_training(6)
    rec = pr.TrainRecipe(batch_size=6, patch_size=16, pf_lr=5e-2, pf_steps=15, pf_exact=True, entropy_coef=0.0)
    gen = torch.Generator().manual_seed(0)
    clean = s.sample(gen)
    noisy = noise(clean, gen)

    def expected(model):
        """sum_r pi(r|x) A(x, r) by one 'score' rollout per routing (the loss computes all at once)."""
        routes = pr.all_routes(model.num_paths, cfg.num_blocks)
        with torch.no_grad():
            gmse = pr.per_sample_mse(model.rollout(noisy, "greedy").output, clean)
            rets, probs = [], []
            for r in routes:
                a = r.expand(noisy.shape[0], -1)
                ro = model.rollout(noisy, "score", actions=a)
                mse = pr.per_sample_mse(ro.output, clean)
                rets.append(pr.difficulty_rewards(a, pr.per_sample_mse(noisy, clean), mse, 1e-4, rec.l0,
                                                  cfg.path_blocks, gmse).sum(1))
                probs.append(ro.log_probs.sum(1).exp())
            ret, prob = torch.stack(rets), torch.stack(probs)
        adv = ret - ret.mean(0, keepdim=True)
        return float((prob * adv / adv.std()).sum(0).mean()), prob

    before, prob = expected(m)
    torch.testing.assert_close(prob.sum(0), torch.ones(noisy.shape[0]))          # a distribution over routings
    loss, info = pr.exact_policy_loss(m, noisy, clean, rec, 1e-4)
    assert float(-loss.detach()) == pytest.approx(before, rel=1e-4)               # the loss is that expectation
    fixed = iter([clean] * rec.pf_steps)
    class Same:                                                                   # the same batch every step
        def sample(self, g):
            return next(fixed)
    pr.train_pathfinder(m, Same(), lambda c, g: noisy, rec, 1e-4, torch.Generator().manual_seed(1))
    after, _ = expected(m)
    assert after > before + 0.05, (before, after)


def test_route_tree_matches_one_rollout_per_routing():
    """The prefix tree gives every routing's output MSE and log pi(r|x), and the greedy routing, exactly as one
    'score' rollout per routing and a greedy rollout do (3 blocks of 3 paths: 27 routings)."""
    from causalir import data, distortions as D

    torch.manual_seed(0)
    cfg = pr.MultiPathConfig(nf=4, num_blocks=3, path_blocks=(0, 1, 2), global_skip=True)
    m = pr.PathRestore(cfg)
    for q in m.pathfinder.out.parameters():           # a non-uniform policy (its output layer starts at zero)
        torch.nn.init.normal_(q, std=0.5)
    imgs = [torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gen = torch.Generator().manual_seed(0)
    clean = data.PatchSampler(imgs, 16, 5, "cpu").sample(gen)
    noisy = D.GaussianNoise(25.0)(clean, gen)
    tree = pr.route_tree(m, noisy, clean)
    logp, greedy = pr.tree_log_probs(m.pathfinder, tree)
    routes = pr.all_routes(3, 3)
    assert tree.mse.shape == logp.shape == (27, 5) and [f.shape[0] for f in tree.feats] == [5, 15, 45]
    with torch.no_grad():
        for i, r in enumerate(routes):
            ro = m.rollout(noisy, "score", actions=r.expand(5, -1))
            torch.testing.assert_close(tree.mse[i], pr.per_sample_mse(ro.output, clean), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(logp[i], ro.log_probs.sum(1), rtol=1e-5, atol=1e-6)
        g = m.rollout(noisy, "greedy").actions
    assert torch.equal(routes[greedy], g)
    torch.testing.assert_close(logp.exp().sum(0), torch.ones(5))
    with pytest.raises(ValueError, match="route_tree clean"):
        pr.route_tree(m, noisy, clean[:2])


def test_pathfinders_trained_together_equal_each_trained_alone():
    """train_pathfinders shares one route tree per batch across penalties: each p's pathfinder ends exactly where
    training it alone on the same batches ends; networks that differ are refused."""
    cfg, m, s, noise = _tiny_training(4)
    rec = pr.TrainRecipe(batch_size=4, patch_size=16, pf_lr=5e-2, pf_steps=4, pf_exact=True, pf_tau=0.5,
                         pf_norm="region")
    distort = lambda c, g: noise(c, g)  # noqa: E731
    together = pr.train_pathfinders({0.0: copy.deepcopy(m), 1e-3: copy.deepcopy(m)}, s, distort, rec,
                                    torch.Generator().manual_seed(3))
    for p in (0.0, 1e-3):
        alone = pr.train_pathfinder(copy.deepcopy(m), s, distort, rec, p, torch.Generator().manual_seed(3))
        for a, b in zip(alone.pathfinder.parameters(), together[p].pathfinder.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = [torch.equal(a, b) for a, b in zip(together[0.0].pathfinder.parameters(),
                                                 together[1e-3].pathfinder.parameters())]
    assert not all(moved)                              # the penalty matters
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.head.weight.add_(0.1)
    with pytest.raises(ValueError, match=r"models\[0.001\]: its network differs"):
        pr.train_pathfinders({0.0: m, 1e-3: other}, s, distort, rec, torch.Generator())
    with pytest.raises(ValueError, match="pf_exact=True"):
        pr.train_pathfinders({0.0: m}, s, distort, pr.TrainRecipe(), torch.Generator())


def test_region_normalised_advantages_weigh_every_region_alike():
    """pf_norm='region' standardises each region's advantages over its routings: scaling one region's noise (and so
    its return differences) leaves its soft target unchanged, unlike the batch-wise standardisation."""
    cfg, m, s, noise = _tiny_training(4)
    gen = torch.Generator().manual_seed(0)
    clean = s.sample(gen)
    noisy = noise(clean, gen)
    for norm in ("batch", "region"):
        rec = pr.TrainRecipe(batch_size=4, patch_size=16, pf_exact=True, pf_tau=0.5, pf_norm=norm)
        loss, _ = pr.exact_policy_loss(m, noisy, clean, rec, 1e-4)
        assert torch.isfinite(loss)
    grads = []
    for norm in ("batch", "region"):     # the same uniform policy, different soft targets: different gradients
        m.zero_grad()
        pr.exact_policy_loss(m, noisy, clean, pr.TrainRecipe(pf_exact=True, pf_tau=0.5, pf_norm=norm), 1e-4)[0].backward()
        grads.append(torch.cat([q.grad.flatten() for q in m.pathfinder.parameters() if q.grad is not None]))
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(ValueError, match="TrainRecipe.pf_norm"):
        pr.TrainRecipe(pf_norm="global")
