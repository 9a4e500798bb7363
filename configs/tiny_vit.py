"""A tiny ViT (2 layers, d 64, 32 px, patch 8) on synthetic class-coloured images (no download);
--config.data.source=tfds --config.data.tfds_name=cifar10 trains on a prepared CIFAR-10.
Usage: --config configs/tiny_vit.py:gated
"""
from qtransformers.train.config import base_config, parse_config_arg


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    args = parse_config_arg(arg, method="vanilla")
    config = base_config("vit_tiny", args["method"])
    config.data.source = "synthetic"
    config.data.objective = "image"
    config.data.image_size = 32
    config.data.num_classes = 10
    config.data.synthetic_size = 1024
    config.data.augment.update(random_resized_crop=False, hflip=True)
    config.optim.update(lr=1e-3, weight_decay=0.03, no_decay=("*cls_token",
                        "*position_embeddings"), warmup_steps=20, schedule="cosine",
                        clip_norm=1.0)
    config.train.update(global_batch_size=32, num_steps=200, log_every=20, eval_every=100,
                        eval_steps=4, eval_batch_size=32, outlier_eval_every=100,
                        outlier_eval_steps=2, checkpoint_every=100, keep_checkpoints=2)
    return config
