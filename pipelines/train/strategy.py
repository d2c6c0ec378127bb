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
previous checkpoint intact and loadable. Checkpoints get the umask's mode (not mkstemp's 0600); temporary files
left by a killed writer are removed at the next save; a full or read-only disk is a one-line error naming the
file; a truncated checkpoint is an error naming it and the newest intact checkpoint beside it.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from ropebert.errors import UserError
from ropebert.io import _alive, no_space_message

logger = logging.getLogger(__name__)

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
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_orphaned_temp_files(target.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=".tmp", dir=target.parent)
        except OSError as e:
            raise UserError(_write_error(e, target)) from None
        try:
            with os.fdopen(fd, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the umask's mode
            os.replace(tmp, target)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(e, OSError) or (isinstance(e, RuntimeError) and _is_write_failure(e)):
                raise UserError(_write_error(e, target)) from None
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

    def load_checkpoint(self, path, *args, **kwargs):
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # a truncated / corrupt file: torch's zip error names no path
            if not Path(str(path)).is_file():
                raise
            raise unreadable_checkpoint(Path(str(path)), e) from None


def unreadable_checkpoint(path: Path, e: BaseException) -> UserError:
    """The one-line error for a checkpoint that cannot be read: its path, and the newest intact one beside it."""
    intact = newest_intact_checkpoint(path.parent, exclude=path)
    hint = (f"; the newest intact checkpoint there is {intact} (resume with --ckpt_path {intact})" if intact
            else "; no intact checkpoint is left beside it")
    detail = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
    return UserError(f"{path}: cannot read the checkpoint, it is truncated or corrupt ({type(e).__name__}: "
                     f"{detail}){hint}")


def check_checkpoint_readable(path: Path) -> None:
    """Raise `unreadable_checkpoint` unless `path` opens as a zip archive (torch's format): a truncated file has
    lost its central directory. Cheap: reads the directory only."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as e:
        raise unreadable_checkpoint(path, e) from None


def _umask() -> int:
    um = os.umask(0)
    os.umask(um)
    return um


def _is_write_failure(e: BaseException) -> bool:
    text = str(e)
    return "inline_container" in text or "unexpected pos" in text or "file write failed" in text


def _write_error(e: BaseException, target: Path) -> str:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or not isinstance(e, OSError):
        return f"{no_space_message(e, target)} (the previous checkpoint, if any, is intact)"
    return f"cannot write checkpoint {getattr(e, 'filename', None) or target}: {e.strerror}"


ORPHAN_AGE_S = 3600  # temp files of the pid-less older naming: only when surely not being written


def remove_orphaned_temp_files(directory: Path) -> list[Path]:
    """Remove temporary checkpoint files (`.NAME.ckpt.tmp-PID-*.tmp`) whose writer no longer runs, and older
    pid-less ones (`.NAME.ckpt.*.tmp`) untouched for an hour: each is a whole checkpoint left by a kill."""
    removed = []
    for p in directory.glob(".*.ckpt.*.tmp"):
        rest = p.name.split(".ckpt.", 1)[1]
        parts = rest.split("-")
        try:
            if rest.startswith("tmp-") and len(parts) >= 3 and parts[1].isdigit():
                if _alive(int(parts[1])):  # being written (this process included)
                    continue
            elif time.time() - p.stat().st_mtime < ORPHAN_AGE_S:
                continue
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    if removed:
        logger.info("removed %d orphaned temporary checkpoint file(s) in %s", len(removed), directory)
    return removed


def newest_intact_checkpoint(directory: Path, exclude: Optional[Path] = None) -> Optional[Path]:
    """The newest `*.ckpt` in `directory` (by modification time) whose zip archive reads back whole."""
    for p in sorted(directory.glob("*.ckpt"), key=lambda q: q.stat().st_mtime, reverse=True):
        if exclude is not None and p.resolve() == exclude.resolve():
            continue
        try:
            with zipfile.ZipFile(p) as z:
                if z.testzip() is None:
                    return p
        except (zipfile.BadZipFile, OSError):
            continue
    return None
