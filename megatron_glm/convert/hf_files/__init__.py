"""The files glm-convert export-hf copies beside the weights, for ``trust_remote_code=True``.

They import only torch, transformers and the tokenizer backends, never megatron_glm: an
export must load where this package is not installed. ``tests/test_hf_export.py`` holds
them to our model, tokenizer and glm-generate.
"""

FILES = (
    "configuration_megatron_glm.py",
    "modeling_megatron_glm.py",
    "tokenization_megatron_glm.py",
)
