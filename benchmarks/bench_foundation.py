"""Throughput of the foundation against the machine's own limit, in ONE run.

1. The matmul peak (2048^3) in fp32 and in bf16, the ceiling each precision's training step is compared with.
2. The ERM training step (forward, fp32 L1 loss, backward, Adam: ``train.ERM.step`` through the loop's
   ``StepContext``, on a fixed batch) of DnCNN (``paper``: 17 layers, 64 channels) and RRDB ``small``, batch
   16 x 48^2, in fp32 and bf16 autocast, each with and without channels_last. Each step's achieved GFLOP/s
   (3 x the forward's conv FLOPs: forward + the two backward products) is printed as a fraction of the
   same-precision matmul peak.
3. The patch sampler and each distortion (ms per batch), the sampler also as a share of the DnCNN fp32 step.

Run with `make bench` (or `python benchmarks/bench_foundation.py [--device cuda] [--note TEXT]`); writes
``data/results/bench-<device>.json`` (machine, torch version, threads, every number) and a markdown table next to
it (``bench-<device>.md``). Not a test: numbers depend on the machine and on what else runs on it (the load
average at start and end is recorded).

Where the CPU has no oneDNN bf16 kernels (``train.precision_support``; ``fit`` then refuses bf16), the bf16 rows
still run, on PyTorch's reference kernels, and are marked ``reference kernels``: they show what bf16 costs there,
not what it gives on a CPU with AVX512_BF16/AMX. Their matmul is 1024^3 (2048^3 takes about a minute) and each
slow configuration is timed once after a warm-up step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

from causalir import data, distortions, models, train
from causalir.utils import make_generator, resolve_device

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"dncnn": 0.90, "rrdb": 0.75}  # issue 17: step GFLOP/s as a share of the same-precision matmul peak


def timed(fn: Callable[[], Any], sync: Callable[[], None], *, budget_s: float = 3.0, max_iters: int = 10,
          slow_s: float = 5.0) -> Dict[str, Any]:
    """Seconds per call: one warm-up call, then calls until ``budget_s`` or ``max_iters`` (at least one). A
    warm-up slower than ``slow_s`` is followed by exactly one timed call."""
    t0 = time.perf_counter()
    fn()
    sync()
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        n += 1
        el = time.perf_counter() - t0
        if warm > slow_s or el >= budget_s or n >= max_iters:
            return {"s": el / n, "iters": n, "warmup_s": round(warm, 3)}


def matmul_peak(dtype: torch.dtype, n: int, dev: torch.device, sync) -> Dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, generator=g).to(dtype)
    b = torch.randn(n, n, device=dev, generator=g).to(dtype)
    t = timed(lambda: a @ b, sync)
    flop = 2 * n ** 3
    return {"n": n, "ms": 1e3 * t["s"], "gflops": flop / t["s"] / 1e9, "iters": t["iters"]}


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-add FLOPs (2 per MAC) of the convolutions and linear layers of one forward."""
    total = [0]

    def conv(m: nn.Conv2d, i, o) -> None:
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]  # in/groups x kh x kw
        total[0] += 2 * o.numel() * k

    def lin(m: nn.Linear, i, o) -> None:
        total[0] += 2 * o.numel() * m.in_features

    hs = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else lin)
          for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total[0]


def step_timing(name: str, preset: str, precision: str, channels_last: bool, batch: int, patch: int,
                dev: torch.device, sync) -> Dict[str, Any]:
    """Seconds per ERM step on a fixed clean batch (noise drawn per step, as in training)."""
    torch.manual_seed(0)
    model = models.build(name, preset=preset).to(dev)
    cfg = train.TrainConfig(steps=10, batch_size=batch, patch_size=patch, device=str(dev), precision=precision,
                            channels_last=channels_last, progress=False)
    if channels_last:
        train.to_channels_last(model)
    model.train()
    g = make_generator(0, dev)
    clean = torch.rand(batch, 3, patch, patch, device=dev, generator=g)
    flop = 3 * forward_flops(model, clean)
    strat = train.build_strategy("erm")
    strat.configure(model, cfg)
    # the loop's own context (fit refuses bf16 where the CPU has no bf16 kernels; the bench times it anyway)
    ctx = train.StepContext(model, lambda: clean, (distortions.GaussianNoise(25.0),), g, train.LOSSES["l1"],
                            train.autocast_factory(cfg, dev), train.Counters(), cfg)
    t = timed(lambda: strat.step(ctx), sync)
    return {"s": t["s"], "iters": t["iters"], "gflop": flop / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--n", type=int, default=2048, help="matmul size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default data/results/bench-<device>.json)")
    ap.add_argument("--note", default="", help="a note stored in the JSON (e.g. what else ran)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    sup = train.precision_support(dev)
    bf16_kind = "native" if sup["native"] else ("oneDNN bf16 kernels" if sup["bf16"] else "reference kernels")
    print(f"device={dev} ({sup['machine']}) torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"bf16: {sup['detail']}")

    # 1. matmul peaks
    peaks = {"fp32": matmul_peak(torch.float32, a.n, dev, sync),
             "bf16": matmul_peak(torch.bfloat16, a.n if sup["bf16"] else min(a.n, 1024), dev, sync)}
    peaks["bf16"]["kernels"] = bf16_kind
    for p, r in peaks.items():
        print(f"matmul {p} {r['n']}^3: {r['ms']:.1f} ms, {r['gflops']:.1f} GFLOP/s")

    # 2. training steps
    steps: List[Dict[str, Any]] = []
    for name, preset in (("dncnn", "paper"), ("rrdb", "small")):
        base = None
        for precision, cl in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
            t = step_timing(name, preset, precision, cl, a.batch, a.patch, dev, sync)
            gflops = t["gflop"] / t["s"]
            row = {"model": name, "preset": preset, "batch": a.batch, "patch": a.patch, "precision": precision,
                   "channels_last": cl, "gflop_per_step": round(t["gflop"], 2), "ms": round(1e3 * t["s"], 1),
                   "iters": t["iters"], "gflops": round(gflops, 2),
                   "fraction_of_peak": round(gflops / peaks[precision]["gflops"], 3),
                   "goal": GOALS[name]}
            if precision == "bf16":
                row["kernels"] = bf16_kind
                row["fraction_of_fp32_peak"] = round(gflops / peaks["fp32"]["gflops"], 3)
            base = base or t["s"]
            row["speedup_vs_fp32"] = round(base / t["s"], 3)
            steps.append(row)
            print(f"step {name}-{preset} {precision}{'+channels_last' if cl else ''}: {row['ms']:.0f} ms, "
                  f"{gflops:.1f} GFLOP/s = {row['fraction_of_peak']:.0%} of the {precision} matmul peak, "
                  f"{row['speedup_vs_fp32']:.2f}x vs fp32", flush=True)

    # 3. data: patch sampler and distortions (the training batch shape)
    g = make_generator(0, dev)
    sampler = data.PatchSampler(data.embedded_images("train"), a.patch, a.batch, dev)
    ops = [("patch sampler (vectorised gather + 8 dihedral)", timed(lambda: sampler.sample(g), sync)["s"])]
    x = sampler.sample(g)
    for dname in ("gaussian_noise", "gaussian_blur", "jpeg", "rain", "haze", "spatial_noise", "downsample"):
        d = distortions.with_degree(dname, distortions.DEGREES[dname][3])
        ops.append((f"distortion {dname}", timed(lambda: d(x, g), sync)["s"]))
    dncnn_fp32 = next(r for r in steps if r["model"] == "dncnn" and r["precision"] == "fp32" and not r["channels_last"])
    sampler_share = 1e3 * ops[0][1] / dncnn_fp32["ms"]
    for n, t in ops:
        print(f"{n:50s} {1e3 * t:8.2f} ms {a.batch / t:10.1f} images/s")
    print(f"patch sampler: {sampler_share:.1%} of the DnCNN fp32 step")

    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    rec = {
        "benchmark": "benchmarks/bench_foundation.py",
        "machine": {"device": str(dev), "name": sup["machine"], "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "bf16_support": sup["bf16"], "bf16_native": sup["native"], "bf16_detail": sup["detail"],
                    **({"gpu": torch.cuda.get_device_name(dev)} if dev.type == "cuda" else {})},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average_start_end": [load0[0] if load0 else None, load1[0] if load1 else None],
        "note": a.note, "wall_s": round(time.perf_counter() - t_start, 1),
        "flops": "3 x the forward's conv/linear multiply-adds (2 FLOP per MAC); elementwise ops not counted",
        "matmul_peak": peaks, "steps": steps, "goals_fraction_of_peak": GOALS,
        "data_ms": {n: round(1e3 * t, 3) for n, t in ops}, "sampler_share_of_dncnn_fp32_step": round(sampler_share, 4),
    }
    out = a.out or ROOT / "data" / "results" / f"bench-{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rec))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def markdown(rec: Dict[str, Any]) -> str:
    m, pk = rec["machine"], rec["matmul_peak"]
    lines = [f"# Foundation benchmark ({m['device']})", "",
             f"{m['name']}, {m['platform']}, torch {rec['torch']}, {rec['threads']} threads. bf16: "
             f"{m['bf16_detail']}.", ""]
    if not m["bf16_support"]:
        lines += ["The bf16 rows ran on PyTorch's reference kernels (`fit` refuses bf16 on this machine): their "
                  "share of the bf16 matmul peak compares two reference kernels and can exceed 100%; what bf16 "
                  "costs here is the speed-up column (and `fraction_of_fp32_peak` in the JSON).", ""]
    if rec["note"]:
        lines += [f"Note: {rec['note']}", ""]
    lines += ["| matmul | n | ms | GFLOP/s |", "|---|---|---|---|"]
    for p, r in pk.items():
        kern = f" ({r['kernels']})" if "kernels" in r else ""
        lines.append(f"| {p}{kern} | {r['n']}^3 | {r['ms']:.1f} | {r['gflops']:.1f} |")
    lines += ["", f"ERM training step, batch {rec['steps'][0]['batch']} x {rec['steps'][0]['patch']}^2 "
              f"({rec['flops']}):", "",
              "| model | precision | channels_last | GFLOP/step | ms/step | GFLOP/s | share of same-precision matmul peak "
              "(goal) | speed-up vs fp32 |", "|---|---|---|---|---|---|---|---|"]
    for r in rec["steps"]:
        kern = f" ({r['kernels']})" if "kernels" in r else ""
        lines.append(f"| {r['model']}-{r['preset']} | {r['precision']}{kern} | {r['channels_last']} | "
                     f"{r['gflop_per_step']:.1f} | {r['ms']:.0f} | {r['gflops']:.1f} | {r['fraction_of_peak']:.0%} "
                     f"({r['goal']:.0%}) | {r['speedup_vs_fp32']:.2f}x |")
    lines += ["", "| data op (training batch) | ms |", "|---|---|"]
    lines += [f"| {n} | {t:.2f} |" for n, t in rec["data_ms"].items()]
    lines += ["", f"Patch sampler: {rec['sampler_share_of_dncnn_fp32_step']:.1%} of the DnCNN fp32 step. "
              f"Load average at start/end: {rec['load_average_start_end']}. Wall time {rec['wall_s']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
