"""Pretraining: the loop, the DeepSpeed engine, checkpoints, learning-rate schedule, metrics."""
