"""Issue 15, classes 5 and 9 in the RL-Restore, Path-Restore, causal and back-door code and the experiment profiles.

* Every field of every config / profile dataclass in these modules rejects out-of-range, non-finite and wrongly
  typed values with an error naming ``Owner.field``, the value and the valid range (and a test fails when a field
  is added without a bad-value case here).
* Every public function of these modules that takes images rejects a wrong type, wrong dimensions, a wrong dtype,
  values outside [0, 1], NaN, a wrong channel count, an empty batch and images too small for its kernel / patch /
  region with a causalir error naming the argument, never a torch / numpy / PIL message.
* Their other numeric arguments, the Gymnasium environment's reset / step and the SCM entry points likewise.
* Every default and every profile still validates.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from causalir import backdoor as bd
from causalir import causal as ca
from causalir import pathrestore as pr
from causalir import rl
from causalir import toolchain as tc
from causalir.distortions import GaussianNoise
from causalir.experiments import adms_rbn, backdoor_toy, dil, dni_denoise, erm_denoise, faig_srresnet, path_restore
from causalir.experiments import rl_restore

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ config fields
def INT(lo):       # an integer field >= lo
    return [lo - 1, lo + 0.5, True, "3", None]


def POS():         # a number > 0
    return [0.0, -1e-3, NAN, INF, "1e-3", None]


def NONNEG():      # a number >= 0
    return [-1e-3, NAN, INF, "1", None]


def UNIT():        # a number in [0, 1]
    return [-0.1, 1.5, NAN, None]


def SHARE():       # a number in (0, 1]
    return [0.0, 1.5, NAN, None]


def FINITE():      # any finite number
    return [NAN, INF, "1", None]


def BOOL():
    return ["yes", 2, None]


def CHOICE():
    return ["bogus", None]


def MAPPING():
    return [None, 3, "nf=4"]


def OPT_INT(lo):   # an integer >= lo or None
    return [lo - 1, lo + 0.5, True, "2"]


def OPT_POS():
    return [0.0, -1.0, NAN]


_Q = {"rl": rl_restore.PROFILES["quick"], "pr": path_restore.PROFILES["quick"]}

#: (owner shown in messages, a valid instance to modify, {field: [bad values]})
SPECS = [
    ("AgentConfig", rl.AgentConfig(), {**{k: INT(1) for k in ("conv1", "conv", "fc", "lstm")}, "norm": BOOL()}),
    ("DQNConfig", rl.DQNConfig(), {
        **{k: INT(1) for k in ("updates", "batch_episodes", "updates_per_collect", "replay", "target_sync",
                               "max_steps")},
        "collect_episodes": INT(1) + [5000],                       # more episodes at once than the replay holds
        "learn_start": INT(0) + [5000],                             # learning would never start (a hang)
        **{k: INT(0) for k in ("eps_updates", "val_every", "cache_cap")},
        **{k: UNIT() for k in ("gamma", "eps_start", "eps_end")},
        "lr": POS(), "huber_delta": POS(), "grad_clip": NONNEG(), "end_on_drop": BOOL(), "double": BOOL(),
        "tau": UNIT()}),
    ("FQIConfig", rl.FQIConfig(), {
        **{k: INT(1) for k in ("steps", "batch", "max_steps")}, "val_every": INT(0), "lr": POS(),
        "huber_delta": POS(), "adv_clip": POS(), "gamma": UNIT(), "augment": BOOL(), "end_on_drop": BOOL()}),
    ("ToolboxConfig", tc.ToolboxConfig(), {**{k: [(0, 4), (4, 2.5), (4,), (4, 4, 4), "44", None]
                                              for k in ("small", "large")}, "act": CHOICE()}),
    ("ToolTrainConfig", tc.ToolTrainConfig(), {**{k: INT(1) for k in ("steps", "batch_size", "patch_size", "n_data")},
                                               "lr": POS(), "extra": UNIT(), "grad_clip": NONNEG()}),
    ("MultiPathConfig", pr.MultiPathConfig(), {
        "nf": INT(1), "num_blocks": INT(1), "pf_hidden": INT(1), "global_skip": BOOL(),
        "path_blocks": [(1, 2), (0,), (0, 0), (0, -1), (0, 1.5), "01", None],
        "pf_channels": [(0, 4), (4,), (4, 2.5), None]}),
    ("TrainRecipe", pr.TrainRecipe(), {
        "stage1_steps": INT(0), "stage2_steps": INT(0), "batch_size": INT(1), "patch_size": INT(1),
        **{k: POS() for k in ("lr", "lr_stage2", "pf_lr", "l0", "temperature")},
        "gamma": UNIT(), "baseline": CHOICE(), "entropy_coef": NONNEG(), "normalize_adv": BOOL(),
        "pf_steps": INT(0), "pf_samples": INT(2), "l0_quantile": [0, -0.5, 1.5, NAN, "0.5"], "pf_exact": BOOL(),
        "pf_tau": NONNEG(), "pf_norm": CHOICE(), "pf_lr_stage2": [0, -1e-3, NAN, "1e-3"]}),
    ("ConfoundedERM", bd.ConfoundedERM(), {"threshold": UNIT(), "tie": UNIT()}),
    ("BackdoorERM", bd.BackdoorERM(), {"probs": [(0.3, 0.3), (-0.5, 1.5), (NAN, 1.0), (), "ab", None],
                                       "mode": CHOICE()}),
    ("ToyRecipe", backdoor_toy.ToyRecipe(), {
        "model": CHOICE(), "model_cfg": MAPPING(),
        **{k: INT(1) for k in ("steps", "batch_size", "eval_side", "seeds")},
        "tile": INT(1) + [1000],                                   # larger than the evaluation side
        "patch_size": INT(8), "sigma_heavy": NONNEG() + [300.0], "sigma_light": NONNEG() + [300.0],
        "tie": UNIT(), "backdoor_mode": CHOICE(), "eval_split": CHOICE() + ["train"], "lr": POS(),
        "graph_strength": UNIT(), "graph_n": INT(2)}),
    ("DILProfile", dil.DILProfile(), {
        "model": CHOICE(), "model_cfg": MAPPING(), "sweep": MAPPING()[:2],
        **{k: INT(1) for k in ("batch_size", "budget", "checkpoints", "seeds", "eval_side", "val_side")},
        "patch_size": INT(8), "strategies": [(), ("erm", "dil_zz"), "erm"], "lr": POS(),
        **{k: OPT_POS() for k in ("meta_lr", "ref_inner_lr", "ref_meta_lr")}, "alpha": NONNEG(),
        **{k: OPT_INT(1) for k in ("n_distortions", "ref_n_distortions")},
        "budgets": [(), ("batches", "hours"), "batches"], **{k: INT(0) for k in ("val_tiles", "threads")},
        "gate_db": [float("nan"), "x"], "run_root": [3, None]}),
    ("BackbonesProfile", dil.PROFILES_BACKBONES["quick"], {"backbones": [{}, {"vgg": {}}, {"rrdb": 3}, None]}),
    ("RLProfile", _Q["rl"], {
        **{k: [None, {"small": (4, 4)}] for k in ("tools", "tool_train", "agent", "dqn", "dncnn_train")},
        "dncnn": MAPPING(), **{k: INT(1) for k in ("n_train", "n_val", "n_test", "joint_batch", "seeds")},
        "oracle_beam": OPT_INT(1), "joint_steps": INT(0), "image_side": INT(tc.PATCH), "n_fqi": INT(1),
        "fixed_beam": OPT_INT(1), "fqi": [{"steps": 0}, 3]}),
    ("Profile", _Q["pr"], {
        "net": [None, {"nf": 4}], "recipe": [None, {"lr": 1.0}], "dncnn_steps": INT(0), "eval_side": INT(16),
        "tol_db": NONNEG(), "threads": INT(0), "baseline": CHOICE(),
        "tasks": [(), ("sr",), "denoise"],
        "p_grid": [{"denoise": (-1.0,)}, {"denoise": (NAN,)}, {"denoise": ()}, {"denoise": "0"}, None]}),
    ("ADMSConfig", adms_rbn.ADMSConfig(), {
        "model": CHOICE(), "model_cfg": MAPPING(), "tasks": [(), ("rain-fog",), "rain-blur-noise"],
        **{k: INT(0) for k in ("um_steps", "im_steps", "adms_steps", "warmup_steps")},
        **{k: INT(1) for k in ("batch_size", "faig_steps", "faig_images", "faig_side", "clf_nf", "eval_side",
                               "acc_patches", "seeds", "seeds_second_task")},
        "patch_size": INT(8), **{k: POS() for k in ("lr", "im_lr", "adms_lr")}, "fraction": SHARE(),
        "ce_weight": NONNEG(), "mode": CHOICE(), "mixing": CHOICE(), "gate_margin": NONNEG(),
        "gate_action": CHOICE(), "init": CHOICE(), "val_every": INT(0), "ckpt_every": INT(0),
        "test_patch": INT(0) + [4], "loss": CHOICE(),               # test_patch 1..15: too small a patch
        "curve_fractions": [(0.0,), (1.5,), (NAN,), "0.1", None]}),
    ("DNIConfig", dni_denoise.DNIConfig(), {
        "model": CHOICE(), "model_cfg": MAPPING(), "parent_sigma": POS() + [300.0],
        "child_sigma": POS() + [10.0, 300.0],                       # 10 < parent_sigma (15)
        "ref_sigmas": [(), (0.0,), (NAN,), (300.0,), "25", None],
        "parent_steps": INT(0), "ft_steps": INT(0), **{k: INT(1) for k in ("batch_size", "eval_side", "seeds")},
        "patch_size": INT(8), "lr": POS(), "ft_lr": POS(),
        "alphas": [(0.0, 0.5), (0.5, 1.0), (0.0, 1.0, 1.5), (0.0, NAN, 1.0), "01", None]}),
    ("RestorationRecipe", erm_denoise.RestorationRecipe(), {
        "model": CHOICE(), "model_cfg": MAPPING(), "steps": INT(0), "batch_size": INT(1), "patch_size": INT(8),
        "lr": POS(), "val_every": INT(0), "eval_side": INT(1), "seeds": INT(1)}),
    ("FAIGConfig", faig_srresnet.FAIGConfig(), {
        "model_cfg": MAPPING(), **{k: INT(0) for k in ("baseline_steps", "target_steps", "retrain_steps")},
        **{k: INT(1) for k in ("batch_size", "n_steps", "ig_steps", "val_crops", "test_crops", "os_steps", "seeds")},
        "internal_batch_size": OPT_INT(1), **{k: POS() for k in ("lr", "target_lr", "retrain_lr")},
        "patch_size": INT(8) + [49], "crop": INT(2) + [65],         # odd sizes cannot be halved (x2 SR)
        "fractions": [(), (0.0,), (1.5,), (NAN,), "0.1", None], "lambdas": [(), (NAN,), (INF,), "1", None],
        "os_fraction": SHARE(), "gate_margin": NONNEG(), "gate_action": CHOICE(), "val_every": INT(0),
        "retrain_data": CHOICE()}),
    ("LinearGaussianVariable('X')", ca.LinearGaussianVariable("X", ("C",), (1.0,)), {
        "coefs": [(NAN,), (INF,), ("a",), "1"], "intercept": FINITE(), "sd": NONNEG()}),
    ("variable 'X'", ca.DiscreteVariable("X", (0, 1), [0.5, 0.5]), {
        "cpt": [[NAN, 1.0], [INF, 0.0], [-0.5, 1.5], [0.3, 0.3], [[0.5, 0.5]], "ab"],
        "states": [(), (0, 0)]}),
    ("Task", pr.tasks(["denoise"])[0], {"name": ["", None, 3], "train": [None, 3],
                                        "test": [{}, None, {"x": 3}], "val": [{}, None, {"x": 3}]}),
]

#: fields a spec may leave out: set by the code, not by the user (init=False), or plain labels
EXEMPT = {("ConfoundedERM", "name"), ("BackdoorERM", "name"), ("DiscreteVariable", "name"),
          ("DiscreteVariable", "parents"), ("LinearGaussianVariable", "name"), ("LinearGaussianVariable", "parents")}
#: BackbonesProfile inherits DILProfile's fields (tested there)
INHERITED = {"BackbonesProfile": dil.DILProfile}


def _cases():
    for owner, base, fields in SPECS:
        for name, bads in fields.items():
            for bad in bads:
                yield pytest.param(owner, base, name, bad, id=f"{type(base).__name__}.{name}={bad!r}"[:90])


def _shown(bad):
    """The part of a bad value an error must show: the value, or for a sequence its first offending entry."""
    if isinstance(bad, float) and math.isnan(bad):
        return "nan"
    return repr(bad)


@pytest.mark.parametrize("owner,base,name,bad", list(_cases()))
def test_every_config_field_rejects_bad_values_naming_field_and_value(owner, base, name, bad):
    with pytest.raises((ValueError, TypeError)) as e:
        dataclasses.replace(base, **{name: bad})
    msg = str(e.value)
    assert name in msg, msg
    if isinstance(bad, (bool, int, float, str)) or bad is None:
        assert _shown(bad) in msg, msg
    assert "expected" in msg or "must" in msg, msg     # what was expected


def test_every_field_has_bad_value_cases():
    """A new field without a case here fails: the same standard for every field."""
    for _, base, fields in SPECS:
        cls = type(base)
        inherited = {f.name for f in dataclasses.fields(INHERITED[cls.__name__])} if cls.__name__ in INHERITED else set()
        names = {f.name for f in dataclasses.fields(cls) if f.init} - inherited
        missing = sorted(n for n in names - set(fields) if (cls.__name__, n) not in EXEMPT)
        assert not missing, f"{cls.__name__}: no bad-value case for {missing}"


def test_every_default_and_every_profile_validates():
    for _, base, _ in SPECS:
        assert dataclasses.replace(base) == base or isinstance(base, (ca.DiscreteVariable,))
    for mod in (rl_restore, path_restore, backdoor_toy, dil, adms_rbn, dni_denoise, erm_denoise, faig_srresnet):
        for attr in dir(mod):
            if attr.startswith("PROFILES"):
                for p in getattr(mod, attr).values():
                    dataclasses.replace(p)          # runs __post_init__ again
    for cls in (rl.AgentConfig, rl.DQNConfig, rl.FQIConfig, tc.ToolboxConfig, tc.ToolTrainConfig, pr.MultiPathConfig,
                pr.TrainRecipe, bd.ConfoundedERM, bd.BackdoorERM, backdoor_toy.ToyRecipe, dil.DILProfile,
                adms_rbn.ADMSConfig, dni_denoise.DNIConfig, erm_denoise.RestorationRecipe, faig_srresnet.FAIGConfig):
        cls()
    pr.tasks()


# ------------------------------------------------------------------------------------- image arguments
torch.manual_seed(0)
BOX = tc.Toolbox(tc.ToolboxConfig(small=(4, 4), large=(4, 4))).eval()
AGENT = rl.ToolAgent(rl.AgentConfig(4, 4, 8, 8)).eval()
NET = pr.PathRestore(pr.MultiPathConfig(nf=4, num_blocks=2, global_skip=True)).eval()
G = torch.Generator().manual_seed(0)
P16 = torch.rand(4, 3, 16, 16, generator=G)          # RL patches
P24 = torch.rand(2, 3, 24, 24, generator=G)          # distortion inputs (>= 11 px for the 21x21 blur)
IMG = torch.rand(3, 70, 70, generator=G)             # one whole image (>= the 63x63 patch)
PARAMS = tc.sample_mixed_params(2, "mild", torch.Generator().manual_seed(1))
CACHE = rl.ChainCache(BOX, P16, P16)
DQN = rl.DQNConfig(updates=1, batch_episodes=2, collect_episodes=2, replay=8, learn_start=2, val_every=0)
G2 = torch.Generator().manual_seed(2)

#: name -> (call(x), a valid x, the text the error must contain, kinds of bad input that apply, min side)
#: kinds: type dims dtype range nan channels empty small
ALL = ("type", "dims", "dtype", "range", "nan", "channels", "empty", "small")
NO_EMPTY = tuple(k for k in ALL if k != "empty")
FUNCS = {
    "blur": (lambda x: tc.blur(x, torch.ones(len(x))), P24, "blur images", ALL, tc.MIN_BLUR_SIDE),
    "add_noise": (lambda x: tc.add_noise(x, torch.ones(len(x))), P24, "add_noise images", ALL, 1),
    "jpeg": (lambda x: tc.jpeg(x, torch.full((len(x),), 50.0)), P24, "jpeg images", ALL, 1),
    "apply_mixed": (lambda x: tc.apply_mixed(x, tc.sample_mixed_params(len(x), "mild")), P24, "apply_mixed input",
                    ALL, tc.MIN_BLUR_SIDE),
    "MixedDistortion": (lambda x: tc.MixedDistortion("mild")(x), P24, "mixed", ALL, tc.MIN_BLUR_SIDE),
    "tool_distortion": (lambda x: tc.tool_distortion(tc.TOOL_SPECS[0], x, G2), P24, "tool_distortion images", ALL,
                        tc.MIN_BLUR_SIDE),
    "Toolbox.apply": (lambda x: BOX.apply(0, x), P16, "Toolbox.apply images", NO_EMPTY, 1),
    "patch_psnr x": (lambda x: tc.patch_psnr(x, x.clone() if isinstance(x, torch.Tensor) else P16), P16, "patch_psnr x",
                     ("type", "dims", "dtype", "range", "nan"), 1),
    "patch_psnr y": (lambda y: tc.patch_psnr(P16, y), P16, "patch_psnr y", ("type", "dims", "dtype", "range", "nan"),
                     1),
    "fit_paired clean": (lambda x: tc.fit_paired(BOX.tools[0], x, P16, tc.ToolTrainConfig(steps=1), 0), P16,
                         "fit_paired clean", ALL, 1),
    "fit_paired dist": (lambda x: tc.fit_paired(BOX.tools[0], P16, x, tc.ToolTrainConfig(steps=1), 0), P16,
                        "fit_paired dist", ALL, 1),
    "ToolchainEnv clean": (lambda x: tc.ToolchainEnv(BOX, x, P16), P16, "clean patches", ALL, 1),
    "ToolchainEnv distorted": (lambda x: tc.ToolchainEnv(BOX, P16, x), P16, "distorted patches", ALL, 1),
    "ToolAgent": (lambda x: AGENT(x, torch.zeros(len(x), tc.N_TOOLS)), P16, "ToolAgent",
                  ("type", "dtype", "channels", "empty", "small"), 1),
    "ChainCache clean": (lambda x: rl.ChainCache(BOX, x, P16), P16, "ChainCache clean", ALL, 1),
    "ChainCache distorted": (lambda x: rl.ChainCache(BOX, P16, x), P16, "ChainCache distorted", ALL, 1),
    "rollout x0": (lambda x: rl.rollout(AGENT, x, None, rl.apply_advance(BOX)), P16, "rollout x0", ALL, 1),
    "rollout gt": (lambda x: rl.rollout(AGENT, P16, x, rl.apply_advance(BOX)), P16, "rollout gt",
                   ("type", "dims", "dtype", "range", "nan", "channels", "empty", "small"), 1),
    "greedy_chains": (lambda x: rl.greedy_chains(AGENT, BOX, x), P16, "greedy_chains patches", ALL, 1),
    "greedy_chains gt": (lambda x: rl.greedy_chains(AGENT, BOX, P16, x), P16, "greedy_chains", ALL, 1),
    "random_chains": (lambda x: rl.random_chains(BOX, x, None, G2), P16, "rollout x0", ALL, 1),
    "oracle_chains": (lambda x: rl.oracle_chains(BOX, x, P16, 1), P16, "oracle_chains", ALL, 1),
    "oracle_chains gt": (lambda x: rl.oracle_chains(BOX, P16, x, 1), P16, "oracle_chains", ALL, 1),
    "best_single_tool": (lambda x: rl.best_single_tool(BOX, x, P16), P16, "best_single_tool", ALL, 1),
    "best_single_tool gt": (lambda x: rl.best_single_tool(BOX, P16, x), P16, "best_single_tool", ALL, 1),
    "train_dqn clean": (lambda x: rl.train_dqn(AGENT, BOX, x, P16, DQN), P16, "train_dqn clean", ALL, 1),
    "train_dqn distorted": (lambda x: rl.train_dqn(AGENT, BOX, P16, x, DQN), P16, "train_dqn distorted", ALL, 1),
    "train_dqn val": (lambda x: rl.train_dqn(AGENT, BOX, P16, P16, DQN, val=(P16, x)), P16, "train_dqn val", ALL,
                      1),
    "joint_finetune": (lambda x: rl.joint_finetune(AGENT, BOX, x, P16, 1), P16, "joint_finetune clean", ALL, 1),
    "image_patches": (lambda x: rl.image_patches(x), IMG, "image_patches", ("type", "dims", "small"), tc.PATCH),
    "restore_image": (lambda x: rl.restore_image(AGENT, BOX, x), IMG, "restore_image image",
                      ("type", "dims", "dtype", "range", "nan", "channels", "small"), tc.PATCH),
    "chain_step_images": (lambda x: rl.chain_step_images(AGENT, BOX, x), P16[0], "chain_step_images x",
                          ("type", "dims", "dtype", "range", "nan", "channels", "small"), 1),
    "PathRestore.rollout": (lambda x: NET.rollout(x), P16, "PathRestore.rollout x", ("type", "dims", "dtype", "nan", "channels", "small"),
                            1),
    "PathRestore.forward": (lambda x: NET(x), P16, "PathRestore.rollout x", ("type", "dims", "dtype", "nan", "channels", "small"), 1),
    "FixedPaths": (lambda x: pr.FixedPaths(NET, 1)(x), P16, "PathRestore.rollout x", ("type", "dims", "dtype", "nan", "channels",
                                                                  "small"), 1),
    "restore_by_regions": (lambda x: pr.restore_by_regions(NET, x), P16[:1], "restore_by_regions x",
                           ("type", "dims", "dtype", "range", "nan", "channels", "small", "batch"), 1),
    "extract_regions": (lambda x: pr.extract_regions(x), P16[:1], "extract_regions",
                        ("type", "small", "batch"), 1),
    "per_sample_mse": (lambda x: pr.per_sample_mse(x, P16), P16, "per_sample_mse", ("type", "dims", "small"), 1),
    "brightness": (lambda x: bd.brightness(x), P16, "brightness", ("type", "dims", "dtype", "range", "nan", "small"),
                   1),
    "tied_strata": (lambda x: bd.tied_strata(x, 0.5), P16, "brightness", ("type", "dims", "dtype", "range", "nan",
                                                                         "small"), 1),
    "apply_strata": (lambda x: bd.apply_strata(x, (GaussianNoise(5.0),), torch.zeros(4, dtype=torch.long)), P16,
                     "apply_strata clean", ("type", "dims", "dtype", "range", "nan", "channels"), 1),
}


def _bad(kind, x, min_side):
    if kind == "type":
        return x.numpy()
    if kind == "dims":
        return x[0]
    if kind == "dtype":
        return (x * 255).to(torch.uint8)
    if kind == "range":
        return x * 4 + 1
    if kind == "nan":
        y = x.clone()
        y.view(-1)[0] = NAN
        return y
    if kind == "channels":
        return x[..., :1, :, :]
    if kind == "empty":
        return x[:0]
    if kind == "small":
        return x[..., : min_side - 1, : min_side - 1]
    if kind == "batch":                 # two images where one is expected
        return torch.cat([x, x])
    raise AssertionError(kind)


def _image_cases():
    for name, (_, _, _, kinds, _) in FUNCS.items():
        for kind in kinds:
            yield pytest.param(name, kind, id=f"{name}-{kind}")


@pytest.mark.parametrize("name,kind", list(_image_cases()))
def test_every_image_function_rejects_bad_images_with_a_causalir_error(name, kind):
    call, x, tag, _, side = FUNCS[name]
    with pytest.raises((ValueError, TypeError)) as e:
        call(_bad(kind, x, side))
    assert tag in str(e.value), str(e.value)           # names the argument: not a torch / numpy / PIL message


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_every_image_function_accepts_its_valid_input(name):
    call, x, *_ = FUNCS[name]
    call(x)


@pytest.mark.parametrize("call,tag", [
    (lambda: tc.make_patches([], 2, "mild", 0), "make_patches images"),
    (lambda: tc.make_patches([IMG[:, :40, :40]], 2, "mild", 0), "83x83"),          # patch + blur context
    (lambda: tc.make_patches([IMG[0]], 2, "mild", 0), "make_patches images[0]"),
    (lambda: tc.make_patches(IMG, 2, "mild", 0), "make_patches images"),          # one image, not a list
    (lambda: tc.paired_set([IMG[:, :30, :30]], "mild", 2, 16, 0), "36x36"),
    (lambda: tc.paired_set([], tc.TOOL_SPECS[0], 2, 16, 0), "paired_set images"),
    (lambda: tc.train_toolbox(BOX, [IMG[:, :30, :30]], tc.ToolTrainConfig(patch_size=16)), "train_toolbox images"),
    (lambda: bd.brightness_threshold([IMG[:, :8, :8]], 16), "brightness_threshold images[0]"),
    (lambda: bd.brightness_threshold([], 16), "brightness_threshold images"),
    (lambda: bd.brightness_threshold([IMG * 3], 16), "brightness_threshold images[0]"),
    (lambda: pr.evaluate_regions({"n": NET}, [], {}, 0, torch.device("cpu")), "evaluate_regions images"),
    (lambda: pr.evaluate_regions({"n": NET}, [IMG[None]], {}, 0, torch.device("cpu")), "evaluate_regions images[0]"),
    (lambda: pr.evaluate_regions({"n": NET}, [IMG * 3], {}, 0, torch.device("cpu")), "evaluate_regions images[0]"),
    (lambda: pr.merge_regions(torch.rand(2, 3, 4, 4), [(0, 0)], (4, 4)), "2 regions but 1 positions"),
    (lambda: pr.merge_regions(torch.rand(1, 3, 4, 4), [(2, 2)], (4, 4)), "does not fit"),
    (lambda: tc.apply_mixed(P24, {"blur": torch.ones(2)}), "missing noise, quality"),
    (lambda: tc.apply_mixed(P24, PARAMS, order=("blur", "sharpen")), "sharpen"),
    (lambda: tc.apply_mixed(P24, tc.sample_mixed_params(3, "mild")), "blur sigma"),
    (lambda: tc.jpeg(P24, torch.tensor([50.0])), "jpeg quality"),
    (lambda: tc.jpeg(P24, torch.tensor([50.0, 150.0])), "jpeg quality"),
    (lambda: tc.add_noise(P24, torch.tensor([NAN, 1.0])), "add_noise sigma"),
    (lambda: tc.blur(P24, torch.tensor([-1.0, 1.0])), "blur sigma"),
    (lambda: tc.blur(P24, 2.0), "blur sigma"),
    (lambda: rl.rollout(AGENT, P16, P16[:2], rl.apply_advance(BOX)), "rollout gt"),
    (lambda: rl.oracle_chains(BOX, P16, None), "oracle_chains gt"),
    (lambda: rl.joint_finetune(AGENT, BOX, P16, P16[:2], 1), "joint_finetune distorted"),
    (lambda: rl.ChainCache(BOX, P16, P16[:2]), "ChainCache distorted"),
    (lambda: rl.restore_image(AGENT, BOX, torch.stack([IMG, IMG])), "restore_image image"),
    (lambda: rl.chain_step_images(AGENT, BOX, P16), "chain_step_images x"),
    (lambda: tc.fit_paired(BOX.tools[0], P16, P16[:2], tc.ToolTrainConfig(steps=1), 0), "fit_paired dist"),
    (lambda: tc.ToolchainEnv(BOX, P16, P16[:2]), "must match"),
    (lambda: bd.apply_strata(P16, (GaussianNoise(5.0),), torch.zeros(4)), "apply_strata idx"),
    (lambda: bd.apply_strata(P16, (), torch.zeros(4, dtype=torch.long)), "apply_strata strata"),
    (lambda: BOX.apply(torch.tensor([0.5]), P16[:1]), "Toolbox.apply"),
    (lambda: pr.apply_paths(NET.blocks[0].paths, torch.rand(2, 4, 8, 8), torch.tensor([0.0, 1.0])), "apply_paths"),
    (lambda: NET.rollout(P16, "fixed", actions=torch.zeros(4, 2)), "PathRestore.rollout actions"),
    (lambda: pr.region_flops(NET.cfg, torch.full((1, 2), 7)), "region_flops actions"),
    (lambda: rl.tool_shares(torch.zeros(2, 3)), "tool_shares actions"),
    (lambda: rl.chain_macs(torch.full((2, 3), 14), [1] * 12), "chain_macs actions"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_other_bad_shapes_and_image_lists(call, tag):
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert tag in str(e.value), str(e.value)


# --------------------------------------------------------------------------------- numeric arguments
ALLOW_NONE = {"oracle_chains.beam"}
ANY_SIGN = {"linear_gaussian_confounded.a", "LinearGaussianSCM.sample.do['X']", "do['X']", "given['X']"}


@pytest.mark.parametrize("call,field", [
    (lambda v: tc.sample_mixed_params(v, "mild"), "sample_mixed_params.n"),
    (lambda v: tc.make_patches([IMG], v, "mild", 0), "make_patches.n"),
    (lambda v: tc.make_patches([IMG], 2, "mild", 0, patch=v), "make_patches.patch"),
    (lambda v: tc.paired_set([IMG], "mild", v, 16, 0), "paired_set.n"),
    (lambda v: tc.paired_set([IMG], "mild", 2, v, 0), "paired_set.patch"),
    (lambda v: tc.tool_distortion(tc.TOOL_SPECS[0], P24, G2, v), "tool_distortion.extra"),
    (lambda v: BOX(P16, v), "Toolbox.forward.tool"),
    (lambda v: BOX.macs(v), "Toolbox.macs.patch"),
    (lambda v: tc.ToolchainEnv(BOX, P16, P16, max_steps=v), "ToolchainEnv.max_steps"),
    (lambda v: tc.ToolchainEnv(BOX, P16, P16, n_default=v), "ToolchainEnv.n_default"),
    (lambda v: tc.ToolchainEnv(BOX, P16, P16, end_on_drop=v), "ToolchainEnv.end_on_drop"),
    (lambda v: rl.rollout(AGENT, P16, None, rl.apply_advance(BOX), eps=v), "rollout.eps"),
    (lambda v: rl.rollout(AGENT, P16, None, rl.apply_advance(BOX), max_steps=v), "rollout.max_steps"),
    (lambda v: rl.greedy_chains(AGENT, BOX, P16, batch=v), "greedy_chains.batch"),
    (lambda v: rl.greedy_chains(AGENT, BOX, P16, max_steps=v), "greedy_chains.max_steps"),
    (lambda v: rl.random_chains(BOX, P16, None, G2, v), "random_chains.length"),
    (lambda v: rl.oracle_chains(BOX, P16, P16, 1, beam=v), "oracle_chains.beam"),
    (lambda v: rl.oracle_chains(BOX, P16, P16, v), "oracle_chains.max_steps"),
    (lambda v: rl.EpisodeReplay(v, 3, (3, 16, 16)), "EpisodeReplay.capacity"),
    (lambda v: rl.EpisodeReplay(4, v, (3, 16, 16)), "EpisodeReplay.max_steps"),
    (lambda v: rl.EpisodeReplay(4, 3, (3, v, 16)), "EpisodeReplay.shape[1]"),
    (lambda v: rl.EpisodeReplay(4, 3, (3, 16, 16)).sample(v), "EpisodeReplay.sample.n"),
    (lambda v: rl.ChainCache(BOX, P16, P16, v), "ChainCache.cap"),
    (lambda v: rl.epsilon(DQN, v), "epsilon.update"),
    (lambda v: rl.evaluate_policy(AGENT, CACHE, v), "evaluate_policy.max_steps"),
    (lambda v: rl.joint_finetune(AGENT, BOX, P16, P16, v), "joint_finetune.steps"),
    (lambda v: rl.joint_finetune(AGENT, BOX, P16, P16, 1, batch=v), "joint_finetune.batch"),
    (lambda v: rl.joint_finetune(AGENT, BOX, P16, P16, 1, lr=v), "joint_finetune.lr"),
    (lambda v: rl.image_patches(IMG, v), "image_patches.patch"),
    (lambda v: rl.restore_image(AGENT, BOX, IMG, max_steps=v), "restore_image.max_steps"),
    (lambda v: rl.chain_macs(torch.zeros(1, 3, dtype=torch.long), [1] * 12, v), "chain_macs.decision_macs"),
    (lambda v: rl.dqn_loss(AGENT, AGENT, {}, gamma=v), "dqn_loss.gamma"),
    (lambda v: rl.dqn_loss(AGENT, AGENT, {}, delta=v), "dqn_loss.delta"),
    (lambda v: NET.rollout(P16, "sample", temperature=v), "PathRestore.rollout.temperature"),
    (lambda v: pr.conv_flops(3, 4, 3, v, 8), "conv_flops.h"),
    (lambda v: pr.flop_table(NET.cfg, v, 63), "flop_table.h"),
    (lambda v: pr.region_starts(v), "region_starts"),
    (lambda v: pr.extract_regions(P16[:1], v), "extract_regions.region"),
    (lambda v: pr.restore_by_regions(NET, P16[:1], batch=v), "restore_by_regions.batch"),
    (lambda v: pr.difficulty_rewards(torch.zeros(2, 2, dtype=torch.long), torch.ones(2), torch.ones(2), v, 0.01,
                                     (0, 1)), "difficulty_rewards.p"),
    (lambda v: pr.difficulty_rewards(torch.zeros(2, 2, dtype=torch.long), torch.ones(2), torch.ones(2), 0.1, v,
                                     (0, 1)), "difficulty_rewards.l0"),
    (lambda v: pr.returns_to_go(torch.zeros(2, 2), v), "returns_to_go.gamma"),
    (lambda v: pr.reinforce_loss(torch.zeros(2, 2), torch.zeros(2, 2), entropy_coef=v), "reinforce_loss.entropy_coef"),
    (lambda v: pr.FixedPaths(NET, v), "FixedPaths.path"),
    (lambda v: pr.train_dncnn(nn.Conv2d(3, 3, 1), None, None, v, 1e-3, G2), "train_dncnn.steps"),
    (lambda v: bd.tied_strata(P16, v), "tied_strata.threshold"),
    (lambda v: bd.tied_strata(P16, 0.5, v), "tied_strata.tie"),
    (lambda v: bd.independent_strata(v, (0.5, 0.5)), "independent_strata.n"),
    (lambda v: bd.independent_strata(4, (v, 0.5)), "independent_strata.probs[0]"),
    (lambda v: bd.brightness_threshold([IMG], v), "brightness_threshold.patch_size"),
    (lambda v: bd.brightness_threshold([IMG], 8, n=v), "brightness_threshold.n"),
    (lambda v: ca.confounded_discrete(v), "confounded_discrete.strength"),
    (lambda v: ca.confounding_gap(0.5, n=v), "confounding_gap.n"),
    (lambda v: ca.linear_gaussian_confounded(a=v), "linear_gaussian_confounded.a"),
    (lambda v: ca.confounded_discrete().sample(v), "DiscreteSCM.sample.n"),
    (lambda v: ca.linear_gaussian_confounded().sample(v), "LinearGaussianSCM.sample.n"),
    (lambda v: ca.linear_gaussian_confounded().sample(3, do={"X": v}), "LinearGaussianSCM.sample.do['X']"),
    (lambda v: ca.linear_gaussian_confounded().exact_mean("Y", do={"X": v}), "do['X']"),
    (lambda v: ca.linear_gaussian_confounded().exact_mean("Y", given={"X": v}), "given['X']"),
    (lambda v: ca.backdoor_effect(ca.confounded_discrete().sample(50, 0), "X", "Y", "C", 1, max_levels=v),
     "backdoor_effect.max_levels"),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("bad", [-1, NAN, "2", None], ids=["negative", "nan", "str", "none"])
def test_numeric_arguments_name_argument_and_value(call, field, bad):
    if bad is None and field in ALLOW_NONE or bad == -1 and field in ANY_SIGN:
        call(bad)                       # valid there (beam=None: exhaustive search; a negative coefficient)
        return
    with pytest.raises((ValueError, TypeError)) as e:
        call(bad)
    msg = str(e.value)
    assert field in msg, msg
    assert _shown(bad) in msg or str(bad) in msg, msg


def test_cpt_and_samples_are_checked():
    with pytest.raises(ValueError, match="finite"):
        ca.backdoor_effect({"X": np.array([1, 1, 0]), "Y": np.array([NAN, 1.0, 0.0]), "C": np.zeros(3)}, "X", "Y",
                           "C", 1)
    with pytest.raises(ValueError, match="column 'Z'.*finite"):
        ca.backdoor_effect({"X": np.r_[1.0, 2, 3, 4], "Y": np.ones(4), "Z": np.r_[0.5, NAN, 1, 2]}, "X", "Y", "Z",
                           1.0, method="regression")
    with pytest.raises(ValueError, match="no rows"):
        ca.backdoor_effect({"X": np.array([]), "Y": np.array([]), "C": np.array([])}, "X", "Y", "C", 1)
    with pytest.raises(ValueError, match="backdoor_effect.method"):
        ca.backdoor_effect({"X": np.ones(3), "Y": np.ones(3)}, "X", "Y", (), 1, method="ols")
    with pytest.raises(ValueError, match="numeric"):
        ca.backdoor_effect({"X": np.array(["a", "b", "a"]), "Y": np.ones(3)}, "X", "Y", (), "a",
                           method="regression")


# ----------------------------------------------------------------------------------- the environment
@pytest.fixture
def env():
    e = tc.ToolchainEnv(BOX, P16, P16.clone())
    e.reset(seed=0)
    return e


@pytest.mark.parametrize("action", [-1, 13, 1.5, True, np.bool_(False), "1", None, np.array([1]), [1]])
def test_env_step_rejects_invalid_actions(env, action):
    with pytest.raises(ValueError, match="ToolchainEnv.step: expected an action in 0..12"):
        env.step(action)


@pytest.mark.parametrize("options,err", [
    ({"index": 4}, IndexError), ({"index": -1}, IndexError), ({"index": 1.5}, ValueError),
    ({"index": "a"}, TypeError), ({"index": True}, ValueError), ({"idx": 0}, ValueError), ([("index", 0)], TypeError),
])
def test_env_reset_rejects_invalid_options(env, options, err):
    with pytest.raises(err, match="index|options"):
        env.reset(options=options)


def test_env_valid_reset_and_step_still_work(env):
    obs, info = env.reset(options={"index": np.int64(2)})
    assert info["index"] == 2
    _, r, term, _, _ = env.step(np.int64(tc.STOP))
    assert term and r == 0.0


def test_replay_and_dqn_batch_errors():
    rep = rl.EpisodeReplay(2, 3, (3, 16, 16))
    with pytest.raises(ValueError, match="replay is empty"):
        rep.sample(1)
    ep = rl.rollout(AGENT, P16, P16, rl.apply_advance(BOX))
    with pytest.raises(ValueError, match="exceed the capacity"):
        rep.add(ep)
    with pytest.raises(ValueError, match="do not fit"):
        rl.EpisodeReplay(8, 2, (3, 16, 16)).add(ep)
    with pytest.raises(ValueError, match="dqn_loss batch: missing"):
        rl.dqn_loss(AGENT, AGENT, {"obs": torch.zeros(1)})
    with pytest.raises(ValueError, match="rollout: unknown policy"):
        rl.rollout(AGENT, P16, None, rl.apply_advance(BOX), policy="greedy")
    with pytest.raises(TypeError, match="needs an agent"):
        rl.rollout(None, P16, None, rl.apply_advance(BOX))
