"""Issue 15, defects 5 and 9, for the core model / distortion / evaluation code and the DIL, attribution, ADMS and
DNI methods: every config field and builder argument rejects an out-of-range value with a message naming the field
and the value; every public function taking images rejects a wrong type / dtype / shape / channel count / range,
non-finite values, empty batches, zero-size images and images smaller than a kernel, window or patch, and the
error is raised by causalir itself (the innermost frame of the traceback is in causalir/, never in torch, kornia,
numpy or captum). The boundary of every size check is the size torch would accept: one pixel more works."""
from __future__ import annotations

import math
import os

import pytest
import torch

from causalir import adms as ADM
from causalir import attribution as A
from causalir import dil, evaluate, models, train
from causalir import distortions as D
from causalir import interpolate as I

NAN = float("nan")
PKG = os.path.dirname(os.path.abspath(D.__file__))


def _raised_in_causalir(excinfo) -> bool:
    tb = excinfo.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PKG)


def _expect_clear_error(thunk, *needles):
    with pytest.raises((ValueError, TypeError, KeyError)) as ei:
        thunk()
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert _raised_in_causalir(ei), f"raised outside causalir: {ei.traceback[-1]}"
    return msg


# ------------------------------------------------------------------------------------------- fixtures
torch.manual_seed(0)
SR_T = models.build("srresnet", nf=4, nb=1).eval()
SR_B = models.build("srresnet", nf=4, nb=1).eval()
DN = models.build("dncnn", nf=4, depth=3).eval()
SWIN = models.build("swinir", dim=8, depths=(1,), heads=2, window=8).eval()
DN_MASKS = {d: A.select_top({n: torch.rand(p.shape[:2]) for n, p in DN.named_parameters() if p.dim() == 4}, 0.2)
            for d in ("rain", "blur")}
ADMS_NET = ADM.build_adms(DN, {"rain": DN, "blur": DN}, DN_MASKS, clf_nf=4)
NOISE = D.GaussianNoise(10.0)


# --------------------------------------------------------------------------- defect 5: config fields
def _field_cases():
    c = []  # (id, thunk, field named in the message, repr of the bad value or None)

    def add(id_, thunk, field, bad=None):
        c.append(pytest.param(thunk, field, bad, id=id_))

    # models: every size of every backbone
    model_bad = {
        "dncnn": [("in_ch", 0), ("nf", 0), ("nf", -1), ("nf", 2.5), ("depth", 1), ("depth", 0), ("depth", -3),
                  ("residual", "yes")],
        "rrdb": [("in_ch", 0), ("nf", 0), ("nb", -1), ("nb", 0), ("gc", 0), ("nf", True), ("gc", NAN)],
        "srresnet": [("in_ch", -2), ("nf", 0), ("nb", 0), ("nb", -1), ("scale", 3), ("scale", 2.0)],
        "swinir": [("in_ch", 0), ("dim", 0), ("heads", 0), ("window", 0), ("window", -8), ("heads", 3),
                   ("dim", -16)],
    }
    for name, items in model_bad.items():
        for f, v in items:
            add(f"models.{name}.{f}={v!r}", lambda name=name, f=f, v=v: models.build(name, preset="tiny", **{f: v}),
                f"{name}.{f}", repr(v))
    add("models.swinir.depths=()", lambda: models.build("swinir", preset="tiny", depths=()), "swinir.depths", "()")
    add("models.swinir.depths=2", lambda: models.build("swinir", preset="tiny", depths=2), "swinir.depths", "2")
    add("models.swinir.depths[1]=0", lambda: models.build("swinir", preset="tiny", depths=(2, 0)),
        "swinir.depths[1]", "0")
    add("models.unknown_field", lambda: models.build("rrdb", blocks=3), "blocks")
    add("models.count_flops.input_shape", lambda: models.count_flops(DN, (1, 3, 0, 4)), "count_flops.input_shape[2]",
        "0")

    # distortions: every parameter of every registered distortion
    dist_bad = {
        "gaussian_noise": [("sigma", -1, "sigma"), ("sigma", 300, "sigma"), ("sigma", NAN, "sigma"),
                           ("sigma", "a", "sigma"), ("sigma", True, "sigma"), ("sigma", (30, 10), "sigma"),
                           ("sigma", (1, 2, 3), "sigma"), ("sigma", (-1, 5), "sigma[0]"), ("clip", "x", "clip")],
        "spatial_noise": [("sigma_map", "x", "sigma_map"), ("sigma_min", -1, "sigma_min"),
                          ("sigma_max", 300, "sigma_max")],
        "gaussian_blur": [("sigma", -1, "sigma"), ("sigma", NAN, "sigma"), ("sigma_y", -1, "sigma_y"),
                          ("theta", 10, "theta"), ("kernel_size", 4, "kernel_size"), ("kernel_size", 1, "kernel_size"),
                          ("kernel_size", 2.5, "kernel_size"), ("kernel_size", -21, "kernel_size")],
        "jpeg": [("quality", 0, "quality"), ("quality", 101, "quality"), ("quality", (50, 10), "quality")],
        "downsample": [("scale", 0.5, "scale"), ("scale", 17, "scale"), ("mode", "nearest", "mode"),
                       ("antialias", "y", "antialias"), ("keep_size", 2, "keep_size")],
        "rain": [("density", 2, "density"), ("length", 0, "length"), ("angle", 100, "angle"),
                 ("intensity", -1, "intensity")],
        "snow": [("density", -1, "density"), ("length", 10, "length"), ("angle", -91, "angle"),
                 ("intensity", 1.5, "intensity"), ("size", 2, "size"), ("size", 0, "size")],
        "haze": [("beta", -1, "beta"), ("beta", 11, "beta"), ("airlight", 2, "airlight")],
    }
    for name, items in dist_bad.items():
        for f, v, fld in items:
            add(f"distortions.{name}.{f}={v!r}", lambda name=name, f=f, v=v: D.build(name, **{f: v}),
                f"{name}.{fld}", None if isinstance(v, tuple) else repr(v))
    add("distortions.downsample.range_needs_keep_size",
        lambda: D.Downsample(scale=(1.5, 3.0), keep_size=False), "downsample.keep_size")
    add("distortions.compose.parts=()", lambda: D.Compose(()), "compose.parts")
    add("distortions.compose.parts[1]", lambda: D.compose([NOISE, 3]), "compose.parts[1]")
    add("distortions.with_degree", lambda: D.with_degree("jpeg", 100), "jpeg.degree (quality)", "100")
    add("distortions.with_degree.nan", lambda: D.with_degree("gaussian_noise", NAN), "degree", "nan")
    add("distortions.preview.seed", lambda: D.preview(torch.rand(3, 8, 8), "gaussian_noise", 10, seed=1.5),
        "preview.seed", "1.5")
    add("distortions.gaussian_kernels.size", lambda: D.gaussian_kernels(*[torch.ones(1)] * 3, 0),
        "gaussian_kernels.size", "0")
    add("distortions.line_kernels.size", lambda: D.line_kernels(torch.ones(1), torch.ones(1), -3),
        "line_kernels.size", "-3")
    add("distortions.DistortionSet.seen", lambda: D.DistortionSet("x", seen=(NOISE, "blur")), "DistortionSet.seen[1]")

    # evaluate
    img = [torch.rand(3, 16, 16)]
    levels = {"n": NOISE}
    add("evaluate.crop_border=-1", lambda: evaluate.evaluate({}, img, levels, crop_border=-1, device="cpu"),
        "evaluate.crop_border", "-1")
    add("evaluate.crop_border=8", lambda: evaluate.evaluate({}, img, levels, crop_border=8, device="cpu"),
        "evaluate.crop_border", "8")
    add("evaluate.seed=1.5", lambda: evaluate.evaluate({}, img, levels, seed=1.5, device="cpu"), "evaluate.seed",
        "1.5")
    add("evaluate.include_input", lambda: evaluate.evaluate({}, img, levels, include_input="y", device="cpu"),
        "evaluate.include_input", "'y'")
    add("evaluate.models[m]", lambda: evaluate.evaluate({"m": 3}, img, levels, device="cpu"), "models['m']")
    add("evaluate.model_named_input", lambda: evaluate.evaluate({"input": DN}, img, levels, device="cpu"), "'input'")
    add("evaluate.distortions={}", lambda: evaluate.evaluate({}, img, {}, device="cpu"), "distortions")
    add("evaluate.distortions[n]", lambda: evaluate.evaluate({}, img, {"n": 1}, device="cpu"), "distortions['n']")
    add("evaluate.distorted_inputs.seed", lambda: evaluate.distorted_inputs(img, levels, seed="0"),
        "distorted_inputs.seed", "'0'")

    # DIL strategies: every field of every variant
    for name in dil.PAPER_VARIANTS:
        for f, v in (("alpha", -1.0), ("alpha", NAN), ("alpha", "x"), ("meta_lr", 0.0), ("meta_lr", -1e-3),
                     ("n_distortions", 0), ("n_distortions", 1.5), ("paired", "y"), ("use_vmap", 2)):
            add(f"dil.{name}.{f}={v!r}", lambda name=name, f=f, v=v: train.build_strategy(name, **{f: v}),
                f"{name}.{f}", repr(v))
    for f, v, fld in (("inner_lr", 0.0, "inner_lr"), ("inner_lr", NAN, "inner_lr"), ("meta_lr", -1.0, "meta_lr"),
                      ("inner_betas", (1.0, 0.9), "inner_betas[0]"), ("meta_betas", (0.9,), "meta_betas"),
                      ("meta_betas", (0.9, -0.1), "meta_betas[1]"), ("n_distortions", 0, "n_distortions"),
                      ("paired", "no", "paired")):
        add(f"dil.dil_sf_reference.{f}={v!r}", lambda f=f, v=v: train.build_strategy("dil_sf_reference", **{f: v}),
            f"dil_sf_reference.{fld}")
    tasks = dil.Tasks(*[torch.rand(2, 1, 3, 4, 4)] * 4, [], [])
    add("dil.meta_gradient.alpha", lambda: dil.meta_gradient(DN, tasks, -0.1, serial=True, second_order=False),
        "meta_gradient.alpha", "-0.1")
    add("dil.meta_gradient.serial", lambda: dil.meta_gradient(DN, tasks, 0.1, serial="y", second_order=False),
        "meta_gradient.serial")
    add("dil.meta_objective.alpha", lambda: dil.meta_objective(DN, tasks, NAN, serial=True), "meta_objective.alpha")
    add("dil.batches_per_step.n_seen", lambda: dil.batches_per_step("dil_pf", 0), "batches_per_step.n_seen", "0")
    add("dil.batches_per_step.n_distortions", lambda: dil.batches_per_step("dil_pf", 4, 0),
        "batches_per_step.n_distortions", "0")

    # attribution: the sr_x2 strategy and SRDegradation fields, every numeric argument
    for f, v, fld in (("p_blur", -0.1, "p_blur"), ("p_noise", 2.0, "p_noise"), ("p_blur", NAN, "p_blur"),
                      ("betas", (0.9, 1.5), "betas[1]"), ("betas", 0.9, "betas"),
                      ("masks", {"conv_first.weight": torch.rand(4, 3)}, "masks['conv_first.weight']")):
        add(f"attribution.sr_x2.{f}", lambda f=f, v=v: train.build_strategy("sr_x2", **{f: v}), f"sr_x2.{fld}")
    for f, v in (("blur_sigma", 0.0), ("blur_sigma", NAN), ("noise_sigma", -0.1), ("blur", "y"), ("noise", 3)):
        add(f"attribution.SRDegradation.{f}={v!r}", lambda f=f, v=v: A.SRDegradation(**{f: v}),
            f"SRDegradation.{f}", repr(v))
    x, y = torch.rand(1, 3, 6, 6), torch.rand(1, 3, 12, 12)
    for f, v in (("n_steps", 0), ("n_steps", 2.5), ("internal_batch_size", 0), ("method", "simpson"),
                 ("kernels_only", "y"), ("vectorize", "y")):
        add(f"attribution.faig.{f}={v!r}", lambda f=f, v=v: A.faig_attributions(SR_T, SR_B, x, y, **{f: v}),
            f"faig.{f}", repr(v))
    add("attribution.faig.loss", lambda: A.faig(SR_T, SR_B, x, y, loss="l3"), "loss", "'l3'")
    add("attribution.faig_reference.n_steps", lambda: A.faig_reference(SR_T, SR_B, x, y, n_steps=0),
        "faig_reference.n_steps", "0")
    add("attribution.faig_reference.references", lambda: A.faig_reference(SR_T, SR_B, x, None), "references")
    add("attribution.ig_kernel_scores.n_steps", lambda: A.ig_kernel_scores(SR_T, x, x, n_steps=0),
        "ig_kernel_scores.n_steps", "0")
    add("attribution.ig_kernel_scores.internal_batch_size",
        lambda: A.ig_kernel_scores(SR_T, x, x, internal_batch_size=-1), "ig_kernel_scores.internal_batch_size", "-1")
    for f, v in (("n_steps", 0), ("method", "simpson"), ("nt_samples", -1), ("nt_stdevs", -0.1),
                 ("internal_batch_size", 0), ("nt_stdevs", NAN)):
        add(f"attribution.integrated_gradients.{f}={v!r}",
            lambda f=f, v=v: A.integrated_gradients(SR_T, x, **{f: v}), f"integrated_gradients.{f}", repr(v))
    add("attribution.integrated_gradients.objective", lambda: A.integrated_gradients(SR_T, x, objective="max"),
        "objective", "'max'")
    add("attribution.integrated_gradients.baseline", lambda: A.integrated_gradients(SR_T, x, baseline="white"),
        "baseline", "'white'")
    for roi, fld in (((-1, 0, 4, 4), "roi.top"), ((0, 0, 0, 4), "roi.height"), ((0, 0, 4, 4.5), "roi.width"),
                     ((0, 0, 4), "roi")):
        add(f"attribution.integrated_gradients.roi={roi}", lambda roi=roi: A.integrated_gradients(SR_T, x, roi=roi),
            fld)
    add("attribution.select_top.fraction", lambda: A.select_top({"a": torch.rand(2, 2)}, 1.5), "select_top.fraction",
        "1.5")
    add("attribution.select_top.fraction_nan", lambda: A.select_top({"a": torch.rand(2, 2)}, NAN),
        "select_top.fraction", "nan")
    add("attribution.select_top.scores_nan", lambda: A.select_top({"a": torch.tensor([[NAN]])}, 0.5), "scores['a']")
    add("attribution.modulate.lam", lambda: A.modulate(SR_T, SR_B, {}, NAN), "modulate.lam", "nan")
    add("attribution.weight_change_scores.eps", lambda: A.weight_change_scores(SR_T, SR_B, eps=0.0),
        "weight_change_scores.eps", "0.0")
    add("attribution.heatmap.percentile", lambda: A.heatmap(torch.rand(3, 4, 4), 101), "heatmap.percentile", "101")
    add("attribution.make_baseline.noise_sigma", lambda: A.make_baseline("gaussian", x, noise_sigma=-1),
        "make_baseline.noise_sigma", "-1")
    add("attribution.make_baseline.blur_sigma", lambda: A.make_baseline("blur", x, blur_sigma=0),
        "make_baseline.blur_sigma", "0")
    add("attribution.make_baseline.name", lambda: A.make_baseline(3, x), "baseline", "3")
    off = torch.zeros(1, dtype=torch.bool)
    for f, v in (("blur_sigma", 0.0), ("noise_sigma", -0.5), ("kernel_size", 4), ("kernel_size", 1)):
        add(f"attribution.degrade.{f}={v!r}", lambda f=f, v=v: A.degrade(y, off, off, **{f: v}), f"degrade.{f}",
            repr(v))
    add("attribution.degrade.blur_flags", lambda: A.degrade(y, torch.zeros(2, dtype=torch.bool), off), "degrade: blur")
    add("attribution.degrade.noise_flags", lambda: A.degrade(y, off, torch.zeros(1)), "degrade: noise")
    for f, v in (("fraction", 2.0), ("n_steps", 0), ("internal_batch_size", 0)):
        add(f"attribution.discriminative_filters.{f}",
            lambda f=f, v=v: A.discriminative_filters(SR_T, SR_B, {"a": x, "b": x}, y, **{f: v}),
            f"discriminative_filters.{f}", repr(v))
    add("attribution.discriminative_filters.method",
        lambda: A.discriminative_filters(SR_T, SR_B, {"a": x}, method="saliency"), "method", "'saliency'")
    add("attribution.discriminative_filters.degraded",
        lambda: A.discriminative_filters(SR_T, SR_B, {}, method="random"), "degraded")
    add("attribution.baseline_gallery.names", lambda: A.baseline_gallery(SR_T, x, ("black", "white")),
        "names[1]", "'white'")
    add("attribution.baseline_gallery.seed", lambda: A.baseline_gallery(SR_T, x, seed=0.5),
        "baseline_gallery.seed", "0.5")
    add("attribution.mask_union.keys", lambda: A.mask_union({"a": torch.ones(1, dtype=torch.bool)},
                                                           {"b": torch.ones(1, dtype=torch.bool)}), "mask_union")
    add("attribution.overlap_score.dtype", lambda: A.overlap_score({"a": torch.ones(2)}, {"a": torch.ones(2)}),
        "filters_d['a']")

    # ADMS: the strategy, the classifier, the model and the builders
    for f, v in (("ce_weight", -1.0), ("ce_weight", NAN), ("warmup_steps", -1), ("warmup_steps", 1.5),
                 ("teacher_forcing", "y"), ("classifier_lr_mult", 0.0)):
        add(f"adms.strategy.{f}={v!r}", lambda f=f, v=v: train.build_strategy("adms", **{f: v}), f"adms.{f}", repr(v))
    for f, v in (("num_classes", 1), ("nf", 0), ("in_ch", 0), ("num_classes", 2.0)):
        kw = {"num_classes": 2, f: v}
        add(f"adms.DegradationClassifier.{f}={v!r}", lambda kw=kw: ADM.DegradationClassifier(**kw),
            f"DegradationClassifier.{f}", repr(v))
    for f, v in (("mode", "add"), ("mixing", "argmax")):
        add(f"adms.ADMS.{f}", lambda f=f, v=v: ADM.ADMS(DN, DN_MASKS, **{f: v}), f"ADMS.{f}", repr(v))
        add(f"adms.build_adms.{f}", lambda f=f, v=v: ADM.build_adms(DN, {"rain": DN, "blur": DN}, DN_MASKS, **{f: v}),
            f"build_adms.{f}", repr(v))
    add("adms.build_adms.clf_nf", lambda: ADM.build_adms(DN, {"rain": DN, "blur": DN}, DN_MASKS, clf_nf=0),
        "build_adms.clf_nf", "0")
    add("adms.build_adms.individuals", lambda: ADM.build_adms(DN, {"rain": DN}, DN_MASKS), "blur")
    add("adms.ADMS.mask_key", lambda: ADM.ADMS(DN, {"a": {"nope.weight": torch.ones(1, 1, dtype=torch.bool)},
                                                   "b": {}}), "nope.weight")
    add("adms.ADMS.mask_values", lambda: ADM.ADMS(DN, {"a": {"body.0.weight": torch.full((4, 3), 0.5)}, "b": {}}),
        "masks['a']['body.0.weight']")
    add("adms.ADMS.c", lambda: ADMS_NET(torch.rand(1, 3, 8, 8), torch.tensor([NAN, 1.0])), "c")
    add("adms.ADMS.c_type", lambda: ADMS_NET(torch.rand(1, 3, 8, 8), [1.0, 0.0]), "c: expected a float tensor")
    add("adms.ADMS.c_shape", lambda: ADMS_NET(torch.rand(2, 3, 8, 8), torch.ones(3)), "c: expected shape (2, 2)")
    add("adms.ADMS.c_dtype", lambda: ADMS_NET(torch.rand(1, 3, 8, 8), torch.tensor([1, 0])), "c: expected a float")
    add("adms.masked_deltas.shape", lambda: ADM.masked_deltas(DN, DN, {"body.0.weight": torch.ones(2, 2, dtype=bool)}),
        "body.0.weight")
    add("adms.mask_share.key", lambda: ADM.mask_share({"body.0.bias": torch.ones(4, dtype=bool)}, DN), "body.0.bias")
    add("adms.mix_coefficients.weights", lambda: ADM.mix_coefficients([1.0, "a"]), "mix_coefficients.weights[1]",
        "'a'")
    add("adms.mix_coefficients.empty", lambda: ADM.mix_coefficients([]), "mix_coefficients")
    add("adms.classifier_accuracy.n", lambda: ADM.classifier_accuracy(ADMS_NET, [torch.rand(3, 16, 16)], {}, 0, 8),
        "classifier_accuracy.n", "0")
    add("adms.classifier_accuracy.patch", lambda: ADM.classifier_accuracy(ADMS_NET, [torch.rand(3, 16, 16)], {}, 1, 0),
        "classifier_accuracy.patch", "0")
    add("adms.classifier_accuracy.seen", lambda: ADM.classifier_accuracy(ADMS_NET, [torch.rand(3, 16, 16)], {}, 1, 8),
        "rain")

    # DNI
    add("interpolate.alpha=nan", lambda: I.interpolate_states(DN, DN, NAN), "interpolate_states.alpha", "nan")
    add("interpolate.alpha=str", lambda: I.interpolate_states(DN, DN, "half"), "interpolate_states.alpha", "'half'")
    add("interpolate.alpha=2", lambda: I.interpolate_states(DN, DN, 2.0), "alpha", "2.0")
    add("interpolate.blend.weights", lambda: I.blend_states([DN, DN], [0.5, NAN]), "blend_states.weights[1]", "nan")
    add("interpolate.blend.atol", lambda: I.blend_states([DN, DN], [0.5, 0.5], atol=-1), "blend_states.atol", "-1")
    add("interpolate.blend.allow_extrapolation",
        lambda: I.blend_states([DN, DN], [0.5, 0.5], allow_extrapolation="y"), "blend_states.allow_extrapolation")
    add("interpolate.blend_models.empty", lambda: I.blend_models([], []), "blend_models: models")
    add("interpolate.dni_sweep.alphas", lambda: I.dni_sweep(DN, DN, [0.0, 2.0], [torch.rand(3, 8, 8)], [10]),
        "dni_sweep.alphas[1]", "2.0")
    add("interpolate.dni_sweep.sigmas", lambda: I.dni_sweep(DN, DN, [0.0], [torch.rand(3, 8, 8)], []),
        "dni_sweep: sigmas")
    add("interpolate.dni_sweep.duplicate_alphas",
        lambda: I.dni_sweep(DN, DN, [0.12341, 0.12342], [torch.rand(3, 8, 8)], [10]), "distinct")
    return c


FIELD_CASES = _field_cases()


@pytest.mark.parametrize("thunk,field,bad", FIELD_CASES)
def test_every_config_field_rejects_out_of_range_values_naming_the_field(thunk, field, bad):
    _expect_clear_error(thunk, field, *([bad] if bad else []))


@pytest.mark.parametrize("name,preset", [(n, p) for n in models.PRESETS for p in models.PRESETS[n]])
def test_valid_presets_still_build(name, preset):
    if preset == "paper" and name in ("rrdb", "swinir"):
        pytest.skip("large; built elsewhere")
    assert models.build(name, preset=preset).config["name"] == name


# -------------------------------------------------------------------- images: every public function
def _bad_images(x: torch.Tensor):
    """The bad versions of a good (N,C,H,W) batch, by kind."""
    nan = x.clone()
    nan.view(-1)[0] = NAN
    inf = x.clone()
    inf.view(-1)[-1] = math.inf
    return {
        "type": x.numpy(),
        "list_type": x.tolist(),
        "dtype": (x * 255).to(torch.uint8),
        "shape": x[0, 0],
        "channels": x[:, :1],
        "range": x * 255 + 1,
        "nan": nan,
        "inf": inf,
        "empty": x[:0],
        "zero_size": x[..., :0, :],
    }


#: public function -> (call with the images, a good batch, the kinds it checks, a too-small batch or None)
def _image_functions():
    g = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    one = g[:1]
    small = torch.rand(1, 3, 1, 1)
    base_kinds = ("type", "list_type", "dtype", "shape", "channels", "empty", "zero_size")
    all_kinds = base_kinds + ("range", "nan", "inf")
    attr_kinds = base_kinds + ("nan", "inf")  # attribution inputs are any finite values (no [0, 1] range)
    f = {}
    for name in ("dncnn", "rrdb", "srresnet"):
        f[f"model.{name}"] = (lambda x, name=name: models.build(name, nf=4, **({"depth": 3} if name == "dncnn" else
                                                                                {"nb": 1}))(x), g, base_kinds, None)
    f["model.swinir"] = (lambda x: SWIN(x), g, base_kinds, torch.rand(1, 3, 4, 4))
    for name in D.names():
        if name == "compose":
            continue
        d = D.build(name)
        need = d.size_need()[0]
        f[f"distortion.{name}"] = (lambda x, d=d: d(x), g if need <= 12 else torch.rand(1, 3, 24, 24), all_kinds,
                                   torch.rand(1, 3, need - 1, need - 1) if need > 1 else None)
    blur = D.GaussianBlur(2.0)
    f["distortion.compose"] = (lambda x: D.compose([NOISE, blur])(x), g, all_kinds, torch.rand(1, 3, 10, 10))
    f["distortion.sr_x2"] = (lambda x: A.SR_DEGRADATIONS["blur+noise"](x), g, all_kinds, small)
    f["distortions.apply_random"] = (lambda x: D.apply_random([NOISE, blur], x), g, all_kinds,
                                     torch.rand(4, 3, 10, 10))
    f["distortions.DistortionSet.sample"] = (lambda x: D.distortion_set("blur-dil").sample(x), g, all_kinds,
                                             torch.rand(2, 3, 10, 10))
    f["distortions.preview"] = (lambda x: D.preview(x[0] if isinstance(x, torch.Tensor) and x.dim() == 4 else x,
                                                    "gaussian_blur", 2.0), one,
                                ("type", "dtype", "channels", "range", "nan", "inf", "zero_size"),
                                torch.rand(1, 3, 10, 10))
    f["distortions.filter_batch"] = (lambda x: D.filter_batch(x, torch.ones(1, 9, 9) / 81), g,
                                     ("type", "list_type", "dtype", "shape", "empty", "zero_size"),
                                     torch.rand(1, 3, 4, 4))
    f["evaluate.evaluate"] = (lambda x: evaluate.evaluate({"dn": DN}, x, {"b": blur}, device="cpu"), g,
                              ("type", "dtype", "shape", "channels", "range", "nan", "inf", "empty", "zero_size"),
                              torch.rand(1, 3, 10, 10))
    f["evaluate.distorted_inputs"] = (lambda x: evaluate.distorted_inputs(x, {"b": blur}), g,
                                      ("type", "dtype", "shape", "channels", "range", "nan", "inf", "empty",
                                       "zero_size"), torch.rand(1, 3, 10, 10))
    f["dil.meta_gradient"] = (lambda x: dil.meta_gradient(DN, dil.Tasks(*[x[None] if isinstance(x, torch.Tensor)
                                                                          else x] * 4, [], []), 0.1, serial=True,
                                                          second_order=False), g,
                              ("type", "list_type", "dtype", "shape", "nan", "inf", "empty", "zero_size"), None)
    f["dil.meta_objective"] = (lambda x: dil.meta_objective(DN, dil.Tasks(*[x[None] if isinstance(x, torch.Tensor)
                                                                            else x] * 4, [], []), 0.1, serial=False),
                               g, ("type", "list_type", "dtype", "shape", "nan", "inf", "empty", "zero_size"), None)
    ref = torch.rand(2, 3, 24, 24)
    f["attribution.faig"] = (lambda x: A.faig(SR_T, SR_B, x, ref, n_steps=2), g, attr_kinds, None)
    f["attribution.faig.references"] = (lambda x: A.faig(SR_T, SR_B, g, x, n_steps=2), ref,
                                        ("type", "list_type", "dtype", "shape", "channels", "nan", "inf", "empty",
                                         "zero_size"), None)
    f["attribution.faig_attributions"] = (lambda x: A.faig_attributions(SR_T, SR_B, x, None, 2, loss="output_sum"), g,
                                          attr_kinds, None)
    f["attribution.faig_reference"] = (lambda x: A.faig_reference(SR_T, SR_B, x, ref, n_steps=2), g, attr_kinds,
                                       None)
    f["attribution.ig_kernel_scores"] = (lambda x: A.ig_kernel_scores(SR_T, x, g, n_steps=2), g, attr_kinds, None)
    f["attribution.ig_kernel_scores.start"] = (lambda x: A.ig_kernel_scores(SR_T, g, x, n_steps=2), g, attr_kinds,
                                               None)
    f["attribution.discriminative_filters"] = (
        lambda x: A.discriminative_filters(SR_T, SR_B, {"a": x, "b": g}, ref, n_steps=2), g, attr_kinds, None)
    f["attribution.integrated_gradients"] = (lambda x: A.integrated_gradients(SR_T, x, n_steps=2), one, all_kinds,
                                             None)
    f["attribution.integrated_gradients.swinir"] = (lambda x: A.integrated_gradients(SWIN, x, n_steps=2), one,
                                                    all_kinds, torch.rand(1, 3, 3, 3))
    f["attribution.integrated_gradients.clean"] = (
        lambda x: A.integrated_gradients(SR_T, one, objective="loss", clean=x, n_steps=2), ref[:1],
        ("type", "dtype", "shape", "channels", "nan", "inf", "zero_size"), None)
    f["attribution.integrated_gradients.baseline"] = (
        lambda x: A.integrated_gradients(SR_T, one, baseline=x, n_steps=2), one,
        ("type", "dtype", "shape", "channels", "nan", "inf", "empty", "zero_size"), None)
    f["attribution.baseline_gallery"] = (lambda x: A.baseline_gallery(SR_T, x, ("black",), n_steps=2), one,
                                         all_kinds, None)
    for b in A.BASELINES:  # a baseline has no model, hence no channel count to check
        f[f"attribution.make_baseline.{b}"] = (lambda x, b=b: A.make_baseline(b, x), one,
                                               tuple(k for k in all_kinds if k != "channels"),
                                               small if b == "blur" else None)
    f["attribution.gradient_map"] = (lambda x: A.gradient_map(x), g,
                                     ("type", "list_type", "dtype", "shape", "nan", "inf", "empty", "zero_size"), None)
    f["attribution.output_change"] = (lambda x: A.output_change(x, x), g,
                                      ("type", "list_type", "dtype", "shape", "nan", "inf", "empty", "zero_size"),
                                      None)
    f["attribution.heatmap"] = (lambda x: A.heatmap(x), one, ("type", "list_type", "dtype", "shape", "nan", "inf",
                                                             "zero_size"), None)
    f["attribution.degrade"] = (lambda x: A.degrade(x, *[torch.zeros(len(x), dtype=torch.bool)] * 2), g,
                                ("type", "dtype", "shape", "range", "nan", "inf", "empty", "zero_size"), small)
    f["adms.ADMS"] = (lambda x: ADMS_NET(x), g, base_kinds, torch.rand(1, 3, 4, 4))
    f["adms.ADMS.fixed_c"] = (lambda x: ADMS_NET(x, torch.tensor([1.0, 0.0])), g, base_kinds, None)
    f["adms.DegradationClassifier"] = (lambda x: ADMS_NET.classifier(x), g, base_kinds, torch.rand(2, 3, 4, 4))
    f["interpolate.restore_interpolated"] = (lambda x: I.restore_interpolated(DN, DN, 0.5, x), g, all_kinds, None)
    f["interpolate.restore_interpolated.swinir"] = (lambda x: I.restore_interpolated(SWIN, SWIN, 0.5, x), g,
                                                    all_kinds, torch.rand(1, 3, 4, 4))
    return f


IMAGE_FUNCTIONS = _image_functions()
IMAGE_CASES = [pytest.param(fn, kind, id=f"{fn}-{kind}") for fn, (_, _, kinds, _) in IMAGE_FUNCTIONS.items()
               for kind in kinds]
SMALL_CASES = [pytest.param(fn, id=fn) for fn, (_, _, _, small) in IMAGE_FUNCTIONS.items() if small is not None]


@pytest.mark.parametrize("fn,kind", IMAGE_CASES)
def test_every_image_function_rejects_bad_images_itself(fn, kind):
    call, good, _, _ = IMAGE_FUNCTIONS[fn]
    bad = _bad_images(good)[kind]
    if fn.startswith("evaluate.") and isinstance(bad, torch.Tensor) and bad.dim() == 4 and kind != "empty":
        bad = list(bad)  # evaluate takes a sequence of (3,H,W) images
    if fn.startswith("evaluate.") and kind == "empty":
        bad = []
    _expect_clear_error(lambda: call(bad))


@pytest.mark.parametrize("fn", SMALL_CASES)
def test_inputs_smaller_than_a_kernel_window_or_patch_get_a_causalir_error(fn):
    call, _, _, small = IMAGE_FUNCTIONS[fn]
    if fn.startswith("evaluate."):
        small = list(small)
    msg = _expect_clear_error(lambda: call(small))
    assert "H and W >=" in msg or "px" in msg or "feature map" in msg, msg


@pytest.mark.parametrize("fn", list(IMAGE_FUNCTIONS))
def test_the_good_images_still_pass(fn):
    call, good, _, _ = IMAGE_FUNCTIONS[fn]
    call(list(good) if fn.startswith("evaluate.") else good)


# --------------------------------------------------------------- defect 9: the boundaries are torch's
def _boundary_cases():
    c = []
    for k in (3, 5, 9, 21):
        c.append(pytest.param(lambda s, k=k: D.GaussianBlur(1.0, kernel_size=k)(torch.rand(1, 3, s, s)), k // 2 + 1,
                              f"H and W >= {k // 2 + 1}", id=f"blur{k}"))
        c.append(pytest.param(lambda s, k=k: D.filter_batch(torch.rand(1, 1, s, s), torch.ones(1, k, k) / k**2),
                              k // 2 + 1, f"H and W >= {k // 2 + 1}", id=f"filter_batch{k}"))
    c.append(pytest.param(lambda s: D.Rain()(torch.rand(1, 3, s, s)), 21, "H and W >= 21", id="rain"))
    c.append(pytest.param(lambda s: D.Snow()(torch.rand(1, 3, s, s)), 5, "H and W >= 5", id="snow"))
    c.append(pytest.param(lambda s: A.SRDegradation(blur=True)(torch.rand(1, 3, s, s)), 2, "H and W >= 2",
                          id="sr_x2"))
    c.append(pytest.param(lambda s: A.make_baseline("blur", torch.rand(1, 3, s, s)), 2, "H and W >= 2",
                          id="baseline_blur"))
    for w in (1, 2, 3, 4, 8):
        net = models.build("swinir", dim=4, depths=(2,), heads=1, window=w).eval()
        c.append(pytest.param(lambda s, net=net: net(torch.rand(1, 3, s, s)), w // 2 + 1,
                              f"H and W >= {w // 2 + 1}", id=f"swinir_window{w}"))
    c.append(pytest.param(lambda s: ADMS_NET.classifier(torch.rand(1, 3, s, 1)), 5, "feature map", id="classifier"))
    return c


BOUNDARY_CASES = _boundary_cases()


@pytest.mark.parametrize("call,side,needle", BOUNDARY_CASES)
def test_size_checks_sit_exactly_where_torch_would_fail(call, side, needle):
    with torch.no_grad():
        call(side)  # the smallest accepted size works
        _expect_clear_error(lambda: call(side - 1), needle)


def test_model_outputs_of_the_wrong_shape_are_named():
    img = [torch.rand(3, 16, 16)]
    _expect_clear_error(lambda: evaluate.evaluate({"sr": SR_T}, img, {"n": NOISE}, device="cpu"), "'sr'",
                        "(1, 3, 32, 32)", "(1, 3, 16, 16)")
    x, wrong = torch.rand(1, 3, 6, 6), torch.rand(1, 3, 6, 6)  # the SR output is 12x12
    _expect_clear_error(lambda: A.faig(SR_T, SR_B, x, wrong, n_steps=2), "references[0]", "(1, 3, 12, 12)")
    _expect_clear_error(lambda: A.faig(SR_T, SR_B, x, wrong, n_steps=2, vectorize=True), "references[0]")
    _expect_clear_error(lambda: A.faig_reference(SR_T, SR_B, x, wrong, n_steps=2), "references[0]")
    _expect_clear_error(lambda: A.integrated_gradients(SR_T, x, objective="loss", clean=wrong, n_steps=2), "clean")
    _expect_clear_error(lambda: A.integrated_gradients(SR_T, x, baseline=torch.rand(1, 3, 36), n_steps=2),
                        "baseline", "(1, 3, 36)")
    _expect_clear_error(lambda: A.ig_kernel_scores(SR_T, torch.rand(2, 3, 6, 6), x, n_steps=2), "2 inputs",
                        "1 start_inputs")
    # dtypes: a float64 image or baseline model would fail inside torch's convolution
    _expect_clear_error(lambda: A.faig(SR_T, SR_B, x.double(), wrong, n_steps=2), "float64", "float32")
    _expect_clear_error(lambda: A.faig(SR_T, models.build("srresnet", nf=4, nb=1).double(), x, wrong, n_steps=2),
                        "dtype", "conv_first.weight")
    _expect_clear_error(lambda: A.integrated_gradients(SR_T, x.double(), n_steps=2), "float64")
    _expect_clear_error(lambda: A.ig_kernel_scores(SR_T, x, x.double(), n_steps=2), "start_inputs[0]", "float64")
    # target vs baseline of another architecture
    _expect_clear_error(lambda: A.faig(SR_T, models.build("srresnet", nf=8, nb=1), x, wrong, n_steps=2), "shape")
    _expect_clear_error(lambda: A.faig(SR_T, DN, x, wrong, n_steps=2), "differ in parameters")


def test_case_counts_per_defect_class():
    """The closing note's numbers (printed with -s)."""
    n5 = len(FIELD_CASES)
    n9 = sum(1 for p in IMAGE_CASES if p.id.split("-")[-1] in ("empty", "zero_size")) + len(SMALL_CASES) + \
        len(BOUNDARY_CASES)
    n_img = len(IMAGE_CASES)
    print(f"\ndefect 5 (config fields / builder arguments): {n5}; images (type/dtype/shape/range/finite): "
          f"{n_img}; defect 9 (empty / zero-size / too small / boundaries): {n9}")
    assert n5 >= 200 and n_img >= 400

