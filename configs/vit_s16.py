"""ViT-S/16 on ImageNet-1k (paper.md §6): 300 epochs x 512, AdamW wd 0.03, lr 1e-3 cosine,
20 warmup epochs, RandAugment (2, 9), Mixup 0.8, CutMix 1.0, label smoothing 0.1 (timm / DeiT
defaults); no weight decay on biases, LayerNorm, the [CLS] token and position embeddings.

Usage: --config configs/vit_s16.py:method=clipped   (vanilla | clipped | gated)
Data: TFDS imagenet2012, prepared beforehand (tfds build needs the manual download).
"""
from qtransformers.train.config import base_config, parse_config_arg

IMAGENET_TRAIN_IMAGES = 1_281_167
BATCH = 512
STEPS_PER_EPOCH = IMAGENET_TRAIN_IMAGES // BATCH


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    args = parse_config_arg(arg, method="vanilla")
    config = base_config("vit_s16", args["method"])
    config.data.source = "tfds"
    config.data.tfds_name = "imagenet2012"
    config.data.objective = "image"
    config.data.image_size = 224
    config.data.augment.update(randaugment_num_ops=2, randaugment_magnitude=9, mixup_alpha=0.8,
                               cutmix_alpha=1.0, label_smoothing=0.1)
    config.optim.update(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.03,
                        no_decay=("*cls_token", "*position_embeddings"),
                        warmup_steps=20 * STEPS_PER_EPOCH, schedule="cosine", min_lr_ratio=0.01,
                        clip_norm=0.0)
    config.train.update(global_batch_size=BATCH, num_steps=300 * STEPS_PER_EPOCH, log_every=100,
                        eval_every=10 * STEPS_PER_EPOCH, eval_steps=0,
                        outlier_eval_every=50 * STEPS_PER_EPOCH, checkpoint_every=STEPS_PER_EPOCH,
                        compute_dtype="bfloat16")
    return config
