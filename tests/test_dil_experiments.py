"""DIL experiments: tiny end-to-end runs of the four registered experiments, equal budgets, validation-only
selection, the profile tables, the claims (through the claims grammar) and the records the notebooks render."""
from __future__ import annotations

import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from causalir import dil, distortions, experiments
from causalir.experiments import claims as C
from causalir.experiments import dil as X
from causalir.experiments.profiles import select

torch.set_num_threads(1)

TINY = dict(budget=8, checkpoints=2, batch_size=2, patch_size=16, eval_side=32, val_side=32,
            model_cfg={"nf": 8, "nb": 1, "gc": 4})
NAMES = ("dil-denoise", "dil-deblur", "dil-types", "dil-backbones")


@pytest.fixture(scope="module")
def denoise(tmp_path_factory):
    out = tmp_path_factory.mktemp("res")
    return experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=out, keep_models=True,
                           strategies=("erm", "dil_pf", "dil_sf_reference"), seeds=2,
                           sweep={"budget": 4, "alpha": [0.01, 0.1], "ref_meta_lr": [1e-3]}, **TINY)


def test_denoise_record_is_complete_and_written(denoise):
    with open(denoise["_path"]) as f:
        saved = json.load(f)
    assert saved["experiment"] == "dil-denoise" and saved["profile"] == "quick"
    assert {"config", "tables", "claims", "curves", "provenance", "wall_time_s"} <= set(saved)
    assert "models" not in saved                                     # kept models never reach the file
    assert saved["config"]["seeds"] == [0, 1]
    methods = {r["method"] for r in saved["tables"]["summary"]}
    assert methods == {"input", "ERM", "DIL-pf", "DIL-sf (released code)"}
    # every claim has a computed verdict of the grammar; the paper's numbers are the ones of seed 000
    assert {c["verdict"] for c in saved["claims"]} <= set(C.VERDICTS)
    erm30 = next(c for c in saved["claims"] if c["claim"].startswith("ERM PSNR at unseen σ=30"))
    assert erm30["paper"] == 24.90 and erm30["tolerance"] == "±1"
    gain = next(c for c in saved["claims"] if c["claim"].startswith("DIL-pf beats ERM at unseen σ=50"))
    assert gain["over"] == "seeds" and gain["n"] == 2                 # two seeds: per-seed differences
    assert [p["name"] for p in gain["checks"]] == ["restorer", "restorer"]
    assert experiments.rejudge(saved)["claims"] == saved["claims"]    # claims come from config + tables alone


def test_keep_models_returns_the_first_seeds_models(denoise):
    assert set(denoise["models"]) == {"ERM", "DIL-pf", "DIL-sf (released code)"}
    assert all(isinstance(m, torch.nn.Module) for m in denoise["models"].values())
    assert not hasattr(X, "LAST_MODELS")


def test_equal_distorted_batch_budget_and_counters(denoise):
    for method, runs in denoise["tables"]["budgets"].items():
        assert len(runs) == 2
        for r in runs:
            assert r["distorted_batches"] == 8, method           # 8 = ERM 8x1 = pf 2x(2K=4) = released 2x(K=4)
            assert r["images_forwarded"] == 16
            assert r["wall_time_s"] > 0
    assert denoise["tables"]["equal_wall_time"]["val"].keys() == denoise["curves"].keys()


def test_selection_uses_validation_only(denoise):
    cfg = denoise["config"]
    assert not set(cfg["val_select"]) & set(cfg["test_levels"])      # never a test level
    assert "σ=50" in cfg["val_curve"][0]
    sweep = denoise["tables"]["sweep"]
    accepted = [r["alpha"] for r in sweep["rows"] if r["strategy"] == "dil_pf" and r["accepted"]]
    # the gate: only a candidate whose theta beats the noisy input at every seen level may win; else the
    # profile's alpha stays and the sweep says why
    if accepted:
        assert sweep["chosen"]["alpha"] in accepted
    else:
        assert sweep["chosen"]["alpha"] == X.PROFILES_DENOISE["quick"].alpha and "alpha_note" in sweep["chosen"]
    for r in sweep["rows"]:
        assert r["accepted"] == (r["gate_margin_db"] > sweep["gate_db"])
    assert denoise["config"]["profile"]["alpha"] == sweep["chosen"]["alpha"]
    assert "validation photos" in sweep["criterion"] and "noisy input" in sweep["criterion"]
    for runs in denoise["curves"].values():
        for c in runs:
            assert [p["distorted_batches"] for p in c] == sorted(p["distorted_batches"] for p in c)
            assert all("val σ=50" in p and "val_select" in p for p in c)


def test_notebook_helpers_render_the_record(denoise):
    import matplotlib

    matplotlib.use("Agg")
    t = X.results_table(denoise)
    assert "ERM" in t.index and any(c.endswith("=50") for c in t.columns)
    gi = X.gain_over_input(denoise)
    assert "input" not in gi.index and (gi.loc["ERM"] == (t.loc["ERM"] - t.loc["input"]).round(2)).all()
    pv = X.paper_vs_ours(denoise)
    assert pv.loc["ERM", "paper σ=50"] == 18.96 and "±" in pv.loc["ERM", "ours σ=50"]
    ax = X.plot_curves(denoise)
    assert len(ax.get_lines()) == 3
    net = torch.nn.Conv2d(3, 3, 1)
    ex = X.restore_examples({"id": net}, 30, side=32)
    assert set(ex) == {"clean", "input: noise σ=30", "id"} and ex["id"].shape == (1, 3, 32, 32)
    fig = X.show_restorations(denoise["models"], "DIL-pf", 50, side=32)   # the widget's function
    assert len(fig.axes) >= 4 and "dB" in fig.axes[2].get_title()
    with pytest.raises(KeyError, match="valid"):
        X.show_restorations(denoise["models"], "DIL-zz", 50)
    assert X.plot_sampling_diagram() is not None


@pytest.mark.parametrize("name", ["dil-deblur", "dil-types", "dil-backbones"])
def test_other_experiments_run_tiny(name, tmp_path):
    over = dict(TINY, budget=4, strategies=("erm", "dil_sf_reference"), checkpoints=1)
    if name == "dil-backbones":
        over.pop("model_cfg")
        over["backbones"] = {"rrdb": {"nf": 8, "nb": 1, "gc": 4}, "swinir": {"preset": "tiny"}}
    res = experiments.run(name, "quick", seed=0, device="cpu", out_dir=tmp_path, keep_models=True, **over)
    assert res["claims"] and all(c["verdict"] in C.VERDICTS for c in res["claims"])
    # one seed: the "beats ERM" claims use the paired per-image differences
    assert all(c["over"] == "images" and c["n"] == 3 for c in res["claims"])
    methods = {r["method"] for r in res["tables"]["summary"]}
    if name == "dil-backbones":
        assert {"rrdb: ERM", "swinir: ERM", "swinir: DIL-sf (released code)"} <= methods
        assert res["config"]["backbones"]["rrdb"] == {"nf": 8, "nb": 1, "gc": 4}
        assert "backbones" not in res["config"]["profile"]
        assert set(res["models"]) == {"rrdb: ERM", "rrdb: DIL-sf (released code)", "swinir: ERM",
                                      "swinir: DIL-sf (released code)"}
    else:
        assert "ERM" in methods and set(res["models"]) == {"ERM", "DIL-sf (released code)"}
    if name == "dil-types":
        unseen = {d.label for d in distortions.distortion_set("types-dil").unseen}
        assert unseen <= {r["distortion"] for r in res["tables"]["summary"]}
        assert not unseen & set(res["config"]["val_select"])


def test_registered_experiments_and_their_tables():
    for name, exp, profs in zip(NAMES, (X.DENOISE, X.DEBLUR, X.TYPES, X.BACKBONES),
                                (X.PROFILES_DENOISE, X.PROFILES_DEBLUR, X.PROFILES_TYPES, X.PROFILES_BACKBONES)):
        assert experiments.get(name) is exp and exp.profiles is profs and exp.source == X.SOURCE
        assert set(profs) == {"quick", "medium", "full"}
    assert X.DENOISE.paper is X.PAPER_DENOISE and X.BACKBONES.paper is X.PAPER_BACKBONES
    assert not hasattr(X, "profile_for") and not hasattr(X, "BACKBONE_CFG")


def _fields(p):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(p).items()}


def test_profiles_equal_the_old_per_name_branches():
    """Literal values of what the old ``profile_for(experiment, profile)`` returned."""
    med = X.PROFILES_DENOISE["medium"]     # issue 13's study (data/studies/dil-denoise-medium/COMMAND.sh)
    assert (med.model, med.model_cfg, med.budget, med.batch_size, med.seeds) == ("dncnn", {"nf": 32, "depth": 8},
                                                                                  1600, 8, 3)
    assert (med.alpha, med.ref_inner_lr, med.ref_meta_lr) == (0.01, X.RELEASED_LR, X.RELEASED_LR)
    assert (med.checkpoints, med.eval_side, med.n_distortions, med.lr) == (4, 128, 2, 1e-3)
    assert (med.budgets, med.val_tiles, med.threads, med.gate_db) == (("batches", "iterations"), 16, 1, 0.0)
    assert set(med.strategies) == set(X.LABEL) and med.strategies[0] == "erm"
    assert med.sweep == {"fraction": 0.25, "arm": "iterations", "alpha": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}
    assert X.PROFILES_DENOISE["quick"] == X.DILProfile()
    assert X.PROFILES_DENOISE["quick"].strategies == ("erm", "dil_pf", "dil_ps", "dil_sf", "dil_ss",
                                                      "dil_sf_reference")
    three = ("erm", "dil_sf", "dil_sf_reference")
    for profs in (X.PROFILES_DEBLUR, X.PROFILES_TYPES, X.PROFILES_BACKBONES):
        q = profs["quick"]
        assert q.strategies == three and (q.budget, q.seeds, q.checkpoints, q.eval_side, q.sweep) == (64, 1, 2, 96, {})
    m = X.PROFILES_BACKBONES["medium"]
    assert (m.budget, m.seeds, m.checkpoints, m.eval_side, m.sweep, m.batch_size) == (96, 1, 4, 128, {}, 4)
    # deblur and types at medium: the denoise study's protocol with the first-order variants and every baseline
    study = ("erm", "erm_oracle", "erm_stratified", "dil_pf", "dil_sf", "dil_sf_reference", "dil_sf_reference_lr")
    assert X.PROFILES_DEBLUR["medium"] == dataclasses.replace(med, strategies=study)
    assert X.PROFILES_TYPES["medium"] == dataclasses.replace(med, strategies=study, n_distortions=None)
    assert X.PROFILES_BACKBONES["medium"].strategies == three
    assert X.PROFILES_TYPES["quick"].n_distortions is None
    assert X.PROFILES_DEBLUR["quick"].n_distortions == 2 and X.PROFILES_BACKBONES["medium"].n_distortions == 2
    full = X.PROFILES_DENOISE["full"]
    for profs in (X.PROFILES_DEBLUR, X.PROFILES_TYPES):
        assert profs["full"] == full                                  # no per-name change at full
    assert {k: v for k, v in _fields(X.PROFILES_BACKBONES["full"]).items() if k != "backbones"} == _fields(full)
    assert full.model_cfg == {"preset": "paper"} and full.patch_size == 64 and full.batch_size == 32
    assert full.seeds >= 3 and full.budget >= 100_000 and full.alpha == 0.01 and full.ref_meta_lr == 1e-4
    bb = {p: X.PROFILES_BACKBONES[p].backbones for p in ("quick", "medium", "full")}
    assert bb["quick"] == {"rrdb": {"nf": 16, "nb": 1, "gc": 8}, "swinir": {"preset": "tiny"}}
    assert bb["medium"]["swinir"] == {"dim": 16, "depths": (2,), "heads": 2, "window": 8}
    assert bb["full"] == {"rrdb": {"preset": "paper"}, "swinir": {"preset": "paper"}}


def test_profiles_and_overrides():
    # the code's medium profile is the one that produced the committed study (multi-seed)
    med = X.PROFILES_DENOISE["medium"]
    assert med.seeds >= 2
    committed = experiments.load_results("dil-denoise", "medium")
    if committed is not None:
        # the values the committed sweep chose (alpha...) replace the profile's fall-backs in the record
        chosen = {k: v for k, v in (committed["tables"].get("sweep") or {}).get("chosen", {}).items()
                  if not k.endswith("_note")}
        assert all(committed["config"]["profile"][k] == v for k, v in chosen.items())
        ran = {k: v for k, v in committed["config"]["profile"].items() if k not in ("seeds", "sweep", *chosen)}
        ours = {k: v for k, v in _fields(med).items() if k not in ("seeds", "sweep", *chosen)}
        # fields added after the committed run must still be at the defaults it ran with
        new = {k: v for k, v in ours.items() if k not in ran}
        assert new == {k: v for k, v in _fields(X.DILProfile()).items() if k in new}
        assert ran == {k: v for k, v in ours.items() if k in ran}
    p = select(X.PROFILES_DENOISE, "quick", {"budget": 40, "n_distortions": 2})
    assert p.steps("erm", 4) == 40 and p.steps("dil_pf", 4) == 10 and p.steps("dil_sf_reference", 4) == 10
    assert dil.batches_per_step("dil_ss", 4) == 8
    assert select(X.PROFILES_TYPES, "quick", {"strategies": ["erm"]}).strategies == ("erm",)
    with pytest.raises(TypeError, match="unknown override"):
        select(X.PROFILES_DENOISE, "quick", {"bogus": 1})
    with pytest.raises(TypeError, match="unknown override"):
        X.run_denoise("quick", device="cpu", bogus=1)                # checked before any training
    with pytest.raises(ValueError, match="unknown profile"):
        select(X.PROFILES_DENOISE, "huge")
    with pytest.raises(ValueError, match="strategies"):
        X.DILProfile(strategies=("erm", "dil_zz"))
    with pytest.raises(ValueError, match="budget"):
        X.DILProfile(budget=0)


def _record(psnr, seeds=(0,), strategies=("erm", "dil_pf")):
    """A synthetic dil-denoise record: psnr[method] = per-image PSNRs at σ=50 (the same for every seed)."""
    lab = distortions.GaussianNoise(50.0).label
    rows = [{"method": m, "distortion": lab, "image": f"im{i}", "psnr": v + 0.1 * s, "seed": s, "set": "embedded-test"}
            for s in seeds for m, vals in psnr.items() for i, v in enumerate(vals)]
    return {"config": {"profile": {"strategies": list(strategies)}}, "tables": {"per_image": rows}}


def test_beats_erm_claims_use_paired_images_seeds_and_restorer_checks():
    claim = "DIL-pf beats ERM at unseen σ=50 (dB gain)"
    rec = _record({"input": [14.0, 15.0, 16.0], "ERM": [20.0, 21.0, 22.5], "DIL-pf": [26.1, 27.2, 28.2]})
    c = next(c for c in X.claims_denoise(rec) if c.claim == claim)
    assert c.over == "images" and c.n == 3 and c.verdict == C.REPRODUCED      # +6.0 dB vs the paper's +7.65
    small = _record({"input": [14.0, 15.0, 16.0], "ERM": [20.0, 21.0, 22.5], "DIL-pf": [20.9, 22.1, 23.4]})
    assert next(c for c in X.claims_denoise(small) if c.claim == claim).verdict == C.DIRECTION_ONLY
    two = _record({"input": [14.0, 15.0, 16.0], "ERM": [20.0, 21.0, 22.5], "DIL-pf": [20.9, 22.1, 23.4]},
                  seeds=(0, 1))
    c2 = next(c for c in X.claims_denoise(two) if c.claim == claim)
    assert c2.over == "seeds" and c2.n == 2
    hollow = _record({"input": [24.0, 25.0, 26.0], "ERM": [20.0, 21.0, 22.5], "DIL-pf": [26.1, 27.2, 28.2]})
    c3 = next(c for c in X.claims_denoise(hollow) if c.claim == claim)
    assert c3.verdict == C.INCONCLUSIVE and "not a restorer yet: ERM" in c3.why
    erm50 = next(c for c in X.claims_denoise(rec) if c.claim.startswith("ERM PSNR at unseen σ=50"))
    assert erm50.tolerance == "±1" and erm50.verdict == C.NOT_REPRODUCED       # 21.17 dB vs the paper's 18.96


@pytest.mark.parametrize("name", NAMES)
def test_committed_medium_records_are_rejudged(name):
    rec = experiments.load_results(name, "medium")
    if rec is None:
        pytest.skip(f"no committed {name} medium record")
    assert rec["claims"] and all(c["verdict"] in C.VERDICTS for c in rec["claims"])
    assert all(c["verdict"] != C.INCONCLUSIVE or c["why"] for c in rec["claims"])


def test_merge_seed_records_recomputes_the_same_claims(denoise):
    rec = {k: v for k, v in denoise.items() if k != "models"}
    merged = X.merge_seed_records([rec], note="n")
    assert merged["config"]["seeds"] == [0, 1] and merged["config"]["note"] == "n"
    key = lambda cs: [(c["claim"], c["ours"], c["verdict"]) for c in cs]  # noqa: E731
    assert key(merged["claims"]) == key(denoise["claims"])
    assert merged["tables"]["summary"] == denoise["tables"]["summary"]
    assert experiments.rejudge(merged)["claims"] == merged["claims"]
    with pytest.raises(ValueError, match="duplicate seeds"):
        X.merge_seed_records([rec, rec])


# ------------------------------------------------------------------------------------ the protocol (issue 13)
@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    out = tmp_path_factory.mktemp("proto")
    return experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=out, keep_models=True,
                           strategies=("erm", "erm_oracle", "erm_stratified", "dil_pf", "dil_sf_reference",
                                       "dil_sf_reference_lr"),
                           budgets=("batches", "iterations"), seeds=1, threads=1, val_tiles=4,
                           ref_inner_lr=X.RELEASED_LR, ref_meta_lr=X.RELEASED_LR, **TINY)


def test_protocol_trains_the_baselines_in_both_budget_arms(protocol):
    b = protocol["tables"]["budgets"]
    # ERM and the oracle take one distorted batch per step: the same run serves both arms
    assert b["ERM"][0]["arm"] == "both" and b["ERM oracle"][0]["arm"] == "both"
    assert "ERM [equal iterations]" not in b
    # the others: equal distorted batches (8) in one arm, ERM's 8 steps in the other
    for m in ("ERM stratified", "DIL-pf", "DIL-sf (released code)", "DIL-sf (released code, ERM's lr)"):
        assert b[m][0]["distorted_batches"] == 8, m
        assert b[m + " [equal iterations]"][0]["steps"] == 8, m
    assert b["DIL-pf [equal iterations]"][0]["distorted_batches"] == 8 * 2 * 2       # 2K batches per step, K=2
    assert b["ERM stratified [equal iterations]"][0]["distorted_batches"] == 8 * 2   # K per step
    released = b["DIL-sf (released code)"][0]["strategy"]
    assert released["inner_lr"] == released["meta_lr"] == 1e-4                       # the released settings
    at_lr = b["DIL-sf (released code, ERM's lr)"][0]["strategy"]
    assert at_lr["inner_lr"] == at_lr["meta_lr"] == X.PROFILES_DENOISE["quick"].lr
    tp = b["DIL-pf"][0]["theta_phi"]
    assert set(tp) == {"L_theta", "L_phi", "offset_grey"} and all(np.isfinite(list(tp.values())))


def test_protocol_claims_need_the_oracle_headroom(protocol):
    claims = {c["claim"]: c for c in protocol["claims"]}
    gain = claims["DIL-pf beats ERM at unseen σ=50 (dB gain)"]
    assert [p["name"] for p in gain["checks"]] == ["restorer", "restorer", "headroom"]
    assert "DIL-pf [equal iterations] beats ERM at unseen σ=50 (dB gain)" in claims
    assert "ERM oracle beats ERM at unseen σ=50 (headroom, dB)" in claims
    assert "DIL-pf beats ERM stratified at unseen σ=50 (meta-learning term, dB)" in claims
    # each arm against the stratified ERM of its own arm (the same steps), never the other arm's
    assert ("DIL-pf [equal iterations] beats ERM stratified [equal iterations] at unseen σ=50 (meta-learning term, "
            "dB)") in claims
    assert not [c for c in claims if "[equal iterations] beats ERM stratified at" in c]
    # a failed precondition makes the verdict inconclusive, never "not reproduced"
    for c in protocol["claims"]:
        if any(not p["ok"] for p in c["checks"]):
            assert c["verdict"] == C.INCONCLUSIVE, c["claim"]


def test_report_helpers_read_the_protocol_record(protocol):
    """Notebook 02's report: the headroom table is the paired test differences, the curves split by budget arm,
    the budget/theta-phi table and the verdict counts cover every method and claim, the summary is the record's."""
    import matplotlib

    matplotlib.use("Agg")
    rows = X._test_rows(protocol)
    h = X.headroom_table(protocol)
    lab50 = distortions.GaussianNoise(50.0).label
    d = C.paired_diffs(rows, {"method": "ERM oracle", "distortion": lab50}, {"method": "ERM", "distortion": lab50})
    want = f"{np.mean(d):+.2f} ± {np.std(d, ddof=1) / np.sqrt(len(d)):.2f}"     # 1 seed: paired per image
    assert len(d) > 1 and h.loc["ERM oracle - ERM (headroom)", "σ=50"] == want
    assert "DIL-pf [equal iterations] - ERM stratified [equal iterations]" in h.index
    assert "DIL-pf - ERM stratified" in h.index
    assert not any(i.startswith("DIL-sf (released code") and "stratified" in i for i in h.index)
    assert [X.arm_of(m) for m in ("ERM", "ERM oracle", "DIL-pf", "DIL-pf [equal iterations]")] == [
        None, None, "batches", "iterations"]
    it = X.plot_curves(protocol, arm="iterations").get_legend_handles_labels()[1]
    assert "ERM" in it and "DIL-pf [equal iterations]" in it and "DIL-pf" not in it
    ax_b = X.plot_curves(protocol, arm="batches")
    ba = ax_b.get_legend_handles_labels()[1]
    assert "DIL-pf" in ba and "DIL-pf [equal iterations]" not in ba
    ax_i = X.plot_curves(protocol, arm="iterations")                     # a method keeps its colour in both arms
    col = lambda ax, lab: next(h.get_color() for h, t in zip(*ax.get_legend_handles_labels()) if t == lab)  # noqa: E731
    assert col(ax_b, "DIL-pf") == col(ax_i, "DIL-pf [equal iterations]") and col(ax_b, "ERM") == col(ax_i, "ERM")
    with pytest.raises(ValueError, match="plot_curves.arm"):
        X.plot_curves(protocol, arm="epochs")
    tp = X.theta_phi_table(protocol)
    assert set(tp.index) == set(protocol["tables"]["budgets"])
    assert tp.loc["DIL-pf [equal iterations]", "steps"] == 8 and np.isfinite(tp.loc["DIL-pf", "L_phi"])
    assert np.isnan(tp.loc["ERM", "L_phi"])
    vc = X.verdict_counts(protocol)
    assert int(vc.values.sum()) == len(protocol["claims"])
    assert ("DIL beats ERM", "iterations") in vc.index
    pv = X.paper_vs_ours(protocol)              # every method of both arms; our baselines have no paper number
    assert np.isnan(pv.loc["ERM oracle", "paper σ=50"]) and np.isnan(pv.loc["ERM stratified [equal iterations]",
                                                                           "paper σ=50"])
    assert pv.loc["DIL-pf [equal iterations]", "paper σ=50"] == X.PAPER_DENOISE["dil_pf"][50]
    assert pv.loc["DIL-sf (released code, ERM's lr)", "paper σ=50"] == X.PAPER_DENOISE["dil_sf"][50]
    summary = X.study_summary(protocol)
    assert "budget arms: batches, iterations" in summary and "inner 0.0001, meta 0.0001" in summary
    assert "summed over methods and seeds" in summary


def test_protocol_rerun_is_bit_identical(protocol, tmp_path):
    again = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path,
                            strategies=("erm", "dil_pf"), seeds=1, threads=1, val_tiles=4, **TINY)
    for label in ("ERM",):
        a = [r for r in protocol["tables"]["per_image"] if r["method"] == label]
        b = [r for r in again["tables"]["per_image"] if r["method"] == label]
        assert a == b


def test_validation_tiles_and_bad_protocol_fields():
    tiles = X.validation_images(X.DILProfile(val_tiles=16, val_side=64))
    assert len(tiles) == 16 and all(t.shape[-2:] == (64, 64) for t in tiles)
    with pytest.raises(ValueError, match="val_tiles"):
        X.validation_images(X.DILProfile(val_tiles=10_000, val_side=64))
    with pytest.raises(ValueError, match="budgets"):
        X.DILProfile(budgets=("batches", "hours"))
    with pytest.raises(ValueError, match="threads"):
        X.DILProfile(threads=-1)


def test_a_study_with_run_root_resumes_and_skips_finished_methods(tmp_path, monkeypatch):
    """Killed after its first method, the study started again trains only the rest, and the record equals an
    uninterrupted run's (per-image PSNRs, curves)."""
    kw = dict(strategies=("erm", "dil_pf"), seeds=1, threads=1, **TINY)
    straight = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "a", **kw)
    root = tmp_path / "study"
    calls = []
    real = X.train_one

    class Killed(Exception):
        pass

    kill = [True]

    def dies_on_second(name, *a, **k):
        calls.append(name)
        if name == "dil_pf" and kill[0]:
            kill[0] = False
            raise Killed("killed")
        return real(name, *a, **k)

    monkeypatch.setattr(X, "train_one", dies_on_second)
    with pytest.raises(Killed):
        experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "b", run_root=str(root), **kw)
    assert (root / "seed-0" / "both" / "erm" / "done.json").is_file()
    calls.clear()
    resumed = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "b",
                              run_root=str(root), **kw)
    assert calls == ["dil_pf"]                                   # ERM came from the folder
    assert resumed["tables"]["per_image"] == straight["tables"]["per_image"]
    def no_clock(curves):
        return {k: [[{f: v for f, v in p.items() if f != "wall_time"} for p in c] for c in runs]
                for k, runs in curves.items()}

    assert no_clock(resumed["curves"]) == no_clock(straight["curves"])  # all but the wall clock
    assert "run_root" not in resumed["config"]["profile"]
    with pytest.raises(ValueError, match="another profile"):
        experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "c", run_root=str(root),
                        **{**kw, "lr": 5e-4})


def test_show_theta_phi_titles_report_theta_and_phi(denoise):
    import matplotlib

    matplotlib.use("Agg")
    fig = X.show_theta_phi(denoise["models"]["DIL-pf"], 30, 0.05, side=32)
    titles = [a.get_title() for a in fig.axes]
    assert titles[1].startswith("θ") and "offset" in titles[1] and titles[2].startswith("φ") and "dB" in titles[2]
    fig0 = X.show_theta_phi(denoise["models"]["DIL-pf"], 30, 0.0, side=32)   # alpha 0: phi is theta
    t0 = [a.get_title() for a in fig0.axes]
    assert t0[1].split("\n")[1].split(",")[0] == t0[2].split("\n")[1]


def test_a_units_key_holds_only_what_that_method_trains_with(tmp_path, monkeypatch):
    """The baselines of a study can run before the sweep has chosen alpha: ERM's finished unit is reused under
    another alpha or method list, while DIL-pf's is not (alpha is its own option)."""
    root = tmp_path / "study"
    kw = dict(seeds=1, threads=1, run_root=str(root), **TINY)
    experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "a",
                    strategies=("erm", "dil_pf"), alpha=0.05, **kw)
    calls = []
    real = X.train_one
    monkeypatch.setattr(X, "train_one", lambda name, *a, **k: (calls.append(name), real(name, *a, **k))[1])
    experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "b",
                    strategies=("erm", "erm_oracle"), alpha=0.01, **kw)
    assert calls == ["erm_oracle"]                         # ERM from the folder: alpha is not its option
    prof = X.PROFILES_DENOISE["quick"]
    assert X._done_key(prof, True, "erm") == X._done_key(dataclasses.replace(prof, alpha=0.3, strategies=("erm",)), True, "erm")
    assert X._done_key(prof, True, "dil_pf") != X._done_key(dataclasses.replace(prof, alpha=0.3), True, "dil_pf")
    assert X._done_key(prof, True, "dil_sf_reference") != X._done_key(dataclasses.replace(prof, ref_meta_lr=0.3), True,
                                                                       "dil_sf_reference")
    with pytest.raises(ValueError, match="another profile"):           # DIL-pf under another alpha retrains
        experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "c",
                        strategies=("erm", "dil_pf"), alpha=0.01, **kw)


def test_the_sweep_can_train_its_candidates_for_equal_iterations(monkeypatch, tmp_path):
    """sweep['arm'] = 'iterations': each alpha candidate takes fraction x budget optimiser steps (as many as ERM
    would), not that many distorted batches; a bad arm names the field."""
    seen = []
    real = X.train_one

    def spy(name, prof, *a, budget=None, arm="batches", **k):
        seen.append((name, prof.steps(name, 4, arm) if budget is None else dataclasses.replace(prof, budget=budget).steps(
            name, 4, arm)))
        return real(name, prof, *a, budget=budget, arm=arm, **k)

    monkeypatch.setattr(X, "train_one", spy)
    rec = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path, strategies=("erm",), seeds=1,
                          sweep={"fraction": 0.5, "arm": "iterations", "alpha": [0.001]}, **TINY)
    budget = TINY.get("budget", X.PROFILES_DENOISE["quick"].budget)
    assert seen[0] == ("dil_pf", round(0.5 * budget))
    assert rec["tables"]["sweep"]["arm"] == "iterations"
    with pytest.raises(ValueError, match=r"sweep\['arm'\].*'hours'"):
        X.DILProfile(sweep={"arm": "hours"})


def test_psnr_table_is_mean_and_se_over_seeds_or_photos(protocol, denoise):
    """The closing table: one seed -> mean ± SE over the test photos; several seeds -> over the seeds' means."""
    lab = distortions.GaussianNoise(30.0).label
    t = X.psnr_table(protocol)
    assert list(t.columns) == ["σ=15", "σ=20", "σ=30", "σ=40", "σ=50"] and t.index[0] == "input"
    v = [r["psnr"] for r in X._test_rows(protocol) if r["method"] == "DIL-pf" and r["distortion"] == lab]
    assert t.loc["DIL-pf", "σ=30"] == f"{np.mean(v):.2f} ± {np.std(v, ddof=1) / np.sqrt(len(v)):.2f}"
    seeds = C.seed_means(X._test_rows(denoise), method="ERM", distortion=lab)
    assert len(seeds) >= 2
    want = f"{np.mean(seeds):.2f} ± {np.std(seeds, ddof=1) / np.sqrt(len(seeds)):.2f}"
    assert X.psnr_table(denoise).loc["ERM", "σ=30"] == want


def test_kept_and_shipped_models_are_the_first_seeds(tmp_path):
    """A multi-seed run keeps (and ``--ship`` writes to seed-<seed>/) the models of its first seed."""
    from safetensors.torch import load_file

    root = tmp_path / "study"
    rec = experiments.run("dil-denoise", "quick", seed=3, device="cpu", out_dir=tmp_path, keep_models=True,
                          strategies=("erm",), seeds=2, threads=1, run_root=str(root), **TINY)
    first = load_file(str(root / "seed-3" / "both" / "erm" / "selected.safetensors"))
    second = load_file(str(root / "seed-4" / "both" / "erm" / "selected.safetensors"))
    kept = rec["models"]["ERM"].state_dict()
    assert all(torch.equal(kept[k], first[k]) for k in first)
    assert not all(torch.equal(kept[k], second[k]) for k in second)


def test_study_findings_are_computed_from_the_record(protocol):
    """Notebook 02's findings are sentences built from the record: the headroom and the gains are the claims'
    estimates, the verdict counts add up, and nothing refers to a method the record lacks."""
    text = X.study_findings(protocol)
    rows = X._test_rows(protocol)
    lab50 = distortions.GaussianNoise(50.0).label
    e = X._difference(rows, "ERM oracle", "ERM", lab50)
    assert f"σ=50: {e.mean:+.2f} ± {e.se:.2f} dB" in text
    pf = X._difference(rows, "DIL-pf [equal iterations]", "ERM stratified [equal iterations]", lab50)
    assert f"DIL-pf {pf.mean:+.2f} ± {pf.se:.2f} dB" in text
    counts = [int(n) for n in re.findall(r"(\d+) (?:reproduced|direction only|not reproduced|inconclusive)",
                                         text.split("Verdicts: ")[1])]
    assert sum(counts) == len(protocol["claims"])
    assert "Equal iterations (the paper's)" in text and "Equal distorted batches (ours)" in text
    assert "DIL-ss" not in text                              # not in this record
    # a model below its input is named, so the reader knows which claims are inconclusive
    gains = X.gain_over_input(protocol)
    assert ("Every model beats the distorted input" in text) == bool((gains > 0).all().all())


def test_a_finished_sweep_candidate_is_not_trained_again(tmp_path, monkeypatch):
    """The sweep keeps each candidate's row beside its checkpoints: resumed without them (the checkpoints are not
    committed, the rows are), the study reuses the rows and makes the same choice; another budget retrains."""
    import shutil

    root = tmp_path / "study"
    kw = dict(strategies=("erm",), seeds=1, threads=1, run_root=str(root), **TINY)
    sweep = {"fraction": 0.5, "arm": "iterations", "alpha": [0.001, 0.01]}
    first = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "a", sweep=sweep, **kw)
    for fit in root.glob("sweep-seed-0/*/fit"):
        shutil.rmtree(fit)
    calls = []
    real = X.train_one
    monkeypatch.setattr(X, "train_one", lambda name, *a, **k: (calls.append(name), real(name, *a, **k))[1])
    again = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "b", sweep=sweep, **kw)
    assert calls == []
    assert again["tables"]["sweep"]["rows"] == first["tables"]["sweep"]["rows"]
    assert again["tables"]["sweep"]["chosen"] == first["tables"]["sweep"]["chosen"]
    experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "c",
                    sweep={**sweep, "fraction": 1.0}, **kw)
    assert calls == ["dil_pf", "dil_pf"]


def test_a_unit_rerun_in_another_process_is_bit_identical(tmp_path):
    """What COMMAND.sh's verify mode checks on the committed study, on a tiny profile: two fresh processes
    (threads pinned by the profile) train the same units to the same weights, curves and per-image PSNRs."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    code = ("import sys; from causalir import experiments; experiments.run('dil-denoise', 'quick', seed=1, "
            "device='cpu', out_dir=sys.argv[1], strategies=('dil_pf',), seeds=1, threads=1, "
            f"run_root=sys.argv[1] + '/study', **{TINY!r})")
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / run)], check=True, timeout=300)
    for unit in ("batches/dil_pf",):      # the meta-gradient path (vmap, virtual step, theta/phi diagnostics)
        a, b = (json.loads((tmp_path / r / "study" / "seed-1" / unit / "done.json").read_text()) for r in "ab")
        clockless = lambda row: {k: v for k, v in row.items() if k != "wall_time_s"}  # noqa: E731
        assert a["frame"] == b["frame"] and clockless(a["row"]) == clockless(b["row"])   # theta_phi included
        assert [{k: v for k, v in p.items() if k != "wall_time"} for p in a["curve"]] == [
            {k: v for k, v in p.items() if k != "wall_time"} for p in b["curve"]]
        wa, wb = (load_file(str(tmp_path / r / "study" / "seed-1" / unit / "selected.safetensors")) for r in "ab")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_unit_written_before_a_new_profile_field_still_loads(tmp_path, monkeypatch):
    """Committed study units outlive new DILProfile options: a key without a field matches while that field is at
    its default, not once it is changed; a changed value or an unknown extra field never matches."""
    prof = X.PROFILES_DENOISE["quick"]
    key = X._done_key(prof, True, "erm")
    old = {k: v for k, v in key.items() if k != "val_tiles"}          # as written before val_tiles existed
    assert X._same_key(old, key)
    assert not X._same_key(old, X._done_key(dataclasses.replace(prof, val_tiles=4), True, "erm"))
    assert not X._same_key({**key, "lr": 0.5}, key)
    assert not X._same_key({**key, "bogus": 1}, key) and not X._same_key(None, key)
    root = tmp_path / "study"
    kw = dict(strategies=("erm",), seeds=1, threads=1, run_root=str(root), **TINY)
    first = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "a", **kw)
    done = root / "seed-0" / "both" / "erm" / "done.json"
    rec = json.loads(done.read_text())
    rec["key"].pop("val_tiles")
    done.write_text(json.dumps(rec))
    calls = []
    real = X.train_one
    monkeypatch.setattr(X, "train_one", lambda name, *a, **k: (calls.append(name), real(name, *a, **k))[1])
    again = experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=tmp_path / "b", **kw)
    assert calls == [] and again["tables"]["per_image"] == first["tables"]["per_image"]      # loaded, not trained


@pytest.fixture(scope="module")
def deblur_protocol(tmp_path_factory):
    """dil-deblur under issue 13's protocol: the sweep with the restorer gate, the baselines, both budget arms."""
    out = tmp_path_factory.mktemp("deblur")
    return experiments.run("dil-deblur", "quick", seed=0, device="cpu", out_dir=out,
                           strategies=("erm", "erm_oracle", "erm_stratified", "dil_pf", "dil_sf_reference"),
                           budgets=("batches", "iterations"), seeds=1, threads=1, val_tiles=4,
                           sweep={"fraction": 0.5, "arm": "iterations", "alpha": [0.001, 0.01]}, **TINY)


def test_deblur_and_types_run_the_protocol(deblur_protocol):
    """The denoise study's protocol serves deblurring: the sweep runs on the seen blur widths (its gate names
    them), the oracle trains on the test widths, and every unseen width gets the headroom claim, each method's gain
    over ERM per arm and each paper variant against the stratified ERM of its own arm."""
    rec = deblur_protocol
    sweep = rec["tables"]["sweep"]
    assert [r["alpha"] for r in sweep["rows"]] == [0.001, 0.01]
    seen = {d.label for d in distortions.distortion_set("blur-dil").seen}
    assert set(sweep["input_val"]) >= {f"seen {s}" for s in seen}
    claims = {c["claim"]: c for c in rec["claims"]}
    for s in X.PAPER_DEBLUR["dil"]:
        at = f"at unseen blur σ={s:g}"
        assert f"ERM oracle beats ERM {at} (headroom, dB)" in claims
        gain = claims[f"DIL-pf [equal iterations] beats ERM {at} (dB gain)"]
        assert gain["paper"] == pytest.approx(X.PAPER_DEBLUR["dil"][s] - X.PAPER_DEBLUR["erm"][s], abs=1e-3)
        assert [p["name"] for p in gain["checks"]] == ["restorer", "restorer", "headroom"]
        assert f"DIL-pf beats ERM stratified {at} (meta-learning term, dB)" in claims
        assert f"DIL-sf (released code) [equal iterations] beats ERM {at} (dB gain)" in claims
    assert X.unseen_labels(rec) == [d.label for d in distortions.distortion_set("blur-dil").unseen]
    # the report helpers take distortion labels: one column per unseen width, the findings at one of them
    h = X.headroom_table(rec, None)
    assert list(h.columns) == X.unseen_labels(rec) and "ERM oracle - ERM (headroom)" in h.index
    assert list(X.psnr_table(rec, None).columns) == [X.distortions.GaussianBlur(3.8).label, *X.unseen_labels(rec)]
    text = X.study_findings(rec, X.unseen_labels(rec)[-1])
    paper = X.PAPER_DEBLUR["dil"][5.0] - X.PAPER_DEBLUR["erm"][5.0]
    assert f"(paper: {paper:+.2f} dB)" in text and "blur σ=4.2:" in text
    assert X.verdict_counts(rec).values.sum() == len(rec["claims"])


def test_types_claims_speak_of_every_unseen_type(deblur_protocol):
    """claims_types judges each unseen type with the same protocol claims (the paper's gain on the hybrid only)."""
    import pandas as pd

    rec = copy.deepcopy(deblur_protocol)
    unseen = [d.label for d in distortions.distortion_set("types-dil").unseen]
    # relabel the deblur record's unseen widths as types: the claims read only labels and rows
    widths = X.unseen_labels(rec)[:len(unseen)]
    to = dict(zip(widths, unseen))
    rec["tables"]["per_image"] = [{**r, "distortion": to.get(r["distortion"], r["distortion"])}
                                  for r in rec["tables"]["per_image"]]
    rec["config"]["unseen"] = unseen
    claims = {c.claim: c for c in X.claims_types(rec)}
    for i, d in enumerate(unseen):
        assert f"ERM oracle beats ERM on unseen type {d} (headroom, dB)" in claims
        gain = claims[f"DIL-pf beats ERM on unseen type {d} (dB gain)"]
        want = X.PAPER_TYPES["dil_sf"] - X.PAPER_TYPES["erm"] if i == len(unseen) - 1 else None
        assert gain.paper == (pytest.approx(want) if want is not None else None)
    assert pd.DataFrame(rec["tables"]["per_image"]).distortion.isin(unseen).any()


def test_committed_study_rebuilds_a_record_from_units_without_training(tmp_path, monkeypatch):
    """Notebook 03 shows a study under way from its committed units: the record is rebuilt from them (no
    training), and a study with a missing unit gives None instead of training it."""
    from causalir import paths

    monkeypatch.setattr(paths, "studies_dir", lambda: tmp_path)
    tiny = dict(TINY, val_tiles=4, model_cfg={"nf": 8, "depth": 3})
    first = experiments.run("dil-types", "medium", seed=0, device="cpu", out_dir=tmp_path / "out", sweep={},
                            strategies=("erm", "erm_oracle"), budgets=("batches",), seeds=1,
                            run_root=str(tmp_path / "dil-types-medium"), **tiny)

    def no_training(*a, **k):
        raise AssertionError("committed_study must not train")

    monkeypatch.setattr(X, "train_one", no_training)
    again = X.committed_study("dil-types", ["erm", "erm_oracle"], **tiny)
    assert again["tables"]["per_image"] == first["tables"]["per_image"]
    assert again["tables"]["budgets"] == first["tables"]["budgets"]
    assert X.committed_study("dil-types", ["erm", "erm_stratified"], **tiny) is None
    assert X.committed_study("dil-types", ["erm"], seeds=2, **tiny) is None
    with pytest.raises(ValueError, match="another profile"):
        X.committed_study("dil-types", ["erm"], **{**tiny, "lr": 3e-4})
