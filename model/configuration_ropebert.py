# Copyright ropebert contributors. Apache-2.0.
"""RopeBertConfig: BERT without an absolute position table, with rotary embeddings (E5-RoPE recipe).

This file is copied verbatim into every exported model directory (see ropebert.model.export), so it may
import only the standard library and transformers.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Optional

from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# position_scale / rope_scaling.factor value: LongEmbed's per-input factor ceil(n / original length), per sequence
AUTO = "auto"
# the `moe` block's keys and defaults (see RopeBertConfig; Nomic Embed v2's setting)
MOE_DEFAULTS = {"num_experts": 8, "top_k": 2, "every_n_layers": 2, "normalize_weights": False, "aux_loss_coef": 1.0}
# transformers 5's rope_parameters "rope_type" <-> this config's rope_scaling "type" (same formulas)
ROPE_TYPE_TO_SCALING = {"linear": "pi", "dynamic": "dynamic_ntk"}
SCALING_TO_ROPE_TYPE = {v: k for k, v in ROPE_TYPE_TO_SCALING.items()}


def rope_from_parameters(rope_parameters) -> tuple[Optional[float], Optional[dict]]:
    """(rope_theta or None, rope_scaling) of a transformers-5 style `rope_parameters` dict:
    {"rope_type": "default", "rope_theta": t}, {"rope_type": "linear", "factor": s, ...} (position interpolation,
    s may be "auto") or {"rope_type": "dynamic", "factor": f, ...} (dynamic NTK)."""
    rp = rope_parameters
    if not isinstance(rp, dict) or "rope_type" not in rp or set(rp) - {"rope_type", "rope_theta", "factor"}:
        raise ValueError(
            'RopeBertConfig.rope_parameters must be {"rope_type": "default" | "linear" | "dynamic", "rope_theta": t'
            f'[, "factor": f]}}, got {rp!r}'
        )
    t = rp["rope_type"]
    if t == "default":
        if "factor" in rp:
            raise ValueError(f'RopeBertConfig.rope_parameters: rope_type "default" takes no factor, got {rp!r}')
        return rp.get("rope_theta"), None
    if t not in ROPE_TYPE_TO_SCALING:
        raise ValueError(f"RopeBertConfig.rope_parameters: unknown type {t!r}; supported: 'default', 'linear' "
                         "(position interpolation), 'dynamic' (dynamic NTK)")
    if "factor" not in rp:
        raise ValueError(f"RopeBertConfig.rope_parameters: rope_type {t!r} needs a factor, got {rp!r}")
    return rp.get("rope_theta"), {"type": ROPE_TYPE_TO_SCALING[t], "factor": rp["factor"]}


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
        rope_theta: Rotary base theta (default 10000); inv_freq = 1 / theta^(arange(0, d, 2) / d). Must be > 0.
            config.json stores it, with rope_scaling, in transformers 5's `rope_parameters`: {"rope_type":
            "default" | "linear" (= PI) | "dynamic" (= dynamic NTK), "rope_theta": t[, "factor": f]}; the old
            top-level keys rope_theta / rope_scaling are still read (and win over rope_parameters when both are
            given). The attributes config.rope_theta / config.rope_scaling are what the model reads.
        attn_backend: Attention backend name from the registry in modeling_ropebert ("auto", "eager",
            "sdpa", "sdpa_packed", "varlen", plus optional ones registered at import time such as
            "flash_attn" and "xformers"). Checked when the model is built.
        rope_impl: Rotary implementation: "torch", "triton" (registered by ropebert.kernels) or "auto".
        leading_positions: K >= 0. 0 (default): no absolute position information at all, the E5-RoPE layout.
            K > 0: the tokens at the first K positions of each sequence (0..K-1 over its real tokens) also get an
            absolute vector, `embeddings.leading_position_embeddings` (K, C), added to their word + token-type
            embedding before the embedding LayerNorm; tokens at K and beyond get none, so any length still works
            and the long-context methods (which remap rotary positions only) are unaffected. `ropebert export
            --keep-positions K` fills it from an APE parent's first K position vectors: an APE BERT's use of
            absolute positions sits in its first tokens (all-MiniLM-L6-v2: positions 0..15 carry all of it).

    Long-context inference (all read at forward time, so editing `model.config.<key>` or config.json applies
    them without retraining; presets for a 512-token model: NTK rope_theta 30000 / 50000 / 100000 for 1k / 2k /
    4k tokens, SelfExtend (group_size, window) (3, 256) / (5, 128) / (9, 64)):
        rope_scaling: None, {"type": "dynamic_ntk", "factor": f} (theta recomputed per sequence from its length
            n when n > original length: theta * (f * n / orig - (f - 1)) ** (D / (D - 2))) or
            {"type": "pi", "factor": s} (position interpolation: positions divided by s). f, s > 0; s may be
            "auto": s = ceil(n / original length) for each sequence of n non-padding tokens, so sequences within
            the original length keep their positions (LongEmbed's rule).
        position_mode: "default" (positions as given), "gp" (grouped: p // position_scale) or "rp" (recurrent:
            p mod original_max_position_embeddings).
        position_scale: The group size s of position_mode="gp" (> 0), or "auto" (per sequence, as for PI).
        original_max_position_embeddings: The length the model was trained at (None: max_position_embeddings).
            Used by rp, dynamic NTK, SelfExtend (sequences not longer than it use plain attention) and PCW.
        self_extend: None or {"group_size": g, "window": w} with g >= 1 and 1 <= w < original length:
            LongEmbed's bidirectional SelfExtend (exact rotary positions for |i - j| < w, grouped positions
            p // g, shifted by w - w // g on the query (i > j) or key (i < j) side, beyond).
        attn_scale_base: q is scaled by max(1, ln n / ln attn_scale_base), n the sequence's non-padding length
            (no effect at or below the base); None disables. Must be > 1.

    Matryoshka embeddings:
        embedding_dim: the size of the pooled embedding (`embed` / `encode`): its first embedding_dim channels,
            L2-renormalised. None: hidden_size.
        matryoshka_dims: the prefix sizes the model was trained for (a record; None: not Matryoshka-trained).
        matryoshka_layers: the layers (1-based) whose pooled outputs were trained as embeddings (a record).

    Sparse mixture of experts (Nomic Embed v2's layout):
        moe: None (dense: every layer has the BERT FFN) or {"num_experts": E >= 1, "top_k": k in 1..E,
            "every_n_layers": n >= 1, "normalize_weights": bool, "aux_loss_coef": float >= 0}; missing keys take
            MOE_DEFAULTS (8, 2, 2, false, 1.0). 0-based layer i is an MoE layer when i % n == 1 (with n == 1:
            every layer). Each expert is a BERT FFN; a bias-free router, softmax over the E experts, top-k per
            token; the k weights are renormalised to sum to 1 only when normalize_weights. The load-balancing
            loss (Switch: E * sum_e f_e * P_e per MoE layer, averaged over MoE layers) times aux_loss_coef is
            the model output's `aux_loss`.
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
        rope_theta: Optional[float] = None,
        attn_backend: str = "auto",
        rope_impl: str = "auto",
        rope_scaling: Optional[dict] = None,
        rope_parameters: Optional[dict] = None,
        position_mode: str = "default",
        position_scale: float = 1.0,
        original_max_position_embeddings: Optional[int] = None,
        self_extend: Optional[dict] = None,
        attn_scale_base: Optional[int] = 512,
        embedding_dim: Optional[int] = None,
        matryoshka_dims: Optional[list] = None,
        matryoshka_layers: Optional[list] = None,
        moe: Optional[dict] = None,
        leading_positions: int = 0,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if rope_parameters is not None:  # transformers-5 convention (what to_dict writes); old keys still read
            theta_p, scaling_p = rope_from_parameters(rope_parameters)
            if (rope_theta is not None and theta_p is not None and float(rope_theta) != float(theta_p)) or (
                rope_scaling is not None and rope_scaling != scaling_p
            ):
                logger.warning("RopeBertConfig: rope_theta=%r / rope_scaling=%r given beside rope_parameters=%r; the "
                               "explicit rope_theta / rope_scaling win", rope_theta, rope_scaling, rope_parameters)
            rope_theta = theta_p if rope_theta is None else rope_theta
            rope_scaling = scaling_p if rope_scaling is None else rope_scaling
        if rope_theta is None:
            rope_theta = 10000.0
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
        self.rope_scaling = dict(rope_scaling) if isinstance(rope_scaling, dict) else rope_scaling
        self.position_mode = position_mode
        self.position_scale = position_scale
        self.original_max_position_embeddings = original_max_position_embeddings
        self.self_extend = dict(self_extend) if isinstance(self_extend, dict) else self_extend
        self.attn_scale_base = attn_scale_base
        self.embedding_dim = embedding_dim
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims is not None else None
        self.matryoshka_layers = list(matryoshka_layers) if matryoshka_layers is not None else None
        self.moe = {**MOE_DEFAULTS, **moe} if isinstance(moe, dict) else moe
        self.leading_positions = leading_positions
        self.validate_ropebert()

    # transformers >= 5 turns `rope_scaling` into a deprecated alias of its own `rope_parameters` format. At run time
    # this model keeps the plain LongEmbed-style attributes rope_theta / rope_scaling (rope_scaling stored under a
    # private name, so transformers' alias never sees it); config.json gets transformers 5's `rope_parameters`
    # (to_dict), and the old keys are still read (__init__).
    @property
    def rope_scaling(self):
        return self.__dict__.get("_ropebert_rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value):
        self.__dict__["_ropebert_rope_scaling"] = value

    def rope_parameters_dict(self) -> dict:
        """rope_theta / rope_scaling in transformers 5's convention: {"rope_type", "rope_theta"[, "factor"]}."""
        rs = self.rope_scaling
        out = {"rope_type": "default", "rope_theta": self.rope_theta}
        if isinstance(rs, dict) and rs.get("type") in SCALING_TO_ROPE_TYPE:
            out = {"rope_type": SCALING_TO_ROPE_TYPE[rs["type"]], "rope_theta": self.rope_theta,
                   "factor": copy.deepcopy(rs.get("factor"))}
        return out

    def to_dict(self):
        out = super().to_dict()
        out.pop("_ropebert_rope_scaling", None)
        out.pop("_ropebert_autoset_attn", None)  # runtime bookkeeping of RopeBertModel.__init__, never saved
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        out["rope_parameters"] = self.rope_parameters_dict()
        return out

    @property
    def original_length(self) -> int:
        """The trained context length long-context methods extend from (original_max_position_embeddings)."""
        orig = self.original_max_position_embeddings
        return int(self.max_position_embeddings if orig is None else orig)

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
        self._validate_long_context()
        lp = getattr(self, "leading_positions", 0)
        if isinstance(lp, bool) or not isinstance(lp, int) or lp < 0:
            raise ValueError(f"RopeBertConfig.leading_positions must be an int >= 0, got {lp!r}")
        ed = self.embedding_dim
        if ed is not None and (not isinstance(ed, int) or isinstance(ed, bool) or not 1 <= ed <= self.hidden_size):
            raise ValueError(f"RopeBertConfig.embedding_dim must be null or an int in 1..hidden_size={self.hidden_size}, "
                             f"got {ed!r}")

        self._validate_moe()

    def _validate_moe(self) -> None:
        m = self.moe
        if m is None:
            return
        if not isinstance(m, dict) or set(m) - set(MOE_DEFAULTS):
            raise ValueError(f"RopeBertConfig.moe must be null or a dict with keys {sorted(MOE_DEFAULTS)}, got {m!r}")

        def is_int(x):
            return not isinstance(x, bool) and isinstance(x, int)

        e, k, n = m["num_experts"], m["top_k"], m["every_n_layers"]
        if not is_int(e) or e < 1:
            raise ValueError(f"RopeBertConfig.moe.num_experts must be an int >= 1, got {e!r}")
        if not is_int(k) or k < 1:
            raise ValueError(f"RopeBertConfig.moe.top_k must be an int >= 1, got {k!r}")
        if k > e:
            raise ValueError(f"RopeBertConfig.moe.top_k={k} exceeds num_experts={e}: a token cannot pick more "
                             "experts than there are")
        if not is_int(n) or n < 1:
            raise ValueError(f"RopeBertConfig.moe.every_n_layers must be an int >= 1, got {n!r}")
        if not isinstance(m["normalize_weights"], bool):
            raise ValueError(f"RopeBertConfig.moe.normalize_weights must be true or false, got {m['normalize_weights']!r}")
        c = m["aux_loss_coef"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"RopeBertConfig.moe.aux_loss_coef must be a finite number >= 0, got {c!r}")
        if not self.moe_layers:
            raise ValueError(f"RopeBertConfig.moe: every_n_layers={n} puts no MoE layer in {self.num_hidden_layers} "
                             "layers (layer i is MoE when i % every_n_layers == 1, 0-based)")

    def is_moe_layer(self, i: int) -> bool:
        """Whether 0-based layer i is a mixture-of-experts layer (Nomic's layout: i % every_n_layers == 1)."""
        m = getattr(self, "moe", None)
        if m is None:
            return False
        n = int(m["every_n_layers"])
        return n == 1 or i % n == 1

    @property
    def moe_layers(self) -> list[int]:
        """The 0-based indices of the MoE layers ([] for a dense model)."""
        return [i for i in range(int(self.num_hidden_layers)) if self.is_moe_layer(i)]

    @property
    def output_dim(self) -> int:
        """The size of the pooled embedding: embedding_dim, or hidden_size when it is not set."""
        return int(self.hidden_size if getattr(self, "embedding_dim", None) is None else self.embedding_dim)

    def _validate_long_context(self) -> None:
        def is_num(x):
            return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)

        def is_int(x):
            return not isinstance(x, bool) and isinstance(x, int)

        orig = self.original_max_position_embeddings
        if orig is not None and (not is_int(orig) or orig < 1):
            raise ValueError(f"RopeBertConfig.original_max_position_embeddings must be null or an int >= 1, got {orig!r}")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict) or set(rs) - {"type", "factor"} or "type" not in rs or "factor" not in rs:
                raise ValueError(
                    'RopeBertConfig.rope_scaling must be null, {"type": "dynamic_ntk", "factor": f} or '
                    f'{{"type": "pi", "factor": s}} (s a number or "auto"), got {rs!r}'
                )
            if rs["type"] not in ("dynamic_ntk", "pi"):
                raise ValueError(
                    f"RopeBertConfig.rope_scaling: unknown type {rs['type']!r}; supported: 'dynamic_ntk', 'pi'"
                )
            auto_ok = rs["type"] == "pi" and rs["factor"] == AUTO
            if not auto_ok and (not is_num(rs["factor"]) or rs["factor"] <= 0):
                allowed = ' or "auto"' if rs["type"] == "pi" else ""
                raise ValueError(
                    f"RopeBertConfig.rope_scaling.factor must be a finite number > 0{allowed}, got {rs['factor']!r}"
                )
        if self.position_mode not in ("default", "gp", "rp"):
            raise ValueError(f"RopeBertConfig.position_mode must be 'default', 'gp' or 'rp', got {self.position_mode!r}")
        ps = self.position_scale
        if ps != AUTO and (not is_num(ps) or ps <= 0):
            raise ValueError(f'RopeBertConfig.position_scale must be a finite number > 0 or "auto", got {ps!r}')
        se = self.self_extend
        if se is not None:
            if not isinstance(se, dict) or set(se) != {"group_size", "window"}:
                raise ValueError(
                    f'RopeBertConfig.self_extend must be null or {{"group_size": g, "window": w}}, got {se!r}'
                )
            g, w = se["group_size"], se["window"]
            if not is_int(g) or g < 1:
                raise ValueError(f"RopeBertConfig.self_extend.group_size must be an int >= 1, got {g!r}")
            if not is_int(w) or w < 1 or w >= self.original_length:
                raise ValueError(
                    f"RopeBertConfig.self_extend.window must be an int with 1 <= window < the original length "
                    f"{self.original_length} (original_max_position_embeddings), got {w!r}"
                )
        b = self.attn_scale_base
        if b is not None and (not is_num(b) or b <= 1):
            raise ValueError(f"RopeBertConfig.attn_scale_base must be null or a number > 1, got {b!r}")
