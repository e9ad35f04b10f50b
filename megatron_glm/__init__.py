"""megatron-glm: GLM pretraining with Megatron-style parallelism.

Importing the package is cheap on purpose (no torch, no numpy): the CLIs answer
``--help`` without paying for heavy imports.
"""

__version__ = "0.1.0"
