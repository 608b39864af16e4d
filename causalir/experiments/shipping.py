"""Shipped models (issue 16): the trained networks of a committed run, so that a notebook shows trained behaviour
in seconds instead of retraining.

Layout::

    data/models/<experiment>/<profile>/seed-<S>/models.json      the manifest: one model card per network
    data/models/<experiment>/<profile>/seed-<S>/<label>.safetensors

A model card holds the architecture and config, the file's sha256 and size, the parameter count and, for a
restorer, what it reached on the embedded photos: the mean PSNR on the validation and test photos of the model and
of its distorted input under its own distortion (fixed seed), and one *check*: the PSNR on test photo 0, which
:func:`verify` recomputes to within ``CHECK_TOL_DB``. The manifest adds the experiment, profile, seed, the training
budget (the run's config), the exact command that produced it, the result file it belongs to, provenance and the
licence. :func:`load` refuses a missing file, a file whose sha256 differs from its card, and a card whose config
does not build the recorded architecture.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..paths import models_dir, results_dir
from ..utils import atomic_write_json, check_number

FORMAT = "causalir-models/1"
MANIFEST = "models.json"
LICENCE = ("Apache-2.0, like the code; trained only on scikit-image's bundled photos (see data/README.md for "
           "their licences)")
#: a shipped model's check metric must be recomputed within this (dB)
CHECK_TOL_DB = 0.01
#: photos the card metrics use (centre crops, as the experiments evaluate them)
CARD_SIDE = 128


#: committed runs whose models are not shipped yet, and why (tests/test_shipped_models.py keeps this honest:
#: a run must be shipped or listed here, never both)
NOT_SHIPPED: Dict[str, str] = {
    "backdoor-toy-medium": "a simulation: its models are small fitted tables recomputed in seconds",
    "dil-deblur-medium": "issue 13 re-runs the DIL studies (its models are below their input)",
    "dil-types-medium": "issue 13 re-runs the DIL studies (its models are below their input)",
    "dil-backbones-medium": "issue 13 re-runs the DIL studies (its models are below their input)",
}


def _shippable() -> Dict[str, Any]:
    """The networks outside the registry that a run can ship, by name: (class, its config dataclass). An explicit
    table, no import magic."""
    from ..adms import ADMS, ADMSShape
    from ..pathrestore import MultiPathConfig, PathRestore
    from ..rl import AgentConfig, ToolAgent
    from ..toolchain import Toolbox, ToolboxConfig

    return {"toolbox": (Toolbox, ToolboxConfig), "tool_agent": (ToolAgent, AgentConfig),
            "path_restore": (PathRestore, MultiPathConfig), "adms": (ADMS, ADMSShape)}


def _architecture(label: str, obj: Any) -> Dict[str, Any]:
    """How a card names what it holds: a registry model (``model`` + ``config``), one of :func:`_shippable`'s
    networks (``kind`` + ``cfg``), or masks (a dict of boolean tensors, ``kind: masks``)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"kind": "masks"}
    for kind, (cls, _) in _shippable().items():
        if type(obj) is cls:
            return {"kind": kind, "cfg": json.loads(json.dumps(dataclasses.asdict(obj.cfg)))}
    cfg = dict(getattr(obj, "config", {}) or {})
    if "name" not in cfg:
        raise TypeError(f"shipping.save: model {label!r} ({type(obj).__name__}) is neither a registry model (with "
                        f".config) nor one of {', '.join(_shippable())} nor masks")
    return {"kind": "registry", "model": cfg.pop("name"), "config": cfg}


def shippable(objs: Mapping[str, Any]) -> tuple:
    """Split a run's kept models into (what :func:`save` can ship, {label: why not} for the rest)."""
    ok, skipped = {}, {}
    for label, obj in objs.items():
        try:
            _architecture(label, obj)
        except TypeError as e:
            skipped[label] = str(e)
            continue
        ok[label] = obj
    return ok, skipped


def rebuild(card: Mapping[str, Any], folder: Path, device: str = "cpu") -> Any:
    """The object a card describes, with its weights (checked against the card's architecture)."""
    from safetensors.torch import load_file

    from .. import models

    path = Path(folder) / card["file"]
    kind = card.get("kind", "registry")
    if kind == "masks":
        return {k: v.to(device) for k, v in load_file(str(path)).items()}
    if kind == "registry":
        cfg = dict(card.get("config", {}))
        cfg.pop("name", None)
        net = models.build(card["model"], **cfg)
    elif kind in _shippable():
        cls, cfg_cls = _shippable()[kind]
        fields = {f.name: f.type for f in dataclasses.fields(cfg_cls)}
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in card["cfg"].items() if k in fields}
        net = getattr(cls, "from_config", cls)(cfg_cls(**cfg))
    else:
        raise ValueError(f"model card {card.get('file')!r}: unknown kind {kind!r}; valid: registry, masks, "
                         f"{', '.join(_shippable())}")
    return models.load_state(net, path).to(device).eval()


def model_dir(name: str, profile: str, seed: int = 0, folder: Optional[Path] = None) -> Path:
    """``data/models/<name>/<profile>/seed-<seed>`` (or under ``folder``)."""
    check_number("shipping", "seed", seed, lo=0, integer=True)
    return Path(folder or models_dir()) / name / profile / f"seed-{seed}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distortion_card(d: Any) -> Dict[str, Any]:
    """A distortion as ``{"name", "params", "label"}`` (rebuilt by :func:`distortion_from_card`)."""
    params = {k: v for k, v in dataclasses.asdict(d).items() if k != "name"}
    return {"name": d.name, "params": params, "label": d.label}


def distortion_from_card(card: Mapping[str, Any]):
    from .. import distortions

    params = {k: tuple(v) if isinstance(v, list) else v for k, v in card["params"].items()}
    return distortions.build(card["name"], **params)


def _psnrs(model: nn.Module, images, distortion, seed: int) -> Dict[str, float]:
    from .. import evaluate

    df = evaluate.evaluate({"model": model}, images, {"d": distortion}, seed=seed, device="cpu")
    return {m: float(df[df.method == m].psnr.mean()) for m in ("model", "input")}


def card_metrics(model: nn.Module, distortion: Any, seed: int = 0) -> Dict[str, Any]:
    """What a restorer reaches under ``distortion`` on the embedded photos (``CARD_SIDE`` crops, noise seed
    ``seed``): mean PSNR on the val and test photos, of the model and of the distorted input, and the check on
    test photo 0."""
    from .. import data

    out: Dict[str, Any] = {"distortion": distortion_card(distortion), "seed": seed, "side": CARD_SIDE}
    for split in ("val", "test"):
        p = _psnrs(model, data.embedded_images(split, max_side=CARD_SIDE), distortion, seed)
        out[f"{split}_psnr"], out[f"{split}_input_psnr"] = round(p["model"], 4), round(p["input"], 4)
    out["check"] = {"image": "test[0]", "psnr": round(_check_psnr(model, out), 4)}
    return out


def _check_psnr(model: nn.Module, metrics: Mapping[str, Any]) -> float:
    from .. import data

    img = data.embedded_images("test", max_side=int(metrics["side"]))[:1]
    return _psnrs(model, img, distortion_from_card(metrics["distortion"]), int(metrics["seed"]))["model"]


def save(name: str, profile: str, seed: int, models: Mapping[str, nn.Module], *, record: Mapping[str, Any],
         command: str, tasks: Optional[Mapping[str, Any]] = None, folder: Optional[Path] = None,
         overwrite: bool = False) -> Path:
    """Write the ``models`` of a run (label -> registry network with ``.config``) and their cards; ``tasks``
    (label -> distortion) adds the restorer metrics. Refuses an existing manifest unless ``overwrite``."""
    from safetensors.torch import save_file

    if not models:
        raise ValueError("shipping.save: expected at least one model")
    root = model_dir(name, profile, seed, folder)
    if (root / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{root / MANIFEST} exists (shipped models); pass overwrite=True to replace them")
    root.mkdir(parents=True, exist_ok=True)
    cards: Dict[str, Any] = {}
    for label, net in models.items():
        arch = _architecture(label, net)
        file = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + ".safetensors"
        tmp = root / f".{file}.tmp"
        state = net if arch["kind"] == "masks" else net.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(root / file)
        card = {**arch, "file": file, "sha256": _sha256(root / file), "bytes": (root / file).stat().st_size,
                "parameters": sum(int(v.numel()) for v in state.values()) if arch["kind"] == "masks"
                else sum(p.numel() for p in net.parameters())}
        if tasks and label in tasks:
            card["metrics"] = card_metrics(net.eval(), tasks[label], seed=0)
        cards[label] = card
    manifest = {"format": FORMAT, "experiment": name, "profile": profile, "seed": seed, "command": command,
                "result_file": f"data/results/{name}-{profile}.json", "budget": record.get("config"),
                "provenance": record.get("provenance"), "licence": LICENCE, "models": cards,
                "total_bytes": sum(c["bytes"] for c in cards.values())}
    atomic_write_json(root / MANIFEST, manifest)
    return root


def read_manifest(name: str, profile: str, seed: int = 0, folder: Optional[Path] = None) -> Dict[str, Any]:
    root = model_dir(name, profile, seed, folder)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shipped models for {name} ({profile}, seed {seed}): {path} is missing; ship "
                                f"them with experiments.run(..., keep_models=True) and shipping.save")
    spec = json.loads(path.read_text())
    missing = [str(root / m["file"]) for m in spec.get("models", {}).values() if not (root / m["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"shipped models for {name} ({profile}, seed {seed}) are incomplete; missing: "
                                f"{', '.join(missing)}")
    for label, m in spec.get("models", {}).items():
        if "sha256" in m and _sha256(root / m["file"]) != m["sha256"]:
            raise ValueError(f"shipped model {label!r} ({root / m['file']}) does not match the sha256 of its card "
                             "(altered or damaged); restore it with git checkout or ship it again")
    return spec


def verify(models: Mapping[str, nn.Module], spec: Mapping[str, Any]) -> Dict[str, float]:
    """Recompute each card's check metric on its reloaded model; raises when one differs by more than
    ``CHECK_TOL_DB``. Returns label -> |difference| in dB."""
    out = {}
    for label, card in spec.get("models", {}).items():
        if "metrics" not in card:
            continue
        got = _check_psnr(models[label], card["metrics"])
        want = float(card["metrics"]["check"]["psnr"])
        if abs(got - want) > CHECK_TOL_DB:
            raise ValueError(f"shipped model {label!r}: check PSNR {got:.4f} dB, its card says {want:.4f} dB "
                             f"(tolerance {CHECK_TOL_DB} dB)")
        out[label] = abs(got - want)
    return out


def shipped() -> Dict[str, Dict[str, Any]]:
    """Every shipped manifest under data/models, keyed ``<experiment>/<profile>/seed-<S>``."""
    root = models_dir()
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.glob(f"*/*/seed-*/{MANIFEST}"))}


def committed_results() -> Dict[str, Path]:
    return {p.stem: p for p in sorted(results_dir().glob("*-*.json")) if not p.stem.startswith("bench")}
