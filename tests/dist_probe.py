"""Started by a launcher (torchrun, mpiexec, a simulated srun): joins TP=2 and reports what it found."""

import json
import sys

import torch
import torch.distributed as dist

from megatron_glm.parallel import state

launch = state.initialize_model_parallel(tp=int(sys.argv[1]) if len(sys.argv) > 1 else 2)
x = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(x, group=state.get_tensor_model_parallel_group())
print(json.dumps({"source": launch.source, "rank": launch.rank, "world": launch.world_size,
                  "local_rank": launch.local_rank, "tp_rank": state.get_tensor_model_parallel_rank(),
                  "dp_rank": state.get_data_parallel_rank(), "sum": float(x)}), flush=True)
dist.destroy_process_group()
