"""The README's first command: the whole data pipeline on material every machine has.

1. a corpus: the docstrings of Python's standard library (``data_prep/stdlib_corpus.py``);
2. a sentencepiece tokenizer trained on it (``glm-train-tokenizer``);
3. the indexed binary dataset (``glm-preprocess``);
4. packed train/valid/test samples from it, decoded back to text;
5. three tasks built from held-out docstrings (the validation split's: never trained on): blank
   filling and two 4-way multiple choices (word order, function words), scored on the model
   glm-pretrain starts from;
6. glm-tiny pretrained with blank infilling (CPU, or the GPU when there is one), in two
   runs: the second resumes from the first's checkpoint and continues the same schedule;
   blank filling and word order are scored during training too (``--eval-tasks``);
7. glm-finetune: the function-word task as cloze classification, from the pretrained checkpoint,
   on items made from training documents, tested on the held-out task;
8. the tasks before and after pretraining and after fine-tuning, beside chance; the loss curves as a PNG;
9. held-out sentences: the order it picks for three blanked words, and what the KV-cache generator writes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m megatron_glm.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default="demo_out")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=2000,
        help="sentencepiece pieces (small: a 1 M-parameter model spends less of itself on the vocabulary)",
    )
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--train-iters", type=int, default=1000)
    p.add_argument("--skip-training", action="store_true", help="stop after the data pipeline")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, "stdlib_docstrings.jsonl")
    spm_prefix = os.path.join(args.workdir, "spm")
    data_prefix = os.path.join(args.workdir, "stdlib")

    from megatron_glm.data_prep.stdlib_corpus import write_corpus

    t = step("corpus: Python standard library docstrings")
    n = write_corpus(corpus)
    print(
        f"{n:,} documents, {os.path.getsize(corpus) / 1e6:.1f} MB -> {corpus} ({time.perf_counter() - t:.1f} s)"
    )

    from megatron_glm.data_prep.train_tokenizer import train_tokenizer

    t = step(
        f"tokenizer: sentencepiece unigram, {args.vocab_size} pieces, GLM special tokens built in"
    )
    model = train_tokenizer([corpus], spm_prefix, args.vocab_size, overwrite=True)
    print(f"-> {model} ({time.perf_counter() - t:.1f} s)")

    from megatron_glm.data.tokenizer import load_tokenizer
    from megatron_glm.data_prep.preprocess import preprocess

    tok = load_tokenizer(model=model)
    t = step("glm-preprocess: JSONL -> Megatron .bin/.idx")
    summary = preprocess(
        [corpus],
        data_prefix,
        tok.spec,
        append_eod=True,
        workers=os.cpu_count() or 1,
        overwrite=True,
    )
    print(summary.line())

    from megatron_glm.data.blended_dataset import build_train_valid_test_datasets

    step(f"packed samples of {args.seq_length} tokens, split 95,5,0")
    train, valid, test = build_train_valid_test_datasets(
        [f"{data_prefix}_text_document"],
        "95,5,0",
        args.seq_length,
        [None, None, None],
        tokenizer=tok,
    )
    print(
        f"train {len(train):,} / valid {len(valid):,} / test {len(test) if test else 0:,} samples"
    )
    sample = train[0]
    print(
        f"train[0] holds {len(sample['document_lengths'])} document piece(s) of lengths "
        f"{sample['document_lengths'].tolist()}; its first 200 characters:"
    )
    print("  " + tok.decode(sample["text"].tolist())[:200].replace("\n", "\n  "))
    if args.skip_training:
        return 0

    import shutil

    from megatron_glm.training.pretrain import pretrain

    step("held-out tasks: the validation split's docstrings, never trained on")
    tasks = held_out_tasks(corpus, os.path.join(args.workdir, "tasks"))
    print(
        f"blank filling: {tasks['blank_items']} sentences, spans blanked by the token objective -> {tasks['blank']}"
    )
    print(
        f"multiple choice (word order): {tasks['order_items']} sentences, 3 consecutive words blanked, their "
        f"order and 3 other orders to choose from (chance 25%) -> {tasks['order']}"
    )
    print(
        f"multiple choice (function words): {tasks['words_items']} sentences, a function word blanked, it and 3 "
        f"other function words to choose from (chance 25%) -> {tasks['words']}"
    )
    ckpt = os.path.join(args.workdir, "checkpoints")
    # a fresh run each time: the second step shows the resume
    shutil.rmtree(ckpt, ignore_errors=True)
    half = args.train_iters // 2
    # the model and its batches, for pretraining and fine-tuning alike
    shape = [
        "--tokenizer-model",
        model,
        "--preset",
        "glm-tiny",
        "--seq-length",
        "128",
        "--micro-batch-size",
        "16",
        "--global-batch-size",
        "32",
        "--hidden-dropout",
        "0.0",
        "--attention-dropout",
        "0.0",
    ]
    common = [
        *shape,
        "--data-path",
        f"{data_prefix}_text_document",
        "--lr",
        "2e-3",
        "--lr-warmup-iters",
        "20",
        "--lr-decay-iters",
        str(args.train_iters),
        "--min-lr",
        "2e-4",
        "--bert-prob",
        "0.7",
        "--gap-sentence-prob",
        "0.2",
        "--split",
        "95,5,0",
        "--log-interval",
        "25",
        "--eval-interval",
        "100",
        "--eval-iters",
        "4",
        "--save",
        ckpt,
        "--load",
        ckpt,
        "--save-interval",
        "100",
        "--eval-tasks",
        f"blank:{tasks['blank']}",
        f"choice:{tasks['order']}",
    ]
    t = step(f"glm-pretrain: glm-tiny, {half} iterations, then stop")
    first = pretrain(common + ["--train-iters", str(half)])
    print(
        f"({time.perf_counter() - t:.0f} s) loss {first['losses'][0]:.2f} -> {first['losses'][-1]:.2f}"
    )
    t = step(f"glm-pretrain again: resumes from the checkpoint and goes on to {args.train_iters}")
    second = pretrain(common + ["--train-iters", str(args.train_iters)])
    print(
        f"({time.perf_counter() - t:.0f} s) loss {second['losses'][0]:.2f} -> {second['losses'][-1]:.2f}"
    )

    from megatron_glm.training.finetune import finetune

    ft = finetune_tasks(corpus, os.path.join(args.workdir, "finetune"))
    tuned_dir = os.path.join(args.workdir, "finetuned")
    shutil.rmtree(tuned_dir, ignore_errors=True)
    t = step(
        f"glm-finetune: the function-word task as cloze classification, from the pretrained checkpoint: "
        f"{ft['train_items']} items made from training documents, {ft['dev_items']} more as the dev split, "
        "the held-out task as the test split"
    )
    tuned = finetune(
        [
            "--task",
            "classification",
            "--train-data",
            ft["train"],
            "--valid-data",
            ft["dev"],
            "--test-data",
            tasks["words"],
            "--load",
            ckpt,
            "--finetune",
            "--save",
            tuned_dir,
            *shape,
            "--epochs",
            "2",
            "--lr",
            "5e-4",
            "--lr-warmup-fraction",
            "0.1",
            "--eval-interval",
            "25",
            "--log-interval",
            "25",
        ]
    )
    results = tuned["results"]
    print(
        f"({time.perf_counter() - t:.0f} s) dev accuracy {results['zero_shot_dev']['accuracy']:.1%} -> "
        f"{results['best']['value']:.1%} (best at iteration {results['best']['iteration']})"
    )

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    step(
        "glm-eval: the held-out tasks before training (the model glm-pretrain starts from), after pretraining, "
        "and after fine-tuning on the function-word task"
    )
    before, after = score_before_and_after(ckpt, tasks, device)
    tuned_accuracy = {("words", "accuracy"): results["test"]["accuracy"]}
    print(f"{'':34} {'chance':>8} {'before':>8} {'after':>8} {'tuned':>8}")
    print(
        f"{'blank filling, loss per target token':34} {'':>8} {before['blank']['loss']:8.2f} "
        f"{after['blank']['loss']:8.2f} {'-':>8}"
    )
    for label, kind, key, chance in (
        ("blank filling, span exact match", "blank", "exact_match", None),
        ("blank filling, token accuracy", "blank", "token_accuracy", None),
        ("multiple choice (order), accuracy", "order", "accuracy", 0.25),
        ("multiple choice (function words)", "words", "accuracy", 0.25),
    ):
        shown = f"{chance:8.1%}" if chance is not None else f"{'~0%':>8}"
        tuned_value = tuned_accuracy.get((kind, key))
        tuned_shown = f"{tuned_value:8.1%}" if tuned_value is not None else f"{'-':>8}"
        print(f"{label:34} {shown} {before[kind][key]:8.1%} {after[kind][key]:8.1%} {tuned_shown}")
    plot = plot_curves(os.path.join(ckpt, "metrics.jsonl"), os.path.join(args.workdir, "loss.png"))
    if plot:
        print(f"loss per objective, validation loss and the tasks against iterations -> {plot}")

    from megatron_glm.generate import load_for_inference
    from megatron_glm.model.generation import GenerationConfig, fill_blanks

    step(
        "held-out sentences: the order it picks for the blanked words (the most likely choice), and what "
        "glm-generate's greedy filling writes there (a 1 M-parameter model after a few CPU minutes: grammar "
        "first, words later)"
    )
    glm, tok, _ = load_for_inference(ckpt, device=device)
    for text, options, picked, truth in picked_choices(glm, tok, tasks["order"], device)[:8]:
        _, spans = fill_blanks(glm, tok, text, GenerationConfig("greedy", max_new_tokens=6))
        shown = text.replace("[MASK]", " [MASK] ")
        print(
            f"  {'right' if picked == truth else 'wrong'}: {shown}  {' / '.join(options)} -> {picked!r}"
            f"{'' if picked == truth else f' (the text had {truth!r})'}; generated {spans[0]!r}"
        )
    return 0


def picked_choices(model, tok, path: str, device: str) -> list[tuple]:
    """(text, choices, the model's pick by summed log-likelihood, the right one) per multiple-choice item."""
    from megatron_glm.data import eval_tasks
    from megatron_glm.evaluate import score

    rows, labels = eval_tasks.build("choice", path, tok, model.cfg.max_position_embeddings, 1234)
    scores = score(
        model,
        [
            eval_tasks.layout(rows[i : i + 16], max(map(len, rows[i : i + 16])), tok.pad_id)
            for i in range(0, len(rows), 16)
        ],
        device,
    )
    with open(path) as f:
        items = [json.loads(line) for line in f if line.strip()]
    out = []
    for i, (item, label) in enumerate(zip(items, labels)):
        nll = [scores[j, 0] for j, row in enumerate(rows) if row.item == i]
        out.append(
            (
                item["text"],
                item["choices"],
                item["choices"][nll.index(min(nll))],
                item["choices"][label],
            )
        )
    return out


ORDER_WORDS = 3  # the words of the word-order task's blank: 3! = 6 orders, 4 of them offered


def held_out_tasks(corpus: str, folder: str, items: int = 200, seed: int = 1234) -> dict:
    """Three task files from the first sentences of the validation split's documents.

    - Blank filling: the sentences, spans blanked by the token objective.
    - Multiple choice, word order: three consecutive words blanked, the choices their order and
      three other orders of the same words (chance 25%). The choices hold the same pieces, so
      neither frequency nor length gives the answer away: only how well the model reads the
      sentence, which keeps improving with its loss. glm-pretrain scores it as it trains.
    - Multiple choice, function words: the first function word after the first word blanked, the
      choices it and three other function words (chance 25%). A small model settles it within
      its first hundred steps; glm-finetune then trains on items of the same kind.
    """
    sentences = first_sentences(corpus, 1)  # glm-pretrain --split 95,5,0's valid range
    rng = random.Random(seed)
    rng.shuffle(sentences)
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.jsonl") for name in ("blank", "order", "words")}
    with open(paths["blank"], "w") as f:
        for words in sentences[:items]:
            f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")
    return {
        **paths,
        "blank_items": min(items, len(sentences)),
        "order_items": write_order_choices(sentences, paths["order"], items, rng),
        "words_items": write_word_choices(sentences, paths["words"], items, rng),
    }


def first_sentences(corpus: str, split: int) -> list[list[str]]:
    """The words of the first sentence of each document in the split (0: train, 1: valid of 95,5,0)."""
    from megatron_glm.data.blended_dataset import split_documents

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    start, stop = split_documents(len(texts), [0.95, 0.05, 0.0])[split]
    sentences = []
    for text in texts[start:stop]:
        first = " ".join(text.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        if 5 <= len(first.split()) <= 20:
            sentences.append(first.split())
    return sentences


def write_order_choices(
    sentences: list[list[str]], path: str, items: int, rng: random.Random
) -> int:
    """The word-order task: three consecutive distinct words (after a sentence's first) blanked, their order and
    three other orders of them to choose from; how many items were written."""
    n = 0
    with open(path, "w") as f:
        for words in sentences:
            starts = [
                i
                for i in range(1, len(words) - ORDER_WORDS + 1)
                if all(w.isalpha() for w in words[i : i + ORDER_WORDS])
                and len(set(words[i : i + ORDER_WORDS])) == ORDER_WORDS
            ]
            if not starts or n == items:
                continue
            at = rng.choice(starts)
            span = words[at : at + ORDER_WORDS]
            others = [list(p) for p in itertools.permutations(span) if list(p) != span]
            options = [" ".join(span)] + [" ".join(p) for p in rng.sample(others, 3)]
            rng.shuffle(options)
            # no spaces beside the blank: it stands for the words and the first one's leading space, as in
            # training (with sentencepiece, "a [MASK] b" would encode the spaces as pieces of their own)
            rest = " ".join(words[at + ORDER_WORDS :])
            text = " ".join(words[:at]) + "[MASK]" + (rest + "." if rest else ".")
            f.write(
                json.dumps(
                    {"text": text, "choices": options, "label": options.index(" ".join(span))}
                )
                + "\n"
            )
            n += 1
    return n


FUNCTION_WORDS = ("the", "a", "of", "to", "is", "if", "and", "in", "for", "or", "not", "an")


def write_word_choices(
    sentences: list[list[str]], path: str, items: int, rng: random.Random
) -> int:
    """The function-word task: the first function word after a sentence's first word blanked, it and three
    other function words to choose from; how many items were written."""
    n = 0
    with open(path, "w") as f:
        for words in sentences:
            at = next((i for i, w in enumerate(words) if i > 0 and w in FUNCTION_WORDS), None)
            if at is None or n == items:
                continue
            options = [words[at]] + rng.sample([w for w in FUNCTION_WORDS if w != words[at]], 3)
            rng.shuffle(options)
            text = " ".join(words[:at]) + "[MASK]" + " ".join(words[at + 1 :]) + "."
            f.write(
                json.dumps({"text": text, "choices": options, "label": options.index(words[at])})
                + "\n"
            )
            n += 1
    return n


def finetune_tasks(corpus: str, folder: str, seed: int = 1234) -> dict:
    """The function-word task made from the training split's documents, for fine-tuning: a train file and a
    dev file (sentences the fine-tuning never trains on); the held-out task stays the test."""
    sentences = first_sentences(corpus, 0)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    os.makedirs(folder, exist_ok=True)
    train, dev = os.path.join(folder, "train.jsonl"), os.path.join(folder, "dev.jsonl")
    n_dev = write_word_choices(sentences[:600], dev, 200, rng)
    n_train = write_word_choices(sentences[600:], train, 2000, rng)
    return {"train": train, "dev": dev, "train_items": n_train, "dev_items": n_dev}


def score_before_and_after(ckpt: str, tasks: dict, device: str) -> tuple[dict, dict]:
    import torch

    from megatron_glm.checkpoint import settings_of
    from megatron_glm.config import ModelConfig
    from megatron_glm.evaluate import task_metrics
    from megatron_glm.generate import load_for_inference
    from megatron_glm.model.glm import GLMModel

    trained, tok, meta = load_for_inference(ckpt, device)
    initial = GLMModel(ModelConfig.from_dict(meta["model"]))
    # bitwise the weights glm-pretrain starts from
    initial.reset_parameters(settings_of(meta).training.seed)
    initial = initial.to(device).eval()
    out = []
    for model in (initial, trained):
        with torch.no_grad():
            out.append(
                {
                    name: task_metrics(model, tok, kind, tasks[name], 16, device, 1234)
                    for name, kind in (("blank", "blank"), ("order", "choice"), ("words", "choice"))
                }
            )
    return out[0], out[1]


def plot_curves(metrics: str, path: str) -> str | None:
    """Loss per objective and the validation loss (left), the tasks (right), against iterations."""
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib is not installed: pip install 'megatron-glm[demo]' for the plot)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("loss_token", "token objective"),
        ("loss_sentence", "sentence objective"),
        ("loss_document", "document objective"),
        ("valid_loss", "validation (all)"),
        ("eval/blank:blank.jsonl/loss", "held-out blank filling"),
    ):
        points = [(r["iteration"], r[key]) for r in rows if key in r]
        if points:
            left.plot(
                *zip(*points),
                "o-" if key.startswith(("valid", "eval")) else "-",
                label=label,
                linewidth=2 if key.startswith(("valid", "eval")) else 0.8,
            )
    left.set(xlabel="iteration", ylabel="loss (nats per target token)", title="pretraining")
    left.legend()
    shown = ("/exact_match", "/token_accuracy", "/accuracy")
    for key in sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith(shown)}):
        points = [(r["iteration"], r[key]) for r in rows if key in r]
        right.plot(*zip(*points), "o-", label=key.removeprefix("eval/"))
    right.axhline(0.25, color="grey", linestyle=":", label="word order: chance (25%)")
    right.set(
        xlabel="iteration", ylabel="share", title="held-out tasks (--eval-tasks)", ylim=(0, 1)
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
