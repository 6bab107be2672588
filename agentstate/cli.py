"""The ``agentstate`` command; each verb lives in ``agentstate.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agentstate.commands import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``agentstate`` command."""
    parser = argparse.ArgumentParser(
        prog="agentstate", description="Online agent-state learning with scalable RTRL."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentstate`` console script.

    User errors (unknown names, bad values) exit with status 2 and one line on stderr.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"agentstate {args.verb}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
