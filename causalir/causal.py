"""Small structural causal models (SCMs), d-separation and back-door adjustment.

This module is the causal-inference toolkit behind the DIL notebook (Li et al., CVPR 2023,
"Learning Distortion Invariant Representation for Image Restoration from a Causality
Perspective"). The poster states the back-door adjustment

    P(Y | do(X)) = sum_c P(Y | X, C = c) P(C = c)                                  (BD)

and its image-restoration instance

    P(I_o | do(I_d)) = sum_i P(I_o | I_d, D = d_i) P(D = d_i).                     (BD-IR)

Contents
--------
* :class:`CausalGraph` -- an immutable DAG (parents, children, topological order, layout).
* :class:`DiscreteSCM` -- variables with finite states and conditional probability tables.
* :class:`LinearGaussianSCM` -- ``V = intercept + sum_k coef_k * parent_k + N(0, sd^2)``.
* :func:`d_separated`, :func:`check_backdoor`, :func:`satisfies_backdoor` -- graph criteria.
* :func:`backdoor_effect`, :func:`naive_effect` -- estimators from observational samples.
* Example models: :func:`confounded_discrete`, :func:`unconfounded_discrete`,
  :func:`linear_gaussian_confounded`, :func:`m_bias_graph`, :func:`restoration_graph`.
* :func:`confounding_gap` -- one call for the notebook's confounding-strength slider.

The computations use numpy only (figures of these graphs are drawn by ``experiments.backdoor_toy.draw_graph``);
numbers are validated by :func:`causalir.utils.check_number`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Union

import numpy as np

from .utils import check_choice, check_number

__all__ = [
    "BackdoorCheck",
    "CausalGraph",
    "DiscreteSCM",
    "DiscreteVariable",
    "EffectEstimate",
    "LinearGaussianSCM",
    "LinearGaussianVariable",
    "as_graph",
    "backdoor_effect",
    "check_backdoor",
    "confounded_discrete",
    "confounding_gap",
    "d_separated",
    "linear_gaussian_confounded",
    "m_bias_graph",
    "naive_effect",
    "restoration_graph",
    "satisfies_backdoor",
    "unconfounded_discrete",
]

Seed = int | np.random.Generator | None


def _rng(seed: Seed) -> np.random.Generator:
    """Return a numpy Generator from an int seed, an existing Generator, or None."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int, a numpy Generator or None, got {type(seed).__name__}")


def _check_n(owner: str, n: Any) -> int:
    """A sample count: an integer >= 0."""
    return check_number(owner, "n", n, lo=0, integer=True)


def _check_values(owner: str, field: str, values: Mapping[str, Any] | None) -> None:
    """Every value of a ``do`` / ``given`` mapping of a linear-Gaussian model is a finite number."""
    for k, v in (values or {}).items():
        check_number(owner, f"{field}[{k!r}]", v)


def _as_tuple(names: str | Iterable[str] | None) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CausalGraph:
    """An immutable directed acyclic graph.

    ``nodes`` fixes the node order; ``edges`` holds ``(parent, child)`` pairs; ``labels`` maps
    node names to display labels (see :meth:`display_labels`; matplotlib mathtext allowed).
    """

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "edges", tuple((str(a), str(b)) for a, b in self.edges))
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(set(self.nodes)) != len(self.nodes):
            dup = sorted({n for n in self.nodes if self.nodes.count(n) > 1})
            raise ValueError(f"duplicate node names: {dup}")
        known = set(self.nodes)
        for a, b in self.edges:
            bad = [v for v in (a, b) if v not in known]
            if bad:
                raise ValueError(
                    f"edge {a!r} -> {b!r} uses unknown node(s) {bad}; valid names: {list(self.nodes)}"
                )
            if a == b:
                raise ValueError(f"self-loop on {a!r}: a DAG has no edge from a node to itself")
        for name, _ in self.labels:
            if name not in known:
                raise ValueError(f"label for unknown node {name!r}; valid names: {list(self.nodes)}")
        self.topological_order()  # raises on cycles

    # constructors ---------------------------------------------------------------------------
    @classmethod
    def from_parents(
        cls, parents: Mapping[str, Iterable[str]], labels: Mapping[str, str] | None = None
    ) -> CausalGraph:
        """Build from ``{child: [parents...]}``; parents not listed as keys become root nodes."""
        nodes: list[str] = list(parents)
        for ps in parents.values():
            for p in _as_tuple(ps):
                if p not in nodes:
                    nodes.append(p)
        edges = tuple((p, c) for c, ps in parents.items() for p in _as_tuple(ps))
        return cls(tuple(nodes), edges, tuple((labels or {}).items()))

    @classmethod
    def from_edges(
        cls,
        edges: Iterable[tuple[str, str]],
        nodes: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> CausalGraph:
        """Build from ``(parent, child)`` pairs; ``nodes`` may add isolated nodes or fix the order."""
        edges = tuple(edges)
        order = list(nodes)
        for a, b in edges:
            for v in (a, b):
                if v not in order:
                    order.append(v)
        return cls(tuple(order), edges, tuple((labels or {}).items()))

    # queries --------------------------------------------------------------------------------
    def check_names(self, names: str | Iterable[str], role: str = "node") -> tuple[str, ...]:
        """Return ``names`` as a tuple; raise ValueError listing the valid names if any is unknown."""
        names = _as_tuple(names)
        unknown = [n for n in names if n not in self.nodes]
        if unknown:
            raise ValueError(f"unknown {role} name(s) {unknown}; valid names: {list(self.nodes)}")
        return names

    def parents(self, name: str) -> tuple[str, ...]:
        """Direct causes of ``name`` (in node order)."""
        (name,) = self.check_names(name)
        ps = {a for a, b in self.edges if b == name}
        return tuple(n for n in self.nodes if n in ps)

    def children(self, name: str) -> tuple[str, ...]:
        """Direct effects of ``name`` (in node order)."""
        (name,) = self.check_names(name)
        cs = {b for a, b in self.edges if a == name}
        return tuple(n for n in self.nodes if n in cs)

    def graph(self) -> dict[str, tuple[str, ...]]:
        """The DAG as ``{node: parents}``."""
        return {n: self.parents(n) for n in self.nodes}

    def topological_order(self) -> tuple[str, ...]:
        """Kahn's algorithm, ties broken by node order; raises ValueError on a cycle."""
        indeg = {n: 0 for n in self.nodes}
        for _, b in self.edges:
            indeg[b] += 1
        order: list[str] = []
        ready = [n for n in self.nodes if indeg[n] == 0]
        while ready:
            n = ready.pop(0)
            order.append(n)
            for a, b in self.edges:
                if a == n:
                    indeg[b] -= 1
                    if indeg[b] == 0:
                        ready.append(b)
            ready.sort(key=self.nodes.index)
        if len(order) != len(self.nodes):
            raise ValueError(f"graph has a cycle among {sorted(set(self.nodes) - set(order))}")
        return tuple(order)

    def ancestors(self, names: str | Iterable[str]) -> set[str]:
        """All ancestors of ``names`` (excluding the nodes themselves unless reachable)."""
        return self._reach(self.check_names(names), upward=True)

    def descendants(self, names: str | Iterable[str]) -> set[str]:
        """All descendants of ``names`` (excluding the nodes themselves)."""
        return self._reach(self.check_names(names), upward=False)

    def _reach(self, start: tuple[str, ...], upward: bool) -> set[str]:
        seen: set[str] = set()
        stack = list(start)
        while stack:
            n = stack.pop()
            nxt = [a for a, b in self.edges if b == n] if upward else [b for a, b in self.edges if a == n]
            for m in nxt:
                if m not in seen:
                    seen.add(m)
                    stack.append(m)
        return seen

    def without_outgoing(self, name: str) -> CausalGraph:
        """The graph with every edge out of ``name`` removed (used by the back-door criterion)."""
        (name,) = self.check_names(name)
        return CausalGraph(self.nodes, tuple(e for e in self.edges if e[0] != name), self.labels)

    def without_incoming(self, names: str | Iterable[str]) -> CausalGraph:
        """The mutilated graph of ``do(names)``: every edge into ``names`` removed."""
        names = set(self.check_names(names))
        return CausalGraph(self.nodes, tuple(e for e in self.edges if e[1] not in names), self.labels)

    def layers(self) -> dict[str, int]:
        """Layer of each node = length of the longest directed path reaching it from a root."""
        depth: dict[str, int] = {}
        for n in self.topological_order():
            ps = self.parents(n)
            depth[n] = 1 + max(depth[p] for p in ps) if ps else 0
        return depth

    def display_labels(self) -> dict[str, str]:
        """``{node: label}`` for figures: ``labels`` where given, else the name in mathtext (``I_d`` ->
        ``$I_{d}$``). Drawing lives with the notebooks (``experiments.backdoor_toy.draw_graph``)."""
        given = dict(self.labels)
        return {n: given.get(n, _math_label(n)) for n in self.nodes}

    def layout(self) -> dict[str, tuple[float, float]]:
        """``{node: (x, y)}``: node k of layer L (see :meth:`layers`) at x = 1.5 L, centred vertically."""
        return self._layered_positions()

    def _layered_positions(self) -> dict[str, tuple[float, float]]:
        layer = self.layers()
        by_layer: dict[int, list[str]] = {}
        for n in self.nodes:
            by_layer.setdefault(layer[n], []).append(n)
        pos = {}
        for k, members in by_layer.items():
            for i, n in enumerate(members):
                pos[n] = (1.5 * k, (len(members) - 1) / 2.0 - i)
        return pos


def _math_label(name: str) -> str:
    """``I_d`` -> ``$I_{d}$``; names without an underscore are shown in math italics."""
    if not name.replace("_", "").isalnum():
        return name
    if "_" in name:
        head, tail = name.split("_", 1)
        return f"${head}_{{{tail}}}$"
    return f"${name}$"


GraphLike = Union[CausalGraph, Mapping[str, Iterable[str]], "DiscreteSCM", "LinearGaussianSCM"]


def as_graph(obj: GraphLike) -> CausalGraph:
    """Accept a CausalGraph, an SCM, or a ``{child: parents}`` mapping and return a CausalGraph."""
    if isinstance(obj, CausalGraph):
        return obj
    if isinstance(obj, _SCMBase):
        return obj.causal_graph
    if isinstance(obj, Mapping):
        return CausalGraph.from_parents(obj)
    raise TypeError(
        f"expected a CausalGraph, an SCM or a {{child: parents}} mapping, got {type(obj).__name__}"
    )


# --------------------------------------------------------------------------------------------
# d-separation and the back-door criterion
# --------------------------------------------------------------------------------------------


def d_separated(
    graph: GraphLike, xs: str | Iterable[str], ys: str | Iterable[str], given: str | Iterable[str] = ()
) -> bool:
    """True iff ``xs`` and ``ys`` are d-separated by ``given`` in the DAG.

    Uses the moralized ancestral graph (Lauritzen et al. 1990): restrict to An(X u Y u Z) u (X u Y u Z),
    marry co-parents, drop directions, delete Z; X _||_ Y | Z iff no X-Y path remains.
    """
    g = as_graph(graph)
    xs, ys, zs = g.check_names(xs, "x"), g.check_names(ys, "y"), g.check_names(given, "conditioning")
    if set(xs) & set(ys):
        return False
    keep = set(xs) | set(ys) | set(zs)
    keep |= g.ancestors(tuple(keep)) if keep else set()
    adj: dict[str, set[str]] = {n: set() for n in keep}
    for n in keep:
        ps = [p for p in g.parents(n) if p in keep]
        for p in ps:
            adj[n].add(p)
            adj[p].add(n)
        for p, q in itertools.combinations(ps, 2):  # moralize: marry the parents
            adj[p].add(q)
            adj[q].add(p)
    blocked = set(zs)
    stack = [x for x in xs if x not in blocked]
    seen = set(stack)
    targets = set(ys)
    while stack:
        n = stack.pop()
        if n in targets:
            return False
        for m in adj[n]:
            if m not in seen and m not in blocked:
                seen.add(m)
                stack.append(m)
    return True


def _open_backdoor_path(
    g: CausalGraph, x: str, y: str, zs: set[str], max_paths: int = 10_000
) -> list[str] | None:
    """Find one open back-door path ``x <- ... y`` given ``zs`` by enumerating simple paths (for messages)."""
    nbrs = {n: set(g.parents(n)) | set(g.children(n)) for n in g.nodes}
    z_and_anc = zs | g.ancestors(tuple(zs)) if zs else set()
    count = 0

    def is_open(path: list[str]) -> bool:
        for a, m, b in zip(path, path[1:], path[2:]):
            collider = (a, m) in edges and (b, m) in edges
            if collider and m not in z_and_anc:
                return False
            if not collider and m in zs:
                return False
        return True

    edges = set(g.edges)
    stack: list[list[str]] = [[x, p] for p in g.parents(x)]
    while stack and count < max_paths:
        path = stack.pop()
        count += 1
        if path[-1] == y:
            if is_open(path):
                return path
            continue
        for m in nbrs[path[-1]]:
            if m not in path and m != x:
                stack.append(path + [m])
    return None


def _format_path(g: CausalGraph, path: list[str]) -> str:
    out = path[0]
    for a, b in itertools.pairwise(path):
        out += (" -> " if (a, b) in set(g.edges) else " <- ") + b
    return out


@dataclass(frozen=True)
class BackdoorCheck:
    """Result of :func:`check_backdoor`: ``ok`` and a human-readable ``reason``."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def check_backdoor(
    graph: GraphLike, treatment: str, outcome: str, adjust_for: str | Iterable[str] = ()
) -> BackdoorCheck:
    """Pearl's back-door criterion for Z = ``adjust_for`` relative to (X, Y) = (treatment, outcome).

    (i) no node of Z is a descendant of X; (ii) Z blocks every path between X and Y that starts
    with an arrow into X, i.e. X _||_ Y | Z in the graph with X's outgoing edges removed.
    When both hold, E[Y | do(X=x)] = sum_z E[Y | X=x, Z=z] P(Z=z)  (eq. BD).
    """
    g = as_graph(graph)
    (x,) = g.check_names(treatment, "treatment")
    (y,) = g.check_names(outcome, "outcome")
    zs = g.check_names(adjust_for, "adjust_for")
    if x == y:
        raise ValueError(f"treatment and outcome must differ, both are {x!r}")
    for v, role in ((x, "treatment"), (y, "outcome")):
        if v in zs:
            raise ValueError(f"adjust_for must not contain the {role} {v!r}")
    desc = g.descendants(x)
    bad = [z for z in zs if z in desc]
    if bad:
        return BackdoorCheck(
            False, f"{bad} {'is a descendant' if len(bad) == 1 else 'are descendants'} of {x!r}"
        )
    g_cut = g.without_outgoing(x)
    if d_separated(g_cut, x, y, zs):
        label = "{" + ", ".join(zs) + "}"
        return BackdoorCheck(
            True, f"{label} has no descendant of {x!r} and blocks every back-door path {x} <- ... {y}"
        )
    path = _open_backdoor_path(g_cut, x, y, set(zs))
    where = f": {_format_path(g, path)}" if path else ""
    return BackdoorCheck(False, f"a back-door path from {x!r} to {y!r} is open given {list(zs)}{where}")


def satisfies_backdoor(
    graph: GraphLike, treatment: str, outcome: str, adjust_for: str | Iterable[str] = ()
) -> bool:
    """True iff ``adjust_for`` satisfies the back-door criterion (see :func:`check_backdoor` for the reason)."""
    return check_backdoor(graph, treatment, outcome, adjust_for).ok


# --------------------------------------------------------------------------------------------
# Structural causal models
# --------------------------------------------------------------------------------------------


class _SCMBase:
    """Graph accessors shared by the SCM classes (expects ``self.variables`` with ``.name``/``.parents``)."""

    variables: tuple[Any, ...]

    def _check_variables(self) -> None:
        """Store the variables as a tuple; unique names and known parents, or a ValueError naming them."""
        object.__setattr__(self, "variables", tuple(self.variables))
        names = [v.name for v in self.variables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate variable names in {names}")
        for v in self.variables:
            unknown = [p for p in v.parents if p not in names]
            if unknown:
                raise ValueError(f"variable {v.name!r} has unknown parent(s) {unknown}; valid names: {names}")

    @cached_property
    def causal_graph(self) -> CausalGraph:
        return CausalGraph(
            tuple(v.name for v in self.variables),
            tuple((p, v.name) for v in self.variables for p in v.parents),
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def variable(self, name: str):
        self.causal_graph.check_names(name, "variable")
        return next(v for v in self.variables if v.name == name)

    def parents(self, name: str) -> tuple[str, ...]:
        """Direct causes of ``name`` in the order given in the variable's definition."""
        return tuple(self.variable(name).parents)

    def graph(self) -> dict[str, tuple[str, ...]]:
        """The DAG as ``{node: parents}``."""
        return {v.name: tuple(v.parents) for v in self.variables}

    def topological_order(self) -> tuple[str, ...]:
        return self.causal_graph.topological_order()

    def exact_mean(
        self, outcome: str, do: Mapping[str, Any] | None = None, given: Mapping[str, Any] | None = None
    ) -> float:
        raise NotImplementedError

    def exact_do_mean(self, outcome: str, treatment: str, value: Any) -> float:
        """E[outcome | do(treatment = value)] computed from the known model (no sampling)."""
        return self.exact_mean(outcome, do={treatment: value})

    def exact_conditional_mean(self, outcome: str, treatment: str, value: Any) -> float:
        """Observational E[outcome | treatment = value] computed from the known model (no sampling)."""
        return self.exact_mean(outcome, given={treatment: value})


@dataclass(frozen=True, eq=False)
class DiscreteVariable:
    """A variable with finite ``states`` and CPT ``P(V | parents)``.

    ``cpt`` has shape ``(len(states of parent 1), ..., len(states of parent k), len(states))``;
    ``cpt[i1, ..., ik, j] = P(V = states[j] | parent_1 = states_1[i1], ...)``; rows sum to 1.
    """

    name: str
    states: tuple[Any, ...]
    cpt: np.ndarray
    parents: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", tuple(self.states))
        object.__setattr__(self, "parents", _as_tuple(self.parents))
        try:
            cpt = np.array(self.cpt, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"variable {self.name!r}: cpt must be an array of probabilities, got {self.cpt!r}") from None
        if not np.all(np.isfinite(cpt)):
            raise ValueError(f"variable {self.name!r}: cpt entries must be finite probabilities, got "
                             f"{cpt[~np.isfinite(cpt)][:3].tolist()} among them")
        cpt.setflags(write=False)
        object.__setattr__(self, "cpt", cpt)
        if len(self.states) < 1 or len(set(self.states)) != len(self.states):
            raise ValueError(
                f"variable {self.name!r}: states must be non-empty and distinct, got {self.states}"
            )
        if cpt.ndim != len(self.parents) + 1 or cpt.shape[-1] != len(self.states):
            raise ValueError(
                f"variable {self.name!r}: cpt must have {len(self.parents) + 1} axes "
                f"(one per parent {list(self.parents)}, last = {len(self.states)} states), got shape {cpt.shape}"
            )
        if np.any(cpt < 0) or not np.allclose(cpt.sum(-1), 1.0, atol=1e-8):
            raise ValueError(
                f"variable {self.name!r}: cpt entries must be >= 0 and sum to 1 over the last axis"
            )


@dataclass(frozen=True, eq=False)
class DiscreteSCM(_SCMBase):
    """Discrete SCM: ``P(v_1..v_n) = prod_i P(v_i | pa_i)`` (Markov factorization)."""

    variables: tuple[DiscreteVariable, ...]

    def __post_init__(self) -> None:
        self._check_variables()
        for v in self.variables:
            for axis, p in enumerate(v.parents):
                k = len(self.variable(p).states)
                if v.cpt.shape[axis] != k:
                    raise ValueError(
                        f"variable {v.name!r}: cpt axis {axis} (parent {p!r}) must have length {k}, "
                        f"got {v.cpt.shape[axis]}"
                    )
        _ = self.causal_graph  # validates acyclicity

    def _state_index(self, name: str, value: Any) -> int:
        states = self.variable(name).states
        for j, s in enumerate(states):
            if s == value:
                return j
        raise ValueError(f"{value!r} is not a state of {name!r}; valid states: {list(states)}")

    def sample(self, n: int, seed: Seed = None, do: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Draw ``n`` samples by ancestral sampling; ``do={"X": x}`` cuts X's incoming edges and fixes X = x."""
        _check_n("DiscreteSCM.sample", n)
        rng = _rng(seed)
        do = dict(do or {})
        self.causal_graph.check_names(tuple(do), "do")
        fixed = {k: self._state_index(k, v) for k, v in do.items()}
        idx: dict[str, np.ndarray] = {}
        for name in self.topological_order():
            v = self.variable(name)
            if name in fixed:
                idx[name] = np.full(n, fixed[name], dtype=np.int64)
                continue
            probs = (
                v.cpt[tuple(idx[p] for p in v.parents)]
                if v.parents
                else np.broadcast_to(v.cpt, (n, len(v.states)))
            )
            u = rng.random(n)
            idx[name] = np.minimum((u[:, None] > np.cumsum(probs, axis=-1)).sum(-1), len(v.states) - 1)
        return {v.name: np.asarray(v.states)[idx[v.name]] for v in self.variables}

    def joint(self, do: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Enumerate the (mutilated) joint: returns ``(index_grid (m, n_vars), prob (m,))``.

        ``P_do(v) = prod_{i not in do} P(v_i | pa_i) * prod_{i in do} 1[v_i = x_i]`` (truncated factorization).
        """
        do = dict(do or {})
        self.causal_graph.check_names(tuple(do), "do")
        cards = [len(v.states) for v in self.variables]
        if int(np.prod(cards)) > 2_000_000:
            raise ValueError(
                f"joint has {int(np.prod(cards))} configurations; exact enumeration supports <= 2e6"
            )
        grid = np.array(list(itertools.product(*[range(k) for k in cards])), dtype=np.int64).reshape(
            -1, len(cards)
        )
        col = {v.name: i for i, v in enumerate(self.variables)}
        prob = np.ones(len(grid))
        for i, v in enumerate(self.variables):
            if v.name in do:
                prob *= grid[:, i] == self._state_index(v.name, do[v.name])
            else:
                prob *= v.cpt[tuple(grid[:, col[p]] for p in v.parents) + (grid[:, i],)]
        return grid, prob

    def exact_mean(
        self, outcome: str, do: Mapping[str, Any] | None = None, given: Mapping[str, Any] | None = None
    ) -> float:
        """``E[outcome | given, do] = sum_v y(v) P_do(v) 1[given] / sum_v P_do(v) 1[given]`` by enumeration."""
        self.causal_graph.check_names(outcome, "outcome")
        given = dict(given or {})
        self.causal_graph.check_names(tuple(given), "given")
        states = self.variable(outcome).states
        try:
            values = np.asarray(states, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(
                f"outcome {outcome!r} must have numeric states for a mean, got {list(states)}"
            ) from None
        grid, prob = self.joint(do)
        col = {v.name: i for i, v in enumerate(self.variables)}
        for k, val in given.items():
            prob = prob * (grid[:, col[k]] == self._state_index(k, val))
        total = prob.sum()
        if total <= 0:
            raise ValueError(f"conditioning event {given} has probability 0 (under do={dict(do or {})})")
        return float((values[grid[:, col[outcome]]] * prob).sum() / total)


@dataclass(frozen=True)
class LinearGaussianVariable:
    """``V = intercept + sum_k coefs[k] * parents[k] + sd * eps``, ``eps ~ N(0, 1)``."""

    name: str
    parents: tuple[str, ...] = ()
    coefs: tuple[float, ...] = ()
    intercept: float = 0.0
    sd: float = 1.0

    def __post_init__(self) -> None:
        owner = f"LinearGaussianVariable({self.name!r})"
        if isinstance(self.coefs, (str, bytes)):
            raise ValueError(f"{owner}.coefs: expected one number per parent, got {self.coefs!r}")
        for i, c in enumerate(self.coefs):
            check_number(owner, f"coefs[{i}]", c)
        check_number(owner, "intercept", self.intercept)
        check_number(owner, "sd", self.sd, lo=0)
        object.__setattr__(self, "parents", _as_tuple(self.parents))
        object.__setattr__(self, "coefs", tuple(float(c) for c in self.coefs))
        if len(self.coefs) != len(self.parents):
            raise ValueError(
                f"variable {self.name!r}: expected one coefficient per parent {list(self.parents)}, got {len(self.coefs)}"
            )
        if not self.sd >= 0:
            raise ValueError(f"variable {self.name!r}: sd must be >= 0, got {self.sd}")


@dataclass(frozen=True)
class LinearGaussianSCM(_SCMBase):
    """Linear-Gaussian SCM ``V = B V + c + diag(sd) eps`` so ``V = (I - B)^{-1} (c + diag(sd) eps)``.

    Entry ``[(I - B)^{-1}]_{yx}`` is the sum over directed paths x -> ... -> y of the product of
    path coefficients (Wright's path rule): the total causal effect of x on y.
    """

    variables: tuple[LinearGaussianVariable, ...]

    def __post_init__(self) -> None:
        self._check_variables()
        _ = self.causal_graph  # validates acyclicity

    def _matrices(self, do: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, c, sd) of the model mutilated by ``do``: rows of intervened variables become ``x_i`` exactly."""
        do = dict(do or {})
        self.causal_graph.check_names(tuple(do), "do")
        names = self.names
        k = len(names)
        B, c, sd = np.zeros((k, k)), np.zeros(k), np.zeros(k)
        for i, v in enumerate(self.variables):
            if v.name in do:
                c[i] = float(do[v.name])
                continue
            for p, w in zip(v.parents, v.coefs):
                B[i, names.index(p)] += w
            c[i], sd[i] = v.intercept, v.sd
        return B, c, sd

    def total_effect(self, treatment: str, outcome: str) -> float:
        """d E[outcome | do(treatment=x)] / dx = [(I - B)^{-1}]_{outcome, treatment} (sum of path products)."""
        g = self.causal_graph
        (x,) = g.check_names(treatment, "treatment")
        (y,) = g.check_names(outcome, "outcome")
        B, _, _ = self._matrices()
        A = np.linalg.inv(np.eye(len(B)) - B)
        return float(A[self.names.index(y), self.names.index(x)])

    def mean_cov(self, do: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``A c`` and covariance ``A diag(sd^2) A^T`` with ``A = (I - B)^{-1}`` (order: ``self.names``)."""
        _check_values("LinearGaussianSCM.mean_cov", "do", do)
        B, c, sd = self._matrices(do)
        A = np.linalg.inv(np.eye(len(B)) - B)
        return A @ c, A @ np.diag(sd**2) @ A.T

    def sample(
        self, n: int, seed: Seed = None, do: Mapping[str, float] | None = None
    ) -> dict[str, np.ndarray]:
        """Draw ``n`` samples in topological order; ``do={"X": x}`` cuts X's incoming edges and fixes X = x."""
        _check_n("LinearGaussianSCM.sample", n)
        _check_values("LinearGaussianSCM.sample", "do", do)
        rng = _rng(seed)
        do = dict(do or {})
        self.causal_graph.check_names(tuple(do), "do")
        eps = rng.standard_normal((len(self.variables), n))  # one row per variable, in definition order
        out: dict[str, np.ndarray] = {}
        for name in self.topological_order():
            i = self.names.index(name)
            v = self.variables[i]
            if name in do:
                out[name] = np.full(n, float(do[name]))
                continue
            val = v.intercept + v.sd * eps[i]
            for p, w in zip(v.parents, v.coefs):
                val = val + w * out[p]
            out[name] = val
        return {name: out[name] for name in self.names}

    def exact_mean(
        self, outcome: str, do: Mapping[str, float] | None = None, given: Mapping[str, float] | None = None
    ) -> float:
        """Gaussian conditioning in the mutilated model: ``mu_y + S_yg S_gg^{-1} (g - mu_g)``."""
        _check_values("LinearGaussianSCM.exact_mean", "given", given)
        self.causal_graph.check_names(outcome, "outcome")
        given = dict(given or {})
        self.causal_graph.check_names(tuple(given), "given")
        mu, S = self.mean_cov(do)
        y = self.names.index(outcome)
        if not given:
            return float(mu[y])
        gi = [self.names.index(k) for k in given]
        gval = np.array([float(given[k]) for k in given])
        Sgg = S[np.ix_(gi, gi)]
        if np.linalg.matrix_rank(Sgg) < len(gi):
            raise ValueError(
                f"conditioning on {list(given)} is degenerate (singular covariance) under do={dict(do or {})}"
            )
        return float(mu[y] + S[y, gi] @ np.linalg.solve(Sgg, gval - mu[gi]))


# --------------------------------------------------------------------------------------------
# Estimators from observational samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EffectEstimate:
    """An estimate of E[outcome | do(treatment = value)] (or of E[outcome | treatment = value]).

    ``se`` is a plug-in standard error (delta method, large-sample); ``method`` is
    ``"stratify"`` or ``"regression"``; ``n_used`` counts samples with a finite contribution.
    """

    value: float
    se: float
    method: str
    treatment: str
    outcome: str
    adjust_for: tuple[str, ...]
    treatment_value: Any
    n_used: int

    def __float__(self) -> float:
        return self.value


def _columns(samples: Mapping[str, Any], names: Sequence[str], role: str) -> list[np.ndarray]:
    unknown = [n for n in names if n not in samples]
    if unknown:
        raise ValueError(f"unknown {role} column(s) {unknown}; valid names: {list(samples)}")
    cols = [np.asarray(samples[n]) for n in names]
    lengths = {len(c) for c in cols}
    if len(lengths) > 1:
        raise ValueError(f"columns {list(names)} have different lengths {sorted(lengths)}")
    return cols


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _is_discrete(col: np.ndarray, max_levels: int) -> bool:
    if col.dtype.kind in "biuUSO":
        return True
    return len(np.unique(col)) <= max_levels


def backdoor_effect(
    samples: Mapping[str, Any],
    treatment: str,
    outcome: str,
    adjust_for: str | Iterable[str],
    treatment_value: Any,
    method: Literal["auto", "stratify", "regression"] = "auto",
    max_levels: int = 10,
) -> EffectEstimate:
    """Estimate E[Y | do(X = x)] by back-door adjustment for Z = ``adjust_for`` (eq. BD).

    * ``"stratify"``: ``sum_z mean(Y | X = x, Z = z) * P_hat(Z = z)`` over the observed strata of Z.
    * ``"regression"``: least squares ``Y ~ 1 + X + Z``, evaluated at X = x and averaged over the
      empirical Z: ``b0 + b_x x + b_z . mean(Z)``.
    * ``"auto"``: stratify if X and every Z column are discrete (integer/bool/str dtype or at most
      ``max_levels`` distinct values), else regression.

    Validity of the result requires that Z satisfies the back-door criterion (:func:`check_backdoor`).
    """
    check_choice("backdoor_effect", "method", method, ("auto", "stratify", "regression"))
    check_number("backdoor_effect", "max_levels", max_levels, lo=1, integer=True)
    if not isinstance(samples, Mapping):
        raise TypeError(f"backdoor_effect samples: expected a {{name: column}} dict, got {type(samples).__name__}")
    adjust_for = _as_tuple(adjust_for)
    x_col, y_col = _columns(samples, (treatment, outcome), "treatment/outcome")
    z_cols = _columns(samples, adjust_for, "adjust_for")
    if z_cols and len(z_cols[0]) != len(x_col):
        raise ValueError("adjust_for columns must have the same length as treatment and outcome")
    if method == "auto":
        discrete = _is_discrete(x_col, max_levels) and all(_is_discrete(z, max_levels) for z in z_cols)
        method = "stratify" if discrete else "regression"
    if method not in ("stratify", "regression"):
        raise ValueError(f"method must be 'auto', 'stratify' or 'regression', got {method!r}")
    try:
        y = y_col.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"outcome {outcome!r}: expected a numeric column, got dtype {y_col.dtype}") from None
    n = len(y)
    if n == 0:
        raise ValueError(f"samples are empty: columns {[treatment, outcome, *adjust_for]} have no rows; expected at "
                         "least one sample")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"outcome {outcome!r}: expected finite values, got {int((~np.isfinite(y)).sum())} NaN or "
                         "infinite")
    for name, col in ((treatment, x_col), *zip(adjust_for, z_cols)):
        if col.dtype.kind in "fc" and not np.all(np.isfinite(col)):
            raise ValueError(f"column {name!r}: expected finite values, got {int((~np.isfinite(col)).sum())} NaN or "
                             "infinite")
    common = {
        "treatment": treatment,
        "outcome": outcome,
        "adjust_for": adjust_for,
        "treatment_value": treatment_value,
    }

    if method == "stratify":
        at_x = x_col == treatment_value
        if not at_x.any():
            raise ValueError(
                f"no sample has {treatment}={treatment_value!r}; stratification needs such samples"
            )
        if z_cols:
            keys = np.stack([np.unique(z, return_inverse=True)[1].reshape(-1) for z in z_cols], axis=1)
            strata, inverse = np.unique(keys, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
        else:
            strata, inverse = np.zeros((1, 0)), np.zeros(n, dtype=np.int64)
        est, var_within, means, weights = 0.0, 0.0, [], []
        for s in range(len(strata)):
            in_s = inverse == s
            p_z = in_s.mean()
            sel = in_s & at_x
            if not sel.any():
                first = np.flatnonzero(in_s)[0]
                label = ", ".join(f"{name}={_plain(z[first])!r}" for name, z in zip(adjust_for, z_cols))
                raise ValueError(
                    f"stratum {label} (P={p_z:.3g}) has no sample with {treatment}={treatment_value!r}: "
                    "positivity fails, E[Y | X=x, Z=z] is not identified there"
                )
            ys = y[sel]
            m = ys.mean()
            est += p_z * m
            var_within += p_z**2 * (ys.var(ddof=1) if len(ys) > 1 else 0.0) / len(ys)
            means.append(m)
            weights.append(p_z)
        means_a, w = np.array(means), np.array(weights)
        var_between = float((w * means_a**2).sum() - (w * means_a).sum() ** 2) / n  # from P_hat(Z=z)
        return EffectEstimate(
            float(est),
            float(np.sqrt(var_within + max(var_between, 0.0))),
            "stratify",
            n_used=int(at_x.sum()),
            **common,
        )

    try:
        x = x_col.astype(float)
        Z = np.stack([z.astype(float) for z in z_cols], axis=1) if z_cols else np.zeros((n, 0))
    except (TypeError, ValueError):
        raise ValueError(f"regression needs numeric columns {[treatment, *adjust_for]}; use method='stratify' for "
                         "categorical ones") from None
    if not isinstance(treatment_value, (bool, np.bool_)):
        check_number("backdoor_effect", "treatment_value", treatment_value)
    design = np.column_stack([np.ones(n), x, Z])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(f"regression design [1, {treatment}, {list(adjust_for)}] is rank deficient")
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    zbar = Z.mean(axis=0)
    g = np.concatenate([[1.0, float(treatment_value)], zbar])
    resid = y - design @ beta
    dof = max(n - design.shape[1], 1)
    cov_beta = (resid @ resid / dof) * np.linalg.inv(design.T @ design)
    bz = beta[2:]
    var = g @ cov_beta @ g + (bz @ np.cov(Z.T, ddof=1).reshape(len(bz), len(bz)) @ bz / n if len(bz) else 0.0)
    return EffectEstimate(float(g @ beta), float(np.sqrt(var)), "regression", n_used=n, **common)


def naive_effect(
    samples: Mapping[str, Any],
    treatment: str,
    outcome: str,
    value: Any,
    method: Literal["auto", "stratify", "regression"] = "auto",
) -> EffectEstimate:
    """The associational E[Y | X = x] (no adjustment): back-door adjustment with Z = {} ."""
    return backdoor_effect(samples, treatment, outcome, (), value, method=method)


# --------------------------------------------------------------------------------------------
# Example models
# --------------------------------------------------------------------------------------------


def confounded_discrete(strength: float = 0.8) -> DiscreteSCM:
    """Binary C -> X, C -> Y, X -> Y; ``strength`` in [0, 1] scales the C -> X edge.

    ``C ~ Bern(0.5)``; ``P(X=1 | C=c) = 0.5 + 0.45 * strength * (2c - 1)``;
    ``P(Y=1 | X=x, C=c) = 0.1 + 0.2 x + 0.6 c``. Hence ``E[Y | do(X=1)] = 0.6`` for every strength,
    while ``E[Y | X=1] = 0.3 + 0.6 P(C=1 | X=1) = 0.6 + 0.27 * strength``. With strength = 0, X is
    independent of C and there is no confounding.
    """
    check_number("confounded_discrete", "strength", strength, lo=0, hi=1)
    px1 = np.array([0.5 - 0.45 * strength, 0.5 + 0.45 * strength])
    py1 = np.array([[0.1 + 0.2 * xv + 0.6 * cv for cv in (0, 1)] for xv in (0, 1)])  # [x, c]
    return DiscreteSCM(
        (
            DiscreteVariable("C", (0, 1), [0.5, 0.5]),
            DiscreteVariable("X", (0, 1), np.stack([1 - px1, px1], axis=-1), parents=("C",)),
            DiscreteVariable("Y", (0, 1), np.stack([1 - py1, py1], axis=-1), parents=("X", "C")),
        )
    )


def unconfounded_discrete() -> DiscreteSCM:
    """X -> Y <- C with X independent of C (C has 3 states): naive, adjusted and true effects agree.

    ``X ~ Bern(0.3)``, ``C ~ Cat(0.5, 0.3, 0.2)``, ``P(Y=1 | x, c) = 0.15 + 0.25 x + 0.2 c``,
    so ``E[Y | do(X=1)] = E[Y | X=1] = 0.15 + 0.25 + 0.2 * 0.7 = 0.54``.
    """
    py1 = np.array([[0.15 + 0.25 * xv + 0.2 * cv for cv in (0, 1, 2)] for xv in (0, 1)])  # [x, c]
    return DiscreteSCM(
        (
            DiscreteVariable("X", (0, 1), [0.7, 0.3]),
            DiscreteVariable("C", (0, 1, 2), [0.5, 0.3, 0.2]),
            DiscreteVariable("Y", (0, 1), np.stack([1 - py1, py1], axis=-1), parents=("X", "C")),
        )
    )


def linear_gaussian_confounded(a: float = 1.0, b: float = 0.5, c: float = 1.0) -> LinearGaussianSCM:
    """``C ~ N(0,1)``, ``X = a C + N(0,1)``, ``Y = b X + c C + N(0,1)``.

    Closed forms: ``E[Y | do(X=x)] = b x`` (causal slope b), while the observational slope is
    ``E[Y | X=x] / x = b + a c / (a^2 + 1)`` -- the confounding bias is ``a c / (a^2 + 1)``.
    """
    for k, v in (("a", a), ("b", b), ("c", c)):
        check_number("linear_gaussian_confounded", k, v)
    return LinearGaussianSCM(
        (
            LinearGaussianVariable("C"),
            LinearGaussianVariable("X", ("C",), (a,)),
            LinearGaussianVariable("Y", ("X", "C"), (b, c)),
        )
    )


def m_bias_graph() -> CausalGraph:
    """M-bias: X <- U1 -> M <- U2 -> Y and X -> Y. {} is a valid adjustment set; {M} is not
    (M is a collider, conditioning on it opens X <- U1 -> M <- U2 -> Y); {M, U1} is valid again."""
    return CausalGraph.from_edges(
        [("U1", "X"), ("U1", "M"), ("U2", "M"), ("U2", "Y"), ("X", "Y")], nodes=("U1", "U2", "X", "M", "Y")
    )


def restoration_graph(explicit_f: bool = True, split_distortion: bool = False) -> CausalGraph:
    """The DIL poster's causal graph of image restoration.

    Nodes: ``D`` distortion set (types D_t, degrees D_l), ``I_c`` clean image, ``I_d`` distorted
    image, ``I_o`` restored image, and (``explicit_f``) ``f`` the restoration network.
    Edges: ``D -> I_d``, ``I_c -> I_d``, ``I_d -> I_o``, plus the spurious path created by ERM:
    f is fitted on the training distortions, so ``D -> f -> I_o`` (``explicit_f=True``, default),
    or collapsed to ``D -> I_o`` (``explicit_f=False``). We draw no ``I_c -> f`` edge: the training
    clean images are a fixed data set, not the test image I_c. ``D`` is then a confounder of
    ``I_d -> I_o`` and {D} satisfies the back-door criterion (eq. BD-IR).
    With ``split_distortion=True``, D is replaced by its two components D_t and D_l (each with the
    same children), and {D_t, D_l} is the adjustment set.
    """
    ds = ("D_t", "D_l") if split_distortion else ("D",)
    mid = ("f",) if explicit_f else ()
    edges = [(d, "I_d") for d in ds] + [("I_c", "I_d"), ("I_d", "I_o")]
    if explicit_f:
        edges += [(d, "f") for d in ds] + [("f", "I_o")]
    else:
        edges += [(d, "I_o") for d in ds]
    return CausalGraph.from_edges(edges, nodes=(*ds, "I_c", *mid, "I_d", "I_o"))


def confounding_gap(strength: float, n: int = 20_000, seed: Seed = 0) -> dict[str, float]:
    """For :func:`confounded_discrete` at ``strength``: naive E[Y|X=1], back-door adjusted estimate,
    exact E[Y|do(X=1)], and the mean of Y over ``n`` samples drawn under do(X=1)."""
    check_number("confounding_gap", "n", n, lo=1, integer=True)
    scm = confounded_discrete(strength)
    rng = _rng(seed)
    obs = scm.sample(n, rng)
    interv = scm.sample(n, rng, do={"X": 1})
    return {
        "naive": naive_effect(obs, "X", "Y", 1).value,
        "adjusted": backdoor_effect(obs, "X", "Y", ("C",), 1).value,
        "true": scm.exact_do_mean("Y", "X", 1),
        "simulated": float(interv["Y"].mean()),
    }
