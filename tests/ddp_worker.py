"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a few steps of each strategy with
``batch_size`` B per rank; rank 0 writes the final weights (and a resumed run's) to OUT for the test to compare
with one rank at batch 2B. Not a test module itself (no ``test_`` prefix)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from causalir import distortions, distributed, models, train

CASES = {  # strategy -> its config (small alpha/lr: a few steps, a tiny net)
    "erm": {},
    "dil_pf": {"alpha": 1e-2},
    "dil_ps": {"alpha": 1e-2},
    "dil_sf_reference": {"inner_lr": 1e-3, "meta_lr": 1e-3},
}


def images() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 24, 24, generator=g) for _ in range(3)]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("dncnn", nf=8, depth=3)


def config(batch: int, steps: int = 3, **kw) -> train.TrainConfig:
    kw = {"val_every": 0, "ckpt_every": 0, **kw}
    return train.TrainConfig(steps=steps, batch_size=batch, patch_size=16, lr=1e-3, seed=1, device="cpu",
                             progress=False, **kw)


def seen() -> list:
    return [distortions.build("gaussian_noise", sigma=s) for s in (10, 25, 40)]


def main(out: Path, batch: int) -> None:
    for name, kw in CASES.items():
        net = model()
        train.fit(net, train.build_strategy(name, **kw), images(), seen(), config(batch))
        if distributed.rank_world()[0] == 0:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"{name}.safetensors"))
    # checkpoint and resume under 2 ranks: 2 steps, then on to 4, against 4 in one go
    for tag, parts in (("resumed", (2, 4)), ("straight", (4,))):
        net = model()
        for steps in parts:
            res = train.fit(net, train.build_strategy("erm"), images(), seen(),
                            config(batch, steps, schedule="constant", ckpt_every=2), run_dir=out / f"run-{tag}")
        if distributed.rank_world()[0] == 0:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"erm-{tag}.safetensors"))
            (out / f"erm-{tag}.counters").write_text(repr(res.counters.as_dict()))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
