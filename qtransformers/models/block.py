"""The one configurable transformer block (pre-LN or post-LN) and the encoder stack."""
from __future__ import annotations

import flax.linen as nn
import jax

from qtransformers.models.config import ModelConfig
from qtransformers.nn.attention import Attention
from qtransformers.nn.layers import MLP, LayerNormQ
from qtransformers.nn.partitioning import ACT_BATCH, ACT_EMBED, ACT_LENGTH, constrain
from qtransformers.nn.quant_point import QuantPoint


class TransformerBlock(nn.Module):
    """Attention + MLP with residuals; LayerNorm before (pre_ln) or after (post_ln) each.

    QuantPoints: "attention_residual" and "mlp_residual" (each residual sum, before its
    LayerNorm in post-LN), plus those inside Attention, MLP and the LayerNorms.
    Call: x (B, T, d_model), padding_mask (B, T) -> (B, T, d_model).
    """

    config: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        attention = Attention(cfg.num_heads, cfg.attention, self.causal,
                              kernel_init=nn.initializers.normal(cfg.init_std),
                              dtype=cfg.compute_dtype, name="attention")
        mlp = MLP(cfg.d_ff, cfg.activation, nn.initializers.normal(cfg.init_std),
                  cfg.compute_dtype, name="mlp")
        attention_ln = LayerNormQ(cfg.ln_eps, cfg.compute_dtype, name="attention_ln")
        mlp_ln = LayerNormQ(cfg.ln_eps, cfg.compute_dtype, name="mlp_ln")
        dropout = nn.Dropout(cfg.dropout_rate)

        if cfg.pre_ln:
            h = attention(attention_ln(x), padding_mask, deterministic=deterministic)
            x = QuantPoint(name="attention_residual")(x + dropout(h, deterministic))
            h = mlp(mlp_ln(x))
            x = QuantPoint(name="mlp_residual")(x + dropout(h, deterministic))
        else:
            h = attention(x, padding_mask, deterministic=deterministic)
            x = attention_ln(QuantPoint(name="attention_residual")(x + dropout(h, deterministic)))
            h = mlp(x)
            x = mlp_ln(QuantPoint(name="mlp_residual")(x + dropout(h, deterministic)))
        self.sow("intermediates", "block_output", x)
        return constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


class Encoder(nn.Module):
    """`num_layers` TransformerBlocks named layers_0 .. layers_{L-1}.

    Call: x (B, T, d_model), padding_mask (B, T) -> (B, T, d_model).
    """

    config: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        block_cls = TransformerBlock
        if self.config.remat:
            block_cls = nn.remat(TransformerBlock, static_argnums=(3,))
        for i in range(self.config.num_layers):
            x = block_cls(self.config, self.causal, name=f"layers_{i}")(x, padding_mask,
                                                                       deterministic)
        return x
