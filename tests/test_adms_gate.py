"""Issue 14: restorers first, attribution second. The validation gate (attribution.restorer_gate), its use in the
ADMS pipeline (it stops before any FAIG mask) and in the claims (inconclusive through the grammar), the parameter
overhead at the seed's relative sizes and the per-patch test set."""
from __future__ import annotations

import pytest

from causalir import attribution as A
from causalir.experiments import adms_rbn as R
from causalir.experiments import claims as C
from causalir.experiments import faig_srresnet as F


def _entries(gains, margin=0.5):
    return [A.GateEntry(f"IM d{i}", f"d{i}", 20.0 + g, 20.0, margin) for i, g in enumerate(gains)]


def test_gate_passes_only_above_the_margin():
    rows = A.restorer_gate(_entries([0.6, 0.5, 0.4, -1.0]), action="record")
    assert [r["passed"] for r in rows] == [True, False, False, False]   # strictly above the margin
    assert [r["gain"] for r in rows] == pytest.approx([0.6, 0.5, 0.4, -1.0])


def test_gate_stop_names_model_psnrs_and_margin():
    with pytest.raises(A.GateError) as e:
        A.restorer_gate([A.GateEntry("UM", "blur", 23.71, 23.85, 0.5),
                         A.GateEntry("UM", "noise", 26.0, 20.0, 0.5)], action="stop", what="ADMS")
    msg = str(e.value)
    assert "UM on blur" in msg and "23.71" in msg and "23.85" in msg and "0.5" in msg
    assert "noise" not in msg.split("validation:")[1]   # only the failing model is named
    assert A.restorer_gate(_entries([1.0, 2.0]), action="stop")[0]["passed"]  # all pass: no error


@pytest.mark.parametrize("kw, field", [({"gate_margin": -0.1}, "gate_margin"), ({"gate_action": "warn"}, "gate_action"),
                                       ({"val_every": -1}, "val_every"), ({"init": "xavier"}, "init"),
                                       ({"test_patch": 4}, "test_patch")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        R.ADMSConfig(**kw)


def test_gate_bad_input():
    with pytest.raises(ValueError, match="action"):
        A.restorer_gate(_entries([1.0]), action="maybe")
    with pytest.raises(ValueError, match="margin"):
        A.restorer_gate([A.GateEntry("UM", "blur", 25.0, 20.0, -1.0)])
    with pytest.raises(ValueError, match="non-empty"):
        A.restorer_gate([])


def test_gate_preconditions_match_the_gate():
    rows = A.restorer_gate(_entries([0.7, 0.3]), action="record")
    pre = F.gate_preconditions(rows, where="val")
    assert [p.ok for p in pre] == [r["passed"] for r in rows]
    assert all(p.name == "restorer" for p in pre)
    assert "needs > +0.5 dB" in pre[1].detail


def _record(gate_gains, seeds=(0, 1)):
    """A synthetic ADMS record: UM < ADMS < IM on every degradation, the input well below; the gate's gains given."""
    labels = ["rain", "blur", "noise"]
    rows, per_seed = [], []
    level = {"input": 20.0, "UM": 24.0, "ADMS": 24.6, "ADMS (oracle c)": 24.7, "IM": 25.0}
    for s in seeds:
        for m, v in level.items():
            for d in labels:
                for i in range(3):
                    rows.append({"method": m, "distortion": d, "image": f"im{i}", "psnr": v + 0.1 * i + 0.05 * s,
                                 "seed": s})
        table = {m: {**{d: v + 0.1 + 0.05 * s for d in labels}, "avg": v + 0.1 + 0.05 * s} for m, v in level.items()}
        gate = A.restorer_gate([A.GateEntry("UM", d, 20.0 + g, 20.0, 0.5) for d, g in zip(labels, gate_gains)],
                               action="record")
        per_seed.append({"seed": s, "table": table, "gate": gate,
                         "params": {"UM": 1000, "ADMS": 1400, "ADMS masked_weights": 90, "ADMS classifier": 310},
                         "accuracy": {"accuracy": 0.9, "confusion": [[9, 1, 0], [0, 9, 1], [1, 0, 9]]}})
    return {"config": {"tasks": ["rain-blur-noise"], "test_patch": 0},
            "tables": {"tasks": {"rain-blur-noise": {"labels": labels, "per_seed": per_seed, "seen_rows": rows}}}}


def test_failed_gate_makes_every_claim_inconclusive():
    bad = R.claims(_record([2.0, 0.2, 3.0]))
    assert all(c.verdict == C.INCONCLUSIVE for c in bad)
    assert all("not a restorer yet: UM at rain-blur-noise seed 0 val blur" in c.why for c in bad)
    good = R.claims(_record([2.0, 1.0, 3.0]))
    assert not any("val" in c.why for c in good)
    assert any(c.verdict != C.INCONCLUSIVE for c in good)


def test_record_without_gate_is_inconclusive():
    rec = _record([2.0, 1.0, 3.0])
    for p in rec["tables"]["tasks"]["rain-blur-noise"]["per_seed"]:
        del p["gate"]
    assert all(c.verdict == C.INCONCLUSIVE and "no validation gate" in c.why for c in R.claims(rec))


def test_overhead_at_seed_sizes_ignores_our_classifier():
    per_seed = _record([1, 1, 1])["tables"]["tasks"]["rain-blur-noise"]["per_seed"]
    a = R.overhead(per_seed, 3)["per_seed"][0]
    per_seed[0]["params"]["ADMS classifier"] *= 10          # a bigger classifier of ours
    b = R.overhead(per_seed, 3)["per_seed"][0]
    assert b["as_built"] > a["as_built"]
    assert b["at_seed_sizes"] == pytest.approx(a["at_seed_sizes"])
    t = R.SEED_TABLES["rain-blur-noise"]
    ratio = t["NAF ADMS"]["params_M"] / t["NAF UM"]["params_M"] - 1 - 3 * R.SEED_MASK_SHARE
    assert a["at_seed_sizes"] - a["masked_only"] == pytest.approx(100 * ratio)


def test_test_patches_tile_the_photos():
    from causalir import data

    imgs, names = R.test_set(R.ADMSConfig(test_patch=48))
    expect = sum((im.shape[-2] // 48) * (im.shape[-1] // 48) for im in data.embedded_images("test"))
    assert len(imgs) == len(names) == expect and len(set(names)) == expect
    assert all(tuple(im.shape) == (3, 48, 48) for im in imgs)
    first = data.embedded_images("test")[0]
    assert bool((imgs[1] == first[:, 0:48, 48:96]).all())


def test_pipeline_stops_before_faig_when_the_gate_fails(monkeypatch):
    """Two training steps cannot make a restorer: with gate_action='stop' the pipeline raises before FAIG."""
    from causalir import attribution
    from causalir.adms import degradation_set

    def no_faig(*a, **k):
        raise AssertionError("FAIG ran on models that failed the gate")

    monkeypatch.setattr(attribution, "discriminative_filters", no_faig)
    cfg = R.ADMSConfig(model_cfg={"nf": 4, "depth": 2}, um_steps=1, im_steps=1, adms_steps=1, warmup_steps=0,
                       batch_size=2, patch_size=24, eval_side=32, gate_margin=5.0, gate_action="stop")
    seen = dict(list(degradation_set("rain-blur-noise")["seen"].items())[:2])
    with pytest.raises(A.GateError, match="margin > 5 dB"):
        R.adms_pipeline(seen, cfg, 0, "cpu")


def test_the_config_loss_reaches_every_fit(monkeypatch):
    """ADMSConfig.loss is the restoration loss of the UM and IM fits (train.fit's TrainConfig.loss)."""
    from causalir import train
    from causalir.adms import degradation_set

    seen_losses = []
    real_fit = train.fit

    def spy(model, strategy, images, dists, cfg, **kw):
        seen_losses.append(cfg.loss)
        return real_fit(model, strategy, images, dists, cfg, **kw)

    monkeypatch.setattr(train, "fit", spy)
    cfg = R.ADMSConfig(model_cfg={"nf": 4, "depth": 2}, um_steps=1, im_steps=1, adms_steps=1, warmup_steps=0,
                       batch_size=2, patch_size=24, eval_side=32, gate_margin=5.0, gate_action="stop", loss="psnr")
    seen = dict(list(degradation_set("rain-blur-noise")["seen"].items())[:2])
    with pytest.raises(A.GateError):
        R.adms_pipeline(seen, cfg, 0, "cpu")
    assert seen_losses == ["psnr"] * 3                  # the UM and the two IMs, before the gate stops the run
