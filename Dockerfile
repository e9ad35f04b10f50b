# megatron-glm on NVIDIA's PyTorch container: CUDA torch, NCCL, Triton, apex and an MPI come with the image.
# Layers from the least to the most often changed: pinned dependencies, then the package itself.
# Versions come from constraints.txt, the lock the test suite runs with (tests/test_image.py holds them to it).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

# DeepSpeed builds its CUDA ops just in time; tokenizers' own threads fight the data-loader workers.
# (DL3064 reads "TOKEN" in TOKENIZERS_PARALLELISM as a secret.)
# hadolint ignore=DL3064
ENV DS_BUILD_OPS=0 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1

# glm-pretrain's dependencies at the versions the test suite passed with (constraints.txt, the one list), beside the
# image's own CUDA torch, Triton and the numpy they were built with (pip keeps those: they satisfy setup.py)
COPY constraints.txt /tmp/constraints.txt
RUN grep -vE '^(torch|triton|numpy)==' /tmp/constraints.txt > /tmp/image-constraints.txt \
    && pip install -c /tmp/image-constraints.txt \
        deepspeed sentencepiece tokenizers safetensors huggingface_hub \
        orjson zstandard tqdm wandb nltk rouge-score

# mpi4py compiled against the image's own MPI (mpirun launches), not a wheel that brings another one
RUN pip install -c /tmp/image-constraints.txt --no-binary=mpi4py mpi4py \
    && python -c "from mpi4py import MPI; print('MPI:', MPI.Get_library_version().splitlines()[0])"

WORKDIR /workspace/megatron-glm
COPY setup.py README.md ./
COPY megatron_glm ./megatron_glm
COPY kernels ./kernels
COPY data_prep ./data_prep
COPY launchers ./launchers
COPY benchmarks ./benchmarks
# --no-deps: everything it needs is above; a resolver run here could swap the image's CUDA torch
RUN pip install --no-deps . \
    && python -c "from megatron_glm.optional import apex_available; print('apex:', apex_available())"

CMD ["bash"]
