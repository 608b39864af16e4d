"""DIL strategies: meta-gradients against finite differences and hand computations, equivalences between the
variants, the released algorithm by hand, accounting, resume and devices."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from causalir import data, dil, distortions, models, train
from causalir.dil import Tasks, meta_gradient, meta_objective

torch.set_num_threads(1)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, padding=1)).double()


def make_tasks(k: int, b: int = 2, p: int = 6, seed: int = 1, paired: bool = True) -> Tasks:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(k, b, 3, p, p, generator=g, dtype=torch.float64)
    yo = y if paired else torch.rand(k, b, 3, p, p, generator=g, dtype=torch.float64)
    xi = y + 0.2 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    xo = yo + 0.3 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return Tasks(xi, y, xo, yo, [], [])


def flat(g: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in g.values()])


# ---------------------------------------------------------------------------------------- meta-gradients
@pytest.mark.parametrize("serial", [False, True], ids=["ps", "ss"])
def test_second_order_meta_gradient_matches_finite_differences(serial):
    net, tasks, alpha = tiny_net(), make_tasks(3), 0.5
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    g2, _ = meta_gradient(net, tasks, alpha, serial=serial, second_order=True, loss_fn=F.mse_loss)
    g1, _ = meta_gradient(net, tasks, alpha, serial=serial, second_order=False, loss_fn=F.mse_loss)
    gen = torch.Generator().manual_seed(3)
    eps = 1e-6
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in theta.items()}
        plus = meta_objective(net, tasks, alpha, serial=serial, loss_fn=F.mse_loss,
                              params={k: theta[k] + eps * v[k] for k in theta})
        minus = meta_objective(net, tasks, alpha, serial=serial, loss_fn=F.mse_loss,
                               params={k: theta[k] - eps * v[k] for k in theta})
        fd = float((plus - minus) / (2 * eps))
        exact = float(flat(g2) @ flat(v))
        assert exact == pytest.approx(fd, rel=1e-5, abs=1e-8)
        # the check is sensitive: the first-order approximation is measurably off at this alpha
        assert abs(float(flat(g1) @ flat(v)) - fd) > 1e-4 * max(1.0, abs(fd))


@pytest.mark.parametrize("serial", [False, True], ids=["parallel", "serial"])
def test_first_order_is_sum_of_outer_gradients_at_the_virtual_weights(serial):
    """First-order by hand with plain autograd: phi_i = start - alpha * grad L_in(start); grad = sum_i grad L_out(phi_i)."""
    net, tasks, alpha = tiny_net(), make_tasks(3), 0.3
    g1, _ = meta_gradient(net, tasks, alpha, serial=serial, second_order=False, loss_fn=F.l1_loss)
    theta = [p.detach().clone() for p in net.parameters()]

    def loss(params, x, y):
        out = F.conv2d(torch.tanh(F.conv2d(x, params[0], params[1], padding=1)), params[2], params[3], padding=1)
        return F.l1_loss(out, y)

    total = [torch.zeros_like(t) for t in theta]
    phi = theta
    for i in range(3):
        start = [t.clone().requires_grad_(True) for t in (phi if serial else theta)]
        gi = torch.autograd.grad(loss(start, tasks.x_in[i], tasks.y_in[i]), start)
        phi = [(s - alpha * g).detach().requires_grad_(True) for s, g in zip(start, gi)]
        go = torch.autograd.grad(loss(phi, tasks.x_out[i], tasks.y_out[i]), phi)
        total = [a + b for a, b in zip(total, go)]
        phi = [p.detach() for p in phi]
    torch.testing.assert_close(flat(g1), torch.cat([t.flatten() for t in total]))


@pytest.mark.parametrize("serial", [False, True], ids=["parallel", "serial"])
def test_first_and_second_order_agree_when_alpha_is_zero(serial):
    net, tasks = tiny_net(), make_tasks(4)
    g1, _ = meta_gradient(net, tasks, 0.0, serial=serial, second_order=False)
    g2, _ = meta_gradient(net, tasks, 0.0, serial=serial, second_order=True)
    torch.testing.assert_close(flat(g1), flat(g2))
    g2b, _ = meta_gradient(net, tasks, 0.2, serial=serial, second_order=True)
    assert not torch.allclose(flat(g1), flat(g2b))  # and they differ once alpha > 0


@pytest.mark.parametrize("second_order", [False, True], ids=["first", "second"])
def test_parallel_and_serial_agree_with_one_distortion(second_order):
    net, tasks = tiny_net(), make_tasks(1)
    gp, _ = meta_gradient(net, tasks, 0.4, serial=False, second_order=second_order)
    gs, _ = meta_gradient(net, tasks, 0.4, serial=True, second_order=second_order)
    torch.testing.assert_close(flat(gp), flat(gs))
    t3 = make_tasks(3)
    gp3, _ = meta_gradient(net, t3, 0.4, serial=False, second_order=second_order)
    gs3, _ = meta_gradient(net, t3, 0.4, serial=True, second_order=second_order)
    assert not torch.allclose(flat(gp3), flat(gs3))  # with several distortions the chain matters


@pytest.mark.parametrize("second_order", [False, True], ids=["pf", "ps"])
def test_vmap_equals_loop(second_order):
    net, tasks = tiny_net(), make_tasks(3)
    gv, sv = meta_gradient(net, tasks, 0.3, serial=False, second_order=second_order, use_vmap=True)
    gl, sl = meta_gradient(net, tasks, 0.3, serial=False, second_order=second_order, use_vmap=False)
    torch.testing.assert_close(flat(gv), flat(gl))
    assert sv["loss"] == pytest.approx(sl["loss"])


# ------------------------------------------------------------------------------------ strategies in a context
def make_ctx(model, seen, seed=0, batch=2, patch=8, dtype=torch.float32):
    sampler = data.PatchSampler([torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(9))], patch, batch, "cpu")
    gen = torch.Generator().manual_seed(seed)
    cfg = train.TrainConfig(steps=10, batch_size=batch, patch_size=patch, lr=1e-3, schedule="constant",
                            device="cpu", progress=False)
    return train.StepContext(model, lambda: sampler.sample(gen).to(dtype), tuple(seen), gen, F.l1_loss,
                             contextlib.nullcontext, train.Counters(), cfg), sampler, cfg


NOISE = [distortions.GaussianNoise(s) for s in (5.0, 10.0, 15.0, 20.0)]


def test_parallel_and_serial_strategies_agree_with_one_sampled_distortion():
    out = []
    for name in ("dil_pf", "dil_sf"):
        net = tiny_net().float()
        ctx, _, cfg = make_ctx(net, NOISE)
        s = train.build_strategy(name, alpha=0.1, n_distortions=1)
        s.configure(net, cfg)
        for _ in range(3):
            s.step(ctx)
        out.append(flat(dict(net.named_parameters())).detach())
    torch.testing.assert_close(out[0], out[1])


def test_paired_and_unpaired_tasks():
    ctx, _, _ = make_ctx(tiny_net().float(), NOISE)
    t = dil.sample_tasks(ctx, 4, paired=True)
    assert torch.equal(t.y_in[0], t.y_in[3]) and torch.equal(t.y_in, t.y_out)
    assert sorted(t.inner) == sorted(d.label for d in NOISE)          # K = all: every seen distortion once
    assert all(a != b for a, b in zip(t.inner, t.outer))              # the outer distortion is a different one
    assert ctx.counters.distorted_batches == 8
    u = dil.sample_tasks(ctx, 2, paired=False)
    assert not torch.equal(u.y_in[0], u.y_in[1]) and not torch.equal(u.y_in[0], u.y_out[0])
    with pytest.raises(ValueError, match="n_distortions: expected 1..4"):
        dil.sample_tasks(ctx, 5)


def _adam(p, g, state, lr, b1, b2, eps=1e-8):
    state["t"] += 1
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["v"] = b2 * state["v"] + (1 - b2) * g * g
    mh = state["m"] / (1 - b1 ** state["t"])
    vh = state["v"] / (1 - b2 ** state["t"])
    return p - lr * mh / (vh.sqrt() + eps)


def test_reference_variant_equals_hand_computation_on_a_linear_model():
    """Released sf on y = W x + b (1x1 conv): copy theta, K chained Adam(0, 0.999) steps with persisted moments
    on the shuffled distortions (own batch each), meta-grad theta - phi, meta Adam. L1 gradients by hand."""
    torch.manual_seed(0)
    net = nn.Conv2d(3, 3, 1).double()
    seen = NOISE[:3]
    ctx, sampler, cfg = make_ctx(net, seen, seed=5, dtype=torch.float64)
    s = train.build_strategy("dil_sf_reference", inner_lr=1e-2, meta_lr=5e-2)
    s.configure(net, cfg)
    W, b = net.weight.detach().clone()[:, :, 0, 0], net.bias.detach().clone()
    zeros = lambda: {"t": 0, "m": torch.zeros(3, 3, dtype=torch.float64), "v": torch.zeros(3, 3, dtype=torch.float64)}  # noqa: E731
    task = {"W": zeros(), "b": {"t": 0, "m": torch.zeros(3, dtype=torch.float64), "v": torch.zeros(3, dtype=torch.float64)}}
    meta = {"W": zeros(), "b": {"t": 0, "m": torch.zeros(3, dtype=torch.float64), "v": torch.zeros(3, dtype=torch.float64)}}
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        s.step(ctx)
        perm = torch.randperm(3, generator=gen).tolist()
        Wp, bp = W.clone(), b.clone()
        for i in perm:
            c = sampler.sample(gen).double()
            x = seen[i](c, gen)
            out = torch.einsum("oc,nchw->nohw", Wp, x) + bp[None, :, None, None]
            sgn = torch.sign(out - c) / out.numel()                      # d mean|out - c| / d out
            gW, gb = torch.einsum("nohw,nchw->oc", sgn, x), sgn.sum((0, 2, 3))
            Wp = _adam(Wp, gW, task["W"], 1e-2, 0.0, 0.999)
            bp = _adam(bp, gb, task["b"], 1e-2, 0.0, 0.999)
        W = _adam(W, W - Wp, meta["W"], 5e-2, 0.9, 0.999)
        b = _adam(b, b - bp, meta["b"], 5e-2, 0.9, 0.999)
        torch.testing.assert_close(net.weight.detach()[:, :, 0, 0], W)
        torch.testing.assert_close(net.bias.detach(), b)
    assert task["W"]["t"] == 6  # the task moments persisted over both iterations
    assert ctx.counters.distorted_batches == 6 and ctx.counters.images_forwarded == 12


# ------------------------------------------------------------------------------------------ through fit()
def _fit(name, steps, run_dir=None, device="cpu", **kw):
    torch.manual_seed(0)
    net = models.build("rrdb", nf=8, nb=1, gc=4)
    cfg = train.TrainConfig(steps=steps, batch_size=2, patch_size=16, lr=1e-3, seed=0, device=device, progress=False,
                            schedule="constant")
    imgs = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return train.fit(net, train.build_strategy(name, **kw), imgs, NOISE, cfg, run_dir=run_dir)


@pytest.mark.parametrize("name", ["erm", *dil.ALL_VARIANTS])
def test_every_strategy_trains_on_cpu_and_counts_its_budget(name):
    kw = {} if name == "erm" else {"n_distortions": 2}
    res = _fit(name, 2, **kw)
    c = res.counters
    per = dil.batches_per_step(name, 4, None if name == "erm" else 2)
    assert c.distorted_batches == 2 * per
    assert c.images_forwarded == 2 * 2 * per
    assert c.images_backpropagated >= c.images_forwarded
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert res.history[-1]["loss"] == res.history[-1]["loss"]  # not NaN


def test_strategies_change_the_weights_and_differ():
    finals = {n: flat(dict(_fit(n, 2, n_distortions=2, **({"alpha": 0.5} if n != "dil_sf_reference" else {}))
                           .model.named_parameters())).detach() for n in ("dil_pf", "dil_sf", "dil_sf_reference")}
    torch.manual_seed(0)
    init = flat(dict(models.build("rrdb", nf=8, nb=1, gc=4).named_parameters())).detach()
    for v in finals.values():
        assert not torch.allclose(v, init)
    assert not torch.allclose(finals["dil_pf"], finals["dil_sf"])


@pytest.mark.parametrize("name", ["dil_sf_reference", "dil_ps"])
def test_resume_is_exact(name, tmp_path):
    kw = {"n_distortions": 2}
    straight = _fit(name, 4, **kw)
    _fit(name, 2, run_dir=tmp_path / "r", **kw)
    resumed = _fit(name, 4, run_dir=tmp_path / "r", **kw)
    torch.testing.assert_close(flat(dict(straight.model.named_parameters())),
                               flat(dict(resumed.model.named_parameters())))


def test_bad_hyper_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        train.build_strategy("dil_pf", alpha=-1.0)
    with pytest.raises(ValueError, match="n_distortions"):
        train.build_strategy("dil_ss", n_distortions=0)
    with pytest.raises(KeyError, match="dil_sf_reference"):
        train.build_strategy("dil_xx")
    with pytest.raises(ValueError, match="n_distortions: expected 1..4"):
        _fit("dil_sf_reference", 1, n_distortions=5)
    assert set(dil.ALL_VARIANTS) <= set(train.strategy_names())
    assert "released code" in train.build_strategy("dil_sf_reference").describe()["implements"]
    assert "paper equation" in train.build_strategy("dil_pf").describe()["implements"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("name", ["erm", *dil.ALL_VARIANTS])
def test_every_strategy_trains_on_cuda(name):
    kw = {} if name == "erm" else {"n_distortions": 2}
    res = _fit(name, 2, device="cuda", **kw)
    assert next(res.model.parameters()).is_cuda
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


# ------------------------------------------------------------------------------------- the stratified control
def test_stratified_erm_is_pf_at_alpha_zero_on_the_outer_batches():
    """The stratified ERM's gradient, sum_i grad L(f(x_out_i), y_out_i), is DIL-pf's meta-gradient at alpha = 0
    (the control separates the meta-learning term from the extra data per step)."""
    net, tasks = tiny_net(), make_tasks(3)
    g_pf, _ = meta_gradient(net, tasks, 0.0, serial=False, second_order=False, loss_fn=F.l1_loss)
    k = tasks.x_out.shape[0]
    x, y = tasks.x_out.flatten(0, 1), tasks.y_out.flatten(0, 1)
    net.zero_grad()
    (k * F.l1_loss(net(x), y)).backward()  # what StratifiedERM.step backpropagates
    torch.testing.assert_close(flat({n: p.grad for n, p in net.named_parameters()}), flat(g_pf))
    # and at alpha > 0 the two differ: the test can fail
    g_a, _ = meta_gradient(net, tasks, 0.5, serial=False, second_order=False, loss_fn=F.l1_loss)
    assert (flat(g_a) - flat(g_pf)).abs().max() > 1e-6


def test_stratified_erm_draws_one_slice_per_seen_distortion_and_counts_them():
    seen = [distortions.build("gaussian_noise", sigma=s) for s in (5.0, 30.0, 60.0)]
    imgs = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = train.TrainConfig(steps=2, batch_size=2, patch_size=16, lr=1e-3, val_every=0, ckpt_every=0,
                            progress=False, device="cpu")
    torch.manual_seed(0)
    res = train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm_stratified"), imgs, seen, cfg)
    assert res.counters.distorted_batches == 2 * 3 and res.counters.images_forwarded == 2 * 3 * 2
    assert dil.batches_per_step("erm_stratified", 3) == 3 and dil.batches_per_step("erm_stratified", 3, 2) == 2
    with pytest.raises(ValueError, match="n_distortions: expected 1..3"):
        train.fit(models.build("dncnn", preset="tiny"), train.build_strategy("erm_stratified", n_distortions=4),
                  imgs, seen, cfg)


def test_rrdb_input_skip_is_a_residual_and_off_by_default():
    torch.manual_seed(0)
    plain = models.build("rrdb", preset="tiny")
    torch.manual_seed(0)
    skip = models.build("rrdb", preset="tiny", skip=True)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(skip(x), x + plain(x))
    assert "skip" not in plain.config and skip.config["skip"] is True
    with pytest.raises(ValueError, match="rrdb.skip"):
        models.build("rrdb", preset="tiny", skip="yes")


@pytest.mark.parametrize("serial", [False, True], ids=["pf", "sf"])
def test_first_order_module_path_equals_the_functional_meta_gradient(serial):
    """The CPU fast path (module copy, fused updates) computes the functional first-order meta-gradient."""
    import copy

    net, tasks = tiny_net(), make_tasks(3)
    want, ws = meta_gradient(net, tasks, 0.3, serial=serial, second_order=False, use_vmap=False)
    got, gs = dil.first_order_module(net, copy.deepcopy(net), tasks, 0.3, serial=serial)
    torch.testing.assert_close(flat(got), flat(want))
    assert gs["loss"] == pytest.approx(ws["loss"])
    # the model itself is untouched (theta is read, phi lives in the copy)
    torch.testing.assert_close(flat(dict(net.named_parameters())), flat(dict(tiny_net().named_parameters())))


def test_first_order_strategies_pick_the_module_path_on_cpu_and_train_alike():
    seen = NOISE[:3]
    imgs = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = train.TrainConfig(steps=3, batch_size=2, patch_size=16, lr=1e-3, val_every=0, ckpt_every=0,
                            progress=False, device="cpu")
    out = {}
    for v in (None, False):
        torch.manual_seed(0)
        net = models.build("dncnn", preset="tiny")
        strat = train.build_strategy("dil_pf", n_distortions=2, use_vmap=v)
        train.fit(net, strat, imgs, seen, cfg)
        assert (strat._task is not None) == (v is None)
        out[v] = flat(dict(net.named_parameters()))
    torch.testing.assert_close(out[None], out[False], rtol=1e-4, atol=1e-6)
    ps = train.build_strategy("dil_ps")
    ps.configure(models.build("dncnn", preset="tiny"), cfg)
    assert ps._task is None and ps._vmap is False  # second order: the functional loop on a CPU
