"""The trainer's side of the data layer: tokenizer, iterators, fixed-size eval batches.

The data layer (qtransformers.data) yields numpy batches of this process's rows:
  text  {'input_ids', 'attention_mask', 'targets', 'weights'} (+ 'token_type_ids' for MLM),
        CLM targets already shifted (targets[t] = input_ids[t + 1]), weights (B, T);
  image {'image', 'label', 'label_probs', 'weights'}, weights (B,) 0 for padding rows.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qtransformers.train import mesh as mesh_lib


def data_module() -> Any:
    """qtransformers.data (imported lazily: it pulls in tokenizers and TFDS)."""
    import qtransformers.data as data
    return data


def default_data_config() -> ml_collections.ConfigDict:
    """The data layer's default config section."""
    return data_module().default_data_config()


def validate_data_config(cfg: ml_collections.ConfigDict, check_paths: bool = True) -> None:
    """The data layer's validation (raises on a bad data config, e.g. a missing path)."""
    data_module().validate_data_config(cfg, check_paths)


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str | None) -> Any:
    """The tokenizer of a text config (the 'word' vocabulary is cached in workdir), else None."""
    if config.data.objective == "image":
        return None
    return data_module().build_tokenizer(config.data, workdir)


def data_vocab_size(config: ml_collections.ConfigDict, workdir: str | None = None) -> int | None:
    """The tokenizer's vocabulary size for text objectives, None for images."""
    if config.data.objective == "image":
        return None
    return int(data_module().vocab_size(config.data, workdir))


def train_iterator(config: ml_collections.ConfigDict, tokenizer: Any = None,
                   workdir: str | None = None) -> Any:
    """This process's training iterator, with get_state() / set_state() for resumption."""
    return data_module().make_train_iterator(
        config.data, global_batch_size=config.train.global_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        seed=config.data.seed, workdir=workdir, tokenizer=tokenizer)


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads every array to `rows` rows with zeros (weights 0, so padded rows do not count);
    image batches without 'weights' get ones for their real rows."""
    out = {k: np.asarray(v) for k, v in batch.items()}
    n = next(iter(out.values())).shape[0]
    if "image" in out and "weights" not in out:
        out["weights"] = np.ones((n,), np.float32)
    if n == rows:
        return out
    if n > rows:
        raise ValueError(f"an eval batch has {n} rows, more than train.eval_batch_size={rows}.")
    padded = {}
    for key, value in out.items():
        pad = np.zeros((rows - n,) + value.shape[1:], value.dtype)
        if key == "attention_mask":
            pad[:, :1] = 1  # keep one attended position: no fully masked softmax row
        padded[key] = np.concatenate([value, pad])
    return padded


def eval_batches(config: ml_collections.ConfigDict, num_batches: int, mesh: jax.sharding.Mesh,
                 tokenizer: Any = None, workdir: str | None = None, batch_size: int = 0
                 ) -> Iterator[dict[str, jax.Array]]:
    """Up to `num_batches` (0 = all) global evaluation batches of `batch_size` rows (0 =
    train.eval_batch_size, itself 0 = the global batch; padding rows carry weight 0), from a
    fresh, ordered evaluation iterator."""
    global_rows = (batch_size or config.train.eval_batch_size
                   or config.train.global_batch_size)
    local_rows = global_rows // jax.process_count()
    kwargs = {} if config.data.objective == "image" else {"tokenizer": tokenizer}
    iterator = data_module().make_eval_iterator(
        config.data, batch_size=global_rows, process_index=jax.process_index(),
        process_count=jax.process_count(), workdir=workdir, **kwargs)
    try:
        for index, batch in enumerate(iterator):
            if num_batches and index >= num_batches:
                break
            yield mesh_lib.global_batch(pad_rows(batch, local_rows), mesh,
                                        config.mesh.logical_axis_rules, global_rows)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


def valid_rows(batch: Mapping[str, jax.Array]) -> jax.Array:
    """(B,) 1.0 for real rows of a (padded) eval batch: images by their weight, text rows by
    attending to more than the one position a padding row keeps."""
    if "image" in batch:
        return (batch["weights"] > 0).astype(jnp.float32)
    return (jnp.sum(batch["attention_mask"], axis=-1) > 1).astype(jnp.float32)
