import json

import pytest
import torch

from causalir import distortions, evaluate, experiments, models
from causalir.experiments import claims


def test_every_method_sees_identical_inputs():
    imgs = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    levels = {d.label: d for d in (distortions.GaussianNoise(10), distortions.GaussianNoise(30))}
    a = evaluate.distorted_inputs(imgs, levels, seed=5)
    b = evaluate.distorted_inputs(imgs, levels, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    df = evaluate.evaluate({"id": lambda x: x, "net": models.build("dncnn", preset="tiny")}, imgs, levels, seed=5,
                           device="cpu")
    assert len(df) == 3 * 2 * 2
    ident = df[df.method == "id"].set_index(["distortion", "image"]).psnr
    inp = df[df.method == "input"].set_index(["distortion", "image"]).psnr
    assert (ident == inp).all()  # the identity restorer scores exactly the distorted input
    s = evaluate.summarize(df)
    assert list(s.columns) == ["noise σ=10", "noise σ=30"] and list(s.index) == ["input", "id", "net"]
    assert s.loc["input", "noise σ=10"] > s.loc["input", "noise σ=30"]


def test_erm_experiment_writes_results(tmp_path):
    res = experiments.run("erm-denoise", "quick", 0, "cpu", out_dir=tmp_path, steps=4, eval_side=48)
    rec = json.loads((tmp_path / "erm-denoise-quick.json").read_text())
    assert rec["provenance"]["device"] == "cpu" and rec["config"]["recipe"]["steps"] == 4
    assert len(rec["claims"]) == 4 and all(c["verdict"] in claims.VERDICTS for c in rec["claims"])
    assert "models" not in rec
    rows = experiments.collect_claims([tmp_path])
    assert len(rows) == 4 and "| erm-denoise |" in experiments.claims_markdown(rows)
    assert res["wall_time_s"] > 0


def test_unknown_experiment_and_profile():
    with pytest.raises(KeyError, match="valid names"):
        experiments.run("dil-everything")
    with pytest.raises(ValueError, match="valid profiles"):
        experiments.run("erm-denoise", "huge")


def test_committed_results_are_not_overwritten_silently(tmp_path, monkeypatch):
    import causalir.experiments as E

    monkeypatch.setattr(E, "results_dir", lambda: tmp_path)
    (tmp_path / "erm-denoise-quick.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        experiments.run("erm-denoise", "quick", 0, "cpu", commit=True, steps=2, eval_side=48)
    assert (tmp_path / "erm-denoise-quick.json").read_text() == "{}"
    experiments.run("erm-denoise", "quick", 0, "cpu", commit=True, overwrite=True, steps=2, eval_side=48)
    assert "claims" in (tmp_path / "erm-denoise-quick.json").read_text()
