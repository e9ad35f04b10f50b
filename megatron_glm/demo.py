"""The README's first command: the whole data pipeline on material every machine has.

1. a corpus: the docstrings of Python's standard library (``data_prep/stdlib_corpus.py``);
2. a sentencepiece tokenizer trained on it (``glm-train-tokenizer``);
3. the indexed binary dataset (``glm-preprocess``);
4. packed train/valid/test samples from it, decoded back to text;
5. glm-tiny pretrained with blank infilling (CPU, or the GPU when there is one), in two
   runs: the second resumes from the first's checkpoint and continues the same schedule;
6. blanks filled in sentences the model has not seen, with the KV-cache generator.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m megatron_glm.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo_out")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--train-iters", type=int, default=400)
    p.add_argument("--skip-training", action="store_true", help="stop after the data pipeline")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, "stdlib_docstrings.jsonl")
    spm_prefix = os.path.join(args.workdir, "spm")
    data_prefix = os.path.join(args.workdir, "stdlib")

    from megatron_glm.data_prep.stdlib_corpus import write_corpus

    t = step("corpus: Python standard library docstrings")
    n = write_corpus(corpus)
    print(f"{n:,} documents, {os.path.getsize(corpus) / 1e6:.1f} MB -> {corpus} ({time.perf_counter() - t:.1f} s)")

    from megatron_glm.data_prep.train_tokenizer import train_tokenizer

    t = step(f"tokenizer: sentencepiece unigram, {args.vocab_size} pieces, GLM special tokens built in")
    model = train_tokenizer([corpus], spm_prefix, args.vocab_size, overwrite=True)
    print(f"-> {model} ({time.perf_counter() - t:.1f} s)")

    from megatron_glm.data.tokenizer import load_tokenizer
    from megatron_glm.data_prep.preprocess import preprocess

    tok = load_tokenizer(model=model)
    t = step("glm-preprocess: JSONL -> Megatron .bin/.idx")
    summary = preprocess([corpus], data_prefix, tok.spec, append_eod=True, workers=os.cpu_count() or 1,
                         overwrite=True)
    print(summary.line())

    from megatron_glm.data.blended_dataset import build_train_valid_test_datasets

    step(f"packed samples of {args.seq_length} tokens, split 95,5,0")
    train, valid, test = build_train_valid_test_datasets(
        [f"{data_prefix}_text_document"], "95,5,0", args.seq_length, [None, None, None], tokenizer=tok)
    print(f"train {len(train):,} / valid {len(valid):,} / test {len(test) if test else 0:,} samples")
    sample = train[0]
    print(f"train[0] holds {len(sample['document_lengths'])} document piece(s) of lengths "
          f"{sample['document_lengths'].tolist()}; its first 200 characters:")
    print("  " + tok.decode(sample["text"].tolist())[:200].replace("\n", "\n  "))
    if args.skip_training:
        return 0

    import shutil

    from megatron_glm.training.pretrain import pretrain

    ckpt = os.path.join(args.workdir, "checkpoints")
    shutil.rmtree(ckpt, ignore_errors=True)  # a fresh run each time: the second step shows the resume
    half = args.train_iters // 2
    common = ["--data-path", f"{data_prefix}_text_document", "--tokenizer-model", model, "--preset", "glm-tiny",
              "--seq-length", "128", "--micro-batch-size", "16", "--global-batch-size", "32", "--lr", "2e-3",
              "--lr-warmup-iters", "20", "--lr-decay-iters", str(args.train_iters), "--min-lr", "2e-4",
              "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--bert-prob", "0.7",
              "--gap-sentence-prob", "0.2", "--split", "95,5,0", "--log-interval", "25", "--eval-interval", "100",
              "--eval-iters", "4", "--save", ckpt, "--load", ckpt, "--save-interval", "100"]
    t = step(f"glm-pretrain: glm-tiny, {half} iterations, then stop")
    first = pretrain(common + ["--train-iters", str(half)])
    print(f"({time.perf_counter() - t:.0f} s) loss {first['losses'][0]:.2f} -> {first['losses'][-1]:.2f}")
    t = step(f"glm-pretrain again: resumes from the checkpoint and goes on to {args.train_iters}")
    second = pretrain(common + ["--train-iters", str(args.train_iters)])
    print(f"({time.perf_counter() - t:.0f} s) loss {second['losses'][0]:.2f} -> {second['losses'][-1]:.2f}")

    from megatron_glm.generate import load_for_inference
    from megatron_glm.model.generation import GenerationConfig, fill_blanks

    step("glm-generate: blanks in sentences the model has not seen (a 2 M-parameter model after a few CPU "
         "minutes: expect frequent words, not answers)")
    import torch

    glm, tok = load_for_inference(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
    prompts = [
        "Return a new [MASK] containing all items from the iterable in ascending order.",
        "If the file does not exist, [MASK] is raised.",
        "Create a new socket using the given address family, socket type and [MASK].",
    ]
    for prompt in prompts:
        for strategy in ("greedy", "beam"):
            filled, spans = fill_blanks(glm, tok, prompt, GenerationConfig(strategy, max_new_tokens=12))
            print(f"{strategy:>6}: {prompt}\n        -> {spans[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
