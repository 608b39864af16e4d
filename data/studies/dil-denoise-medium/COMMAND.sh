#!/usr/bin/env bash
# The issue-13 DIL-denoise protocol study (DnCNN 32/8, 9 methods, both budget arms, 3 seeds, alpha swept on
# validation at a quarter of the equal-iterations budget). Resumable: every finished unit (done.json +
# selected.safetensors) is committed under this folder, so a later session on a new machine continues.
#   COMMAND.sh SEED [extra --set items]   one seed (one thread), no commit: runs units into this folder
#   COMMAND.sh all --commit --overwrite --ship   the 3-seed record from the cached units (trains what is missing)
set -euo pipefail
cd "$(dirname "$0")/../../.."
STRATS='["erm","erm_oracle","erm_stratified","dil_pf","dil_ps","dil_sf","dil_ss","dil_sf_reference","dil_sf_reference_lr"]'
SWEEP='{"fraction":0.25,"arm":"iterations","alpha":[0.0001,0.0003,0.001,0.003,0.01]}'
COMMON=(model=dncnn 'model_cfg={"nf":32,"depth":8}' 'budgets=["batches","iterations"]' ref_inner_lr=0.0001
        ref_meta_lr=0.0001 val_tiles=16 threads=1 run_root=data/studies/dil-denoise-medium)
which=$1; shift
export OMP_NUM_THREADS=1
if [ "$which" = all ]; then
  exec .venv/bin/causalir reproduce dil-denoise --profile medium --seed 0 "$@" --set "${COMMON[@]}" seeds=3 \
    "strategies=$STRATS" "sweep=$SWEEP"
fi
# seed 0 runs the sweep; the other seeds take the alpha it chose (pass alpha=... among the extra items)
if [ "$which" = 0 ]; then extra=("sweep=$SWEEP"); else extra=('sweep={}'); fi
exec .venv/bin/causalir reproduce dil-denoise --profile medium --seed "$which" --no-claims --set "${COMMON[@]}" \
  seeds=1 "strategies=$STRATS" "${extra[@]}" "$@"
