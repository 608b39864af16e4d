"""DIL experiments: tiny end-to-end runs of the four registered experiments, equal budgets, validation-only
selection, the records the notebooks render."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from causalir import dil, distortions, experiments
from causalir import dil_experiments as X

torch.set_num_threads(1)

TINY = dict(budget=8, checkpoints=2, batch_size=2, patch_size=16, eval_side=32, val_side=32,
            model_cfg={"nf": 8, "nb": 1, "gc": 4})


@pytest.fixture(scope="module")
def denoise(tmp_path_factory):
    out = tmp_path_factory.mktemp("res")
    return experiments.run("dil-denoise", "quick", seed=0, device="cpu", out_dir=out,
                           strategies=("erm", "dil_pf", "dil_sf_reference"), seeds=2,
                           sweep={"budget": 4, "alpha": [0.01, 0.1], "ref_meta_lr": [1e-3]}, **TINY)


def test_denoise_record_is_complete_and_written(denoise):
    with open(denoise["_path"]) as f:
        saved = json.load(f)
    assert saved["experiment"] == "dil-denoise" and saved["profile"] == "quick"
    assert {"config", "tables", "claims", "curves", "provenance", "wall_time_s"} <= set(saved)
    assert saved["config"]["seeds"] == [0, 1]
    methods = {r["method"] for r in saved["tables"]["summary"]}
    assert methods == {"input", "ERM", "DIL-pf", "DIL-sf (released code)"}
    # every claim has a computed verdict; the paper's numbers are the ones of seed 000
    verdicts = {c["verdict"] for c in saved["claims"]}
    assert verdicts <= {"reproduced", "not reproduced at this scale", "mixed across seeds"}
    erm30 = next(c for c in saved["claims"] if c["claim"].startswith("ERM PSNR at unseen σ=30"))
    assert erm30["paper"] == 24.90


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
    assert sweep["chosen"]["alpha"] in (0.01, 0.1)
    assert denoise["config"]["profile"]["alpha"] == sweep["chosen"]["alpha"]
    assert "validation photos" in sweep["criterion"]
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
    fig = X.show_restorations(X.LAST_MODELS, "DIL-pf", 50, side=32)   # the widget's function
    assert len(fig.axes) >= 4 and "dB" in fig.axes[2].get_title()
    with pytest.raises(KeyError, match="valid"):
        X.show_restorations(X.LAST_MODELS, "DIL-zz", 50)
    assert X.plot_sampling_diagram() is not None


@pytest.mark.parametrize("name", ["dil-deblur", "dil-types", "dil-backbones"])
def test_other_experiments_run_tiny(name, tmp_path):
    over = dict(TINY, budget=4, strategies=("erm", "dil_sf_reference"), checkpoints=1)
    if name == "dil-backbones":
        over.pop("model_cfg")
    res = experiments.run(name, "quick", seed=0, device="cpu", out_dir=tmp_path, **over)
    assert res["claims"] and all(c["verdict"] for c in res["claims"])
    methods = {r["method"] for r in res["tables"]["summary"]}
    if name == "dil-backbones":
        assert {"rrdb: ERM", "swinir: ERM", "swinir: DIL-sf (released code)"} <= methods
    else:
        assert "ERM" in methods
    if name == "dil-types":
        unseen = {d.label for d in distortions.distortion_set("types-dil").unseen}
        assert unseen <= {r["distortion"] for r in res["tables"]["summary"]}
        assert not unseen & set(res["config"]["val_select"])


def test_profiles_and_overrides():
    full = X.profile_for("dil-denoise", "full")
    assert full.model_cfg == {"preset": "paper"} and full.patch_size == 64 and full.batch_size == 32
    assert full.seeds >= 3 and full.budget >= 100_000
    # the code's medium profile is the one that produced the committed study (multi-seed)
    med = X.profile_for("dil-denoise", "medium")
    assert med.seeds >= 2
    committed = experiments.load_results("dil-denoise", "medium")
    if committed is not None:
        ran = {k: v for k, v in committed["config"]["profile"].items() if k not in ("seeds", "sweep")}
        ours = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(med).items()
                if k not in ("seeds", "sweep")}
        assert ran == ours
    p = X.profile_for("dil-denoise", "quick", budget=40, n_distortions=2)
    assert p.steps("erm", 4) == 40 and p.steps("dil_pf", 4) == 10 and p.steps("dil_sf_reference", 4) == 10
    assert dil.batches_per_step("dil_ss", 4) == 8
    with pytest.raises(TypeError, match="unknown override"):
        X.profile_for("dil-denoise", "quick", bogus=1)
    with pytest.raises(ValueError, match="unknown profile"):
        X.profile_for("dil-denoise", "huge")


def test_merge_seed_records_recomputes_the_same_claims(denoise):
    merged = X.merge_seed_records([denoise], note="n")
    assert merged["config"]["seeds"] == [0, 1] and merged["config"]["note"] == "n"
    key = lambda cs: [(c["claim"], c["ours"], c["verdict"]) for c in cs]  # noqa: E731
    assert key(merged["claims"]) == key(denoise["claims"])
    assert merged["tables"]["summary"] == denoise["tables"]["summary"]
    with pytest.raises(ValueError, match="duplicate seeds"):
        X.merge_seed_records([denoise, denoise])
