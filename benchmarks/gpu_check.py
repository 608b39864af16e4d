"""The GPU rows of issue 17, in one run of at most ~8 minutes on one H100/H200 (``make gpu-check``).

1. bf16 matmul peak (8192^3) and the bf16 MFU of the ERM step of RRDB ``paper`` (23 blocks, 64 channels) with
   autocast + channels_last: achieved FLOP/s (3 x the forward's conv FLOPs) over the measured peak and over the
   chip's dense-bf16 datasheet peak.
2. DIL per distorted batch against ERM on the same RRDB, bf16 (images/s in this run).
3. FAIG on the paper-size SRResNet: vmap over the steps vs the sequential path vs the plain loop, against the
   floor, and which one ``faig`` picks on CUDA.

Writes one JSON (``--out``, default ``data/results/gpu-check.json``, and a copy under ``$OUT`` when that is set)
to commit. Refuses to run without CUDA (exit 2): the CPU numbers are ``make bench``'s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dil  # noqa: E402
import bench_faig  # noqa: E402
import bench_foundation as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, SXM parts, no sparsity)
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def datasheet_peak(name: str):
    for k, v in DATASHEET_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "gpu-check.json")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--faig-steps", type=int, default=100)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine (the CPU rows come from `make bench`)",
              file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    name = torch.cuda.get_device_name(dev)
    rec = {"benchmark": "benchmarks/gpu_check.py", "gpu": name, "torch": torch.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform(), "batch": a.batch, "patch": a.patch}
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    peak = F.matmul_peak(torch.bfloat16, 8192, dev, sync)
    rec["matmul_bf16"] = peak
    sheet = datasheet_peak(name)
    rows = []
    for precision, cl in (("fp32", False), ("bf16", False), ("bf16", True)):
        t = F.step_timing("rrdb", "paper", precision, cl, a.batch, a.patch, dev, sync)
        tflops = t["gflop"] / t["s"] / 1e3
        row = {"model": "rrdb-paper", "precision": precision, "channels_last": cl, "ms": round(1e3 * t["s"], 2),
               "tflops": round(tflops, 2), "mfu_vs_measured_bf16_peak": round(tflops / (peak["gflops"] / 1e3), 3)}
        if sheet:
            row["mfu_vs_datasheet"] = round(tflops / sheet, 3)
        rows.append(row)
        print(f"RRDB paper {precision}{'+NHWC' if cl else ''}: {row}", flush=True)
    rec["steps"], rec["datasheet_bf16_tflops"] = rows, sheet

    from causalir import dil

    dil_rows, base = [], None
    for n in ("erm", *dil.ALL_VARIANTS):
        ips = bench_dil.bench(n, "cuda", bf16=True, channels_last=True, steps=6, batch=a.batch, patch=a.patch,
                              model="rrdb", model_cfg={"nf": 64, "nb": 23, "gc": 32})
        base = base or ips
        dil_rows.append({"strategy": n, "images_per_s": round(ips, 1), "overhead_vs_erm": round(base / ips, 3)})
        print(f"DIL {n}: {ips:.1f} images/s, {base / ips:.2f}x ERM", flush=True)
    rec["dil"] = dil_rows

    rec["faig"] = bench_faig.overheads(dev, a.faig_steps, 32, a.faig_steps)
    print(f"FAIG: {json.dumps(rec['faig'])}", flush=True)
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(rec, indent=1) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / a.out.name).write_text(text)
    print(f"wrote {a.out} in {rec['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
