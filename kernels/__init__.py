"""Fused Triton kernels with their torch references (installed as ``megatron_glm.kernels``)."""
