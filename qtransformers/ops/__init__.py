"""Pure jnp math: softmax variants, attention, gates (no Flax)."""
from qtransformers.ops.attention import (attention_context, attention_dropout, attention_fn,
                                         attention_scores, causal_mask, combine_masks)
from qtransformers.ops.gates import (GATE_VARIANTS, apply_gate, gate_bias_from_pi,
                                     gate_param_count, per_head_linear_gate, per_head_mlp_gate)
from qtransformers.ops.softmax import (SOFTMAX_VARIANTS, clipped_softmax, gamma_from_alpha,
                                       get_softmax_fn, sink_softmax, softmax, softmax1, softpick)
from qtransformers.ops.blocked_attention import blocked_attention
from qtransformers.ops.fused_attention import FUSED_VARIANTS, fused_attention
from qtransformers.ops.metrics import (aggregate_outlier_metrics, excess_kurtosis_per_sample,
                                       inf_norm_per_sample, kurtosis_per_sample,
                                       per_channel_max_abs)
from qtransformers.ops.quant import (candidate_ranges, fake_quant, fake_quant_per_channel,
                                     fake_quant_per_token, mse_losses, mse_range_search)
