"""The ``patchdp`` console script: a small dispatcher over command modules.

Every module named in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its
subcommands with ``parser.set_defaults(handler=fn)``; ``fn(args) -> int`` returns the exit code.
Adding a command group (``train``, ``evaluate``, ``plot``) means writing such a module and adding
its name here.  Command modules are imported for every invocation, so they must be cheap to
import: anything heavy (torch, opacus, matplotlib) is imported inside the handler that needs it.

User errors raise :class:`~patchdp_opacus.commands.UsageError`; :func:`main` prints them as one
line (``patchdp: error: ...``) on stderr and returns 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from patchdp_opacus.commands import HelpFormatter, UsageError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

#: Modules providing ``register(subparsers)``, in the order their commands appear in ``--help``.
COMMAND_MODULES = (
    "patchdp_opacus.commands.privacy",
    "patchdp_opacus.commands.training",
    "patchdp_opacus.commands.audit",
    "patchdp_opacus.reproduce.cli",
)

PROG = "patchdp"


class ArgumentParser(argparse.ArgumentParser):
    """argparse parser whose errors raise :class:`UsageError` (one line, exit code 2) instead of
    printing the usage block and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Patch-level differential privacy for segmentation: privacy accounting of "
                    "DP-SGD whose random crops may leave the private patch out.")
    from patchdp_opacus import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _unknown_message(args, unknown: list[str]) -> str:
    """Unrecognised arguments, pointing to the help of the subcommand they were given to (and
    to a subcommand's own hint, e.g. ``--set`` for config keys, when it has one)."""
    command = f"{PROG} {args.command}" if getattr(args, "command", None) else PROG
    hint = getattr(args, "unknown_hint", None)
    extra = hint(unknown) if hint else None
    return (f"unrecognized arguments: {' '.join(unknown)}"
            + (f"; {extra}" if extra else "") + f" (see '{command} --help')")


def main(argv=None) -> int:
    """Run ``patchdp`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise UsageError(_unknown_message(args, unknown))
        if getattr(args, "handler", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.handler(args) or 0)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `patchdp ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
