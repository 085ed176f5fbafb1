"""The user-facing errors, and how every command reports them.

A :class:`UserError` names what is wrong (the dotted config key, the ``file:row``, the path);
every command (``python -m medix_fast.train``, ``python -m medix_fast.eval``, the demo
builders) parses its line with :class:`ArgumentParser` and runs through :func:`run_command`, so
that a user error, a command-line mistake included, is one ``error: ...`` line on stderr and
exit status 2, while anything else is a bug and keeps its traceback. ``--debug`` (every
command has it) shows the traceback of a user error too. :func:`did_you_mean` and
:func:`yaml_error` word two common messages alike everywhere (a misspelt name; a YAML file's
syntax error, by file:line:column).
"""
from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in what the user gave (config, data, paths, checkpoints), not a bug."""


class ConfigError(UserError):
    """A bad configuration key or value; the message names the full dotted key."""


class DataError(UserError):
    """Malformed data: the message lists each bad row as ``file:row: reason``."""


class UsageError(UserError):
    """A bad command line (unknown flag, missing or malformed value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a ``--debug`` flag whose mistakes raise :class:`UsageError` (one ``error:``
    line, exit 2, via :func:`run_command`) instead of printing the usage block and exiting.
    ``parse_args`` accepts flags anywhere on the line, before, between or after positionals."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of a user error")

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            flags = [w.split("=")[0] for w in message.split(": ", 1)[1].split() if w.startswith("--")]
            message += "".join(did_you_mean(f, self._option_string_actions) for f in flags)
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def run_command(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit status; a :class:`UserError` is printed as one ``error:`` line and
    gives 2 (re-raised with ``--debug`` on the line, for its traceback)."""
    try:
        return main(argv)
    except UserError as err:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """``" (did you mean 'x'?)"`` with the closest of ``choices`` to a misspelt ``word`` (shown
    after ``prefix``, e.g. a config section's ``"train."``), else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def yaml_error(kind: str, path, err) -> str:
    """One line for a YAML syntax error in file ``path`` (``kind``: "config file", "tasks file"),
    where it is as ``path:line:column`` (PyYAML's own message names ``<unicode string>``)."""
    mark, context = getattr(err, "problem_mark", None), getattr(err, "context", None)
    if mark is None:  # a reader error (a character YAML does not accept): first line of its message
        return f"{kind} {path} is not valid YAML: {str(err).splitlines()[0]}"
    start = getattr(err, "context_mark", None)
    since = f" ({context} at line {start.line + 1}, column {start.column + 1})" if context and start else ""
    return f"{kind} {path}:{mark.line + 1}:{mark.column + 1} is not valid YAML: {err.problem}{since}"
