"""`openclip-align ... --help` reads as plain text: no reST markup, no empty defaults, every command described."""
from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from openclip_align import cli


def _help_text(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(argv + ["--help"])
    return out.getvalue()


def _commands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_plain_text_drops_rest_markup():
    assert cli.plain_text("``openclip-align gap``: see :mod:`openclip_align.x` and :func:`~a.b`") == (
        "`openclip-align gap`: see openclip_align.x and a.b")


@pytest.mark.parametrize("argv", [[]] + [[name] for name in cli.COMMANDS])
def test_help_has_no_markup_and_no_empty_default(argv):
    text = _help_text(argv)
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    assert "(default: )" not in text


def test_every_command_has_a_description_and_every_option_a_help():
    for name, parser in _commands().items():
        assert parser.description, f"{name} has no description"
        if name in ("study", "benchmark"):
            for action in parser._actions:
                if action.option_strings and action.dest in ("out", "data"):
                    assert action.help, f"{name} {action.option_strings[0]} has no help"


def test_every_listed_command_is_in_the_parser():
    assert list(_commands()) == list(cli.COMMANDS)


def test_a_missing_command_module_raises(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("renamed_away",))
    with pytest.raises(ModuleNotFoundError, match="openclip_align.commands.renamed_away"):
        cli.build_parser()
