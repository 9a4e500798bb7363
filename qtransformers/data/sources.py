"""Random-access example sources: TFDS datasets (no TensorFlow) and synthetic images.

TFDS: `tfds.data_source(name, split=...)` reads prepared ArrayRecord files with random access and
needs no TensorFlow (prepare the data once elsewhere with
`tfds build NAME --file_format=array_record --data_dir=DIR`, and point data.tfds_data_dir at
DIR; gs:// works, see docs/scaling.md). Each process opens the whole split and reads only the
records its rows need (see indexing.py) — equivalent to `tfds.split_for_jax_process` for
disjointness but keeps the global order independent of the process count, and works under
`tfds.testing.mock_data`, which ignores split slicing.

Every source here is a sequence: `len(src)` and `src[i]` -> str (text) or (uint8 HWC image,
int label).
"""
from __future__ import annotations

import re
from typing import Any

import ml_collections
import numpy as np

# TFDS feature that holds the text, by dataset (the name before any '/' or ':').
TEXT_FEATURES = {
    "wikipedia": "text", "wiki40b": "text", "c4": "text", "lm1b": "text",
    "tiny_shakespeare": "text", "imdb_reviews": "text", "pg19": "book_text",
    "scientific_papers": "article", "cnn_dailymail": "article", "wikitext": "text",
}
IMAGE_FEATURES = {  # (image feature, label feature)
    "imagenet2012": ("image", "label"), "imagenette": ("image", "label"),
    "imagenet_v2": ("image", "label"), "cifar10": ("image", "label"),
    "cifar100": ("image", "label"), "mnist": ("image", "label"),
    "fashion_mnist": ("image", "label"), "oxford_flowers102": ("image", "label"),
}
_WIKI40B_MARKERS = re.compile(r"^_START_(ARTICLE|SECTION|PARAGRAPH)_$", re.MULTILINE)


def base_name(tfds_name: str) -> str:
    """'wiki40b/en:1.3.0' -> 'wiki40b'."""
    return tfds_name.split("/")[0].split(":")[0]


class TFDSNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not prepared in data.tfds_data_dir, or only in a format without random
    access (tfrecord): `tfds.data_source` needs ArrayRecord files."""


def tfds_build_command(cfg: ml_collections.ConfigDict) -> str:
    """The `tfds build` command line that prepares `cfg`'s dataset for `tfds.data_source`."""
    data_dir = cfg.tfds_data_dir or "~/tensorflow_datasets"
    return f"tfds build {cfg.tfds_name} --file_format=array_record --data_dir={data_dir}"


def _diagnose(tfds: Any, cfg: ml_collections.ConfigDict) -> str:
    """Why `tfds.data_source` failed, when the builder tells: not prepared / wrong format."""
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir or None)
        if not builder.is_prepared():
            return (f"it is not prepared in {builder.data_dir} (no dataset_info.json there); "
                    "training never downloads or prepares datasets itself")
        formats = {f.value for f in builder.info.available_file_formats()}
        random_access = {f.value for f in tfds.core.FileFormat.with_random_access()}
        if not formats & random_access:
            prepared = ", ".join(sorted(formats)) or "an unknown format"
            return (f"it is prepared in {builder.data_dir} as {prepared} only, but training "
                    "reads records by index (tfds.data_source), which needs array_record "
                    "(or parquet) files; prepare it again into another data_dir, or "
                    "convert it with `tfds convert_format --dataset_version_dir="
                    f"{builder.data_dir} --out_file_format=array_record`")
    except Exception:  # noqa: BLE001 - the original error below says the rest
        pass
    return ""


def open_tfds(cfg: ml_collections.ConfigDict, split: str) -> Any:
    """The TFDS data source of `split` (random access, len); clear errors when it is missing.

    Never downloads or prepares: on a multi-host pod every host would do it at once. Prepare
    the dataset once (`tfds_build_command(cfg)`, on a machine with TensorFlow) and point
    data.tfds_data_dir at it.

    Raises:
      TFDSNotPreparedError: the dataset, split or format is not there (the message names the
        `tfds build ... --file_format=array_record` command).
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(cfg.tfds_name, split=split, data_dir=cfg.tfds_data_dir or None,
                                download=False)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError ...)
        reason = _diagnose(tfds, cfg)
        raise TFDSNotPreparedError(
            f"data.tfds_name={cfg.tfds_name!r} split={split!r} could not be opened from "
            f"data.tfds_data_dir={cfg.tfds_data_dir or '(TFDS default)'!r}"
            + (f": {reason}" if reason else "")
            + f". Prepare it once as ArrayRecord on a machine with TensorFlow: "
            f"`{tfds_build_command(cfg)}` (then copy it or point data.tfds_data_dir at it, "
            f"gs:// works), or fix the name / split / data_dir. ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''})") from e


def text_feature(cfg: ml_collections.ConfigDict) -> str:
    """The configured text feature, or the dataset's default (TEXT_FEATURES, else 'text')."""
    return cfg.text_feature or TEXT_FEATURES.get(base_name(cfg.tfds_name), "text")


def image_features(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
    """The configured (image, label) features, or the dataset's defaults."""
    image, label = IMAGE_FEATURES.get(base_name(cfg.tfds_name), ("image", "label"))
    return cfg.image_feature or image, cfg.label_feature or label


def clean_text(dataset: str, text: str | bytes) -> str:
    """Decode TFDS text and strip dataset markup (wiki40b's _START_*_ / _NEWLINE_ markers)."""
    if isinstance(text, (bytes, np.bytes_)):
        text = text.decode("utf-8", errors="replace")
    text = str(text)
    if dataset == "wiki40b":
        text = _WIKI40B_MARKERS.sub("", text.replace("_NEWLINE_", "\n"))
    return text


class TFDSTexts:
    """Documents of a TFDS text dataset: `texts[i]` -> str (may hold several lines)."""

    def __init__(self, cfg: ml_collections.ConfigDict, split: str) -> None:
        self.source = open_tfds(cfg, split)
        self.feature = text_feature(cfg)
        self.dataset = base_name(cfg.tfds_name)
        if len(self.source) and self.feature not in self.source[0]:
            raise ValueError(f"data.text_feature={self.feature!r} is not a feature of "
                             f"{cfg.tfds_name!r}; it has {sorted(self.source[0])}.")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        return clean_text(self.dataset, self.source[int(i)][self.feature])


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8, copy=False))


class TFDSImages:
    """Examples of a TFDS image dataset: `images[i]` -> (uint8 (H, W, 3), int label)."""

    def __init__(self, cfg: ml_collections.ConfigDict, split: str) -> None:
        self.source = open_tfds(cfg, split)
        self.image_key, self.label_key = image_features(cfg)
        if len(self.source):
            keys = sorted(self.source[0])
            wanted = (("image_feature", self.image_key), ("label_feature", self.label_key))
            for field, key in wanted:
                if key not in keys:
                    raise ValueError(f"data.{field}={key!r} is not a feature of "
                                     f"{cfg.tfds_name!r}; it has {keys}.")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        ex = self.source[int(i)]
        return as_rgb(ex[self.image_key]), int(ex[self.label_key])


    @property
    def num_classes(self) -> int:
        """Classes of the label feature, from the dataset's info."""
        return int(self.source.dataset_info.features[self.label_key].num_classes)


def tfds_num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the label feature of a TFDS image dataset (from its info)."""
    return TFDSImages(cfg, cfg.tfds_split).num_classes


class SyntheticImages:
    """Generated images a small model can learn: label = index mod num_classes; each class has its
    own colour and stripe frequency, plus per-image noise. `images[i]` -> (uint8 (S, S, 3), label).

    Training uses indices [0, size); evaluation [size, size + size // 4) (disjoint images).
    """

    def __init__(self, size: int, num_classes: int, image_size: int, offset: int = 0) -> None:
        self.size, self.num_classes, self.offset = size, num_classes, offset
        self.image_size = image_size
        palette_rng = np.random.default_rng(1234)
        self.palette = palette_rng.uniform(40, 215, size=(num_classes, 3))
        self.freq = palette_rng.integers(1, 5, size=num_classes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        index = int(i) + self.offset
        label = index % self.num_classes
        rng = np.random.default_rng([0x51, index])
        s = self.image_size
        stripes = 30.0 * np.sin(np.arange(s) * 2 * np.pi * self.freq[label] / s)[None, :, None]
        image = self.palette[label] + stripes + rng.normal(0.0, 20.0, size=(s, s, 3))
        return np.clip(image, 0, 255).astype(np.uint8), label
