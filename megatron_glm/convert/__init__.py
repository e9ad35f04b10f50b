"""glm-convert: move checkpoints between layouts and formats (see ``cli``).

Every conversion streams one whole parameter at a time in single-process names (the original
GLM's parameter names): sources read it from a megatron-glm checkpoint (any TP x PP, ZeRO
partitions consolidated), an original THUDM/GLM checkpoint or a Hugging Face style folder; the
names and shapes are checked against the architecture before anything is written; writers cut
each parameter for a target layout, or write it, and drop it before the next.
"""
