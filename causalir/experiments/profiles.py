"""The only profile selector: ``select(PROFILES, name, overrides)``.

Every experiment module holds ``PROFILES = {"quick": ..., "medium": ..., "full": ...}`` of frozen dataclasses.
An override replaces one field; an unknown field is an error naming the valid ones; a nested dataclass field
takes a dict (applied recursively, with the same checks); a tuple field takes any list.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, TypeVar

NAMES = ("quick", "medium", "full")

P = TypeVar("P")


def check_profile(profile: str) -> str:
    """``profile`` if it is one of quick | medium | full, else a ValueError naming the valid ones."""
    if profile not in NAMES:
        raise ValueError(f"profile: unknown profile {profile!r}; valid profiles: {', '.join(NAMES)}")
    return profile


def check_model(owner: str, model: Any, model_cfg: Any) -> None:
    """A profile's ``model`` must be a registered backbone and ``model_cfg`` a dict of its options."""
    from .. import models
    from ..utils import check_choice

    check_choice(owner, "model", model, models.names())
    if not isinstance(model_cfg, Mapping):
        raise TypeError(f"{owner}.model_cfg: expected a dict of model options, got {model_cfg!r}")


def override(obj: P, overrides: Optional[Mapping[str, Any]], where: str = "") -> P:
    """``obj`` (a dataclass instance) with ``overrides`` applied; nested dataclass fields take dicts."""
    if not overrides:
        return obj
    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"override: {type(obj).__name__} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
    bad = sorted(set(overrides) - set(fields))
    if bad:
        raise TypeError(f"unknown override(s) {', '.join(where + b for b in bad)} for {type(obj).__name__}; "
                        f"valid fields: {', '.join(fields)}")
    new = {}
    for k, v in overrides.items():
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, Mapping):
            v = override(cur, v, where=f"{where}{k}.")
        elif isinstance(cur, tuple) and isinstance(v, list):
            v = tuple(v)
        new[k] = v
    return dataclasses.replace(obj, **new)


def select(profiles: Mapping[str, P], name: str, overrides: Optional[Mapping[str, Any]] = None) -> P:
    """The profile ``name`` of ``profiles`` with ``overrides`` applied (see the module docstring)."""
    check_profile(name)
    if name not in profiles:
        raise ValueError(f"profile: {name!r} is not defined here; defined: {', '.join(profiles)}")
    return override(profiles[name], overrides)
