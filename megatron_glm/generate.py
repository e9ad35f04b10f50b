"""glm-generate: fill the blanks of texts with a model from a glm-pretrain checkpoint or an export-hf folder."""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_glm.checkpoint import load_model_weights
from megatron_glm.config import ModelConfig
from megatron_glm.convert.readers import detect_format, read_hf
from megatron_glm.data.tokenizer import (
    GLMTokenizer,
    TokenizerSpec,
    add_tokenizer_args,
    spec_from_args,
)
from megatron_glm.model.generation import GenerationConfig, fill_blanks, prompt_problem
from megatron_glm.model.glm import GLMModel
from megatron_glm.serialization import check_finite


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
        state, cfg, info = read_hf(path)
        check_finite(state.items(), path)
        meta = {
            "model": cfg.to_dict(),
            "tokenizer": info.get("tokenizer"),
            "settings": info.get("settings"),
            "iteration": info.get("iteration", 0),
        }
    else:
        state, meta = load_model_weights(path, trust=trust)
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
    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters
        model = GLMModel(ModelConfig.from_dict(meta["model"]))
    if tokenizer.padded_vocab_size() != model.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer's padded vocabulary ({tokenizer.padded_vocab_size()}) differs from the "
            f"model's ({model.cfg.vocab_size}): pass the tokenizer {path} was trained with"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.to(device).eval(), tokenizer, meta


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
        for _, text in named:
            filled, _ = fill_blanks(model, tokenizer, text, cfg)
            print(filled, flush=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"glm-generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
