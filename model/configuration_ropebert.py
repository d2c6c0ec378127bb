# Copyright ropebert contributors. Apache-2.0.
"""RopeBertConfig: BERT without an absolute position table, with rotary embeddings (E5-RoPE recipe).

This file is copied verbatim into every exported model directory (see ropebert.model.export), so it may
import only the standard library and transformers.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig


class RopeBertConfig(PretrainedConfig):
    """Configuration of a RoPE BERT encoder.

    Args:
        vocab_size: Size of the WordPiece vocabulary.
        hidden_size: Model width C.
        num_hidden_layers: Number of post-LN transformer blocks.
        num_attention_heads: Heads H; head_dim = hidden_size // H must be even (rotary pairs).
        intermediate_size: FFN inner width.
        hidden_act: FFN activation; "gelu" is the exact-erf GELU of BERT / E5-RoPE.
        hidden_dropout_prob: Dropout on embeddings and on every residual branch.
        attention_probs_dropout_prob: Dropout on attention probabilities (0 lets fused varlen kernels run
            during training).
        max_position_embeddings: The training context length (512 for E5-RoPE). The model itself accepts
            any length; this is the default truncation length of `encode` and the "original length" that
            long-context methods extend from.
        type_vocab_size: Number of token-type (segment) embeddings; kept as in BERT.
        initializer_range: Std of the normal init of linear and embedding weights.
        layer_norm_eps: LayerNorm epsilon.
        pad_token_id: Padding token id.
        rope_theta: Rotary base theta; inv_freq = 1 / theta^(arange(0, d, 2) / d). Must be > 0.
        attn_backend: Attention backend name from the registry in modeling_ropebert ("auto", "eager",
            "sdpa", "sdpa_packed", "varlen", plus optional ones registered at import time such as
            "flash_attn" and "xformers"). Checked when the model is built.
        rope_impl: Rotary implementation: "torch", "triton" (registered by ropebert.kernels) or "auto".
    """

    model_type = "ropebert"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        rope_theta: float = 10000.0,
        attn_backend: str = "auto",
        rope_impl: str = "auto",
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.attn_backend = attn_backend
        self.rope_impl = rope_impl
        self.validate_ropebert()

    def validate_ropebert(self) -> None:
        """Raise ValueError on settings the model cannot honour (called at construction and load time)."""
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise ValueError(f"RopeBertConfig.rope_theta must be a finite number > 0, got {theta!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"RopeBertConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"RopeBertConfig: head_dim={self.hidden_size // self.num_attention_heads} must be even for rotary "
                "embeddings (rotate-half pairs dim i with i + head_dim/2)"
            )
        if not isinstance(self.attn_backend, str) or not self.attn_backend:
            raise ValueError(f"RopeBertConfig.attn_backend must be a backend name, got {self.attn_backend!r}")
        if self.rope_impl not in ("auto", "torch", "triton"):
            raise ValueError(f"RopeBertConfig.rope_impl must be 'auto', 'torch' or 'triton', got {self.rope_impl!r}")
        if self.max_position_embeddings is None or int(self.max_position_embeddings) < 1:
            raise ValueError(
                f"RopeBertConfig.max_position_embeddings must be >= 1, got {self.max_position_embeddings!r}"
            )
