"""The ``causalir`` command line: train, evaluate, distort, download, reproduce."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .paths import artifacts_dir, repo_root, results_dir
from .utils import atomic_write_json


def _kv(items: List[str], flag: str = "--param") -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo`` (the error names the flag, the value and the rule)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _check_out(path: Path, overwrite: bool, flag: str) -> Path:
    """Refuse an output path before any work: an existing file without --overwrite, a folder, a missing or
    read-only parent folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder, expected a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: folder {parent} does not exist (create it first)")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".causalir-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{flag} {path}: folder {parent} is not writable ({e.strerror or e})") from None
    return path


def _train_argv(argv: List[str], drop: Dict[str, int]) -> List[str]:
    """``argv`` of a train command without the flags in ``drop`` (flag -> how many values follow it; -1: every
    value up to the next flag)."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in drop:
            n = drop[flag]
            i += 1
            if "=" in argv[i - 1]:
                continue
            if n < 0:
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += n
            continue
        out.append(argv[i])
        i += 1
    return out


def _torchrun(nproc: int, argv: List[str]) -> List[str]:
    """The command that runs ``causalir train argv`` as ``nproc`` ranks under torchrun (one machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
            "causalir.cli", "train", *argv]


def _launch_train(a: argparse.Namespace) -> int:
    """``--nproc N``: re-run this command under torchrun; ``--seeds``: one process per seed (``--jobs`` at a
    time), each into ``RUN_DIR/seed-S`` and each itself under torchrun with ``--nproc`` > 1."""
    import subprocess

    argv = _train_argv(list(a.argv), {"--nproc": 1, "--seeds": -1, "--jobs": 1, "--seed": 1, "--run-dir": 1})
    seeds = a.seeds if a.seeds else [a.seed]
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, min(a.jobs, len(seeds)) * a.nproc))
    procs: List[tuple] = []
    failed: List[int] = []

    def command(seed: int) -> List[str]:
        run_dir = a.run_dir / f"seed-{seed}" if a.seeds else a.run_dir
        args = argv + ["--seed", str(seed), "--run-dir", str(run_dir)]
        return _torchrun(a.nproc, args) if a.nproc > 1 else [sys.executable, "-m", "causalir.cli", "train", *args]

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    pending = list(seeds)
    while pending or procs:
        while pending and len(procs) < a.jobs:
            s = pending.pop(0)
            print(f"[train] seed {s}: {' '.join(command(s))}", flush=True)
            procs.append((s, subprocess.Popen(command(s), env=env)))
        s, proc = procs.pop(0)
        if proc.wait() != 0:
            failed.append(s)
    if failed:
        raise RuntimeError(f"training failed for seed(s) {', '.join(map(str, failed))} (see the output above)")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from . import data, distortions, distributed, models, train
    from .utils import seed_everything

    if (a.nproc > 1 or a.seeds) and distributed.env_world_size() == 1:
        return _launch_train(a)

    cfg = train.TrainConfig(steps=a.steps, batch_size=a.batch_size, patch_size=a.patch_size, lr=a.lr, seed=a.seed,
                            device=a.device, precision=a.precision, channels_last=a.channels_last,
                            val_every=a.val_every, ckpt_every=a.ckpt_every)
    train.check_precision(cfg.precision, cfg.device)  # bf16 on a machine without bf16 kernels: refused here
    train.check_run_dir(a.run_dir)  # a read-only or foreign folder fails here, before anything is loaded or trained
    dset = distortions.distortion_set(a.distortion_set)
    strategy = train.build_strategy(a.strategy, **_kv(a.strategy_cfg, "--strategy-cfg"))
    model_cfg = _kv(a.model_cfg, "--model-cfg")
    seed_everything(a.seed)  # the model's initial weights come from --seed too
    model = models.build(a.model, preset=a.preset, **model_cfg)
    imgs = data.folder_images(a.train_folder) if a.train_folder else data.embedded_images("train")
    val = data.embedded_images("val", max_side=256)
    res = train.fit(model, strategy, imgs, dset.seen, cfg, val_images=val, val_distortions=dset.all(),
                    run_dir=a.run_dir, resume=True, allow_changed=a.allow_changed)
    if distributed.rank_world()[0] != 0:
        return 0
    print(json.dumps({"run_dir": str(a.run_dir), "counters": res.counters.as_dict(), "wall_time_s": res.wall_time,
                      "last": res.history[-1] if res.history else None}, indent=1, default=str))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from . import data, distortions, evaluate, models, train
    from .utils import atomic_write_bytes

    out = _check_out(a.out, a.overwrite, "--out") if a.out else None
    run = Path(a.run_dir)
    unit, rec = train.find_checkpoint(run, legacy=True)
    cfg = rec.get("config", {}).get("model") if isinstance(rec.get("config"), dict) else None
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ValueError(f"{unit / 'run.json'} records no model config (config.model.name)")
    cfg = dict(cfg)
    model = models.build(cfg.pop("name"), **cfg)
    models.load_state(model, unit / "model.safetensors")
    dset = distortions.distortion_set(a.distortion_set)
    imgs = data.folder_images(a.folder, max_side=a.max_side) if a.folder else data.embedded_images("test", max_side=a.max_side)
    df = evaluate.evaluate({run.name: model}, imgs, dset.all(), seed=a.seed, device=a.device)
    print(evaluate.summarize(df).round(2).to_string())
    if out is not None:
        atomic_write_bytes(out, df.to_csv(index=False).encode("utf-8"))
    return 0


def cmd_distort(a: argparse.Namespace) -> int:
    from . import data, distortions
    from .utils import make_generator

    _check_out(a.output, a.overwrite, "output")
    d = distortions.build(a.name, **_kv(a.param))
    img = data.load_image(a.input)[None]
    out = d(img, make_generator(a.seed))
    data.save_image(out[0], a.output, overwrite=a.overwrite)
    print(f"{d.label}: {a.input} -> {a.output}")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from . import data

    for n in a.names:
        print(f"{n}: {data.download(n)}")
    return 0


def run_notebooks(profile: str, seed: int, device: str, only: Optional[List[str]] = None, jobs: int = 1) -> List[dict]:
    """Execute every notebook with papermill into artifacts/notebooks/ (``jobs`` at a time, each in its own
    process; with jobs > 1 each kernel gets one thread). Raises when any notebook fails."""
    import os
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    nb_dir = repo_root() / "notebooks"
    out_dir = artifacts_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    books = sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [b for b in books if any(o in b.name for o in only)]
    env = dict(os.environ, CAUSALIR_HEADLESS="1")  # widgets render as one plain call (see nbtools.interact)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", "1")

    def one(nb: Path) -> dict:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "papermill", str(nb), str(out_dir / nb.name), "-k", "python3", "--cwd",
               str(nb_dir), "-p", "PROFILE", profile, "-p", "SEED", str(seed), "-p", "DEVICE", device,
               "--no-progress-bar", "--execution-timeout", "3600"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        print(f"[papermill] {nb.name}: {'ok' if proc.returncode == 0 else 'FAILED'} in {dt:.1f} s", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
        return {"notebook": nb.name, "seconds": round(dt, 1), "ok": proc.returncode == 0}

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        timings = list(pool.map(one, books))
    failed = [t["notebook"] for t in timings if not t["ok"]]
    if failed:
        raise RuntimeError(f"notebooks failed: {', '.join(failed)} (executed copies in {out_dir})")
    return timings


def cmd_reproduce(a: argparse.Namespace) -> int:
    from . import experiments

    if a.committed_claims:
        if a.overwrite:  # the committed files' own claims re-judged in place (explicit: --overwrite)
            for path in sorted(results_dir().glob("*.json")):
                rec = json.loads(path.read_text())
                if isinstance(rec, dict) and rec.get("experiment") in experiments.EXPERIMENTS:
                    atomic_write_json(path, experiments.rejudge(rec))
        # with --overwrite the files now hold the re-judged claims: read them, do not judge them twice
        rows = experiments.collect_claims([results_dir()], rejudge_records=not a.overwrite)
        text = ("# Claims in the committed result files\n\nGenerated by `causalir reproduce --committed-claims` from "
                "`data/results/*.json` (do not edit by hand): every verdict is recomputed from the files' tables "
                "by the claims grammar of `causalir/experiments/claims.py` (reproduced / direction only / not "
                "reproduced / inconclusive, with the failed precondition in *why*). `medium` = the largest CPU "
                "runs made for this repository; see each file's `provenance` and `config`.\n\n"
                + experiments.claims_markdown(rows) + "\n")
        out = results_dir() / "CLAIMS.md"
        out.write_text(text)
        print(text)
        return 0
    timings = []
    if a.notebooks:
        timings = run_notebooks(a.profile, a.seed, a.device, a.only, a.jobs)
    overrides = _kv(a.set, "--set")
    if overrides and len(a.names) != 1:
        raise ValueError(f"--set: overrides apply to one experiment's profile; got {len(a.names)} experiments")
    for name in a.names:
        t0 = time.perf_counter()
        res = experiments.run(name, a.profile, a.seed, a.device, commit=a.commit, overwrite=a.overwrite,
                              ship=a.ship, **overrides)
        timings.append({"experiment": name, "seconds": round(time.perf_counter() - t0, 1), "file": res["_path"]})
    if a.no_claims:
        print(json.dumps(timings, indent=1))
        return 0
    rows = (experiments.collect_claims([artifacts_dir() / "results"])
            + experiments.collect_claims([results_dir()], rejudge_records=True))
    table = experiments.claims_markdown(rows)
    text = (f"# Reproduced claims\n\nThis run: profile={a.profile}, seed={a.seed}, device={a.device}. Rows from "
            "`artifacts/results` were measured now; rows with profile `medium`/`full` come from the committed "
            "result files in `data/results`.\n\n" + table + "\n\n## Wall times\n\n"
            + "\n".join(f"- {t.get('notebook', t.get('experiment'))}: {t['seconds']} s" for t in timings) + "\n")
    path = artifacts_dir() / "claims.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="causalir", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a restorer with a strategy on a distortion set")
    t.add_argument("--model", default="rrdb", help="dncnn | rrdb | srresnet | swinir")
    t.add_argument("--preset", default="small", help="paper | small | tiny")
    t.add_argument("--model-cfg", nargs="*", default=[], metavar="KEY=VALUE", help="override model config")
    t.add_argument("--strategy", default="erm", help="erm | dil_pf | dil_ps | dil_sf | dil_ss | dil_sf_reference")
    t.add_argument("--strategy-cfg", nargs="*", default=[], metavar="KEY=VALUE")
    t.add_argument("--distortion-set", default="noise-dil", help="noise-dil | blur-dil | types-dil")
    t.add_argument("--train-folder", default=None, help="folder of training images (default: embedded photos)")
    t.add_argument("--steps", type=_int_at_least(0), default=1000)
    t.add_argument("--batch-size", type=_int_at_least(1), default=16)
    t.add_argument("--patch-size", type=_int_at_least(8), default=64)
    t.add_argument("--lr", type=_positive_float, default=2e-4)
    t.add_argument("--seed", type=_int_at_least(0), default=0, help="seeds the model's initial weights and every draw of the run")
    t.add_argument("--device", default="auto")
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (CPU with oneDNN bf16 kernels, or CUDA); losses stay in fp32")
    t.add_argument("--channels-last", action="store_true", help="channels_last (NHWC) memory format (CPU and CUDA)")
    t.add_argument("--val-every", type=_int_at_least(0), default=250)
    t.add_argument("--ckpt-every", type=_int_at_least(0), default=500)
    t.add_argument("--run-dir", required=True, type=Path, help="checkpoints go here; an existing run is resumed")
    t.add_argument("--allow-changed", nargs="+", default=[], choices=["data", "steps"],
                   help="resume even though the training images (data) or, under the cosine schedule, --steps changed")
    t.add_argument("--nproc", type=_int_at_least(1), default=1,
                   help="data-parallel ranks on this machine (runs under torchrun; --batch-size is per rank)")
    t.add_argument("--seeds", type=_int_at_least(0), nargs="+", default=None,
                   help="train one run per seed, each in RUN_DIR/seed-S, as parallel processes (see --jobs)")
    t.add_argument("--jobs", type=_int_at_least(1), default=1, help="with --seeds: runs at once (cores split)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="PSNR/SSIM table of a trained run on a distortion set")
    e.add_argument("--run-dir", required=True, type=Path)
    e.add_argument("--distortion-set", default="noise-dil")
    e.add_argument("--folder", default=None, help="image folder (default: embedded test photos)")
    e.add_argument("--max-side", type=_int_at_least(1), default=512)
    e.add_argument("--seed", type=_int_at_least(0), default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, type=Path, help="write the per-image table as CSV")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    e.set_defaults(fn=cmd_evaluate)

    d = sub.add_parser("distort", help="apply a distortion to an image file")
    d.add_argument("name", help="distortion name (see causalir.distortions.names())")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--param", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. sigma=25 or sigma=[5,50]")
    d.add_argument("--seed", type=_int_at_least(0), default=0)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(fn=cmd_distort)

    dl = sub.add_parser("download", help="download benchmark test sets (explicit, checksummed)")
    dl.add_argument("names", nargs="+", help="CBSD68 Kodak24 McMaster Set5 Set14 Urban100 DIV2K")
    dl.set_defaults(fn=cmd_download)

    r = sub.add_parser("reproduce", help="run experiments and/or every notebook, then print the claims table")
    r.add_argument("names", nargs="*", help="experiment names (see causalir.experiments.EXPERIMENTS)")
    r.add_argument("--notebooks", action="store_true", help="execute every notebook with papermill")
    r.add_argument("--only", nargs="*", default=None, help="with --notebooks: only notebooks whose name contains these")
    r.add_argument("--jobs", type=_int_at_least(1), default=1, help="with --notebooks: notebooks run at once (1 thread each)")
    r.add_argument("--profile", default="quick", help="quick | medium | full")
    r.add_argument("--seed", type=_int_at_least(0), default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--commit", action="store_true", help="write results to data/results (committed) instead of artifacts/")
    r.add_argument("--overwrite", action="store_true", help="with --commit: replace an existing committed result; "
                   "with --committed-claims: re-judge the committed files' claims in place")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override fields of the experiment's profile (JSON values), e.g. seeds=3 "
                        "'budgets=[\"batches\",\"iterations\"]' run_root=runs/dil (one experiment)")
    r.add_argument("--ship", action="store_true", help="with --commit: ship the trained models with model cards "
                   "to data/models/NAME/PROFILE/seed-SEED/")
    r.add_argument("--no-claims", action="store_true", help="skip the claims table")
    r.add_argument("--committed-claims", action="store_true",
                   help="only rebuild data/results/CLAIMS.md from the committed result files")
    r.set_defaults(fn=cmd_reproduce)
    return p


def _handled_errors() -> tuple:
    """The errors main() reports as one line (anything else is a bug and keeps its traceback)."""
    errs = [KeyError, ValueError, TypeError, RuntimeError, OSError, MemoryError]  # OSError: files, permissions, network
    try:
        from PIL import Image

        errs.append(Image.DecompressionBombError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    msg = " ".join(msg.split())
    return msg or type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the sub-command's own arguments (re-used by train --nproc / --seeds)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"causalir {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except _handled_errors() as e:
        print(f"causalir {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
