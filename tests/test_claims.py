"""The claims grammar: every verdict, the uncertainty it rests on, and the preconditions that make it inconclusive."""
import math

import numpy as np
import pytest
from scipy import stats

from causalir.experiments import claims as C


def test_reproduced_direction_only_not_reproduced_by_seeds():
    assert C.effect("a>b", 1.2, seeds=[1.0, 1.1, 0.9]).verdict == C.REPRODUCED
    # same sign, interval excludes zero, but 0.22 is more than a factor 2 below the paper's 2.0
    assert C.effect("a>b", 2.0, seeds=[0.2, 0.25, 0.22]).verdict == C.DIRECTION_ONLY
    # the interval includes zero
    assert C.effect("a>b", 1.0, seeds=[0.5, -0.4, 0.1]).verdict == C.NOT_REPRODUCED
    # opposite sign
    assert C.effect("a>b", 1.0, seeds=[-1.0, -1.1, -0.9]).verdict == C.NOT_REPRODUCED
    # a negative paper effect is matched by a negative one of similar size
    assert C.effect("a<b", -1.0, seeds=[-1.0, -1.1, -0.9]).verdict == C.REPRODUCED


def test_one_seed_without_paired_error_is_inconclusive():
    c = C.effect("a>b", 1.0, seeds=[1.0])
    assert c.verdict == C.INCONCLUSIVE and "fewer than 2 seeds and no paired error" in c.why


def test_failed_precondition_is_named():
    req = [C.restorer("DIL-pf", [21.1], [24.7], where="σ=15"), C.restorer("ERM", [26.0], [24.7])]
    c = C.effect("DIL-pf beats ERM", 1.0, seeds=[2.0, 2.1, 1.9], require=req)
    assert c.verdict == C.INCONCLUSIVE
    assert "not a restorer yet: DIL-pf at σ=15 21.10 dB vs its input 24.70 dB" in c.why and "ERM" not in c.why
    assert [x["ok"] for x in c.as_dict()["checks"]] == [False, True]
    assert not C.headroom(25.0, 25.1).ok and "no headroom" in C.headroom(25.0, 25.1).detail
    assert not C.non_degenerate(["bypass"] * 10).ok and C.non_degenerate([0, 1, 1]).ok
    assert C.restorer("m", 25.0, 24.0, margin=0.5).ok and not C.restorer("m", 25.0, 24.8, margin=0.5).ok


def test_seed_interval_is_the_student_t_interval():
    v = [1.0, 1.4, 0.7, 1.1]
    e = C.estimate(v, "seeds")
    se = np.std(v, ddof=1) / math.sqrt(len(v))
    half = stats.t.ppf(0.975, len(v) - 1) * se
    assert e.se == pytest.approx(se) and e.low == pytest.approx(np.mean(v) - half)
    assert e.high == pytest.approx(np.mean(v) + half) and e.n == 4 and e.over == "seeds"


def test_paired_units_decide_with_one_seed():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, 400)
    c = C.effect("a>b", 0.3, seeds=[float(d.mean())], units=d, unit="patches")
    assert c.over == "patches" and c.n == 400
    assert c.se == pytest.approx(d.std(ddof=1) / 20, abs=1e-4) and c.verdict == C.REPRODUCED
    # with >= 2 seeds the seeds decide, not the units
    assert C.effect("a>b", 0.3, seeds=[0.3, 0.31], units=d).over == "seeds"


def test_interval_covers_the_true_effect_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        e = C.estimate(rng.normal(0.5, 2.0, 5), "seeds")
        hits += e.low <= 0.5 <= e.high
    assert 0.935 <= hits / 2000 <= 0.965


def test_levels_and_sign_only_claims():
    units = [24.0, 24.6, 23.9, 24.3]
    assert C.level("ERM PSNR", 24.9, units=units, tol=1.0).verdict == C.REPRODUCED
    c = C.level("ERM PSNR", 21.1, units=units, tol=1.0)
    assert c.verdict == C.NOT_REPRODUCED and c.tolerance == "±1"
    s = C.effect("drop > 0", None, seeds=[3.0, 3.4])
    assert s.tolerance == "sign only" and s.verdict == C.REPRODUCED


def test_tolerance_factor_bounds_and_validation():
    t = C.factor(2.0)
    assert t.within(1.0, 2.0) and t.within(4.0, 2.0) and not t.within(0.9, 2.0) and not t.within(4.1, 2.0)
    assert not t.within(-1.0, 1.0)
    with pytest.raises(ValueError, match="Tolerance.kind"):
        C.Tolerance("ratio", 2.0)
    with pytest.raises(ValueError, match="factor must be > 1"):
        C.factor(0.5)
    with pytest.raises(ValueError, match="over: expected one of"):
        C.estimate([1.0, 2.0], "apples")
    with pytest.raises(ValueError, match="finite"):
        C.estimate([1.0, float("nan")])


def test_agreement_within_k_standard_errors():
    assert C.agreement("adjusted = truth", [0.01, -0.02], [0.01, 0.01], k=3).verdict == C.REPRODUCED
    assert C.agreement("adjusted = truth", [0.01, 0.2], [0.01, 0.01], k=3).verdict == C.NOT_REPRODUCED
    bad = C.agreement("x", [0.0], [0.1], require=[C.check("converged", False, "did not converge")])
    assert bad.verdict == C.INCONCLUSIVE and bad.why == "did not converge"


def test_row_helpers_pair_the_same_units():
    rows = [{"method": m, "distortion": "d", "image": i, "seed": s, "psnr": p}
            for m, base in (("A", 30.0), ("B", 29.0)) for s in (0, 1) for i, p in
            enumerate([base + s, base + 2 + s])]
    assert C.seed_means(rows, method="A") == [31.0, 32.0]
    assert C.seed_diffs(rows, {"method": "A"}, {"method": "B"}) == [1.0, 1.0]
    assert C.paired_diffs(rows, {"method": "A"}, {"method": "B"}) == [1.0] * 4


def test_markdown_shows_interval_tolerance_verdict_and_why():
    rows = [{"experiment": "e", "profile": "quick", "device": "cpu",
             **C.effect("a>b", 1.0, seeds=[1.0], require=[C.restorer("m", 20.0, 21.0)]).as_dict()},
            {"experiment": "e", "profile": "quick", "device": "cpu", **C.effect("a>b", 1.0, seeds=[1.0, 1.02]).as_dict()}]
    md = C.markdown(rows)
    assert "| inconclusive | not a restorer yet: m 20.00 dB vs its input 21.00 dB |" in md
    assert "(2 seeds) | ×2 | reproduced |" in md


def test_an_estimate_with_its_own_se_decides_one_seed():
    k = C.from_se(0.12, 0.004, 20_000)
    assert k.low == pytest.approx(0.12 - 1.96 * 0.004, abs=1e-4) and k.over == "samples"
    c = C.effect("naive overstates", None, seeds=[0.12], known=k)
    assert c.verdict == C.REPRODUCED and c.n == 20_000
    assert C.effect("x", None, seeds=[0.1, 0.12], known=k).over == "seeds"  # seeds win when there are 2+
    with pytest.raises(ValueError, match="n must be >= 30"):
        C.from_se(0.1, 0.01, 5)


def test_a_claim_without_evidence_is_inconclusive_and_shows_no_number():
    c = C.effect("x", 1.0, seeds=[], units=[])
    assert c.verdict == C.INCONCLUSIVE and "no evidence" in c.why and c.ours is None and c.n == 0
    # a failed precondition is named before the missing evidence
    c = C.effect("x", 1.0, units=[], require=[C.check("table", False, "no per-region table")])
    assert c.why == "no per-region table"


def test_a_policy_on_one_action_nearly_everywhere_is_degenerate():
    """199 of 200 patches on one chain is an open-loop chain, not a policy (the medium DQN agent, issue 12)."""
    nearly = C.non_degenerate(["d2+d2+d2"] * 199 + ["d2+d2+d4"], "toolchain policy")
    assert not nearly.ok and "199 of 200" in nearly.detail and "> 90%" in nearly.detail
    assert C.non_degenerate(["a"] * 90 + ["b"] * 10).ok                      # at the limit: 90% is still a policy
    assert not C.non_degenerate(["a"] * 91 + ["b"] * 9).ok
    assert C.non_degenerate(["a"] * 6 + ["b"] * 4, max_share=0.5).ok is False
    assert not C.non_degenerate([]).ok and "no actions" in C.non_degenerate([]).detail
