"""The committed resumable studies under data/studies/ still match the code that resumes them: a change to a
profile or to a unit's key would silently retrain (or refuse) every committed unit on the next resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from causalir.experiments import dil as X
from causalir.experiments.profiles import select

STUDIES = Path(__file__).resolve().parents[1] / "data" / "studies"
#: study folder -> the profile table whose medium profile resumes it
PROFILES = {"dil-denoise-medium": X.PROFILES_DENOISE, "dil-deblur-medium": X.PROFILES_DEBLUR,
            "dil-types-medium": X.PROFILES_TYPES}
ROOTS = sorted(p for p in STUDIES.iterdir() if p.is_dir()) if STUDIES.is_dir() else []


def _units(root: Path):
    return sorted(root.glob("seed-*/*/*/done.json"))


def test_every_study_folder_is_known_and_has_its_command():
    for root in ROOTS:
        assert root.name in PROFILES, f"{root.name}: a study folder without a profile table in this test"
        command = (root / "COMMAND.sh").read_text()
        assert f'/dil-study.sh" {root.name.removesuffix("-medium")} "$@"' in command, root


@pytest.mark.parametrize("root", ROOTS, ids=[r.name for r in ROOTS])
def test_every_committed_dil_unit_matches_the_medium_profile(root):
    """Each unit's key equals the one the code's medium profile gives that method (at the alpha the committed
    sweep chose, or the profile's own before the sweep has run), so `COMMAND.sh SEED` resumes it."""
    table = PROFILES[root.name]
    med = table["medium"]
    rows = [json.loads(p.read_text())["row"] for p in sorted(root.glob("sweep-seed-0/*/row.json"))]
    ok = [r for r in rows if r["gate_margin_db"] > med.gate_db]
    done = len(rows) == len(med.sweep.get("alpha", []))
    alpha = max(ok, key=lambda r: (r["val_select"], r["alpha"]))["alpha"] if ok else med.alpha
    prof = select(table, "medium", {"alpha": alpha})
    units = _units(root)
    first = prof.strategies[0]
    for p in units:
        method = p.parent.name
        if method in X.dil.PAPER_VARIANTS and not done:
            pytest.fail(f"{p}: a paper variant trained before the sweep finished")
        key = json.loads(p.read_text())["key"]
        assert X._same_key(key, X._done_key(prof, method == first, method)), p


@pytest.mark.parametrize("root", ROOTS, ids=[r.name for r in ROOTS])
def test_committed_units_carry_their_weights(root):
    for p in _units(root):
        assert (p.parent / "selected.safetensors").is_file(), p.parent


#: side arms of a study (e.g. ``alpha-0.01``: the paper variants rerun at a fixed alpha beside the study's choice)
SIDES = sorted(p for r in ROOTS for p in r.glob("alpha-*") if p.is_dir())


@pytest.mark.parametrize("side", SIDES, ids=[f"{s.parent.name}/{s.name}" for s in SIDES])
def test_side_arm_units_match_the_medium_profile_at_their_alpha(side):
    """A side arm's units are the medium profile's at the alpha its folder names, each with its weights, so
    `dil.committed_study(..., sub=...)` rebuilds its record without training."""
    prof = select(PROFILES[side.parent.name], "medium", {"alpha": float(side.name.split("-", 1)[1])})
    units = _units(side)
    assert units, f"{side}: an empty side arm"
    for p in units:
        method = p.parent.name
        assert X._same_key(json.loads(p.read_text())["key"], X._done_key(prof, method == prof.strategies[0], method)), p
        assert (p.parent / "selected.safetensors").is_file(), p.parent
