"""The MTEB encoder wrapper against the installed mteb's protocol, offline (mteb's own mock task)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ropebert.pipelines.eval.mteb import RopeBertMTEBEncoder, resolve_prompt
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def wrapped(minilm_dir):
    from transformers import AutoTokenizer

    from ropebert.model import RopeBertModel

    torch.manual_seed(0)
    model = RopeBertModel(tiny_config(vocab_size=30522, max_position_embeddings=128)).eval()
    model.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    return RopeBertMTEBEncoder(model=model)


def test_prompt_priority():
    prompts = {"query": "q: ", "document": "d: ", "Retrieval-query": "rq: ", "MyTask": "t: "}
    assert resolve_prompt(prompts, "Other", "Retrieval", "query") == "rq: "
    assert resolve_prompt(prompts, "Other", "Retrieval", "document") == "d: "
    assert resolve_prompt(prompts, "MyTask", "Retrieval", "query") == "t: "
    assert resolve_prompt(prompts, None, None, None) == ""
    assert resolve_prompt({"passage": "p: "}, None, None, "document") == "p: "


def test_protocol_and_mock_retrieval_task(wrapped, monkeypatch):
    mteb = pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.models.models_protocols import EncoderProtocol

    assert isinstance(wrapped, EncoderProtocol)
    assert wrapped.mteb_model_meta.embed_dim == 32
    seen = []  # (prefix, texts) of every encode call the wrapper makes
    orig = wrapped.model.encode

    def spy(texts, *a, **kw):
        seen.append((kw.get("prefix"), list(texts)))
        return orig(texts, *a, **kw)

    monkeypatch.setattr(wrapped.model, "encode", spy)
    res = mteb.evaluate(wrapped, MockRetrievalTask(), cache=None, show_progress_bar=False)
    scores = res.task_results[0].scores
    assert set(scores) >= {"test"} and 0.0 <= scores["test"][0]["ndcg_at_10"] <= 1.0
    prefixes = {p for p, _ in seen}
    assert prefixes == {"query: ", "passage: "}  # prompts reach the model per prompt_type
    queries = [t for p, ts in seen if p == "query: " for t in ts]
    assert "This is a test sentence" in queries


def test_dataloader_and_legacy_list_inputs_agree(wrapped):
    from torch.utils.data import DataLoader

    pytest.importorskip("mteb")
    from mteb.types import PromptType

    texts = ["rotary position embeddings", "the capital of France", "bread"]
    loader = DataLoader([{"text": t} for t in texts], batch_size=2,
                        collate_fn=lambda rows: {"text": [r["text"] for r in rows]})
    a = wrapped.encode(loader, task_metadata=None, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    b = wrapped.encode(texts, task_name="AnyTask", prompt_type="query")
    direct = wrapped.model.encode(texts, prefix="query: ").numpy()
    assert a.shape == (3, 32) and np.allclose(a, b) and np.allclose(a, direct, atol=1e-6)
    sim = wrapped.similarity(a, a)
    assert sim.shape == (3, 3) and torch.allclose(torch.diagonal(sim), torch.ones(3), atol=1e-5)
    assert torch.allclose(wrapped.similarity_pairwise(a, a), torch.ones(3), atol=1e-5)
    with pytest.raises(TypeError, match="'text' column"):
        wrapped.encode([{"image": 1}], task_metadata=None, hf_split="", hf_subset="")
