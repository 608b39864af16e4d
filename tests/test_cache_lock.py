"""Issue 15, class 7: the FAIG seed cache's lock (``faig_srresnet.cached_run_seed``).

A lock records its owner's PID, host and process start time. A lock whose owner is gone (a dead PID, a PID now
used by another process, the old PID-only format of a dead PID, an unreadable lock older than the grace period) is
broken with a message and the seed is computed; a lock whose owner may still run (a live PID, another host, an
unreadable lock being written) is waited on with a message naming the owner, bounded by ``wait_s``, and a
finished holder's cache is used. The wait is patched to milliseconds; ``run_seed`` is replaced by a stub.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from causalir.experiments import faig_srresnet as F

CFG = F.FAIGConfig()
RESULT = {"seed": 0, "value": 1.5}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Artifacts in tmp_path, a stub run_seed that counts its calls, millisecond polling; returns (lock, calls)."""
    monkeypatch.setenv("CAUSALIR_ARTIFACTS", str(tmp_path))
    calls = []

    def fake_run_seed(cfg, seed, device, log=print, models=None):
        calls.append(seed)
        return dict(RESULT, seed=seed)

    monkeypatch.setattr(F, "run_seed", fake_run_seed)
    monkeypatch.setattr(F, "LOCK_POLL_S", 0.005)
    monkeypatch.setattr(F, "LOCK_REPORT_S", 0.05)
    path = F._cache_path(CFG, 0, "cpu", "quick")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_suffix(".lock"), calls


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def live():
    """A live process of ours (a sleeper), killed afterwards by its handle."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _run(log, wait_s=0.3, models=None):
    return F.cached_run_seed(CFG, 0, "cpu", "quick", wait_s=wait_s, log=log.append, models=models)


def _stale_locks(lock):
    dead = _dead_pid()
    host = socket.gethostname()
    me = F._proc_stat(os.getpid())
    return {
        "dead PID": json.dumps({"pid": dead, "host": host, "start": None, "time": time.time()}),
        "dead PID, old format (the PID alone)": str(dead),
        "reused PID (another start time)": json.dumps({"pid": os.getpid(), "host": host,
                                                        "start": "1" if me and me[1] != "1" else "2"}),
        "PID 0": json.dumps({"pid": 0, "host": host}),
    }


@pytest.mark.parametrize("kind", ["dead PID", "dead PID, old format (the PID alone)", "reused PID (another start time)",
                                  "PID 0", "unreadable and old"])
def test_a_stale_lock_is_broken_with_a_message(setup, kind):
    lock, calls = setup
    if kind == "reused PID (another start time)" and F._proc_stat(os.getpid()) is None:
        pytest.skip("no /proc: a reused PID cannot be told from a live one here")
    if kind == "unreadable and old":
        lock.write_text("{garbage")
        old = time.time() - 2 * F.LOCK_GRACE_S
        os.utime(lock, (old, old))
    else:
        lock.write_text(_stale_locks(lock)[kind])
    log = []
    t0 = time.perf_counter()
    res = _run(log)
    assert res == dict(RESULT, seed=0) and calls == [0]
    assert time.perf_counter() - t0 < 5                     # no waiting for the dead
    assert any("breaking the stale lock" in m and str(lock) in m for m in log), log
    assert not lock.exists()                                  # our own lock is gone afterwards
    assert not list(lock.parent.glob("*.broken-*"))
    assert json.loads(F._cache_path(CFG, 0, "cpu", "quick").read_text()) == res


@pytest.mark.parametrize("kind", ["live PID", "another host", "unreadable and fresh"])
def test_a_live_lock_is_waited_on_bounded_with_a_message_naming_its_owner(setup, live, kind):
    lock, calls = setup
    st = F._proc_stat(live.pid)
    if kind == "live PID":
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "start": st[1] if st else None,
                                    "time": time.time()}))
        owner = f"PID {live.pid}"
    elif kind == "another host":
        lock.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example", "time": time.time()}))
        owner = "another host"
    else:
        lock.write_text("")
        owner = "unreadable lock"
    log = []
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError) as e:
        _run(log, wait_s=0.2)
    waited = time.perf_counter() - t0
    assert 0.2 <= waited < 5                                   # bounded by wait_s
    assert owner in str(e.value) and "delete the lock" in str(e.value)
    assert log and all(owner in m and "waiting for" in m for m in log), log
    assert 2 <= len(log) <= 10                                 # repeated every LOCK_REPORT_S, not at every poll
    assert calls == [] and lock.exists()                       # never computed, never took someone else's lock


def test_a_holder_that_finishes_while_we_wait_hands_over_its_cache(setup, live, monkeypatch):
    lock, calls = setup
    path = F._cache_path(CFG, 0, "cpu", "quick")
    lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
    real_sleep = time.sleep

    def holder_finishes(s):                 # the other process writes its result and releases the lock
        path.write_text(json.dumps({"seed": 0, "value": "theirs"}))
        lock.unlink()
        real_sleep(0)

    monkeypatch.setattr(F.time, "sleep", holder_finishes)
    log = []
    assert _run(log, wait_s=30) == {"seed": 0, "value": "theirs"}
    assert calls == [] and any(f"PID {live.pid}" in m for m in log)


def test_a_released_lock_is_taken_and_models_still_recompute(setup, live, monkeypatch):
    lock, calls = setup
    lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
    monkeypatch.setattr(F.time, "sleep", lambda s: lock.unlink(missing_ok=True))
    log = []
    assert _run(log, models={}) == dict(RESULT, seed=0)     # with models: recomputed, after the lock is free
    assert calls == [0] and not lock.exists()


def test_the_cache_is_used_without_touching_a_lock(setup):
    lock, calls = setup
    F._cache_path(CFG, 0, "cpu", "quick").write_text(json.dumps({"seed": 0, "cached": True}))
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert _run([]) == {"seed": 0, "cached": True} and calls == [] and lock.exists()


def test_own_lock_is_written_with_pid_host_and_released_even_on_failure(setup, monkeypatch):
    lock, _ = setup
    seen = {}

    def failing(cfg, seed, device, log=print, models=None):
        seen.update(json.loads(lock.read_text()))
        raise RuntimeError("boom")

    monkeypatch.setattr(F, "run_seed", failing)
    with pytest.raises(RuntimeError, match="boom"):
        _run([])
    assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname() and "time" in seen
    assert not lock.exists()


def test_a_lock_that_is_not_ours_is_left_alone_on_release(setup, live):
    lock, _ = setup
    lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
    F._release_lock(lock)
    assert lock.exists()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "60"])
def test_wait_s_is_checked(setup, bad):
    with pytest.raises((ValueError, TypeError), match="cached_run_seed.wait_s"):
        F.cached_run_seed(CFG, 0, "cpu", "quick", wait_s=bad)


def test_the_cache_keeps_the_trained_models_so_a_later_run_loads_them_instead_of_retraining(setup, monkeypatch):
    import torch

    from causalir import models as registry

    lock, calls = setup
    torch.manual_seed(0)
    nets = {f"{r} seed 0": registry.build("srresnet", **CFG.model_cfg) for r in ("baseline", "target")}

    def trains(cfg, seed, device, log=print, models=None):
        calls.append(seed)
        models.update(nets)
        return dict(RESULT, seed=seed)

    monkeypatch.setattr(F, "run_seed", trains)
    first, again = {}, {}
    assert _run([], models=first) == dict(RESULT, seed=0) and set(first) == set(nets)
    weights = F._cache_path(CFG, 0, "cpu", "quick").with_suffix(".safetensors")
    assert weights.exists() and not list(weights.parent.glob("*.tmp-*"))          # written atomically
    assert _run([], models=again) == dict(RESULT, seed=0) and calls == [0]        # loaded, not retrained
    for label, net in nets.items():
        got = again[label].state_dict()
        assert all(torch.equal(v, got[k]) for k, v in net.state_dict().items())
    weights.unlink()                                   # a cache without weights: the seed is computed again
    assert _run([], models={}) == dict(RESULT, seed=0) and calls == [0, 0] and not lock.exists()
