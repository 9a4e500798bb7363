"""qtransformers: pretrain transformers that quantize well, and measure how well they quantize.

Implements Bondarenko, Nagel, Blankevoort (NeurIPS 2023), "Quantizable Transformers: Removing
Outliers by Helping Attention Heads Do Nothing": clipped softmax and gated attention.
"""
from qtransformers.models import (BertForMaskedLM, ModelConfig, OptForCausalLM,
                                  VitForImageClassification, build_model, get_model_config)
from qtransformers.convert import config_from_hf, load_hf, params_from_hf_state_dict
from qtransformers.nn import Attention, AttentionGate, NnxAttention, QuantPoint
from qtransformers.ops import (attention_fn, blocked_attention, clipped_softmax, gamma_from_alpha,
                               sink_softmax, softmax1, softpick)

__version__ = "0.1.0"
from qtransformers.evaluate import collect_outlier_metrics, outlier_eval_fn
from qtransformers.quant import (QuantConfig, calibrate, evaluate_ptq, get_preset, make_eval_fn,
                                 make_quantized_eval_fn, quantize_params)
from qtransformers import evals  # noqa: E402  (evaluator registry: qt.evals.build_evaluators)
from qtransformers.models.tasks import Task, get_task, register_task  # noqa: E402
from qtransformers.train.checkpointing import RestoredRun, restore_run  # noqa: E402
