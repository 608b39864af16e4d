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


def _retrain_record(upper_blur: float):
    """A minimal record: every gate passed, baseline/target/input PSNRs, and re-training rows (two seeds) whose
    upper bound on blur is ``upper_blur``."""
    gate = [{"seed": s, **A.GateEntry(m, d, 30.0, 28.0, 0.5).as_dict()} for s in (0, 1) for m, d in F.GATED]
    psnr = [{"seed": s, "model": m, "clean": 30.0, "blur": b, "noise": b} for s in (0, 1)
            for m, b in (("baseline", 22.6), ("target", 24.3))]
    per_crop = [{"seed": s, "model": m, "degradation": d, "crop": 0, "psnr": v} for s in (0, 1) for d in F.DEGRADATIONS
                for m, v in ((F.INPUT, 22.5), ("baseline", 22.6 if d != "clean" else 30.0), ("target", 24.3))]
    val = {"faig": 23.5, "ig": 23.2, "weight_change": 23.1, "random": 23.0, F.UPPER: upper_blur}
    rs = [{"seed": s, "method": m, "filters": d, "psnr_blur": v, "psnr_noise": v} for s in (0, 1)
          for m, v in val.items() for d in F.LABELS]
    rc = [{**r, "crop": 0} for r in rs]
    tables = {"gate": gate, "psnr": psnr, "psnr_per_crop": per_crop, "masking_per_seed": [], "masking_ratios": [],
              "retrain": [{"filters": d, "method": m} for m in val for d in F.LABELS], "retrain_per_seed": rs,
              "retrain_per_crop": rc, "os_confusion": {"blur": {"blur": 1, "noise": 1}, "noise": {"noise": 2}},
              "os_accuracy": [0.75, 0.75]}
    return {"config": {"fractions": [0.01], "retrain_steps": 10, "seeds": [0, 1]}, "tables": tables}


def test_retraining_headroom_is_the_upper_bound_rows_when_the_record_has_them():
    """The upper bound is every parameter re-trained alike (not the target): above the baseline it leaves the claim to
    its effect; at or below the baseline the re-training claims are inconclusive (no 1% of kernels can show anything)."""
    def retrain_claims(upper_blur):
        return [c for c in F.claims(_retrain_record(upper_blur)) if c.claim.startswith("re-training 1% blur")]

    ok = retrain_claims(25.7)
    assert len(ok) == 3 and all(c.verdict != C.INCONCLUSIVE for c in ok)
    heads = [ch for c in ok for ch in c.checks if ch["name"] == "headroom"]
    assert len(heads) == 3 and all("all parameters re-trained" in ch["detail"] and ch["ok"] for ch in heads)
    low = retrain_claims(22.0)          # the target (24.3) would still show headroom: the upper rows must be used
    assert all(c.verdict == C.INCONCLUSIVE and "no headroom at blur test" in c.why for c in low)
