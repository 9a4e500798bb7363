"""`qtransformers train --config configs/<file>.py:<preset> --workdir DIR [--config.x=y ...]`.

Also runnable as `python -m qtransformers.train.main ...`.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from qtransformers.commandline import (HelpRequested, UserError, one_line, parse_flags,
                                       run_command)

USAGE = ("usage: qtransformers train --config configs/FILE.py[:preset] --workdir DIR "
         "[--config.section.key=value ...] [--allow_changed=train.num_steps]\n\n"
         "Trains (resuming from DIR when it holds a run of the same config) and prints the final "
         "metrics as JSON.")


def _define_flags(argv: list[str], resume_flags: bool = True) -> flags.FlagValues:
    """A fresh flag registry for one command line (the config flag reads its --config.x
    overrides from `argv`, so parsing any argv, repeatedly, works)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config: file.py[:preset]; "
                                    "override any field with --config.section.key=value.",
                                    lock_config=True, flag_values=flag_values, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, config.json and "
                        "tensorboard logs go here.", flag_values=flag_values)
    if resume_flags:
        flags.DEFINE_list("allow_changed", [], "Resume a workdir although these fields differ "
                          "from its config.json (only train.num_steps may; every other field that "
                          "changes results needs a new --workdir).", flag_values=flag_values)
    return flag_values


def config_file_arg(argv: Sequence[str]) -> str | None:
    """The value of --config (file.py[:preset]) in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_config_file(spec: str) -> None:
    """Raises UserError when --config's file is missing or not a .py file."""
    import os
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise UserError(f"--config={spec}: the file {path!r} {what}; give a config file such as "
                        "configs/tiny_opt.py:vanilla.")
    if not path.endswith(".py"):
        raise UserError(f"--config={spec}: {path!r} is not a Python config file (.py with "
                        "get_config()).")


def _loaded_config(flag_values: flags.FlagValues, spec: str) -> object:
    """flag_values.config, with a failure of the config file (its get_config, a bad preset
    argument) as a UserError naming the file."""
    try:
        return flag_values.config
    except Exception as err:  # the file's own error, raised lazily by config_flags
        cause = err.__cause__ or err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = one_line(cause)
        raise UserError(f"--config={spec} does not load: {type(cause).__name__}: {text}") from err


def parse_command(argv: Sequence[str], resume_flags: bool = True,
                  usage: str = USAGE) -> flags.FlagValues:
    """The parsed flags of a train (or reproduce) command line; argv[0] is the program name.

    Raises UserError for a missing / unloadable config file, an override of a key the config
    lacks, a malformed value, a missing --workdir or positional arguments; HelpRequested on
    --help.
    """
    argv = list(argv)
    flag_values = _define_flags(argv, resume_flags)
    spec = config_file_arg(argv[1:])
    if spec is not None and not any(a in ("-h", "--help", "--helpfull") for a in argv):
        check_config_file(spec)
    try:
        rest = parse_flags(flag_values, argv, usage)
    except (KeyError, AttributeError) as err:  # an override of a key the config lacks
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        hint = re.search(r'Did you mean "[^"]+"', str(err))
        raise UserError(f"unknown config key in overrides {overrides}"
                        + (f" ({hint.group(0)}?)" if hint else "")
                        + "; see the config file for the keys of each section.") from None
    except HelpRequested:
        raise
    except UserError:
        raise
    except Exception as err:  # config_flags raises the config file's own errors here too
        if spec is None:
            raise
        raise UserError(f"--config={spec} does not load: {type(err).__name__}: "
                        f"{one_line(err)}") from err
    if len(rest) > 1:
        raise UserError(f"unexpected arguments {rest[1:]}; every option is a --flag=value "
                        "(see --help).")
    if spec is None:
        raise UserError("--config is required, e.g. --config configs/tiny_opt.py:vanilla.")
    _loaded_config(flag_values, spec)
    if not flag_values.workdir:
        raise UserError("--workdir is required: the directory for checkpoints and logs.")
    return flag_values


def parse_args(argv: Sequence[str]) -> tuple[object, str]:
    """(config, workdir) from a command line; argv[0] is the program name.

    Raises UserError (a ValueError) when --config or --workdir is missing, the config file does
    not load, or an override names a key the config lacks or has a malformed value.
    """
    flag_values = parse_command(argv)
    return flag_values.config, flag_values.workdir


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: parses flags, trains, prints the final metrics as JSON.

    Args:
      argv: like sys.argv (argv[0], the program name, is skipped).
    Returns:
      0 on success (also after a SIGTERM-triggered save: one line on stderr says at which step
      and to rerun the command), 1 when training diverged (NaN / inf) or the multi-process
      runtime did not start, 2 on a bad command line, config, data path or workdir (one line
      on stderr, before any work; --debug or QT_DEBUG=1 shows the traceback).
    """
    argv = list(sys.argv if argv is None else argv)
    return run_command("qtransformers train", _train, argv)


def _train(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # one line on a bad input: quiet until validated
    if not flags.FLAGS.is_parsed():  # libraries (grain) read absl's global flags
        flags.FLAGS.mark_as_parsed()
    flag_values = parse_command(argv)
    from qtransformers.train.loop import NonFiniteLossError, Trainer  # heavy imports
    from qtransformers.train.mesh import DistributedInitError
    from qtransformers.data.sources import TFDSNotPreparedError
    try:  # validates the config, the data, the workdir and its run before any work
        trainer = Trainer(flag_values.config, flag_values.workdir,
                          allow_changed=flag_values.allow_changed)
    except (ValueError, TFDSNotPreparedError) as err:
        raise UserError(str(err)) from err
    except DistributedInitError as err:
        print(f"qtransformers train: error: {one_line(err)}", file=sys.stderr)
        return 1
    finally:
        root.setLevel(level)
    try:
        final = trainer.run()
    except NonFiniteLossError as err:
        print(f"qtransformers train: error: {one_line(err)}", file=sys.stderr)
        return 1
    except TFDSNotPreparedError as err:  # the training data opened only now (byte tokenizer)
        raise UserError(str(err)) from err
    print(json.dumps(final, default=str))
    if final.get("preempted"):
        print(f"qtransformers train: preempted at step {final['step']}, rerun the same command "
              "to continue.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
