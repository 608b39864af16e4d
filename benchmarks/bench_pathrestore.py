"""Path-Restore: does grouping regions by path turn fewer FLOPs into less time? Times whole-image inference
(63x63 regions, stride 53) with every block on the bypass, on the long path, half/half, and the FLOPs-matched
DnCNN-like network. Run with `make bench` (not part of the tests)."""
from __future__ import annotations

import time

import torch

from causalir import models
from causalir import pathrestore as pr


def _time(fn, reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = pr.MultiPathConfig(nf=32, num_blocks=6)
    net = pr.PathRestore(cfg).eval()
    dn = models.build("dncnn", nf=cfg.nf, depth=pr.matched_dncnn_depth(cfg)).eval()
    x = torch.rand(1, 3, 256, 256)
    regions, _, _ = pr.extract_regions(x)
    n = regions.shape[0]
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, a in [("all bypass", torch.zeros(n, cfg.num_blocks, dtype=torch.long)),
                        ("half random", torch.randint(2, (n, cfg.num_blocks), generator=g)),
                        ("all long", torch.ones(n, cfg.num_blocks, dtype=torch.long))]:
            dt = _time(lambda: net.rollout(regions, "fixed", actions=a))
            rows.append((name, float(pr.region_flops(cfg, a).mean()) / 1e9, dt))
        dt = _time(lambda: net.rollout(regions, "greedy"))
        rows.append(("pathfinder (greedy)", float(pr.region_flops(cfg, net.rollout(regions).actions).mean()) / 1e9,
                     dt))
        dt = _time(lambda: dn(regions))
        rows.append(("DnCNN-like", pr.measured_flops(dn, regions[:1]) / 1e9, dt))
    print(f"{n} regions of 63x63 from a 256x256 image, nf={cfg.nf}, {cfg.num_blocks} blocks")
    print(f"{'paths':<22}{'GFLOPs/region':>15}{'ms/image':>12}")
    for name, gf, dt in rows:
        print(f"{name:<22}{gf:>15.3f}{1000 * dt:>12.1f}")


if __name__ == "__main__":
    main()
