"""What every `qtransformers` command shares: the user-error type, absl flag parsing with
--help, and the one-line error report.

A command raises `UserError` (anywhere below it) for a mistake the user can fix: a bad flag,
config value, data path, workdir or checkpoint. `run_command` turns it into one line on stderr,
`<program>: error: <message>`, and exit status 2. `--debug` on the command line (or QT_DEBUG=1 in
the environment) re-raises instead, so the traceback shows.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import flags

DEBUG_ENV = "QT_DEBUG"
DEBUG_FLAG = "--debug"
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")

# Exit statuses of every command (README: "Exit codes").
EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR = 0, 1, 2


class UserError(ValueError):
    """A mistake the user can fix; its message says what was wrong and how to fix it.

    A ValueError, so library callers that catch ValueError (bad configs) keep working.
    """


class HelpRequested(Exception):
    """--help on a command line; carries the text to print (stdout, exit status 0)."""


def one_line(message: object) -> str:
    """The message with every run of whitespace (newlines included) as one space."""
    return " ".join(str(message).split())


def error_summary(err: BaseException) -> str:
    """One line for an exception; a message that embeds a traceback (config_flags wraps the
    config file's error that way) is cut to its first line plus the traceback's last line."""
    text = str(err)
    marker = "Traceback (most recent call last)"
    if marker in text:
        head = text.split(marker, 1)[0]
        tail = [line for line in text.splitlines() if line.strip()][-1]
        text = f"{head.strip()} {tail.strip()}"
    return one_line(text)


def debug_requested(argv: Sequence[str]) -> bool:
    """True when argv holds --debug or the environment sets QT_DEBUG to a non-empty, non-0."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def flags_help(flag_values: flags.FlagValues, usage: str) -> str:
    """`usage` followed by every flag of `flag_values` with its help and default."""
    lines = [usage.rstrip(), "", "flags:"]
    for name in sorted(flag_values):
        flag = flag_values[name]
        if name != flag.name:  # short names are listed with their flag
            continue
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  --{name}: {one_line(flag.help)}{default}")
    lines += ["  --debug: show the traceback of an error instead of one line (or set QT_DEBUG=1)",
              "  --help, --helpfull: print this text"]
    return "\n".join(lines)


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], usage: str) -> list[str]:
    """Parses argv (argv[0] = the program name) into flag_values; returns the positional
    arguments (argv[0] first).

    Raises HelpRequested on -h / --help / --helpfull, UserError on an unknown or malformed flag.
    """
    argv = [a for a in argv if a != DEBUG_FLAG]
    if any(a in HELP_FLAGS for a in argv[1:]):
        raise HelpRequested(flags_help(flag_values, usage))
    try:
        return flag_values(argv)
    except flags.UnrecognizedFlagError as err:
        known = ", ".join(f"--{n}" for n in sorted(flag_values) if n == flag_values[n].name)
        raise UserError(f"{error_summary(err)}; known flags: {known} (see --help).") from err
    except flags.Error as err:
        raise UserError(f"{error_summary(err)} (see --help).") from err


def run_command(program: str, body: Callable[[list[str]], int | None],
                argv: Sequence[str]) -> int:
    """Runs body(argv without --debug) and returns its exit status (None = 0).

    HelpRequested prints the help and returns 0; UserError prints one line on stderr and returns
    2 (re-raised with --debug / QT_DEBUG=1).
    """
    debug = debug_requested(argv)
    try:
        return int(body([a for a in argv if a != DEBUG_FLAG]) or 0)
    except HelpRequested as help_text:
        print(str(help_text))
        return EXIT_OK
    except UserError as err:
        if debug:
            raise
        print(f"{program}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
