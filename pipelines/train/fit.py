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

import warnings
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ropebert.shards.datamodule import ShardDataModule

# ModelCheckpoint under manual optimisation: our checkpoints are taken after the optimizer step on purpose
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")  # no val_dir

from .module import RopeBertContrastive
from .strategy import AtomicCheckpointIO  # also registers the ropebert_ddp strategy name


class RopeBertCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the final state when training stops between two save points (max_steps
    not a multiple of every_n_train_steps), so `last.ckpt` is always the end of the run."""

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


def main(argv: Optional[list[str]] = None) -> int:
    cli_main(argv)
    return 0
