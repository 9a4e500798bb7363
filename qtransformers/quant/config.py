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
A head tied to the embedding table has no parameter of its own: it follows the embedding.
"""
import dataclasses
import re
from typing import Any, Mapping

from qtransformers.ops import quant as quant_ops
from qtransformers.quant import estimators

DEFAULT_INCLUDE = (r"(^|/)kernel$", r"(^|/)embedding$", r"(^|/)scale$")
DEFAULT_EXCLUDE = (r"(^|/)bias$", r"gate")
DEFAULT_HEAD_PATTERNS = (r"(^|/)(mlm_head|lm_head|classifier)(/|$)",)

WEIGHT_ESTIMATORS = ("minmax", "mse")
ACT_ESTIMATORS = estimators.ESTIMATOR_NAMES
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACT_GRANULARITIES = ("per_tensor", "per_token")


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

    Weights are symmetric signed, activations asymmetric (paper.md §4).
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
PRESETS: dict[str, dict[str, Any]] = {
    # BERT / ViT (paper and reference code): min-max weights, running min-max activations,
    # 16 batches of 32.
    "w8a8_bert": {},
    "w8a8_vit": {},
    # OPT: MSE weights, 0.001 / 99.999 percentile activations; batches of 8 (reference code).
    "w8a8_opt": dict(_MSE_WEIGHTS, act_estimator="percentile", act_percentile=99.999,
                     calibration_batch_size=8),
    # Low bit widths: MSE weight ranges; MSE activation ranges below 8 bits.
    "w6a8": dict(_MSE_WEIGHTS, weight_bits=6),
    "w4a8": dict(_MSE_WEIGHTS, weight_bits=4),
    "w6a6": dict(_MSE_WEIGHTS, weight_bits=6, act_bits=6, act_estimator="mse"),
    "w4a4": dict(_MSE_WEIGHTS, weight_bits=4, act_bits=4, act_estimator="mse"),
}


def get_preset(name: str) -> QuantConfig:
    """The QuantConfig of a named preset (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {tuple(PRESETS)}, got {name!r}")
    return QuantConfig(**PRESETS[name])


def param_is_quantized(path: str, config: QuantConfig) -> bool:
    """Whether the parameter at '/'-joined `path` is fake-quantized under `config`."""
    if not any(re.search(p, path) for p in config.include):
        return False
    if any(re.search(p, path) for p in config.exclude):
        return False
    if not config.quantize_head and any(re.search(p, path) for p in config.head_patterns):
        return False
    return True
