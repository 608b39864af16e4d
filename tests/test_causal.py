"""Tests for causalir.causal: SCM sampling, exact means, back-door estimation and criteria."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from causalir import causal as cz

N = 20_000
K = 4.0  # tolerance in standard errors


def _sim_mean_se(y: np.ndarray) -> tuple[float, float]:
    return float(y.mean()), float(y.std(ddof=1) / np.sqrt(len(y)))


def _close(a: float, b: float, se: float, k: float = K) -> bool:
    return abs(a - b) <= k * se


# ---------------------------------------------------------------- estimation vs simulation


def test_confounded_adjusted_matches_intervention_naive_is_far_off():
    scm = cz.confounded_discrete(0.8)
    obs = scm.sample(N, seed=0)
    sim, sim_se = _sim_mean_se(scm.sample(N, seed=1, do={"X": 1})["Y"])
    true = scm.exact_do_mean("Y", "X", 1)
    adj = cz.backdoor_effect(obs, "X", "Y", ["C"], 1)
    naive = cz.naive_effect(obs, "X", "Y", 1)

    assert adj.method == "stratify"
    assert true == pytest.approx(0.6)
    assert _close(sim, true, sim_se)
    assert _close(adj.value, true, adj.se)
    assert _close(adj.value, sim, np.hypot(adj.se, sim_se))
    # naive E[Y|X=1] = 0.6 + 0.27 * 0.8 = 0.816: many standard errors away from the truth
    assert abs(naive.value - true) > 20 * naive.se
    assert _close(naive.value, scm.exact_conditional_mean("Y", "X", 1), naive.se)
    assert scm.exact_conditional_mean("Y", "X", 1) == pytest.approx(0.6 + 0.27 * 0.8)


def test_unconfounded_naive_adjusted_and_truth_agree():
    scm = cz.unconfounded_discrete()
    obs = scm.sample(N, seed=2)
    sim, sim_se = _sim_mean_se(scm.sample(N, seed=3, do={"X": 1})["Y"])
    true = scm.exact_do_mean("Y", "X", 1)
    adj = cz.backdoor_effect(obs, "X", "Y", "C", 1)
    naive = cz.naive_effect(obs, "X", "Y", 1)

    assert true == pytest.approx(0.54)
    assert scm.exact_conditional_mean("Y", "X", 1) == pytest.approx(true)
    for est in (adj, naive):
        assert _close(est.value, true, est.se)
        assert _close(est.value, sim, np.hypot(est.se, sim_se))
    assert _close(sim, true, sim_se)


@pytest.mark.parametrize("a,b,c,x", [(1.0, 0.5, 1.0, 2.0), (-0.7, 1.5, 2.0, -1.0)])
def test_linear_gaussian_regression_matches_closed_form(a, b, c, x):
    scm = cz.linear_gaussian_confounded(a, b, c)
    obs = scm.sample(N, seed=4)
    sim, sim_se = _sim_mean_se(scm.sample(N, seed=5, do={"X": x})["Y"])
    adj = cz.backdoor_effect(obs, "X", "Y", ["C"], x)
    naive = cz.naive_effect(obs, "X", "Y", x)

    assert adj.method == "regression"
    assert scm.exact_do_mean("Y", "X", x) == pytest.approx(b * x)
    assert scm.total_effect("X", "Y") == pytest.approx(b)
    assert scm.exact_conditional_mean("Y", "X", x) == pytest.approx((b + a * c / (a**2 + 1)) * x)
    assert _close(adj.value, b * x, adj.se)
    assert _close(adj.value, sim, np.hypot(adj.se, sim_se))
    assert _close(sim, b * x, sim_se)
    assert abs(naive.value - b * x) > 20 * naive.se
    assert _close(naive.value, scm.exact_conditional_mean("Y", "X", x), naive.se)


def test_regression_on_discrete_confounded_is_also_unbiased():
    # P(Y=1|x,c) is additive in (x, c), so the linear model Y ~ 1 + X + C is correctly specified.
    scm = cz.confounded_discrete(0.6)
    obs = scm.sample(N, seed=6)
    est = cz.backdoor_effect(obs, "X", "Y", ["C"], 1, method="regression")
    assert est.method == "regression"
    assert _close(est.value, 0.6, est.se)


def test_standard_errors_are_calibrated():
    scm = cz.confounded_discrete(0.8)
    rng = np.random.default_rng(7)
    z = []
    for _ in range(40):
        est = cz.backdoor_effect(scm.sample(2_000, rng), "X", "Y", ["C"], 1)
        z.append((est.value - 0.6) / est.se)
    z = np.array(z)
    assert abs(z.mean()) < 0.6  # ~ N(0, 1/40): sd of mean ~0.16
    assert 0.6 < z.std(ddof=1) < 1.5


def test_confounding_gap_fields_and_strength_zero():
    g = cz.confounding_gap(0.8, n=N, seed=0)
    assert set(g) == {"naive", "adjusted", "true", "simulated"}
    assert g["true"] == pytest.approx(0.6)
    assert g["naive"] - g["true"] > 0.15
    assert abs(g["adjusted"] - g["true"]) < 0.03 and abs(g["simulated"] - g["true"]) < 0.03
    g0 = cz.confounding_gap(0.0, n=N, seed=0)
    assert abs(g0["naive"] - g0["true"]) < 0.03
    assert cz.confounding_gap(0.8, n=500, seed=11) == cz.confounding_gap(0.8, n=500, seed=11)


# ---------------------------------------------------------------- exact means and sampling


def test_exact_do_mean_agrees_with_simulation_all_states():
    scm = cz.unconfounded_discrete()
    for cval in (0, 1, 2):
        y, se = _sim_mean_se(scm.sample(N, seed=10 + cval, do={"C": cval})["Y"])
        assert _close(y, scm.exact_do_mean("Y", "C", cval), se)
    conf = cz.confounded_discrete(0.9)
    for xv in (0, 1):
        y, se = _sim_mean_se(conf.sample(N, seed=20 + xv, do={"X": xv})["Y"])
        assert _close(y, conf.exact_do_mean("Y", "X", xv), se)
        assert conf.exact_do_mean("Y", "X", xv) == pytest.approx(0.1 + 0.2 * xv + 0.3)


def test_intervention_cuts_incoming_edges():
    lg = cz.linear_gaussian_confounded(2.0, 0.5, 1.0)
    s = lg.sample(N, seed=30)
    assert np.corrcoef(s["C"], s["X"])[0, 1] > 0.8
    d = lg.sample(N, seed=30, do={"X": 3.0})
    assert np.all(d["X"] == 3.0)
    assert abs(d["C"].mean()) < K / np.sqrt(N)  # C is upstream: unaffected
    disc = cz.confounded_discrete(0.8).sample(N, seed=31, do={"X": 0})
    assert np.all(disc["X"] == 0) and abs(disc["C"].mean() - 0.5) < K * 0.5 / np.sqrt(N)


def test_sampling_is_deterministic_under_seed():
    scm = cz.confounded_discrete(0.5)
    a, b, c = scm.sample(1000, seed=3), scm.sample(1000, seed=3), scm.sample(1000, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    lg = cz.linear_gaussian_confounded()
    assert all(np.array_equal(lg.sample(50, 9)[k], lg.sample(50, 9)[k]) for k in ("C", "X", "Y"))
    assert cz.backdoor_effect(a, "X", "Y", "C", 1) == cz.backdoor_effect(b, "X", "Y", "C", 1)


def test_linear_gaussian_conditional_mean_matches_sample_regression():
    lg = cz.LinearGaussianSCM(
        (
            cz.LinearGaussianVariable("A", intercept=1.0, sd=2.0),
            cz.LinearGaussianVariable("B", ("A",), (0.5,), intercept=-1.0, sd=0.5),
            cz.LinearGaussianVariable("C", ("A", "B"), (1.0, -2.0), intercept=0.3),
        )
    )
    mu, cov = lg.mean_cov()
    s = lg.sample(N, seed=40)
    emp = np.array([s[k].mean() for k in lg.names])
    assert np.all(np.abs(emp - mu) < K * np.sqrt(np.diag(cov) / N))
    assert lg.total_effect("A", "C") == pytest.approx(1.0 + 0.5 * -2.0)  # sum of path products
    # E[C | B=b] from the model vs. least squares on samples
    slope, icpt = np.polyfit(s["B"], s["C"], 1)
    assert lg.exact_conditional_mean("C", "B", 1.0) == pytest.approx(slope + icpt, abs=0.05)


# ---------------------------------------------------------------- graph, criterion


def test_graph_accessors_and_topological_order():
    scm = cz.confounded_discrete(0.3)
    assert scm.parents("Y") == ("X", "C")
    assert scm.graph() == {"C": (), "X": ("C",), "Y": ("X", "C")}
    order = scm.topological_order()
    for child, ps in scm.graph().items():
        assert all(order.index(p) < order.index(child) for p in ps)
    g = cz.restoration_graph()
    assert g.parents("I_d") == ("D", "I_c")
    assert g.children("D") == ("f", "I_d")
    assert set(g.graph()) == {"D", "I_c", "f", "I_d", "I_o"}
    with pytest.raises(ValueError, match="cycle"):
        cz.CausalGraph.from_edges([("A", "B"), ("B", "C"), ("C", "A")])


def test_layout_and_display_labels():
    g = cz.restoration_graph()
    pos = g.layout()
    assert set(pos) == set(g.nodes)
    layer = g.layers()
    assert all(pos[n][0] == pytest.approx(1.5 * layer[n]) for n in g.nodes)  # left-to-right layers
    assert len(set(pos.values())) == len(pos)  # no two nodes on one spot
    assert cz.m_bias_graph().display_labels()["U1"] == "$U1$"
    assert cz.CausalGraph.from_parents({"I_o": ["I_d"]}).display_labels() == {"I_d": "$I_{d}$", "I_o": "$I_{o}$"}
    named = cz.CausalGraph.from_parents({"Y": ["X"]}, labels={"X": "treatment"})
    assert named.display_labels() == {"X": "treatment", "Y": "$Y$"}


def test_backdoor_criterion_accepts_and_rejects():
    conf = cz.confounded_discrete(0.8)
    assert cz.satisfies_backdoor(conf, "X", "Y", ["C"])
    assert not cz.satisfies_backdoor(conf, "X", "Y", [])  # open X <- C -> Y
    # descendant of X (mediator M) is never allowed
    med = cz.CausalGraph.from_parents({"X": ["C"], "M": ["X"], "Y": ["M", "C"]})
    chk = cz.check_backdoor(med, "X", "Y", ["C", "M"])
    assert not chk.ok and "'M'" in chk.reason and "descendant" in chk.reason
    assert cz.satisfies_backdoor(med, "X", "Y", ["C"])
    # M-bias: conditioning on the collider M opens X <- U1 -> M <- U2 -> Y
    m = cz.m_bias_graph()
    assert cz.satisfies_backdoor(m, "X", "Y", [])
    chk = cz.check_backdoor(m, "X", "Y", ["M"])
    assert not chk.ok and "X <- U1 -> M <- U2 -> Y" in chk.reason
    assert cz.satisfies_backdoor(m, "X", "Y", ["M", "U1"])
    assert cz.satisfies_backdoor(m, "X", "Y", ["M", "U2"])
    # plain mapping input works too
    assert cz.satisfies_backdoor({"X": ["C"], "Y": ["X", "C"]}, "X", "Y", "C")


@pytest.mark.parametrize("explicit_f", [True, False])
def test_restoration_graph_backdoor(explicit_f):
    g = cz.restoration_graph(explicit_f=explicit_f)
    assert cz.satisfies_backdoor(g, "I_d", "I_o", ["D"])  # eq. BD-IR
    assert not cz.satisfies_backdoor(g, "I_d", "I_o", [])
    assert not cz.satisfies_backdoor(g, "I_d", "I_o", ["I_c"])
    assert cz.satisfies_backdoor(g, "I_d", "I_o", ["D", "I_c"])
    split = cz.restoration_graph(explicit_f=explicit_f, split_distortion=True)
    assert cz.satisfies_backdoor(split, "I_d", "I_o", ["D_t", "D_l"])
    assert not cz.satisfies_backdoor(split, "I_d", "I_o", ["D_t"])


def _d_connected_by_paths(g: cz.CausalGraph, x: str, y: str, zs: set[str]) -> bool:
    """Reference: X, Y d-connected given Z iff some simple path has every node open."""
    edges = set(g.edges)
    nbrs = {n: set(g.parents(n)) | set(g.children(n)) for n in g.nodes}
    anc_z = zs | (g.ancestors(tuple(zs)) if zs else set())

    def paths(path):
        if path[-1] == y:
            yield path
            return
        for m in nbrs[path[-1]]:
            if m not in path:
                yield from paths(path + [m])

    for p in paths([x]):
        ok = True
        for a, m, b in zip(p, p[1:], p[2:]):
            collider = (a, m) in edges and (b, m) in edges
            if (collider and m not in anc_z) or (not collider and m in zs):
                ok = False
                break
        if ok:
            return True
    return False


def test_d_separation_matches_path_enumeration_on_random_dags():
    rng = np.random.default_rng(50)
    names = [f"V{i}" for i in range(6)]
    for _ in range(25):
        edges = [(names[i], names[j]) for i, j in itertools.combinations(range(6), 2) if rng.random() < 0.4]
        g = cz.CausalGraph(tuple(names), tuple(edges))
        for _ in range(6):
            x, y = rng.choice(names, 2, replace=False)
            rest = [n for n in names if n not in (x, y)]
            zs = {n for n in rest if rng.random() < 0.35}
            assert cz.d_separated(g, x, y, zs) == (not _d_connected_by_paths(g, x, y, zs))


# ---------------------------------------------------------------- errors


def test_unknown_names_list_valid_names():
    conf = cz.confounded_discrete(0.5)
    with pytest.raises(ValueError) as e:
        cz.satisfies_backdoor(conf, "X", "Y", ["Q"])
    assert "'Q'" in str(e.value) and all(f"'{n}'" in str(e.value) for n in ("C", "X", "Y"))
    with pytest.raises(ValueError, match=r"valid names: \['D', 'I_c', 'f', 'I_d', 'I_o'\]"):
        cz.check_backdoor(cz.restoration_graph(), "I_x", "I_o", ["D"])
    with pytest.raises(ValueError, match="valid names"):
        conf.parents("Z")
    with pytest.raises(ValueError, match="valid names"):
        conf.sample(10, seed=0, do={"Z": 1})
    with pytest.raises(ValueError, match="valid states"):
        conf.sample(10, seed=0, do={"X": 7})
    obs = conf.sample(100, seed=0)
    with pytest.raises(ValueError, match=r"\['Z'\].*valid names: \['C', 'X', 'Y'\]"):
        cz.backdoor_effect(obs, "X", "Y", ["Z"], 1)
    with pytest.raises(ValueError, match="method"):
        cz.backdoor_effect(obs, "X", "Y", ["C"], 1, method="ipw")


def test_empty_stratum_is_named():
    samples = {"C": np.array([0, 0, 1, 1, 1]), "X": np.array([0, 0, 0, 1, 1]), "Y": np.array([0, 1, 1, 1, 0])}
    with pytest.raises(ValueError, match=r"stratum C=0 .*X=1"):
        cz.backdoor_effect(samples, "X", "Y", ["C"], 1)


def test_invalid_model_definitions_raise():
    with pytest.raises(ValueError, match="shape"):
        cz.DiscreteVariable("Y", (0, 1), np.full((2, 3), 0.5), parents=("X",))
    with pytest.raises(ValueError, match="sum to 1"):
        cz.DiscreteVariable("X", (0, 1), [0.4, 0.4])
    with pytest.raises(ValueError, match="unknown parent"):
        cz.DiscreteSCM((cz.DiscreteVariable("Y", (0, 1), [[0.5, 0.5], [0.5, 0.5]], parents=("X",)),))
    with pytest.raises(ValueError, match="one coefficient per parent"):
        cz.LinearGaussianVariable("Y", ("X", "C"), (1.0,))
    with pytest.raises(ValueError, match="strength"):
        cz.confounded_discrete(1.5)


def test_reason_names_path_opened_by_collider_descendant():
    g = cz.CausalGraph.from_edges(
        [("U1", "X"), ("U1", "M"), ("U2", "M"), ("U2", "Y"), ("X", "Y"), ("M", "W")]
    )
    chk = cz.check_backdoor(g, "X", "Y", ["W"])  # W is a descendant of the collider M
    assert not chk.ok and "X <- U1 -> M <- U2 -> Y" in chk.reason
    assert cz.satisfies_backdoor(g, "X", "Y", ["W", "U2"])


def test_stratified_se_includes_stratum_weight_uncertainty():
    # Y = C exactly, X independent of C: all uncertainty comes from P_hat(C = c).
    n = 4_000
    rng = np.random.default_rng(60)
    c = rng.integers(0, 2, n)
    samples = {"C": c, "X": rng.integers(0, 2, n), "Y": c}
    est = cz.backdoor_effect(samples, "X", "Y", ["C"], 1)
    assert est.se == pytest.approx(0.5 / np.sqrt(n), rel=0.05)
