"""Run `ropebert fit` with the given CLI arguments, then write a digest of this rank's final weights.

Used by the multi-node test: `torchrun ... tests/pipelines/fit_digest.py OUT_DIR <fit args...>`; each global rank
writes OUT_DIR/digest-rank<r>.txt (sha256 over every parameter's bytes, in name order).
"""

import hashlib
import os
import sys

import torch

from ropebert.pipelines.train.fit import cli_main


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    cli = cli_main(args)
    rank = cli.trainer.global_rank
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"digest-rank{rank}.txt"), "w") as f:
        f.write(f"{digest(cli.model.model)} {cli.trainer.global_step} {cli.trainer.world_size}\n")
