import json

import torch

from causalir import cli, data


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
    rec = json.loads((run / "run.json").read_text())
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
