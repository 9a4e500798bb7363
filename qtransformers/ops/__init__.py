"""Pure jnp math: softmax variants, attention, gates (no Flax)."""
from qtransformers.ops.attention import (attention_context, attention_dropout, attention_fn,
                                         attention_scores, causal_mask, combine_masks)
from qtransformers.ops.gates import (GATE_VARIANTS, apply_gate, gate_bias_from_pi,
                                     gate_param_count, per_head_linear_gate, per_head_mlp_gate)
from qtransformers.ops.softmax import (SOFTMAX_VARIANTS, clipped_softmax, gamma_from_alpha,
                                       get_softmax_fn, softmax, softmax1)
