"""What DeepSpeed holds per rank, by its partitioning arithmetic: ZeRO's model states, and the host
memory our build needs (``model/parallelize.py``). glm-plan's estimates and the dry run's
untraced part both come from here; the tests hold them to measured runs.
"""

from __future__ import annotations

from megatron_glm.training.engine import bucket_elements

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def setup_host_bytes(counts: dict, zero3_partitions: int = 0, device: str = "cuda") -> int:
    """Host memory a rank needs to build its weights (``model/parallelize.py``): its fp32 shard, plus
    one full fp32 tensor at a time, initialised and then sliced. Under ZeRO-3 (``zero3_partitions``:
    the data-parallel size) each parameter is partitioned as it is made: one full tensor, and the
    partitions where they live on the host (a CPU run)."""
    shard = counts["embedding"] + counts["other"]
    if zero3_partitions:
        kept = -(-shard // zero3_partitions) if device == "cpu" else 0
        return 4 * (kept + counts["largest_full"])
    return 4 * (shard + counts["largest_full"])


def model_states(
    params: int, precision: str, zero: int, dp: int, cpu_offload: bool = False
) -> dict:
    """Weights, gradients, optimizer and communication-buffer bytes for ``params`` elements on one rank.

    As DeepSpeed lays them out (Rajbhandari et al. 2020 for the partitioning):

    - Adam's two fp32 moments (8 bytes); mixed precision adds an fp32 master copy (4). Without
      ZeRO they exist in full on every rank, and the fp32 gradients of the step are a temporary.
    - ZeRO >= 1 keeps the fp32 master, the moments and an fp32 gradient partition per rank
      (``/dp``), even in fp32 training, plus a reduce bucket (``bucket_elements``).
    - ZeRO-2 also partitions the gradients; ZeRO-3 also the weights (gathered layer by layer).
    """
    e = BYTES[precision]
    mixed = precision != "fp32"
    part = -(-params // dp)
    weights = grads = e * params
    buffers = 0
    if zero == 0:
        optimizer = (4 + 8) * params if mixed else 8 * params
    else:
        optimizer = (4 + 8 + 4) * part
        buffers = e * bucket_elements(params)
    if zero >= 2:
        grads = e * part
    if zero == 3:
        # the gathered working set, one bucket's worth
        weights = e * part + e * bucket_elements(params)
    if cpu_offload:
        optimizer = 0
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "buffers": buffers}
