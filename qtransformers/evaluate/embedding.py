"""The sentence-embedding task: inverse-cloze retrieval on Wikipedia summaries, FP vs quantized.

    task = EmbeddingTask.from_wikipedia(tokenizer, num_articles=1000)
    fp = task.embed(model, params)                       # {'queries': (N, d), 'documents': (N, d)}
    result = task.evaluate_config(model, params, get_preset("w8a8_bert"), fp=fp)
    result["metrics"]["recall@1"], result["cosine"]["p5"]

Retrieval (inverse cloze): query i = the first sentence of article i's summary, document i = the
rest of it (data.wikipedia.inverse_cloze_pairs); every query is scored against every document by
the cosine of their embeddings. rank_i = 1 + #{documents scoring strictly higher than document
i}; recall@k = mean(rank_i <= k), MRR = mean(1 / rank_i).
Cosine FP vs quantized: for every text (queries and documents) the cosine between its
full-precision and its quantized embedding; mean and 5th percentile (np.percentile, linear).

Quantization (paper.md §4) as in quant/: weights fake-quantized by quantize_params, activations
at every QuantPoint with static per-tensor ranges (sequential calibration on texts of the
*training* split of the summaries, padding excluded from the statistics) or dynamic per-token
ranges (QuantConfig.act_granularity='per_token', no calibration). The pooling runs on the
(quantized) last LayerNorm output in full precision.

This module is the whole task: its inputs, metrics, headline metric and direction, and default
PTQ preset, so that a Task registry can take it as one object.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.convert.sentence_transformers import pad_ids
from qtransformers.nn.quant_point import QRANGES, QuantContext, quant_context
from qtransformers.quant.calibrate import calibrate_fn, token_mask_of
from qtransformers.quant.config import QuantConfig
from qtransformers.quant.params import quantize_params

BUCKETS = (16, 32, 64, 128, 256, 512)  # padded lengths (few shapes: few compilations)
RECALL_AT = (1, 10)


@dataclasses.dataclass(frozen=True)
class EncoderApply:
    """Hashable ApplyFn of a sentence encoder: (variables, batch, mutable) -> (emb, cols)."""

    model: nn.Module

    def __call__(self, variables: Mapping[str, Any], batch: Mapping[str, Any],
                 mutable: list) -> tuple[Any, Any]:
        token_type_ids = batch.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(batch["input_ids"])
        return self.model.apply(variables, batch["input_ids"], batch["attention_mask"],
                                token_type_ids, deterministic=True, mutable=mutable)


def bucket_length(n: int, max_length: int) -> int:
    """The smallest BUCKETS length >= n (capped at max_length)."""
    return min(next((b for b in BUCKETS if b >= n), max_length), max_length)


def length_batches(ids: Sequence[np.ndarray], batch_size: int, pad_id: int, max_length: int
                   ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Texts sorted by length into (indices (b,), batch) pairs of at most batch_size rows, each
    padded to its bucket length; the last batch of a bucket is filled with copies of its first
    row (indices -1) so that every batch has batch_size rows."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = bucket_length(max(len(ids[i]) for i in idx), max_length)
        rows = [ids[i] for i in idx] + [ids[idx[0]]] * (batch_size - len(idx))
        batch = {"input_ids": np.full((batch_size, length), pad_id, np.int32),
                 "attention_mask": np.zeros((batch_size, length), np.int32)}
        for r, x in enumerate(rows):
            batch["input_ids"][r, :len(x)] = x[:length]
            batch["attention_mask"][r, :len(x)] = 1
        batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        out.append((np.concatenate([idx, -np.ones(batch_size - len(idx), int)]), batch))
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _embed_step(apply_fn: EncoderApply, ctx: QuantContext | None, params: Any, qranges: Any,
                batch: Mapping[str, Any]) -> jax.Array:
    variables = {"params": params}
    if qranges:
        variables[QRANGES] = qranges
    if ctx is None:
        return apply_fn(variables, batch, [])[0]
    with quant_context(ctx):
        return apply_fn(variables, batch, [])[0]


def embed_texts(model: nn.Module, params: Any, batches: Sequence[tuple[np.ndarray, dict]],
                num_texts: int, qranges: Any = None, config: QuantConfig | None = None
                ) -> np.ndarray:
    """(num_texts, d) float32 embeddings of pre-batched texts (see length_batches).

    config=None: full precision; else activations fake-quantized per config (static ranges
    from `qranges`, or per-token). Pass weight-quantized params for W*A*.
    """
    ctx = None if config is None else QuantContext(bits=config.act_bits,
                                                   granularity=config.act_granularity)
    apply_fn = EncoderApply(model)
    out = None
    for idx, batch in batches:
        emb = np.asarray(jax.device_get(_embed_step(apply_fn, ctx, params, qranges, batch)))
        if out is None:
            out = np.zeros((num_texts, emb.shape[-1]), np.float32)
        keep = idx >= 0
        out[idx[keep]] = emb[keep]
    if out is None:
        raise ValueError("no texts to embed")
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_ranks(queries: np.ndarray, documents: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(N,) rank of document i for query i among all N documents by cosine (1 = best; ties
    count in the query's favour: only strictly higher scores push it down)."""
    q, d = _unit(np.asarray(queries, np.float32)), _unit(np.asarray(documents, np.float32))
    ranks = np.empty(len(q), np.int64)
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ d.T
        own = scores[np.arange(len(scores)), np.arange(s, s + len(scores))]
        ranks[s:s + chunk] = 1 + np.sum(scores > own[:, None], axis=1)
    return ranks


def retrieval_metrics(queries: np.ndarray, documents: np.ndarray) -> dict[str, float]:
    """{'recall@1', 'recall@10', 'mrr', 'num_articles'} of the inverse-cloze retrieval."""
    ranks = retrieval_ranks(queries, documents)
    out = {f"recall@{k}": float(np.mean(ranks <= k)) for k in RECALL_AT}
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["num_articles"] = int(len(ranks))
    return out


def cosine_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Cosine between each row of `reference` and `other` ((N, d) each): mean, 5th percentile,
    min."""
    cos = np.sum(_unit(reference) * _unit(other), axis=-1)
    return {"mean": float(np.mean(cos)), "p5": float(np.percentile(cos, 5)),
            "min": float(np.min(cos))}


def config_label(config: QuantConfig) -> str:
    """'W8A8 per-tensor', 'W8A8 per-token' ..."""
    gran = "per-token" if config.act_granularity == "per_token" else "per-tensor"
    return f"W{config.weight_bits}A{config.act_bits} {gran}"


@dataclasses.dataclass
class EmbeddingTask:
    """Inverse-cloze retrieval + FP / quantized embedding agreement (see module docstring).

    Attributes:
      titles, queries, documents: the evaluated articles (one pair each).
      calibration_texts: texts the activation ranges are calibrated on (training split).
      tokenizer: an EncoderTokenizer (convert.sentence_transformers).
      batch_size: texts per forward pass.
    """

    name = "embedding"
    headline_metric = "recall@1"
    higher_is_better = True
    default_preset = "w8a8_bert"

    titles: list[str]
    queries: list[str]
    documents: list[str]
    calibration_texts: list[str]
    tokenizer: Any
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.queries or len(self.queries) != len(self.documents):
            raise ValueError("the embedding task needs as many documents as queries (>= 1).")
        tok = self.tokenizer
        ids = tok.encode(list(self.queries) + list(self.documents))
        self._batches = length_batches(ids, self.batch_size, tok.pad_id, tok.max_length)
        self._calib_ids = tok.encode(list(self.calibration_texts))
        self.num_tokens = int(sum(len(x) for x in ids))

    @classmethod
    def from_wikipedia(cls, tokenizer: Any, num_articles: int = 0, eval_fraction: float = 0.1,
                       batch_size: int = 64) -> "EmbeddingTask":
        """Pairs of every multi-sentence summary (num_articles > 0: that many, the articles
        with the smallest sha1(title), a fixed pseudo-random sample); calibration texts: the
        queries and documents of the training split."""
        from qtransformers.data import wikipedia

        pairs = wikipedia.inverse_cloze_pairs(wikipedia.split_articles("all"))
        if num_articles > 0:
            pairs = sorted(pairs, key=lambda p: hashlib.sha1(p[0].encode()).hexdigest())
            pairs = sorted(pairs[:num_articles])
        calib = [t for _, q, d in wikipedia.inverse_cloze_pairs(
            wikipedia.split_articles("train", eval_fraction)) for t in (q, d)]
        return cls([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], calib,
                   tokenizer, batch_size)

    @property
    def num_texts(self) -> int:
        return 2 * len(self.queries)

    def inputs(self) -> list[tuple[np.ndarray, dict]]:
        """The evaluation batches: (text indices, batch); queries first, then documents."""
        return self._batches

    def calibration_batches(self, seed: int, config: QuantConfig) -> list[dict[str, np.ndarray]]:
        """config.num_calibration_batches batches of calibration_batch_size random training
        texts (numpy generator seeded by `seed`)."""
        n = config.num_calibration_batches * config.calibration_batch_size
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(self._calib_ids), size=min(n, len(self._calib_ids)), replace=False)
        tok = self.tokenizer
        out = []
        for s in range(0, len(pick), config.calibration_batch_size):
            rows = [self._calib_ids[i] for i in pick[s:s + config.calibration_batch_size]]
            length = bucket_length(max(len(r) for r in rows), tok.max_length)
            out.append(pad_ids(rows, tok.pad_id, length))
        return out

    def embed(self, model: nn.Module, params: Any, qranges: Any = None,
              config: QuantConfig | None = None) -> dict[str, np.ndarray]:
        """{'queries': (N, d), 'documents': (N, d)} embeddings (FP when config is None)."""
        emb = embed_texts(model, params, self._batches, self.num_texts, qranges, config)
        n = len(self.queries)
        return {"queries": emb[:n], "documents": emb[n:]}

    def metrics(self, emb: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Retrieval metrics of one set of embeddings."""
        return retrieval_metrics(emb["queries"], emb["documents"])

    def calibrate(self, model: nn.Module, qparams: Any, config: QuantConfig, seed: int = 0
                  ) -> Any:
        """Static per-tensor activation ranges (sequential calibration, padding excluded)."""
        return calibrate_fn(EncoderApply(model), qparams, self.calibration_batches(seed, config),
                            config, token_mask_fn=token_mask_of)

    def evaluate_config(self, model: nn.Module, params: Any, config: QuantConfig,
                        fp: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                        qranges: Any = None) -> dict[str, Any]:
        """Quantize per config (weights, then calibrate unless per-token or qranges given),
        embed, and compare: {'label', 'metrics', 'cosine', 'embeddings', 'qranges'}."""
        fp = fp if fp is not None else self.embed(model, params)
        qparams = quantize_params(params, config)
        if config.act_granularity == "per_tensor" and qranges is None:
            qranges = self.calibrate(model, qparams, config, seed)
        emb = self.embed(model, qparams, qranges if config.act_granularity == "per_tensor"
                         else None, config)
        both = lambda e: np.concatenate([e["queries"], e["documents"]])  # noqa: E731
        return {"label": config_label(config), "metrics": self.metrics(emb),
                "cosine": cosine_agreement(both(fp), both(emb)), "embeddings": emb,
                "qranges": qranges}
