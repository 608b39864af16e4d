#!/usr/bin/env bash
# Issue 13's DIL protocol studies (data/studies/<experiment>-medium/): the experiment's medium profile (DnCNN 32/8,
# both budget arms, the baselines, the released sf at its released and at ERM's rates, alpha swept on validation at
# a quarter of the equal-iterations budget with the restorer gate, 3 seeds). Resumable: every finished unit
# (done.json + selected.safetensors) and sweep row is committed under the study's folder, so a later session on
# a new machine continues. Each study's COMMAND.sh calls this script with its experiment:
#   COMMAND.sh SEED [items]              one seed (one thread), no commit: trains its missing units here.
#                                        Seed 0 runs the alpha sweep first; the others need alpha=<chosen>.
#                                        Two processes may share a seed with disjoint 'strategies=[...]',
#                                        each list starting with "erm" (the seed's first unit also scores
#                                        the distorted input, and its key says so).
#   COMMAND.sh record N [flags]          the N-seed record (seeds 0..N-1) from the cached units, e.g.
#                                        COMMAND.sh record 3 --commit --overwrite --ship
#   COMMAND.sh verify SEED METHOD [ARM]  retrain one finished unit in runs/verify/ and compare it bit for bit
set -euo pipefail
exp=$1; shift
cd "$(dirname "$0")/../.."
ROOT=data/studies/$exp-medium
export OMP_NUM_THREADS=1
which=$1; shift
case "$which" in
  record)
    n=$1; shift
    exec .venv/bin/causalir reproduce "$exp" --profile medium --seed 0 "$@" --set run_root=$ROOT seeds="$n" ;;
  verify)
    seed=$1 method=$2 arm=${3:-both}
    budget=$arm; [ "$budget" = both ] && budget=batches   # train only the unit's own arm
    rm -rf runs/verify
    .venv/bin/causalir reproduce "$exp" --profile medium --seed "$seed" --no-claims \
      --set run_root=runs/verify seeds=1 'sweep={}' "strategies=[\"$method\"]" "budgets=[\"$budget\"]" "${@:4}" >/dev/null
    exec .venv/bin/python - "$ROOT/seed-$seed/$arm/$method" "runs/verify/seed-$seed/$arm/$method" <<'PY'
import json, sys
import torch
from safetensors.torch import load_file
a, b = (json.load(open(f"{d}/done.json")) for d in sys.argv[1:])
wa, wb = (load_file(f"{d}/selected.safetensors") for d in sys.argv[1:])
clock = lambda c: [{k: v for k, v in p.items() if k != "wall_time"} for p in c]  # noqa: E731
own = lambda f: [r for r in f if r["method"] != "input"]  # noqa: E731  (the first unit of a seed also scores the input)
same = {"per-image PSNRs": own(a["frame"]) == own(b["frame"]), "curves (all but the clock)": clock(a["curve"]) == clock(b["curve"]),
        "weights": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)}
print("\n".join(f"{k}: {'identical' if v else 'DIFFERENT'}" for k, v in same.items()))
sys.exit(0 if all(same.values()) else 1)
PY
    ;;
esac
# one seed: seed 0 runs the sweep; the others take the alpha it chose (pass alpha=... among the items)
if [ "$which" = 0 ]; then extra=(); else extra=('sweep={}'); fi
if [ "${1:-}" = --set ]; then shift; fi
exec .venv/bin/causalir reproduce "$exp" --profile medium --seed "$which" --no-claims \
  --set run_root=$ROOT seeds=1 "${extra[@]}" "$@"
