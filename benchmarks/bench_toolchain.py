"""RL-Restore costs: tool throughput batched vs one patch at a time, the agent's decision cost, and the chain
cache's effect on Q-learning data collection. Run by `make bench`; prints a small table."""
import time

import torch

from causalir import rl
from causalir import toolchain as tc


def timeit(fn, reps=3):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(n: int = 32) -> None:
    torch.manual_seed(0)
    box = tc.Toolbox().eval()
    x = torch.rand(n, 3, tc.PATCH, tc.PATCH)
    acts = torch.arange(n) % tc.N_TOOLS
    batched = timeit(lambda: box.apply(acts, x))
    single = timeit(lambda: [box.apply(acts[i:i + 1], x[i:i + 1]) for i in range(n)])
    agent = rl.ToolAgent().eval()
    with torch.no_grad():
        dec = timeit(lambda: agent(x, torch.zeros(n, tc.N_TOOLS)))
    clean = torch.rand(n, 3, tc.PATCH, tc.PATCH)
    cache = rl.ChainCache(box, clean, x)
    pids = torch.arange(n)
    t = time.perf_counter()
    rl.rollout(agent, cache.base, clean, rl.cached_advance(cache, pids), eps=0.0)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    rl.rollout(agent, cache.base, clean, rl.cached_advance(cache, pids), eps=0.0)
    warm = time.perf_counter() - t
    rows = [("12 tools, batched per tool", batched), ("12 tools, one patch at a time", single),
            ("agent decision (batch)", dec), ("greedy rollout, cold cache", cold), ("greedy rollout, warm cache", warm)]
    print(f"threads={torch.get_num_threads()}  patches={n}  (ms per patch)")
    for name, s in rows:
        print(f"{name:<32} {1000 * s / n:8.2f}")


if __name__ == "__main__":
    main()
