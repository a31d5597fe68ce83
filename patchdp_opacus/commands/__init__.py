"""Command groups of the ``patchdp`` console script (see :mod:`patchdp_opacus.cli`).

Shared pieces: :class:`UsageError` (a user error: one line on stderr, exit code 2) and
:class:`HelpFormatter` (shows every non-empty default in ``--help``).
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad command-line input; the message should name the offending flag."""


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to options whose default is neither None nor False."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
        return text


def int_type(minimum: int, unit: str):
    """argparse ``type=`` for an integer ``>= minimum``; messages name the unit."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer ({unit}), got {text!r}") from None
        if value < minimum:
            bound = "positive" if minimum == 1 else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound} ({unit}), got {value}")
        return value
    return parse
