"""Megatron-style model parallelism ("mpu"): process groups, mappings, parallel layers, RNG."""
