# Copyright ropebert contributors. Apache-2.0.
"""What every input reader yields: a `Record` (a valid sample, its key and where it came from) or a `Bad` (what is
wrong and where: "file:line"), plus the JSONL line scanner and field checks they share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Optional, Union


@dataclass
class Record:
    key: str
    sample: dict
    where: str  # "file:line" (or "package/module.py:line" for docstrings)
    raw_key: Optional[str] = None  # the id the key was derived from (to tell a real duplicate from a collision)


@dataclass
class Bad:
    where: str
    reason: str  # short category, e.g. "malformed JSON"
    detail: str = ""

    def message(self) -> str:
        return f"{self.where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


Item = Union[Record, Bad]


class BadField(Exception):
    """Raised by field checks; the reader turns it into a Bad at the record's location."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def text_field(obj: dict, name: str) -> str:
    """obj[name] as a non-empty string, else BadField."""
    if name not in obj:
        raise BadField("missing field", repr(name))
    v = obj[name]
    if not isinstance(v, str):
        raise BadField("field is not a string", f"{name!r} is {type(v).__name__}")
    if not v.strip():
        raise BadField("empty or whitespace-only text", repr(name))
    return v


def scan_jsonl(path) -> Iterator[Union[tuple[int, str, object], Bad]]:
    """(line number, "file:line", parsed value) per non-blank line of a JSONL file, or a Bad naming file:line
    (non-UTF-8 bytes, malformed JSON). Blank lines are not records."""
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Bad(where, "non-UTF-8 bytes", f"byte {e.start}")
                continue
            try:
                yield ln, where, json.loads(line)
            except json.JSONDecodeError as e:
                yield Bad(where, "malformed JSON", e.msg + f" at column {e.colno}")
