"""What a model family is trained and measured on: one `Task` per family.

A Task owns every fact the packages above `models/` used to switch on `family` for: the model's
inputs and an example batch, the loss and metric sums (one convention, one set of keys), the
headline metric and its direction, the data objective, the default PTQ preset, the outlier
sites the paper tracks, and the sizes the planner and throughput need.

    task = get_task(model_cfg)                       # or get_task("opt")
    args, kwargs = task.model_inputs(batch)
    sums = task.metric_sums(logits, batch)           # {'loss_sum', 'correct_sum', 'weight_sum'}
    task.finalize(sums)                              # {'loss', 'accuracy' (fraction), 'perplexity'}

Metric convention (every package): sums over the batch with keys SUM_KEYS, so batches (and
gradient-accumulation micro-batches) add up exactly; `finalize` divides once. Accuracy is a
fraction in [0, 1] everywhere; reports multiply by 100 when they print a percentage.

Adding a task (e.g. sentence embeddings for a pretrained encoder) is one subclass of `Task`
plus one `register_task(family, instance)` line; train, quant, evaluate and reproduce then
find it through `get_task`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.models.losses import (classification_cross_entropy,  # noqa: F401
                                         select_predictions, token_cross_entropy)

Batch = Mapping[str, Any]
SUM_KEYS = ("loss_sum", "correct_sum", "weight_sum")


@dataclasses.dataclass(frozen=True)
class TrackedSites:
    """Regexes (re.search on QuantPoint paths) of the tensors whose outliers the paper tracks
    (paper.md §5)."""

    full: tuple[str, ...]  # inf-norm and kurtosis
    inf_only: tuple[str, ...]  # inf-norm only
    layer_outputs: str  # which tensors are "layer outputs"
    table_inf_norm: str  # 'all' or 'layers': which max the paper's table reports

    @property
    def all(self) -> tuple[str, ...]:
        return self.full + self.inf_only


_LAYER = r"layers_\d+/"
_DECODER_SITES = TrackedSites(
    (_LAYER + r"mlp_residual$", _LAYER + r"mlp/output_output$", _LAYER + r"attention_ln/output$",
     _LAYER + r"mlp_ln/output$", _LAYER + r"attention/out_output$", r"^final_ln/output$"),
    (), _LAYER + r"mlp_residual$", "layers")
_ENCODER_SITES = TrackedSites((_LAYER + r"mlp/output_output$", _LAYER + r"mlp_ln/output$"),
                              (_LAYER + r"mlp_residual$",), _LAYER + r"mlp_ln/output$", "all")


class Task:
    """The facts of one model family's task (subclass and `register_task` to add one).

    Class attributes:
      name: 'mlm' | 'clm' | 'classification' (also the quant API's task names).
      data_objective: the data layer's `data.objective` that trains it.
      default_ptq_preset: quant preset name used when none is given.
      headline_metric: the paper's column ('perplexity' | 'accuracy'); higher_is_better its
        direction.
      input_keys: batch keys the model needs; target_keys: those the metric needs.
      item_unit: what throughput counts ('tokens' | 'images'); has_vocab_head: the output layer
        is a (d, vocab) projection; is_text: batches have token positions and attention_mask.
      outlier_sites: the tracked tensors of the paper's outlier metrics.
      selects_predictions: prepare_train_batch honours train.mlm_max_predictions.
    """

    name: ClassVar[str]
    data_objective: ClassVar[str]
    default_ptq_preset: ClassVar[str]
    headline_metric: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False
    input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    target_keys: ClassVar[tuple[str, ...]] = ("targets", "weights")
    item_unit: ClassVar[str] = "tokens"
    has_vocab_head: ClassVar[bool] = True
    is_text: ClassVar[bool] = True
    outlier_sites: ClassVar[TrackedSites] = _DECODER_SITES
    selects_predictions: ClassVar[bool] = False  # prepare_train_batch uses max_predictions

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:  # hashable and equal by class: jit cache keys
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    # ------------------------------------------------------------------ inputs
    def check_batch(self, batch: Batch, extra: tuple[str, ...] = (),
                    inputs: bool = True) -> None:
        """Raises ValueError listing the keys the batch lacks (the model inputs unless
        inputs=False, plus `extra`)."""
        needed = (self.input_keys if inputs else ()) + extra
        missing = [k for k in needed if k not in batch]
        if missing:
            raise ValueError(f"a {self.name!r} batch needs keys {needed}; missing {missing} "
                             f"(got {sorted(batch)})")

    def model_inputs(self, batch: Batch) -> tuple[tuple, dict]:
        """(positional, keyword) model inputs of a batch."""
        return (batch["input_ids"], batch["attention_mask"]), {}

    def apply(self, model: Any, variables: Mapping[str, Any], batch: Batch, *,
              deterministic: bool = True, rngs: Any = None, mutable: Any = False) -> Any:
        """`model.apply(variables, *inputs, ...)` on a batch."""
        args, kwargs = self.model_inputs(batch)
        return model.apply(variables, *args, deterministic=deterministic, rngs=rngs,
                           mutable=mutable, **kwargs)

    def example_batch(self, cfg: Any, seq_len: int, batch_size: int = 1) -> dict[str, Any]:
        """A zero batch of the model's input shapes (init, eval_shape): (B, T) int ids."""
        ids = jnp.zeros((batch_size, seq_len), jnp.int32)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": ids}

    def random_batches(self, cfg: Any, num: int, batch_size: int, seq_len: int,
                       seed: int) -> list[dict[str, np.ndarray]]:
        """`num` random batches (uniform tokens / Gaussian images) with targets, numpy."""
        rng = np.random.default_rng(seed)
        return [self._random_batch(cfg, rng, batch_size, seq_len) for _ in range(num)]

    def _random_batch(self, cfg: Any, rng: np.random.Generator, batch_size: int,
                      seq_len: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def prepare_train_batch(self, batch: Batch, max_predictions: int = 0) -> Batch:
        """The batch the training loss sees (MLM: the masked positions only, see MaskedLM)."""
        del max_predictions
        return batch

    # ------------------------------------------------------------------ metrics
    def metric_sums(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """{'loss_sum', 'correct_sum', 'weight_sum'} of one batch (weighted positions)."""
        self.check_batch(batch, self.target_keys, inputs=False)
        return token_cross_entropy(logits, batch["targets"], batch["weights"])

    def finalize(self, sums: Mapping[str, Any]) -> dict[str, float]:
        """Host: {'loss', 'accuracy' (fraction), 'perplexity' (text tasks)} from summed sums."""
        weight = max(float(sums["weight_sum"]), 1e-12)
        loss = float(sums["loss_sum"]) / weight
        out = {"loss": loss, "accuracy": float(sums["correct_sum"]) / weight}
        if self.headline_metric == "perplexity":
            out["perplexity"] = math.exp(min(loss, 700.0))
        return out

    def valid_rows(self, batch: Batch) -> jax.Array:
        """(B,) 1.0 for real rows of a padded eval batch (text rows attend to > 1 position:
        padding rows keep exactly one)."""
        return (jnp.sum(batch["attention_mask"], axis=-1) > 1).astype(jnp.float32)

    def token_mask(self, batch: Batch) -> Any:
        """The (B, T) mask of real tokens (statistics skip padding), or None."""
        return batch.get("attention_mask") if self.is_text else None

    # ------------------------------------------------------------------ sizes
    def tokens_per_example(self, cfg: Any, seq_len: int | None = None) -> int:
        """Positions the model runs per example (text: seq_len, default cfg.max_len)."""
        return int(seq_len or cfg.max_len)

    def items_per_example(self, cfg: Any, seq_len: int | None = None) -> int:
        """How many `item_unit`s one example counts for in throughput."""
        return self.tokens_per_example(cfg, seq_len)

    def configure_data(self, data_cfg: Any, cfg: Any, seq_len: int) -> None:
        """Sets a data-layer config (ConfigDict) to feed this task for the model `cfg`."""
        data_cfg.objective = self.data_objective
        data_cfg.seq_len = seq_len


class MaskedLM(Task):
    """BERT's masked language modelling: predict the masked tokens (weights on them)."""

    name = "mlm"
    data_objective = "mlm"
    default_ptq_preset = "w8a8_bert"
    outlier_sites = _ENCODER_SITES
    selects_predictions = True

    def model_inputs(self, batch: Batch) -> tuple[tuple, dict]:
        """(input_ids, attention_mask, token_type_ids), and predict_positions when present."""
        token_type_ids = batch.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(batch["input_ids"])
        kwargs = ({"predict_positions": batch["predict_positions"]}
                  if "predict_positions" in batch else {})
        return (batch["input_ids"], batch["attention_mask"], token_type_ids), kwargs

    def _random_batch(self, cfg, rng, batch_size, seq_len):
        ids = rng.integers(0, cfg.vocab_size, (batch_size, seq_len), np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids), "targets": ids.copy(),
                "weights": (rng.random((batch_size, seq_len)) < 0.15).astype(np.float32)}

    def prepare_train_batch(self, batch: Batch, max_predictions: int = 0) -> Batch:
        """With max_predictions > 0 the MLM head runs on at most that many masked positions
        per row (select_predictions)."""
        return select_predictions(batch, max_predictions) if max_predictions else batch


class CausalLM(Task):
    """OPT's next-token prediction (targets already shifted, the last position weight 0)."""

    name = "clm"
    data_objective = "clm"
    default_ptq_preset = "w8a8_opt"

    def _random_batch(self, cfg, rng, batch_size, seq_len):
        ids = rng.integers(0, cfg.vocab_size, (batch_size, seq_len), np.int32)
        weights = np.ones((batch_size, seq_len), np.float32)
        weights[:, -1] = 0.0
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "targets": np.roll(ids, -1, axis=1), "weights": weights}


class ImageClassification(Task):
    """ViT image classification; integer or soft (mixup / cutmix) labels."""

    name = "classification"
    data_objective = "image"
    default_ptq_preset = "w8a8_vit"
    headline_metric = "accuracy"
    higher_is_better = True
    input_keys = ("image",)
    target_keys = ("label",)
    item_unit = "images"
    has_vocab_head = False
    is_text = False

    def model_inputs(self, batch: Batch) -> tuple[tuple, dict]:
        """(image,) with image (B, H, W, C)."""
        return (batch["image"],), {}

    def example_batch(self, cfg: Any, seq_len: int, batch_size: int = 1) -> dict[str, Any]:
        size = cfg.image_size
        return {"image": jnp.zeros((batch_size, size, size, cfg.num_channels), jnp.float32)}

    def _random_batch(self, cfg, rng, batch_size, seq_len):
        s = cfg.image_size
        return {"image": rng.standard_normal((batch_size, s, s, cfg.num_channels), np.float32),
                "label": rng.integers(0, cfg.num_classes, batch_size, np.int32)}

    def metric_sums(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Soft labels ('label_probs') when present, else 'label'; weights or example_weight."""
        labels = batch["label_probs"] if "label_probs" in batch else batch.get("label")
        if labels is None:
            self.check_batch(batch, self.target_keys, inputs=False)
        weights = batch.get("weights", batch.get("example_weight"))
        return classification_cross_entropy(logits, labels, weights)

    def token_mask(self, batch: Batch) -> None:
        return None

    def valid_rows(self, batch: Batch) -> jax.Array:
        """(B,) 1.0 for rows with weight > 0 (all rows when the batch has no weights)."""
        weights = batch.get("weights")
        if weights is None:
            return jnp.ones(batch["image"].shape[:1], jnp.float32)
        return (weights > 0).astype(jnp.float32)

    def tokens_per_example(self, cfg: Any, seq_len: int | None = None) -> int:
        """The patches plus the class token."""
        return cfg.num_patches + 1

    def items_per_example(self, cfg: Any, seq_len: int | None = None) -> int:
        return 1

    def configure_data(self, data_cfg: Any, cfg: Any, seq_len: int) -> None:
        """Synthetic images of the model's size and classes (the built-in image source)."""
        super().configure_data(data_cfg, cfg, seq_len)
        data_cfg.source = "synthetic"
        data_cfg.image_size = cfg.image_size
        data_cfg.num_classes = cfg.num_classes


# family -> its Task; task name (and data objective) -> the same instance.
_BY_FAMILY: dict[str, Task] = {}
_BY_NAME: dict[str, Task] = {}


def register_task(family: str, task: Task) -> Task:
    """Makes `task` the Task of models with config.family == `family` (and findable by its
    name and data objective). Returns it."""
    _BY_FAMILY[family] = task
    _BY_NAME.setdefault(task.name, task)
    _BY_NAME.setdefault(task.data_objective, task)
    return task


register_task("bert", MaskedLM())
register_task("opt", CausalLM())
register_task("vit", ImageClassification())


def families() -> tuple[str, ...]:
    """The model families that have a Task."""
    return tuple(_BY_FAMILY)


def get_task(what: Any) -> Task:
    """The Task of a model family ('bert'), a task name ('clm', 'classification', 'image'), a
    ModelConfig (its .family), a model (its .config.family), or a Task (itself).

    Raises ValueError naming the known families when there is none.
    """
    if isinstance(what, Task):
        return what
    key = what
    if not isinstance(what, str):
        key = getattr(what, "family", None) or getattr(getattr(what, "config", None),
                                                       "family", None)
    if key in _BY_FAMILY:
        return _BY_FAMILY[key]
    if key in _BY_NAME:
        return _BY_NAME[key]
    raise ValueError(f"no task for {key!r}; known model families {families()} and tasks "
                     f"{tuple(sorted(set(_BY_NAME)))}.")
