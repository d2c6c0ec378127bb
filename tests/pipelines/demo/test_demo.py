"""The demo driver: finished steps are skipped on a re-run (resume), a failing step stops it, and the summary is
built from the eval JSON files (nothing re-computed, checks reported as measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ropebert.pipelines.demo.report import write_summary
from ropebert.pipelines.demo.run import Demo
from ropebert.pipelines.search import bytes_per_vector

REPO = Path(__file__).resolve().parents[3]


def test_finished_steps_are_skipped_on_rerun(tmp_path):
    calls = []
    d = Demo(tmp_path, None, quick=True)
    d.step("a", lambda: calls.append("a"))
    with pytest.raises(RuntimeError):
        d.step("b", lambda: (calls.append("b"), (_ for _ in ()).throw(RuntimeError("interrupted"))))
    assert (tmp_path / ".demo" / "a.done").is_file() and not (tmp_path / ".demo" / "b.done").exists()
    again = Demo(tmp_path, None, quick=True)
    again.step("a", lambda: calls.append("a2"))
    again.step("b", lambda: calls.append("b2"))
    assert calls == ["a", "b", "b2"]  # a skipped, b redone


def _retrieval(names_scores):
    return {
        "data_stats": {"num_queries_judged": 10, "num_corpus": 100},
        "results": [{"name": n, "metrics": {"ndcg@10": s, "mrr@10": s, "recall@100": s}} for n, s in names_scores],
    }


def _eval_dir(tmp_path, ndcg, *files):
    """eval/ with retrieval results (parent, untrained, stage 1, stage 2 at these nDCG@10) in each of `files`."""
    ev = tmp_path / "eval"
    ev.mkdir()
    names = ("st:/x/ape", str(tmp_path / "minilm-rope"), str(tmp_path / "models/stage1"), str(tmp_path / "models/stage2"))
    for f in files:
        (ev / f).write_text(json.dumps(_retrieval(list(zip(names, ndcg)))))
    return ev


def test_summary_from_eval_files(tmp_path):
    ev = _eval_dir(tmp_path, (0.9, 0.5, 0.8, 0.79), "docstrings.json")
    lengths = [256, 2048]
    pk = {"settings": {"lengths": lengths, "num_queries": 10, "num_docs": 10},
          "results": [{"method": m, "metrics": {"acc@1": {"256": 1.0, "2048": a}, "acc@1_avg": (1 + a) / 2}}
                      for m, a in (("none", 0.3), ("ntk", 0.6), ("selfextend", 0.2))]}
    (ev / "passkey.json").write_text(json.dumps(pk))
    (ev / "reload.json").write_text(json.dumps({"max_abs_diff": 3e-7}))
    text = write_summary(tmp_path)
    assert (tmp_path / "demo_summary.md").read_text().strip() == text.strip()
    assert "stage 2 < stage 1 on held-out docstrings (nDCG@10 0.7900 vs 0.8000): NO" in text
    assert "ntk above no-extension at 2048 tokens (60.0 vs 30.0): yes" in text
    assert "selfextend above no-extension at 2048 tokens (20.0 vs 30.0): NO" in text
    assert "MS MARCO: ../shared/data absent" in text and "3.00e-07" in text


def test_curve_table_and_points(tmp_path):
    """--curve: kept step checkpoints of both stages, in training order; the summary's steps table."""
    for name, steps in (("demo-pretrain", (40, 80)), ("demo-pretrain-long", (1, 2)), ("demo-finetune", (10, 20))):
        (tmp_path / "ckpt" / name).mkdir(parents=True)
        for s in steps:
            (tmp_path / "ckpt" / name / f"step{s:07d}.ckpt").write_bytes(b"")
        (tmp_path / "ckpt" / name / "last.ckpt").write_bytes(b"")
    d = Demo(tmp_path, None, quick=True, curve=40, steps=80)
    # stage 1's long-document phase counts on from its first phase's last step
    assert [(s, n) for s, n, _ in d.curve_points()] == [("stage 1", 40), ("stage 1", 80), ("stage 1", 81),
                                                        ("stage 1", 82), ("stage 2", 10), ("stage 2", 20)]
    assert d.keep_checkpoints(40) == ["--checkpoint.every_n_train_steps", 40, "--checkpoint.save_top_k", -1]
    assert Demo(tmp_path, None, quick=True).keep_checkpoints(40) == []
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "docstrings.json").write_text(json.dumps(_retrieval([("st:/x/ape", 0.9)])))
    curve = [(str(tmp_path / f"models/curve/{s}-step{n:07d}"), v)
             for s, n, v in (("stage2", 10, 0.85), ("stage1", 80, 0.84), ("stage1", 40, 0.82))]
    (ev / "curve-docstrings.json").write_text(json.dumps(_retrieval(curve)))
    text = write_summary(tmp_path)
    assert "nDCG@10 against training steps (`--curve`; APE parent: held-out 0.9000)" in text
    rows = [" ".join(line.split()) for line in text.splitlines() if line.startswith("| stage ")][1:]
    assert rows == ["| stage 1 | 40 | 0.8200 |", "| stage 1 | 80 | 0.8400 |", "| stage 2 | 10 | 0.8500 |"]


def test_curve_without_checkpoints_and_bad_flags(tmp_path):
    from ropebert.errors import UserError
    from ropebert.pipelines.demo.run import main

    with pytest.raises(UserError, match="--curve: no step checkpoints"):
        Demo(tmp_path, None, quick=True, curve=10).curve_eval()
    for flag in ("--curve", "--steps", "--pairs"):
        with pytest.raises(UserError, match=f"{flag} must be >= 1, got 0"):
            main(["--out", str(tmp_path / "o"), flag, "0"])


def test_fresh_refuses_a_directory_the_demo_did_not_create(tmp_path):
    from ropebert.errors import UserError
    from ropebert.pipelines.demo.run import main

    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="not a `ropebert demo` artifact directory"):
        main(["--out", str(tmp_path), "--fresh"])
    assert (tmp_path / "mine.txt").read_text() == "a user's file"


def test_summary_states_the_gap_to_the_parent_on_ms_marco(tmp_path):
    _eval_dir(tmp_path, (0.80, 0.7, 0.795, 0.81), "docstrings.json", "msmarco.json")
    text = write_summary(tmp_path)
    assert "stage 1 within 1.0 nDCG@10 point of the APE parent on MS MARCO (0.7950 vs 0.8000, 0.5 points below): yes" in text
    assert "stage 2 within 1.0 nDCG@10 point of the APE parent on MS MARCO (0.8100 vs 0.8000, 1.0 points above): yes" in text


def test_a_step_runs_again_when_its_settings_change(tmp_path):
    """`--full-eval` after a default run re-runs the evaluation; the same settings skip it."""
    calls = []
    d = Demo(tmp_path, None, quick=False)
    d.step("evaluate", lambda: calls.append("default"), d.eval_settings())
    Demo(tmp_path, None, quick=False).step("evaluate", lambda: calls.append("again"), d.eval_settings())
    full = Demo(tmp_path, None, quick=False, full_eval=True)
    assert full.eval_settings()["msmarco_docs"] is None and d.eval_settings()["msmarco_docs"] == 500
    full.step("evaluate", lambda: calls.append("full"), full.eval_settings())
    assert calls == ["default", "full"]
    assert json.loads((tmp_path / ".demo" / "evaluate.done").read_text())["settings"] == full.eval_settings()
    from ropebert.errors import UserError

    with pytest.raises(UserError, match="--quick contradicts --full / --full-eval"):
        Demo(tmp_path, None, quick=True, full_eval=True)


def test_training_sizes_and_no_mixing_in_one_directory(tmp_path):
    from ropebert.errors import UserError

    short, full = Demo(tmp_path, None, quick=False), Demo(tmp_path, None, quick=False, full=True)
    assert short.max_steps(0) == ["--trainer.max_steps", 12] and short.max_steps(1) == ["--trainer.max_steps", 6]
    assert full.max_steps(0) == [] and full.max_steps(1) == []  # the configs' max_steps: the recipe
    assert full.full_eval and full.eval_settings()["msmarco_docs"] is None and full.eval_settings()["untrained"]
    assert Demo(tmp_path, None, quick=False, steps=100).max_steps(0) == ["--trainer.max_steps", 100]
    short.check_training_scale()
    Demo(tmp_path, None, quick=False, full_eval=True).check_training_scale()  # re-evaluating a short run is fine
    with pytest.raises(UserError, match="repeat that run's --full / --steps / --pairs"):
        full.check_training_scale()
    assert json.loads((tmp_path / ".demo" / "train.json").read_text())["scale"] == "short"
    # --pairs is part of the training size: another pair count on the same artifacts is refused
    with pytest.raises(UserError, match="repeat that run's --full / --steps / --pairs"):
        Demo(tmp_path, None, quick=False, pairs=5000).check_training_scale()


def test_pairs_sets_the_stage1_shard_sizes(tmp_path, monkeypatch):
    """--pairs N builds N stage-1 pairs split by the package shares (the scale's count without it)."""
    from ropebert.pipelines.demo import run

    built = {}

    def fake_ropebert(self, *args):
        args = list(map(str, args))
        if args[:2] == ["shards", "build"]:
            built[args[args.index("--input") + 1]] = int(args[args.index("--limit") + 1])
        if args[:2] == ["shards", "pack"]:
            built["pack"] = [args[args.index("--input") + 1], args[args.index("--limit") + 1]]

    monkeypatch.setattr(run.Demo, "ropebert", fake_ropebert)
    monkeypatch.setattr(run.Demo, "heldout_beir", lambda self, out, limit: None)
    (tmp_path / "shards" / "stage1").mkdir(parents=True)
    Demo(tmp_path, None, quick=False, full=True, pairs=5000).shards()
    built.pop("pack")
    assert built == {pkg: round(5000 * share) for pkg, share in run.STAGE1_SOURCES}
    Demo(tmp_path, None, quick=False, full=True).shards()
    # the long-document pairs, packed from the stage-1 mixture; the phase reads them alone
    assert built.pop("pack") == [str(tmp_path / "shards/stage1/mixture.yaml"), str(round(2000 * run.PACK_SHARE))]
    assert Demo(tmp_path, None, quick=False, full=True).long_data == tmp_path / "shards/stage1-long"
    assert built == {pkg: round(2000 * share) for pkg, share in run.STAGE1_SOURCES}
    assert Demo(tmp_path, None, quick=False, full=True, pairs=5000).train_settings()["stage1_pairs"] == 5000
    assert "stage1_pairs" not in Demo(tmp_path, None, quick=False, full=True).train_settings()


def test_summary_names_a_reduced_ms_marco_corpus(tmp_path):
    ev = _eval_dir(tmp_path, (0.80, 0.7, 0.795, 0.81), "docstrings.json", "msmarco.json")
    ms = json.loads((ev / "msmarco.json").read_text())
    ms["data_stats"].update(num_corpus=1000, num_corpus_file=5000)
    (ev / "msmarco.json").write_text(json.dumps(ms))
    text = write_summary(tmp_path)
    assert "1000 of its 5000 passages (every judged passage + a seeded sample" in text
    assert "| MS MARCO (1000 of 5000 passages) nDCG@10 |" in " ".join(text.split("\n")[4].split()).replace("  ", " ")
    assert "stage 2 >= stage 1 on MS MARCO (1000 of 5000 passages)" in text
    assert "stage 1 within 1.0 nDCG@10 point of the APE parent on MS MARCO (1000 of 5000 passages)" in text


def test_summary_sizes_table_and_quantisation_checks(tmp_path):
    """eval retrieval --dims --quantize --rescore: one row per system and dim, what binary / int8 keep of float32
    for stage 2 (against the 95% target), and stage 2 against the parent at the small dims."""
    ev = _eval_dir(tmp_path, (0.80, 0.5, 0.78, 0.79), "msmarco.json")
    doc = json.loads((ev / "msmarco.json").read_text())
    nd = {("st:/x/ape", 384): (0.80, 0.79, 0.70), ("st:/x/ape", 64): (0.60, 0.59, 0.30),
          (str(tmp_path / "models/stage2"), 384): (0.79, 0.785, 0.76),
          (str(tmp_path / "models/stage2"), 64): (0.70, 0.69, 0.50)}
    for r in doc["results"]:
        q = [{"dim": dim, "precision": p, "rescore": None if p == "float32" else 100,
              "bytes_per_vector": bytes_per_vector(dim, p),
              "metrics": {"ndcg@10": v}} for (name, dim), vals in nd.items() if name == r["name"]
             for p, v in zip(("float32", "int8", "binary"), vals)]
        if q:
            r["quantized"] = q
    (ev / "msmarco.json").write_text(json.dumps(doc))
    text = write_summary(tmp_path)
    assert "int8 / binary re-scored with the float32 query over their top 100" in text
    rows = [r for r in (" ".join(line.split()) for line in text.splitlines()) if "| 64 |" in r or "| 384 |" in r]
    assert rows == ["| APE parent all-MiniLM-L6-v2 (sentence-transformers) | 384 | 0.8000 (1536) | 0.7900 (384) | "
                    "0.7000 (48) |",
                    "| APE parent all-MiniLM-L6-v2 (sentence-transformers) | 64 | 0.6000 (256) | 0.5900 (64) | "
                    "0.3000 (8) |",
                    "| stage 2 (7 hard negatives + distillation) | 384 | 0.7900 (1536) | 0.7850 (384) | 0.7600 (48) |",
                    "| stage 2 (7 hard negatives + distillation) | 64 | 0.7000 (256) | 0.6900 (64) | 0.5000 (8) |"]
    assert ("- stage 2 at 384 dims, int8 + rescore: 99.4% of float32 nDCG@10 (0.7850 vs 0.7900; target >= 95%): yes"
            in text)
    assert "- stage 2 at 384 dims, binary + rescore: 96.2% of float32 nDCG@10 (0.7600 vs 0.7900" in text
    assert ("- stage 2 (Matryoshka-trained) vs the APE parent (not trained for it), both cut to 64 dims: 0.7000 vs "
            "0.6000 (above)") in text


def test_summary_shows_the_prose_tuning_split(tmp_path):
    _eval_dir(tmp_path, (0.80, 0.7, 0.82, 0.83), "docstrings.json")
    names = ("st:/x/ape", str(tmp_path / "models/stage1"), str(tmp_path / "models/stage2"))
    (tmp_path / "eval" / "prose.json").write_text(json.dumps(_retrieval(list(zip(names, (0.70, 0.72, 0.71))))))
    text = write_summary(tmp_path)
    assert "prose (Python reference, a second tuning split): 10 queries, 100 documents" in text
    assert "stage 2 < stage 1 on prose (nDCG@10 0.7100 vs 0.7200): NO" in text
    assert "stage 2 >= stage 1 on held-out docstrings (nDCG@10 0.8300 vs 0.8200): yes" in text
    parent = next(" ".join(line.split()) for line in text.splitlines() if line.startswith("| APE parent"))
    assert parent.startswith("| APE parent all-MiniLM-L6-v2 (sentence-transformers) | 0.8000 | 0.8000 | 0.7000 |")


def test_prose_set_is_written_once_and_holds_no_training_text(tmp_path):
    from ropebert.shards.beir import read_beir

    d = Demo(tmp_path, None, quick=True)
    out = d.prose_beir()
    b = read_beir(out)
    assert not b.bads and len(b.corpus) > 200 and len(b.queries) > 200 and len(b.judgements) == len(b.corpus)
    stamp = (out / "corpus.jsonl").stat().st_mtime_ns
    assert d.prose_beir() == out and (out / "corpus.jsonl").stat().st_mtime_ns == stamp
    for j in b.judgements:  # a query is never inside its own relevant passage
        assert b.queries[j.qid][0]["text"] not in " ".join(b.corpus[j.did][0]["text"].lower().split())


def test_artifacts_of_another_conversion_are_refused(tmp_path):
    """A demo directory trained from another APE -> RoPE conversion (an earlier recipe) is not resumed."""
    from ropebert.errors import UserError
    from ropebert.pipelines.demo.run import CONVERSION

    d = Demo(tmp_path, None, quick=False)
    old = {k: v for k, v in d.train_settings().items() if k != "conversion"}
    (tmp_path / ".demo").mkdir()
    (tmp_path / ".demo" / "train.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="--keep-positions 64"):
        d.check_training_scale()
    assert "--keep-positions" in CONVERSION


def test_long_phase_sizes_follow_its_config(tmp_path):
    """The demo's long-phase sizes match configs/demo/pretrain-long.yaml; a demo trained before the long phase is
    refused (its stage-1 data differ)."""
    import yaml

    from ropebert.pipelines.demo import run

    cfg = yaml.safe_load((REPO / "configs/demo/pretrain-long.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == run.LONG_STEPS
    assert cfg["data"]["max_passage_length"] >= dict(zip(run.PACK[::2], run.PACK[1::2]))["--max-length"] + 2
    assert Demo(tmp_path, None, quick=False, full=True).long_steps() == run.LONG_STEPS
    assert Demo(tmp_path, None, quick=False).long_steps() == run.TRAIN["short"][4]
    assert Demo(tmp_path, None, quick=False, full=True).stage1_steps() == 40  # configs/demo/pretrain.yaml
    assert "0.6 of them packed --min-length 254 --max-length 508, alone" in Demo(tmp_path, None, quick=False).train_settings()["stage1_data"]
