"""The `ropebert` console command: one entry point, subcommands implemented in the sub-packages.

Each entry maps a subcommand to "module:function"; the function takes the remaining argv and returns an
exit status. Modules are imported only when their subcommand runs, so `ropebert --help` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Optional

COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("ropebert.pipelines.eval_cli:main", "evaluate: retrieval (BEIR), passkey, needle (LongEmbed-style)"),
    "fit": ("ropebert.pipelines.fit:main", "train (LightningCLI): stage 1 / stage 2 contrastive, multi-node, exact resume"),
    "demo": ("ropebert.pipelines.demo:main", "run the whole pipeline on a small CPU budget (resumable)"),
    "export": ("ropebert.model.export:main", "export a model dir / checkpoint to a Hugging Face directory"),
    "similarity": ("ropebert.similarity:main", "embed texts with a model and print a cosine-similarity table"),
    "shards": ("ropebert.shards.build:main", "build / inspect / verify webdataset shards (+ manifest.json)"),
    "mine": ("ropebert.shards.mine:main", "mine hard negatives with a model and write stage-2 shards"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: ropebert <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`ropebert <command> --help` describes a command."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"ropebert {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"ropebert: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    target, _ = COMMANDS[cmd]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as e:
        # user-facing errors: one clear line, non-zero exit (tracebacks with ROPEBERT_DEBUG=1)
        if __import__("os").environ.get("ROPEBERT_DEBUG"):
            raise
        print(f"ropebert {cmd}: error: {e}", file=sys.stderr)
        return 1
