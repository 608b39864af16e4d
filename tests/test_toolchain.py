"""Properties of causalir.toolchain / causalir.rl (RL-Restore): distortion levels, tools, the Gymnasium
environment and its batched twin ``rl.rollout``, Q-learning vs random, oracle search, voting, joint fine-tuning,
and the ``rl-restore`` experiment (profiles, record, claims and their preconditions)."""

import gymnasium as gym
import numpy as np
import math
import pytest
import torch
import torch.nn as nn
from gymnasium.utils.env_checker import check_env

from causalir import metrics, models, train
from causalir import rl
from causalir import toolchain as tc
from causalir.experiments import claims as C
from causalir.experiments import profiles
from causalir.experiments import rl_restore as X

TINY = tc.ToolboxConfig(small=(4, 4), large=(4, 4))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded: far faster than 2 threads on a crowded shared CPU; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _clean(n=8, p=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(p, p), mode="bilinear", align_corners=False).clamp(0, 1)


# ------------------------------------------------------------------------------------------- distortions
@pytest.mark.parametrize("sev", list(tc.SEVERITIES))
def test_level_triples_respect_the_sum_ranges(sev):
    tri = tc.level_triples(sev)
    lo, hi = tc.SEVERITIES[sev]
    s = tri.sum(1) - 2
    assert tri.min() >= 1 and tri.max() <= 10
    assert int(s.min()) == lo and int(s.max()) == hi
    # every admissible triple is listed exactly once (all permutations)
    brute = sum(1 for k in range(1, 11) for m in range(1, 11) for n in range(1, 11) if lo <= k + m + n - 2 <= hi)
    assert len(tri) == brute == len({tuple(r) for r in tri.tolist()})


def test_mixed_params_lie_inside_their_level_intervals():
    p = tc.sample_mixed_params(500, "severe", torch.Generator().manual_seed(0))
    k, m, n = p["levels"].T
    bg, ng, jg = (torch.tensor(g, dtype=torch.float32) for g in (tc.BLUR_GRID, tc.NOISE_GRID, tc.JPEG_GRID))
    assert torch.all((p["blur"] >= bg[k - 1] - 1e-5) & (p["blur"] <= bg[k] + 1e-5))
    assert torch.all((p["noise"] >= ng[m - 1] - 1e-4) & (p["noise"] <= ng[m] + 1e-4))
    assert torch.all((p["quality"] <= jg[n - 1] + 1e-4) & (p["quality"] >= jg[n] - 1e-4))
    assert torch.all(p["levels"].sum(1) - 2 >= 18)


def test_mixed_distortion_is_seeded_and_harder_when_severe():
    x = _clean(6, 40)
    d = tc.MixedDistortion("moderate")
    a = d(x, torch.Generator().manual_seed(3))
    b = d(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    mild = tc.MixedDistortion("mild")(x, torch.Generator().manual_seed(1))
    severe = tc.MixedDistortion("severe")(x, torch.Generator().manual_seed(1))
    assert tc.patch_psnr(mild, x).mean() > tc.patch_psnr(severe, x).mean()
    with pytest.raises(ValueError, match="valid: mild, moderate, severe"):
        tc.MixedDistortion("extreme")


# ------------------------------------------------------------------------------------------------ tools
def test_reference_tool_sizes_params_and_macs():
    box = tc.Toolbox()
    params = box.params()
    assert [s.arch for s in tc.TOOL_SPECS].count("small") == 6
    for s in tc.TOOL_SPECS:
        assert params[s.index] == (21_827 if s.arch == "small" else 50_851)
    for k, want in ((0, 86.4e6), (2, 200.7e6)):
        assert abs(models.count_flops(box.tools[k], (1, 3, 63, 63)) / 2 - want) / want < 0.01
    agent = rl.ToolAgent()
    assert abs(models.count_params(agent) - 87_863) <= 200        # torch LSTM: one extra bias vector (200)
    assert abs(rl.agent_macs(agent) - 14e6) / 14e6 < 0.05


def test_tools_preserve_shape_and_range():
    torch.manual_seed(0)
    box = tc.Toolbox(TINY)
    for m in box.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=1.0)            # big weights: outputs would leave [0,1] unclipped
    x = torch.rand(13, 3, 21, 17)
    y = box.apply(torch.arange(13), x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(y[12], x[12])                       # STOP is the identity
    assert not torch.allclose(y[:12], x[:12])
    with pytest.raises(ValueError, match="0..12"):
        box.apply([13], x[:1])
    with pytest.raises(ValueError, match="one action per image"):
        box.apply([0, 1], x[:3])


# ---------------------------------------------------------------------------------------------- the env
def _env(**kw):
    torch.manual_seed(0)
    clean = _clean(6, 24)
    dist = tc.MixedDistortion("moderate")(clean, torch.Generator().manual_seed(0))
    return tc.ToolchainEnv(tc.Toolbox(TINY), clean, dist, **kw), clean


def test_env_passes_gymnasium_checker_and_is_registered():
    env, _ = _env()
    check_env(env, skip_render_check=False)
    assert tc.ENV_ID in gym.registry
    made = gym.make(tc.ENV_ID, n_default=2)
    obs, info = made.reset(seed=0)
    assert obs["image"].shape == (3, 63, 63) and obs["image"].dtype == np.float32
    assert made.observation_space.contains(obs)
    made.close()


def test_reward_equals_psnr_change_and_prev_action_is_one_hot():
    env, clean = _env()
    obs, info = env.reset(seed=1)
    gt = clean[info["index"]][None]
    assert not obs["prev_action"].any()
    total = 0.0
    for a in (5, 9, 2):
        before = torch.from_numpy(obs["image"])[None]
        obs, r, term, trunc, info = env.step(a)
        after = torch.from_numpy(obs["image"])[None]
        expect = metrics.psnr(after, gt) - metrics.psnr(before, gt)   # BasicSR PSNR on 8-bit images
        assert r == pytest.approx(expect, abs=1e-6)
        assert obs["prev_action"].argmax() == a and obs["prev_action"].sum() == 1
        total += r
    assert term and not trunc                                        # at most 3 steps
    assert total == pytest.approx(info["psnr"] - info["psnr_initial"], abs=1e-9)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_stop_ends_the_episode_with_zero_reward():
    env, _ = _env()
    obs0, _ = env.reset(seed=2)
    obs, r, term, trunc, info = env.step(tc.STOP)
    assert term and r == 0.0 and info["stopped"] and info["chain"] == []
    np.testing.assert_array_equal(obs["image"], obs0["image"])
    with pytest.raises(RuntimeError):
        env.step(tc.STOP)
    env.reset(seed=2)
    with pytest.raises(ValueError, match="0..12"):
        env.step(13)


def test_env_rejects_mismatched_data():
    with pytest.raises(ValueError, match="must match"):
        tc.ToolchainEnv(tc.Toolbox(TINY), torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="both"):
        tc.ToolchainEnv(tc.Toolbox(TINY), torch.rand(2, 3, 8, 8))


# -------------------------------------------------------------------------------------------- agent, RL
class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _designed_toolbox():
    """Tool 0 smooths (removes noise), tool 1 darkens by 0.15 (removes a brightening); the rest brighten (harm)."""
    box = tc.Toolbox(TINY)
    box.tools[0] = _Fn(lambda x: torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1))
    box.tools[1] = _Fn(lambda x: x - 0.15)
    for k in range(2, 12):
        box.tools[k] = _Fn(lambda x: x + 0.1)
    return box.eval()


def _designed_data(n, seed):
    clean = 0.2 + 0.5 * _clean(n, 16, seed)
    g = torch.Generator().manual_seed(seed + 100)
    noisy = (clean + 0.12 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    bright = (clean + 0.15).clamp(0, 1)
    half = torch.arange(n) % 2 == 0
    return clean, torch.where(half[:, None, None, None], noisy, bright)


def test_q_learning_beats_a_random_policy_on_a_tiny_setting():
    box = _designed_toolbox()
    tr, va, te = _designed_data(64, 0), _designed_data(32, 1), _designed_data(64, 2)
    torch.manual_seed(0)
    agent = rl.ToolAgent(rl.AgentConfig(conv1=8, conv=8, fc=16, lstm=16))
    cfg = rl.DQNConfig(updates=240, batch_episodes=32, collect_episodes=16, updates_per_collect=4, replay=1024,
                       learn_start=32, lr=3e-3, target_sync=20, eps_updates=150, val_every=40, end_on_drop=False)
    out = rl.train_dqn(agent, box, tr[0], tr[1], cfg, seed=0, val=va)
    assert out["updates"] == 240 and len(out["history"]) == 6
    greedy = rl.greedy_chains(agent, box, te[1], te[0])
    rand = rl.rollout(agent, te[1], te[0], rl.apply_advance(box), eps=1.0,
                      generator=torch.Generator().manual_seed(0))
    g_final, r_final = float(greedy.psnr[:, -1].mean()), float(rand.psnr[:, -1].mean())
    print(f"greedy {g_final:.2f} dB, random {r_final:.2f} dB, input {float(greedy.psnr[:, 0].mean()):.2f} dB")
    assert g_final > r_final + 3.0, (g_final, r_final)
    assert g_final > float(greedy.psnr[:, 0].mean()) + 2.0         # it restores, not just avoids harm


def test_dqn_loss_target_is_reward_at_terminal_steps():
    torch.manual_seed(0)
    agent = rl.ToolAgent(rl.AgentConfig(conv1=4, conv=4, fc=8, lstm=8))
    with torch.no_grad():
        for p in agent.head.parameters():
            p.zero_()                                         # Q == 0 everywhere
    batch = {"obs": torch.randint(0, 255, (2, 3, 3, 16, 16), dtype=torch.uint8),
             "actions": torch.tensor([[3, 12, -1], [1, 2, 4]]),
             "rewards": torch.tensor([[0.5, 0.0, 0.0], [1.0, -2.0, 0.25]]),
             "done": torch.tensor([[False, True, False], [False, False, True]]),
             "valid": torch.tensor([[True, True, False], [True, True, True]])}
    loss = rl.dqn_loss(agent, agent, batch, gamma=0.99, delta=1.0)
    # Q = 0 so the TD error is minus the reward; Huber(0.5)=0.125, (0)=0, (1)=0.5, (2)=1.5, (0.25)=0.03125
    assert float(loss) == pytest.approx((0.125 + 0 + 0.5 + 1.5 + 0.03125) / 5, rel=1e-6)


def test_oracle_search_is_an_upper_bound_and_exhaustive_beats_beam():
    torch.manual_seed(0)
    box = tc.Toolbox(TINY)
    clean = _clean(2, 16)
    dist = tc.MixedDistortion("moderate")(clean, torch.Generator().manual_seed(0))
    ex, ex_ch, runs = rl.oracle_chains(box, dist, clean, 3, beam=None)
    bm, _, runs_b = rl.oracle_chains(box, dist, clean, 3, beam=2)
    assert runs == 2 * (12 + 144 + 1728) and runs_b == 2 * (12 + 24 + 24)
    pe, pb = tc.patch_psnr(ex, clean), tc.patch_psnr(bm, clean)
    assert torch.all(pe >= pb - 1e-9)
    assert torch.all(pe >= tc.patch_psnr(tc.quantize(dist), clean) - 1e-9)
    rc = rl.random_chains(box, dist, clean, torch.Generator().manual_seed(0))
    assert torch.all(pe >= rc.psnr[:, -1] - 1e-9)
    # replaying the oracle's chain reproduces its image
    for i, ch in enumerate(ex_ch):
        y = tc.quantize(dist[i:i + 1])
        for a in ch:
            y = tc.quantize(box.apply([a], y))
        assert torch.equal(y[0], ex[i])


def test_chain_macs_counts_tools_and_decisions():
    acts = torch.tensor([[0, 12, -1], [2, 3, 4], [12, -1, -1]])
    m = rl.chain_macs(acts, [10 * (k + 1) for k in range(12)], decision_macs=1)
    assert m.tolist() == [10 + 2, 30 + 40 + 50 + 3, 1]


def _forced_agent(action):
    torch.manual_seed(0)
    agent = rl.ToolAgent(rl.AgentConfig(conv1=4, conv=4, fc=8, lstm=8))
    with torch.no_grad():
        agent.head.weight.zero_()
        agent.head.bias.zero_()
        agent.head.bias[action] = 1.0
    return agent.eval()


def test_voting_on_whole_images_and_patch_tiling():
    img = torch.rand(3, 130, 200)
    tiles = rl.image_patches(img, 63)
    assert tiles.shape == (2 * 3, 3, 63, 63)
    assert torch.equal(tiles[4], img[:, 63:126, 63:126])
    box = _designed_toolbox()
    r = rl.restore_image(_forced_agent(1), box, img)
    assert r["actions"] == [1, 1, 1] and r["image"].shape == img.shape
    expect = tc.quantize(img[None])
    for _ in range(3):
        expect = tc.quantize(box.apply([1], expect))
    assert torch.equal(r["image"], expect[0])
    s = rl.restore_image(_forced_agent(tc.STOP), box, img)
    assert s["actions"] == [tc.STOP] and torch.equal(s["image"], tc.quantize(img))
    with pytest.raises(ValueError, match="smaller than"):
        rl.image_patches(torch.rand(3, 40, 40), 63)


def test_joint_finetuning_updates_only_the_tools_used():
    torch.manual_seed(0)
    box = tc.Toolbox(TINY)
    before = [[p.detach().clone() for p in t.parameters()] for t in box.tools]
    clean = _clean(8, 16)
    dist = tc.MixedDistortion("moderate")(clean, torch.Generator().manual_seed(0))
    losses = rl.joint_finetune(_forced_agent(6), box, clean, dist, steps=3, batch=4, lr=1e-2)
    assert len(losses) == 3
    for k, t in enumerate(box.tools):
        changed = any(not torch.equal(a, b) for a, b in zip(before[k], t.parameters()))
        assert changed == (k == 6), k


def test_chain_step_images_for_the_widget():
    box = _designed_toolbox()
    clean, dist = _designed_data(2, 0)
    steps = rl.chain_step_images(_forced_agent(0), box, dist[0], clean[0])
    assert [s["tool"] for s in steps] == ["input", "deblur-1", "deblur-1", "deblur-1"]
    assert steps[0]["psnr"] == pytest.approx(float(tc.patch_psnr(tc.quantize(dist[:1]), clean[:1])))


class _Scripted(nn.Module):
    """An 'agent' that plays a fixed action sequence per episode (its LSTM state is the step counter)."""

    def __init__(self, seqs):
        super().__init__()
        self.seqs = torch.as_tensor(seqs)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, prev, state=None):
        t = 0 if state is None else state
        return torch.nn.functional.one_hot(self.seqs[:, t], tc.N_ACTIONS).float(), t + 1


@pytest.mark.parametrize("end_on_drop", [False, True])
def test_rollout_and_env_step_are_the_same_mdp(end_on_drop):
    """rl.rollout (batched, lockstep) and ToolchainEnv.step (one patch, Gymnasium) give the same rewards, the same
    terminations and the same final PSNR on the same chains: STOP at every step, full chains, harmful tools."""
    torch.manual_seed(0)
    box = tc.Toolbox(TINY).eval()
    clean = tc.quantize(_clean(8, 24, seed=3))            # the env's ground truth is 8-bit: give both the same
    dist = tc.MixedDistortion("moderate")(clean, torch.Generator().manual_seed(4))
    seqs = [[tc.STOP, 0, 0], [5, tc.STOP, 1], [5, 9, tc.STOP], [5, 9, 2], [0, 0, 0], [11, 3, 7], [6, 6, 6],
            [2, tc.STOP, tc.STOP]]
    ep = rl.rollout(_Scripted(seqs), dist, clean, rl.apply_advance(box), max_steps=3, end_on_drop=end_on_drop)
    env = tc.ToolchainEnv(box, clean, dist, max_steps=3, end_on_drop=end_on_drop)
    drops = 0
    for i, seq in enumerate(seqs):
        _, info = env.reset(options={"index": i})
        assert info["psnr"] == pytest.approx(float(ep.psnr[i, 0]), abs=1e-9)
        rewards, dones, acts = [], [], []
        for a in seq:
            _, r, term, trunc, info = env.step(a)
            rewards.append(r), dones.append(term), acts.append(a)
            assert not trunc
            if term:
                break
        n = len(rewards)
        assert ep.valid[i].tolist() == [True] * n + [False] * (3 - n), (i, seq)
        assert ep.actions[i, :n].tolist() == acts and ep.done[i, :n].tolist() == dones
        assert ep.rewards[i, :n].tolist() == pytest.approx(rewards, abs=1e-4)       # float32 vs float64
        assert float(ep.psnr[i, -1]) == pytest.approx(info["psnr"], abs=1e-9)
        assert ep.chains[i] == info["chain"]
        drops += int(n < 3 and seq[n - 1] != tc.STOP)
    assert drops > 0 if end_on_drop else drops == 0        # end_on_drop really ended some chains early


def test_fit_paired_uses_the_core_paired_strategy():
    """fit_paired trains through train.fit with train.PairedMSE (no sampler, no distortions) and lowers the MSE."""
    torch.manual_seed(0)
    clean = _clean(16, 16)
    dist = (clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    tool = tc.SmallTool(4, 4)
    before = float(torch.nn.functional.mse_loss(tool(dist), clean))
    res = tc.fit_paired(tool, clean, dist, tc.ToolTrainConfig(steps=40, batch_size=8, lr=3e-3), seed=0)
    assert res.counters.images_forwarded == 40 * 8 and res.counters.distorted_batches == 0
    with torch.no_grad():
        assert float(torch.nn.functional.mse_loss(tool(dist), clean)) < before
    assert isinstance(train.build_strategy("paired_mse", clean=clean, dist=dist), train.PairedMSE)
    assert not hasattr(tc, "rl_restore_experiment")        # no trampoline back into the agent side


def test_profiles_and_overrides():
    p = profiles.select(X.PROFILES, "quick", {"dqn": {"updates": 3}})
    assert p.dqn.updates == 3 and p.dqn.batch_episodes == X.PROFILES["quick"].dqn.batch_episodes
    with pytest.raises(TypeError, match="unknown override"):
        profiles.select(X.PROFILES, "quick", {"bogus": 1})
    assert X.PROFILES["full"].tools == tc.ToolboxConfig() and X.PROFILES["full"].agent == rl.AgentConfig()
    with pytest.raises(ValueError, match="oracle_beam"):
        profiles.select(X.PROFILES, "quick", {"oracle_beam": 0})


# ------------------------------------------------------------------------------------------------ claims
def _record(agent_gain=1.0, single_gain=0.5, chains=("denoise-1+STOP", "dejpeg-2+STOP"), n=8, with_rows=True):
    """A synthetic rl-restore record: per-patch rows where the agent gains ``agent_gain`` dB over the input."""
    g = np.random.default_rng(0)
    rows, summary = [], []
    methods = {"input": 0.0, "best single tool (denoise-3)": single_gain, X.RANDOM: -1.0, X.AGENT: agent_gain,
               "oracle chain (search)": agent_gain + 1, "DnCNN-like (6x16)": 0.8}
    for sev in tc.SEVERITIES:
        base = 20 + g.normal(0, 2, n)
        for m, gain in methods.items():
            ps = base + gain + g.normal(0, 0.05, n)
            macs = 1e6 if m == X.AGENT else 4e6 if m.startswith("DnCNN") else 0.0
            ch = [chains[i % len(chains)] for i in range(n)] if m == X.AGENT else [""] * n
            rows += [{"method": m, "severity": sev, "patch": i, "psnr": float(p), "macs": macs, "chain": c}
                     for i, (p, c) in enumerate(zip(ps, ch))]
            summary.append({"method": m, "severity": sev, "psnr": float(ps.mean()), "psnr_std": 0.0, "macs": macs})
    tables = {"patch_summary": summary, "examples": {s: [{"patch": 0, "tools": ["denoise-1"]}] for s in tc.SEVERITIES}}
    if with_rows:
        tables["patch_rows"] = rows
    return {"config": {}, "tables": tables}


def test_claims_use_paired_patches_and_preconditions():
    good = X.claims(_record())
    assert len(good) == 13 and all(c.verdict in C.VERDICTS for c in good)
    by = {c.claim: c for c in good}
    beats = by["RL-Restore beats the best single tool, moderate (dB)"]
    assert beats.verdict == C.REPRODUCED and beats.n == 8 and beats.over == "patches"
    assert by["RL-Restore needs fewer MACs per patch than the DnCNN-like CNN (saving 1 - RL/DnCNN)"].verdict \
        == C.REPRODUCED
    # an agent that does not beat its input: every claim about it is inconclusive, and says why
    hollow = X.claims(_record(agent_gain=-0.5))
    assert all(c.verdict == C.INCONCLUSIVE and "not a restorer yet" in c.why for c in hollow)
    # one chain on every patch: the policy claims are inconclusive, the PSNR levels are not affected
    degenerate = X.claims(_record(chains=("denoise-1+denoise-1+denoise-1",)))
    policy = [c for c in degenerate if "beats" in c.claim or "minus DnCNN" in c.claim or "MACs" in c.claim]
    assert policy and all(c.verdict == C.INCONCLUSIVE and "degenerate" in c.why for c in policy)
    assert all("degenerate" not in c.why for c in degenerate if c.claim.startswith("RL-Restore PSNR"))


def test_claims_on_a_record_without_per_patch_rows():
    """Records written before patch_rows existed are re-judged without crashing: one seed, no paired error."""
    old = X.claims(_record(with_rows=False, chains=("a", "b")))
    assert all(c.verdict == C.INCONCLUSIVE for c in old)
    assert any("fewer than 2 seeds and no paired error" in c.why for c in old)


def test_rl_restore_run_records_patches_and_keeps_models():
    tiny = {"tool_train": {"steps": 1, "n_data": 8}, "dncnn_train": {"steps": 1, "n_data": 8},
            "dqn": {"updates": 4, "learn_start": 16, "val_every": 2}, "n_train": 16, "n_val": 4, "n_test": 4,
            "joint_steps": 1, "joint_batch": 2, "image_side": 63, "n_fqi": 1, "fixed_beam": 1,
            "fqi": {"steps": 2, "batch": 4, "max_steps": 2, "val_every": 0}}
    rec = X.run("quick", 0, "cpu", keep_models=True, **tiny)
    rows = rec["tables"]["patch_rows"]
    # 9 methods: input, best single tool, random chain, the DQN agent, the best fixed chain, the DP stand-in,
    # the oracle, the DnCNN-like CNN, joint fine-tuning
    assert len(rows) == 9 * 3 * 4 and {"method", "severity", "patch", "psnr", "macs", "chain"} <= set(rows[0])
    assert set(rec["models"]) == {"toolbox", "agent", "dncnn", "toolbox (joint fine-tuning)", "agent (DP stand-in)"}
    assert isinstance(rec["models"]["agent"], rl.ToolAgent) and rec["config"]["profile"]["n_test"] == 4
    # 13 claims of the paper's table + ours: each agent against the best fixed chain (and the DP stand-in also
    # against the best single tool), at every severity, and that every tool restores its own band
    assert len(rec["claims"]) == 13 + 3 + 3 + 3 + 1 and rec["experiment"] == "rl-restore"  # + the tool gains
    fixed = rec["config"]["best_fixed_chain_chosen_on_val"]
    assert fixed["chains"] == 1 + 12 * 3 and fixed["beam"] == 1 and len(fixed["chain"]) <= 3
    fixed_rows = [r for r in rows if r["method"].startswith(X.FIXED)]
    assert len({r["chain"] for r in fixed_rows}) == 1                       # one chain for every patch
    dp = [c for c in rec["claims"] if c["claim"].startswith(X.FQI_AGENT)]
    assert all(any(p["name"] == "non-degenerate" for p in c["checks"]) for c in dp)
    c, d = X.test_patches(4, 0)["mild"]
    mild = [r["psnr"] for r in rows if r["method"] == "input" and r["severity"] == "mild"]
    assert tc.patch_psnr(tc.quantize(d), c).tolist() == pytest.approx(mild)


# ------------------------------------------------------------------ exact chain tree, DP, double DQN (issue 12)
def test_chain_tree_v_star_is_the_exhaustive_oracle_and_its_greedy_policy_reaches_it():
    torch.manual_seed(0)
    box = tc.Toolbox(TINY).eval()
    clean = _clean(3, 16)
    dist = tc.MixedDistortion("moderate")(clean, torch.Generator().manual_seed(0))
    tree = rl.chain_tree(box, clean, dist, max_steps=3, gamma=1.0, end_on_drop=False)
    assert tree.tool_runs == 3 * (12 + 144 + 1728) and len(tree.depth) == 3 * (1 + 12 + 144)
    ex, _, _ = rl.oracle_chains(box, dist, clean, 3, beam=None)
    roots = tree.depth == 0
    p0 = tc.patch_psnr(tc.quantize(dist), clean)
    # V*(input) with gamma 1 is the best final PSNR gain over every chain of 0..3 tools
    torch.testing.assert_close(tree.v[roots].double(), tc.patch_psnr(ex, clean) - p0, atol=1e-4, rtol=0)
    # following argmax Q* from the input replays a chain that earns exactly V*
    for i in range(3):
        y, s, gain = tc.quantize(dist[i:i + 1]), i, 0.0
        for _ in range(3):
            a = int(tree.q[s].argmax())
            if a == tc.STOP:
                break
            y = tc.quantize(box.apply([a], y))
            kids = ((tree.parent == s) & (tree.action == a)).nonzero().flatten()
            s = int(kids[0]) if len(kids) else -1
            if s < 0:
                break
        gain = float(tc.patch_psnr(y, clean[i:i + 1])) - float(p0[i])
        assert gain == pytest.approx(float(tree.v[i]), abs=1e-4)


def test_chain_tree_ends_episodes_on_a_drop_like_the_environment():
    box = _designed_toolbox()
    clean, dist = _designed_data(4, 0)
    full = rl.chain_tree(box, clean, dist, 3, 1.0, end_on_drop=False)
    pruned = rl.chain_tree(box, clean, dist, 3, 1.0, end_on_drop=True)
    assert len(pruned.depth) < len(full.depth) and pruned.tool_runs < full.tool_runs
    assert torch.all(pruned.v[pruned.depth == 0] <= full.v[full.depth == 0] + 1e-5)
    # every non-root state of the pruned tree is at or above its patch's input PSNR
    p0 = pruned.psnr[pruned.depth == 0]
    assert torch.all(pruned.psnr >= p0[pruned.patch] - 1e-9)
    images, prev = pruned.sequence((pruned.depth == 2).nonzero().flatten()[:3])
    assert images.shape[1] == 3 and prev.shape == (3, 3, 12) and torch.all(prev[:, 0] == 0)


def test_double_dqn_target_uses_the_online_argmax():
    torch.manual_seed(0)
    online = rl.ToolAgent(rl.AgentConfig(conv1=4, conv=4, fc=8, lstm=8))
    target = rl.ToolAgent(rl.AgentConfig(conv1=4, conv=4, fc=8, lstm=8))
    batch = {"obs": torch.randint(0, 255, (3, 2, 3, 16, 16), dtype=torch.uint8),
             "actions": torch.tensor([[3, 5], [1, 2], [0, 4]]), "rewards": torch.zeros(3, 2),
             "done": torch.tensor([[False, True]] * 3), "valid": torch.ones(3, 2, dtype=torch.bool)}
    obs = batch["obs"].float() / 255
    prev = torch.zeros(3, 2, 12)
    prev[:, 1] = rl._onehot_prev(batch["actions"][:, 0])
    with torch.no_grad():
        q, _ = online(obs, prev)
        qt, _ = target(obs, prev)
    qa = q.gather(-1, batch["actions"][..., None])[..., 0]
    got = {}
    for double, nxt in ((False, qt[:, 1].max(-1).values), (True, qt[:, 1].gather(-1, q[:, 1].argmax(-1, keepdim=True))[:, 0])):
        y = torch.stack([0.9 * nxt, torch.zeros(3)], 1)
        want = torch.nn.functional.huber_loss(qa, y)
        got[double] = float(rl.dqn_loss(online, target, batch, gamma=0.9, double=double).detach())
        assert got[double] == pytest.approx(float(want), rel=1e-5)
    # the two targets differ here (online and target nets disagree on the argmax), so the check can fail
    assert not torch.equal(q[:, 1].argmax(-1), qt[:, 1].argmax(-1)) and got[True] != got[False]


def test_soft_target_updates_and_the_fqi_agent_restores_on_a_tiny_setting():
    box = _designed_toolbox()
    tr, va, te = _designed_data(32, 0), _designed_data(16, 1), _designed_data(32, 2)
    torch.manual_seed(0)
    agent = rl.ToolAgent(rl.AgentConfig(conv1=8, conv=8, fc=16, lstm=16, norm=True))
    out = rl.train_fqi(agent, box, tr[0], tr[1], rl.FQIConfig(steps=300, batch=32, lr=3e-3, val_every=50), seed=0,
                       val=va)
    assert len(out["history"]) == 6 and out["states"] > 32 and out["oracle_v0"] > 0
    greedy = rl.greedy_chains(agent, box, te[1], te[0])
    gain = greedy.psnr[:, -1] - greedy.psnr[:, 0]
    # state dependence: the noisy patches (even) are smoothed, the brightened ones (odd) darkened, both gain
    assert float(gain[::2].mean()) > 2.0 and float(gain[1::2].mean()) > 2.0, gain
    assert len({tuple(c) for c in greedy.chains}) > 1           # not one chain for every patch
    cfg = rl.DQNConfig(updates=8, batch_episodes=8, collect_episodes=8, replay=64, learn_start=8, tau=0.5,
                       double=True, val_every=0, end_on_drop=False)
    torch.manual_seed(0)
    a2 = rl.ToolAgent(rl.AgentConfig(conv1=4, conv=4, fc=8, lstm=8))
    assert rl.train_dqn(a2, box, tr[0], tr[1], cfg, seed=0)["updates"] == 8
    with pytest.raises(ValueError, match="tau"):
        rl.DQNConfig(tau=1.5)
    with pytest.raises(ValueError, match="FQIConfig.steps"):
        rl.FQIConfig(steps=0)


def test_best_fixed_chain_is_the_best_open_loop_chain_and_the_dp_agent_can_beat_it():
    box = _designed_toolbox()
    clean, dist = _designed_data(8, 3)
    best, info = rl.best_fixed_chain(box, clean, dist, 2)
    tree = rl.chain_tree(box, clean, dist, 2, 1.0, end_on_drop=False)
    scores = rl.chain_psnrs(tree)
    assert len(scores) == 1 + 12 + 144 and info["chains"] == len(scores)
    assert all(float(scores[best].mean()) >= float(v.mean()) for v in scores.values())
    # a beam over whole chains finds a chain no better than the exhaustive one, at a fraction of the tool runs
    bb, binfo = rl.best_fixed_chain(box, clean, dist, 2, beam=3)
    assert binfo["tool_runs"] < info["tool_runs"] and binfo["mean_psnr"] <= info["mean_psnr"] + 1e-9
    torch.testing.assert_close(torch.tensor(binfo["mean_psnr"]), scores[bb].mean().float(), rtol=0, atol=1e-4)
    # replaying a chain reproduces its per-patch PSNRs
    ch = (0, 1)
    y = tc.quantize(dist)
    for a in ch:
        y = tc.quantize(box.apply([a] * len(y), y))
    torch.testing.assert_close(tc.patch_psnr(y, clean), scores[ch])
    # the state-dependent optimum (V*) beats every open-loop chain on these mixed patches
    v0 = tree.v[tree.depth == 0].double() + tree.psnr[tree.depth == 0]
    assert float(v0.mean()) > float(scores[best].mean()) + 1.0


def test_tool_gains_flag_an_identity_and_the_leaky_recipe_trains_a_live_tool():
    from causalir import data

    val = data.embedded_images("val")
    torch.manual_seed(0)
    box = tc.Toolbox(tc.ToolboxConfig(small=(8, 4), large=(8, 4), act="leaky"))
    with torch.no_grad():                       # every tool starts as the identity (last conv zeroed)
        for t in box.tools:
            last = [m for m in t.modules() if isinstance(m, nn.Conv2d)][-1]
            last.weight.zero_()
            last.bias.zero_()
    before = {g["tool"]: g["gain_db"] for g in tc.tool_gains(box, val, 8, 32)}
    assert all(v == 0.0 for v in before.values())              # an identity gains exactly nothing
    spec = tc.TOOL_SPECS[7]                                     # denoise-4: sigma 37.5-50
    c, d = tc.paired_set(data.embedded_images("train"), spec, 64, 32, 0)
    tc.fit_paired(box.tools[7], c, d, tc.ToolTrainConfig(steps=200, batch_size=8, lr=3e-3, grad_clip=1.0), 0)
    after = {g["tool"]: g for g in tc.tool_gains(box, val, 8, 32)}
    assert after[spec.name]["gain_db"] > 0.1 + 2 * after[spec.name]["gain_se"], after[spec.name]
    assert any(isinstance(m, nn.LeakyReLU) for m in box.tools[7].modules())
    with pytest.raises(ValueError, match="ToolboxConfig.act"):
        tc.ToolboxConfig(act="gelu")


def test_q_values_follow_the_greedy_chain():
    box = _designed_toolbox()
    clean, dist = _designed_data(2, 0)
    torch.manual_seed(0)
    agent = rl.ToolAgent(rl.AgentConfig(conv1=4, conv=4, fc=8, lstm=8))
    qs = rl.q_values(agent, box, dist[0])
    chain = rl.greedy_chains(agent, box, dist[:1]).actions[0].tolist()
    assert [q["action"] for q in qs] == [tc.ACTION_NAMES[a] for a in chain if a >= 0]
    assert all(len(q["q"]) == 13 and q["action"] == tc.ACTION_NAMES[int(np.argmax(q["q"]))] for q in qs)


def test_pooled_gain_is_the_set_psnr_gain_with_a_jackknife_se():
    g = torch.Generator().manual_seed(0)
    mse_in = torch.rand(50, generator=g, dtype=torch.float64) * 1e-3 + 1e-4
    mse_out = mse_in * (0.5 + torch.rand(50, generator=g, dtype=torch.float64))
    gain, se, pseudo = tc.pooled_gain(mse_in, mse_out)
    assert gain == pytest.approx(10 * math.log10(float(mse_in.sum() / mse_out.sum())), rel=1e-9)
    # the jackknife SE from its definition, and the pseudo-values' SE equals it
    n = 50
    loo = [10 * math.log10(float((mse_in.sum() - mse_in[i]) / (mse_out.sum() - mse_out[i]))) for i in range(n)]
    m = sum(loo) / n
    assert se == pytest.approx(math.sqrt((n - 1) / n * sum((v - m) ** 2 for v in loo)), rel=1e-6)
    ps = torch.tensor(pseudo, dtype=torch.float64)
    assert float(ps.std() / n ** 0.5) == pytest.approx(se, rel=1e-6)
    # a patch the distortion left exact does not swamp the others (a per-patch PSNR mean would lose ~50 dB)
    exact = torch.cat([mse_in, torch.zeros(1, dtype=torch.float64)])
    nudged = torch.cat([mse_out, torch.full((1,), (0.5 / 255) ** 2, dtype=torch.float64)])
    assert abs(tc.pooled_gain(exact, nudged)[0] - gain) < 0.05
    assert tc.pooled_gain(mse_in, mse_in)[:2] == (0.0, 0.0)            # an identity gains exactly nothing
