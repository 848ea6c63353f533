"""One module per ``openclip-align`` sub-command, each with ``register(subparsers)`` (see :mod:`openclip_align.cli`)."""
from __future__ import annotations

from pathlib import Path

# where `make data` builds the embedded default corpus: what benchmark and study train on unless told otherwise
DEFAULT_CORPUS = Path("data/default")


def add_training_command(subparsers, name: str, module_doc: str, help: str, data_help: str):
    """The parser of a sub-command that trains on a corpus (benchmark, study): its description is the second
    paragraph of its module's docstring (the first names the command for readers of the code), and ``--data``
    defaults to the embedded default corpus, the same folder for every such command."""
    parser = subparsers.add_parser(name, help=help, description=module_doc.split("\n\n")[1])
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS, help=f"{data_help} (default: %(default)s)")
    return parser
