"""The only place a verdict is made: one grammar for every claim of every experiment.

A claim compares *our effect* (a difference in dB, a ratio, an accuracy above chance...) with *the paper's*.
Its uncertainty comes from seeds (>= 2) or, with one seed, from paired units (images, patches, regions: the same
inputs seen by both methods); either way the Student-t 95% interval of the mean, SE = sd / sqrt(n). The verdict,
in this order:

- **inconclusive**: a precondition failed and is named in ``why``: a model that does not beat its distorted
  input ("not a restorer yet"), no headroom (the oracle trained on the test conditions is not better than the
  baseline), a degenerate policy (every region/patch takes one action), fewer than 2 seeds and no paired error.
- **not reproduced**: the interval includes zero, or our effect has the opposite sign.
- **reproduced**: same sign, the interval excludes zero, and the size is within the claim's tolerance of the
  paper's (default: within a factor 2; ``absolute(tol)`` for levels such as a PSNR; ``SIGN_ONLY`` when the
  paper states a direction without a number).
- **direction only**: same sign, the interval excludes zero, size outside the tolerance.

A *level* (``absolute(tol)``: a PSNR, a share) has no sign to test: reproduced when |ours - paper| <= tol, else
not reproduced (the preconditions and the >= 2 units rule still apply).

``agreement`` is the one other form: claims whose paper value is an identity (an estimate *equals* the truth)
are reproduced when every estimate is within k standard errors of it. The words "at this scale" belong to the
profile column of a table, never to a verdict.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

REPRODUCED = "reproduced"
DIRECTION_ONLY = "direction only"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
VERDICTS = (REPRODUCED, DIRECTION_ONLY, NOT_REPRODUCED, INCONCLUSIVE)
UNITS = ("seeds", "images", "patches", "regions", "tiles", "levels", "samples", "degradations")


# ------------------------------------------------------------------------------------------- tolerance
@dataclass(frozen=True)
class Tolerance:
    """How close our size must be to the paper's: ``factor`` (paper/f <= ours <= paper*f, same sign),
    ``absolute`` (|ours - paper| <= value) or ``sign`` (no size check: the paper gives a direction only)."""

    kind: str = "factor"
    value: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("factor", "absolute", "sign"):
            raise ValueError(f"Tolerance.kind: expected 'factor', 'absolute' or 'sign', got {self.kind!r}")
        if self.kind == "factor" and not self.value > 1.0:
            raise ValueError(f"Tolerance.value: a factor must be > 1, got {self.value!r}")
        if self.kind == "absolute" and not self.value > 0.0:
            raise ValueError(f"Tolerance.value: an absolute tolerance must be > 0, got {self.value!r}")

    def within(self, ours: float, paper: Optional[float]) -> bool:
        if self.kind == "sign" or paper is None:
            return True
        if self.kind == "absolute":
            return abs(ours - paper) <= self.value
        if paper == 0.0:
            return ours == 0.0
        r = ours / paper
        return 1.0 / self.value <= r <= self.value

    def describe(self, paper: Optional[float] = None) -> str:
        if self.kind == "sign" or paper is None:
            return "sign only"
        if self.kind == "absolute":
            return f"±{self.value:g}"
        return f"×{self.value:g}"


FACTOR2 = Tolerance("factor", 2.0)
SIGN_ONLY = Tolerance("sign", 0.0)


def absolute(tol: float) -> Tolerance:
    """A level claim (e.g. a PSNR in dB): reproduced when |ours - paper| <= tol."""
    return Tolerance("absolute", float(tol))


def factor(f: float) -> Tolerance:
    return Tolerance("factor", float(f))


# ------------------------------------------------------------------------------------------ preconditions
@dataclass(frozen=True)
class Precondition:
    """A check a claim's evidence must pass; a failed one makes the claim inconclusive (``why`` = detail)."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _f(v: float) -> str:
    return f"{v:.2f}"


def restorer(label: str, model_psnr: Union[float, Sequence[float]], input_psnr: Union[float, Sequence[float]],
             margin: float = 0.0, where: str = "") -> Precondition:
    """``label`` beats its distorted input by more than ``margin`` dB (means over the values given)."""
    m, i = float(np.mean(model_psnr)), float(np.mean(input_psnr))
    at = f" at {where}" if where else ""
    ok = bool(m - i > margin)
    detail = (f"{label} is a restorer{at} ({_f(m)} dB vs input {_f(i)} dB)" if ok else
              f"not a restorer yet: {label}{at} {_f(m)} dB vs its input {_f(i)} dB"
              + (f" (needs > +{margin:g} dB)" if margin else ""))
    return Precondition("restorer", ok, detail)


def headroom(oracle_psnr: Union[float, Sequence[float]], baseline_psnr: Union[float, Sequence[float]],
             margin: float = 0.0, where: str = "", oracle: str = "oracle", baseline: str = "baseline") -> Precondition:
    """The oracle (the baseline trained on the test conditions) beats the baseline by more than ``margin``."""
    o, b = float(np.mean(oracle_psnr)), float(np.mean(baseline_psnr))
    at = f" at {where}" if where else ""
    ok = bool(o - b > margin)
    detail = (f"headroom{at}: {oracle} {_f(o)} dB vs {baseline} {_f(b)} dB" if ok else
              f"no headroom{at}: {oracle} {_f(o)} dB is not above {baseline} {_f(b)} dB")
    return Precondition("headroom", ok, detail)


#: a policy whose commonest action covers more than this share of its inputs is degenerate (one action nearly
#: everywhere: 199 of 200 patches on one chain is an open-loop chain, not a policy)
MAX_ACTION_SHARE = 0.9


def non_degenerate(actions: Iterable[Any], what: str = "policy", max_share: float = MAX_ACTION_SHARE) -> Precondition:
    """A policy that takes more than one distinct action over its inputs, none of them on more than ``max_share``
    of the inputs (one action everywhere, or nearly everywhere, is no result)."""
    from collections import Counter

    acts = [a if not isinstance(a, (list, tuple)) else tuple(a) for a in actions]
    counts = Counter(acts)
    if not counts:
        return Precondition("non-degenerate", False, f"degenerate {what}: no actions recorded")
    top, k = counts.most_common(1)[0]
    n = len(acts)
    if len(counts) == 1:
        return Precondition("non-degenerate", False, f"degenerate {what}: all {n} inputs take the same action ({top})")
    if k / n > max_share:
        return Precondition("non-degenerate", False,
                            f"degenerate {what}: {k} of {n} inputs ({k / n:.1%} > {max_share:.0%}) take the same "
                            f"action ({top})")
    return Precondition("non-degenerate", True, f"{what} takes {len(counts)} distinct actions over {n} inputs "
                                                f"(the commonest, {top}, on {k / n:.0%})")


def check(name: str, ok: bool, detail: str) -> Precondition:
    """Any other named precondition."""
    return Precondition(name, bool(ok), detail)


# ------------------------------------------------------------------------------------------- uncertainty
@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error and 95% interval over ``n`` units of kind ``over``."""

    mean: float
    se: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int
    over: str

    @property
    def decidable(self) -> bool:
        return self.se is not None and self.n >= 2


#: what :func:`pick` returns when a record holds no values for a claim (e.g. an older file without the table)
NO_EVIDENCE = Estimate(float("nan"), None, None, None, 0, "")


def _t95(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def estimate(values: Sequence[float], over: str = "seeds") -> Estimate:
    """Mean, SE and 95% interval: Student t over seeds, normal over paired units (images, patches...)."""
    if over not in UNITS:
        raise ValueError(f"over: expected one of {', '.join(UNITS)}, got {over!r}")
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("estimate: expected at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"estimate: values must be finite, got {v.tolist()}")
    mean = float(v.mean())
    if v.size < 2:
        return Estimate(mean, None, None, None, int(v.size), over)
    se = float(v.std(ddof=1) / math.sqrt(v.size))
    half = _t95(v.size - 1) * se  # Student t for seeds and units alike (a few images are not a normal sample)
    return Estimate(mean, se, mean - half, mean + half, int(v.size), over)


def from_se(mean: float, se: float, n: int, over: str = "samples") -> Estimate:
    """An estimate whose standard error was computed with it (e.g. a mean over ``n`` simulated samples):
    normal 95% interval, mean ± 1.96 SE (``n`` must be large for that to hold; >= 30 is required)."""
    if over not in UNITS:
        raise ValueError(f"over: expected one of {', '.join(UNITS)}, got {over!r}")
    if not (math.isfinite(mean) and math.isfinite(se) and se >= 0):
        raise ValueError(f"from_se: expected a finite mean and SE >= 0, got {mean!r}, {se!r}")
    if n < 30:
        raise ValueError(f"from_se: n must be >= 30 for a normal interval, got {n}")
    half = 1.959963984540054 * se
    return Estimate(float(mean), float(se), mean - half, mean + half, int(n), over)


def pick(seeds: Optional[Sequence[float]] = None, units: Optional[Sequence[float]] = None,
         unit: str = "images") -> Estimate:
    """The estimate a claim uses: over seeds when there are >= 2, else over paired ``units`` (one seed)."""
    if seeds is not None and len(seeds) >= 2:
        return estimate(seeds, "seeds")
    if units is not None and len(units) >= 2:
        return estimate(units, unit)
    if seeds is not None and len(seeds):
        return estimate(seeds, "seeds")
    if units is not None and len(units):
        return estimate(units, unit)
    return NO_EVIDENCE


# ------------------------------------------------------------------------------------------------ claims
@dataclass(frozen=True)
class Claim:
    """One claim with its computed verdict; ``why`` names the failed precondition when inconclusive."""

    claim: str
    paper: Optional[float]
    ours: Optional[float]
    verdict: str
    se: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    n: int = 0
    over: str = ""
    tolerance: str = ""
    why: str = ""
    checks: tuple = ()
    note: str = ""
    source: str = ""

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["checks"] = [dict(c) if isinstance(c, dict) else c for c in d["checks"]]
        return d


def decide(paper: Optional[float], est: Estimate, tolerance: Tolerance = FACTOR2,
           require: Sequence[Precondition] = ()) -> tuple:
    """(verdict, why) by the grammar in this module's docstring."""
    failed = [p for p in require if not p.ok]
    if failed:
        return INCONCLUSIVE, "; ".join(p.detail for p in failed)
    if est.n == 0:
        return INCONCLUSIVE, "no evidence: the record holds no values for this claim"
    if not est.decidable:
        return INCONCLUSIVE, f"fewer than 2 seeds and no paired error (n={est.n} {est.over})"
    sign = -1.0 if (paper is not None and paper < 0) else 1.0
    if tolerance.kind == "absolute":  # a level: no sign to test, only the size
        return (REPRODUCED if tolerance.within(est.mean, paper) else NOT_REPRODUCED), ""
    if est.mean * sign <= 0:
        return NOT_REPRODUCED, ""
    if est.low <= 0 <= est.high:
        return NOT_REPRODUCED, ""
    if tolerance.within(est.mean, paper):
        return REPRODUCED, ""
    return DIRECTION_ONLY, ""


def _r(v: Optional[float], nd: int = 3) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def effect(claim: str, paper: Optional[float], *, seeds: Optional[Sequence[float]] = None,
           units: Optional[Sequence[float]] = None, unit: str = "images", tolerance: Tolerance = FACTOR2,
           require: Sequence[Precondition] = (), source: str = "", note: str = "", digits: int = 3,
           known: Optional[Estimate] = None) -> Claim:
    """A claim about an effect (``A - B``, a ratio minus one, an accuracy above chance...). ``seeds``: one value
    of the effect per seed; ``units``: with one seed, the paired per-image/patch effects. ``paper=None`` means
    the paper states only the direction (positive): the tolerance becomes 'sign only'. ``known``: an estimate
    with its own SE (:func:`from_se`), used when there are fewer than 2 seeds."""
    est = known if known is not None and not (seeds is not None and len(seeds) >= 2) else pick(seeds, units, unit)
    tol = SIGN_ONLY if paper is None else tolerance
    verdict, why = decide(paper, est, tol, require)
    return Claim(claim, paper, _r(est.mean, digits), verdict, _r(est.se, digits + 1), _r(est.low, digits),
                 _r(est.high, digits), est.n, est.over, tol.describe(paper), why,
                 tuple(p.as_dict() for p in require), note, source)


def level(claim: str, paper: float, *, seeds: Optional[Sequence[float]] = None,
          units: Optional[Sequence[float]] = None, unit: str = "images", tol: float = 1.0,
          require: Sequence[Precondition] = (), source: str = "", note: str = "") -> Claim:
    """A claim about a level (a PSNR, a share...): reproduced when |ours - paper| <= ``tol``."""
    return effect(claim, paper, seeds=seeds, units=units, unit=unit, tolerance=absolute(tol), require=require,
                  source=source, note=note)


def agreement(claim: str, errors: Sequence[float], ses: Sequence[float], k: float = 3.0, *,
              require: Sequence[Precondition] = (), source: str = "", note: str = "", over: str = "seeds") -> Claim:
    """An identity claim (an estimate equals the truth): reproduced when every |error| <= k * its SE."""
    e, s = np.asarray(list(errors), float), np.asarray(list(ses), float)
    if e.shape != s.shape or e.size == 0:
        raise ValueError(f"agreement: expected as many errors as SEs (>= 1), got {e.size} and {s.size}")
    failed = [p for p in require if not p.ok]
    if failed:
        verdict, why = INCONCLUSIVE, "; ".join(p.detail for p in failed)
    else:
        verdict, why = (REPRODUCED if bool(np.all(np.abs(e) <= k * s)) else NOT_REPRODUCED), ""
    return Claim(claim, 0.0, round(float(e.mean()), 4), verdict, round(float(s.mean()), 4), None, None, int(e.size),
                 over, f"|error| <= {k:g} SE", why, tuple(p.as_dict() for p in require),
                 note or f"max |error| / SE = {float(np.max(np.abs(e) / np.maximum(s, 1e-12))):.2f}", source)


def as_rows(claims: Sequence[Union[Claim, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Claims as plain dicts (what a result file stores)."""
    return [c.as_dict() if isinstance(c, Claim) else dict(c) for c in claims]


# ------------------------------------------------------------------------------------ rows -> evidence
def rows_where(rows: Sequence[Mapping[str, Any]], **match: Any) -> List[Mapping[str, Any]]:
    """The rows of a per-image/per-patch table whose fields equal ``match``."""
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def seed_means(rows: Sequence[Mapping[str, Any]], value: str = "psnr", seed_key: str = "seed",
               **match: Any) -> List[float]:
    """One mean of ``value`` per seed (sorted by seed) over the rows matching ``match``."""
    by: Dict[Any, List[float]] = {}
    for r in rows_where(rows, **match):
        by.setdefault(r.get(seed_key, 0), []).append(float(r[value]))
    return [float(np.mean(by[s])) for s in sorted(by)]


def paired_diffs(rows: Sequence[Mapping[str, Any]], a: Mapping[str, Any], b: Mapping[str, Any],
                 on: Sequence[str] = ("image", "seed"), value: str = "psnr") -> List[float]:
    """Per-unit differences ``value(a) - value(b)`` over the units (``on`` fields) both sides share."""
    ra = {tuple(r.get(k) for k in on): float(r[value]) for r in rows_where(rows, **a)}
    rb = {tuple(r.get(k) for k in on): float(r[value]) for r in rows_where(rows, **b)}
    keys = [k for k in ra if k in rb]
    return [ra[k] - rb[k] for k in keys]


def seed_diffs(rows: Sequence[Mapping[str, Any]], a: Mapping[str, Any], b: Mapping[str, Any],
               value: str = "psnr", seed_key: str = "seed") -> List[float]:
    """Per-seed differences of means ``mean(a) - mean(b)`` (seeds both sides have)."""
    ma = dict(zip(sorted({r.get(seed_key, 0) for r in rows_where(rows, **a)}), seed_means(rows, value, seed_key, **a)))
    mb = dict(zip(sorted({r.get(seed_key, 0) for r in rows_where(rows, **b)}), seed_means(rows, value, seed_key, **b)))
    return [ma[s] - mb[s] for s in sorted(ma) if s in mb]


# ------------------------------------------------------------------------------------------------- tables
def collect(folders: Sequence[Any], judge: Optional[Any] = None) -> List[Dict[str, Any]]:
    """Every claim in every results file under ``folders``. ``judge(record)`` (optional) returns the claims to
    use instead of the file's own, or None to skip the file; with it, a file that is not JSON is an error."""
    import json
    from pathlib import Path

    rows: List[Dict[str, Any]] = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                res = json.loads(path.read_text())
            except json.JSONDecodeError:
                if judge is not None:
                    raise
                continue
            if not isinstance(res, dict):
                continue
            found = res.get("claims", []) if judge is None else judge(res)
            for c in found or []:
                rows.append({"experiment": res.get("experiment", path.stem), "profile": res.get("profile", "?"),
                             "device": res.get("provenance", {}).get("device", "?"), **c})
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """The claims as one Markdown table: paper, ours, uncertainty, tolerance, verdict and why."""
    def f(v: Any) -> str:
        if v is None or v == "":
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    def unc(r: Dict[str, Any]) -> str:
        if r.get("low") is not None and r.get("high") is not None:
            return f"[{r['low']:.3f}, {r['high']:.3f}] ({r.get('n')} {r.get('over')})"
        if r.get("se") is not None:
            return f"SE {r['se']:.3f} ({r.get('n')} {r.get('over')})"
        return f"– ({r.get('n', 0)} {r.get('over', '')})".strip()

    lines = ["| experiment | profile | claim | paper | ours | 95% interval | tolerance | verdict | why |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = str(r.get("why", "") or "").replace("|", "/")
        lines.append(f"| {r['experiment']} | {r['profile']} ({r['device']}) | {r['claim']} | {f(r['paper'])} | "
                     f"{f(r['ours'])} | {unc(r)} | {r.get('tolerance', '') or '–'} | {r['verdict']} | "
                     f"{why or '–'} |")
    return "\n".join(lines)
