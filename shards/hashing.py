# Copyright ropebert contributors. Apache-2.0.
"""64-bit hashes of normalised texts: how the loss recognises a duplicate in the batch (a false negative).

Normalisation (`normalize_text`), in this order:

1. Unicode NFKC (compatibility forms folded: full-width letters, ligatures, non-breaking spaces);
2. case folding (`str.casefold`, a stronger lower-casing);
3. every run of whitespace collapsed to one space, leading and trailing whitespace removed.

Punctuation, accents and the query / passage prefixes are NOT touched (the prefix is not part of the hashed
text): "What is RoPE?" and "what  is rope?" hash alike, "what is rope" does not. The hash is the first 8 bytes of
BLAKE2b over the UTF-8 of the normalised text, read as a signed little-endian int64 (a torch.long), so it is
the same on every platform, process and Python version (no PYTHONHASHSEED).
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Iterable

import torch

__all__ = ["normalize_text", "text_hash", "text_hashes"]


def normalize_text(text: str) -> str:
    """NFKC, casefold, whitespace runs -> one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_hash(text: str) -> int:
    """Signed 64-bit hash of normalize_text(text)."""
    digest = hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_hashes(texts: Iterable[str]) -> torch.Tensor:
    """int64 tensor (N,) of text_hash over texts."""
    return torch.tensor([text_hash(t) for t in texts], dtype=torch.int64)
