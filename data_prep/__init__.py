"""Corpus CLIs (installed as ``megatron_glm.data_prep``): preprocess, tokenizer training, merge."""
