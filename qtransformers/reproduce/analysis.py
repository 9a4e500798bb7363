"""What a person wants to see in a trained model: per-layer outliers, the heads that attend to
the first token, gate values, and the channels / positions where outliers fire.

All functions read the intermediates that the models sow ('block_output' per layer,
'attention_probs' and 'gate_values' per attention layer) from one batch.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.ops.metrics import inf_norm_per_sample, kurtosis_per_sample


def capture_intermediates(model: nn.Module, params: Any, model_inputs: Sequence[Any]) -> dict:
    """Runs `model` on one batch and returns {layer_name: {name: array}} of sown intermediates.

    Args:
      model_inputs: positional inputs of the model (e.g. (input_ids, attention_mask)).
    Returns:
      a dict keyed by layer name ("layers_0", ...) holding 'block_output' (B, T, d),
      'attention_probs' (B, H, T, T) and, for gated models, 'gate_values'.
    """
    @jax.jit
    def run(p, *inputs):
        _, state = model.apply({"params": p}, *inputs, mutable=["intermediates"])
        return state["intermediates"]

    inter = jax.device_get(run(params, *model_inputs))
    stack = next(iter(inter.values()))  # "encoder" / "decoder"
    layers = {}
    for name, layer in stack.items():
        if not name.startswith("layers_"):
            continue
        entry = {"block_output": np.asarray(layer["block_output"][0])}
        attention = layer["attention"]
        entry["attention_probs"] = np.asarray(attention["attention_probs"][0])
        if "gate_values" in attention:
            entry["gate_values"] = np.asarray(attention["gate_values"][0])
        layers[name] = entry
    return dict(sorted(layers.items(), key=lambda kv: int(kv[0].split("_")[1])))


def per_layer_outliers(layers: Mapping[str, Mapping[str, np.ndarray]],
                       token_mask: np.ndarray | None) -> dict[str, Any]:
    """Kurtosis and inf-norm of each layer's output (paper §5 definitions), plus median |x|.

    Returns:
      {'per_layer': [{'layer', 'kurtosis', 'inf_norm'}], 'median_abs': median |x| of the last
       layer's output over real tokens, 'first_token_max_abs', 'elsewhere_max_abs'}.
    """
    rows = []
    for name, layer in layers.items():
        x = jnp.asarray(layer["block_output"])
        where = None if token_mask is None else jnp.asarray(token_mask, bool)
        rows.append(dict(layer=int(name.split("_")[1]),
                         kurtosis=float(jnp.mean(kurtosis_per_sample(x, where=where))),
                         inf_norm=float(jnp.mean(inf_norm_per_sample(x, where=where)))))
    last = np.abs(next(reversed(layers.values()))["block_output"])
    real = np.ones(last.shape[:2], bool) if token_mask is None else token_mask.astype(bool)
    return dict(per_layer=rows, median_abs=float(np.median(last[real])),
                first_token_max_abs=float(last[:, 0].max()),
                elsewhere_max_abs=float(last[:, 1:][real[:, 1:]].max()))


def attention_heads(layers: Mapping[str, Mapping[str, np.ndarray]], tokens: Sequence[str],
                    token_mask: np.ndarray | None, top_k: int = 3) -> dict[str, Any]:
    """The heads that put the most attention on the first token (no-op candidates).

    Returns:
      {'tokens': tokens of sequence 0, 'first_token_share': mean share per layer,
       'heads': top_k [{'layer', 'head', 'first_token_share', 'probs' (T, T) of sequence 0}]}.
    """
    shares = []
    for name, layer in layers.items():
        probs = layer["attention_probs"]  # (B, H, T, T)
        weight = (np.ones(probs.shape[0:1] + probs.shape[2:3]) if token_mask is None
                  else token_mask.astype(float))  # queries (B, T)
        weight = weight.copy()
        weight[:, 0] = 0.0  # query 0 of a causal model can only see token 0
        share = (probs[..., 0] * weight[:, None]).sum((0, 2)) / weight.sum()
        shares += [(float(s), int(name.split("_")[1]), h) for h, s in enumerate(share)]
    shares.sort(reverse=True)
    heads = []
    layer_list = list(layers.values())
    length = len(tokens)
    for share, layer_idx, head in shares[:top_k]:
        probs = layer_list[layer_idx]["attention_probs"][0, head, :length, :length]
        heads.append(dict(layer=layer_idx, head=head, first_token_share=share,
                          probs=np.round(probs, 4).tolist()))
    per_layer = {}
    for share, layer_idx, _ in shares:
        per_layer.setdefault(layer_idx, []).append(share)
    return dict(tokens=list(tokens), heads=heads,
                first_token_share={k: float(np.mean(v)) for k, v in sorted(per_layer.items())})


def gate_distribution(layers: Mapping[str, Mapping[str, np.ndarray]], max_values: int = 4000,
                      seed: int = 0) -> dict[str, Any] | None:
    """Gate values per layer (a random subsample), or None for ungated models."""
    rng = np.random.default_rng(seed)
    per_layer = []
    for name, layer in layers.items():
        if "gate_values" not in layer:
            return None
        values = layer["gate_values"].ravel()
        if values.size > max_values:
            values = rng.choice(values, max_values, replace=False)
        per_layer.append(dict(layer=int(name.split("_")[1]), mean=float(values.mean()),
                              values=np.round(values, 4).tolist()))
    return dict(per_layer=per_layer)


def outlier_channels(layers: Mapping[str, Mapping[str, np.ndarray]],
                     token_mask: np.ndarray | None, top_k: int = 8) -> dict[str, Any]:
    """Top channels of the last layer's output by max |x|, and where (which positions) they fire.

    Returns:
      {'top': [{'channel', 'max_abs', 'argmax_position'}], 'position_max_abs': (T,) max over
       the top channels and the batch of |x| at each position}.
    """
    x = np.abs(next(reversed(layers.values()))["block_output"])  # (B, T, d)
    if token_mask is not None:
        x = x * token_mask[..., None]
    channel_max = x.max(axis=(0, 1))
    top = np.argsort(channel_max)[::-1][:top_k]
    position_of = x[..., top].max(axis=0).argmax(axis=0)
    return dict(top=[dict(channel=int(c), max_abs=float(channel_max[c]),
                          argmax_position=int(p)) for c, p in zip(top, position_of)],
                position_max_abs=x[..., top].max(axis=(0, 2)).tolist())


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One unambiguous label per token id: specials by name ([CLS], [SEP], [PAD], [UNK],
    [MASK]), other ids decoded (a newline or blank shown escaped), '<id N>' when an id decodes to
    nothing; a real '?' stays '?'."""
    names = {}
    for name in ("cls", "sep", "pad", "unk", "mask"):
        special = getattr(tokenizer, f"{name}_id", None)
        if special is not None:
            names[int(special)] = f"[{name.upper()}]"
    labels = []
    for i in ids:
        i = int(i)
        if i in names:
            labels.append(names[i])
            continue
        text = tokenizer.decode([i])
        labels.append(repr(text)[1:-1] if text.strip() != text or not text.isprintable()
                      else text or f"<id {i}>")
    return labels
