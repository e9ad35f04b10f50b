# megatron-glm on NVIDIA's PyTorch container: CUDA torch, NCCL, Triton and apex come with the image.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

# DeepSpeed builds its CUDA ops just in time; mpi4py for mpirun launches; wandb for logging.
ENV DS_BUILD_OPS=0 \
    TOKENIZERS_PARALLELISM=false
RUN pip install --no-cache-dir deepspeed mpi4py wandb

WORKDIR /workspace/megatron-glm
COPY . .
# The image's torch satisfies torch>=2.4, so pip keeps it (no CPU wheel replaces the CUDA build).
RUN pip install --no-cache-dir -e ".[test]" \
    && python -c "from megatron_glm.optional import apex_available; print('apex:', apex_available())"

CMD ["bash"]
