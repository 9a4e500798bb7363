"""The `qtransformers` console command: dispatches a subcommand to its module's main(argv)."""
from __future__ import annotations

import importlib
import sys

# name -> ("module:function", help).
SUBCOMMANDS = {
    "train": ("qtransformers.train.main:main", "pretrain a model: --config configs/X.py:preset "
              "--workdir DIR [--config.key=value ...]"),
    "evaluate": ("qtransformers.evaluate.main:main", "FP quality, outlier metrics and W8A8 PTQ of a "
                 "checkpoint or a HuggingFace folder"),
    "reproduce": ("qtransformers.reproduce.main:main", "train vanilla / clipped / gated under one "
                  "budget, quantize, measure, and write a report"),
    "retrofit": ("qtransformers.retrofit.main:main", "fine-tune a pretrained model into gated / "
                 "clipped attention (distillation + outlier penalty), measure before / after"),
    "tokenizer": ("qtransformers.data:tokenizer_main", "train a WordPiece or BPE tokenizer on "
                  "text files"),
}

# Every command parses absl flags; train and reproduce take argv with the program name first
# (as absl.app passes it), evaluate and tokenizer the arguments after the command.
ABSL_STYLE = ("train", "reproduce", "retrofit")


def usage() -> str:
    lines = ["usage: qtransformers <command> [flags]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `qtransformers <command> --help` for a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. argv excludes the program name."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"qtransformers: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = SUBCOMMANDS[command][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function([f"qtransformers {command}", *rest] if command in ABSL_STYLE else rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
