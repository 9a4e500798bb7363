"""PTQ settings: `QuantConfig`, named presets, and the parameter include / exclude rule.

Parameter paths are '/'-joined Flax param paths, e.g. 'encoder/layers_0/attention/query/kernel'.
A parameter is fake-quantized when some `include` regex matches its path (re.search), no
`exclude` regex matches, and (unless `quantize_head`) no `head_patterns` regex matches.

Defaults (paper.md §4: weights = all Linear kernels, embedding tables, LayerNorm scales; not
biases, gates, or the final LM / MLM / classification head):
- DEFAULT_INCLUDE: a last path element 'kernel' (Dense), 'embedding' (nn.Embed) or 'scale'
  (LayerNorm / RMSNorm).
- DEFAULT_EXCLUDE: a last path element 'bias'; any path containing 'gate'.
- DEFAULT_HEAD_PATTERNS: a path element named 'mlm_head', 'lm_head' or 'classifier'.

Options that follow the authors' code (qualcomm-ai-research/outlier-free-transformers) where the
paper does not say, each off by default except where noted:
- `head`: what the output head computes with. A tied head (BERT's MLM decoder, OPT's LM head)
  has no parameter of its own, so `quantize_head` / `head_patterns` cannot reach it:
  'follow_embedding' (default): the tied head multiplies by the quantized embedding table;
  'fp': full precision (paper.md §4 "not quantized: the final LM / MLM head"; the reference's
    BERT always, OPT with quant_setup='fp32_head'): quantize_params keeps an unquantized copy
    of the tied table (top-level param FP_HEAD_TABLE) for the head; head params stay FP;
  'quantized': the reference's OPT quant_setup='all' (its argparse default): head weights
    quantized (tied: the quantized table; untied: as quantize_head=True) and the logits
    quantized by the optional QuantPoint 'logits'.
- `unsigned_weights`: a weight tensor with no negative entry (LayerNorm scales) uses the
  unsigned grid [0, 2^b - 1], step max / (2^b - 1) (max/255 at 8 bits), in min-max and in the
  MSE search (the reference's SymmetricUniformQuantizer turns unsigned when x_min >= 0, and its
  MSE search becomes one-sided). False: always the signed grid (step max|w| / 127).
- `embedding_layout`: 'sum' quantizes the embedding sum once; 'two_step' is the reference's
  BERT layout (QuantizedBertEmbeddings): quantize word + token type, add the position, quantize
  again. Models without token types (OPT, ViT) have one sum either way.
- `weight_mse_margin`: the MSE weight search lays its N candidates over max|w| + margin; the
  reference's MSE_Estimator has range_margin=0.5, ours defaults to 0 (span max|w|).
- `calibration_order`: how evaluate_ptq draws calibration batches from a pool: 'random'
  (paper: random subsets per PTQ seed) or 'first' (the reference: the first N in order).
"""
import dataclasses
import re
from typing import Any, Mapping

from qtransformers.nn.quant_point import EMBEDDINGS_WORD_TYPE, LOGITS
from qtransformers.ops import quant as quant_ops
from qtransformers.quant import estimators

DEFAULT_INCLUDE = (r"(^|/)kernel$", r"(^|/)embedding$", r"(^|/)scale$")
DEFAULT_EXCLUDE = (r"(^|/)bias$", r"gate")
DEFAULT_HEAD_PATTERNS = (r"(^|/)(mlm_head|lm_head|classifier)(/|$)",)

WEIGHT_ESTIMATORS = ("minmax", "mse")
ACT_ESTIMATORS = estimators.ESTIMATOR_NAMES
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACT_GRANULARITIES = ("per_tensor", "per_token")
HEAD_MODES = ("follow_embedding", "fp", "quantized")
EMBEDDING_LAYOUTS = ("sum", "two_step")
CALIBRATION_ORDERS = ("random", "first")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")


def _check_patterns(field: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{field} must be a tuple of regex strings, got {value!r}")
    for p in value:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{field} has an invalid regex {p!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization settings (validated on construction).

    Weights are symmetric signed (unsigned for non-negative tensors with `unsigned_weights`),
    activations asymmetric (paper.md §4). See the module docstring for `head`,
    `unsigned_weights`, `embedding_layout`, `weight_mse_margin` and `calibration_order`.
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_estimator: str = "minmax"  # 'minmax' | 'mse'
    act_estimator: str = "running_minmax"  # one of estimators.ESTIMATOR_NAMES
    act_percentile: float = estimators.DEFAULT_PERCENTILE  # high percentile, low = 100 - p
    act_momentum: float = estimators.DEFAULT_MOMENTUM  # running_minmax / percentile
    num_candidates: int = 100  # MSE grid size (weights and activations)
    weight_granularity: str = "per_tensor"  # 'per_tensor' | 'per_channel'
    act_granularity: str = "per_tensor"  # 'per_tensor' | 'per_token' (dynamic, no calibration)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS
    quantize_head: bool = False
    num_calibration_batches: int = 16
    calibration_batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    head: str = "follow_embedding"  # 'follow_embedding' | 'fp' | 'quantized'
    unsigned_weights: bool = False
    embedding_layout: str = "sum"  # 'sum' | 'two_step'
    weight_mse_margin: float = 0.0
    calibration_order: str = "random"  # 'random' | 'first'

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "QuantConfig":
        """Raises ValueError naming the first bad field; returns self."""
        quant_ops.check_bits(self.weight_bits, "weight_bits")
        quant_ops.check_bits(self.act_bits, "act_bits")
        _check_choice("weight_estimator", self.weight_estimator, WEIGHT_ESTIMATORS)
        _check_choice("act_estimator", self.act_estimator, ACT_ESTIMATORS)
        estimators.check_percentile(self.act_percentile, "act_percentile")
        if isinstance(self.act_momentum, bool) or not isinstance(self.act_momentum, (int, float)) \
                or not 0 <= self.act_momentum < 1:
            raise ValueError(f"act_momentum must be a number in [0, 1), got {self.act_momentum!r}")
        _check_int("num_candidates", self.num_candidates, 1)
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        _check_choice("act_granularity", self.act_granularity, ACT_GRANULARITIES)
        _check_patterns("include", self.include)
        _check_patterns("exclude", self.exclude)
        _check_patterns("head_patterns", self.head_patterns)
        if not isinstance(self.quantize_head, bool):
            raise ValueError(f"quantize_head must be True or False, got {self.quantize_head!r}")
        _check_int("num_calibration_batches", self.num_calibration_batches, 1)
        _check_int("calibration_batch_size", self.calibration_batch_size, 1)
        if not isinstance(self.seeds, tuple) or not self.seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in self.seeds
        ):
            raise ValueError(f"seeds must be a non-empty tuple of ints, got {self.seeds!r}")
        _check_choice("head", self.head, HEAD_MODES)
        if self.head == "fp" and self.quantize_head:
            raise ValueError("quantize_head=True contradicts head='fp' (a full-precision head); "
                             "use head='quantized' to quantize the head")
        if not isinstance(self.unsigned_weights, bool):
            raise ValueError(f"unsigned_weights must be True or False, got "
                             f"{self.unsigned_weights!r}")
        _check_choice("embedding_layout", self.embedding_layout, EMBEDDING_LAYOUTS)
        if isinstance(self.weight_mse_margin, bool) or not isinstance(
                self.weight_mse_margin, (int, float)) or not 0 <= self.weight_mse_margin < 1e30:
            raise ValueError(f"weight_mse_margin must be a number >= 0, got "
                             f"{self.weight_mse_margin!r}")
        _check_choice("calibration_order", self.calibration_order, CALIBRATION_ORDERS)
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        """Builds from a mapping (e.g. a ConfigDict's to_dict()); lists become tuples."""
        allowed = tuple(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"QuantConfig keys must be among {allowed}, got unknown {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (tuples kept)."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "QuantConfig":
        """A copy with fields overridden (validated); unknown fields raise ValueError."""
        return QuantConfig.from_dict({**self.to_dict(), **overrides})


_MSE_WEIGHTS = dict(weight_estimator="mse")
# The paper's text (paper.md §4) keeps the final LM / MLM head in full precision.
_PAPER = dict(head="fp")
# The authors' code where the paper's text is silent (see the module docstring).
_REFERENCE = dict(head="fp", unsigned_weights=True, weight_mse_margin=0.5)
PRESETS: dict[str, dict[str, Any]] = {
    "w8a8_bert": dict(_PAPER),
    "w8a8_vit": dict(_PAPER),
    "w8a8_opt": dict(_PAPER, **_MSE_WEIGHTS, act_estimator="percentile", act_percentile=99.999,
                     calibration_batch_size=8),
    "w6a8": dict(_PAPER, **_MSE_WEIGHTS, weight_bits=6),
    "w4a8": dict(_PAPER, **_MSE_WEIGHTS, weight_bits=4),
    "w6a6": dict(_PAPER, **_MSE_WEIGHTS, weight_bits=6, act_bits=6, act_estimator="mse"),
    "w4a4": dict(_PAPER, **_MSE_WEIGHTS, weight_bits=4, act_bits=4, act_estimator="mse"),
    "w8a8_bert_reference": dict(_REFERENCE, embedding_layout="two_step",
                                calibration_order="first"),
    "w8a8_opt_reference": dict(_REFERENCE, **_MSE_WEIGHTS, act_estimator="percentile",
                               act_percentile=99.999, num_calibration_batches=4,
                               calibration_batch_size=8),
    "w8a8_opt_reference_all": dict(_REFERENCE, **_MSE_WEIGHTS, head="quantized",
                                   act_estimator="percentile", act_percentile=99.999,
                                   num_calibration_batches=4, calibration_batch_size=8),
}

PRESET_DOCS: dict[str, str] = {
    "w8a8_bert": (
        "BERT as the paper states it (paper.md §4): min-max weights, running min-max "
        "activations (momentum 0.9), 16 random batches of 32 per PTQ seed, MLM head in full "
        "precision. Differs from the authors' code (w8a8_bert_reference) in: the signed grid "
        "for every weight tensor (§4 states it; the code puts non-negative tensors, the "
        "LayerNorm scales, on the unsigned grid max/255); one quantizer on the embedding sum "
        "(the code quantizes word + token type, then + position); random calibration batches "
        "(§4: random training batches; the code: the first 16 validation batches)."),
    "w8a8_vit": (
        "ViT: as w8a8_bert (the paper's ViT protocol equals BERT's; the authors' public code "
        "has no ViT PTQ to compare with; the classifier is untied and stays FP)."),
    "w8a8_opt": (
        "OPT as the paper states it (paper.md §4): MSE weights (100 candidates), 0.001 / "
        "99.999 percentile activations, 16 random batches of 8, LM head in full precision. "
        "Differs from the authors' code (w8a8_opt_reference) in: the signed grid for every "
        "weight tensor (§4; the code: unsigned for LayerNorm scales); the MSE grid spans "
        "max|w| (the code: max|w| + 0.5, its range_margin); 16 calibration batches (§4's "
        "count; the code's README command uses 4)."),
    "w6a8": (
        "W6A8 (paper.md §4 low bit widths): w8a8_bert's protocol with 6-bit MSE weights; "
        "differs from the code as w8a8_bert and w8a8_opt do (grid sign, embedding layout, "
        "MSE span, calibration batches)."),
    "w4a8": "W4A8: as w6a8 with 4-bit weights.",
    "w6a6": (
        "W6A6: as w6a8 with 6-bit activations on MSE ranges (ours: a 100-point grid over the "
        "first batch's range, losses summed over batches; the code: golden-section search, "
        "the last batch decides, see quant.estimators)."),
    "w4a4": "W4A4: as w6a6 with 4-bit weights and activations.",
    "w8a8_bert_reference": (
        "The authors' validate_mlm.py defaults: min-max weights, unsigned grid for "
        "non-negative weights, two-step embedding quantization, MSE span max|w| + 0.5 (when "
        "MSE weights are chosen), running min-max activations, the first 16 batches of 32 in "
        "order (the code calibrates on the first 16 validation batches), MLM head in full "
        "precision (the code leaves `cls` unquantized)."),
    "w8a8_opt_reference": (
        "The authors' INT8 OPT command (README: validate_clm.py --quant_setup fp32_head "
        "--percentile 99.999 --est_num_batches 4): MSE weights (grid of 100 over max|w| + 0.5, "
        "unsigned for non-negative tensors), 0.001 / 99.999 percentile running averages, 4 "
        "random training batches of 8 (the code's shuffled train loader), LM head in full "
        "precision."),
    "w8a8_opt_reference_all": (
        "As w8a8_opt_reference with the code's argparse default quant_setup='all': the tied "
        "LM head's weights quantized (the quantized embedding table) and the logits quantized "
        "(percentile ranges like every other activation)."),
}


def get_preset(name: str) -> QuantConfig:
    """The QuantConfig of a named preset (see PRESETS; PRESET_DOCS says what each follows)."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {tuple(PRESETS)}, got {name!r}")
    return QuantConfig(**PRESETS[name])


def param_is_quantized(path: str, config: QuantConfig) -> bool:
    """Whether the parameter at '/'-joined `path` is fake-quantized under `config`."""
    if not any(re.search(p, path) for p in config.include):
        return False
    if any(re.search(p, path) for p in config.exclude):
        return False
    quantize_head = config.quantize_head or config.head == "quantized"
    if not quantize_head and any(re.search(p, path) for p in config.head_patterns):
        return False
    return True


def optional_points(config: QuantConfig) -> tuple[str, ...]:
    """Names of the optional QuantPoints `config` activates (nn.quant_point.OPTIONAL_POINTS)."""
    names = []
    if config.embedding_layout == "two_step":
        names.append(EMBEDDINGS_WORD_TYPE)
    if config.head == "quantized":
        names.append(LOGITS)
    return tuple(names)
