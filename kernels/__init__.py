"""Fused kernels for GLM, each with a torch reference (installed as ``megatron_glm.kernels``).

The entry points are in ``ops`` and re-exported here: ``flash_attention`` (attention under the
interval mask, never building it), ``masked_softmax``, ``embedding_2d``, ``rotary_2d``
(and GLM-130B's ``rotary_1d``), with
``sdpa_attention``, ``softmax_attention`` and ``flex_attention`` as the other attention paths,
and ``set_backend``/``get_backend`` to force Triton or the reference.
"""

if __name__ == "megatron_glm.kernels":
    from megatron_glm.kernels.ops import (
        BACKENDS,
        embedding_2d,
        flash_attention,
        flex_attention,
        get_backend,
        masked_softmax,
        rotary_1d,
        rotary_2d,
        sdpa_attention,
        set_backend,
        softmax_attention,
    )

    __all__ = [
        "BACKENDS",
        "get_backend",
        "set_backend",
        "flash_attention",
        "flex_attention",
        "softmax_attention",
        "masked_softmax",
        "embedding_2d",
        "rotary_1d",
        "rotary_2d",
        "sdpa_attention",
    ]
else:  # imported as a bare `kernels` from the checkout's root: that name is Hugging Face's package
    from megatron_glm.bare_names import hand_on

    hand_on(__name__, __file__)
