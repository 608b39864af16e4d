import os
import shutil

import pytest
import torch
from PIL import Image

from causalir import cli, data, train


def test_distort_roundtrip_and_refuses_overwrite(tmp_path, capsys):
    src = tmp_path / "in.png"
    data.save_image(data.center_crop(data.embedded_image("chelsea"), 40), src)
    assert cli.main(["distort", "gaussian_noise", str(src), str(tmp_path / "out.png"), "--param", "sigma=25"]) == 0
    out = data.load_image(tmp_path / "out.png")
    assert out.shape == (3, 40, 40) and not torch.equal(out, data.load_image(src))
    assert cli.main(["distort", "gaussian_noise", str(src), str(tmp_path / "out.png")]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["distort", "nope", str(src), str(tmp_path / "o2.png")]) == 2
    assert "valid names" in capsys.readouterr().err


def test_train_then_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "dncnn", "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--patch-size", "16",
            "--device", "cpu", "--val-every", "0", "--ckpt-every", "0", "--run-dir", str(run)]
    assert cli.main(args) == 0
    unit, rec = train.find_checkpoint(run)
    assert rec["counters"]["steps"] == 3 and rec["config"]["model"]["name"] == "dncnn"
    capsys.readouterr()
    assert cli.main(["evaluate", "--run-dir", str(run), "--max-side", "32", "--device", "cpu",
                     "--out", str(tmp_path / "t.csv")]) == 0
    assert "noise σ=50" in capsys.readouterr().out
    assert (tmp_path / "t.csv").read_text().startswith("method,distortion,image,psnr,ssim")
    assert cli.main(["evaluate", "--run-dir", str(tmp_path)]) != 0


def test_download_offline_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAUSALIR_CACHE", str(tmp_path))
    import causalir.data as d
    bench = d.BENCHMARKS.build("Set14")
    monkeypatch.setitem(d.BENCHMARKS._items, "Set14",
                        lambda: d.Benchmark("Set14", "http://127.0.0.1:9/x.tar.gz", None, "Set14_HR", ""))
    assert cli.main(["download", "Set14"]) == 2
    assert "offline" in capsys.readouterr().err
    assert bench.name == "Set14"


# ------------------------------------------------------------------------------ issue 15
TRAIN = ["train", "--model", "dncnn", "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--patch-size", "16",
         "--device", "cpu", "--val-every", "0", "--ckpt-every", "0"]


def _weights(run):
    from safetensors.torch import load_file

    unit, _ = train.find_checkpoint(run)
    return load_file(str(unit / "model.safetensors"))


def _one_line_error(capsys, cmd):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"causalir {cmd}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(TRAIN + ["--seed", "7", "--run-dir", str(run)]) == 0
    return run


def test_two_train_runs_with_the_same_seed_are_bit_identical(trained, tmp_path, capsys):
    assert cli.main(TRAIN + ["--seed", "7", "--run-dir", str(tmp_path / "b")]) == 0
    assert cli.main(TRAIN + ["--seed", "8", "--run-dir", str(tmp_path / "c")]) == 0
    a, b, c = _weights(trained), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_resume_refuses_changed_steps_unless_asked(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert cli.main(TRAIN[:-6] + ["--steps", "5", *TRAIN[-4:], "--seed", "7", "--run-dir", str(run)]) == 2
    assert "--allow-changed steps" in _one_line_error(capsys, "train")
    assert cli.main(TRAIN[:-6] + ["--steps", "5", *TRAIN[-4:], "--seed", "7", "--run-dir", str(run),
                                  "--allow-changed", "steps"]) == 0
    assert train.find_checkpoint(run)[1]["step"] == 5


def _no_training(monkeypatch):
    from causalir import models

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(models, "build", lambda *a, **k: pytest.fail("the model was built"))


def _denied(*a, **k):
    raise PermissionError(13, "Permission denied")


def _a_file(p):
    p.write_text("x")
    return p


def _under_a_file(p):
    return _a_file(p) / "sub"


def _foreign(p):
    p.mkdir()
    (p / "notes.txt").write_text("x")
    return p


def _invalid_run(p):
    (p / "ckpt-00000003").mkdir(parents=True)
    return p


RUN_DIR_CASES = {"a file": (_a_file, "is a file"), "under a file": (_under_a_file, "cannot create the folder"),
                 "a foreign folder": (_foreign, "not part of a causalir run"),
                 "an invalid run": (_invalid_run, "holds no valid checkpoint")}


@pytest.mark.parametrize("case", sorted(RUN_DIR_CASES))
def test_train_with_an_unusable_run_dir_fails_before_training(case, tmp_path, monkeypatch, capsys):
    make, msg = RUN_DIR_CASES[case]
    run = make(tmp_path / "r")
    if case != "an invalid run":
        _no_training(monkeypatch)
    with pytest.warns(RuntimeWarning) if case == "an invalid run" else _nullcontext():
        assert cli.main(TRAIN + ["--run-dir", str(run)]) == 2
    assert msg in _one_line_error(capsys, "train")


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_train_with_a_read_only_run_dir_fails_before_training(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    monkeypatch.setattr(train.tempfile, "mkstemp", _denied)
    assert cli.main(TRAIN + ["--run-dir", str(tmp_path / "ro")]) == 2
    assert "is not writable" in _one_line_error(capsys, "train")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_train_with_a_really_read_only_run_dir(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(TRAIN + ["--run-dir", str(ro)]) == 2
        assert "is not writable" in _one_line_error(capsys, "train")
    finally:
        ro.chmod(0o700)


def test_evaluate_out_is_checked_before_evaluating(trained, tmp_path, monkeypatch, capsys):
    from causalir import evaluate

    ev = ["evaluate", "--run-dir", str(trained), "--max-side", "32", "--device", "cpu"]
    out = tmp_path / "t.csv"
    out.write_text("keep me")
    with monkeypatch.context() as m:
        m.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
        assert cli.main(ev + ["--out", str(out)]) == 2
        assert "exists; pass --overwrite" in _one_line_error(capsys, "evaluate")
        assert out.read_text() == "keep me"
        assert cli.main(ev + ["--out", str(tmp_path / "missing" / "t.csv")]) == 2
        assert "does not exist" in _one_line_error(capsys, "evaluate")
        assert cli.main(ev + ["--out", str(tmp_path)]) == 2
        assert "is a folder" in _one_line_error(capsys, "evaluate")
        m.setattr(train.tempfile, "mkstemp", _denied)
        assert cli.main(ev + ["--out", str(tmp_path / "new.csv")]) == 2
        assert "not writable" in _one_line_error(capsys, "evaluate")
    assert cli.main(ev + ["--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("method,distortion,image,psnr,ssim")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_reads_the_older_layout_and_refuses_a_non_run(trained, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    unit, _ = train.find_checkpoint(trained)
    for f in ("model.safetensors", "state.pt", "run.json"):
        shutil.copy(unit / f, legacy / f)
    assert cli.main(["evaluate", "--run-dir", str(legacy), "--max-side", "32", "--device", "cpu"]) == 0
    capsys.readouterr()
    for bad in (tmp_path / "nope", tmp_path):
        assert cli.main(["evaluate", "--run-dir", str(bad), "--max-side", "32"]) == 2
        assert "is not a training run" in _one_line_error(capsys, "evaluate")
    (legacy / "run.json").write_text("{broken")
    assert cli.main(["evaluate", "--run-dir", str(legacy), "--max-side", "32"]) == 2
    assert "could not read" in _one_line_error(capsys, "evaluate")


def _bomb(path):
    data.save_image(torch.rand(3, 40, 40), path)
    return path


REAL_INPUT_ERRORS = {  # a real bad input file for `distort`, each told in one line
    "missing file": lambda p: p / "nope.png",
    "a folder": lambda p: p,
    "not an image": lambda p: (p / "x.png", (p / "x.png").write_bytes(b"not a png"))[0],
    "decompression bomb": _bomb,
}


@pytest.mark.parametrize("case", sorted(REAL_INPUT_ERRORS))
def test_distort_bad_input_files_are_one_line_errors(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 if case == "decompression bomb" else Image.MAX_IMAGE_PIXELS)
    src = REAL_INPUT_ERRORS[case](tmp_path if case != "decompression bomb" else tmp_path / "big.png")
    assert cli.main(["distort", "gaussian_noise", str(src), str(tmp_path / "out.png")]) == 2
    _one_line_error(capsys, "distort")
    assert not (tmp_path / "out.png").exists()


RAISED = {  # whatever a command meets deep down: one line, exit 2 (130 for Ctrl-C)
    "PermissionError": PermissionError(13, "Permission denied", "/x/in.png"),
    "OSError": OSError(5, "Input/output error"),
    "IsADirectoryError": IsADirectoryError(21, "Is a directory"),
    "DecompressionBombError": Image.DecompressionBombError("Image size (1000000000 pixels) exceeds limit"),
    "MemoryError": MemoryError(),
    "multi-line ValueError": ValueError("first line\nsecond line"),
    "KeyError": KeyError("no such thing"),
    "ConnectionError": ConnectionError("refused"),
}


@pytest.mark.parametrize("case", sorted(RAISED))
def test_raised_errors_are_one_line(case, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise RAISED[case]
    monkeypatch.setattr(data, "load_image", boom)
    assert cli.main(["distort", "gaussian_noise", str(tmp_path / "in.png"), str(tmp_path / "o.png")]) == 2
    line = _one_line_error(capsys, "distort")
    assert line != "causalir distort: error: " and "\n" not in line


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "load_image", boom)
    assert cli.main(["distort", "gaussian_noise", str(tmp_path / "in.png"), str(tmp_path / "o.png")]) == 130
    assert capsys.readouterr().err.strip() == "causalir distort: interrupted"


BAD_FLAGS = [
    (["train", "--run-dir", "r", "--steps", "-1"], "--steps"), (["train", "--run-dir", "r", "--steps", "1.5"], "--steps"),
    (["train", "--run-dir", "r", "--batch-size", "0"], "--batch-size"),
    (["train", "--run-dir", "r", "--patch-size", "4"], "--patch-size"),
    (["train", "--run-dir", "r", "--lr", "0"], "--lr"), (["train", "--run-dir", "r", "--lr", "nan"], "--lr"),
    (["train", "--run-dir", "r", "--lr", "-1e-3"], "--lr"), (["train", "--run-dir", "r", "--seed", "-1"], "--seed"),
    (["train", "--run-dir", "r", "--val-every", "-5"], "--val-every"),
    (["train", "--run-dir", "r", "--ckpt-every", "x"], "--ckpt-every"),
    (["train", "--run-dir", "r", "--allow-changed", "weights"], "--allow-changed"),
    (["evaluate", "--run-dir", "r", "--max-side", "0"], "--max-side"),
    (["evaluate", "--run-dir", "r", "--seed", "-2"], "--seed"),
    (["distort", "gaussian_noise", "a.png", "b.png", "--seed", "-1"], "--seed"),
    (["reproduce", "--jobs", "0"], "--jobs"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS)
def test_bad_numeric_flags_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and ("expected" in err or "invalid choice" in err), err


@pytest.mark.parametrize("flag", ["--model-cfg", "--strategy-cfg"])
def test_bad_key_value_is_a_one_line_error(flag, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    assert cli.main(TRAIN + ["--run-dir", str(tmp_path / "r"), flag, "nf"]) == 2
    assert f"{flag}: expected KEY=VALUE, got 'nf'" in _one_line_error(capsys, "train")


@pytest.mark.parametrize("argv,msg", [
    (["--device", "foo"], "TrainConfig.device"),
    (["--strategy", "sgd"], "valid names"),
    (["--distortion-set", "nope"], "nope"),
])
def test_train_config_errors_are_one_line_before_training(argv, msg, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    assert cli.main(TRAIN + ["--run-dir", str(tmp_path / "r"), *argv]) == 2
    assert msg in _one_line_error(capsys, "train")


# ------------------------------------------------------------------------------ issue 17: --precision
def test_precision_flag_takes_fp32_or_bf16(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--run-dir", "r", "--precision", "fp16"])
    assert e.value.code == 2 and "argument --precision: invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--run-dir", "r", "--bf16"])  # the older flag is gone
    assert "unrecognized arguments: --bf16" in capsys.readouterr().err


def test_bf16_without_bf16_kernels_is_a_one_line_error_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "precision_support", lambda device="cpu": {
        "device": "cpu", "bf16": False, "native": False, "machine": "Some CPU", "detail": "CPU capability AVX2"})
    _no_training(monkeypatch)
    assert cli.main(TRAIN + ["--run-dir", str(tmp_path / "r"), "--precision", "bf16"]) == 2
    line = _one_line_error(capsys, "train")
    assert "TrainConfig.precision: 'bf16' needs bfloat16 kernels" in line and "Some CPU" in line
    assert "--precision fp32" in line and not (tmp_path / "r").exists()


def test_train_bf16_channels_last_on_cpu_records_its_precision(tmp_path, monkeypatch, capsys):
    if not train.precision_support("cpu")["bf16"]:  # reference bf16 kernels: same numbers, slower
        monkeypatch.setattr(train, "precision_support", lambda device="cpu": {
            "device": "cpu", "bf16": True, "native": False, "machine": "test", "detail": "forced by the test"})
    run = tmp_path / "run"
    assert cli.main(TRAIN + ["--run-dir", str(run), "--precision", "bf16", "--channels-last"]) == 0
    rec = train.find_checkpoint(run)[1]
    assert rec["config"]["train"]["precision"] == "bf16" and rec["config"]["train"]["channels_last"] is True
    assert rec["step"] == 3


def test_train_nproc_and_seeds_launch_one_torchrun_per_seed(tmp_path, monkeypatch, capsys):
    """--nproc N re-runs the command under torchrun; --seeds one process per seed into RUN_DIR/seed-S, --jobs at
    a time, the launcher's own flags removed from what the children get."""
    launched = []

    class Proc:
        def __init__(self, cmd, env):
            launched.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr("subprocess.Popen", Proc)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--nproc", "2", "--seeds", "3", "4", "--jobs", "2", "--steps", "5", "--run-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    assert len(launched) == 2
    for (cmd, env), seed in zip(launched, (3, 4)):
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        child = cmd[cmd.index("train") + 1:]
        assert child == ["--steps", "5", "--seed", str(seed), "--run-dir", str(tmp_path / f"seed-{seed}")]
        assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 4))


def test_train_seeds_report_the_failed_ones(tmp_path, monkeypatch, capsys):
    class Proc:
        def __init__(self, cmd, env):
            self.seed = cmd[cmd.index("--seed") + 1]

        def wait(self):
            return 1 if self.seed == "1" else 0

    monkeypatch.setattr("subprocess.Popen", Proc)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["train", "--seeds", "0", "1", "--run-dir", str(tmp_path)]) == 2
    assert "training failed for seed(s) 1" in capsys.readouterr().err


def test_reproduce_set_overrides_the_profile_and_names_bad_fields(tmp_path, monkeypatch, capsys):
    from causalir import experiments

    seen = {}

    def fake_run(name, profile, seed, device, commit=False, overwrite=False, ship=False, **over):
        seen.update(name=name, over=over)
        return {"_path": str(tmp_path / "x.json")}

    monkeypatch.setattr(experiments, "run", fake_run)
    assert cli.main(["reproduce", "dil-denoise", "--no-claims", "--set", "seeds=3", 'budgets=["batches","iterations"]',
                     "run_root=runs/dil"]) == 0
    assert seen == {"name": "dil-denoise", "over": {"seeds": 3, "budgets": ("batches", "iterations"),
                                                    "run_root": "runs/dil"}}
    assert cli.main(["reproduce", "dil-denoise", "erm-denoise", "--set", "seeds=3"]) == 2
    assert "one experiment" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["reproduce", "dil-denoise", "--no-claims", "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
