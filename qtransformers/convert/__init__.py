"""Weight conversion from HuggingFace transformers (BERT / OPT / ViT) to qtransformers.

    config, params = load_hf("path/to/save_pretrained_folder")
    logits = build_model(config).apply({"params": params}, input_ids, attention_mask)
"""
from qtransformers.convert.hf_config import config_from_hf, detect_family
from qtransformers.convert.hf_load import load_hf, read_hf_folder, read_state_dict
from qtransformers.convert.sentence_transformers import (EncoderFolder, EncoderTokenizer,
                                                        describe_encoder_folder, folder_kind,
                                                        load_encoder)
from qtransformers.convert.hf_params import (FAMILIES, abstract_params, canonical_key,
                                             params_from_hf_state_dict, weight_map)

__all__ = [
    "EncoderFolder", "EncoderTokenizer", "describe_encoder_folder", "folder_kind", "load_encoder",
    "FAMILIES", "abstract_params", "canonical_key", "config_from_hf", "detect_family",
    "load_hf", "params_from_hf_state_dict", "read_hf_folder", "read_state_dict", "weight_map",
]
