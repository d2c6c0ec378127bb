# Copyright ropebert contributors. Apache-2.0.
"""The demo's one summary table, built from the JSON files the eval commands wrote (nothing re-computed)."""

from __future__ import annotations

import json
from pathlib import Path

from ropebert.pipelines.eval.report import markdown_table

DISPLAY = {
    "minilm-rope": "converted RoPE (untrained)",
    "stage1": "stage 1 (in-batch negatives)",
    "stage2": "stage 2 (7 hard negatives + distillation)",
}


def _name(spec: str) -> str:
    if spec == "bm25":
        return "BM25 (bm25s)"
    if spec.startswith("st:"):
        return "APE parent all-MiniLM-L6-v2 (sentence-transformers)"
    return DISPLAY.get(Path(spec).name, spec)


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _retrieval_rows(res: dict | None) -> dict[str, dict]:
    return {} if res is None else {_name(r["name"]): r["metrics"] for r in res["results"]}


def write_summary(out: Path) -> str:
    ev = out / "eval"
    doc = _load(ev / "docstrings.json")
    ms = _load(ev / "msmarco.json")
    pk = _load(ev / "passkey.json")
    reload = _load(ev / "reload.json")
    lines = ["# ropebert demo summary", ""]

    d_rows, m_rows = _retrieval_rows(doc), _retrieval_rows(ms)
    order = [n for n in [_name("st:"), _name("bm25"), *DISPLAY.values()] if n in d_rows or n in m_rows]
    header = ["system", "held-out docstrings nDCG@10", "MRR@10"]
    if ms is not None:
        header += ["MS MARCO nDCG@10", "MRR@10", "Recall@100"]
    rows = []
    for n in order:
        row = [n]
        d = d_rows.get(n)
        row += [f"{d['ndcg@10']:.4f}", f"{d['mrr@10']:.4f}"] if d else ["—", "—"]
        if ms is not None:
            m = m_rows.get(n)
            row += [f"{m['ndcg@10']:.4f}", f"{m['mrr@10']:.4f}", f"{m['recall@100']:.4f}"] if m else ["—"] * 3
        rows.append(row)
    if doc is not None:
        s = doc["data_stats"]
        lines.append(f"Retrieval (held-out docstrings: {s['num_queries_judged']} queries, {s['num_corpus']} documents"
                     + (f"; MS MARCO subset: {ms['data_stats']['num_queries_judged']} queries, "
                        f"{ms['data_stats']['num_corpus']} passages" if ms else "; MS MARCO: ../shared/data absent")
                     + ")")
        lines += ["", markdown_table(header, rows), ""]

    checks = []
    s1, s2 = d_rows.get(DISPLAY["stage1"]), d_rows.get(DISPLAY["stage2"])
    if s1 and s2:
        ok = s2["ndcg@10"] >= s1["ndcg@10"]
        checks.append(f"- stage 2 {'>=' if ok else '<'} stage 1 on held-out docstrings "
                      f"(nDCG@10 {s2['ndcg@10']:.4f} vs {s1['ndcg@10']:.4f}): {'yes' if ok else 'NO'}")
    if pk is not None:
        lengths = pk["settings"]["lengths"]
        ph = ["method"] + [str(n) for n in lengths] + ["avg"]
        prow = [[r["method"]] + [f"{100 * r['metrics']['acc@1'][str(n)]:.1f}" for n in lengths]
                + [f"{100 * r['metrics']['acc@1_avg']:.1f}"] for r in pk["results"]]
        st = pk["settings"]
        lines.append(f"Passkey Acc@1 (%), stage-2 model, {st['num_queries']} queries x {st['num_docs']} documents "
                     "per length (a reduced LongEmbed setting)")
        lines += ["", markdown_table(ph, prow), ""]
        acc = {r["method"]: r["metrics"]["acc@1"][str(max(lengths))] for r in pk["results"]}
        if "none" in acc:
            for m in ("ntk", "selfextend"):
                if m in acc:
                    ok = acc[m] > acc["none"]
                    checks.append(f"- {m} above no-extension at {max(lengths)} tokens "
                                  f"({100 * acc[m]:.1f} vs {100 * acc['none']:.1f}): {'yes' if ok else 'NO'}")
    if reload is not None:
        checks.append(f"- exported stage-2 model reloaded with plain transformers (fresh process): max |diff| "
                      f"{reload['max_abs_diff']:.2e}")
    if checks:
        lines += ["Checks (reported as measured):", *checks, ""]
    marks = sorted((out / ".demo").glob("*.done"))
    if marks:
        t = {m.stem: json.loads(m.read_text()).get("seconds") for m in marks}
        lines.append("Step times (s, this or an earlier resumed run): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if v is not None))
        lines.append("")
    lines.append("Artifacts: " + ", ".join(str(out / p) for p in
                                           ("minilm-rope", "models/stage1", "models/stage2", "shards", "eval", "plots", "logs")))
    text = "\n".join(lines)
    (out / "demo_summary.md").write_text(text + "\n", encoding="utf-8")
    return text
