"""ViT for image classification (HuggingFace ViTForImageClassification layout)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.models.block import Encoder
from qtransformers.models.config import ModelConfig
from qtransformers.nn.layers import EMBED, LayerNormQ
from qtransformers.nn.partitioning import CLASSES, partitioned
from qtransformers.nn.quant_point import QuantPoint


class VitForImageClassification(nn.Module):
    """Patch embedding (+ optional LayerNorm, paper §2) -> [CLS] + positions -> pre-LN encoder
    -> final LayerNorm -> linear classifier on [CLS].

    Call: images (B, H, W, C) float -> logits (B, num_classes) float32.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"images of shape {images.shape[1:]} do not match the model's "
                             f"({cfg.image_size}, {cfg.image_size}, {cfg.num_channels}).")
        init = nn.initializers.truncated_normal(cfg.init_std)
        x = nn.Conv(cfg.d_model, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                    padding="VALID", name="patch_embeddings", dtype=cfg.compute_dtype,
                    kernel_init=partitioned(init, (None, None, None, EMBED)),
                    bias_init=partitioned(nn.initializers.zeros, (EMBED,)))(images)
        x = x.reshape(x.shape[0], -1, cfg.d_model)
        if cfg.patch_ln:
            x = LayerNormQ(cfg.ln_eps, cfg.compute_dtype, name="patch_ln")(x)
        cls = self.param("cls_token", partitioned(init, (None, None, EMBED)), (1, 1, cfg.d_model))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.d_model)).astype(x.dtype),
                             x], axis=1)
        positions = self.param("position_embeddings", partitioned(init, (None, None, EMBED)),
                               (1, cfg.num_patches + 1, cfg.d_model))
        x = QuantPoint(name="embeddings_sum")((x + positions).astype(cfg.compute_dtype))
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic)

        x = Encoder(cfg, causal=False, name="encoder")(x, None, deterministic)
        x = LayerNormQ(cfg.ln_eps, cfg.compute_dtype, name="final_ln")(x)
        return nn.Dense(cfg.num_classes, name="classifier",
                        kernel_init=partitioned(nn.initializers.zeros, (EMBED, CLASSES)),
                        bias_init=partitioned(nn.initializers.zeros, (CLASSES,)))(
                            x[:, 0].astype(jnp.float32))
