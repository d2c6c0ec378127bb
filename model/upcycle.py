# Copyright ropebert contributors. Apache-2.0.
"""Upcycle a dense RoPE BERT into a sparse mixture-of-experts one (Nomic Embed v2's starting point).

In every MoE layer (0-based i with i % every == 1) the dense FFN is replaced by `experts` copies of itself and a
bias-free router initialised small (normal(0, router_std), from its own seeded generator); attention, LayerNorms
and the dense layers are kept as they are. What the upcycled model computes at step 0:

    MoE FFN(x) = sum_j w_j(x) FFN(x) = s(x) * FFN(x),   s(x) = the sum of the token's top-k router weights

  * with normalize_weights the k weights are renormalised, s(x) = 1: the upcycled model's embeddings equal the
    dense source's (up to fp32 rounding);
  * without it (Nomic's setting) s(x) < 1 (about k / E with a near-uniform fresh router): each MoE layer's FFN
    output, output bias included, is scaled by s(x), so the embeddings differ from the source's until training
    adapts.

`ropebert upcycle SRC --out DIR --experts 8 --top-k 2 --every 2 [--normalize-weights] [--seed S]`: SRC is anything
`load_source` reads (an APE BERT, converted on the way; a RoPE BERT / exported directory; a training .ckpt); DIR
is written by the export writer (aside, then swapped in) and loads with AutoModel / SentenceTransformer.
"""

from __future__ import annotations

import argparse
import copy
import logging
from typing import Optional

import torch

from ropebert.errors import InputError

from .load import load_source
from .modeling_ropebert import RopeBertModel

logger = logging.getLogger(__name__)

DEFAULT_ROUTER_STD = 1e-3


def upcycle(model: RopeBertModel, *, num_experts: int = 8, top_k: int = 2, every_n_layers: int = 2,
            normalize_weights: bool = False, aux_loss_coef: float = 1.0, seed: int = 0,
            router_std: float = DEFAULT_ROUTER_STD) -> RopeBertModel:
    """A new MoE RopeBertModel (fp32, eval mode, the source's tokenizer attached) whose experts are copies of
    `model`'s dense FFNs; `model` is left unchanged. Bad settings are InputErrors."""
    if getattr(model.config, "moe", None) is not None:
        raise InputError(f"upcycle: the source is already a mixture of experts (moe={model.config.moe}); upcycle a "
                         "dense model")
    if not router_std > 0:
        raise InputError(f"upcycle: router_std must be > 0, got {router_std!r}")
    cfg = copy.deepcopy(model.config)
    cfg.moe = {"num_experts": num_experts, "top_k": top_k, "every_n_layers": every_n_layers,
               "normalize_weights": bool(normalize_weights), "aux_loss_coef": aux_loss_coef}
    try:
        cfg.validate_ropebert()
    except ValueError as e:
        raise InputError(f"upcycle: {e}") from None
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(int(seed))
    C = cfg.hidden_size
    for i in cfg.moe_layers:
        pre = f"encoder.layer.{i}."
        w1, b1 = state.pop(pre + "intermediate.dense.weight"), state.pop(pre + "intermediate.dense.bias")  # (I, C)
        w2, b2 = state.pop(pre + "output.dense.weight"), state.pop(pre + "output.dense.bias")  # (C, I)
        E = num_experts
        state[pre + "moe.experts.intermediate_weight"] = w1.expand(E, *w1.shape).clone()  # (E, I, C)
        state[pre + "moe.experts.intermediate_bias"] = b1.expand(E, *b1.shape).clone()  # (E, I)
        state[pre + "moe.experts.output_weight"] = w2.expand(E, *w2.shape).clone()  # (E, C, I)
        state[pre + "moe.experts.output_bias"] = b2.expand(E, *b2.shape).clone()  # (E, C)
        state[pre + "moe.router.weight"] = torch.randn(E, C, generator=gen) * float(router_std)  # (E, C)
    out = RopeBertModel(cfg)
    out.load_state_dict(state, strict=True)
    try:
        out.tokenizer = model.tokenizer  # the source's (loaded from its directory on first use)
    except ValueError:
        out.tokenizer = None  # none known: export then needs one passed
    return out.eval()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ropebert upcycle",
        description="Turn a dense model (APE BERT, RoPE BERT / exported directory, training .ckpt) into a sparse "
        "mixture-of-experts RoPE BERT: the FFN of every MoE layer (0-based i with i %% every == 1) becomes E "
        "copies of itself behind a small seeded router. Without --normalize-weights each MoE layer's FFN output is "
        "scaled by the token's top-k router weight sum (Nomic's setting); with it the model starts out computing "
        "the source's embeddings.",
    )
    ap.add_argument("src", help="model directory, hub id or training checkpoint")
    ap.add_argument("--out", required=True, help="output directory (a Hugging Face + sentence-transformers export)")
    ap.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    ap.add_argument("--every", type=int, default=2, help="MoE layers are those with i %% every == 1 (default 2)")
    ap.add_argument("--normalize-weights", action="store_true",
                    help="renormalise the top-k weights to sum to 1 (the upcycled model then equals the source)")
    ap.add_argument("--aux-loss-coef", type=float, default=1.0, help="load-balancing loss weight (default 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the router initialisation (default 0)")
    ap.add_argument("--router-std", type=float, default=DEFAULT_ROUTER_STD,
                    help=f"std of the router's normal initialisation (default {DEFAULT_ROUTER_STD:g})")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the source's own)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT when it is a previous export")
    ap.add_argument("--verify", action="store_true",
                    help="reload OUT with plain transformers + sentence-transformers in a fresh process and compare")
    args = ap.parse_args(argv)
    from .export import export_model
    from .verify import verify_and_describe

    src = load_source(args.src)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    else:
        try:
            tok = src.tokenizer  # the source's own (its directory, or the checkpoint's files)
        except ValueError as e:
            raise InputError(f"upcycle: no tokenizer for {args.src} ({e}); pass --tokenizer DIR") from None
    model = upcycle(src, num_experts=args.experts, top_k=args.top_k, every_n_layers=args.every,
                    normalize_weights=args.normalize_weights, aux_loss_coef=args.aux_loss_coef, seed=args.seed,
                    router_std=args.router_std)
    out = export_model(model, args.out, tokenizer=tok, source=args.src, overwrite=args.overwrite)
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p[0].numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    active = total - per_expert * (args.experts - args.top_k)
    print(f"upcycled {args.src}: {args.experts} experts, top-{args.top_k}, MoE layers {model.config.moe_layers}, "
          f"{total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active per token) -> {out}")
    if args.verify:
        print(verify_and_describe(out))
    return 0
