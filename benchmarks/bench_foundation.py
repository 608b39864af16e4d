"""Throughput of the foundation: patch sampling, each distortion, and an ERM training step.

Run with `make bench` (or `python benchmarks/bench_foundation.py [--device cuda]`); prints a table.
Not a test: numbers depend on the machine."""
from __future__ import annotations

import argparse
import time

import torch

from causalir import data, distortions, models, train
from causalir.utils import make_generator, resolve_device


def timeit(fn, n: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    dev = resolve_device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = make_generator(0, dev)
    sampler = data.PatchSampler(data.embedded_images("train"), a.patch, a.batch, dev)
    rows = [("patch sampler (vectorised gather + 8 dihedral)", timeit(lambda: sampler.sample(g), a.iters, sync))]
    x = sampler.sample(g)
    for name in ("gaussian_noise", "gaussian_blur", "jpeg", "rain", "haze", "spatial_noise", "downsample"):
        d = distortions.with_degree(name, distortions.DEGREES[name][3])
        rows.append((f"distortion {name}", timeit(lambda: d(x, g), a.iters, sync)))
    seen = distortions.distortion_set("noise-dil").seen
    variants = [("fp32", False, False)]
    if dev.type == "cuda":
        variants += [("bf16", True, False), ("bf16+channels_last", True, True)]
    for preset in ("tiny", "small"):
        for label, bf16, cl in variants:
            torch.manual_seed(0)
            m = models.build("rrdb", preset=preset)
            cfg = train.TrainConfig(steps=a.iters, batch_size=a.batch, patch_size=a.patch, device=str(dev), bf16=bf16,
                                    channels_last=cl, progress=False)
            t0 = time.perf_counter()
            train.fit(m, train.build_strategy("erm"), sampler, seen, cfg)
            sync()
            rows.append((f"ERM step rrdb-{preset} {label}", (time.perf_counter() - t0) / a.iters))
    print(f"device={dev} batch={a.batch} patch={a.patch} threads={torch.get_num_threads()}")
    print(f"{'operation':55s} {'ms/batch':>10s} {'images/s':>10s}")
    for name, t in rows:
        print(f"{name:55s} {1e3 * t:10.2f} {a.batch / t:10.1f}")


if __name__ == "__main__":
    main()
