# Copyright ropebert contributors. Apache-2.0.
"""Check that a checkpoint's weights fit the mixture-of-experts layout its config declares, before loading.

An MoE config (config.moe) over a dense checkpoint, a dense config over an MoE checkpoint, or a different expert
count would otherwise surface as transformers' per-key load report (or random re-initialisation); here it is one
InputError that says what differs and what to do (`ropebert upcycle` makes an MoE model from a dense one).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

from ropebert.errors import InputError

from ..configuration_ropebert import RopeBertConfig

ROUTER_KEY = re.compile(r"^(?:e5rope\.)?encoder\.layer\.(\d+)\.moe\.router\.weight$")


def safetensors_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} of every *.safetensors file in `model_dir`, read from the headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    return shapes


def moe_weight_problem(config: RopeBertConfig, shapes: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """Why weights of these shapes cannot be loaded into `config`'s MoE layout, or None when they fit (or carry no
    weight names this check knows: a checkpoint with no encoder weights is left to the loader's own check)."""
    routers = {}
    for k, shape in shapes.items():
        m = ROUTER_KEY.match(k)
        if m:
            routers[int(m.group(1))] = int(shape[0])
    expected = config.moe_layers
    moe = getattr(config, "moe", None)
    if moe is None:
        if routers:
            return (f"the weights hold experts (routers in layers {sorted(routers)}) but the config has no `moe` "
                    "block: restore the config's moe block")
        return None
    if not any(re.search(r"encoder\.layer\.\d+\.", k) for k in shapes):
        return None
    E = int(moe["num_experts"])
    missing = [i for i in expected if i not in routers]
    if missing:
        what = "no expert weights at all (a dense checkpoint)" if not routers else f"no expert weights for layers {missing}"
        return (f"the config declares moe ({E} experts in layers {expected}) but the checkpoint has {what}; make an "
                "MoE model from a dense one with `ropebert upcycle SRC --out DIR --experts E --top-k K --every N`")
    extra = sorted(set(routers) - set(expected))
    if extra:
        return (f"the checkpoint has experts in layers {sorted(routers)} but the config's moe.every_n_layers="
                f"{moe['every_n_layers']} puts them in layers {expected}")
    wrong = {i: n for i, n in routers.items() if n != E}
    if wrong:
        counts = sorted(set(wrong.values()))
        return (f"the config's moe.num_experts={E} but the checkpoint's routers have {counts[0] if len(counts) == 1 else counts} "
                f"experts (layers {sorted(wrong)}); set moe.num_experts to the checkpoint's count")
    return None


def check_moe_weights(src, config: RopeBertConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise InputError naming `src` when moe_weight_problem finds one."""
    problem = moe_weight_problem(config, shapes)
    if problem:
        raise InputError(f"{src}: {problem}")
