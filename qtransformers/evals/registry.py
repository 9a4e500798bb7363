"""The evaluator registry: `config.evals.<name>.type` -> an Evaluator class, built in one place.

big_vision style: a config declares named evaluators with their own settings,

    config.evals.ptq = dict(type="ptq", every=1000, num_batches=8, seeds=(0, 1, 2))

and `build_evaluators(config.evals, task)` makes them. The trainer runs each one every `every`
steps (and at the last step; every=0: never during training), `qtransformers evaluate` runs
them on a checkpoint and `reproduce` after training: the same `Evaluator.run` in all three.

A new evaluator type is one class and one decorator line:

    @register_evaluator("my_metric")
    class MyMetric(Evaluator):
        settings = {"threshold": 0.5}          # its own settings and their defaults
        def run(self, model, params, data):    # -> {metric name: value, ...}
            batches = data.eval_batches(self.num_batches, self.batch_size)
            ...

Settings every evaluator has (COMMON_SETTINGS): type, every (steps; 0 = not during training),
num_batches (eval batches; 0 = the whole split) and batch_size (0 = the caller's default).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

from qtransformers.evals.data import EvalData
from qtransformers.models.tasks import Task, get_task

COMMON_SETTINGS = {"type": "", "every": 0, "num_batches": 8, "batch_size": 0}
_REGISTRY: dict[str, type["Evaluator"]] = {}


class Evaluator:
    """One named evaluation of a model's params on an EvalData's batches.

    Class attributes:
      settings: the type's own settings and their defaults (besides COMMON_SETTINGS).
      needs_quant_points: the evaluator reads QuantPoints / attention tensors, so it runs on
        the materialized attention implementation (callers build that model for it).
    Instance attributes: name, task, every, num_batches, batch_size and every setting.
    """

    type_name: ClassVar[str] = ""
    settings: ClassVar[dict[str, Any]] = {}
    needs_quant_points: ClassVar[bool] = False

    def __init__(self, name: str, settings: Mapping[str, Any], task: Task):
        known = {**COMMON_SETTINGS, **self.settings}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"evals.{name} ({self.type_name}) has unknown settings {unknown}; "
                             f"known: {sorted(known)}.")
        self.name, self.task = name, get_task(task)
        self.config = {**known, **dict(settings), "type": self.type_name}
        for key in ("every", "num_batches", "batch_size"):
            value = self.config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"evals.{name}.{key}={value!r} must be an integer >= 0.")
        self.every = self.config["every"]
        self.num_batches = self.config["num_batches"]
        self.batch_size = self.config["batch_size"]
        self.check()

    def __getattr__(self, key: str) -> Any:  # settings read as attributes
        config = self.__dict__.get("config", {})
        if key in config:
            return config[key]
        raise AttributeError(key)

    def check(self) -> None:
        """Validates the type's own settings (raise ValueError naming evals.<name>.<key>)."""

    def due(self, step: int, last: bool) -> bool:
        """Whether the trainer runs it after `step` (every N steps and at the last one)."""
        return self.every > 0 and (step % self.every == 0 or last)

    def run(self, model: Any, params: Any, data: EvalData) -> dict[str, Any]:
        """The evaluation's result (scalars and, for some types, nested detail)."""
        raise NotImplementedError

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        """The flat {name: float} a metric log records (default: the float entries)."""
        return {k: float(v) for k, v in result.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def summary(self, result: Mapping[str, Any]) -> str:
        """One log line of the result."""
        shown = list(self.scalars(result).items())[:4]
        return " | ".join(f"{k} {v:.4g}" for k, v in shown)


def register_evaluator(type_name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator: `config.evals.<name>.type = type_name` builds this class."""
    def register(cls: type[Evaluator]) -> type[Evaluator]:
        cls.type_name = type_name
        _REGISTRY[type_name] = cls
        return cls
    return register


def evaluator_types() -> tuple[str, ...]:
    """The registered evaluator types."""
    _load_builtin()
    return tuple(_REGISTRY)


def build_evaluator(name: str, settings: Mapping[str, Any], task: Any) -> Evaluator:
    """The evaluator `settings['type']` named `name` (ValueError on unknown types / settings)."""
    _load_builtin()
    kind = settings.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"evals.{name}.type={kind!r} is unknown; choose one of "
                         f"{tuple(_REGISTRY)}.")
    return _REGISTRY[kind](name, settings, get_task(task))


def build_evaluators(evals: Mapping[str, Mapping[str, Any]], task: Any) -> dict[str, Evaluator]:
    """{name: Evaluator} of a config's `evals` section (ConfigDict or dict), in its order."""
    return {name: build_evaluator(name, _plain(settings), task)
            for name, settings in _plain(evals).items()}


def train_evals(config: Any) -> dict[str, dict[str, Any]]:
    """The evaluators a trainer config runs: the aliases train.eval_every / eval_steps ('eval',
    type fp) and train.outlier_eval_every / outlier_eval_steps ('outliers', tracked sites plus
    the block view), then config.evals (a declared name replaces an alias of that name).

    batch_size 0 means train.eval_batch_size (itself 0 = the global batch).
    """
    train, out = config.train, {}
    if train.eval_every:
        out["eval"] = {"type": "fp", "every": train.eval_every, "num_batches": train.eval_steps}
    if train.outlier_eval_every:
        out["outliers"] = {"type": "outliers", "every": train.outlier_eval_every,
                           "num_batches": train.outlier_eval_steps, "block_view": True}
    declared = _plain(config.get("evals") or {}) if hasattr(config, "get") else {}
    out.update(declared)
    return out


def _plain(value: Any) -> Any:
    """A ConfigDict / FrozenConfigDict as plain dicts (tuples stay tuples)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _load_builtin() -> None:
    import qtransformers.evals.evaluators  # noqa: F401  (registers fp, outliers, ptq, ...)


def for_evaluation(model_cfg: Any) -> Any:
    """The model config of evaluators with needs_quant_points: the materialised attention path
    (QuantPoints see the (B, H, T, T) probabilities), numerically the same as the blocked /
    fused one a run may train with."""
    return model_cfg.replace(attention_impl="materialized")


def evaluation_models(model_cfg: Any, model: Any = None) -> dict[bool, Any]:
    """{needs_quant_points: model}: `model` (default build_model(model_cfg)) for the others."""
    from qtransformers.models import build_model
    model = model if model is not None else build_model(model_cfg)
    materialized = (model if getattr(model_cfg, "attention_impl", "materialized")
                    == "materialized" else build_model(for_evaluation(model_cfg)))
    return {False: model, True: materialized}


def run_evaluators(evaluators: Mapping[str, Evaluator], models: Mapping[bool, Any], params: Any,
                   data: EvalData) -> dict[str, Any]:
    """{name: result} of each evaluator on `params` and `data`'s batches, each on the model of
    its needs_quant_points (evaluation_models): the one code path of the trainer,
    `qtransformers evaluate` and `reproduce`."""
    return {name: ev.run(models[ev.needs_quant_points], params, data)
            for name, ev in evaluators.items()}
