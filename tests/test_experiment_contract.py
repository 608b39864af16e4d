"""Every registered experiment keeps the contract: profiles, paper table, run signature, claims from tables."""
import dataclasses
import inspect
import json

import pytest

from causalir import experiments
from causalir.experiments import claims, profiles
from causalir.experiments.record import Experiment
from causalir.paths import results_dir


@pytest.mark.parametrize("name", experiments.names())
def test_contract(name):
    exp = experiments.get(name)
    assert isinstance(exp, Experiment) and exp.name == name
    assert set(exp.profiles) == {"quick", "medium", "full"}
    for prof in exp.profiles.values():
        assert dataclasses.is_dataclass(prof) and type(prof).__dataclass_params__.frozen
    assert exp.paper and exp.source
    sig = inspect.signature(exp.run)
    assert list(sig.parameters)[:4] == ["profile", "seed", "device", "keep_models"]
    assert sig.parameters["seed"].default == 0 and sig.parameters["keep_models"].default is False
    assert any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


@pytest.mark.parametrize("path", sorted(p for p in results_dir().glob("*.json") if not p.name.startswith("bench-")),
                         ids=lambda p: p.stem)
def test_committed_records_are_rejudged_by_the_grammar(path):
    rec = json.loads(path.read_text())
    out = experiments.rejudge(rec)
    assert out["claims"], path
    for c in out["claims"]:
        assert c["verdict"] in claims.VERDICTS
        assert (c["verdict"] == claims.INCONCLUSIVE) == bool(c["why"]), c
    assert experiments.load_results(rec["experiment"], rec["profile"])["claims"] == out["claims"]


def test_profiles_select_validates():
    exp = experiments.get("erm-denoise")
    with pytest.raises(ValueError, match="valid profiles: quick, medium, full"):
        profiles.select(exp.profiles, "huge")
    with pytest.raises(TypeError, match="unknown override.*stepz.*valid fields: model, model_cfg, steps"):
        profiles.select(exp.profiles, "quick", {"stepz": 3})
    p = profiles.select(exp.profiles, "quick", {"steps": 7})
    assert p.steps == 7 and exp.profiles["quick"].steps == 300


def test_nested_override_takes_a_dict_and_tuples_take_lists():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        lr: float = 1e-3
        betas: tuple = (0.9, 0.99)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()
        n: int = 1

    table = {"quick": Outer(), "medium": Outer(n=2), "full": Outer(n=3)}
    p = profiles.select(table, "medium", {"inner": {"betas": [0.5, 0.9]}})
    assert p == Outer(Inner(1e-3, (0.5, 0.9)), 2)
    with pytest.raises(TypeError, match=r"inner\.momentum.*valid fields: lr, betas"):
        profiles.select(table, "quick", {"inner": {"momentum": 0.9}})


def test_keep_models_returns_models_and_never_writes_them(tmp_path):
    res = experiments.run("erm-denoise", "quick", 0, "cpu", out_dir=tmp_path, keep_models=True, steps=2,
                          eval_side=48)
    assert list(res["models"]) == ["ERM seed 0"]
    assert "models" not in json.loads((tmp_path / "erm-denoise-quick.json").read_text())


def test_load_models_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"models\.json is missing"):
        experiments.load_models("erm-denoise", "medium", folder=tmp_path)
    root = tmp_path / "erm-denoise" / "medium" / "seed-0"
    root.mkdir(parents=True)
    (root / "models.json").write_text(json.dumps(
        {"models": {"ERM": {"model": "rrdb", "config": {"preset": "tiny"}, "file": "erm.safetensors"}}}))
    with pytest.raises(FileNotFoundError, match="erm.safetensors"):
        experiments.load_models("erm-denoise", "medium", folder=tmp_path)


def _ship_tiny(tmp_path, with_metrics=True):
    import torch

    from causalir import distortions, models
    from causalir.experiments import shipping

    torch.manual_seed(0)
    net = models.build("dncnn", preset="tiny")
    tasks = {"m": distortions.build("gaussian_noise", sigma=25)} if with_metrics else None
    root = shipping.save("erm-denoise", "medium", 0, {"m": net}, record={"config": {"steps": 1}},
                         command="causalir reproduce erm-denoise --profile medium", tasks=tasks, folder=tmp_path)
    return net, root


def test_load_models_rebuilds_saved_weights_and_their_cards_check(tmp_path):
    import torch

    from causalir.experiments import shipping

    net, root = _ship_tiny(tmp_path)
    spec = json.loads((root / "models.json").read_text())
    card = spec["models"]["m"]
    assert spec["licence"] and spec["command"].startswith("causalir") and card["parameters"] > 0
    assert card["metrics"]["test_input_psnr"] > 10 and card["metrics"]["distortion"]["name"] == "gaussian_noise"
    got = experiments.load_models("erm-denoise", "medium", folder=tmp_path)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(got["m"](x), net.eval()(x))
    assert shipping.verify(got, spec)["m"] <= shipping.CHECK_TOL_DB
    card["metrics"]["check"]["psnr"] += 0.05  # a card that the model does not reach is caught
    with pytest.raises(ValueError, match="check PSNR"):
        shipping.verify(got, spec)


def test_load_models_refuses_an_altered_file_and_overwriting(tmp_path):
    from causalir.experiments import shipping

    net, root = _ship_tiny(tmp_path, with_metrics=False)
    f = root / "m.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        experiments.load_models("erm-denoise", "medium", folder=tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        shipping.save("erm-denoise", "medium", 0, {"m": net}, record={}, command="x", folder=tmp_path)


def test_unknown_experiment_names_valid_ones():
    with pytest.raises(KeyError, match="valid names: erm-denoise, backdoor-toy"):
        experiments.get("dil-everything")


def test_shipping_covers_the_toolbox_the_agent_path_restore_and_masks(tmp_path):
    import torch

    from causalir import pathrestore as pr
    from causalir import rl
    from causalir import toolchain as tc
    from causalir.experiments import shipping

    torch.manual_seed(0)
    objs = {"toolbox": tc.Toolbox(tc.ToolboxConfig(small=(4, 2), large=(4, 2), act="leaky")),
            "agent": rl.ToolAgent(rl.AgentConfig(conv1=4, conv=4, fc=8, lstm=8, norm=True)),
            "path restore": pr.PathRestore(pr.MultiPathConfig(nf=4, num_blocks=2, path_blocks=(0, 1, 2))),
            "masks": {"conv.weight": torch.rand(4, 3) > 0.5}}
    root = shipping.save("rl-restore", "medium", 1, objs, record={}, command="x", folder=tmp_path)
    spec = json.loads((root / "models.json").read_text())
    assert {c["kind"] for c in spec["models"].values()} == {"toolbox", "tool_agent", "path_restore", "masks"}
    got = experiments.load_models("rl-restore", "medium", seed=1, folder=tmp_path)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(got["toolbox"].apply([3, 7], x), objs["toolbox"].eval().apply([3, 7], x))
        q1, _ = got["agent"](x, torch.zeros(2, 12))
        q0, _ = objs["agent"].eval()(x, torch.zeros(2, 12))
        assert torch.equal(q1, q0)
        assert torch.equal(got["path restore"](x), objs["path restore"].eval()(x))
    assert torch.equal(got["masks"]["conv.weight"], objs["masks"]["conv.weight"])
    assert got["toolbox"].cfg == objs["toolbox"].cfg and got["path restore"].cfg.path_blocks == (0, 1, 2)
    with pytest.raises(TypeError, match="neither a registry model"):
        shipping.save("rl-restore", "medium", 2, {"x": torch.nn.Linear(2, 2)}, record={}, command="x",
                      folder=tmp_path)


def test_run_with_ship_writes_the_models_and_their_cards(tmp_path):
    import torch

    from causalir.experiments import shipping

    rec = experiments.run("erm-denoise", "quick", 0, "cpu", commit=True, ship=True, out_dir=tmp_path,
                          steps=2, batch_size=2, patch_size=16, seeds=1, eval_side=48)
    spec = shipping.read_manifest("erm-denoise", "quick", 0, folder=tmp_path / "models")
    assert spec["command"].startswith("causalir reproduce erm-denoise --profile quick --seed 0")
    assert "--set" in spec["command"] and "'steps=2'" in spec["command"]
    assert set(spec["models"]) == set(rec["models"]) and rec["_not_shipped"] == {}
    got = experiments.load_models("erm-denoise", "quick", 0, folder=tmp_path / "models")
    x = torch.rand(1, 3, 16, 16)
    label = next(iter(got))
    with torch.no_grad():
        assert torch.equal(got[label](x), rec["models"][label].eval()(x))
    with pytest.raises(ValueError, match="commit=True"):
        experiments.run("erm-denoise", "quick", ship=True)
