"""glm-convert: move checkpoints between layouts and formats (see ``cli``).

Every conversion goes through one whole model in single-process names (the original GLM's
parameter names): readers produce it from a megatron-glm checkpoint (any TP x PP, ZeRO
partitions consolidated), an original THUDM/GLM checkpoint or a Hugging Face style folder;
it is checked against the architecture; writers cut it for a target layout or save it.
"""
