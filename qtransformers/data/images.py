"""Image classification preprocessing in numpy + Pillow: crops, flips, normalisation, Mixup, CutMix.

Training (per image, random numbers from (seed, global example index)): Inception-style random
resized crop (area in crop_scale, aspect ratio in crop_ratio, log-uniform; 10 tries, then a
centre crop), resize to image_size (Pillow bilinear with antialiasing), horizontal flip with
p = 0.5, optional RandAugment-lite (augment.py), normalise to float32 (x / 255 - mean) / std.
Evaluation: resize the short side to image_size / eval_crop_fraction, centre crop, normalise.

Mixup / CutMix (timm-style, "pair" mode): rows 2i and 2i+1 of a batch are mixed with each other
with one lambda ~ Beta(alpha, alpha) per pair, keyed by the pair's global index, so the mix does
not depend on how the global batch is split over processes (a process holds whole pairs when its
batch is even). With both on, CutMix is used with probability switch_prob. A pair is mixed with
probability mix_prob. CutMix's lambda is corrected to the pasted box's true area. Labels become
soft: label_probs = lam * onehot(a) + (1 - lam) * onehot(b), after label smoothing.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np

from qtransformers.data.augment import rand_augment
from qtransformers.data.indexing import TAG_MIX, example_rng


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with matplotlib, a dependency
        raise ImportError("image preprocessing needs Pillow: pip install pillow") from e
    return Image


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3), bilinear (antialiased when shrinking)."""
    if image.shape[:2] == (height, width):
        return image
    img = _pil().fromarray(image)
    return np.asarray(img.resize((width, height), resample=_pil().BILINEAR))


def random_crop_box(height: int, width: int, rng: np.random.Generator,
                    scale: tuple[float, float], ratio: tuple[float, float]
                    ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop (torchvision's algorithm)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the largest centre crop with a ratio in range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (H, W, 3): (x / 255 - mean) / std."""
    x = image.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def train_image(image: np.ndarray, rng: np.random.Generator,
                cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Training view of uint8 (H, W, 3) -> float32 (S, S, 3), S = cfg.image_size."""
    aug, size = cfg.augment, cfg.image_size
    h, w = image.shape[:2]
    if aug.random_resized_crop:
        top, left, ch, cw = random_crop_box(h, w, rng, tuple(aug.crop_scale), tuple(aug.crop_ratio))
        image = image[top: top + ch, left: left + cw]
    image = resize(image, size, size)
    if aug.hflip and rng.random() < 0.5:
        image = image[:, ::-1]
    if aug.randaugment_num_ops > 0:
        image = rand_augment(np.ascontiguousarray(image), rng, aug.randaugment_num_ops,
                             aug.randaugment_magnitude)
    return normalize(image, cfg.image_mean, cfg.image_std)


def eval_image(image: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Evaluation view of uint8 (H, W, 3) -> float32 (S, S, 3): short-side resize, centre crop."""
    size = cfg.image_size
    h, w = image.shape[:2]
    short = max(size, round(size / cfg.eval_crop_fraction))
    if h <= w:
        nh, nw = short, max(size, round(w * short / h))
    else:
        nh, nw = max(size, round(h * short / w)), short
    image = resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return normalize(image[top: top + size, left: left + size], cfg.image_mean, cfg.image_std)


def soft_labels(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """int (B,) labels -> float32 (B, C) one-hot with label smoothing (mass spread over all C)."""
    out = np.full((len(labels), num_classes), smoothing / num_classes, np.float32)
    out[np.arange(len(labels)), labels] += 1.0 - smoothing
    return out


def _cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator
                ) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box of area ~ (1 - lam) at a uniform centre, clipped (timm)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, height),
            max(cx - cw // 2, 0), min(cx + cw // 2, width))


def mix_pairs(images: np.ndarray, label_probs: np.ndarray, first_index: int, seed: int,
              aug: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Mixup / CutMix of rows (2i, 2i+1) of float32 images (B, H, W, 3) and label_probs (B, C).

    `first_index` is the global example index of row 0 (even). Returns new arrays.
    """
    images, label_probs = images.copy(), label_probs.copy()
    use_mixup, use_cutmix = aug.mixup_alpha > 0, aug.cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return images, label_probs
    height, width = images.shape[1:3]
    for a in range(0, len(images) - 1, 2):
        b = a + 1
        rng = example_rng(seed, TAG_MIX, (first_index + a) // 2)
        if rng.random() >= aug.mix_prob:
            continue
        cutmix = use_cutmix and (not use_mixup or rng.random() < aug.switch_prob)
        lam = float(rng.beta(aug.cutmix_alpha, aug.cutmix_alpha) if cutmix
                    else rng.beta(aug.mixup_alpha, aug.mixup_alpha))
        if cutmix:
            y0, y1, x0, x1 = _cutmix_box(height, width, lam, rng)
            patch_a = images[a, y0:y1, x0:x1].copy()
            images[a, y0:y1, x0:x1] = images[b, y0:y1, x0:x1]
            images[b, y0:y1, x0:x1] = patch_a
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        else:
            images[a], images[b] = (lam * images[a] + (1 - lam) * images[b],
                                    lam * images[b] + (1 - lam) * images[a])
        pa, pb = label_probs[a].copy(), label_probs[b].copy()
        label_probs[a], label_probs[b] = lam * pa + (1 - lam) * pb, lam * pb + (1 - lam) * pa
    return images, label_probs
