# Copyright ropebert contributors. Apache-2.0.
"""Reports for `ropebert eval`: markdown tables, result JSON, and PNG charts (matplotlib, Agg backend).

    heatmap:   methods x lengths, Acc@1 in % (LongEmbed Fig. 1b style), one cell per (method, length)
    bar chart: systems x {nDCG@10, MRR@10, Recall@100} for retrieval runs
    sizes:     nDCG@10 against bytes per vector (log x) of a retrieval run with --dims / --quantize: one line
               per (system, precision) through its dims, each point labelled with its dim; BM25 a dashed line
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def accuracy_heatmap(methods: Sequence[str], lengths: Sequence[int], acc, path, title: str = "") -> Path:
    """acc: (len(methods), len(lengths)) Acc@1 in [0, 1] (NaN = not run). Rows = methods, cols = lengths,
    plus an 'avg' column (LongEmbed's headline number)."""
    import numpy as np

    plt = _pyplot()
    a = np.asarray(acc, dtype=float) * 100.0  # (M, L) in %
    if a.shape != (len(methods), len(lengths)):
        raise ValueError(f"heatmap: acc shape {a.shape} != ({len(methods)}, {len(lengths)})")
    avg = np.nanmean(np.where(np.isnan(a), np.nan, a), axis=1, keepdims=True) if a.size else a
    grid = np.concatenate([a, avg], axis=1)  # (M, L+1)
    cols = [length_label(n) for n in lengths] + ["avg"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 1.2 + 0.55 * len(methods)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(methods)), list(methods))
    ax.set_xlabel("context length (tokens)")
    ax.axvline(len(lengths) - 0.5, color="black", lw=1.5)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            last = j == grid.shape[1] - 1
            txt = "—" if np.isnan(v) else (f"{v:.1f}" if last else f"{v:.0f}")
            ax.text(j, i, txt, ha="center", va="center", fontsize=9,
                    color="black", fontweight="bold" if j == grid.shape[1] - 1 else "normal")
    fig.colorbar(im, ax=ax, label="Acc@1 (%)", fraction=0.04)
    ax.set_title(title or "Acc@1 (%)", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=130)
    plt.close(fig)
    return p


def retrieval_bar_chart(results: Sequence[dict], path, title: str = "",
                        metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@100")) -> Path:
    """Grouped bars: one group per metric, one bar per system, value labels on top."""
    import numpy as np

    plt = _pyplot()
    names = [r.get("label", r["name"]) for r in results]
    short = [n if len(n) <= 40 else "…" + n[-39:] for n in names]
    x = np.arange(len(metrics))
    w = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(metrics), 4.2))
    for i, r in enumerate(results):
        vals = [r["metrics"][m] for m in metrics]
        bars = ax.bar(x + (i - (len(results) - 1) / 2) * w, vals, w, label=short[i])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, list(metrics))
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    ax.set_title(title or "retrieval", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    return _save(fig, path)


def ndcg_bytes_chart(results: Sequence[dict], path, title: str = "", metric: str = "ndcg@10") -> Path:
    """results: retrieval results; those with a `quantized` list ({dim, precision, rescore, bytes_per_vector,
    metrics}) give one line per (system, precision, rescore), the others (BM25) a horizontal dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    markers = {"float32": "o", "int8": "s", "binary": "^"}
    n_lines = 0
    for r in results:
        name = r.get("label", r["name"])
        short = name if len(name) <= 40 else "…" + name[-39:]
        if "quantized" not in r:
            ax.axhline(r["metrics"][metric], ls="--", lw=1, color="grey")
            ax.annotate(short, (0.01, r["metrics"][metric]), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", va="bottom")
            continue
        groups: dict = {}
        for e in r["quantized"]:
            groups.setdefault((e["precision"], e.get("rescore")), []).append(e)
        for (precision, rescore), es in groups.items():
            es = sorted(es, key=lambda e: e["bytes_per_vector"])
            xs, ys = [e["bytes_per_vector"] for e in es], [e["metrics"][metric] for e in es]
            label = f"{short} · {precision}" + (f" + rescore {rescore}" if rescore else "")
            ax.plot(xs, ys, marker=markers.get(precision, "o"), label=label)
            for e, x, y in zip(es, xs, ys):
                ax.annotate(str(e["dim"]), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=6)
            n_lines += 1
    if n_lines == 0:
        plt.close(fig)
        raise ValueError("sizes chart: no result has a 'quantized' list (run with --dims / --quantize)")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per vector (log scale)")
    ax.set_ylabel(metric.replace("ndcg", "nDCG"))
    ax.set_title(title or f"{metric} against bytes per vector", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Lay out, write (parent folders made) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return p
