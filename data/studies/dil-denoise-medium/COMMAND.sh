#!/usr/bin/env bash
# The issue-13 DIL-denoise protocol study (DnCNN 32/8, 9 methods, both budget arms, 3 seeds, alpha swept on
# validation at a quarter of the equal-iterations budget). Resumable: every finished unit (done.json +
# selected.safetensors) is committed under this folder, so a later session on a new machine continues.
#   COMMAND.sh SEED [--set items]        one seed (one thread), no commit: trains its missing units here.
#                                        Seed 0 runs the alpha sweep first; the others need alpha=<chosen>.
#                                        Two processes may share a seed with disjoint 'strategies=[...]',
#                                        each list starting with "erm" (the seed's first unit also scores
#                                        the noisy input, and its key says so).
#   COMMAND.sh record N [flags]          the N-seed record (seeds 0..N-1) from the cached units, e.g.
#                                        COMMAND.sh record 3 --commit --overwrite --ship
#   COMMAND.sh verify SEED METHOD [ARM]  retrain one finished unit in runs/verify/ and compare it bit for bit
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=data/studies/dil-denoise-medium
STRATS='["erm","erm_oracle","erm_stratified","dil_pf","dil_ps","dil_sf","dil_ss","dil_sf_reference","dil_sf_reference_lr"]'
SWEEP='{"fraction":0.25,"arm":"iterations","alpha":[0.0001,0.0003,0.001,0.003,0.01]}'
COMMON=(model=dncnn 'model_cfg={"nf":32,"depth":8}' 'budgets=["batches","iterations"]' ref_inner_lr=0.0001
        ref_meta_lr=0.0001 val_tiles=16 threads=1 "strategies=$STRATS")
export OMP_NUM_THREADS=1
which=$1; shift
case "$which" in
  record)
    n=$1; shift
    exec .venv/bin/causalir reproduce dil-denoise --profile medium --seed 0 "$@" \
      --set "${COMMON[@]}" run_root=$ROOT seeds="$n" "sweep=$SWEEP" ;;
  verify)
    seed=$1 method=$2 arm=${3:-both}
    rm -rf runs/verify
    .venv/bin/causalir reproduce dil-denoise --profile medium --seed "$seed" --no-claims \
      --set "${COMMON[@]}" run_root=runs/verify seeds=1 'sweep={}' "strategies=[\"$method\"]" "${@:4}" >/dev/null
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
if [ "$which" = 0 ]; then extra=("sweep=$SWEEP"); else extra=('sweep={}'); fi
if [ "${1:-}" = --set ]; then shift; fi
exec .venv/bin/causalir reproduce dil-denoise --profile medium --seed "$which" --no-claims \
  --set "${COMMON[@]}" run_root=$ROOT seeds=1 "${extra[@]}" "$@"
