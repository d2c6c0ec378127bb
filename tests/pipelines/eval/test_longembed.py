"""LongEmbed passkey / real-data needle generators, method presets (Table 6), and `ropebert eval passkey`."""

from __future__ import annotations

import json

import pytest
import torch

from ropebert.pipelines.eval.longembed import (
    FILLER,
    FIRST_NAMES,
    LAST_NAMES,
    evaluate_tasks,
    generate_needle,
    generate_passkey,
    needle_main,
    passkey_main,
)
from ropebert.shards.beir import read_qrels
from tests.conftest import tiny_config

LENGTHS = [256, 512, 1024, 2048]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


def _n_tokens(tok, texts, prefix="passage: "):
    return [len(x) for x in tok([prefix + t for t in texts], add_special_tokens=True, verbose=False)["input_ids"]]


def test_passkey_documents_token_counts_needles_and_seed(tokenizer):
    tasks = generate_passkey(LENGTHS, num_queries=5, num_docs=10, seed=3, tokenizer=tokenizer)
    assert [t.length for t in tasks] == LENGTHS
    for t in tasks:
        assert len(t.docs) == 10 and len(t.queries) == 5 and t.gold == list(range(5))
        for n in _n_tokens(tokenizer, t.docs):  # prefix + special tokens included
            assert abs(n - t.length) <= 0.05 * t.length and n <= t.length, (t.length, n)
        names = [q.removeprefix("what is the passkey for ").removesuffix("?") for q in t.queries]
        for i, doc in enumerate(t.docs):
            assert doc.count("pass key is") == 1 and doc.count("is the pass key for") == 1  # exactly one needle
            assert doc.count(t.needles[i]) == 1
            assert doc.replace(t.needles[i], "").split() == (FILLER.split() * 10000)[: len(doc.split()) - len(t.needles[i].split())]
        for i, name in enumerate(names):  # query i asks for the name of gold doc i
            assert f"{name}'s pass key" in t.docs[i]
        full = [" ".join(d.split("'s pass key")[0].split()[-2:]) for d in t.docs]  # "First Last"
        assert len(set(full)) == 10  # distinct full names within a length
        assert all(len(n.split()) == 2 and n.split()[0] in FIRST_NAMES and n.split()[1] in LAST_NAMES for n in full)
        assert all(t.needles[i].startswith(f"{full[i]}'s pass key is ") for i in range(10))
        assert names == full[:5]
    again = generate_passkey(LENGTHS, num_queries=5, num_docs=10, seed=3, tokenizer=tokenizer)
    assert [t.docs for t in again] == [t.docs for t in tasks] and [t.queries for t in again] == [t.queries for t in tasks]
    other = generate_passkey(LENGTHS, num_queries=5, num_docs=10, seed=4, tokenizer=tokenizer)
    assert [t.docs for t in other] != [t.docs for t in tasks]
    depths = [d for t in tasks for d in t.depths]
    assert min(depths) < 0.3 and max(depths) > 0.7  # needles at varied depths


def test_passkey_full_names_seeded_and_distinct_per_length():
    """LEMBPasskeyRetrieval's naming: "what is the passkey for Joyce Jenkins?", needle "Joyce Jenkins's pass key is
    ..."; 100 documents per length get 100 distinct first + last names, reproducible from the seed."""
    tasks = generate_passkey([256, 512], num_queries=50, num_docs=100, seed=0)
    for t in tasks:
        names = [n.split("'s pass key is ")[0] for n in t.needles]
        assert len(set(names)) == 100
        assert all(len(n.split()) == 2 and n.split()[0] in FIRST_NAMES and n.split()[1] in LAST_NAMES for n in names)
        assert t.queries == [f"what is the passkey for {n}?" for n in names[:50]]
    assert [t.needles for t in generate_passkey([256, 512], 50, 100, seed=0)] == [t.needles for t in tasks]
    assert tasks[0].needles != tasks[1].needles  # drawn per length


def test_passkey_without_tokenizer_uses_075_words_per_token():
    (t,) = generate_passkey([1024], num_queries=2, num_docs=3, seed=0)
    for doc in t.docs:
        assert len(doc.split()) == int(1024 * 0.75)


def test_needle_real_data(shared_data, tokenizer):
    ms, pg = shared_data / "msmarco", shared_data / "pg"
    tasks = generate_needle(ms, pg, [256, 1024], num_queries=8, num_docs=12, seed=1, tokenizer=tokenizer)
    qrels = read_qrels(ms / "qrels" / "test.tsv")
    corpus = {json.loads(l)["_id"]: json.loads(l)["text"] for l in (ms / "corpus.jsonl").open()}
    queries = {json.loads(l)["text"]: json.loads(l)["_id"] for l in (ms / "queries.jsonl").open()}
    text_to_id = {v: k for k, v in corpus.items()}
    for t in tasks:
        assert len(t.queries) == 8 and len(t.docs) == 12
        for n in _n_tokens(tokenizer, t.docs):
            assert abs(n - t.length) <= 0.05 * t.length and n <= t.length, (t.length, n)
        for i, doc in enumerate(t.docs):
            assert doc.count(t.needles[i]) == 1
        for i, q in enumerate(t.queries):  # gold needle: judged grade >= 2 for this very query
            assert qrels[queries[q]][text_to_id[t.needles[t.gold[i]]]] >= 2
        chosen = [queries[q] for q in t.queries]
        for needle in t.needles[8:]:  # distractors: relevant to none of the chosen queries
            assert all(qrels[q].get(text_to_id[needle], 0) < 1 for q in chosen)
    again = generate_needle(ms, pg, [256, 1024], num_queries=8, num_docs=12, seed=1, tokenizer=tokenizer)
    assert [t.docs for t in again] == [t.docs for t in tasks]


def test_evaluate_tasks_tiny_model(tokenizer, capsys):
    from ropebert.model import RopeBertModel

    torch.manual_seed(0)
    model = RopeBertModel(tiny_config(vocab_size=30522, max_position_embeddings=128)).eval()
    tasks = generate_passkey([128, 256], num_queries=3, num_docs=5, seed=0, tokenizer=tokenizer)
    shapes = []  # (batch, length) of every forward: the token budget bounds memory for long documents
    hook = model.embeddings.word_embeddings.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    try:
        r = evaluate_tasks(model, tasks, "ntk", batch_size=4, max_tokens=512, tokenizer=tokenizer,
                           show_progress_bar=True)
    finally:
        hook.remove()
    assert set(r["acc@1"]) == {"128", "256"} and all(0 <= v <= 1 for v in r["acc@1"].values())
    assert r["acc@1_avg"] == pytest.approx(sum(r["acc@1"].values()) / 2)
    assert model.config.rope_theta == 10000.0  # restored
    docs = [(b, n) for b, n in shapes if n >= 100]  # document batches (queries are short)
    assert {n for _, n in docs} == {128, 256}  # documents are fed whole: no truncation
    assert all(b * n <= 512 for b, n in docs) and max(b for b, n in docs if n == 128) == 4  # budget, not batch size
    assert "encode" in capsys.readouterr().err  # progress bar


def test_passkey_cli_converted_model(tmp_path, minilm_dir, capsys):
    """Acceptance (reduced): the freshly converted RoPE model at 256-2048 tokens, JSON + heatmap."""
    out, png = tmp_path / "passkey.json", tmp_path / "heat.png"
    rc = passkey_main(["--model", str(minilm_dir), "--method", "none", "--method", "ntk", "--method", "selfextend",
                       "--lengths", ",".join(map(str, LENGTHS)), "--num-queries", "2", "--num-docs", "2",
                       "--output", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "passkey" and res["settings"]["lengths"] == LENGTHS
    assert [r["method"] for r in res["results"]] == ["none", "ntk", "selfextend"]
    for r in res["results"]:
        assert set(r["metrics"]["acc@1"]) == {str(n) for n in LENGTHS}
        assert all(0.0 <= v <= 1.0 for v in r["metrics"]["acc@1"].values())
        assert r["metrics"]["acc@1_avg"] == pytest.approx(sum(r["metrics"]["acc@1"].values()) / len(LENGTHS))
    for n in LENGTHS:
        assert abs(res["doc_tokens_mean"][str(n)] - n) <= 0.05 * n
    assert res["results"][1]["presets"]["1024"] == {"rope_theta": 30000.0}
    assert res["results"][2]["presets"]["2048"]["self_extend"] == {"group_size": 5, "window": 128}
    assert res["results"][0]["presets"]["2048"] == {} and res["results"][2]["presets"]["512"] == {}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ntk" in capsys.readouterr().out


def test_needle_cli_converted_model(tmp_path, shared_data, minilm_dir, capsys):
    """`ropebert eval needle` (reduced): real MS MARCO needles in Paul Graham haystacks, JSON + heatmap."""
    out, png = tmp_path / "needle.json", tmp_path / "needle.png"
    rc = needle_main(["--model", str(minilm_dir), "--msmarco", str(shared_data / "msmarco"), "--pg",
                      str(shared_data / "pg"), "--lengths", "256,512", "--num-queries", "3", "--num-docs", "5",
                      "--output", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "needle" and res["settings"]["lengths"] == [256, 512] and res["wall_time_s"] > 0
    assert res["settings"]["num_queries"] == 3 and res["settings"]["num_docs"] == 5
    assert set(res["metrics"]["acc@1"]) == {"256", "512"} and 0.0 <= res["metrics"]["acc@1_avg"] <= 1.0
    assert "msmarco" in res["data"] and "pg" in res["data"]
    for n in (256, 512):
        assert abs(res["doc_tokens_mean"][str(n)] - n) <= 0.05 * n
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| none" in capsys.readouterr().out


def test_methods_share_results_where_their_presets_agree(tokenizer):
    """At lengths <= the trained length every method is `none`: the CLI evaluates it once (cache), same numbers."""
    from ropebert.model import RopeBertModel

    torch.manual_seed(0)
    model = RopeBertModel(tiny_config(vocab_size=30522, max_position_embeddings=128)).eval()
    tasks = generate_passkey([128, 256], num_queries=3, num_docs=5, seed=0, tokenizer=tokenizer)
    kw = dict(batch_size=8, max_tokens=4096, show_progress_bar=False, tokenizer=tokenizer)
    plain = {m: evaluate_tasks(model, tasks, m, **kw) for m in ("none", "ntk")}
    lengths = []
    hook = model.embeddings.word_embeddings.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    cache: dict = {}
    try:
        cached = {m: evaluate_tasks(model, tasks, m, cache=cache, **kw) for m in ("none", "ntk")}
    finally:
        hook.remove()
    assert cached == plain
    assert sum(n == 128 for n in lengths) == 1 and sum(n == 256 for n in lengths) == 2  # ntk@128 reused


def test_seed_lists_are_parsed_and_checked():
    from ropebert.errors import InputError
    from ropebert.pipelines.eval.longembed import parse_seeds

    assert parse_seeds("0") == [0] and parse_seeds("3,1,2") == [3, 1, 2]
    for bad in ("0,x", "", "1.5", "2,2"):
        with pytest.raises(InputError, match="--seed"):
            parse_seeds(bad)


def test_mean_over_seeds_by_hand():
    from ropebert.pipelines.eval.longembed import mean_over_seeds

    one = {"acc@1": {"256": 0.5, "512": 0.25}, "acc@1_avg": 0.375}
    assert mean_over_seeds({0: one}) == {"acc@1": {"256": 0.5, "512": 0.25}, "acc@1_avg": 0.375}
    two = mean_over_seeds({0: one, 7: {"acc@1": {"256": 1.0, "512": 0.0}}})
    assert two["acc@1"] == {"256": 0.75, "512": 0.125} and two["acc@1_avg"] == pytest.approx(0.4375)
    assert two["acc@1_per_seed"] == {"0": {"256": 0.5, "512": 0.25}, "7": {"256": 1.0, "512": 0.0}}


def test_several_seeds_report_each_seed_and_their_mean(tmp_path, minilm_dir, capsys):
    """`--seed 0,1`: each seed's figures are those of its own run (model and baseline), the headline their mean."""
    def run(seed):
        out = tmp_path / f"passkey-{seed}.json"
        rc = passkey_main(["--model", str(minilm_dir), "--method", "none", "--baseline", f"st:{minilm_dir}",
                           "--lengths", "256,512", "--num-queries", "3", "--num-docs", "4", "--seed", seed,
                           "--output", str(out), "--no-progress"])
        assert rc == 0
        return json.loads(out.read_text())

    single = {s: run(s) for s in ("0", "1")}
    capsys.readouterr()
    both = run("0,1")
    printed = capsys.readouterr().out
    assert both["settings"]["seed"] == [0, 1] and single["0"]["settings"]["seed"] == 0
    assert "acc@1_per_seed" not in single["0"]["results"][0]["metrics"]
    assert both["results"][0]["method"] == "none" and "baseline" in both["results"][1]
    for i in (0, 1):  # the RoPE model's method, then the sentence-transformers baseline
        r = both["results"][i]["metrics"]
        for s in ("0", "1"):
            assert r["acc@1_per_seed"][s] == single[s]["results"][i]["metrics"]["acc@1"]
        for n in ("256", "512"):
            assert r["acc@1"][n] == pytest.approx(sum(single[s]["results"][i]["metrics"]["acc@1"][n]
                                                      for s in ("0", "1")) / 2)
    assert "mean over seeds 0,1" in printed and "of each seed" in printed
