"""`ropebert fit` on a mixture file: per-source logs, an interrupted run resumed from its checkpoint matches the
uninterrupted one bitwise (sources, keys, losses), and a changed mixture is refused on resume."""

from __future__ import annotations

import json

import pytest

from ropebert.pipelines.train.fit import cli_main
from tests.conftest import make_mixture
from tests.pipelines.train.test_train import _base_args, _last_per_step


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    return make_mixture(tmp_path_factory.mktemp("mixture"))


def test_fit_on_a_mixture_logs_sources_and_resumes_exactly(tiny_bert_dir, mixture, tmp_path, monkeypatch):
    from ropebert.pipelines.train.module import RopeBertContrastive

    logged = []
    real = RopeBertContrastive.log_dict
    stop_at = {"step": None}

    def spy(self, metrics, *a, **kw):
        logged.append({k: float(v) for k, v in metrics.items() if k.startswith("train/source")})
        if stop_at["step"] is not None and self.global_step == stop_at["step"]:
            raise RuntimeError("interrupted by the test")
        return real(self, metrics, *a, **kw)

    monkeypatch.setattr(RopeBertContrastive, "log_dict", spy)
    ref, cut = tmp_path / "ref", tmp_path / "cut"

    def args(out, *more):
        return _base_args(tiny_bert_dir, mixture, tiny_bert_dir, out, steps=7, extra=(
            "--data.sample_log", str(out / "samples"), *more))

    cli_main(args(ref))
    steps = [json.loads(x) for x in (ref / "steps" / "step-rank-0.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (ref / "samples" / "rank-0.jsonl").read_text().splitlines()]
    # an epoch = 5 + 3 + 2 = 10 global batches of 8; weights 2:1:1 -> wiki is drawn about twice as often
    assert [s["source"] for s in steps] == [s["source"] for s in samples]
    assert {s["source"] for s in steps} <= {"wiki", "code", "news"} and len(steps) == 7
    for rec in samples:  # the keys of every batch are of its source (make_pair_shards keys: s<shard>_<i>)
        assert rec["source"] != "news" or all(k.startswith("s0_") for k in rec["keys"])
    seen = {}
    for s, m in zip(steps, logged):
        seen[s["source"]] = seen.get(s["source"], 0) + 8
        assert m[f"train/source/{s['source']}/samples_seen"] == seen[s["source"]]
        assert m[f"train/source/{s['source']}/loss"] == pytest.approx(s["loss"])
        assert 0.0 <= m[f"train/source/{s['source']}/accuracy"] <= 1.0

    stop_at["step"] = 4  # the checkpoint of step 3 is on disk; the 5th step raises
    with pytest.raises(RuntimeError, match="interrupted by the test"):
        cli_main(args(cut))
    stop_at["step"] = None
    cli_main(args(cut, "--ckpt_path", "last"))
    a, b = _last_per_step(ref / "steps" / "step-rank-0.jsonl"), _last_per_step(cut / "steps" / "step-rank-0.jsonl")
    assert list(a) == list(b) and [(x["source"], x["loss"]) for x in a.values()] == \
        [(x["source"], x["loss"]) for x in b.values()]
    assert _last_per_step(ref / "samples" / "rank-0.jsonl") == _last_per_step(cut / "samples" / "rank-0.jsonl")

    # a changed mixture is refused on resume, naming the source and key
    changed = mixture.parent / "changed.yaml"
    changed.write_text(mixture.read_text().replace("{path: news, weight: 1}", "{path: news, weight: 3}"))
    with pytest.raises(ValueError, match=r"mixture source 'news' weight: checkpoint 1.0 != now 3.0"):
        cli_main(_base_args(tiny_bert_dir, changed, tiny_bert_dir, cut, steps=9, extra=("--ckpt_path", "last")))
