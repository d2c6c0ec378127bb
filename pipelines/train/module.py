# Copyright ropebert contributors. Apache-2.0.
"""The training LightningModule: contrastive stage 1 (in-batch negatives) and stage 2 (hard negatives).

Manual optimisation, because one optimizer step is several forwards/backwards (GradCache chunks):

    per batch:  seed dropout from (seed, epoch, batch, rank)          -> resume-invariant masks
                contrastive_step (GradCache or plain)                   -> local parameter grads
                allreduce_gradients (one flat all-reduce)               -> averaged grads on every rank
                clip, non-finite check, AdamW step, LR schedule step

Parallelism (pipelines/strategy.py) and torch.compile are applied outside the model. Batches come from
ropebert.shards.datamodule.ShardDataModule.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional

import lightning as L
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ropebert.errors import InputError
from ropebert.model import RopeBertModel, mean_pool
from ropebert.model.configuration_ropebert import MOE_DEFAULTS
from ropebert.model.load import load_source
from ropebert.model.load.checkpoint import CHECKPOINT_KEY, checkpoint_payload, tokenizer_files
from ropebert.shards.datamodule import ShardDataModule

from .gradcache import allreduce_gradients, contrastive_step, split_batch
from .loss import contrastive_loss, dist_info, hidden_alignment, layered_contrastive_loss
from .moe import MoEAux, MoESettings, apply_moe, moe_settings
from .teacher import Teacher, student_hidden

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
# default softmax temperature of teacher scores by what they are (manifest `score_kind`)
SCORE_TEMPERATURE = {"cosine": 0.05, "logits": 1.0}
LIVE_TEACHER_TEMPERATURE = 0.05  # a live teacher's scores are cosines


def load_init_model(init_from: str, rope_theta: Optional[float] = None) -> RopeBertModel:
    """The model a run starts from: an APE BERT directory (converted: position table dropped), a RoPE BERT /
    E5-RoPE / exported ropebert directory, or a previous stage's `.ckpt`. Anything else is a clear error."""
    p = Path(init_from)
    if not p.exists():
        raise FileNotFoundError(f"model.init_from: {init_from!r} does not exist")
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"model.init_from: no config.json in {init_from!r}")
        mt = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
        if mt not in ("bert", "ropebert"):
            raise InputError(f"model.init_from: {init_from!r} is a {mt!r} model; ropebert trains BERT-architecture "
                             "encoders (an APE BERT to convert, or a RoPE BERT / E5-RoPE checkpoint)")
    model = load_source(str(p)).train()  # loaders may hand back eval-mode models; training needs dropout on
    if rope_theta is not None:
        model.config.rope_theta = float(rope_theta)
        model.config.validate_ropebert()
    return model


def check_matryoshka(dims: Optional[list[int]], weights: Optional[list[float]],
                     hidden_size: int) -> Optional[tuple[list[int], list[float]]]:
    """(dims, weights) of model.matryoshka_dims / matryoshka_weights, checked against the model's hidden size;
    None without dims. Every problem is an InputError naming the setting."""
    if dims is None:
        return None
    if isinstance(dims, (int, str)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InputError(f"model.matryoshka_dims must be a list of integers, e.g. [384, 256, 128, 64]; got {dims!r}")
    dims = list(dims)
    if not dims:
        raise InputError("model.matryoshka_dims is empty; omit it (null) to train the full embedding only")
    big = [d for d in dims if d > hidden_size]
    if big:
        raise InputError(f"model.matryoshka_dims {dims}: {big} larger than the model's hidden size {hidden_size}")
    small = [d for d in dims if d < 1]
    if small:
        raise InputError(f"model.matryoshka_dims {dims}: {small} must be >= 1")
    steps = [b - a for a, b in zip(dims, dims[1:])]
    if not (all(s < 0 for s in steps) or all(s > 0 for s in steps)):
        raise InputError(f"model.matryoshka_dims {dims} must be strictly ordered (no repeats, one direction), "
                         f"e.g. [{hidden_size}, {hidden_size // 2}, {hidden_size // 4}]")
    if weights is None:
        weights = [1.0] * len(dims)
    weights = list(weights)
    if len(weights) != len(dims):
        raise InputError(f"model.matryoshka_weights has {len(weights)} entries {weights} for {len(dims)} "
                         f"model.matryoshka_dims {dims}; give one weight per dim")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
        raise InputError(f"model.matryoshka_weights {weights} must be finite numbers >= 0")
    return dims, [float(w) for w in weights]


def check_matryoshka_layers(layers: Optional[list[int]], num_layers: int) -> Optional[list[int]]:
    """The trained layers of model.matryoshka_layers (1-based, strictly increasing, the last layer added when
    absent); None without them. Every problem is an InputError naming the setting."""
    if layers is None:
        return None
    if isinstance(layers, (int, str)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise InputError(f"model.matryoshka_layers must be a list of layer numbers, e.g. [2, 4, 6]; got {layers!r}")
    layers = list(layers)
    if not layers:
        raise InputError("model.matryoshka_layers is empty; omit it (null) to train the last layer only")
    bad = [x for x in layers if not 1 <= x <= num_layers]
    if bad:
        raise InputError(f"model.matryoshka_layers {layers}: {bad} out of range; the model has {num_layers} layers, "
                         f"numbered 1..{num_layers} (layer l = the output of the l-th encoder layer)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise InputError(f"model.matryoshka_layers {layers} must be strictly increasing (small to large)")
    return layers if layers[-1] == num_layers else layers + [num_layers]


def layer_embeddings(model: RopeBertModel, ids: torch.Tensor, mask: torch.Tensor, layers: list[int],
                     hidden: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """(N, S, C) pooled, L2-normalised embeddings of the given layers (1-based; hidden_states[l]), from the
    model's hidden states (computed here unless given: (N, L, C) per layer, index 0 = embeddings)."""
    if hidden is None:
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True).hidden_states
    return torch.stack([mean_pool(hidden[x], mask) for x in layers], dim=1)


def _step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    h = hashlib.blake2b(f"{seed}:{epoch}:{batch}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class RopeBertContrastive(L.LightningModule):
    def __init__(
        self,
        init_from: str,
        stage: Literal["pretrain", "finetune"] = "pretrain",
        temperature: float = 0.01,
        learn_temperature: bool = False,
        min_temperature: float = 0.005,
        symmetric: bool = False,
        gather: bool = True,
        alpha: float = 0.2,
        contrastive_weight: float = 1.0,
        distill: bool = True,
        teacher_temperature: Optional[float] = None,
        teacher: Optional[str] = None,
        teacher_hidden_weight: float = 0.0,
        teacher_hidden_kind: Literal["cos", "mse"] = "cos",
        teacher_embed_weight: float = 0.0,
        teacher_score_weight: float = 0.0,
        matryoshka_dims: Optional[list[int]] = None,
        matryoshka_weights: Optional[list[float]] = None,
        matryoshka_layers: Optional[list[int]] = None,
        matryoshka_teacher_embed: Literal["prefix", "full"] = "prefix",
        mask_false_negatives: bool = True,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.0,
        grad_clip: Optional[float] = 1.0,
        gradcache_chunk: Optional[int] = 64,
        attn_backend: Literal["auto", "eager", "sdpa", "sdpa_packed", "varlen", "flash_attn", "xformers"] = "auto",
        rope_theta: Optional[float] = None,
        original_max_position_embeddings: Optional[int] = None,
        moe: Optional[MoESettings] = None,
        hidden_dropout: Optional[float] = None,
        attention_dropout: Optional[float] = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        max_nonfinite: int = 5,
        seed: int = 0,
        step_log: Optional[str] = None,
    ):
        """
        Args:
            init_from: the starting model: an APE BERT directory (converted by dropping its position table), a
                RoPE BERT / E5-RoPE / exported ropebert directory, or a previous stage's `.ckpt`.
            stage: "pretrain" (stage 1: pairs, in-batch negatives) or "finetune" (stage 2: 1 positive + K hard
                negatives per query; needs hard-negative shards).
            temperature: InfoNCE temperature tau (E5: 0.01). The initial value when learn_temperature.
            learn_temperature: learn tau (as log(1/tau), no weight decay), clamped to >= min_temperature.
            min_temperature: lower clamp of a learnable tau.
            symmetric: add the passage->query InfoNCE direction and average both.
            gather: score local queries against the passages/negatives of ALL ranks (gathered with gradient).
            alpha: stage 2 with teacher scores: loss = alpha * InfoNCE + KL(teacher || student).
            contrastive_weight: weight of InfoNCE without shard teacher scores (stage 1): loss = contrastive_weight
                * InfoNCE + the teacher_* terms. 0 = pure distillation from `teacher` (some teacher_*_weight must
                then be > 0); InfoNCE is still logged.
            distill: use the shards' teacher scores in stage 2 when present (False: InfoNCE only).
            teacher_temperature: teacher scores are divided by it before the softmax. None: from what the scores
                are -- the shards' manifest `score_kind` (cosine: 0.05, logits: 1.0) for stage-2 shard scores, and
                0.05 for a live `teacher`'s cosine scores. An explicit value wins for both.
            teacher: a frozen teacher directory (an APE BERT / sentence-transformers / exported ropebert model,
                typically the APE parent this run was converted from) for the teacher_* loss terms. It is never
                trained nor stored in checkpoints (they record its path and content hash; a resume with another
                teacher is refused). It must share the student's tokenizer vocabulary and reads at most its own
                position range. See pipelines/train/teacher.py.
            teacher_hidden_weight: weight of the token-level alignment of hidden states (student layer l to
                teacher layer l, or the uniform mapping when depths differ; real tokens only), averaged over every
                text of the step. Computed and backpropagated inside each GradCache chunk. 0 = off.
            teacher_hidden_kind: "cos" (1 - cosine per token) or "mse" (squared error / teacher's mean square).
            teacher_embed_weight: weight of mean(1 - cos(student, teacher)) of the pooled embeddings. 0 = off.
            teacher_score_weight: weight of KL(softmax(teacher scores / T) || softmax(student logits)) over each
                local query's row of the global score matrix (in-batch and hard negatives). 0 = off.
            matryoshka_dims: Matryoshka embedding sizes, strictly ordered, each <= the hidden size, e.g.
                [384, 256, 128, 64]: the loss (and every teacher term) is computed on each L2-renormalised prefix
                of the embeddings and summed with matryoshka_weights. It reads the full (cached) embeddings, so it
                runs unchanged under GradCache and gather. Recorded in the model's config (`matryoshka_dims`).
                None = the plain loss on the full embedding.
            matryoshka_weights: one weight per matryoshka_dims entry (default: all 1.0).
            matryoshka_layers: 2-D Matryoshka (Starbucks): encoder layers (1-based, strictly increasing, e.g.
                [2, 4, 6]) whose pooled, L2-normalised outputs are trained as embeddings too; the last layer is
                always trained (added when not listed). The fixed list of (layer, dim) pairs, layers x
                matryoshka_dims (or the full dim), is used in every step and the losses are summed. GradCache
                caches every layer's embedding of a text ((N, S, D)) and one replay backpropagates them together.
                Recorded in the model's config (`matryoshka_layers`). None = the last layer only.
            matryoshka_teacher_embed: with matryoshka_dims and teacher_embed_weight, "prefix" aligns every prefix
                to the teacher's prefix; "full" aligns the largest dim only, so the small dims are shaped by
                InfoNCE and the teacher's score KL (the teacher's full-dim scores are the target at every dim).
            mask_false_negatives: remove in-batch duplicates from each query's negatives, using the loader's
                64-bit hashes of the normalised texts (shards/hashing.py): every global passage or hard negative
                with the text of the query's own positive, and the positive of every other query with the same
                query text (see pipelines/train/loss.py). The number removed per step is logged as
                `train/false_negatives_masked` (all ranks). False: every other passage is a negative, duplicates
                included (batches without `hashes` are never masked).
            lr: peak learning rate (AdamW).
            weight_decay: AdamW decoupled weight decay; never on biases, LayerNorm weights or the temperature.
            betas: AdamW betas.
            adam_eps: AdamW epsilon.
            warmup_steps: linear warm-up from 0 to lr over this many optimizer steps, then linear decay to
                min_lr_ratio * lr at the trainer's last step (max_steps, or max_epochs x batches per epoch).
            min_lr_ratio: final LR as a fraction of lr.
            grad_clip: clip the global gradient norm (after the all-reduce) to this; None disables.
            gradcache_chunk: rows per GradCache chunk (embedding memory is bounded by this, not by the batch);
                None embeds the whole batch with its graph (no cache).
            attn_backend: attention backend name (eager, sdpa, sdpa_packed, varlen, flash_attn, xformers, auto).
            rope_theta: override the model's rope_theta (e.g. when continuing at a longer length).
            original_max_position_embeddings: the context length this model is trained at, recorded in its config:
                the long-context methods (NTK / SelfExtend / PI / GP / RP presets, attention scaling) extend from it.
                None keeps the checkpoint's (default: max_position_embeddings). Set it when training at a shorter
                length than the position range (e.g. a 512-position model trained on 128-token texts).
            moe: train a sparse mixture of experts (`--model.moe.num_experts 8 --model.moe.top_k 2
                --model.moe.every_n_layers 2`, or a `moe:` mapping in the config; keys and defaults: MoESettings,
                the `moe` block of RopeBertConfig). Over a dense init the model is upcycled when the module is
                built, exactly as `ropebert upcycle --seed <model.seed>` does: the FFN of every MoE layer becomes
                num_experts copies of itself behind a router drawn from the seeded generator (a resume rebuilds
                the same model, then loads the checkpoint's weights). Over an MoE init (an upcycled directory or
                an MoE run's .ckpt) it must equal the init's moe block, or it is an error naming both. None: the
                init trains as it is (an MoE init keeps its experts). The load-balancing loss of an MoE model
                joins the training loss (pipelines/train/moe.py); with several ranks each rank adds the term
                of its own tokens and the gradients are averaged: the step trains the global InfoNCE plus the
                mean over ranks of the per-rank MoE terms.
            hidden_dropout: override hidden_dropout_prob (None: keep the checkpoint's).
            attention_dropout: override attention_probs_dropout_prob (None: keep the checkpoint's).
            activation_checkpointing: recompute each layer in backward (non-reentrant, RNG preserved).
            compile: torch.compile every encoder layer (dynamic shapes).
            max_nonfinite: stop the run after this many consecutive non-finite losses/gradients (each one is
                skipped: no optimizer step, counted in `train/nonfinite_skipped`).
            seed: dropout seed; every step reseeds from (seed, epoch, batch index, rank), so a resumed run
                draws the same masks as an uninterrupted one.
            step_log: directory; each global rank appends one JSON line per batch to step-rank-<r>.jsonl with
                epoch, batch, global step, loss (exact float), whether it was skipped and, with a homogeneous
                mixture (data.train_dir: a mixture file), the batch's source. Per source the metrics
                `train/source/<name>/{loss,accuracy,samples_seen}` are logged, and `train/source_pass` (> 0: the
                source is repeating this epoch with a fresh shuffle).
        """
        super().__init__()
        if stage not in STAGES:
            raise InputError(f"model.stage must be one of {STAGES}, got {stage!r}")
        if temperature <= 0 or min_temperature <= 0:
            raise InputError(f"temperatures must be > 0, got temperature={temperature} min_temperature={min_temperature}")
        if gradcache_chunk is not None and gradcache_chunk < 1:
            raise InputError(f"model.gradcache_chunk must be >= 1 or null, got {gradcache_chunk}")
        if warmup_steps < 0 or lr <= 0:
            raise InputError(f"need warmup_steps >= 0 and lr > 0, got {warmup_steps}, {lr}")
        if activation_checkpointing and compile:
            raise InputError("model.activation_checkpointing and model.compile cannot be combined (torch.utils.checkpoint "
                             "recomputes a compiled layer with different saved tensors); pick one")
        for name in ("teacher_hidden_weight", "teacher_embed_weight", "teacher_score_weight"):
            if locals()[name] < 0:
                raise InputError(f"model.{name} must be >= 0, got {locals()[name]}")
        if teacher_temperature is not None and teacher_temperature <= 0:
            raise InputError(f"model.teacher_temperature must be > 0, got {teacher_temperature}")
        uses_teacher = bool(teacher_hidden_weight or teacher_embed_weight or teacher_score_weight)
        if uses_teacher and not teacher:
            raise InputError("model.teacher_*_weight > 0 needs model.teacher (a teacher model directory)")
        if contrastive_weight < 0:
            raise InputError(f"model.contrastive_weight must be >= 0, got {contrastive_weight}")
        if contrastive_weight == 0 and not uses_teacher:
            raise InputError("model.contrastive_weight=0 leaves no loss: set a model.teacher_*_weight > 0 (pure "
                             "distillation from model.teacher)")
        if max_nonfinite < 1:
            raise InputError(f"model.max_nonfinite must be >= 1, got {max_nonfinite}")
        if matryoshka_weights is not None and matryoshka_dims is None:
            raise InputError("model.matryoshka_weights needs model.matryoshka_dims")
        if matryoshka_teacher_embed not in ("prefix", "full"):
            raise InputError(f"model.matryoshka_teacher_embed must be 'prefix' or 'full', got {matryoshka_teacher_embed!r}")
        moe_block = moe_settings(moe)
        self.save_hyperparameters()
        self.hparams["moe"] = moe_block  # a plain dict: checkpoints are read with weights_only=True
        self.automatic_optimization = False
        self.model = apply_moe(load_init_model(init_from, rope_theta), moe_block, seed=seed, init_from=init_from)
        cfg = self.model.config
        if original_max_position_embeddings is not None:
            if original_max_position_embeddings < 2:
                raise InputError(f"model.original_max_position_embeddings must be >= 2, got {original_max_position_embeddings}")
            cfg.original_max_position_embeddings = int(original_max_position_embeddings)
            cfg.validate_ropebert()
        if hidden_dropout is not None:
            cfg.hidden_dropout_prob = float(hidden_dropout)
            for m in self.model.modules():  # every nn.Dropout is a hidden dropout (attention dropout is functional)
                if isinstance(m, nn.Dropout):
                    m.p = float(hidden_dropout)
        if attention_dropout is not None:
            cfg.attention_probs_dropout_prob = float(attention_dropout)
        self._matryoshka = check_matryoshka(matryoshka_dims, matryoshka_weights, cfg.hidden_size)
        self._layers = check_matryoshka_layers(matryoshka_layers, cfg.num_hidden_layers)
        if getattr(cfg, "embedding_dim", None) is not None:
            logger.warning("model.init_from %s is cut to embedding_dim=%s; training uses all %d channels", init_from,
                           cfg.embedding_dim, cfg.hidden_size)
            cfg.embedding_dim = None
        # the config records what this run trains (exports carry it into config.json)
        cfg.matryoshka_dims = None if self._matryoshka is None else list(self._matryoshka[0])
        cfg.matryoshka_layers = None if self._layers is None else list(self._layers)
        self.model.set_attn_backend(attn_backend)
        # a mixture-of-experts init (e.g. `ropebert upcycle`): its load-balancing loss joins the training loss
        object.__setattr__(self, "_moe", MoEAux(self.model))
        try:
            tok = self.model.tokenizer
        except ValueError:
            tok = None
            logger.warning("init model %s has no tokenizer files; checkpoints will need --tokenizer to export", init_from)
        self._tokenizer_files = tokenizer_files(tok)  # serialised once, stored in every checkpoint
        # the teacher is deliberately NOT a registered sub-module: not trained, not in checkpoints' weights
        object.__setattr__(self, "_teacher", None)
        if teacher:
            t = Teacher(teacher, student_tokenizer=tok)
            if uses_teacher and t.hidden_size != self.model.config.hidden_size:
                raise InputError(f"model.teacher: {teacher} has hidden size {t.hidden_size}, the student "
                                 f"{self.model.config.hidden_size}; the teacher terms compare them directly")
            object.__setattr__(self, "_teacher", t)
            self._layer_map = t.layer_map(self.model.config.num_hidden_layers)
            logger.info("teacher %s (sha256 %s…, %d layers, max %s positions); layer map %s", teacher,
                        t.sha256[:12], t.num_layers, t.max_positions, self._layer_map)
        if learn_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.register_parameter("logit_scale", None)
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.source_samples: dict[str, int] = {}  # samples seen per mixture source (homogeneous batches)
        self._step_log_file = None
        self._t_last: Optional[float] = None

    def tokenizer_dir(self) -> Path:
        """A directory holding the init model's tokenizer files (written once per process); the default of
        data.tokenizer under `ropebert fit`."""
        if not self._tokenizer_files:
            raise InputError(f"data.tokenizer is not set and model.init_from {self.hparams.init_from!r} has no "
                             "tokenizer files; pass --data.tokenizer DIR")
        if getattr(self, "_tokenizer_tmp", None) is None:
            d = Path(tempfile.mkdtemp(prefix="ropebert-tokenizer-"))
            atexit.register(shutil.rmtree, d, True)
            for name, data in self._tokenizer_files.items():
                (d / name).write_bytes(data)
            self._tokenizer_tmp = d
        return self._tokenizer_tmp

    # -- set-up ---------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.hparams.activation_checkpointing:
            self.model.gradient_checkpointing_enable()
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for layer in self.model.encoder.layer:
                layer.compile(dynamic=True)
            self._compiled = True

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        strategy = trainer.strategy
        if trainer.world_size > 1 and type(strategy).__name__ not in ("ExplicitSyncDDPStrategy",):
            raise InputError(
                f"trainer.strategy={type(strategy).__name__}: ropebert synchronises gradients itself once per step "
                "(GradCache runs several backwards per step); use `--trainer.strategy ropebert_ddp`")
        if isinstance(getattr(strategy, "model", None), DistributedDataParallel):
            raise InputError("ropebert's training step must not run inside torch DDP; use `--trainer.strategy ropebert_ddp`")
        prec = str(trainer.precision)
        if prec.startswith("16"):
            raise InputError(f"trainer.precision={prec}: fp16 loss scaling is not supported with GradCache; use "
                             "bf16-mixed (GPU) or 32-true")
        self._teacher_bf16 = prec.startswith("bf16")
        dm = trainer.datamodule
        self._shard_score_temperature = self.hparams.teacher_temperature
        if isinstance(dm, ShardDataModule) and dm.manifest is not None and dm.kind == "hard_negatives" \
                and self.hparams.stage == "finetune" and self.hparams.distill and self.hparams.teacher_temperature is None:
            kind = dm.manifest.get("score_kind")
            if kind not in SCORE_TEMPERATURE:
                raise InputError(f"{dm.train_dir}: the manifest does not say what its teacher scores are (score_kind "
                                 f"{kind!r}, expected one of {sorted(SCORE_TEMPERATURE)}); set "
                                 "model.teacher_temperature explicitly (1.0 for re-ranker logits, ~0.05 for cosines), "
                                 "or re-score the shards with `ropebert score`")
            self._shard_score_temperature = SCORE_TEMPERATURE[kind]
        if isinstance(dm, ShardDataModule):
            want = "pairs" if self.hparams.stage == "pretrain" else "hard_negatives"
            if dm.kind != want:
                raise InputError(
                    f"model.stage={self.hparams.stage!r} trains on data.kind={want!r} batches, but data.kind={dm.kind!r}"
                    + ("; stage 2 needs hard-negative shards (`ropebert mine`) and data.kind: hard_negatives"
                       if self.hparams.stage == "finetune" else ""))

    # -- optimisation ---------------------------------------------------------------------------------------

    def temperature(self) -> torch.Tensor | float:
        if self.logit_scale is None:
            return float(self.hparams.temperature)
        max_scale = math.log(1.0 / self.hparams.min_temperature)
        return 1.0 / self.logit_scale.clamp(max=max_scale).exp()

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias") or name == "logit_scale":
                no_decay.append(p)
            else:
                decay.append(p)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps)
        total = int(self.trainer.estimated_stepping_batches)
        if total <= 0 or total == float("inf"):
            raise InputError("set trainer.max_steps or trainer.max_epochs: the LR schedule needs a length")
        warm, floor = int(hp.warmup_steps), float(hp.min_lr_ratio)

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            rest = max(1, total - warm)
            return max(floor, floor + (1.0 - floor) * (1.0 - (step - warm) / rest))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- the step -------------------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._layers:
            return layer_embeddings(self.model, ids, mask, self._layers)  # (N, S, D) fp32, L2-normalised
        return self.model.embed(ids, mask)  # (N, D) fp32, L2-normalised

    def _teacher_on(self, device: torch.device) -> Teacher:
        """The teacher on the step's device (bf16 weights on CUDA under bf16-mixed), moved on first use."""
        t = self._teacher
        if t.device != device:
            t.to(device)
            if device.type == "cuda" and getattr(self, "_teacher_bf16", False):
                t.to(torch.bfloat16)
        return t

    def _embed_fn(self, n_texts: int, teacher_pooled: Optional[dict] = None, names: Optional[dict] = None):
        """The step's embed function. With teacher_hidden_weight, a pass with graph also returns the chunk's
        hidden-state alignment loss (weighted, normalised by the step's n_texts) for GradCache to backpropagate
        inside the chunk; the graph-less GradCache pass returns the embeddings only.
        teacher_pooled / names (the uncached step): the teacher's pooled embeddings of the same forward are stored
        in teacher_pooled[names[id(input_ids)]], so the embed / score terms need no second teacher forward."""
        hp = self.hparams
        if not (self._teacher is not None and hp.teacher_hidden_weight):
            return self._embed

        def embed(ids: torch.Tensor, mask: torch.Tensor):
            if not torch.is_grad_enabled():
                return self._embed(ids, mask)
            pooled, hs = student_hidden(self.model, ids, mask)
            if self._layers:
                pooled = layer_embeddings(self.model, ids, mask, self._layers, hidden=hs)  # (N, S, D)
            tpooled, ths, _ = self._teacher_on(ids.device)(ids, mask, hidden=True)
            if teacher_pooled is not None:
                teacher_pooled[names[id(ids)]] = tpooled.float()
            per_example = hidden_alignment(hs, ths, mask, self._layer_map, hp.teacher_hidden_kind)  # (N,)
            return pooled, hp.teacher_hidden_weight * per_example.sum() / n_texts

        return embed

    def _step_functions(self, batch: dict, groups: dict) -> tuple[Callable, Callable, bool]:
        """(embed function, loss function, cached) of one step over `groups`, as contrastive_step takes them
        (MoE-wrapped; a no-op for a dense model). The teacher runs once per text: with GradCache (cached) its
        pooled embeddings are computed chunk by chunk without a graph before the step and the token-level term
        inside each chunk's replay; without it, one forward per group gives both."""
        hp = self.hparams
        n_texts = sum(int(g["input_ids"].shape[0]) for g in groups.values())
        cached = hp.gradcache_chunk is not None and any(g["input_ids"].shape[0] > hp.gradcache_chunk
                                                        for g in groups.values())  # contrastive_step's own test
        one_pass = (not cached and self._teacher is not None and bool(hp.teacher_hidden_weight)
                    and bool(hp.teacher_embed_weight or hp.teacher_score_weight))
        if one_pass:
            teacher_embs: dict = {}
            embed = self._embed_fn(n_texts, teacher_embs, {id(g["input_ids"]): k for k, g in groups.items()})
        else:
            teacher_embs = self._teacher_embeddings(groups)
            embed = self._embed_fn(n_texts)
        self._moe.begin_step()
        return (self._moe.wrap_embed(embed, cached), self._moe.wrap_loss(self._loss_fn(batch, teacher_embs)),
                cached)

    def _teacher_embeddings(self, groups: dict) -> dict[str, torch.Tensor]:
        """Pooled teacher embeddings of every group, chunk by chunk, without a graph (embed / score terms)."""
        hp = self.hparams
        if self._teacher is None or not (hp.teacher_embed_weight or hp.teacher_score_weight):
            return {}
        out = {}
        for name, b in groups.items():
            parts = split_batch(b, hp.gradcache_chunk)
            teacher = self._teacher_on(b["input_ids"].device)
            out[name] = torch.cat([teacher.pooled(c["input_ids"], c["attention_mask"]) for c in parts]).float()
        return out

    def _loss_fn(self, batch: dict, teacher_embs: Optional[dict] = None):
        hp = self.hparams
        teacher = batch.get("teacher_scores") if (hp.stage == "finetune" and hp.distill) else None
        t = teacher_embs if teacher_embs is not None else {}  # filled during the step by a one-pass embed
        shard_t = getattr(self, "_shard_score_temperature", None) or hp.teacher_temperature or 1.0
        mdims, mweights = self._matryoshka or (None, None)
        hashes = batch.get("hashes") if hp.mask_false_negatives else None
        hashes = hashes or {}

        def fn(embs: dict[str, torch.Tensor]):
            q, p = embs["query"], embs["passage"]  # (B, D), or (B, S, D) with matryoshka_layers
            n = tn = None
            if "negatives" in embs:
                k = embs["negatives"].shape[0] // q.shape[0]
                n = embs["negatives"].view(q.shape[0], k, *q.shape[1:])  # (B, K, D) or (B, K, S, D)
                if "negatives" in t:
                    tn = t["negatives"].view(q.shape[0], k, -1)
            loss = contrastive_loss if not self._layers else partial(layered_contrastive_loss, layers=self._layers)
            return loss(
                q, p, n, temperature=self.temperature(), teacher_scores=teacher, alpha=hp.alpha,
                contrastive_weight=hp.contrastive_weight, teacher_temperature=shard_t, symmetric=hp.symmetric, gather=hp.gather,
                teacher_query=t.get("query"), teacher_passage=t.get("passage"), teacher_negative=tn,
                teacher_embed_weight=hp.teacher_embed_weight if t else 0.0,
                teacher_score_weight=hp.teacher_score_weight if t else 0.0,
                teacher_score_temperature=hp.teacher_temperature or LIVE_TEACHER_TEMPERATURE,
                matryoshka_dims=mdims, matryoshka_weights=mweights,
                matryoshka_teacher_embed=hp.matryoshka_teacher_embed, query_hashes=hashes.get("query"),
                passage_hashes=hashes.get("passage"), negative_hashes=hashes.get("negatives") if n is not None else None,
                return_stats=True)

        return fn

    def training_step(self, batch: dict, batch_idx: int):
        hp = self.hparams
        opt = self.optimizers()
        sched = self.lr_schedulers()
        world, rank = dist_info()
        torch.manual_seed(_step_seed(hp.seed, self.current_epoch, batch_idx, rank))
        groups = {"query": batch["query"], "passage": batch["passage"]}
        if hp.stage == "finetune":
            if "negatives" not in batch:
                raise InputError("stage 2 (model.stage=finetune) got a batch without negatives")
            groups["negatives"] = batch["negatives"]
        t0 = time.perf_counter()
        embed, loss_fn, _ = self._step_functions(batch, groups)
        res = contrastive_step(embed, groups, loss_fn, chunk_size=hp.gradcache_chunk, backward=self.manual_backward)
        if res.finite:
            self._moe.check_replay()
        params = [p for p in self.parameters() if p.requires_grad]
        finite = res.finite
        grad_norm = torch.tensor(float("nan"))
        if finite:
            allreduce_gradients(params)
            if hp.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, float(hp.grad_clip))
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
            finite = bool(torch.isfinite(grad_norm))  # identical on every rank after the all-reduce
        B = batch["query"]["input_ids"].shape[0]
        if finite:
            opt.step()
            sched.step()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            logger.warning("non-finite %s at epoch %d batch %d (keys %s...): step skipped (%d in a row, %d in total)",
                           "loss" if not res.finite else "gradient", self.current_epoch, batch_idx,
                           list(batch.get("keys", []))[:3], self.nonfinite_in_row, self.nonfinite_total)
        opt.zero_grad(set_to_none=True)
        self.samples_seen += B * world
        self.tokens_seen += res.tokens * world
        source = batch.get("source")  # a homogeneous mixture: every rank's batch is from this source
        if source is not None:
            self.source_samples[source] = self.source_samples.get(source, 0) + B * world
        if res.loss.device.type == "cuda":
            torch.cuda.synchronize(res.loss.device)  # time the step's own kernels, not the launch queue
        dt = time.perf_counter() - t0
        self._write_step_log(batch_idx, res.loss, skipped=not finite, source=source)
        stats = res.stats
        log = {
            "train/loss": res.loss.float(),
            "train/lr": torch.tensor(sched.get_last_lr()[0]),
            "train/temperature": torch.tensor(float(self.temperature())),
            "train/grad_norm": grad_norm.float().cpu(),
            "train/tokens_per_s": torch.tensor(res.tokens * world / max(dt, 1e-9)),
            "train/samples_seen": torch.tensor(float(self.samples_seen)),
            "train/nonfinite_skipped": torch.tensor(float(self.nonfinite_total)),
        }
        for k in ("pos_sim", "neg_sim", "hardest_neg_sim", "hard_neg_sim", "accuracy", "infonce", "kl",
                  "teacher_embed", "teacher_kl"):
            if k in stats:
                log[f"train/{k}"] = stats[k].float()
        for k in stats:
            if k.startswith("loss@"):  # each Matryoshka dim's (unweighted) loss
                log[f"train/{k}"] = stats[k].float()
        if source is not None:  # per source: loss, accuracy, samples seen (all ranks: the same source)
            log[f"train/source/{source}/loss"] = res.loss.float()
            if "accuracy" in stats:
                log[f"train/source/{source}/accuracy"] = stats["accuracy"].float()
            log[f"train/source/{source}/samples_seen"] = torch.tensor(float(self.source_samples[source]))
            log["train/source_pass"] = torch.tensor(float(batch.get("source_pass", 0)))
        if "false_negatives_masked" in stats:  # entries removed from the whole global batch's rows
            fn_count = stats["false_negatives_masked"].detach().float().reshape(1).clone()
            if world > 1:
                torch.distributed.all_reduce(fn_count)
            log["train/false_negatives_masked"] = fn_count[0].cpu()
        if "aux" in stats and hp.teacher_hidden_weight:  # (the GradCache aux sum holds the MoE shares too)
            log["train/teacher_hidden"] = ((stats["aux"] - self._moe.replay_aux) / hp.teacher_hidden_weight).float()
        log.update({k: v.float() for k, v in self._moe.summary().items()})
        self.log_dict(log, on_step=True, on_epoch=False, prog_bar=False, batch_size=B, sync_dist=False)
        self.log("loss", res.loss.float(), prog_bar=True, on_step=True, batch_size=B, logger=False)
        if self.nonfinite_in_row >= hp.max_nonfinite:
            raise RuntimeError(
                f"stopping: {self.nonfinite_in_row} consecutive non-finite losses/gradients (last at epoch "
                f"{self.current_epoch}, batch {batch_idx}); lower the LR or check the data (`ropebert shards verify`)")
        return res.loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        groups = {"query": batch["query"], "passage": batch["passage"]}
        if "negatives" in batch:
            groups["negatives"] = batch["negatives"]
        embs = {k: self._embed(v["input_ids"], v["attention_mask"]) for k, v in groups.items()}
        loss, stats = self._loss_fn(batch)(embs)
        B = batch["query"]["input_ids"].shape[0]
        self.log("val/loss", loss, batch_size=B, sync_dist=True)
        self.log("val/accuracy", stats["accuracy"], batch_size=B, sync_dist=True)

    # -- logs and checkpoints -------------------------------------------------------------------------------

    def _write_step_log(self, batch_idx: int, loss: torch.Tensor, skipped: bool, source: Optional[str] = None) -> None:
        if not self.hparams.step_log:
            return
        if self._step_log_file is None:
            d = Path(self.hparams.step_log)
            d.mkdir(parents=True, exist_ok=True)
            self._step_log_file = open(d / f"step-rank-{self.global_rank}.jsonl", "a", encoding="utf-8")
        rec = {"epoch": self.current_epoch, "batch": batch_idx, "global_step": int(self.global_step),
               "loss": float(loss), "skipped": skipped}
        if source is not None:
            rec["source"] = source
        self._step_log_file.write(json.dumps(rec) + "\n")
        self._step_log_file.flush()

    def on_train_end(self) -> None:
        if self._step_log_file is not None:
            self._step_log_file.close()
            self._step_log_file = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = checkpoint_payload(self.model, self._tokenizer_files, model_prefix="model.")
        checkpoint["ropebert_teacher"] = None if self._teacher is None else {"path": self._teacher.path,
                                                                            "sha256": self._teacher.sha256}
        checkpoint["ropebert_train_state"] = {
            "nonfinite_in_row": self.nonfinite_in_row, "nonfinite_total": self.nonfinite_total,
            "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
            "source_samples": dict(self.source_samples),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved_moe = ((checkpoint.get(CHECKPOINT_KEY) or {}).get("config") or {}).get("moe")
        now_moe = self.model.config.moe
        norm = lambda m: None if m is None else {**MOE_DEFAULTS, **m}  # noqa: E731
        if norm(saved_moe) != norm(now_moe):  # before its weights are loaded: shapes would not match
            raise InputError(f"resume: the checkpoint's model has moe={saved_moe}, this run's moe={now_moe} "
                             "(model.moe / model.init_from); resume with the checkpoint's settings")
        saved = checkpoint.get("ropebert_teacher")
        now = None if self._teacher is None else self._teacher.sha256
        if saved is not None or now is not None:
            if (saved or {}).get("sha256") != now:
                raise InputError(
                    "resume: the teacher changed since the checkpoint was written (checkpoint: "
                    f"{(saved or {}).get('path')!r} sha256 {((saved or {}).get('sha256') or '-')[:12]}; now: "
                    f"{self.hparams.teacher!r} sha256 {(now or '-')[:12]}); resume with the same teacher files")
        st = checkpoint.get("ropebert_train_state") or {}
        self.nonfinite_in_row = int(st.get("nonfinite_in_row", 0))
        self.nonfinite_total = int(st.get("nonfinite_total", 0))
        self.samples_seen = int(st.get("samples_seen", 0))
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.source_samples = {str(k): int(v) for k, v in (st.get("source_samples") or {}).items()}
