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


def _curve_key(spec: str):
    """models/curve/stage1-step0000040 -> ("stage 1", 40)."""
    stem = Path(spec).name
    stage, _, step = stem.partition("-step")
    return f"stage {stage.removeprefix('stage')}", int(step)


def curve_table(curve_doc: dict, curve_ms: dict | None, ms: dict | None, doc: dict | None,
                curve_prose: dict | None = None, prose: dict | None = None) -> list[str]:
    """nDCG@10 against training steps of both stages (`ropebert demo --curve K`), the APE parent beside."""
    def points(res):
        return {_curve_key(r["name"]): r["metrics"]["ndcg@10"] for r in res["results"] if "-step" in r["name"]}

    def parent_of(res):
        return _retrieval_rows(res).get(_name("st:"), {}).get("ndcg@10", float("nan"))

    d = points(curve_doc)
    extra = [(label, points(res)) for label, res in (("prose", curve_prose), ("MS MARCO", curve_ms)) if res]
    # the parent: from the main evaluation, else the curve's own run
    doc, ms, prose = doc or curve_doc, ms or curve_ms, prose or curve_prose
    header = ["stage", "step", "held-out docstrings nDCG@10"] + [f"{label} nDCG@10" for label, _ in extra]
    rows = [[s, str(n), f"{v:.4f}"] + [f"{m[(s, n)]:.4f}" if (s, n) in m else "—" for _, m in extra]
            for (s, n), v in sorted(d.items())]
    parent = [f"APE parent: held-out {parent_of(doc):.4f}"]
    if prose is not None:
        parent.append(f"prose {parent_of(prose):.4f}")
    if ms is not None:
        parent.append(f"MS MARCO {parent_of(ms):.4f}")
    return ["nDCG@10 against training steps (`--curve`; " + ", ".join(parent) + ")", "",
            markdown_table(header, rows), ""]


def size_table(ms: dict) -> tuple[list[str], list[str]]:
    """MS MARCO nDCG@10 of every dense system at each Matryoshka dim x stored precision (`eval retrieval --dims
    --quantize --rescore`), and the checks: what binary / int8 + re-scoring keep of float32 for stage 2, and the
    stage-2 model against the APE parent at the small dims (the parent was not trained for them)."""
    systems = [(_name(r["name"]), r["quantized"]) for r in ms["results"] if r.get("quantized")]
    if not systems:
        return [], []
    precisions = list(dict.fromkeys(e["precision"] for _, q in systems for e in q))
    rescore = next((e["rescore"] for _, q in systems for e in q if e["rescore"]), None)
    header = ["system", "dim"] + [f"{p} nDCG@10 (bytes/vector)" for p in precisions]
    rows, at = [], {}
    for name, entries in systems:
        for dim in dict.fromkeys(e["dim"] for e in entries):
            cells = {e["precision"]: e for e in entries if e["dim"] == dim}
            rows.append([name, str(dim)] + [f"{cells[p]['metrics']['ndcg@10']:.4f} ({cells[p]['bytes_per_vector']})"
                                           if p in cells else "—" for p in precisions])
            at.update({(name, dim, p): cells[p]["metrics"]["ndcg@10"] for p in cells})
    title = ("MS MARCO nDCG@10 by embedding size (Matryoshka prefix, renormalised) and stored precision"
             + (f"; int8 / binary re-scored with the float32 query over their top {rescore}" if rescore else ""))
    lines = [title, "", markdown_table(header, rows), ""]
    checks = []
    s2, ape = DISPLAY["stage2"], _name("st:")
    dims = sorted({d for (n, d, _) in at if n == s2}, reverse=True)
    if dims and (s2, dims[0], "float32") in at:
        full = at[(s2, dims[0], "float32")]
        for p in ("int8", "binary"):
            if (s2, dims[0], p) in at and full > 0:
                kept = 100 * at[(s2, dims[0], p)] / full
                checks.append(f"- stage 2 at {dims[0]} dims, {p}{' + rescore' if rescore else ''}: {kept:.1f}% of "
                              f"float32 nDCG@10 ({at[(s2, dims[0], p)]:.4f} vs {full:.4f}; target >= 95%): "
                              f"{'yes' if kept >= 95 else 'NO'}")
    for d in dims[1:]:
        if (s2, d, "float32") in at and (ape, d, "float32") in at:
            a, b = at[(s2, d, "float32")], at[(ape, d, "float32")]
            checks.append(f"- stage 2 (Matryoshka-trained) vs the APE parent (not trained for it), both cut to {d} "
                          f"dims: {a:.4f} vs {b:.4f} ({'above' if a > b else 'NOT above'})")
    return lines, checks


def write_summary(out: Path) -> str:
    ev = out / "eval"
    doc = _load(ev / "docstrings.json")
    prose = _load(ev / "prose.json")
    ms = _load(ev / "msmarco.json")
    pk = _load(ev / "passkey.json")
    nd = _load(ev / "needle.json")
    reload = _load(ev / "reload.json")
    lines = ["# ropebert demo summary", ""]

    d_rows, p_rows, m_rows = _retrieval_rows(doc), _retrieval_rows(prose), _retrieval_rows(ms)
    ms_label = "MS MARCO"
    if ms is not None:
        st = ms["data_stats"]
        n_ms, n_file = st["num_corpus"], st.get("num_corpus_file", st["num_corpus"])
        if n_ms < n_file:  # `--max-docs`: every judged passage + a seeded sample of the others
            ms_label = f"MS MARCO ({n_ms} of {n_file} passages)"
    order = [n for n in [_name("st:"), _name("bm25"), *DISPLAY.values()] if n in d_rows or n in m_rows]
    header = ["system", "held-out docstrings nDCG@10", "MRR@10"]
    if prose is not None:
        header += ["prose nDCG@10", "MRR@10"]
    if ms is not None:
        header += [f"{ms_label} nDCG@10", "MRR@10", "Recall@100"]
    columns = [(d_rows, ("ndcg@10", "mrr@10"))] + ([(p_rows, ("ndcg@10", "mrr@10"))] if prose is not None else []) + (
        [(m_rows, ("ndcg@10", "mrr@10", "recall@100"))] if ms is not None else [])
    rows = [[n] + [f"{rows_[n][k]:.4f}" if n in rows_ else "—" for rows_, keys in columns for k in keys]
            for n in order]
    if doc is not None:
        s = doc["data_stats"]
        if ms is None:
            ms_text = "; MS MARCO: ../shared/data absent"
        else:
            ms_text = (f"; MS MARCO subset: {st['num_queries_judged']} queries, "
                       + (f"the full {n_file} passages" if n_ms >= n_file else
                          f"{n_ms} of its {n_file} passages (every judged passage + a seeded sample; "
                          "`ropebert demo --full-eval` for the full corpus)"))
        p_text = "" if prose is None else (f"; prose (Python reference, a second tuning split): "
                                           f"{prose['data_stats']['num_queries_judged']} queries, "
                                           f"{prose['data_stats']['num_corpus']} documents")
        lines.append(f"Retrieval (held-out docstrings: {s['num_queries_judged']} queries, {s['num_corpus']} documents"
                     + p_text + ms_text + ")")
        lines += ["", markdown_table(header, rows), ""]
    size_lines, size_checks = size_table(ms) if ms is not None else ([], [])
    lines += size_lines

    checks = []
    for label, rows_ in (("held-out docstrings", d_rows), ("prose", p_rows), (ms_label, m_rows)):
        s1, s2, ape = rows_.get(DISPLAY["stage1"]), rows_.get(DISPLAY["stage2"]), rows_.get(_name("st:"))
        if s1 and s2:
            ok = s2["ndcg@10"] >= s1["ndcg@10"]
            checks.append(f"- stage 2 {'>=' if ok else '<'} stage 1 on {label} "
                          f"(nDCG@10 {s2['ndcg@10']:.4f} vs {s1['ndcg@10']:.4f}): {'yes' if ok else 'NO'}")
        if ape and label == ms_label:
            for name, r in (("stage 1", s1), ("stage 2", s2)):
                if r:
                    gap = 100 * (ape["ndcg@10"] - r["ndcg@10"])
                    where = f"{gap:.1f} points below" if gap > 0 else f"{-gap:.1f} points above"
                    checks.append(f"- {name} within 1.0 nDCG@10 point of the APE parent on {label} "
                                  f"({r['ndcg@10']:.4f} vs {ape['ndcg@10']:.4f}, {where}): "
                                  f"{'yes' if gap <= 1.0 else 'NO'}")
    for task, res in (("Passkey", pk), ("Needle (MS MARCO passages in Paul Graham essays)", nd)):
        if res is None:
            continue
        lengths = res["settings"]["lengths"]
        ph = ["method"] + [str(n) for n in lengths] + ["avg"]
        prow = [[r["method"]] + [f"{100 * r['metrics']['acc@1'][str(n)]:.1f}" for n in lengths]
                + [f"{100 * r['metrics']['acc@1_avg']:.1f}"] for r in res["results"]]
        st = res["settings"]
        lines.append(f"{task} Acc@1 (%), stage-2 model (and the APE parent truncated at its 512 positions), "
                     f"{st['num_queries']} queries x {st['num_docs']} documents per length (a reduced LongEmbed setting)")
        lines += ["", markdown_table(ph, prow), ""]
        short = task.split()[0].lower()
        for n in [x for x in lengths if x >= 2048]:
            acc = {r["method"]: r["metrics"]["acc@1"][str(n)] for r in res["results"] if "baseline" not in r}
            base = [r for r in res["results"] if "baseline" in r]
            if "none" in acc:
                for m in ("ntk", "selfextend"):
                    if m in acc:
                        ok = acc[m] > acc["none"]
                        checks.append(f"- {short}: {m} above no-extension at {n} tokens "
                                      f"({100 * acc[m]:.1f} vs {100 * acc['none']:.1f}): {'yes' if ok else 'NO'}")
            if base and acc:
                best = max(acc, key=acc.get)
                b = base[0]["metrics"]["acc@1"][str(n)]
                ok = acc[best] > b
                checks.append(f"- {short}: best RoPE method ({best}) above the APE parent truncated at 512 at {n} "
                              f"tokens ({100 * acc[best]:.1f} vs {100 * b:.1f}): {'yes' if ok else 'NO'}")
    checks += size_checks
    if reload is not None:
        checks.append(f"- exported stage-2 model reloaded with plain transformers (fresh process): max |diff| "
                      f"{reload['max_abs_diff']:.2e}")
    if checks:
        lines += ["Checks (reported as measured):", *checks, ""]
    curve_doc, curve_ms = _load(ev / "curve-docstrings.json"), _load(ev / "curve-msmarco.json")
    if curve_doc is not None:
        lines += curve_table(curve_doc, curve_ms, ms, doc, _load(ev / "curve-prose.json"), prose)
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
