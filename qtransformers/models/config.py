"""ModelConfig: one frozen, validated description of a BERT / OPT / ViT model and its attention."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

import jax.numpy as jnp

from qtransformers.nn.attention_spec import ATTENTION_FIELDS, AttentionSpec
from qtransformers.nn.layers import ACTIVATIONS

MODEL_FAMILIES = ("bert", "opt", "vit")
POOLINGS = ("mean", "cls", "max")  # sentence-encoder pooling of the last hidden state
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}




def sequence_length_of(family: str, max_len: int, num_patches: int,
                       seq_len: int | None = None) -> int:
    """Tokens per sequence the model runs at: num_patches + 1 for ViT (fixed by the image), else
    `seq_len` (the trainer's data.seq_len) or, without one, max_len (the longest it takes).

    It is also T of γ = −α / T when a config sets α but not alpha_seq_len (`from_dict`): the
    one place that T is chosen. A run's recorded config holds the T it trained with.
    """
    if family == "vit":
        return num_patches + 1
    return int(seq_len or max_len)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and attention method. Defaults are BERT-base (paper.md §6).

    `attention` is the attention method as one value (`nn.AttentionSpec`: softmax variant,
    γ / ζ or α with T, gate, π_init, gate width and scale, context QuantPoint site,
    implementation, block size, attention dropout), given whole to every `Attention`.

    The config layer stays flat: `from_dict` / `replace` take the spec's fields as top-level
    keys (`softmax`, `gamma`, `alpha`, `alpha_seq_len`, `gate`, `gate_scale`, ...; the old
    `fused_attention=True` as attention_impl="fused"), `to_dict` writes them flat (the layout
    of a run's config.json), and reading `config.gate` etc. still answers from the spec.
    """

    family: str = "bert"
    vocab_size: int = 30522
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_ff: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    activation: str = "gelu"
    pre_ln: bool = False
    ln_eps: float = 1e-12
    final_ln: bool = False
    dropout_rate: float = 0.1
    init_std: float = 0.02
    word_embed_proj_dim: int | None = None  # OPT-350m: 512-wide embeddings projected in/out
    pad_token_id: int = 1  # OPT's padding id (positions skip padding)
    # ViT
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000
    patch_ln: bool = False
    attention: AttentionSpec = AttentionSpec(attention_dropout_rate=0.1)
    # Numerics
    dtype: str = "float32"
    remat: bool = False
    # Sentence encoder (models/encoder.py): a head-less BERT whose last hidden state is pooled
    # into one embedding per sequence. None builds the family's task model (MLM / LM / classifier).
    pooling: str | None = None  # None | "mean" | "cls" | "max"
    normalize_embeddings: bool = False  # L2-normalise the pooled embedding

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def sequence_length(self, seq_len: int | None = None) -> int:
        """Tokens per sequence at a data seq_len (see `sequence_length_of`)."""
        return sequence_length_of(self.family, self.max_len, self.num_patches, seq_len)

    def __getattr__(self, name: str) -> Any:
        # Old flat reads (config.softmax, config.gate, config.resolved_gamma, ...) answer from
        # the spec. Only called for names the dataclass lacks.
        spec = self.__dict__.get("attention")
        if spec is not None and (name in ATTENTION_FIELDS or name == "resolved_gamma"):
            return getattr(spec, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def validate(self) -> None:
        """Raises ValueError naming the first bad field and its allowed values."""
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"model.family={self.family!r} is unknown; choose one of "
                             f"{MODEL_FAMILIES}.")
        if self.pooling is not None and (self.pooling not in POOLINGS or self.family != "bert"):
            raise ValueError(f"model.pooling={self.pooling!r} needs family 'bert' and one of "
                             f"{POOLINGS} (None = the family's task head).")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be positive.")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by "
                             f"model.num_heads={self.num_heads}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r} is unknown; choose one of "
                             f"{tuple(ACTIVATIONS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown; choose one of "
                             f"{tuple(DTYPES)}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"model.dropout_rate={self.dropout_rate!r} must lie in [0, 1).")
        if not isinstance(self.attention, AttentionSpec):
            raise ValueError(f"model.attention={self.attention!r} must be an AttentionSpec.")
        if self.family == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"model.image_size={self.image_size} is not divisible by "
                             f"model.patch_size={self.patch_size}.")

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A validated copy with some fields changed: model fields, flat attention keys
        (`gate="linear"`, `alpha=4.0`, ...) or a whole `attention=AttentionSpec(...)`."""
        values = dataclasses.asdict(self)  # nested: {"attention": {...}}
        values.pop("attention")
        attention = overrides.pop("attention", self.attention)
        return self.from_dict({**values, "attention": attention, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Every field, the attention spec's flat in its place (the layout config.json records)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out.update(value.to_dict() if field.name == "attention" else {field.name: value})
        return out

    @classmethod
    def flat_field_types(cls) -> dict[str, Any]:
        """{key: type hint} of every flat config key, in `to_dict` order."""
        hints = {**typing.get_type_hints(AttentionSpec), **typing.get_type_hints(cls)}
        names = [n for f in dataclasses.fields(cls)
                 for n in (ATTENTION_FIELDS if f.name == "attention" else (f.name,))]
        return {name: hints[name] for name in names}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any],
                  trained_seq_len: int | None = None) -> "ModelConfig":
        """Builds from a flat dict / ConfigDict (config.json's layout; `attention` may also
        be given as an AttentionSpec or mapping, its fields then overridden by flat keys).

        trained_seq_len: the sequence length the model will train at; it becomes T of
          γ = −α / T when α is set and alpha_seq_len is not (see `sequence_length_of`).
        Unknown keys raise a ValueError listing the known ones.
        """
        values = dict(values)
        if "fused_attention" in values:  # the field attention_impl replaced (old run configs)
            if values.pop("fused_attention"):
                values["attention_impl"] = "fused"
        attention = values.pop("attention", None)
        if isinstance(attention, AttentionSpec):
            attention = attention.to_dict()
        attention = dict(attention or _DEFAULTS["attention"].to_dict())
        attention.update({k: values.pop(k) for k in ATTENTION_FIELDS if k in values})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: "
                             f"{sorted(known | set(ATTENTION_FIELDS))}.")
        if attention.get("alpha") is not None and attention.get("alpha_seq_len") is None:
            shape = {**_DEFAULTS, **values}
            attention["alpha_seq_len"] = sequence_length_of(
                shape["family"], shape["max_len"],
                (shape["image_size"] // shape["patch_size"]) ** 2, trained_seq_len)
        try:
            spec = AttentionSpec.from_dict(attention)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        return cls(**values, attention=spec)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
