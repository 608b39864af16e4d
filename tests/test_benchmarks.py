"""The benchmark scripts import and refuse what they cannot measure (their numbers are not tested here)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_gpu_check_refuses_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not out.exists()


def test_faig_rebuild_baseline_matches_the_package_loop():
    """The benchmark's rebuild-every-step baseline computes the same FAIG as faig_reference (else its timing
    would compare different work)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_faig

    from test_faig_loop import _pair

    from causalir import attribution as A

    tgt, base, x, y = _pair()
    x, y = x[:1], y[:1]
    attr = bench_faig.faig_rebuild(tgt, base, x, y, 4)
    ref = A.faig_reference(tgt, base, x, y, 4, kernels_only=False)
    got = A.kernel_scores(attr, tgt, kernels_only=False)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
