"""The GLM model: embeddings with 2D positions, the interval-mask attention, generation."""
