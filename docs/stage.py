"""Lay out the book's source folder for ``make book`` and check the executed notebooks it is made of.

    python docs/stage.py [--notebooks artifacts/notebooks] [--out artifacts/book-src]

Copies docs/*.md, every executed notebook (one per notebooks/NN_*.ipynb) and data/results/CLAIMS.md (as
claims.md) into OUT. Fails (exit 1) when a notebook has no executed copy, a code cell that never ran, or an
error output: the book shows executed notebooks, never half-run ones. A copy older than its source is reported
(the book would show the old run) but does not fail the build.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    problems = []
    code = [(i, c) for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    for i, c in code:
        if c.get("execution_count") is None:
            problems.append(f"cell {i} never ran")
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                problems.append(f"cell {i} shows an error: {o.get('ename')}: {o.get('evalue')}")
    if nb.get("metadata", {}).get("papermill", {}).get("exception"):
        problems.append("papermill recorded an exception")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebooks", type=Path, default=ROOT / "artifacts" / "notebooks")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "book-src")
    args = ap.parse_args(argv)
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    failures = []
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "notebooks").mkdir(parents=True)
    for md in sorted((ROOT / "docs").glob("*.md")):
        shutil.copy2(md, args.out / md.name)
    shutil.copy2(ROOT / "data" / "results" / "CLAIMS.md", args.out / "claims.md")
    for src in sources:
        ex = args.notebooks / src.name
        if not ex.is_file():
            failures.append(f"{src.name}: no executed copy in {args.notebooks} (run `make reproduce` or "
                            "`causalir reproduce --notebooks --no-claims`)")
            continue
        failures += [f"{src.name}: {p}" for p in check(ex)]
        if ex.stat().st_mtime < src.stat().st_mtime:
            print(f"stage.py: note: {ex} is older than {src}: the book shows the older run", file=sys.stderr)
        shutil.copy2(ex, args.out / "notebooks" / src.name)
    for f in failures:
        print(f"stage.py: {f}", file=sys.stderr)
    if not failures:
        print(f"stage.py: {len(sources)} executed notebooks + claims table -> {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
