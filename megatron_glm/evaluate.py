"""glm-eval: what a checkpoint can do, on a glm-pretrain checkpoint (any layout) or an export-hf folder.

  glm-eval --load CKPT --task blank:docs.jsonl --task choice:mc.jsonl --task lambada:lambada.jsonl \\
           --lm-samples 256 --output results.json

- ``--lm-samples N``: loss and perplexity per objective on the first N samples of the
  validation split of the data the checkpoint was trained on (or ``--data-path``), collated
  by its own objective settings and seed: the same samples every time.
- ``--task KIND:FILE`` (repeatable), a JSONL file per task: ``blank`` (held-out documents,
  ``{"text"}``: spans blanked by the token objective, span exact match of greedy filling and
  token accuracy), ``choice`` (``{"text": "... [MASK] ...", "choices": [...], "label": i}``:
  zero-shot multiple choice by the log-likelihood of each choice in the blank, summed and per
  token) and ``lambada`` (``{"text"}``: the last word after ``[gMASK]``, accuracy and perplexity).

Under torchrun the rows are spread over the ranks (data parallel); each batch is the same
rows whatever the world size, so the results equal one process's. With
``--tensor-model-parallel-size`` / ``--pipeline-model-parallel-size`` each rank builds only its
shard, as training does, from a glm-pretrain checkpoint of any layout (``ShardReader``), and the
batches go through the pipeline schedule (``PipelineScorer``); data parallelism spans the ranks
left over. Results go to the console and, with ``--output``, to JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from megatron_glm.checkpoint import CheckpointError, settings_of
from megatron_glm.convert.layout import ConversionError
from megatron_glm.data import eval_tasks
from megatron_glm.data.blank_infilling import (
    OBJECTIVES,
    BlankInfillingCollator,
    SpecialIds,
    sentence_end_ids,
)
from megatron_glm.data.blended_dataset import build_train_valid_test_datasets
from megatron_glm.data.eval_tasks import argparse_spec, task_name
from megatron_glm.data.loader import MicroBatches, collate_now
from megatron_glm.data.tokenizer import TokenizerError, add_tokenizer_args, spec_from_args
from megatron_glm.generate import load_for_inference
from megatron_glm.parallel import state
from megatron_glm.parallel.state import ParallelLayoutError, discover_launch, exit_without_teardown

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """A checkpoint, tokenizer or task that cannot be evaluated."""


class PipelineScorer:
    """This rank's shard of a checkpoint's model under TP x PP, built as training builds it (the meta device,
    then only its own parameters, read per parameter by ``ShardReader``); batches scored through the pipeline
    schedule, data parallel over the remaining ranks (``step.spread_scores``)."""

    def __init__(self, reader, cfg, device: str, pad: int, batch_size: int):
        from megatron_glm.model.parallelize import RankLayout, build_rank_model
        from megatron_glm.parallel.pipeline_stage import TiedEmbedding

        self.cfg = cfg
        self.device, self.pad, self.batch_size = device, pad, batch_size
        layout = RankLayout.from_state()
        self.chunks = [
            c.to(device).eval()
            for c in build_rank_model(self.cfg, layout, 0, weights=reader.weights(layout))
        ]
        self.tied = TiedEmbedding(self.chunks)
        self.tied.broadcast_weight()

    def score(self, batches: list[dict]) -> np.ndarray:
        from megatron_glm.training.step import StepRunner, score_count, spread_scores

        rows, length = self.batch_size, max(b["tokens"].shape[1] for b in batches)
        runner = StepRunner(
            _Forward(self.chunks[0]),
            self.chunks,
            self.tied,
            1,
            (rows, length, self.cfg.hidden_size),
            torch.float32,
            self.device,
        )

        def make(k):
            arrays = eval_tasks.layout([], length, self.pad, rows)
            if k < len(batches):
                b = batches[k]
                n, width = b["tokens"].shape
                for name, value in b.items():
                    if name in arrays and name != "objective":
                        arrays[name][:n, ..., :width] = value
            return {key: torch.from_numpy(v).to(self.device) for key, v in arrays.items()}

        pp = state.get_pipeline_model_parallel_world_size()
        full = spread_scores(runner, score_count(len(batches), 1, pp, 1), make, rows, 3).numpy()
        return np.concatenate(
            [full[k * rows : k * rows + len(b["tokens"])] for k, b in enumerate(batches)]
        )


class _Forward:
    """The engine ``StepRunner`` calls for a whole model, without DeepSpeed: glm-eval only runs forwards."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self):
        self.module.eval()

    train = eval


def score(model, batches: list[dict], device: str) -> np.ndarray:
    """``[rows, 3]``: each row's summed negative log-likelihood, targets and argmax-correct targets.

    Batch ``k`` runs on rank ``k % world``; every rank returns all rows (an all-reduce of sums
    over zeros, exact), in the order of the batches. A ``PipelineScorer`` scores them its own way.
    """
    if isinstance(model, PipelineScorer):
        return model.score(batches)

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    sizes = [len(b["tokens"]) for b in batches]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    out = torch.zeros(int(starts[-1]), 3, dtype=torch.float64)
    with torch.no_grad():
        for k in range(rank, len(batches), world):
            b = {
                name: torch.as_tensor(v).to(device)
                for name, v in batches[k].items()
                if name != "objective"
            }
            logits = model(b["tokens"], b["position_ids"], b["attn_lo"], b["attn_hi"])
            nll, count, correct = model.score(logits, b["labels"], b["loss_mask"])
            out[starts[k] : starts[k + 1]] = (
                torch.stack([nll, count, correct], dim=1).double().cpu()
            )
    if world > 1:
        dist.all_reduce(out)
    return out.numpy()


def task_metrics(
    model, tokenizer, kind: str, path: str, batch_size: int, device: str, seed: int
) -> dict:

    rows, labels = eval_tasks.build(kind, path, tokenizer, model.cfg.max_position_embeddings, seed)
    batches = [
        eval_tasks.layout(
            rows[i : i + batch_size],
            max(map(len, rows[i : i + batch_size])),
            tokenizer.pad_id,
            positions_1d=model.cfg.positions_1d,
        )
        for i in range(0, len(rows), batch_size)
    ]
    return eval_tasks.metrics(kind, rows, score(model, batches, device), labels)


def lm_metrics(
    model,
    tokenizer,
    meta: dict,
    samples: int,
    batch_size: int,
    device: str,
    data_path=None,
    cache=None,
) -> dict:
    """Loss and perplexity per objective on the first ``samples`` of the validation split."""

    run = settings_of(meta)  # the split, sequence length, seed and objective it was trained with
    paths = data_path or run.data.data_path
    if not paths:
        raise EvalError(
            "--lm-samples needs data: the checkpoint records no --data-path, pass --data-path"
        )
    split = run.data.split
    _, valid, _ = build_train_valid_test_datasets(
        list(paths),
        split,
        run.data.seq_length,
        [1, samples, 0],
        seed=run.training.seed,
        cache_dir=cache,
        tokenizer=tokenizer,
    )
    if valid is None or len(valid) == 0:
        raise EvalError(
            f"the split {split} leaves no validation documents in {paths}: pass another --split"
        )
    objective = run.objective
    ends = sentence_end_ids(tokenizer) if objective.sentence_prob > 0 else None
    data = MicroBatches(
        valid,
        BlankInfillingCollator(objective, SpecialIds.from_tokenizer(tokenizer), ends),
        model.cfg.vocab_size,
    )
    n = min(samples, len(valid))
    batches = [
        {k: v.numpy() for k, v in collate_now(data, list(range(i, min(i + batch_size, n)))).items()}
        for i in range(0, n, batch_size)
    ]
    scores = score(model, batches, device)
    objectives = np.concatenate([b["objective"] for b in batches])
    out = {"samples": n, "loss": float(scores[:, 0].sum() / scores[:, 1].sum())}
    out["perplexity"] = math.exp(min(out["loss"], 50))
    for k, name in enumerate(OBJECTIVES):
        at = objectives == k
        if at.any():
            out[f"loss_{name}"] = float(scores[at, 0].sum() / scores[at, 1].sum())
            out[f"perplexity_{name}"] = math.exp(min(out[f"loss_{name}"], 50))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glm-eval",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--load", required=True, help="a glm-pretrain checkpoint folder or an export-hf folder"
    )
    p.add_argument(
        "--task",
        action="append",
        type=argparse_spec,
        default=[],
        metavar="KIND:FILE",
        help="blank:FILE, choice:FILE or lambada:FILE (JSONL; repeatable)",
    )
    p.add_argument(
        "--lm-samples",
        type=int,
        default=0,
        help="loss and perplexity on this many validation samples",
    )
    p.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="the data for --lm-samples (default: the run's)",
    )
    p.add_argument("--data-cache-path", default=None)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=1234, help="the blank task's span draws")
    p.add_argument("--output", help="write the results here as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="split the model over this many ranks as training does (under torchrun, Slurm or MPI); each "
        "reads only its shard, from a checkpoint of any layout",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="pipeline stages (as above); the ranks left over are data parallel",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint without restriction (it can run code): only for a trusted source",
    )
    add_tokenizer_args(p)
    return p


def evaluate(args) -> dict:
    if not args.task and not args.lm_samples:
        raise EvalError("nothing to evaluate: give --task KIND:FILE and/or --lm-samples N")
    if args.batch_size < 1 or args.lm_samples < 0:
        raise EvalError("--batch-size must be positive and --lm-samples not negative")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    spec = spec_from_args(args) if (args.tokenizer_model or args.vocab_file) else None
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise EvalError(
            "--tensor-model-parallel-size and --pipeline-model-parallel-size must be positive"
        )
    if tp * pp > 1:
        model, tokenizer, meta = sharded_model(args.load, tp, pp, args, spec)
    else:
        model, tokenizer, meta = load_for_inference(
            args.load, args.device, spec, args.trust_checkpoint
        )
    results = {
        "checkpoint": os.path.abspath(args.load),
        "iteration": meta.get("iteration"),
        "tasks": {},
    }

    for kind, path in args.task:
        results["tasks"][task_name(kind, path)] = task_metrics(
            model, tokenizer, kind, path, args.batch_size, args.device, args.seed
        )
    if args.lm_samples:
        results["tasks"]["lm"] = lm_metrics(
            model,
            tokenizer,
            meta,
            args.lm_samples,
            args.batch_size,
            args.device,
            args.data_path,
            args.data_cache_path,
        )
    return results


def sharded_model(path: str, tp: int, pp: int, args, spec):
    """(``PipelineScorer``, tokenizer, meta): the process groups for TP x PP (x DP), then this rank's shard."""
    from megatron_glm.generate import open_sharded

    reader, tokenizer, cfg = open_sharded(path, tp, pp, args.device, spec, args.trust_checkpoint)
    scorer = PipelineScorer(reader, cfg, args.device, tokenizer.pad_id, args.batch_size)
    return scorer, tokenizer, reader.meta


def report(results: dict) -> str:
    lines = [f"glm-eval: {results['checkpoint']} (iteration {results['iteration']})"]
    for name, values in results["tasks"].items():
        shown = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        lines.append(f"  {name}: {shown}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    launch = discover_launch()
    sharded = args.tensor_model_parallel_size * args.pipeline_model_parallel_size > 1
    if launch.world_size > 1 and not sharded:  # data parallel: every rank holds the whole model
        state.initialize_model_parallel(tp=1, pp=1, backend="gloo")
    try:
        results = evaluate(args)
    except (
        ValueError,
        TokenizerError,
        CheckpointError,
        ConversionError,
        FileNotFoundError,
        ParallelLayoutError,
    ) as e:
        print(f"glm-eval: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    if launch.rank == 0:
        print(report(results))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=1)
    return 0


def cli() -> None:
    """The ``glm-eval`` command: ``main``, then leave without the interpreter's teardown (gloo's threads)."""
    exit_without_teardown(main())


if __name__ == "__main__":
    cli()
