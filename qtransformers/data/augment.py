"""RandAugment-lite (Cubuk et al. 2020) on uint8 images with Pillow.

`rand_augment` applies `num_ops` operations drawn uniformly (with replacement) from the 15 in OPS,
each at `magnitude` in 0..10 with a random sign where the op has one (timm's "rand-m9-n2"
corresponds to num_ops=2, magnitude=9). Ranges at magnitude 10: rotate 30 degrees, shear 0.3,
translate 45% of the side, colour / contrast / brightness / sharpness factor 1 +- 0.9,
solarize threshold 0, posterize 4 bits. Not implemented from timm: magnitude noise, op weights,
the "increasing" variants.
"""
from __future__ import annotations

import numpy as np

_FILL = (128, 128, 128)


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(img, matrix: tuple[float, ...]):
    from PIL import Image

    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


def _apply(name: str, img, m: float, rng: np.random.Generator):
    """Apply op `name` at relative magnitude m in [0, 1] to a PIL image."""
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    if name == "identity":
        return img
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "invert":
        return ImageOps.invert(img)
    if name == "rotate":
        return img.rotate(_signed(30.0 * m, rng), fillcolor=_FILL)
    if name == "solarize":
        return ImageOps.solarize(img, int(256 - 256 * m))
    if name == "posterize":
        return ImageOps.posterize(img, max(1, 8 - round(4 * m)))
    if name in ("color", "contrast", "brightness", "sharpness"):
        enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                    "brightness": ImageEnhance.Brightness,
                    "sharpness": ImageEnhance.Sharpness}[name]
        return enhancer(img).enhance(max(0.0, 1.0 + _signed(0.9 * m, rng)))
    if name == "shear_x":
        return _affine(img, (1, _signed(0.3 * m, rng), 0, 0, 1, 0))
    if name == "shear_y":
        return _affine(img, (1, 0, 0, _signed(0.3 * m, rng), 1, 0))
    if name == "translate_x":
        return _affine(img, (1, 0, _signed(0.45 * m * w, rng), 0, 1, 0))
    if name == "translate_y":
        return _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * m * h, rng)))
    raise ValueError(f"unknown RandAugment op {name!r}; use one of {', '.join(OPS)}.")


OPS = ("identity", "autocontrast", "equalize", "invert", "rotate", "solarize", "posterize",
       "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
       "translate_y")


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int,
                 magnitude: float) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3) after `num_ops` random ops at `magnitude` (0..10)."""
    from PIL import Image

    img = Image.fromarray(image)
    for i in rng.integers(0, len(OPS), size=num_ops):
        img = _apply(OPS[int(i)], img, magnitude / 10.0, rng)
    return np.asarray(img)
