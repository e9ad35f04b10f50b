"""glm-convert: reshard, import, export and consolidate GLM checkpoints.

  glm-convert reshard      --load CKPT --save OUT --target-tp 1 --target-pp 1
  glm-convert import-thudm --load GLM_CKPT_DIR --save OUT --preset glm-large [--vocab-file ...] [--target-tp 2]
  glm-convert export-hf    --load CKPT --save HF_DIR [--dtype bf16] [--max-shard-size 5GB]
  glm-convert import-hf    --load HF_DIR --save OUT [--target-tp 2 --target-pp 2]
  glm-convert zero-to-fp32 --load CKPT --save OUT [--hf]
  glm-convert to-universal --load CKPT --save OUT

``--load`` takes any TP x PP megatron-glm checkpoint (ZeRO-3 partitions are consolidated
on the way). Every command streams: it holds a few parameters at a time, never the model, and
``--workers N`` shares the parameters (or output files) among N processes. reshard's output
is weights-only: glm-pretrain resumes it at the same iteration and consumed samples with a
fresh optimizer state. to-universal keeps the whole training state (fp32 master weights, Adam
moments and step, lr schedule, data position) in DeepSpeed's universal layout, one folder per
parameter: glm-pretrain --load resumes it on any TP x PP x DP layout and ZeRO stage.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from megatron_glm.parallel.pipeline import stage_layer_counts


def _common(sp, layout: bool = True):
    sp.add_argument("--load", required=True, help="source checkpoint (file or folder)")
    sp.add_argument("--save", required=True, help="output folder (written atomically)")
    sp.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights"
    )
    sp.add_argument(
        "--dry-run", action="store_true", help="list what would be written, write nothing"
    )
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    sp.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that write in parallel (each holds a few parameters at a time)",
    )
    sp.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle --load's files without restriction (they can run code): only for a source you "
        "trust whose files hold more than tensors, numbers and DeepSpeed's optimizer states",
    )
    if layout:
        sp.add_argument(
            "--target-tp", type=int, default=1, help="tensor-parallel size of the output"
        )
        sp.add_argument(
            "--target-pp", type=int, default=1, help="pipeline-parallel size of the output"
        )
        sp.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None)
        sp.add_argument("--target-num-virtual-stages-per-pipeline-rank", type=int, default=None)
        sp.add_argument("--target-pipeline-layers", type=int, nargs="+", default=None)
        # Megatron's uneven splits, as glm-pretrain's flags of the same names say
        sp.add_argument("--target-decoder-first-pipeline-num-layers", type=int, default=None)
        sp.add_argument("--target-decoder-last-pipeline-num-layers", type=int, default=None)
        sp.add_argument("--target-account-for-embedding-in-pipeline-split", action="store_true")
        sp.add_argument("--target-account-for-loss-in-pipeline-split", action="store_true")


def _shards(sp):
    sp.add_argument(
        "--max-shard-size",
        default="5GB",
        help="Hugging Face output: safetensors shards up to this size, with an index (e.g. 5GB, 500MB)",
    )


def build_parser() -> argparse.ArgumentParser:
    from megatron_glm.data.tokenizer import add_tokenizer_args

    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="glm-convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    _common(
        sub.add_parser(
            "reshard", allow_abbrev=False, help="any TP x PP layout (or format) -> another layout"
        )
    )
    sp = sub.add_parser(
        "import-thudm", allow_abbrev=False, help="an original THUDM/GLM checkpoint -> megatron-glm"
    )
    _common(sp)
    sp.add_argument("--preset", help="architecture preset (gives the attention heads)")
    sp.add_argument("--num-attention-heads", type=int, help="heads (not recorded in the weights)")
    add_tokenizer_args(sp)
    sp = sub.add_parser(
        "export-hf",
        allow_abbrev=False,
        help="megatron-glm -> a folder transformers loads "
        "(AutoModelForCausalLM / AutoTokenizer, trust_remote_code=True)",
    )
    _common(sp, layout=False)
    _shards(sp)
    _common(
        sub.add_parser("import-hf", allow_abbrev=False, help="an export-hf folder -> megatron-glm")
    )
    sp = sub.add_parser(
        "zero-to-fp32", allow_abbrev=False, help="consolidate ZeRO partitions to fp32 weights"
    )
    _common(sp)
    sp.add_argument(
        "--hf", action="store_true", help="write a Hugging Face folder instead (as export-hf)"
    )
    _shards(sp)
    sp = sub.add_parser(
        "to-universal",
        allow_abbrev=False,
        help="the whole training state (weights, Adam moments, "
        "schedule) for any layout: glm-pretrain resumes it on another TP x PP x DP or ZeRO stage",
    )
    _common(sp, layout=False)
    sp.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="the checkpoint to convert (default: the latest)",
    )
    return p


def _source(args):
    """The checkpoint ``--load`` names, in the format the command reads."""
    from megatron_glm.convert import sources
    from megatron_glm.convert.layout import ConversionError

    if args.command == "import-thudm":
        source = sources.THUDM(
            args.load, args.num_attention_heads, args.preset, args.trust_checkpoint
        )
        if args.tokenizer_model or args.vocab_file:
            from megatron_glm.data.tokenizer import GLMTokenizer, spec_from_args

            tokenizer = GLMTokenizer(spec_from_args(args))
            if tokenizer.vocab_size > source.cfg.vocab_size:
                raise ConversionError(
                    f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint only "
                    f"{source.cfg.vocab_size} embedding rows: another tokenizer"
                )
            source.info["tokenizer"] = tokenizer.describe()
        return source
    if args.command == "zero-to-fp32":
        return sources.MegatronGLM(args.load, args.trust_checkpoint, masters=True)
    fmt = sources.detect_format(args.load)
    if args.command == "import-hf" and fmt != "hf":
        raise ConversionError(f"{args.load} is a {fmt} checkpoint, not an export-hf folder")
    if args.command in ("reshard", "export-hf") and fmt == "thudm":
        raise ConversionError(
            f"{args.load} is an original GLM checkpoint: use `glm-convert import-thudm`"
        )
    if fmt == "hf":
        return sources.HuggingFace(args.load)
    return sources.MegatronGLM(args.load, args.trust_checkpoint)


def convert(args) -> list[tuple[str, int]]:
    from megatron_glm.convert import writers
    from megatron_glm.convert.layout import ConversionError

    if args.workers < 1:
        raise ConversionError(f"--workers {args.workers}: give 1 or more processes")
    if args.command == "to-universal":
        from megatron_glm.convert.universal import write_universal

        if args.dtype:
            raise ConversionError(
                "to-universal keeps the fp32 training state as it is: drop --dtype"
            )
        return write_universal(
            args.load,
            args.save,
            args.trust_checkpoint,
            args.dry_run,
            args.overwrite,
            args.iteration,
            args.workers,
        )
    source = _source(args)
    if args.command == "zero-to-fp32":
        args.dtype = args.dtype or "fp32"
    if args.command == "export-hf" or (args.command == "zero-to-fp32" and args.hf):
        return writers.write_hf(
            args.save,
            source,
            args.dtype,
            args.dry_run,
            args.overwrite,
            args.max_shard_size,
            args.workers,
        )
    cfg = source.cfg
    vpp_layers = args.target_num_layers_per_virtual_pipeline_stage
    if vpp_layers and cfg.num_layers % (args.target_pp * vpp_layers):
        raise ConversionError(
            f"{cfg.num_layers} layers do not split into --target-pp {args.target_pp} x "
            f"{vpp_layers} layers per virtual stage"
        )
    vpp = cfg.num_layers // (args.target_pp * vpp_layers) if vpp_layers else 1
    vpp = args.target_num_virtual_stages_per_pipeline_rank or vpp
    try:
        uneven = stage_layer_counts(
            cfg.num_layers,
            args.target_pp,
            vpp,
            args.target_decoder_first_pipeline_num_layers,
            args.target_decoder_last_pipeline_num_layers,
            args.target_account_for_embedding_in_pipeline_split,
            args.target_account_for_loss_in_pipeline_split,
        )
    except ValueError as e:
        raise ConversionError(f"the target layout: {e}") from None
    if uneven and args.target_pipeline_layers:
        raise ConversionError(
            "--target-pipeline-layers gives every stage's layers; the --target-decoder-*/--target-account-for-* "
            "flags would split them another way: pass one"
        )
    return writers.write_megatron_glm(
        args.save,
        source,
        args.target_tp,
        args.target_pp,
        vpp,
        args.target_pipeline_layers or uneven,
        args.dtype,
        args.dry_run,
        args.overwrite,
        converted_from=f"{args.command} {args.load}",
        workers=args.workers,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = convert(args)
    except (
        ValueError,
        FileNotFoundError,
    ) as e:  # ours (conversion, checkpoint, tokenizer) and ModelConfig's
        print(f"glm-convert: error: {e} (nothing was written)", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk or an unwritable --save: the staged output goes too
        shutil.rmtree(args.save.rstrip("/") + ".partial", ignore_errors=True)
        print(
            f"glm-convert: error: {e.filename or args.save}: {e.strerror or e}; the disk may be full or the "
            "folder unwritable (nothing was written)",
            file=sys.stderr,
        )
        return 1
    total = sum(size for _, size in plan)
    verb = "would write" if args.dry_run else "wrote"
    # a universal checkpoint has a folder per tensor
    shown = plan if len(plan) <= 24 else plan[:20] + plan[-2:]
    for name, size in shown:
        if len(shown) < len(plan) and name == plan[-2][0]:
            print(f"  ... {len(plan) - len(shown)} more")
        print(f"  {name}  {size / 2**20:,.1f} MiB" if size else f"  {name}")
    print(f"glm-convert: {verb} {len(plan)} files, {total / 2**20:,.1f} MiB, to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
