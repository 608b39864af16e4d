"""Issue 15: a checkpoint is one atomic unit (kill at every point of a write, resume bit-identical), a seed means
a seed (fit owns its randomness), a resume of a changed run is refused unless asked, and every TrainConfig field
refuses an out-of-range value naming the field."""
import dataclasses
import hashlib
import io
import json
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from causalir import distortions, models, train

SEEN = distortions.distortion_set("noise-dil").seen
IMGS = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
STEPS, EVERY = 3, 1  # units at steps 1, 2, 3 (two kept)


@dataclass
class GlobalDrawsERM(train.ERM):
    """ERM that also draws from the global torch / numpy / python RNGs: fit must seed and checkpoint them."""

    name: str = field(default="global_draws_erm", init=False)

    def step(self, ctx):
        clean = ctx.sample_clean()
        jitter = 0.01 * (torch.rand(()) + float(np.random.rand()) + random.random())
        out = ctx.model(ctx.distort(clean) + jitter)
        loss = ctx.loss_fn(out, clean)
        self.update(ctx, loss, clean.shape[0])
        return {"loss": float(loss.detach())}


def _model(seed=0):
    torch.manual_seed(seed)
    return models.build("dncnn", nf=4, depth=2)


def _cfg(**kw):
    base = dict(steps=STEPS, batch_size=2, patch_size=8, lr=1e-2, seed=3, device="cpu", progress=False,
                ckpt_every=EVERY, grad_clip=1.0)
    base.update(kw)
    return train.TrainConfig(**base)


def _fit(run=None, strategy=None, imgs=IMGS, **kw):
    allow = kw.pop("allow_changed", ())
    return train.fit(_model(), strategy or GlobalDrawsERM(), imgs, SEEN, _cfg(**kw), run_dir=run, allow_changed=allow)


def _w(m):
    return torch.cat([v.detach().flatten() for v in m.state_dict().values()])


@pytest.fixture(scope="module")
def ref():
    r = _fit()
    return _w(r.model), r.counters.as_dict()


def _assert_clean_run(run, step=STEPS):
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    unit, rec = train.find_checkpoint(run)
    assert unit.name == f"ckpt-{step:08d}" and rec["step"] == step
    return names


# ------------------------------------------------------------------------------ 1. one atomic unit
PRIMITIVES = ("_mkdir", "_write", "_fsync", "_rename", "_rmtree")


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no cleanup handler of the code under test catches it."""


def _count_primitives(monkeypatch, run):
    counts = dict.fromkeys(PRIMITIVES, 0)
    for name in PRIMITIVES:
        orig = getattr(train, name)

        def counted(*a, _n=name, _f=orig):
            counts[_n] += 1
            return _f(*a)
        monkeypatch.setattr(train, name, counted)
    _fit(run)
    monkeypatch.undo()
    return counts


def _kill_points(monkeypatch, tmp_path):
    counts = _count_primitives(monkeypatch, tmp_path / "count")
    points = [(name, k) for name in PRIMITIVES for k in range(counts[name])]
    points += [("step", k) for k in range(STEPS)]  # and between checkpoints, inside a training step
    return counts, points


def test_kill_at_every_point_of_a_checkpoint_write_resumes_bit_identically(monkeypatch, tmp_path, ref):
    counts, points = _kill_points(monkeypatch, tmp_path)
    # 3 units: each a mkdir, 3 file writes and fsyncs, 2 directory fsyncs and 1 rename; the third prunes one unit
    assert counts == {"_mkdir": 3, "_write": 9, "_fsync": 15, "_rename": 4, "_rmtree": 1}, counts
    for name, k in points:
        run = tmp_path / f"{name}-{k}"
        calls = [0]
        target = "step" if name == "step" else name
        orig = GlobalDrawsERM.step if name == "step" else getattr(train, name)

        def kill(*a, _orig=orig, _k=k):
            calls[0] += 1
            if calls[0] == _k + 1:
                raise Killed(f"{target} #{_k}")
            return _orig(*a)
        with monkeypatch.context() as m:
            if name == "step":
                m.setattr(GlobalDrawsERM, "step", kill)
            else:
                m.setattr(train, name, kill)
            with pytest.raises(Killed):
                _fit(run)
        resumed = _fit(run)
        assert torch.equal(_w(resumed.model), ref[0]), f"killed at {name} #{k}: final weights differ"
        assert resumed.counters.as_dict() == ref[1], (name, k)
        # no *.tmp left, the newest unit is the last step's (a kill before the prune leaves one older unit more)
        assert _assert_clean_run(run)[-2:] == ["ckpt-00000002", "ckpt-00000003"], (name, k)
    assert len(points) == 35


def test_orphans_are_removed_and_only_ours(tmp_path, ref):
    run = tmp_path / "run"
    _fit(run)
    shutil.rmtree(run / "ckpt-00000003")  # killed while writing the last unit
    orphans = [".ckpt-00000003.tmp", ".ckpt-00000002.old.tmp", ".ckpt-00000002.refused.tmp"]
    for o in orphans:
        (run / o).mkdir()
        (run / o / "model.safetensors").write_bytes(b"half")
    for o in (".probe-abc123.tmp", ".run.json.x1y2.tmp", ".state.pt.q_9.tmp", ".model.safetensors.zz.tmp"):
        (run / o).write_bytes(b"")
    (run / ".keep.tmp").write_bytes(b"not ours")  # not a name this layout writes: left alone
    res = _fit(run)
    assert torch.equal(_w(res.model), ref[0])
    assert sorted(p.name for p in run.iterdir()) == [".keep.tmp", "ckpt-00000002", "ckpt-00000003"]


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def _edit_json(path, fn):
    rec = json.loads(path.read_text())
    fn(rec)
    path.write_text(json.dumps(rec))


CORRUPTIONS = {
    "model bytes flipped": lambda u: _flip(u / "model.safetensors"),
    "state bytes flipped": lambda u: _flip(u / "state.pt"),
    "model truncated": lambda u: (u / "model.safetensors").write_bytes((u / "model.safetensors").read_bytes()[:50]),
    "state missing": lambda u: (u / "state.pt").unlink(),
    "model missing": lambda u: (u / "model.safetensors").unlink(),
    "run.json missing": lambda u: (u / "run.json").unlink(),
    "run.json not json": lambda u: (u / "run.json").write_text("{not json"),
    "run.json not utf-8": lambda u: (u / "run.json").write_bytes(b"\xff\xfe\x00"),
    "run.json a list": lambda u: (u / "run.json").write_text("[]"),
    "format changed": lambda u: _edit_json(u / "run.json", lambda r: r.update(format="causalir-checkpoint/1")),
    "step changed": lambda u: _edit_json(u / "run.json", lambda r: r.update(step=5)),
    "digest dropped": lambda u: _edit_json(u / "run.json", lambda r: r["sha256"].pop("state.pt")),
    "digests absent": lambda u: _edit_json(u / "run.json", lambda r: r.pop("sha256")),
    "unit from an older step": lambda u: [shutil.copy(u.parent / "ckpt-00000002" / f, u / f)
                                          for f in ("model.safetensors", "state.pt")],
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_bad_unit_is_refused_and_the_previous_good_one_used(how, tmp_path, ref):
    run = tmp_path / "run"
    _fit(run)
    CORRUPTIONS[how](run / "ckpt-00000003")
    with pytest.warns(RuntimeWarning, match="refused checkpoint .*ckpt-00000003"):
        res = _fit(run)
    assert res.counters.steps == STEPS and torch.equal(_w(res.model), ref[0])
    assert _assert_clean_run(run) == ["ckpt-00000002", "ckpt-00000003"]  # the refused unit was replaced


def test_no_good_unit_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    _fit(run)
    for u in ("ckpt-00000002", "ckpt-00000003"):
        _flip(run / u / "model.safetensors")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="holds no valid checkpoint"):
        _fit(run)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="holds no valid checkpoint"):
        train.find_checkpoint(run)


def test_older_three_file_layout_is_refused_for_resume_but_readable(tmp_path):
    run = tmp_path / "run"
    _fit(run)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in ("model.safetensors", "state.pt", "run.json"):
        shutil.copy(run / "ckpt-00000003" / f, legacy / f)
    with pytest.raises(ValueError, match="older three-file layout"):
        _fit(legacy)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train.fit(_model(), GlobalDrawsERM(), IMGS, SEEN, _cfg(), run_dir=legacy, resume=False)
    with pytest.raises(FileNotFoundError, match="not a training run"):
        train.find_checkpoint(legacy)
    path, rec = train.find_checkpoint(legacy, legacy=True)
    assert path == legacy and rec["config"]["model"]["name"] == "dncnn"


# ------------------------------------------------------------------------------ 2. a seed means a seed
def _rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("strategy", ["erm", "global_draws", "dil_pf", "confounded_erm"])
def test_fit_does_not_depend_on_or_disturb_the_global_rng(strategy):
    def one(global_seed):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        random.seed(global_seed)
        model = _model()  # the caller seeds the initial weights
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        random.seed(global_seed)
        before = _rng_states()
        strat = GlobalDrawsERM() if strategy == "global_draws" else train.build_strategy(strategy)
        res = train.fit(model, strat, IMGS, SEEN, _cfg(steps=3, ckpt_every=0))
        after = _rng_states()
        assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]
        return _w(res.model)

    assert torch.equal(one(1), one(2))
    m = _model()
    strat = GlobalDrawsERM() if strategy == "global_draws" else train.build_strategy(strategy)
    assert not torch.equal(one(1), _w(train.fit(m, strat, IMGS, SEEN, _cfg(steps=3, ckpt_every=0, seed=4)).model))


# ------------------------------------------------------------------------------ 8. a changed run is refused
def _one_level(img, c=0, y=3, x=5):
    out = img.clone()
    v = float(out[c, y, x])
    out[c, y, x] = v + 1 / 255 if v < 0.99 else v - 1 / 255
    return out


OTHER_IMGS = {
    "other photos": [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i + 10)) for i in range(2)],
    "one image fewer": IMGS[:1],
    "one image more": IMGS + IMGS[:1],
    "one pixel one level off": [_one_level(IMGS[0]), IMGS[1]],
    "images swapped": IMGS[::-1],
    "an image cropped": [IMGS[0][:, :20, :], IMGS[1]],
    "an image transposed": [IMGS[0].transpose(1, 2), IMGS[1]],
}


@pytest.mark.parametrize("how", sorted(OTHER_IMGS))
def test_resume_on_other_images_is_refused_unless_asked(how, tmp_path):
    run = tmp_path / "run"
    _fit(run, steps=4)
    shutil.rmtree(run / "ckpt-00000004")  # as if killed before step 4's unit
    with pytest.raises(ValueError, match="trained on other data .*allow_changed=\\('data',\\)"):
        _fit(run, imgs=OTHER_IMGS[how], steps=4)
    assert _fit(run, imgs=OTHER_IMGS[how], steps=4, allow_changed=("data",)).counters.steps == 4
    assert _fit(run, imgs=OTHER_IMGS[how], steps=4).counters.steps == 4  # the new unit records the new data
    with pytest.raises(ValueError, match="trained on other data"):
        _fit(run, steps=4)


def test_resume_of_owned_data_on_other_pairs_is_refused(tmp_path):
    clean = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = (clean + 0.1).clamp(0, 1)
    mk = lambda c, n: train.build_strategy("paired_mse", clean=c, dist=n)  # noqa: E731
    run = tmp_path / "run"
    train.fit(_model(), mk(clean, noisy), None, (), _cfg(steps=2), run_dir=run)
    for c, n in ((clean, noisy.flip(0)), (clean.flip(0), noisy), (clean, noisy * 0.5)):
        with pytest.raises(ValueError, match="trained on other data"):
            train.fit(_model(), mk(c, n), None, (), _cfg(steps=4), run_dir=run)


@pytest.mark.parametrize("steps", [3, 5, 8, 100])
def test_changed_steps_under_cosine_is_refused_unless_asked(steps, tmp_path):
    run = tmp_path / "run"
    _fit(run, steps=4, ckpt_every=0)
    if steps < 4:
        for allow in ((), ("steps",)):
            with pytest.raises(ValueError, match="past TrainConfig.steps=3"):
                _fit(run, steps=steps, allow_changed=allow)
        return
    with pytest.raises(ValueError, match="steps=4, now steps=%d: the cosine schedule" % steps):
        _fit(run, steps=steps, ckpt_every=0)
    if steps <= 8:
        assert _fit(run, steps=steps, ckpt_every=0, allow_changed=("steps",)).counters.steps == steps


@pytest.mark.parametrize("schedule", ["constant", "step"])
def test_a_longer_run_under_a_step_independent_schedule_continues_exactly(schedule, tmp_path):
    kw = dict(schedule=schedule, lr_step_every=3 if schedule == "step" else 0)
    straight = _fit(steps=8, **kw)
    run = tmp_path / "run"
    _fit(run, steps=4, **kw)
    assert torch.equal(_w(_fit(run, steps=8, **kw).model), _w(straight.model))


CHANGED_CONFIG = {"lr": dict(lr=5e-3), "batch_size": dict(batch_size=3), "patch_size": dict(patch_size=12),
                  "seed": dict(seed=4), "loss": dict(loss="l2"), "grad_clip": dict(grad_clip=0.5),
                  "betas": dict(betas=(0.8, 0.99)), "schedule": dict(schedule="constant"),
                  "lr_min_ratio": dict(lr_min_ratio=0.5)}


@pytest.mark.parametrize("fld", sorted(CHANGED_CONFIG))
def test_resume_with_another_config_is_refused_naming_the_field(fld, tmp_path):
    run = tmp_path / "run"
    _fit(run, steps=2)
    with pytest.raises(ValueError, match=f"different configuration .*train.{fld}: saved"):
        _fit(run, steps=2, **CHANGED_CONFIG[fld])


def test_resume_with_another_model_strategy_or_distortions_is_refused(tmp_path):
    run = tmp_path / "run"
    _fit(run, steps=2)
    with pytest.raises(ValueError, match="model.depth: saved 2, now 3"):
        train.fit(models.build("dncnn", nf=4, depth=3), GlobalDrawsERM(), IMGS, SEEN, _cfg(steps=2), run_dir=run)
    with pytest.raises(ValueError, match="strategy.name: saved 'global_draws_erm', now 'erm'"):
        _fit(run, strategy=train.build_strategy("erm"), steps=2)
    with pytest.raises(ValueError, match="distortions"):
        train.fit(_model(), GlobalDrawsERM(), IMGS, SEEN[:2], _cfg(steps=2), run_dir=run)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train.fit(_model(), GlobalDrawsERM(), IMGS, SEEN, _cfg(steps=2), run_dir=run, resume=False)


def test_a_unit_from_another_device_type_is_refused(tmp_path):
    run = tmp_path / "run"
    _fit(run, steps=2)
    unit = run / "ckpt-00000002"
    state = torch.load(unit / "state.pt", weights_only=True)
    state["device"] = "cuda"
    buf = io.BytesIO()
    torch.save(state, buf)
    (unit / "state.pt").write_bytes(buf.getvalue())
    _edit_json(unit / "run.json", lambda r: r["sha256"].update({"state.pt": hashlib.sha256(buf.getvalue()).hexdigest()}))
    with pytest.raises(ValueError, match="written by a run on 'cuda'"):
        _fit(run, steps=2)


@pytest.mark.parametrize("bad", ["data", ["weights"], ("steps", "lr"), 3, None])
def test_allow_changed_takes_only_known_names(bad, tmp_path):
    with pytest.raises((TypeError, ValueError), match="allow_changed"):
        _fit(tmp_path / "run", allow_changed=bad)


# ------------------------------------------------------------------------------ 6. the run folder, before training
def _never_steps(monkeypatch):
    def boom(self, ctx):
        raise AssertionError("training started")
    monkeypatch.setattr(GlobalDrawsERM, "step", boom)


def test_an_unusable_run_dir_fails_before_training(tmp_path, monkeypatch):
    _never_steps(monkeypatch)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        _fit(tmp_path / "file")
    with pytest.raises(OSError, match="cannot create the folder"):
        _fit(tmp_path / "file" / "sub")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not part of a causalir run \\(holiday.jpg\\)"):
        _fit(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    for bad in ("", 3, None):
        with pytest.raises(TypeError, match="run_dir"):
            train.check_run_dir(bad)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(train.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match="is not writable"):
        _fit(tmp_path / "ro")


# ------------------------------------------------------------------------------ 5. every TrainConfig field
BAD = {
    "steps": [-1, 1.5, "10", True, None],
    "batch_size": [0, -2, 2.0, "4"],
    "patch_size": [7, 0, -8, 16.0],
    "lr": [0, -1e-3, float("nan"), float("inf"), "1e-3", None],
    "betas": [(0.9,), (0.9, 0.99, 0.9), (1.0, 0.999), (-0.1, 0.9), (0.9, float("nan")), "ab", None, 0.9],
    "schedule": ["linear", None, "Cosine"],
    "lr_min_ratio": [-0.01, 1.5, float("nan"), "0.1"],
    "lr_step_every": [-1, 2.5],
    "loss": ["huber", None, "L1"],
    "grad_clip": [-1.0, -1e-9, float("nan"), float("inf"), "1"],
    "val_every": [-1, 2.5],
    "ckpt_every": [-1, 0.5],
    "seed": [-1, 1.5, 2**63, "0", None],
    "device": ["foo", "cuda:x", 3, None, ""],
    "precision": ["fp16", "BF16", None, True],
    "channels_last": [0, "no"],
    "progress": [1, "true"],
}


def test_every_train_config_field_has_bad_cases():
    assert set(BAD) == {f.name for f in dataclasses.fields(train.TrainConfig)}


@pytest.mark.parametrize("fld,value", [(f, v) for f, vs in BAD.items() for v in vs])
def test_train_config_refuses_an_out_of_range_value_naming_the_field(fld, value):
    base = "betas" if fld == "betas" else fld
    with pytest.raises((TypeError, ValueError), match=rf"TrainConfig\.{base}(\[\d\])?: expected .*got "):
        train.TrainConfig(**{fld: value})


def test_step_schedule_needs_its_period():
    with pytest.raises(ValueError, match="TrainConfig.lr_step_every: expected an integer >= 1 with schedule='step'"):
        train.TrainConfig(schedule="step")
    assert train.TrainConfig(schedule="step", lr_step_every=10).lr_step_every == 10


def test_train_config_accepts_the_edges():
    for kw in (dict(steps=0), dict(patch_size=8), dict(lr_min_ratio=0.0), dict(lr_min_ratio=1.0),
               dict(grad_clip=0.0), dict(betas=(0.0, 0.0)), dict(betas=[0.5, 0.9]), dict(seed=2**63 - 1),
               dict(device="cuda:1"), dict(device=torch.device("cpu")), dict(lr=1)):
        train.TrainConfig(**kw)
