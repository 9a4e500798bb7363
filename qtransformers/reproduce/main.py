"""`qtransformers reproduce [--config FILE.py[:preset]] [--workdir DIR] [--config.x=y ...]`.

Without --config it runs the default CPU experiment (qtransformers/reproduce/default_config.py);
without --workdir it writes into runs/reproduce. Rerunning with the same workdir resumes.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")
DEFAULT_WORKDIR = os.path.join("runs", "reproduce")


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
    """Console entry; argv[0] is the program name. Returns 0, or 2 on a bad config."""
    argv = list(sys.argv if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from qtransformers.reproduce.runner import run_reproduce
    from qtransformers.train.main import parse_args
    try:
        config, workdir = parse_args(with_defaults(argv))
        report = run_reproduce(config, workdir, command=" ".join(
            ["qtransformers reproduce", *argv[1:]]))
    except ValueError as err:
        print(f"qtransformers reproduce: error: {err}", file=sys.stderr)
        return 2
    print(open(os.path.join(workdir, "report.md"), encoding="utf-8").read())
    if report.get("verdict"):
        print(report["verdict"]["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
