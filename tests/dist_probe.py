"""Started by a launcher (torchrun, mpiexec, a simulated srun): joins TP=2 and reports what it found."""

import json
import sys

import torch
import torch.distributed as dist

from megatron_glm.parallel import state

launch = state.initialize_model_parallel(tp=int(sys.argv[1]))
x = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(x, group=state.get_tensor_model_parallel_group())
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(
        {
            "source": launch.source,
            "rank": launch.rank,
            "world": launch.world_size,
            "local_rank": launch.local_rank,
            "tp_rank": state.get_tensor_model_parallel_rank(),
            "dp_rank": state.get_data_parallel_rank(),
            "sum": float(x),
        },
        f,
    )
dist.barrier()
dist.destroy_process_group()
