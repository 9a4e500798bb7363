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


def _define_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh flag registry for one command line (the config flag reads its --config.x
    overrides from `argv`, so parsing any argv, repeatedly, works)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config: file.py[:preset].",
                                    lock_config=True, flag_values=flag_values, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and tensorboard logs go "
                        "here.", flag_values=flag_values)
    return flag_values


def parse_args(argv: Sequence[str]) -> tuple[object, str]:
    """(config, workdir) from a command line; argv[0] is the program name.

    Raises ValueError when --config or --workdir is missing or an override names a key the
    config lacks; absl flags.Error on a malformed flag.
    """
    argv = list(argv)
    flag_values = _define_flags(argv)
    try:
        flag_values(argv)
    except (KeyError, AttributeError) as err:  # an override of a key the config lacks
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        hint = re.search(r'Did you mean "[^"]+"', str(err))
        raise ValueError(f"unknown config key in overrides {overrides}"
                         + (f" ({hint.group(0)}?)" if hint else "")) from None
    if flag_values.config is None:
        raise ValueError("--config is required, e.g. --config configs/tiny_opt.py:vanilla.")
    if not flag_values.workdir:
        raise ValueError("--workdir is required: the directory for checkpoints and logs.")
    return flag_values.config, flag_values.workdir


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: parses flags, trains, prints the final metrics as JSON.

    Args:
      argv: like sys.argv (argv[0], the program name, is skipped).
    Returns:
      0 on success (also after a SIGTERM-triggered save), 1 when training diverged (NaN / inf)
      or the multi-process runtime did not start, 2 on a bad command line or config (or a TFDS
      dataset that is not prepared as ArrayRecord).
    """
    argv = list(sys.argv if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not flags.FLAGS.is_parsed():  # libraries (grain) read absl's global flags
        flags.FLAGS.mark_as_parsed()
    from qtransformers.train.loop import NonFiniteLossError, Trainer  # heavy imports
    from qtransformers.train.mesh import DistributedInitError
    from qtransformers.data.sources import TFDSNotPreparedError
    try:
        config, workdir = parse_args(argv)
        trainer = Trainer(config, workdir)  # validates the whole config before any work
    except (flags.Error, ValueError, TFDSNotPreparedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DistributedInitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        final = trainer.run()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TFDSNotPreparedError as err:  # the training data opened only now (byte tokenizer)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(final, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
