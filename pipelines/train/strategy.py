# Copyright ropebert contributors. Apache-2.0.
"""Distributed plumbing for training: a DDP strategy with explicit gradient sync, and atomic checkpoints.

`ExplicitSyncDDPStrategy` (registered as `strategy: ropebert_ddp`) is Lightning's DDPStrategy — same launchers
(torchrun, SLURM, Lightning's own process launcher), same process-group set-up over NCCL or gloo — except that
the LightningModule is NOT wrapped in torch DDP. Parameters are broadcast from rank 0 at set-up, and the
training step (pipelines/module.py) averages gradients itself with one flat all-reduce per optimizer step,
after all GradCache chunks. Torch DDP decides whether to sync at *forward* time and fires its reducer on
every backward, which is wrong for GradCache's chunk replays (several backwards per step).

`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target directory, fsyncs it and renames
it over the target (POSIX rename is atomic), then fsyncs the directory: a crash while writing leaves the
previous checkpoint intact and loadable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

STRATEGY_NAME = "ropebert_ddp"


class ExplicitSyncDDPStrategy(DDPStrategy):
    """DDP processes without the torch DDP wrapper: the module syncs gradients itself (once per step)."""

    strategy_name = STRATEGY_NAME

    def configure_ddp(self) -> None:
        from lightning.pytorch.overrides.distributed import _sync_module_states

        assert self.model is not None
        _sync_module_states(self.model)  # every rank starts from rank 0's weights and buffers

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            STRATEGY_NAME, cls, description="ropebert: DDP processes, explicit once-per-step gradient all-reduce",
            start_method="popen")
        strategy_registry.register(
            STRATEGY_NAME + "_spawn", cls, description="ropebert_ddp with the spawn start method", start_method="spawn")


if STRATEGY_NAME not in StrategyRegistry:
    ExplicitSyncDDPStrategy.register_strategies(StrategyRegistry)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file + fsync + os.replace (local paths); remote paths use Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        protocols = get_filesystem(path).protocol
        protocols = set(protocols) if isinstance(protocols, (tuple, list)) else {protocols}
        if not protocols & {"file", "local"}:
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:
            dfd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)

    @staticmethod
    def _write(checkpoint: dict[str, Any], f) -> None:
        torch.save(checkpoint, f)
