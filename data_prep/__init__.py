"""Corpus CLIs (installed as ``megatron_glm.data_prep``): preprocess, tokenizer training, merge."""

if __name__ != "megatron_glm.data_prep":  # imported as a bare `data_prep` from the checkout's root
    from megatron_glm.bare_names import hand_on

    hand_on(__name__, __file__)
