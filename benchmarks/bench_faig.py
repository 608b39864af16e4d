"""FAIG timing on the full-size x2 SRResNet (64 features, 16 blocks, 151,936 kernels): captum + torch.func
(vmap over the interpolation steps, optionally chunked) vs the plain reference loop, on CPU and on a GPU when present.

    python benchmarks/bench_faig.py [--steps 100] [--lr-side 16] [--chunk 0] [--threads 0]

Speed-up = loop wall time / method wall time. CPU s (process time) is the fairer number on a shared machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from causalir import attribution as A
from causalir import models


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def faig_rebuild(target, baseline, x, y, n_steps: int) -> dict:
    """The naive reference algorithm (the benchmark's baseline, not used by the package): at every step a new
    network is built, the interpolated weights theta(k/N) are loaded into it, and L is backpropagated."""
    th_t = {n: p.detach() for n, p in target.named_parameters()}
    th_b = {n: p.detach() for n, p in baseline.named_parameters()}
    cfg = dict(target.config)
    name = cfg.pop("name")
    gsum = {n: torch.zeros_like(p) for n, p in th_t.items()}
    for k in range(n_steps):
        a = k / n_steps
        net = models.build(name, **cfg).to(x.device).eval()
        net.load_state_dict({n: a * th_b[n] + (1 - a) * th_t[n] for n in th_t}, strict=False)
        ((net(x) - y) ** 2).sum().backward()
        for n, p in net.named_parameters():
            gsum[n] += p.grad
    return {n: gsum[n] / n_steps * (th_b[n] - th_t[n]) for n in th_t}


def floor_seconds(target, x, y, n_steps: int, dev: torch.device) -> float:
    """FAIG's floor: ``n_steps`` x one forward + backward of the batch (to the parameters) on one fixed net."""
    net = target
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        net.zero_grad(set_to_none=True)
        ((net(x) - y) ** 2).sum().backward()
    _sync(dev)
    return time.perf_counter() - t0


def pair(dev: torch.device, side: int):
    """A paper-size x2 SRResNet, a perturbed copy as the target, one LR/HR pair."""
    torch.manual_seed(0)
    base = models.build("srresnet", preset="paper").to(dev).eval()
    tgt = models.build("srresnet", preset="paper").to(dev).eval()
    with torch.no_grad():
        for p, q in zip(tgt.parameters(), base.parameters()):
            p.copy_(q + 0.01 * torch.randn_like(q))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, side, side, generator=g).to(dev)
    y = torch.rand(1, 3, 2 * side, 2 * side, generator=g).to(dev)
    return tgt, base, x, y


def overheads(dev: torch.device, steps: int, side: int, vmap_steps: int) -> dict:
    """FAIG wall time against its floor and against the rebuild-every-step baseline (one run): the package's
    default path (``faig``, which picks captum + vmap on CUDA and the module loop on CPU), the plain loop
    (``faig_reference``), the rebuild baseline; vmap and sequential also at ``vmap_steps`` steps (vmap is slow on
    CPU). Ratios are wall time / floor (1.0 = at the floor) and rebuild time / method time."""
    tgt, base, x, y = pair(dev, side)
    A.faig(tgt, base, x, y, 2)  # warm-up
    floor_seconds(tgt, x, y, 2, dev)
    out: dict = {"model": "srresnet-paper", "lr_side": side, "steps": steps,
                 "kernels": A.count_kernels(tgt),
                 "default_path": "captum + vmap" if dev.type == "cuda" else "module loop (no captum)"}
    fl = floor_seconds(tgt, x, y, steps, dev)
    rows = {}
    for name, fn in (("faig (default path)", lambda: A.faig(tgt, base, x, y, steps)),
                     ("faig_reference (loop)", lambda: A.faig_reference(tgt, base, x, y, steps)),
                     ("rebuild every step (baseline)", lambda: faig_rebuild(tgt, base, x, y, steps))):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        rows[name] = time.perf_counter() - t0
    rb = rows["rebuild every step (baseline)"]
    out["floor_s"] = round(fl, 3)
    out["methods"] = {n: {"s": round(t, 3), "x_floor": round(t / fl, 3), "rebuild_speedup": round(rb / t, 3)}
                      for n, t in rows.items()}
    small = {}
    for name, vec in (("vmap", True), ("sequential", False)):  # captum's two paths
        _sync(dev)
        t0 = time.perf_counter()
        A.faig(tgt, base, x, y, vmap_steps, vectorize=vec)
        _sync(dev)
        small[name] = time.perf_counter() - t0
    out["vmap_vs_sequential"] = {"steps": vmap_steps, "vmap_s": round(small["vmap"], 3),
                                 "sequential_s": round(small["sequential"], 3),
                                 "sequential_speedup": round(small["vmap"] / small["sequential"], 3)}
    return out


def bench(dev: torch.device, steps: int, side: int, chunk: int | None) -> list[dict]:
    tgt, base, x, y = pair(dev, side)
    A.faig(tgt, base, x, y, 2, vectorize=True)  # warm-up (imports, vmap tracing)
    rows, out = [], {}
    for name, fn in (("captum + vmap", lambda: A.faig(tgt, base, x, y, steps, internal_batch_size=chunk,
                                                                vectorize=True)),
                     ("captum, no vmap", lambda: A.faig(tgt, base, x, y, steps, vectorize=False)),
                     ("plain loop", lambda: A.faig_reference(tgt, base, x, y, steps))):
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        out[name] = fn()
        _sync(dev)
        rows.append({"device": str(dev), "method": name, "seconds": time.perf_counter() - t0,
                     "cpu_s": time.process_time() - c0})
    a = torch.cat([v.flatten() for v in out["captum + vmap"].values()])
    b = torch.cat([out["plain loop"][k].flatten() for k in out["captum + vmap"]])
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    for r in rows:
        r["corr"] = corr
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr-side", type=int, default=16, help="side of the LR input (HR is twice it)")
    ap.add_argument("--chunk", type=int, default=0, help="captum internal_batch_size (0 = all steps at once)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"FAIG, SRResNet nf=64 nb=16 ({A.count_kernels(models.build('srresnet', preset='paper')):,} kernels), "
          f"{args.steps} steps, LR {args.lr_side}x{args.lr_side}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'device':8} {'method':15} {'wall s':>9} {'CPU s':>9} {'speed-up':>9} {'corr':>8}")
    for dev in devs:
        rows = bench(dev, args.steps, args.lr_side, args.chunk or None)
        loop = rows[-1]["seconds"]
        for r in rows:
            print(f"{r['device']:8} {r['method']:15} {r['seconds']:9.2f} {r['cpu_s']:9.2f} {loop / r['seconds']:8.2f}x "
                  f"{r['corr']:8.5f}")


if __name__ == "__main__":
    main()
