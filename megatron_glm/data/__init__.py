"""The data side: tokenizers, the indexed binary format, and training datasets."""
