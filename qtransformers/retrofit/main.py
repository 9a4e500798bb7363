"""`qtransformers retrofit --config configs/retrofit_minilm.py:gated --workdir DIR
[--config.section.key=value ...]`: retrofit a pretrained model (see qtransformers.retrofit)."""
from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import flags

from qtransformers.commandline import run_command

USAGE = ("usage: qtransformers retrofit --config configs/retrofit_minilm.py[:ARGS] --workdir DIR "
         "[--config.section.key=value ...]\n\n"
         "Starts from config.train.init_from (a sentence-transformers / HuggingFace folder, "
         "pkg:NAME or a workdir), applies the config's attention method (gates in fine-tuning "
         "mode, clipped softmax), fine-tunes with distillation from the original (+ penalties), "
         "measures outliers and quantized retrieval before / after, and prints the final "
         "metrics as JSON. A finished workdir is reused; an unfinished one resumes.")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry; argv like sys.argv (program name first). 0, or 2 after one line on
    stderr for a bad command line, config, init_from or workdir."""
    argv = list(sys.argv if argv is None else argv)
    return run_command("qtransformers retrofit", _retrofit, argv)


def _retrofit(argv: list[str]) -> int:
    from qtransformers.train.main import parse_command
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flag_values = parse_command(argv, resume_flags=False, usage=USAGE)
    from qtransformers.retrofit.loop import run_retrofit
    final = run_retrofit(flag_values.config, flag_values.workdir,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in final.items() if k != "student"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
