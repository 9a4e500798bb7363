"""Image classification pipelines (ViT): TFDS or synthetic images -> resumable batch iterators.

Batches: image float32 (B, S, S, 3) normalised, label int32 (B,) (with Mixup / CutMix: the
label of the row's own image, the larger share for lam > 0.5), label_probs float32 (B, C) soft
targets (label smoothing, Mixup / CutMix), weights float32 (B,) (0 for padding rows of the last
evaluation batch). Both train and eval are step-indexed (indexing.py): state {'step': k}.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from qtransformers.data.images import eval_image, mix_pairs, soft_labels, train_image
from qtransformers.data.indexing import TAG_IMAGE, example_rng
from qtransformers.data.iterators import Batch, DataIterator, IndexedBatches, state_checker
from qtransformers.data.sources import SyntheticImages, TFDSImages, tfds_num_classes


def num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Classes of the image dataset (synthetic: cfg.num_classes; TFDS: from its info)."""
    if cfg.source == "synthetic":
        return int(cfg.num_classes)
    return tfds_num_classes(cfg)


def _source(cfg: ml_collections.ConfigDict, train: bool) -> Any:
    if cfg.source == "synthetic":
        if train:
            return SyntheticImages(cfg.synthetic_size, cfg.num_classes, cfg.synthetic_image_size)
        return SyntheticImages(max(1, cfg.synthetic_size // 4), cfg.num_classes,
                               cfg.synthetic_image_size, offset=cfg.synthetic_size)
    return TFDSImages(cfg, cfg.tfds_split if train else cfg.eval_split)


def _iterator(cfg: ml_collections.ConfigDict, *, train: bool, global_batch_size: int,
              process_index: int, process_count: int, seed: int) -> DataIterator:
    source = _source(cfg, train)
    n_classes = source.num_classes
    smoothing = cfg.augment.label_smoothing if train else 0.0
    size = cfg.image_size

    def example(index: int, position: int) -> Batch:
        image, label = source[index]
        if not 0 <= label < n_classes:
            raise ValueError(f"example {index} has label {label} outside [0, {n_classes}).")
        pixels = (train_image(image, example_rng(seed, TAG_IMAGE, position), cfg) if train
                  else eval_image(image, cfg))
        return {"image": pixels, "label": np.int32(label),
                "label_probs": soft_labels(np.array([label]), n_classes, smoothing)[0],
                "weights": np.float32(1.0)}

    def pad() -> Batch:
        return {"image": np.zeros((size, size, 3), np.float32), "label": np.int32(0),
                "label_probs": np.zeros(n_classes, np.float32), "weights": np.float32(0.0)}

    def mix(batch: Batch, first_position: int) -> Batch:
        batch["image"], batch["label_probs"] = mix_pairs(batch["image"], batch["label_probs"],
                                                         first_position, seed, cfg.augment)
        return batch

    mixing = train and (cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0)
    batches = IndexedBatches(len(source), example, global_batch_size=global_batch_size,
                             process_index=process_index, process_count=process_count, seed=seed,
                             shuffle=cfg.shuffle and train, finite=not train,
                             num_workers=cfg.num_workers, pad_fn=pad,
                             post_fn=mix if mixing else None)
    fixed = {"kind": "indexed", "global_batch_size": global_batch_size, "seed": seed}
    return DataIterator(batches.stream, {**fixed, "step": 0}, prefetch=cfg.prefetch,
                        length=batches.num_batches, check_state=state_checker(fixed))


def image_train_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                         process_index: int, process_count: int, seed: int) -> DataIterator:
    """Endless augmented training batches of this process."""
    return _iterator(cfg, train=True, global_batch_size=global_batch_size,
                     process_index=process_index, process_count=process_count, seed=seed)


def image_eval_iterator(cfg: ml_collections.ConfigDict, *, batch_size: int, process_index: int,
                        process_count: int) -> DataIterator:
    """One ordered pass over the evaluation images (centre crops); len() = number of batches."""
    return _iterator(cfg, train=False, global_batch_size=batch_size, process_index=process_index,
                     process_count=process_count, seed=0)
