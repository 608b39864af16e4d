"""The RL-Restore agent and deep Q-learning (Yu et al., CVPR'18): the agent, episode replay, the DQN loss and loop,
lockstep rollouts over chains of tools, random and oracle chains, joint fine-tuning and whole-image voting.

Agent: conv 9x9/2 -> 3 x conv 5x5/2 -> fc, concatenated with the previous tool's one-hot, into an LSTM whose state
is kept through the episode, then 13 Q-values (12 tools + STOP). Training is DRQN-style: whole episodes (<= 3 steps)
are replayed, and the Huber loss is taken on the TD error
    delta_t = Q(s_t, a_t) - [r_t + gamma (1 - done_t) max_a Q_target(s_{t+1}, a)],
with a target network synchronised every ``target_sync`` updates and an epsilon-greedy schedule.
Episodes are collected in lockstep over a batch of patches; since tools are deterministic and states quantised to
8 bits, every (patch, chain prefix) state is computed once and cached.

The environment side (distortions, tools, the Gymnasium ``ToolchainEnv``) is :mod:`causalir.toolchain`, imported
one way; :func:`rollout` is the batched form of ``ToolchainEnv.step`` (same rewards and terminations on the same
chains, shown by ``tests/test_toolchain.py``). The ``rl-restore`` experiment is
:mod:`causalir.experiments.rl_restore`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .toolchain import (ACTION_NAMES, N_ACTIONS, N_TOOLS, PATCH, STOP, Toolbox, check_batch, check_pair, patch_psnr,
                        quantize)
from .train import TrainConfig, make_optimizer
from .utils import check_choice, check_images, check_number, make_generator


# ---------------------------------------------------------------------------------------------- agent
@dataclass(frozen=True)
class AgentConfig:
    """Reference widths: conv1 32, conv 24, fc 32, LSTM 50 (87,863 params in TF; torch's LSTM has 2 bias sets)."""

    conv1: int = 32
    conv: int = 24
    fc: int = 32
    lstm: int = 50
    #: ours, not the reference: LayerNorm on the image feature before the LSTM, so that the image (and not only
    #: the previous tool) moves the Q-values (an agent without it learned one open-loop chain, issue 12)
    norm: bool = False

    def __post_init__(self) -> None:
        for k in ("conv1", "conv", "fc", "lstm"):
            check_number("AgentConfig", k, getattr(self, k), lo=1, integer=True)
        check_choice("AgentConfig", "norm", self.norm, (False, True))


class ToolAgent(nn.Module):
    """Q(s_t, .) for 13 actions from the current image and the previous tool's one-hot, through an LSTM."""

    def __init__(self, cfg: AgentConfig = AgentConfig()) -> None:
        super().__init__()
        if not isinstance(cfg, AgentConfig):
            raise TypeError(f"ToolAgent cfg: expected an AgentConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        c1, c = cfg.conv1, cfg.conv
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 9, 2, 4), nn.ReLU(inplace=True), nn.Conv2d(c1, c, 5, 2, 2), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 5, 2, 2), nn.ReLU(inplace=True), nn.Conv2d(c, c, 5, 2, 2), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * c, cfg.fc), nn.ReLU(inplace=True),
            *([nn.LayerNorm(cfg.fc)] if cfg.norm else []))
        self.lstm = nn.LSTM(cfg.fc + N_TOOLS, cfg.lstm, batch_first=True)
        self.head = nn.Linear(cfg.lstm, N_ACTIONS)

    def forward(self, images: torch.Tensor, prev: torch.Tensor, state=None):
        """images (B,3,H,W) with prev (B,12) -> q (B,13); or sequences (B,T,3,H,W), (B,T,12) -> (B,T,13)."""
        if not isinstance(images, torch.Tensor) or not isinstance(prev, torch.Tensor):
            raise TypeError(f"ToolAgent: expected tensors, got {type(images).__name__} and {type(prev).__name__}")
        single = images.dim() == 4
        if single:
            images, prev = images[:, None], prev[:, None]
        if images.dim() != 5 or prev.shape[:2] != images.shape[:2] or prev.shape[-1] != N_TOOLS:
            raise ValueError(f"ToolAgent: expected images (B[,T],3,H,W) and prev (B[,T],12), got "
                             f"{tuple(images.shape)} and {tuple(prev.shape)}")
        if not images.is_floating_point() or images.shape[2] != 3:
            raise ValueError(f"ToolAgent: expected float images with 3 channels (B[,T],3,H,W), got dtype "
                             f"{images.dtype} and shape {tuple(images.shape)}")
        if images.shape[0] * images.shape[1] == 0 or min(images.shape[-2:]) < 1:
            raise ValueError(f"ToolAgent: expected a non-empty batch of images of at least 1x1 pixels, got shape "
                             f"{tuple(images.shape)}")
        b, t = images.shape[:2]
        f = self.features(images.flatten(0, 1)).view(b, t, -1)
        h, state = self.lstm(torch.cat([f, prev.to(f.dtype)], -1), state)
        q = self.head(h)
        return (q[:, 0] if single else q), state


def agent_macs(agent: ToolAgent, patch: int = PATCH) -> int:
    """MACs of one decision on one patch: convs/linears by the flop counter, the LSTM analytically."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(agent.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        agent.features(torch.zeros(1, 3, patch, patch, device=p.device))
        agent.head(torch.zeros(1, agent.cfg.lstm, device=p.device))
    lstm = 4 * agent.cfg.lstm * (agent.cfg.fc + N_TOOLS + agent.cfg.lstm)
    return int(fc.get_total_flops()) // 2 + lstm


def _onehot_prev(actions: torch.Tensor) -> torch.Tensor:
    """One-hot (.., 12) of tool actions; STOP / padding (-1) give zeros."""
    ok = (actions >= 0) & (actions < N_TOOLS)
    return F.one_hot(actions.clamp(0, N_TOOLS - 1), N_TOOLS).float() * ok[..., None].float()


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------- chain cache
class ChainCache:
    """(patch id, chain prefix) -> 8-bit state. Exact: tools are deterministic and states are quantised."""

    def __init__(self, toolbox: Toolbox, clean: torch.Tensor, distorted: torch.Tensor, cap: int = 20000) -> None:
        check_batch(clean, "ChainCache clean", nonempty=True)
        check_batch(distorted, "ChainCache distorted", nonempty=True)
        check_pair(clean, distorted, "ChainCache clean", "ChainCache distorted")
        check_number("ChainCache", "cap", cap, lo=0, integer=True)
        self.toolbox, self.clean, self.base = toolbox, clean, quantize(distorted)
        self.cap, self.store, self.hits, self.misses = cap, {}, 0, 0

    def advance(self, pids: Sequence[int], chains: Sequence[Tuple[int, ...]], actions: torch.Tensor,
                parents: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(parents)
        miss = []
        for j, (pid, ch, a) in enumerate(zip(pids, chains, actions.tolist())):
            v = self.store.get((pid, ch + (a,)))
            if v is None:
                miss.append(j)
            else:
                out[j] = v.to(out.dtype) / 255
        self.hits += len(pids) - len(miss)
        self.misses += len(miss)
        if miss:
            mi = torch.tensor(miss, device=parents.device)
            y = quantize(self.toolbox.apply(actions[mi], parents[mi]))
            out[mi] = y
            yu = _u8(y)
            for k, j in enumerate(miss):
                if len(self.store) < self.cap:
                    self.store[(pids[j], chains[j] + (int(actions[j]),))] = yu[k]
        return out


# ------------------------------------------------------------------------------------------- rollouts
@dataclass
class Episodes:
    """A batch of lockstep episodes; entries after an episode's end are padding (valid False, action -1)."""

    obs: torch.Tensor        # (E,S,3,p,p) uint8: the state before each decision
    actions: torch.Tensor    # (E,S) long
    rewards: torch.Tensor    # (E,S) float
    done: torch.Tensor       # (E,S) bool
    valid: torch.Tensor      # (E,S) bool
    steps: List[torch.Tensor]  # images after each decision (E,3,p,p), S+1 entries (index 0 = input)
    psnr: Optional[torch.Tensor]  # (E,S+1) PSNR after each decision (None without ground truth)

    @property
    def chains(self) -> List[List[int]]:
        return [[a for a in row if 0 <= a < N_TOOLS] for row in self.actions.tolist()]


def rollout(agent: ToolAgent, x0: torch.Tensor, gt: Optional[torch.Tensor], advance: Callable, *, eps: float = 0.0,
            generator: Optional[torch.Generator] = None, max_steps: int = 3, end_on_drop: bool = False,
            policy: str = "agent") -> Episodes:
    """Run E episodes in lockstep. ``advance(sel, chains, actions, parents)`` returns the tool outputs for the
    selected episodes. ``policy`` 'agent' (epsilon-greedy) or 'random_tools' (uniform tools, never STOP)."""
    if policy not in ("agent", "random_tools"):
        raise ValueError(f"rollout: unknown policy {policy!r}; valid: agent, random_tools")
    if policy == "agent" and not callable(agent):
        raise TypeError(f"rollout: policy 'agent' needs an agent (a ToolAgent), got {type(agent).__name__}")
    if not callable(advance):
        raise TypeError(f"rollout advance: expected a callable (sel, chains, actions, parents), got "
                        f"{type(advance).__name__}")
    check_batch(x0, "rollout x0", nonempty=True)
    if gt is not None:
        check_batch(gt, "rollout gt")
        check_pair(x0, gt, "rollout x0", "rollout gt")
    check_eps("rollout", eps)
    check_number("rollout", "max_steps", max_steps, lo=1, integer=True)
    check_choice("rollout", "end_on_drop", end_on_drop, (False, True))
    e, dev = x0.shape[0], x0.device
    x = quantize(x0)
    ps0 = patch_psnr(x, gt) if gt is not None else None
    ps = ps0.clone() if ps0 is not None else None
    alive = torch.ones(e, dtype=torch.bool, device=dev)
    prev = torch.zeros(e, N_TOOLS, device=dev)
    obs = torch.zeros((e, max_steps) + tuple(x.shape[1:]), dtype=torch.uint8, device=dev)
    acts = torch.full((e, max_steps), -1, dtype=torch.long, device=dev)
    rews = torch.zeros(e, max_steps, device=dev)
    done = torch.zeros(e, max_steps, dtype=torch.bool, device=dev)
    valid = torch.zeros(e, max_steps, dtype=torch.bool, device=dev)
    chains: List[Tuple[int, ...]] = [() for _ in range(e)]
    steps, pss = [x], [ps] if ps is not None else None
    state = None
    for t in range(max_steps):
        obs[:, t] = _u8(x)
        if policy == "agent":
            with torch.no_grad():
                q, state = agent(x, prev, state)
            a = q.argmax(1)
            if eps > 0:
                r = torch.rand(e, generator=generator, device=dev) < eps
                a = torch.where(r, torch.randint(N_ACTIONS, (e,), generator=generator, device=dev), a)
        elif policy == "random_tools":
            a = torch.randint(N_TOOLS, (e,), generator=generator, device=dev)
        else:
            raise ValueError(f"rollout: unknown policy {policy!r}; valid: agent, random_tools")
        valid[:, t] = alive
        is_tool = alive & (a != STOP)
        newx = x.clone()
        sel = is_tool.nonzero().flatten()
        if sel.numel():
            newx[sel] = advance(sel, [chains[i] for i in sel.tolist()], a[sel], x[sel])
        for i in sel.tolist():
            chains[i] = chains[i] + (int(a[i]),)
        term = alive & (a == STOP)
        if gt is not None:
            nps = torch.where(is_tool, patch_psnr(newx, gt), ps)
            rews[:, t] = torch.where(is_tool, nps - ps, torch.zeros_like(ps)).float()
            if end_on_drop:
                term |= is_tool & (nps < ps0)
            ps = nps
            pss.append(ps)
        term |= is_tool & (t + 1 >= max_steps)
        acts[:, t] = torch.where(alive, a, torch.full_like(a, -1))
        done[:, t] = term
        alive = alive & ~term
        x = newx
        steps.append(x)
        prev = _onehot_prev(torch.where(is_tool, a, torch.full_like(a, -1)))
    return Episodes(obs, acts, rews, done, valid, steps, torch.stack(pss, 1) if pss is not None else None)


def check_eps(owner: str, eps: Any) -> float:
    """An exploration rate in [0, 1] (a rounding ulp outside is tolerated, as epsilon() may produce)."""
    check_number(owner, "eps", eps)
    if not -1e-12 <= float(eps) <= 1 + 1e-12:
        raise ValueError(f"{owner}.eps: expected a number >= 0 and <= 1, got {eps!r}")
    return eps


def _check_one_patch(x: Any, name: str) -> torch.Tensor:
    """One patch (3,H,W) or (1,3,H,W), returned as (1,3,H,W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"{name}: expected one image (3,H,W) or (1,3,H,W), got shape {tuple(x.shape)}")
    return check_batch(x, name)


def apply_advance(toolbox: Toolbox) -> Callable:
    """An ``advance`` without cache: apply the tools and quantise."""
    return lambda sel, chains, a, parents: quantize(toolbox.apply(a, parents))


def cached_advance(cache: ChainCache, pids: torch.Tensor) -> Callable:
    pl = pids.tolist()
    return lambda sel, chains, a, parents: cache.advance([pl[i] for i in sel.tolist()], chains, a, parents)


def greedy_chains(agent: ToolAgent, toolbox: Toolbox, x: torch.Tensor, gt: Optional[torch.Tensor] = None,
                  max_steps: int = 3, batch: int = 256) -> Episodes:
    """The agent's greedy toolchain on each patch (test time)."""
    check_batch(x, "greedy_chains patches", nonempty=True)
    if gt is not None:
        check_batch(gt, "greedy_chains gt")
        check_pair(x, gt, "greedy_chains patches", "greedy_chains gt")
    check_number("greedy_chains", "max_steps", max_steps, lo=1, integer=True)
    check_number("greedy_chains", "batch", batch, lo=1, integer=True)
    agent.eval()
    parts = [rollout(agent, x[i:i + batch], None if gt is None else gt[i:i + batch], apply_advance(toolbox),
                     max_steps=max_steps) for i in range(0, len(x), batch)]
    return _cat_episodes(parts)


def _cat_episodes(parts: Sequence[Episodes]) -> Episodes:
    if len(parts) == 1:
        return parts[0]
    cat = lambda k: torch.cat([getattr(p, k) for p in parts])  # noqa: E731
    steps = [torch.cat([p.steps[s] for p in parts]) for s in range(len(parts[0].steps))]
    ps = None if parts[0].psnr is None else cat("psnr")
    return Episodes(cat("obs"), cat("actions"), cat("rewards"), cat("done"), cat("valid"), steps, ps)


def random_chains(toolbox: Toolbox, x: torch.Tensor, gt: Optional[torch.Tensor], generator: torch.Generator,
                  length: int = 3) -> Episodes:
    """A random chain of ``length`` tools per patch (no STOP)."""
    check_number("random_chains", "length", length, lo=1, integer=True)
    return rollout(None, x, gt, apply_advance(toolbox), generator=generator, max_steps=length,
                   policy="random_tools")


def chain_macs(actions: torch.Tensor, tool_macs: Sequence[int], decision_macs: int = 0) -> torch.Tensor:
    """MACs per patch: the tools applied plus ``decision_macs`` per agent decision (tools and STOP)."""
    _check_actions("chain_macs", actions)
    if len(tool_macs) != N_TOOLS:
        raise ValueError(f"chain_macs tool_macs: expected {N_TOOLS} values (one per tool), got {len(tool_macs)}")
    for k, v in enumerate(tool_macs):
        check_number("chain_macs", f"tool_macs[{k}]", v, lo=0)
    check_number("chain_macs", "decision_macs", decision_macs, lo=0)
    tm = torch.tensor(list(tool_macs) + [0], dtype=torch.float64, device=actions.device)
    a = actions.clamp(min=-1)
    used = tm[a.clamp(min=0)] * (a >= 0)
    return used.sum(1) + decision_macs * (a >= 0).sum(1).double()


def _check_actions(owner: str, actions: Any) -> None:
    """A (E,S) integer tensor of actions in -1..12 (-1 = padding after the episode's end)."""
    if not isinstance(actions, torch.Tensor) or actions.dim() != 2:
        got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
        raise ValueError(f"{owner} actions: expected a (E,S) tensor of actions, got {got}")
    if actions.is_floating_point() or actions.is_complex() or actions.dtype == torch.bool:
        raise ValueError(f"{owner} actions: expected integers in -1..{STOP}, got dtype {actions.dtype}")
    if actions.numel() and (int(actions.min()) < -1 or int(actions.max()) > STOP):
        raise ValueError(f"{owner} actions: expected integers in -1..{STOP} (-1 = padding), got range "
                         f"[{int(actions.min())}, {int(actions.max())}]")


def oracle_chains(toolbox: Toolbox, x: torch.Tensor, gt: torch.Tensor, max_steps: int = 3,
                  beam: Optional[int] = None) -> Tuple[torch.Tensor, List[List[int]], int]:
    """Best chain (length 0..max_steps) per patch by the true PSNR: exhaustive (``beam`` None, 12+144+1728 tool
    runs per patch) or a beam search keeping ``beam`` chains per patch per depth. Returns (images, chains, runs)."""
    check_batch(x, "oracle_chains patches", nonempty=True)
    if gt is None:
        raise ValueError("oracle_chains gt: the oracle needs the clean patches, got None")
    check_batch(gt, "oracle_chains gt")
    check_pair(x, gt, "oracle_chains patches", "oracle_chains gt")
    check_number("oracle_chains", "max_steps", max_steps, lo=0, integer=True)
    check_number("oracle_chains", "beam", beam, lo=1, integer=True, allow_none=True)
    n = x.shape[0]
    cur = quantize(x)[:, None]                      # (n, w, 3, p, p)
    chains = [[()] for _ in range(n)]
    best = cur[:, 0].clone()
    best_ps = patch_psnr(best, gt)
    best_ch: List[List[int]] = [[] for _ in range(n)]
    runs = 0
    for _ in range(max_steps):
        w = cur.shape[1]
        parents = cur.flatten(0, 1).repeat_interleave(N_TOOLS, 0)
        acts = torch.arange(N_TOOLS, device=x.device).repeat(n * w)
        ys = quantize(toolbox.apply(acts, parents)).view(n, w * N_TOOLS, *x.shape[1:])
        runs += n * w * N_TOOLS
        ps = patch_psnr(ys.flatten(0, 1), gt.repeat_interleave(w * N_TOOLS, 0)).view(n, -1)
        new_chains = [[c + (k,) for c in chains[i] for k in range(N_TOOLS)] for i in range(n)]
        top = ps.argmax(1)
        better = ps.max(1).values > best_ps
        for i in better.nonzero().flatten().tolist():
            best[i] = ys[i, top[i]]
            best_ps[i] = ps[i, top[i]]
            best_ch[i] = list(new_chains[i][int(top[i])])
        keep = ps.shape[1] if beam is None else min(beam, ps.shape[1])
        idx = ps.topk(keep, 1).indices
        cur = torch.stack([ys[i, idx[i]] for i in range(n)])
        chains = [[new_chains[i][j] for j in idx[i].tolist()] for i in range(n)]
    return best, best_ch, runs


def best_single_tool(toolbox: Toolbox, x: torch.Tensor, gt: torch.Tensor) -> Tuple[int, List[float]]:
    """The tool with the best mean PSNR when applied once (choose it on validation patches)."""
    check_batch(x, "best_single_tool patches", nonempty=True)
    check_batch(gt, "best_single_tool gt")
    check_pair(x, gt, "best_single_tool patches", "best_single_tool gt")
    scores = [float(patch_psnr(quantize(toolbox.apply([k], x)), gt).mean()) for k in range(N_TOOLS)]
    return int(np.argmax(scores)), scores


# ----------------------------------------------------------------------------------------- replay, DQN
class EpisodeReplay:
    """Ring buffer of whole episodes (states as uint8, as the reference advises for memory)."""

    def __init__(self, capacity: int, max_steps: int, shape: Tuple[int, ...], device=None) -> None:
        check_number("EpisodeReplay", "capacity", capacity, lo=1, integer=True)
        check_number("EpisodeReplay", "max_steps", max_steps, lo=1, integer=True)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3:
            raise ValueError(f"EpisodeReplay.shape: expected a state shape (3,H,W), got {shape!r}")
        for k, v in enumerate(shape):
            check_number("EpisodeReplay", f"shape[{k}]", v, lo=1, integer=True)
        self.capacity, self.size, self.ptr = int(capacity), 0, 0
        self.obs = torch.zeros((capacity, max_steps) + tuple(shape), dtype=torch.uint8, device=device)
        self.actions = torch.full((capacity, max_steps), -1, dtype=torch.long, device=device)
        self.rewards = torch.zeros(capacity, max_steps, device=device)
        self.done = torch.zeros(capacity, max_steps, dtype=torch.bool, device=device)
        self.valid = torch.zeros(capacity, max_steps, dtype=torch.bool, device=device)

    def add(self, ep: Episodes) -> None:
        if not isinstance(ep, Episodes):
            raise TypeError(f"EpisodeReplay.add: expected Episodes, got {type(ep).__name__}")
        if tuple(ep.obs.shape[1:]) != tuple(self.obs.shape[1:]):
            raise ValueError(f"EpisodeReplay.add: episodes of shape {tuple(ep.obs.shape[1:])} (steps, 3, H, W) do "
                             f"not fit a replay of {tuple(self.obs.shape[1:])}")
        if ep.obs.shape[0] > self.capacity:
            raise ValueError(f"EpisodeReplay.add: {ep.obs.shape[0]} episodes at once exceed the capacity "
                             f"{self.capacity}")
        n = ep.obs.shape[0]
        idx = (self.ptr + torch.arange(n)) % self.capacity
        for k in ("obs", "actions", "rewards", "done", "valid"):
            getattr(self, k)[idx] = getattr(ep, k)
        self.ptr = int((self.ptr + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        check_number("EpisodeReplay.sample", "n", n, lo=1, integer=True)
        if self.size == 0:
            raise ValueError("EpisodeReplay.sample: the replay is empty; add episodes first")
        idx = torch.randint(self.size, (n,), generator=generator)
        return {k: getattr(self, k)[idx] for k in ("obs", "actions", "rewards", "done", "valid")}


def dqn_loss(agent: ToolAgent, target: ToolAgent, batch: Dict[str, torch.Tensor], gamma: float = 0.99,
             delta: float = 1.0, double: bool = False) -> torch.Tensor:
    """Huber loss on the TD error over every valid step of the sampled episodes (LSTM unrolled from zero).
    Target y = r + gamma Q_target(s', a*): a* = argmax Q_target(s', .) (plain DQN) or, with ``double``,
    a* = argmax Q_online(s', .) (double DQN, van Hasselt et al. 2016: selection and evaluation decoupled, which
    removes the max operator's upward bias)."""
    check_number("dqn_loss", "gamma", gamma, lo=0, hi=1)
    check_number("dqn_loss", "delta", delta, lo=0, lo_open=True)
    check_choice("dqn_loss", "double", double, (False, True))
    missing = [k for k in ("obs", "actions", "rewards", "done", "valid") if k not in batch]
    if missing:
        raise ValueError(f"dqn_loss batch: missing {', '.join(missing)} (as EpisodeReplay.sample returns)")
    if batch["obs"].shape[0] == 0:
        raise ValueError("dqn_loss batch: expected at least one episode, got an empty batch")
    obs = batch["obs"].float() / 255
    a = batch["actions"]
    prev = torch.zeros(a.shape + (N_TOOLS,), device=obs.device)
    prev[:, 1:] = _onehot_prev(a[:, :-1])
    q, _ = agent(obs, prev)
    with torch.no_grad():
        qt, _ = target(obs, prev)
        nxt = torch.zeros_like(batch["rewards"])
        if double:
            best = q.detach()[:, 1:].argmax(-1, keepdim=True)
            nxt[:, :-1] = qt[:, 1:].gather(-1, best)[..., 0]
        else:
            nxt[:, :-1] = qt[:, 1:].max(-1).values
        y = batch["rewards"] + gamma * (~batch["done"]).float() * nxt
    qa = q.gather(-1, a.clamp(min=0)[..., None])[..., 0]
    v = batch["valid"]
    return F.huber_loss(qa[v], y[v], delta=delta)


@dataclass(frozen=True)
class DQNConfig:
    """Deep Q-learning schedule (reference: batch 32 episodes, gamma 0.99, Huber, Adam 1e-4, target sync 10k env
    steps, epsilon 1 -> 0.1 over 1M env steps, 2M env steps)."""

    updates: int = 400
    batch_episodes: int = 16
    collect_episodes: int = 16
    updates_per_collect: int = 4
    replay: int = 4096
    learn_start: int = 64
    gamma: float = 0.99
    lr: float = 5e-4
    target_sync: int = 50
    eps_start: float = 1.0
    eps_end: float = 0.1
    eps_updates: int = 300
    huber_delta: float = 1.0
    grad_clip: float = 10.0
    val_every: int = 100
    max_steps: int = 3
    end_on_drop: bool = True
    cache_cap: int = 20000
    #: double DQN targets (see :func:`dqn_loss`); the reference uses plain DQN
    double: bool = False
    #: > 0: soft target update after every TD update, theta_target <- (1 - tau) theta_target + tau theta
    #: (``target_sync`` is then unused); 0: hard copy every ``target_sync`` updates (the reference)
    tau: float = 0.0

    def __post_init__(self) -> None:
        o = "DQNConfig"
        check_choice(o, "double", self.double, (False, True))
        check_number(o, "tau", self.tau, lo=0, hi=1)
        for k in ("updates", "batch_episodes", "collect_episodes", "updates_per_collect", "replay", "target_sync",
                  "max_steps"):
            check_number(o, k, getattr(self, k), lo=1, integer=True)
        for k in ("learn_start", "eps_updates", "val_every", "cache_cap"):
            check_number(o, k, getattr(self, k), lo=0, integer=True)
        for k in ("gamma", "eps_start", "eps_end"):
            check_number(o, k, getattr(self, k), lo=0, hi=1)
        check_number(o, "lr", self.lr, lo=0, lo_open=True)
        check_number(o, "huber_delta", self.huber_delta, lo=0, lo_open=True)
        check_number(o, "grad_clip", self.grad_clip, lo=0)
        check_choice(o, "end_on_drop", self.end_on_drop, (False, True))
        # learning starts once the replay holds learn_start episodes: more than it can hold would never start
        check_number(o, "learn_start", self.learn_start, lo=0, hi=self.replay, integer=True)
        check_number(o, "collect_episodes", self.collect_episodes, lo=1, hi=self.replay, integer=True)


def epsilon(cfg: DQNConfig, update: int) -> float:
    """Linear schedule eps_start -> eps_end over eps_updates, then constant."""
    if not isinstance(cfg, DQNConfig):
        raise TypeError(f"epsilon cfg: expected a DQNConfig, got {type(cfg).__name__}")
    check_number("epsilon", "update", update, lo=0, integer=True)
    f = min(1.0, update / max(cfg.eps_updates, 1))
    return cfg.eps_start + f * (cfg.eps_end - cfg.eps_start)


def evaluate_policy(agent: ToolAgent, cache: ChainCache, max_steps: int = 3) -> float:
    """Mean final PSNR of the greedy toolchain on the cache's patches."""
    if not isinstance(cache, ChainCache):
        raise TypeError(f"evaluate_policy cache: expected a ChainCache, got {type(cache).__name__}")
    check_number("evaluate_policy", "max_steps", max_steps, lo=1, integer=True)
    agent.eval()
    pids = torch.arange(len(cache.base))
    ep = rollout(agent, cache.base, cache.clean, cached_advance(cache, pids), max_steps=max_steps)
    agent.train()
    return float(ep.psnr[:, -1].mean())


def train_dqn(agent: ToolAgent, toolbox: Toolbox, clean: torch.Tensor, distorted: torch.Tensor, cfg: DQNConfig,
              seed: int = 0, val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
              log: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """DRQN training on a pool of (clean, distorted) patches; keeps the agent best on ``val`` (clean, distorted).
    Returns the history and counters; ``agent`` holds the chosen weights afterwards.

    This loop stays outside :func:`causalir.train.fit` on purpose: its unit of work is an environment collection
    (epsilon-greedy episodes into the replay) followed by ``updates_per_collect`` TD updates against a target
    network synchronised every ``target_sync`` updates, with model selection by greedy policy evaluation on
    ``val``; ``fit``'s step is one supervised batch from a patch sampler. The optimiser is
    :func:`causalir.train.make_optimizer` (Adam at ``cfg.lr``, no schedule); gradients are clipped at
    ``cfg.grad_clip``."""
    if not isinstance(cfg, DQNConfig):
        raise TypeError(f"train_dqn cfg: expected a DQNConfig, got {type(cfg).__name__}")
    check_number("train_dqn", "seed", seed, integer=True)
    check_batch(clean, "train_dqn clean", nonempty=True)
    check_batch(distorted, "train_dqn distorted", nonempty=True)
    check_pair(clean, distorted, "train_dqn clean", "train_dqn distorted")
    if val is not None:
        if not isinstance(val, (tuple, list)) or len(val) != 2:
            raise ValueError(f"train_dqn val: expected (clean, distorted) patches or None, got {type(val).__name__}")
        check_batch(val[0], "train_dqn val clean", nonempty=True)
        check_batch(val[1], "train_dqn val distorted", nonempty=True)
        check_pair(val[0], val[1], "train_dqn val clean", "train_dqn val distorted")
    if log is not None and not callable(log):
        raise TypeError(f"train_dqn log: expected a callable or None, got {type(log).__name__}")
    dev = next(agent.parameters()).device
    g = make_generator(seed, dev)
    gcpu = make_generator(seed + 1)
    toolbox.eval()
    cache = ChainCache(toolbox, clean.to(dev), distorted.to(dev), cfg.cache_cap)
    vcache = ChainCache(toolbox, val[0].to(dev), val[1].to(dev), cfg.cache_cap) if val is not None else None
    target = copy.deepcopy(agent).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    opt = make_optimizer(agent.parameters(), TrainConfig(lr=cfg.lr, schedule="constant"))
    replay = EpisodeReplay(cfg.replay, cfg.max_steps, tuple(clean.shape[1:]), dev)
    hist: List[Dict[str, Any]] = []
    updates = episodes = env_steps = 0
    best, best_state, losses, returns = -math.inf, None, [], []
    t0 = time.perf_counter()
    agent.train()
    while updates < cfg.updates:
        eps = epsilon(cfg, updates)
        pids = torch.randint(len(clean), (cfg.collect_episodes,), generator=g, device=dev)
        ep = rollout(agent, cache.base[pids], cache.clean[pids], cached_advance(cache, pids), eps=eps,
                     generator=g, max_steps=cfg.max_steps, end_on_drop=cfg.end_on_drop)
        replay.add(ep)
        episodes += len(pids)
        env_steps += int(ep.valid.sum())
        returns.append(float((ep.rewards * ep.valid).sum(1).mean()))
        if replay.size < cfg.learn_start:
            continue
        for _ in range(cfg.updates_per_collect):
            loss = dqn_loss(agent, target, replay.sample(cfg.batch_episodes, gcpu), cfg.gamma, cfg.huber_delta,
                            cfg.double)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.grad_clip)
            opt.step()
            updates += 1
            losses.append(float(loss.detach()))
            if cfg.tau > 0:
                with torch.no_grad():
                    torch._foreach_lerp_(list(target.parameters()), list(agent.parameters()), cfg.tau)
            elif updates % cfg.target_sync == 0:
                target.load_state_dict(agent.state_dict())
            if (cfg.val_every and updates % cfg.val_every == 0) or updates == cfg.updates:
                rec = {"update": updates, "episodes": episodes, "env_steps": env_steps, "epsilon": round(eps, 3),
                       "loss": float(np.mean(losses[-cfg.val_every or -1:])),
                       "train_return": float(np.mean(returns[-20:])), "cache_hits": cache.hits,
                       "cache_misses": cache.misses, "wall_time": round(time.perf_counter() - t0, 2)}
                if vcache is not None:
                    rec["val_psnr"] = evaluate_policy(agent, vcache, cfg.max_steps)
                    if rec["val_psnr"] >= best:  # ties go to the later agent (trained longer, less epsilon)
                        best, best_state = rec["val_psnr"], copy.deepcopy(agent.state_dict())
                hist.append(rec)
                if log is not None:
                    log(rec)
            if updates >= cfg.updates:
                break
    if best_state is not None:
        agent.load_state_dict(best_state)
    agent.eval()
    return {"history": hist, "updates": updates, "episodes": episodes, "env_steps": env_steps,
            "best_val_psnr": None if best == -math.inf else best, "wall_time": round(time.perf_counter() - t0, 2),
            "tool_runs": cache.misses + (vcache.misses if vcache else 0)}


# ------------------------------------------------------------- exact chain tree, dynamic programming
@dataclass
class ChainTree:
    """Every decision state of every patch reachable within ``max_steps`` tools: the chain prefixes, expanded
    breadth first (a state's 12 children are the 12 tools applied to it; a child is terminal when it is the
    ``max_steps``-th tool or, with ``end_on_drop``, when its PSNR falls below the input's), with

    Q*(s, tool) = r(s, tool) + gamma V*(s')  (V* of a terminal child = 0),  Q*(s, STOP) = 0,
    V*(s) = max_a Q*(s, a),  r = PSNR(s') - PSNR(s)  (the environment's reward),

    computed bottom-up: the environment is deterministic (tools and 8-bit states), so this is the exact optimal
    action value of every state, not an estimate."""

    patch: torch.Tensor      # (N,) long: the patch of each state
    parent: torch.Tensor     # (N,) long: the parent state (-1 at depth 0)
    action: torch.Tensor     # (N,) long: the tool that led here (-1 at depth 0)
    depth: torch.Tensor      # (N,) long
    image: torch.Tensor      # (N,3,p,p) uint8
    psnr: torch.Tensor       # (N,) float64
    q: torch.Tensor          # (N,13) float: Q*(s, .)
    tool_runs: int

    @property
    def v(self) -> torch.Tensor:
        return self.q.max(1).values

    def sequence(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The agent's inputs for states ``idx`` of one depth d: images (B,d+1,3,p,p) in [0,1] along the chain from
        the input, and the previous tools' one-hots (B,d+1,12)."""
        d = int(self.depth[idx[0]])
        if bool((self.depth[idx] != d).any()):
            raise ValueError("ChainTree.sequence: expected states of one depth")
        path = [idx]
        for _ in range(d):
            path.append(self.parent[path[-1]])
        path = path[::-1]
        images = torch.stack([self.image[i] for i in path], 1).float() / 255
        prev = torch.zeros(len(idx), d + 1, N_TOOLS, device=images.device)
        for t in range(1, d + 1):
            prev[:, t] = _onehot_prev(self.action[path[t]])
        return images, prev


def chain_tree(toolbox: Toolbox, clean: torch.Tensor, distorted: torch.Tensor, max_steps: int = 3,
               gamma: float = 0.99, end_on_drop: bool = True, batch: int = 512) -> ChainTree:
    """Expand every patch's chain tree and solve it by dynamic programming (see :class:`ChainTree`): about
    12 + 144 + 1728 tool runs per patch at ``max_steps`` 3, fewer with ``end_on_drop`` (a state whose PSNR fell
    below the input's ends the episode, as in :func:`rollout`)."""
    check_batch(clean, "chain_tree clean", nonempty=True)
    check_batch(distorted, "chain_tree distorted", nonempty=True)
    check_pair(clean, distorted, "chain_tree clean", "chain_tree distorted")
    check_number("chain_tree", "max_steps", max_steps, lo=1, integer=True)
    check_number("chain_tree", "gamma", gamma, lo=0, hi=1)
    check_choice("chain_tree", "end_on_drop", end_on_drop, (False, True))
    check_number("chain_tree", "batch", batch, lo=1, integer=True)
    dev = distorted.device
    toolbox.eval()
    x0 = quantize(distorted)
    p0 = patch_psnr(x0, clean)
    n = x0.shape[0]
    patch, parent, action, depth = [torch.arange(n, device=dev)], [torch.full((n,), -1, device=dev)], \
        [torch.full((n,), -1, device=dev)], [torch.zeros(n, dtype=torch.long, device=dev)]
    image, psnr = [_u8(x0)], [p0]
    child_psnr: List[torch.Tensor] = []   # per depth: (states at that depth, 12) PSNR after each tool
    child_alive: List[torch.Tensor] = []  # ... whether that child is a (non-terminal) state of the next depth
    runs, start, count = 0, 0, n
    for d in range(max_steps):
        lo, hi = start, start + count
        imgs = torch.cat(image)[lo:hi] if d == 0 else image[-1]
        pids = torch.cat(patch)[lo:hi] if d == 0 else patch[-1]
        ys, ps = [], []
        for b in range(0, count, max(1, batch // N_TOOLS)):
            par = imgs[b:b + batch // N_TOOLS].float() / 255
            m = par.shape[0]
            acts = torch.arange(N_TOOLS, device=dev).repeat(m)
            y = quantize(toolbox.apply(acts, par.repeat_interleave(N_TOOLS, 0)))
            runs += m * N_TOOLS
            gt = clean[pids[b:b + m]].repeat_interleave(N_TOOLS, 0)
            ps.append(patch_psnr(y, gt).view(m, N_TOOLS))
            ys.append(_u8(y).view(m, N_TOOLS, *y.shape[1:]))
        cps = torch.cat(ps)
        alive = torch.ones_like(cps, dtype=torch.bool) if d + 1 < max_steps else torch.zeros_like(cps, dtype=torch.bool)
        if end_on_drop:
            alive &= cps >= p0[pids][:, None]
        child_psnr.append(cps)
        child_alive.append(alive)
        if d + 1 == max_steps:
            break
        sel = alive.nonzero()
        cy = torch.cat(ys)
        patch.append(pids[sel[:, 0]])
        parent.append(torch.arange(lo, hi, device=dev)[sel[:, 0]])
        action.append(sel[:, 1])
        depth.append(torch.full((len(sel),), d + 1, dtype=torch.long, device=dev))
        image.append(cy[sel[:, 0], sel[:, 1]])
        psnr.append(cps[sel[:, 0], sel[:, 1]])
        start, count = hi, len(sel)
        if count == 0:
            break
    # bottom-up: Q*(s, tool) = r + gamma V*(child) for a child that is a state, r alone for a terminal child
    cat = lambda xs: torch.cat(xs)  # noqa: E731
    P, A, D, PS = cat(parent), cat(action), cat(depth), cat(psnr)
    q = torch.zeros(len(P), N_ACTIONS, dtype=torch.float64, device=dev)
    offsets = [0]
    for dd in range(int(D.max()) + 1):
        offsets.append(offsets[-1] + int((D == dd).sum()))
    for dd in range(len(offsets) - 2, -1, -1):
        lo, hi = offsets[dd], offsets[dd + 1]
        r = child_psnr[dd] - PS[lo:hi, None]
        q[lo:hi, :N_TOOLS] = r
        if dd + 1 < len(offsets) - 1:
            kids = torch.arange(offsets[dd + 1], offsets[dd + 2], device=dev)
            v = q[kids].max(1).values
            q[P[kids], A[kids]] += gamma * v
    return ChainTree(cat(patch), P, A, D, cat(image), PS, q.float(), runs)


def chain_psnrs(tree: ChainTree) -> Dict[Tuple[int, ...], torch.Tensor]:
    """From a tree expanded without ``end_on_drop``: chain -> the PSNR of every patch after that fixed chain (0 to
    ``max_steps`` tools, the empty chain being the input), read off the states (and, for the last tool, off Q*, a
    terminal child's Q* being its reward)."""
    n = int((tree.depth == 0).sum())
    chains: List[Tuple[int, ...]] = [()] * len(tree.depth)
    for i in range(n, len(tree.depth)):
        chains[i] = chains[int(tree.parent[i])] + (int(tree.action[i]),)
    out: Dict[Tuple[int, ...], List[Tuple[int, float]]] = {}
    for i, ch in enumerate(chains):
        out.setdefault(ch, []).append((int(tree.patch[i]), float(tree.psnr[i])))
    last = int(tree.depth.max())
    for i in (tree.depth == last).nonzero().flatten().tolist():
        for a in range(N_TOOLS):
            out.setdefault(chains[i] + (a,), []).append((int(tree.patch[i]), float(tree.psnr[i] + tree.q[i, a])))
    res = {}
    for ch, v in out.items():
        if len(v) == n:  # present for every patch (always, without end_on_drop)
            v.sort()
            res[ch] = torch.tensor([p for _, p in v], dtype=torch.float64)
    return res


def best_fixed_chain(toolbox: Toolbox, clean: torch.Tensor, distorted: torch.Tensor, max_steps: int = 3,
                     beam: Optional[int] = None) -> Tuple[Tuple[int, ...], Dict[str, Any]]:
    """The one chain of 0..max_steps tools with the best mean PSNR over the patches (choose it on validation
    patches): the open-loop baseline a state-dependent policy must beat. ``beam`` None: every chain (the tree,
    12 + 144 + 1728 tool runs per patch); else a beam search over whole chains, keeping the ``beam`` chains with
    the best mean PSNR at each length (12 + 12 beam + 12 beam runs per patch)."""
    check_number("best_fixed_chain", "beam", beam, lo=1, integer=True, allow_none=True)
    if beam is None:
        tree = chain_tree(toolbox, clean, distorted, max_steps, 1.0, end_on_drop=False)
        scores, runs = chain_psnrs(tree), tree.tool_runs
    else:
        check_batch(clean, "best_fixed_chain clean", nonempty=True)
        check_pair(clean, distorted, "best_fixed_chain clean", "best_fixed_chain distorted")
        toolbox.eval()
        x0 = quantize(distorted)
        scores, runs = {(): patch_psnr(x0, clean).double()}, 0
        frontier = {(): x0}
        for _ in range(max_steps):
            cand = {}
            for ch, x in frontier.items():
                for a in range(N_TOOLS):
                    y = quantize(toolbox.apply([a] * len(x), x))
                    runs += len(x)
                    cand[ch + (a,)] = y
                    scores[ch + (a,)] = patch_psnr(y, clean).double()
            keep = sorted(cand, key=lambda c: -float(scores[c].mean()))[:beam]
            frontier = {c: cand[c] for c in keep}
    best = max(scores, key=lambda ch: (float(scores[ch].mean()), -len(ch)))
    top = sorted(scores, key=lambda ch: -float(scores[ch].mean()))[:5]
    return best, {"chains": len(scores), "tool_runs": runs, "beam": beam, "mean_psnr": float(scores[best].mean()),
                  "top5": [{"chain": [ACTION_NAMES[a] for a in ch], "psnr": round(float(scores[ch].mean()), 3)}
                           for ch in top]}


@dataclass(frozen=True)
class FQIConfig:
    """Regression of the agent's Q onto the exact advantages A*(s, a) = Q*(s, a) - V*(s) of the chain tree
    (:func:`train_fqi`): Adam steps, batch of states, lr, the 8 flips/rotations as augmentation (label-preserving
    by assumption: the targets are the untransformed patch's), validation every ``val_every`` steps."""

    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    augment: bool = True
    #: Huber loss on the advantage (dB): gains of tens of dB on a lucky patch would dominate an MSE
    huber_delta: float = 1.0
    #: advantages below -adv_clip dB are regressed to -adv_clip: the greedy policy needs the best action and the
    #: ones close to it, not how bad a bad tool is (the best action's advantage is 0, so the argmax is unchanged)
    adv_clip: float = 5.0
    val_every: int = 200
    #: 1: Q* sums the PSNR gains, so V*(input) is the best reachable final PSNR gain (the test-time objective)
    gamma: float = 1.0
    max_steps: int = 3
    end_on_drop: bool = True

    def __post_init__(self) -> None:
        o = "FQIConfig"
        for k in ("steps", "batch", "max_steps"):
            check_number(o, k, getattr(self, k), lo=1, integer=True)
        check_number(o, "val_every", self.val_every, lo=0, integer=True)
        check_number(o, "lr", self.lr, lo=0, lo_open=True)
        check_number(o, "huber_delta", self.huber_delta, lo=0, lo_open=True)
        check_number(o, "adv_clip", self.adv_clip, lo=0, lo_open=True)
        check_number(o, "gamma", self.gamma, lo=0, hi=1)
        for k in ("augment", "end_on_drop"):
            check_choice(o, k, getattr(self, k), (False, True))


def train_fqi(agent: ToolAgent, toolbox: Toolbox, clean: torch.Tensor, distorted: torch.Tensor, cfg: FQIConfig,
              seed: int = 0, val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Dict[str, Any]:
    """A **dynamic-programming stand-in for the paper's DQN**, with the same network and the same greedy test-time
    behaviour: the environment is deterministic, so the exact Q* of every reachable state of the training patches
    is computed (:func:`chain_tree`) and the agent regresses the advantages Q* - V*, clipped below at
    ``-adv_clip`` and divided by it (so the agent's Q is in units of ``adv_clip`` dB; Huber over all 13 actions; the
    argmax is Q*'s; batches of one depth at a time, every depth equally often). The agent best on ``val`` (greedy final PSNR, ties to the later one) is kept.

    Outside :func:`causalir.train.fit` on purpose: a step is a batch of tree states of one depth (LSTM sequences
    of that length), not a patch batch, and selection is a policy evaluation."""
    from .data import dihedral

    if not isinstance(cfg, FQIConfig):
        raise TypeError(f"train_fqi cfg: expected an FQIConfig, got {type(cfg).__name__}")
    check_number("train_fqi", "seed", seed, integer=True)
    dev = next(agent.parameters()).device
    t0 = time.perf_counter()
    tree = chain_tree(toolbox, clean.to(dev), distorted.to(dev), cfg.max_steps, cfg.gamma, cfg.end_on_drop)
    t_tree = time.perf_counter() - t0
    # targets in [-1, 0]: advantages clipped at -adv_clip dB (the argmax is unchanged) in units of adv_clip, so
    # that Adam's ~lr-sized steps reach them (targets of -40 dB would take thousands of steps to fit)
    adv = (tree.q - tree.v[:, None]).clamp(min=-cfg.adv_clip) / cfg.adv_clip
    by_depth = [(tree.depth == d).nonzero().flatten() for d in range(int(tree.depth.max()) + 1)]
    weights = torch.tensor([1.0 if len(i) else 0.0 for i in by_depth], dtype=torch.float64)  # depths alike: the
    # first decision, which the greedy chain depends on most, is 1 state in 157 of a tree
    g = make_generator(seed)
    vcache = ChainCache(toolbox, val[0].to(dev), val[1].to(dev)) if val is not None else None
    opt = make_optimizer(agent.parameters(), TrainConfig(lr=cfg.lr, schedule="constant"))
    best, best_state, hist, losses = -math.inf, None, [], []
    agent.train()
    for step in range(1, cfg.steps + 1):
        d = int(torch.multinomial(weights, 1, generator=g))
        pick = by_depth[d][torch.randint(len(by_depth[d]), (cfg.batch,), generator=g).to(dev)]
        images, prev = tree.sequence(pick)
        if cfg.augment:
            t = torch.randint(8, (len(pick),), generator=g).to(dev)
            b, T = images.shape[:2]
            images = dihedral(images.transpose(0, 1).flatten(0, 1), t.repeat(T)).view(T, b, *images.shape[2:])
            images = images.transpose(0, 1)
        q, _ = agent(images, prev)
        loss = F.huber_loss(q[:, -1], adv[pick], delta=cfg.huber_delta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps:
            rec = {"step": step, "loss": float(np.mean(losses[-(cfg.val_every or 1):])),
                   "wall_time": round(time.perf_counter() - t0, 2)}
            if vcache is not None:
                rec["val_psnr"] = evaluate_policy(agent, vcache, cfg.max_steps)
                if rec["val_psnr"] >= best:  # ties go to the later agent
                    best, best_state = rec["val_psnr"], copy.deepcopy(agent.state_dict())
            hist.append(rec)
    if best_state is not None:
        agent.load_state_dict(best_state)
    agent.eval()
    return {"history": hist, "states": len(tree.depth), "tool_runs": tree.tool_runs, "tree_s": round(t_tree, 2),
            "oracle_v0": float(tree.v[by_depth[0]].mean()), "best_val_psnr": None if best == -math.inf else best,
            "wall_time": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------- joint tuning
def joint_finetune(agent: ToolAgent, toolbox: Toolbox, clean: torch.Tensor, distorted: torch.Tensor, steps: int,
                   batch: int = 16, lr: float = 1e-4, seed: int = 0, max_steps: int = 3) -> List[float]:
    """Alg. 1 of the paper: freeze the agent, run its greedy chains, backpropagate the final MSE through the chain
    and update every tool used with its gradient divided by its use count. Returns the losses.

    Outside :func:`causalir.train.fit` on purpose: each step first runs the frozen agent's greedy chains, and the
    gradients are rescaled per tool (by its use count) between the backward pass and the optimiser step. The
    optimiser is :func:`causalir.train.make_optimizer` (Adam at ``lr``)."""
    o = "joint_finetune"
    check_number(o, "steps", steps, lo=0, integer=True)
    check_number(o, "batch", batch, lo=1, integer=True)
    check_number(o, "lr", lr, lo=0, lo_open=True)
    check_number(o, "seed", seed, integer=True)
    check_number(o, "max_steps", max_steps, lo=1, integer=True)
    check_batch(clean, "joint_finetune clean", nonempty=True)
    check_batch(distorted, "joint_finetune distorted", nonempty=True)
    check_pair(clean, distorted, "joint_finetune clean", "joint_finetune distorted")
    dev = next(toolbox.parameters()).device
    g = make_generator(seed)
    opt = make_optimizer(toolbox.parameters(), TrainConfig(lr=lr, schedule="constant"))
    agent.eval()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(clean), (batch,), generator=g)
        x, gt = distorted[idx].to(dev), clean[idx].to(dev)
        toolbox.eval()
        acts = greedy_chains(agent, toolbox, x, max_steps=max_steps).actions
        y = x
        counts = torch.zeros(N_TOOLS)
        for t in range(acts.shape[1]):
            y_new = y.clone()
            for k in torch.unique(acts[:, t]).tolist():
                if 0 <= k < N_TOOLS:
                    sel = (acts[:, t] == k).nonzero().flatten()
                    y_new[sel] = toolbox.tools[k](y[sel]).clamp(0, 1)
                    counts[k] += 1
            y = y_new
        loss = F.mse_loss(y, gt)
        if not loss.requires_grad:
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for k in range(N_TOOLS):
            if counts[k] > 1:
                for p in toolbox.tools[k].parameters():
                    if p.grad is not None:
                        p.grad /= counts[k]
        opt.step()
        losses.append(float(loss.detach()))
    toolbox.eval()
    return losses


# -------------------------------------------------------------------------------------- whole images
def image_patches(img: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Non-overlapping patch x patch tiles (the image's bottom/right remainder is left out), (n,3,p,p)."""
    check_number("image_patches", "patch", patch, lo=1, integer=True)
    if not isinstance(img, torch.Tensor) or not (img.dim() == 3 or (img.dim() == 4 and img.shape[0] == 1)):
        got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"image_patches: expected one image (C,H,W) or (1,C,H,W), got {got}")
    c, h, w = img.shape[-3:]
    if min(h, w) < patch:
        raise ValueError(f"image_patches: image {h}x{w} is smaller than the {patch}x{patch} patch")
    t = img.reshape(c, h, w)[:, : h // patch * patch, : w // patch * patch]
    return t.unfold(1, patch, patch).unfold(2, patch, patch).permute(1, 2, 0, 3, 4).reshape(-1, c, patch, patch)


def restore_image(agent: ToolAgent, toolbox: Toolbox, img: torch.Tensor, max_steps: int = 3,
                  patch: int = PATCH) -> Dict[str, Any]:
    """Whole-image toolchain by voting: every patch's agent (own LSTM state) votes for an action, the majority
    tool is applied to the whole image (tools are fully convolutional); STOP wins ends the chain."""
    check_number("restore_image", "max_steps", max_steps, lo=1, integer=True)
    check_number("restore_image", "patch", patch, lo=1, integer=True)
    one = _check_one_patch(img, "restore_image image")
    if min(one.shape[-2:]) < patch:
        raise ValueError(f"restore_image image: {one.shape[-2]}x{one.shape[-1]} is smaller than the {patch}x{patch} "
                         "patch the agent votes on")
    x = quantize(img[None] if img.dim() == 3 else img)
    check_images(x, "restore_image image")
    agent.eval()
    state, prev = None, None
    steps, actions, votes = [x], [], []
    for _ in range(max_steps):
        tiles = image_patches(x[0], patch)
        if prev is None:
            prev = torch.zeros(len(tiles), N_TOOLS, device=x.device)
        with torch.no_grad():
            q, state = agent(tiles, prev, state)
        counts = torch.bincount(q.argmax(1), minlength=N_ACTIONS)
        a = int(counts.argmax())
        votes.append(counts.tolist())
        actions.append(a)
        if a == STOP:
            break
        x = quantize(toolbox.apply([a], x))
        steps.append(x)
        prev = _onehot_prev(torch.full((len(tiles),), a, device=x.device))
    return {"image": x[0], "actions": actions, "tools": [ACTION_NAMES[a] for a in actions], "steps": steps,
            "votes": votes, "n_patches": len(image_patches(steps[0][0], patch))}


def chain_step_images(agent: ToolAgent, toolbox: Toolbox, x: torch.Tensor, gt: Optional[torch.Tensor] = None,
                      max_steps: int = 3) -> List[Dict[str, Any]]:
    """One patch's greedy toolchain step by step: [{'step', 'tool', 'image', 'psnr'}] (the widget's function)."""
    x = _check_one_patch(x, "chain_step_images x")
    if gt is not None:
        gt = _check_one_patch(gt, "chain_step_images gt")
    ep = greedy_chains(agent, toolbox, x, gt, max_steps)
    out = [{"step": 0, "tool": "input", "image": ep.steps[0][0],
            "psnr": None if ep.psnr is None else float(ep.psnr[0, 0])}]
    for t in range(max_steps):
        a = int(ep.actions[0, t])
        if a < 0:
            break
        out.append({"step": t + 1, "tool": ACTION_NAMES[a], "image": ep.steps[t + 1][0],
                    "psnr": None if ep.psnr is None else float(ep.psnr[0, t + 1])})
        if a == STOP:
            break
    return out


def q_values(agent: ToolAgent, toolbox: Toolbox, x: torch.Tensor, max_steps: int = 3) -> List[Dict[str, Any]]:
    """The agent's Q(s_t, .) at each step of its greedy chain on one patch: [{'step', 'q' (13 values), 'action'}]
    (the bar-chart widget's function)."""
    x = _check_one_patch(x, "q_values x")
    check_number("q_values", "max_steps", max_steps, lo=1, integer=True)
    agent.eval()
    y, prev, state, out = quantize(x), torch.zeros(1, N_TOOLS, device=x.device), None, []
    with torch.no_grad():
        for t in range(max_steps):
            q, state = agent(y, prev, state)
            a = int(q.argmax(1))
            out.append({"step": t, "q": [float(v) for v in q[0]], "action": ACTION_NAMES[a]})
            if a == STOP:
                break
            y = quantize(toolbox.apply([a], y))
            prev = _onehot_prev(torch.tensor([a], device=x.device))
    return out


def tool_shares(actions: torch.Tensor) -> Dict[str, float]:
    """Share of each tool among all tool applications, plus the STOP share among decisions."""
    _check_actions("tool_shares", actions)
    a = actions[actions >= 0]
    tools = a[a < N_TOOLS]
    cnt = torch.bincount(tools, minlength=N_TOOLS).double()
    out = {ACTION_NAMES[k]: float(cnt[k] / max(1, len(tools))) for k in range(N_TOOLS)}
    out["STOP (of decisions)"] = float((a == STOP).double().sum() / max(1, len(a)))
    return out
