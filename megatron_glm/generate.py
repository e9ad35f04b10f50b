"""glm-generate: fill the blanks of texts with a model from a glm-pretrain checkpoint or an export-hf folder."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from megatron_glm.checkpoint import load_model_weights
from megatron_glm.config import ModelConfig
from megatron_glm.convert.sources import HuggingFace, detect_format
from megatron_glm.data.tokenizer import (
    GLMTokenizer,
    TokenizerSpec,
    add_tokenizer_args,
    spec_from_args,
)
from megatron_glm.model.generation import GenerationConfig, fill_blanks, prompt_problem
from megatron_glm.model.glm import GLMModel


def spec_of(recorded: dict | None):
    """The tokenizer a checkpoint records (its type and files) as a ``TokenizerSpec``."""
    if not recorded or not recorded.get("files"):
        raise ValueError(
            "the checkpoint records no tokenizer: pass --tokenizer-model (or --vocab-file)"
        )
    files = recorded["files"]
    return {
        "sentencepiece": TokenizerSpec(type="sentencepiece", model=files[0]),
        "hf": TokenizerSpec(type="hf", model=files[0]),
        "gpt2": TokenizerSpec(
            type="gpt2", vocab_file=files[0], merge_file=files[1] if len(files) > 1 else None
        ),
    }.get(recorded["type"], TokenizerSpec(type=recorded["type"], vocab_file=files[0]))


def checkpoint_tokenizer(meta: dict, tokenizer_spec, path: str) -> GLMTokenizer:
    """The tokenizer a checkpoint records, or the one the flags give, which must be the same (its fingerprint)
    and pad to the model's vocabulary."""
    recorded = meta.get("tokenizer") or {}
    tokenizer = GLMTokenizer(tokenizer_spec or spec_of(recorded))
    if tokenizer_spec is not None and recorded.get("fingerprint") not in (
        None,
        tokenizer.fingerprint(),
    ):
        raise ValueError(
            f"{path} was trained with another tokenizer ({recorded.get('files')}): drop the tokenizer "
            "flags to use its own, or pass the same files"
        )
    vocab = meta["model"].get("vocab_size")
    padded = tokenizer.padded_vocab_size(meta.get("tensor_model_parallel_size", 1))
    if vocab is not None and tokenizer.padded_vocab_size() != vocab and padded != vocab:
        raise ValueError(
            f"the tokenizer's padded vocabulary ({tokenizer.padded_vocab_size()}) differs from the "
            f"model's ({vocab}): pass the tokenizer {path} was trained with"
        )
    return tokenizer


def load_for_inference(path: str, device: str = "cpu", tokenizer_spec=None, trust: bool = False):
    """``(model, tokenizer, meta)`` from a glm-pretrain checkpoint (any layout, shards merged; a folder or
    one ``iter_N`` in it) or an export-hf folder. A tokenizer given by flags must be the one the checkpoint
    records (its fingerprint), or it is refused."""

    fmt = detect_format(path)
    if fmt == "thudm":
        raise ValueError(
            f"{path} is an original GLM checkpoint: import it first (glm-convert import-thudm)"
        )
    if fmt == "hf":
        source = HuggingFace(path)
        state, cfg, info = source.state_dict(), source.cfg, source.info
        meta = {
            "model": cfg.to_dict(),
            "tokenizer": info.get("tokenizer"),
            "settings": info.get("settings"),
            "iteration": info.get("iteration", 0),
        }
    else:
        state, meta = load_model_weights(path, trust=trust)
    tokenizer = checkpoint_tokenizer(meta, tokenizer_spec, path)
    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters
        model = GLMModel(ModelConfig.from_dict(meta["model"]))
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.to(device).eval(), tokenizer, meta


class ShardedModel(torch.nn.Module):
    """This rank's shard of a TP x PP model, called as the whole model is: each rank generates the same tokens.

    Hidden states go from stage to stage (point to point, every rank's KV cache holding its own layers);
    the last stage's logits, gathered over TP to the whole vocabulary, are broadcast to every stage. The
    generation loop (greedy, beam, and sampling with the same generator seed) so runs identically on
    every rank, and its decisions never need exchanging.
    """

    def __init__(self, chunk: GLMModel):
        from megatron_glm.parallel import state
        from megatron_glm.parallel.pipeline_stage import TiedEmbedding

        super().__init__()
        self.model, self.cfg = chunk, chunk.cfg
        self.pp = state.get_pipeline_model_parallel_world_size()
        self.stage = state.get_pipeline_model_parallel_rank()
        self.ranks = state._require()["pp_ranks"]
        TiedEmbedding([chunk]).broadcast_weight()  # the last stage's copy of the output layer

    def forward(self, tokens, position_ids, attn_lo, attn_hi, cache=None):
        from megatron_glm.parallel import state

        rows, length = tokens.shape
        like = next(self.model.parameters())
        if self.stage == 0:
            h = self.model(tokens, position_ids, attn_lo, attn_hi, cache)
        else:
            h = like.new_empty(rows, length, self.cfg.hidden_size)
            dist.recv(h, self.ranks[self.stage - 1])
            h = self.model(tokens, position_ids, attn_lo, attn_hi, cache, hidden_states=h)
        if self.stage < self.pp - 1:
            dist.send(h.contiguous(), self.ranks[self.stage + 1])
            logits = like.new_empty(rows, length, self.cfg.vocab_size)
        else:  # the last stage returns logits over its share of the vocabulary
            tp_group = state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(h) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, h.contiguous(), group=tp_group)
            logits = torch.cat(parts, dim=-1)
        if self.pp > 1:
            dist.broadcast(logits, self.ranks[-1], group=state.get_pipeline_model_parallel_group())
        return logits


def open_sharded(
    path: str, tp: int, pp: int, device: str, tokenizer_spec=None, trust: bool = False
):
    """``(reader, tokenizer, model config)`` of a glm-pretrain checkpoint of any layout, the process groups of
    TP x PP (data parallel over the ranks left) started: each rank then builds and reads only its shard
    (``ShardReader``), as training does. glm-eval's and glm-generate's model parallelism."""
    from megatron_glm.checkpoint.shard_reader import ShardReader
    from megatron_glm.parallel import state

    if detect_format(path) != "megatron-glm":
        raise ValueError(
            f"{path}: tensor and pipeline parallelism read glm-pretrain checkpoints (import an export "
            "first: glm-convert import-hf)"
        )
    reader = ShardReader(path, trust)
    tokenizer = checkpoint_tokenizer(reader.meta, tokenizer_spec, path)
    cfg = ModelConfig.from_dict(reader.meta["model"])
    state.initialize_model_parallel(
        tp=tp,
        pp=pp,
        backend="nccl" if device.startswith("cuda") else "gloo",
        num_attention_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
    )
    return reader, tokenizer, cfg


def load_sharded(
    path: str, tp: int, pp: int, device: str, tokenizer_spec=None, trust: bool = False
):
    """``(model, tokenizer, meta)`` of a glm-pretrain checkpoint of any layout on exactly ``tp x pp`` ranks."""
    from megatron_glm.model.parallelize import RankLayout, build_rank_model
    from megatron_glm.parallel import state

    reader, tokenizer, cfg = open_sharded(path, tp, pp, device, tokenizer_spec, trust)
    if state.get_data_parallel_world_size() > 1:
        raise ValueError(
            f"glm-generate runs on exactly --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} ranks, not "
            f"{tp * pp * state.get_data_parallel_world_size()}: start that many"
        )
    layout = RankLayout.from_state()
    (chunk,) = build_rank_model(cfg, layout, 0, weights=reader.weights(layout))
    return ShardedModel(chunk.to(device)).eval(), tokenizer, reader.meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="glm-generate",
        description="Fill [MASK]/[sMASK]/[gMASK] blanks with a GLM.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--load",
        required=True,
        help="a glm-pretrain checkpoint folder (or one iter_N in it), or an export-hf folder",
    )
    p.add_argument(
        "--text", action="append", help="a text with blanks (repeatable); else lines of stdin"
    )
    p.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="greedy")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="split the model over this many ranks (under torchrun, Slurm or MPI), each reading only its "
        "shard, from a checkpoint of any layout; rank 0 prints",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="pipeline stages (as above): the ranks started are exactly TP x PP",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint without restriction (it can run code): only for a trusted source",
    )
    add_tokenizer_args(p)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(
            f"--device {args.device}: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu"
        )
    spec = spec_from_args(args) if (args.tokenizer_model or args.vocab_file) else None
    try:
        cfg = GenerationConfig(
            args.strategy,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.num_beams,
            args.length_penalty,
            args.seed,
        )
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(
                "--tensor-model-parallel-size and --pipeline-model-parallel-size must be positive"
            )
        if tp * pp > 1:
            model, tokenizer, _ = load_sharded(
                args.load, tp, pp, args.device, spec, args.trust_checkpoint
            )
        else:
            model, tokenizer, _ = load_for_inference(
                args.load, args.device, spec, args.trust_checkpoint
            )
        # the whole input is checked before any of it runs: one output line per input line, or none
        named = (
            [(f"--text {i + 1}", t) for i, t in enumerate(args.text)]
            if args.text
            else [(f"stdin line {i + 1}", line.rstrip("\n")) for i, line in enumerate(sys.stdin)]
        )
        problems = [
            f"{where}: {problem}"
            for where, text in named
            if (problem := prompt_problem(model, tokenizer, text, cfg))
        ]
        if problems:
            raise ValueError(
                f"{len(problems)} of {len(named)} prompts cannot be filled, so none was: "
                + "; ".join(problems[:5])
                + ("; ..." if len(problems) > 5 else "")
            )
        speaks = not dist.is_initialized() or dist.get_rank() == 0
        for _, text in named:
            filled, _ = fill_blanks(model, tokenizer, text, cfg)
            if speaks:
                print(filled, flush=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"glm-generate: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
