"""``openclip-align`` command line: one sub-command per module in :mod:`openclip_align.commands`.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (called
with the parsed args, returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

COMMANDS = ("data", "embed", "gap", "convert", "study", "benchmark")


DESCRIPTION = ("openclip-align: models, losses and modality-gap metrics for OpenCLIP. "
               "Run 'openclip-align COMMAND --help' for one command's options.")


def plain_text(text):
    """Docstring reST (``code``, :mod:`name`) as a terminal shows it: `code`, name."""
    if text is None:
        return None
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openclip-align", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:       # a listed command whose module is missing is an error, never skipped
        importlib.import_module(f"openclip_align.commands.{name}").register(sub)
    _plain_descriptions(parser)
    return parser


def _plain_descriptions(parser: argparse.ArgumentParser) -> None:
    """Commands take their descriptions from module docstrings; --help shows them without reST markup."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.description = plain_text(sub.description)
                _plain_descriptions(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
