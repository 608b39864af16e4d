"""Validate the notebooks papermill executed (``causalir reproduce --notebooks``), without executing them again.

Each notebook in notebooks/ must have an executed copy in artifacts/notebooks/ (``$CAUSALIR_ARTIFACTS``) that is
newer than its source, ran every code cell in order, holds no error output, and whose parameters cell was
injected by papermill with the profile that was asked for (``CAUSALIR_NB_PROFILE``, default quick).
"""
import json
import os

import pytest

from causalir.paths import artifacts_dir, repo_root

SOURCES = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PROFILE = os.environ.get("CAUSALIR_NB_PROFILE", "quick")


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_executed_copy(src):
    out = artifacts_dir() / "notebooks" / src.name
    assert out.is_file(), f"{out} is missing: run `causalir reproduce --notebooks` first"
    assert out.stat().st_mtime >= src.stat().st_mtime, f"{out} is older than {src}: execute it again"
    nb = json.loads(out.read_text())
    pm = nb.get("metadata", {}).get("papermill", {})
    assert pm.get("parameters", {}).get("PROFILE") == PROFILE, f"{out.name} was run with {pm.get('parameters')}"
    assert pm.get("exception") in (None, False), f"{out.name}: papermill recorded an exception"
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, f"{out.name} has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{out.name}: {counts.count(None)} code cell(s) never ran"
    assert counts == sorted(counts), f"{out.name}: cells ran out of order {counts}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{out.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    tags = [c for c in nb["cells"] if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tags) == 1, f"{out.name}: papermill did not inject the parameters exactly once"


def test_every_source_is_stripped_and_has_one_parameters_cell():
    for src in SOURCES:
        nb = json.loads(src.read_text())
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{src.name}: expected one 'parameters' cell, found {len(params)}"
        for k in ("PROFILE", "SEED", "DEVICE"):
            assert k in "".join(params[0]["source"]), f"{src.name}: parameters cell lacks {k}"
        dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
                 and (c.get("outputs") or c.get("execution_count") is not None)]
        assert not dirty, f"{src.name}: cells {dirty} hold outputs; commit notebooks stripped (make strip)"
