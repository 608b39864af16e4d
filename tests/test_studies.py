"""The committed resumable studies under data/studies/ still match the code that resumes them: a change to a
profile or to a unit's key would silently retrain (or refuse) every committed unit on the next resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from causalir.experiments import dil as X
from causalir.experiments.profiles import select

ROOT = Path(__file__).resolve().parents[1] / "data" / "studies" / "dil-denoise-medium"


def _units():
    return sorted(ROOT.glob("seed-*/*/*/done.json"))


@pytest.mark.skipif(not ROOT.is_dir(), reason="no committed dil-denoise study")
def test_every_committed_dil_unit_matches_the_medium_profile():
    """Each unit's key equals the one the code's medium profile gives that method (at the alpha the committed
    sweep chose), so `causalir reproduce dil-denoise --profile medium --set run_root=...` resumes it."""
    rows = [json.loads(p.read_text())["row"] for p in sorted(ROOT.glob("sweep-seed-0/*/row.json"))]
    assert rows, "the committed study has no sweep rows"
    ok = [r for r in rows if r["gate_margin_db"] > X.PROFILES_DENOISE["medium"].gate_db]
    alpha = max(ok, key=lambda r: (r["val_select"], r["alpha"]))["alpha"] if ok else X.PROFILES_DENOISE["medium"].alpha
    prof = select(X.PROFILES_DENOISE, "medium", {"alpha": alpha})
    units = _units()
    assert units
    first = prof.strategies[0]
    for p in units:
        method = p.parent.name
        key = json.loads(p.read_text())["key"]
        assert X._same_key(key, X._done_key(prof, method == first, method)), p


@pytest.mark.skipif(not ROOT.is_dir(), reason="no committed dil-denoise study")
def test_committed_units_carry_their_weights():
    for p in _units():
        assert (p.parent / "selected.safetensors").is_file(), p.parent
