"""The `ropebert` console command: one entry point, subcommands implemented in the sub-packages.

Commands (and the sub-commands of `ropebert eval` / `ropebert shards`) are tables of name -> ("module:function",
help), dispatched by `dispatch`: the module is imported only when its command runs, so `--help` stays fast;
the function takes the remaining argv and returns an exit status. A `UserError` (bad input, arguments, files)
or an OSError (a missing file, a full or read-only disk) escaping a command is printed as one line and exits
1; anything else is a bug and keeps its traceback. ROPEBERT_DEBUG=1 shows tracebacks for user errors too.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
from typing import Optional

from . import __version__
from .errors import InputError, UserError
from .io import no_space_message

Table = dict[str, tuple[str, str]]

# in pipeline order: data -> stage 1/2 training -> mining -> export -> evaluation; then the conveniences
COMMANDS: Table = {
    "shards": ("ropebert.shards.build:main", "build / inspect / verify webdataset shards (+ manifest.json)"),
    "fit": ("ropebert.pipelines.train.fit:main", "train (LightningCLI): stage 1 / stage 2 contrastive, multi-node, exact resume"),
    "mine": ("ropebert.pipelines.mine.negatives:main", "mine hard negatives with a model and write stage-2 shards"),
    "score": ("ropebert.pipelines.mine.score:main", "re-score stage-2 shards with a teacher (re-ranker logits or cosine)"),
    "upcycle": ("ropebert.model.upcycle:main", "make a sparse mixture-of-experts model from a dense one (experts = FFN copies)"),
    "export": ("ropebert.model.export:main", "export a model dir / checkpoint to a Hugging Face directory (--verify)"),
    "eval": ("ropebert.pipelines.eval.cli:main", "evaluate: retrieval (BEIR), passkey, needle (LongEmbed-style)"),
    "similarity": ("ropebert.pipelines.eval.similarity:main", "embed texts with a model and print a cosine-similarity table"),
    "demo": ("ropebert.pipelines.demo.run:main", "run the whole pipeline on a small CPU budget (resumable)"),
}


def usage(prog: str, table: Table, what: str = "command") -> str:
    width = max(len(c) for c in table)
    lines = [f"usage: {prog} <{what}> [args...]", "", f"{what}s:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in table.items()]
    lines += ["", f"`{prog} <{what}> --help` describes a {what}."]
    return "\n".join(lines)


class UsageError(InputError):
    """An unknown command or sub-command: the `ropebert` command prints the usage and exits 2."""

    def __init__(self, message: str, usage_text: str):
        super().__init__(message)
        self.usage = usage_text


def dispatch(prog: str, table: Table, argv: list[str], what: str = "command") -> int:
    """Run `table[argv[0]]` with argv[1:]. No argument: the usage, exit 2; -h/--help: the usage, exit 0; an
    unknown name: UsageError."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, table, what))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        label = f"{prog.removeprefix('ropebert').strip()} {what}".strip()
        raise UsageError(f"unknown {label} {name!r}; choose from {', '.join(table)}", usage(prog, table, what))
    module_name, func_name = table[name][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"ropebert {__version__}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return dispatch("ropebert", COMMANDS, argv)
    except UsageError as e:
        print(f"ropebert: {e}\n\n{e.usage}", file=sys.stderr)
        return 2
    except (UserError, OSError) as e:
        if os.environ.get("ROPEBERT_DEBUG"):
            raise
        cmd = argv[0] if argv else ""
        if isinstance(e, OSError) and not isinstance(e, UserError) and e.errno == errno.ENOSPC:
            e = UserError(no_space_message(e, e.filename or "the output"))
        msg = str(e) if not isinstance(e, OSError) or isinstance(e, UserError) or not e.strerror else (
            f"{e.strerror}: {e.filename}" if e.filename else str(e))
        print(f"ropebert {cmd}: error: {msg}", file=sys.stderr)
        return 1
