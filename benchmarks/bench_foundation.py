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

import bench_dil  # noqa: E402  (benchmarks/ is on sys.path when this file runs as a script)
import bench_faig  # noqa: E402
from causalir import data, distortions, models, train
from causalir.utils import make_generator, resolve_device

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"dncnn": 0.90, "rrdb": 0.75}  # issue 17: step GFLOP/s as a share of the same-precision matmul peak
DIL_GOALS = {"first_order": 1.15, "second_order": 2.5}  # issue 17: time per distorted image / ERM's
FAIG_GOAL = 1.2  # issue 17: FAIG wall time / its floor (n_steps x one forward + backward)
SAMPLER_GOAL = 0.05  # issue 17: the patch sampler's share of a training step
SECOND_ORDER = ("dil_ps", "dil_ss")


def conv_width(cin: int, cout: int, batch: int, patch: int, dev: torch.device, sync, peak: float) -> Dict[str, Any]:
    """GFLOP/s of one 3x3 convolution's forward + input-gradient + weight-gradient at a channel width."""
    g = make_generator(0, dev)
    conv = nn.Conv2d(cin, cout, 3, padding=1).to(dev)
    x = torch.rand(batch, cin, patch, patch, device=dev, generator=g, requires_grad=True)

    def fb() -> None:
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).sum().backward()

    t = timed(fb, sync)
    flop = 3 * 2 * batch * cout * patch * patch * cin * 9
    return {"in": cin, "out": cout, "ms": round(1e3 * t["s"], 2), "gflops": round(flop / t["s"] / 1e9, 1),
            "fraction_of_peak": round(flop / t["s"] / 1e9 / peak, 3)}


def op_shares(name: str, preset: str, batch: int, patch: int, dev: torch.device) -> Dict[str, float]:
    """Share of the CPU time of two ERM steps by operator family (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    m = models.build(name, preset=preset).to(dev)
    x = torch.rand(batch, 3, patch, patch, device=dev)
    opt = torch.optim.Adam(m.parameters(), 1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (m(x) - x).abs().mean().backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    fam = {"conv forward": ("mkldnn_convolution", "_convolution_mode"), "conv backward": ("convolution_backward",),
           "concat (+ its backward)": ("aten::cat", "CatBackward"), "add/mul": ("aten::add", "aten::mul"),
           "leaky_relu (+ backward)": ("leaky_relu",), "optimizer": ("Adam",)}
    tot = sum(e.self_cpu_time_total for e in prof.key_averages())
    out = {k: 0.0 for k in fam}
    for e in prof.key_averages():
        for k, keys in fam.items():
            if any(s in e.key for s in keys):
                out[k] += e.self_cpu_time_total
                break
    return {k: round(v / tot, 3) for k, v in out.items()}


def compile_try(batch: int, patch: int, dev: torch.device, sync) -> Dict[str, Any]:
    """ERM step (DnCNN nf32/depth 8) eager vs ``torch.compile`` (inductor): compile time and step ms."""
    out: Dict[str, Any] = {"model": "dncnn nf32 depth 8", "batch": batch, "patch": patch}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        m = models.build("dncnn", nf=32, depth=8).to(dev)
        f = m if mode == "eager" else torch.compile(m)
        x = torch.rand(batch, 3, patch, patch, device=dev)
        opt = torch.optim.Adam(m.parameters(), 1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            (f(x) - x).abs().mean().backward()
            opt.step()

        try:
            t = timed(step, sync)
        except Exception as e:  # no compiler, unsupported op: recorded, eager stays
            out[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        out[mode] = {"ms": round(1e3 * t["s"], 1), "warmup_s": t["warmup_s"]}
    if "ms" in out.get("compiled", {}):
        out["speedup"] = round(out["eager"]["ms"] / out["compiled"]["ms"], 3)
        out["kept"] = out["speedup"] > 1.05
    else:
        out["kept"] = False
    return out


def dil_overheads(dev: torch.device, batch: int, patch: int) -> List[Dict[str, Any]]:
    """Each DIL strategy's time per distorted image / ERM's, on DnCNN nf32/depth 8 (the residual study
    backbone), K = 2 distortions for the paper variants, the released sf over all seen distortions."""
    from causalir import dil

    cfg = {"nf": 32, "depth": 8}
    rows, base = [], None
    for name in ("erm", *dil.ALL_VARIANTS):
        ips = bench_dil.bench(name, str(dev), steps=6, batch=batch, patch=patch, model="dncnn", model_cfg=cfg)
        base = base or ips
        goal = None if name == "erm" else DIL_GOALS["second_order" if name in SECOND_ORDER else "first_order"]
        rows.append({"strategy": name, "images_per_s": round(ips, 2), "overhead_vs_erm": round(base / ips, 3),
                     "goal": goal})
        print(f"DIL {name}: {ips:.1f} distorted images/s, {base / ips:.2f}x ERM (goal {goal})", flush=True)
    return rows


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
    ap.add_argument("--markdown-only", type=Path, default=None, metavar="JSON",
                    help="only rewrite the markdown table of an existing JSON (no measurement)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--n", type=int, default=2048, help="matmul size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default data/results/bench-<device>.json)")
    ap.add_argument("--note", default="", help="a note stored in the JSON (e.g. what else ran)")
    ap.add_argument("--faig-steps", type=int, default=20, help="FAIG interpolation steps for the FAIG rows")
    a = ap.parse_args()
    if a.markdown_only is not None:
        a.markdown_only.with_suffix(".md").write_text(markdown(json.loads(a.markdown_only.read_text())))
        return
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

    # 4. why RRDB stays below DnCNN: one 3x3 conv (forward + both backward products) by channel width
    widths = [conv_width(cin, cout, a.batch, a.patch, dev, sync, peaks["fp32"]["gflops"])
              for cin, cout in ((64, 64), (32, 32), (32, 16), (96, 16), (16, 16))]
    for w in widths:
        print(f"conv3x3 {w['in']}->{w['out']}: {w['gflops']:.1f} GFLOP/s = {w['fraction_of_peak']:.0%} of fp32 peak")
    rrdb_ops = op_shares("rrdb", "small", a.batch, a.patch, dev)
    print("RRDB small step, share of CPU time by op:", rrdb_ops)

    # 5. torch.compile (inductor, the installed C++ compiler) against eager, kept only if it wins
    comp = compile_try(a.batch, a.patch, dev, sync)
    print(f"torch.compile: {comp}")

    # 6. DIL per distorted batch against ERM (images/s in this run) on the residual study backbone
    dil_rows = dil_overheads(dev, a.batch, a.patch)
    # 7. FAIG against its floor and the rebuild-every-step baseline
    faig_row = bench_faig.overheads(dev, a.faig_steps, 16, 4)
    print("FAIG:", json.dumps(faig_row))

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
        "sampler_goal": SAMPLER_GOAL, "conv_width": widths, "rrdb_op_shares": rrdb_ops, "torch_compile": comp,
        "dil": dil_rows, "dil_goals": DIL_GOALS, "faig": faig_row, "faig_goal_x_floor": FAIG_GOAL,
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
    lines += ["", f"Patch sampler: {rec['sampler_share_of_dncnn_fp32_step']:.1%} of the DnCNN fp32 step (goal < "
              f"{rec['sampler_goal']:.0%}).", ""]
    lines += ["What holds RRDB below DnCNN: one 3x3 convolution (forward + both backward products, fp32) by channel "
              "width. RRDB's dense blocks are convolutions with `gc` outputs (16 in `small`) over growing inputs; "
              "narrow convolutions do not reach the matmul peak on this CPU.", "",
              "| conv in -> out | ms | GFLOP/s | share of fp32 matmul peak |", "|---|---|---|---|"]
    lines += [f"| {w['in']} -> {w['out']} | {w['ms']:.2f} | {w['gflops']:.1f} | {w['fraction_of_peak']:.0%} |"
              for w in rec["conv_width"]]
    w64 = next((w for w in rec["conv_width"] if w["in"] == 64 and w["out"] == 64), None)
    dn = next((r for r in rec["steps"] if r["model"] == "dncnn" and r["precision"] == "fp32"), None)
    rr = next((r for r in rec["steps"] if r["model"] == "rrdb" and r["precision"] == "fp32"), None)
    narrow = [w["fraction_of_peak"] for w in rec["conv_width"] if w["out"] <= 16]
    if w64 and dn and rr and narrow:
        lines += ["", f"The ceiling on this CPU is the convolution kernel, not the loop: one 64 -> 64 conv alone reaches "
                  f"{w64['fraction_of_peak']:.0%} of the matmul peak and the whole DnCNN step {dn['fraction_of_peak']:.0%} "
                  f"(the goal of {dn['goal']:.0%} assumed a conv as fast as a matmul); RRDB's narrow dense-block convs "
                  f"reach {min(narrow):.0%}-{max(narrow):.0%} and its step {rr['fraction_of_peak']:.0%}, with conv "
                  f"forward + backward {rec['rrdb_op_shares']['conv forward'] + rec['rrdb_op_shares']['conv backward']:.0%} "
                  "of its time, so concat, LeakyReLU and the optimiser have little left to fuse."]
    lines += ["", "RRDB `small` ERM step, share of CPU time (torch.profiler): "
              + ", ".join(f"{k} {v:.0%}" for k, v in rec["rrdb_op_shares"].items()) + ".", ""]
    c = rec["torch_compile"]
    if "ms" in c.get("compiled", {}):
        lines += [f"torch.compile (inductor) on the ERM step of {c['model']}: eager {c['eager']['ms']:.0f} ms, "
                  f"compiled {c['compiled']['ms']:.0f} ms ({c['speedup']:.2f}x; compile {c['compiled']['warmup_s']:.0f} "
                  f"s): {'kept' if c['kept'] else 'not kept (no gain)'}.", ""]
    else:
        lines += [f"torch.compile: {c.get('compiled')}; not kept.", ""]
    lines += ["DIL per distorted batch against ERM (DnCNN nf32/depth 8, time per distorted image / ERM's, one run):",
              "", "| strategy | distorted images/s | overhead vs ERM | goal |", "|---|---|---|---|"]
    for r in rec["dil"]:
        goal = "" if r["goal"] is None else f"<= {r['goal']}x ({'met' if r['overhead_vs_erm'] <= r['goal'] else 'missed'})"
        lines.append(f"| {r['strategy']} | {r['images_per_s']:.1f} | {r['overhead_vs_erm']:.2f}x | {goal} |")
    f = rec["faig"]
    lines += ["", f"FAIG on {f['model']} ({f['kernels']:,} kernels), {f['steps']} steps, LR {f['lr_side']}^2: floor "
              f"(steps x one forward + backward) {f['floor_s']:.2f} s; default path on this device: "
              f"{f['default_path']}.", "",
              "| method | s | x floor (goal <= %.1f) | speed-up vs rebuild baseline |" % rec["faig_goal_x_floor"],
              "|---|---|---|---|"]
    for n, r in f["methods"].items():
        lines.append(f"| {n} | {r['s']:.2f} | {r['x_floor']:.2f} | {r['rebuild_speedup']:.2f}x |")
    v = f["vmap_vs_sequential"]
    lines += ["", f"captum's two paths ({v['steps']} steps): vmap over the steps {v['vmap_s']:.2f} s, sequential "
              f"{v['sequential_s']:.2f} s (sequential {v['sequential_speedup']:.2f}x faster).", "",
              f"Load average at start/end: {rec['load_average_start_end']}. Wall time {rec['wall_s']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
