"""Issue 14 for FAIG: the validation gate on baseline and target, the scale-free masking table and the headroom of
the re-training table."""
from __future__ import annotations

import pytest
import torch

from causalir import attribution as A
from causalir import models
from causalir.experiments import claims as C
from causalir.experiments import faig_srresnet as F


def test_paper_ratios_are_computed_from_the_table():
    r = F.paper_ratios()["blur@0.01"]
    p = F.PAPER_MASKING[("blur", 0.01)]
    assert r["ig"] == pytest.approx(p["faig"] / p["ig"], abs=1e-3)
    assert round(r["ig"], 2) == 1.55 and round(r["weight_change"]) == 37 and round(r["random"]) == 95


def test_masking_ratios_are_scale_free():
    rows = [{"seed": 0, "filters": "blur", "fraction": 0.01, "method": m, "oc_same": v}
            for m, v in {"faig": 2.0, "ig": 1.0, "weight_change": 0.5, "random": 0.1}.items()]
    a = F.masking_ratios(rows)[0]
    scaled = F.masking_ratios([{**r, "oc_same": 1000 * r["oc_same"]} for r in rows])[0]
    assert a["ig"] == pytest.approx(2.0) and a["random"] == pytest.approx(20.0)
    assert all(a[o] == pytest.approx(scaled[o]) for o in F.OTHERS)


@pytest.mark.parametrize("kw, field", [({"gate_margin": -1}, "gate_margin"), ({"gate_action": "x"}, "gate_action"),
                                       ({"val_every": 1.5}, "val_every")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises((ValueError, TypeError), match=field):
        F.FAIGConfig(**kw)


def test_untrained_models_fail_the_gate():
    torch.manual_seed(0)
    cfg = F.FAIGConfig(crop=32, gate_margin=0.5)
    net = models.build("srresnet", nf=4, nb=1)
    hr = F.crops("val", cfg.crop, 1)
    val = F.eval_set(hr, 0)
    entries = F.gate_entries({"baseline": net, "target": net}, val, hr, cfg)
    assert [(e.model, e.degradation) for e in entries] == list(F.GATED)
    assert not any(e.passed for e in entries)                       # an untrained SRResNet is worse than bicubic
    rows = A.restorer_gate(entries, "record")
    assert all(r["input_psnr"] == pytest.approx(F.psnr_mean(F.upsample_input(val[r["degradation"]]), hr))
               for r in rows)
    with pytest.raises(A.GateError, match="baseline on clean"):
        A.restorer_gate(entries, "stop")


def test_gate_rows_make_claims_inconclusive():
    good = [{"seed": 0, **A.GateEntry(m, d, 30.0, 28.0, 0.5).as_dict()} for m, d in F.GATED]
    bad = [dict(r) for r in good]
    bad[1].update(psnr=28.1, gain=0.1, passed=False)
    assert all(p.ok for p in F._gate({"gate": good}, [0]))
    pre = F._gate({"gate": bad}, [0])
    assert [p.ok for p in pre] == [True, False, True] and "target at seed 0 val blur" in pre[1].detail
    assert not F._gate({}, [0])[0].ok
    assert C.decide(1.0, C.estimate([1.0, 1.1]), require=pre)[0] == C.INCONCLUSIVE
