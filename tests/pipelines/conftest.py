"""Fixtures for the training tests: a tiny random APE BERT with the MiniLM tokenizer, small shard sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_pair_shards


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer, 32-wide random BERT (absolute positions) saved as an HF directory with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    BertModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def pair_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    make_pair_shards(out, [37, 50, 23, 41])  # uneven shards, 151 pairs
    return out


@pytest.fixture(scope="session")
def hn_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hn")
    make_pair_shards(out, [30, 26], kind="hard_negatives", num_negatives=7)
    return out
