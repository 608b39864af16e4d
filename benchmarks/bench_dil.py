"""Distorted images per second for ERM and each DIL strategy (run by ``make bench``, not by the tests).

Each strategy runs ``--steps`` steps of the one training loop on the same model and batch shape; throughput
counts *distorted images* (distorted batches x batch size), so ERM and DIL are compared per unit of the budget
the experiments equalise. The overhead column is ERM's images/s divided by the strategy's (1.0 = no overhead).
On CUDA, each strategy is also timed with bf16 autocast (TrainConfig.precision) and with channels_last.
"""
from __future__ import annotations

import argparse
import time

import torch

from causalir import dil, distortions, models, train


def bench(name: str, device: str, *, bf16: bool = False, channels_last: bool = False, steps: int = 6,
          batch: int = 8, patch: int = 32, model: str = "rrdb", model_cfg=None, k: int = 2) -> float:
    """Distorted images per second of ``steps`` ERM-steps' worth of distorted batches of strategy ``name``."""
    torch.manual_seed(0)
    net = models.build(model, **(model_cfg or {"nf": 16, "nb": 1, "gc": 8}))
    seen = distortions.distortion_set("noise-dil").seen
    kw = {} if name == "erm" else {"n_distortions": k}
    imgs = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    per = dil.batches_per_step(name, len(seen), None if name == "erm" else k)
    n = max(2, steps // per * 2) if name != "erm" else steps * 2
    warm = train.TrainConfig(steps=1, batch_size=batch, patch_size=patch, device=device, precision="bf16" if bf16 else "fp32",
                             channels_last=channels_last, progress=False)
    train.fit(net, train.build_strategy(name, **kw), imgs, seen, warm)
    cfg = train.TrainConfig(steps=n, batch_size=batch, patch_size=patch, device=device, precision="bf16" if bf16 else "fp32",
                            channels_last=channels_last, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = train.fit(net, train.build_strategy(name, **kw), imgs, seen, cfg)
    if device == "cuda":
        torch.cuda.synchronize()
    return res.counters.distorted_batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8, help="ERM steps (DIL runs the same number of distorted batches)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--k", type=int, default=2, help="distortions sampled per DIL step (paper variants)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    names = ["erm", *dil.ALL_VARIANTS]
    configs = [("cpu", False, False)]
    if torch.cuda.is_available():
        configs += [("cuda", False, False), ("cuda", True, False), ("cuda", False, True)]
    print(f"RRDB nf16/nb1, batch {a.batch}x{a.patch}^2, paper variants K={a.k}, released sf K=4 (all seen)")
    print(f"{'device':<6} {'bf16':<5} {'NHWC':<5} {'strategy':<18} {'images/s':>10} {'overhead vs ERM':>16}")
    for dev, bf16, cl in configs:
        base = None
        for n in names:
            ips = bench(n, dev, bf16=bf16, channels_last=cl, steps=a.steps, batch=a.batch, patch=a.patch, k=a.k)
            base = base or ips
            print(f"{dev:<6} {str(bf16):<5} {str(cl):<5} {n:<18} {ips:>10.1f} {base / ips:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
