"""Data parallelism under torchrun (issue 17): 2 CPU ranks x batch B take the steps of 1 rank x batch 2B, for
ERM (DistributedDataParallel) and the functional DIL strategies (inner gradients and meta-gradients averaged
over the ranks, first and second order, and the released algorithm), and a 2-rank run resumes exactly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from causalir import distributed, train

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker as W  # noqa: E402

B = 2  # per-rank batch


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One torchrun launch with 2 gloo ranks running every case of tests/ddp_worker.py."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with gloo")
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "ddp_worker.py"), str(out), str(B)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def one_rank(name: str, **kw) -> dict:
    net = W.model()
    train.fit(net, train.build_strategy(name, **W.CASES[name]), W.images(), W.seen(), W.config(2 * B, **kw))
    return net.state_dict()


def assert_close(got: dict, want: dict, start: dict) -> None:
    assert sorted(got) == sorted(want)
    moved = max(float((want[k] - start[k]).abs().max()) for k in want)
    assert moved > 1e-4, "the reference run did not train: the comparison would prove nothing"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", sorted(W.CASES))
def test_two_ranks_equal_one_rank_with_twice_the_batch(two_ranks, name):
    start = W.model().state_dict()
    assert_close(load_file(str(two_ranks / f"{name}.safetensors")), one_rank(name), start)


def test_two_ranks_differ_from_one_rank_with_the_same_per_rank_batch(two_ranks):
    """The test above can fail: 1 rank at batch B (half the data) lands elsewhere."""
    net = W.model()
    train.fit(net, train.build_strategy("erm"), W.images(), W.seen(), W.config(B))
    got = load_file(str(two_ranks / "erm.safetensors"))
    assert max(float((got[k] - v).abs().max()) for k, v in net.state_dict().items()) > 1e-4


def test_two_rank_run_resumes_exactly_and_counts_both_ranks(two_ranks):
    a = load_file(str(two_ranks / "erm-resumed.safetensors"))
    b = load_file(str(two_ranks / "erm-straight.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    counters = eval((two_ranks / "erm-resumed.counters").read_text())
    assert counters["images_forwarded"] == 4 * 2 * B  # 4 steps x 2 ranks x B
    _, rec = train.find_checkpoint(two_ranks / "run-resumed")
    assert rec["config"]["world_size"] == 2


def test_one_rank_cannot_resume_a_two_rank_run(two_ranks):
    net = W.model()
    with pytest.raises(ValueError, match="world_size"):
        train.fit(net, train.build_strategy("erm"), W.images(), W.seen(),
                  W.config(2 * B, 6, schedule="constant", ckpt_every=2), run_dir=two_ranks / "run-straight")


def test_local_slice_and_identity_outside_a_process_group():
    x = torch.arange(12.0).view(6, 2)
    assert torch.equal(distributed.local_slice(x, 0, 1, 3), x[2:4])
    assert distributed.local_slice(x, 0) is x  # one rank: the batch itself
    assert distributed.all_mean(x) is x and distributed.rank_world() == (0, 1)
    with pytest.raises(ValueError, match="equal slices"):
        distributed.local_slice(x, 0, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        distributed.local_slice(x, 0, 3, 3)


def test_strategies_without_torchrun_support_are_named(monkeypatch):
    with pytest.raises(ValueError, match="does not run under torchrun.*erm"):
        train._check_distributed(train.build_strategy("confounded_erm"), 2)


def test_world_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_from_env("cpu")
