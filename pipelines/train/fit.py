# Copyright ropebert contributors. Apache-2.0.
"""`ropebert fit --config configs/<file>.yaml [--key value ...]`: LightningCLI over the contrastive module and
the shard DataModule.

Besides Lightning's own trainer keys it adds:
  --checkpoint.*   a ModelCheckpoint that is always there (dirpath, every_n_train_steps, save_last: true ...);
                   `--ckpt_path last` resumes from <checkpoint.dirpath>/last.ckpt
  strategy         `ropebert_ddp` (explicit once-per-step gradient all-reduce; see pipelines/strategy.py)
  plugins          AtomicCheckpointIO by default (temp file + fsync + rename)
Unknown keys, wrong types and missing required values are errors before anything is built.
"""

from __future__ import annotations

import logging
import signal
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ropebert.errors import InputError
from ropebert.shards.datamodule import ShardDataModule

logger = logging.getLogger(__name__)

# ModelCheckpoint under manual optimisation: our checkpoints are taken after the optimizer step on purpose
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")  # no val_dir

from .module import RopeBertContrastive
from .strategy import AtomicCheckpointIO, check_checkpoint_readable  # also registers the ropebert_ddp strategy name

# settings a resume cannot apply: the checkpoint's weights / parameters win, so a change is refused
RESUME_REFUSED = ("init_from", "stage", "learn_temperature")
# optimizer settings: the restored optimizer state would keep the old values, so they are applied explicitly
RESUME_OPTIMIZER = ("lr", "weight_decay", "betas", "adam_eps")
PREEMPTED_EXIT = 128 + signal.SIGTERM  # what a scheduler expects from a job it preempted


class RopeBertCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the final state when training stops between two save points (max_steps
    not a multiple of every_n_train_steps), so `last.ckpt` is always the end of the run — also after a resume
    with other checkpoint.* settings (no `last-v1.ckpt`). On SIGTERM (a scheduler's preemption) it saves a
    checkpoint after the current step and stops; `ropebert fit` then exits 143. On resume it compares the
    model settings with the checkpoint's: a changed init_from / stage / learn_temperature is refused, changed
    optimizer settings (lr, weight_decay, betas, adam_eps) are applied to the restored optimizer, every other
    change applies as configured; each applied change is logged."""

    preempted = False
    _resume_changes: Optional[dict] = None

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self.save_last and self.save_last != "link" and not self.last_model_path:
            plain = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            if self.file_exists(plain, trainer):
                self.last_model_path = plain  # a previous run of this directory: replaced, never versioned
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_now(self, trainer) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            if self.save_top_k != 0:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))  # any rank: every rank
        if stop and not self.preempted:
            self.preempted = True
            self._save_now(trainer)
            trainer.should_stop = True
            logger.warning("SIGTERM: saved the state after step %d (%s); stopping with exit status %d — resume with "
                           "--ckpt_path last", trainer.global_step, self.last_model_path or self.dirpath, PREEMPTED_EXIT)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        saved = checkpoint.get("hyper_parameters") or {}
        now = dict(pl_module.hparams)
        changed = {k: (saved[k], now[k]) for k in now if k in saved and _norm(saved[k]) != _norm(now[k])}
        refused = [k for k in RESUME_REFUSED if k in changed]
        if refused:
            raise InputError("cannot resume: " + "; ".join(f"model.{k} was {changed[k][0]!r} in the checkpoint, now "
                                                            f"{changed[k][1]!r}" for k in refused)
                             + " — a resume continues the checkpoint's weights; set them back, or start a new run "
                               "(without --ckpt_path) from the checkpoint with model.init_from")
        self._resume_changes = changed
        if changed:
            logger.warning("resume: settings changed since the checkpoint, applied: %s",
                           ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))

    def on_train_start(self, trainer, pl_module) -> None:
        changed, self._resume_changes = self._resume_changes or {}, None
        if not any(k in changed for k in RESUME_OPTIMIZER):
            return
        hp = pl_module.hparams
        for opt in trainer.optimizers:
            for i, g in enumerate(opt.param_groups):  # configure_optimizers: [decayed, not decayed]
                g["initial_lr"] = float(hp.lr)
                g["weight_decay"] = float(hp.weight_decay) if i == 0 else 0.0
                g["betas"], g["eps"] = tuple(hp.betas), float(hp.adam_eps)
        for cfg in trainer.lr_scheduler_configs:
            sched = cfg.scheduler
            sched.base_lrs = [float(hp.lr)] * len(sched.optimizer.param_groups)
            for g, lam in zip(sched.optimizer.param_groups, getattr(sched, "lr_lambdas", [])):
                g["lr"] = float(hp.lr) * lam(sched.last_epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            if self.save_top_k != 0:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        else:
            super().on_train_end(trainer, pl_module)


class RopeBertCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RopeBertCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.every_n_train_steps": 100,
            "checkpoint.filename": "step{step:07d}",
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.save_on_train_epoch_end": True,
        })

    def _parse_ckpt_path(self) -> None:
        # Lightning would overlay the checkpoint's hyper-parameters on the command line here (a new --model.lr
        # silently lost with an explicit path, kept with `last`). The configuration given is what runs; the
        # checkpoint callback compares it with the checkpoint's and applies or refuses each change, saying which.
        # Only check that the file is readable, naming it (torch's zip errors name no path).
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_readable(Path(ckpt_path))

    def before_fit(self) -> None:
        dm, model = self.datamodule, self.model
        if isinstance(dm, ShardDataModule) and dm.tokenizer is None:
            dm.tokenizer = str(model.tokenizer_dir())  # the init model's tokenizer (data.tokenizer: null)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        plugins = trainer.get("plugins")
        if not plugins:
            trainer["plugins"] = [{"class_path": f"{AtomicCheckpointIO.__module__}.AtomicCheckpointIO"}]


def cli_main(argv: Optional[list[str]] = None, run: bool = True) -> RopeBertCLI:
    """Build (and with run=True, run) the `fit` CLI; returns the LightningCLI (trainer, model, datamodule)."""
    args = list(argv or [])
    return RopeBertCLI(
        RopeBertContrastive,
        ShardDataModule,
        args=["fit", *args] if run else args,
        run=run,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,
    )


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def main(argv: Optional[list[str]] = None) -> int:
    """0 when the run finished; 143 when it was preempted by SIGTERM (after saving a checkpoint)."""
    try:
        cli = cli_main(argv)
    except SIGTERMException:  # Lightning stops the rank that received the signal this way
        return PREEMPTED_EXIT
    if any(getattr(c, "preempted", False) for c in getattr(cli.trainer, "callbacks", [])):
        return PREEMPTED_EXIT
    return 0
