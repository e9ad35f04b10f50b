"""Background data: the same batches for any number of workers, and failures that stop with a clear error."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import records


@pytest.fixture(scope="module")
def pieces(data, tokenizer, tmp_path_factory):
    """(train dataset, collator) as glm-pretrain builds them."""
    from megatron_glm.data.blank_infilling import (
        BlankInfillingCollator,
        BlankInfillingConfig,
        SpecialIds,
    )
    from megatron_glm.data.blended_dataset import build_train_valid_test_datasets

    train, _, _ = build_train_valid_test_datasets(
        [data[0]],
        "100,0,0",
        64,
        [96, 0, 0],
        seed=3,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        tokenizer=tokenizer,
    )
    cfg = BlankInfillingConfig(seq_length=64, token_prob=0.5, sentence_prob=0.2, seed=3)
    return train, BlankInfillingCollator(cfg, SpecialIds.from_tokenizer(tokenizer))


def stream(pieces, workers, consumed=0, dataset=None):
    from megatron_glm.data.loader import BatchStream, MicroBatches
    from megatron_glm.data.sampler import PretrainingSampler

    train, collate = pieces
    dataset = dataset or train
    return BatchStream(
        MicroBatches(dataset, collate), PretrainingSampler(len(dataset), consumed, 4, 0, 1), workers
    )


def take(s, n):
    try:
        return [s.next()[0] for _ in range(n)]
    finally:
        s.close()


def test_batches_are_bitwise_equal_for_0_1_2_workers_and_from_a_resumed_position(pieces):
    reference = take(stream(pieces, 0), 12)
    # what the collator alone makes of the sampler's indices, without the loader
    train, collate = pieces
    assert all(
        torch.equal(reference[3][k], v)
        for k, v in collate([(i, train[i]) for i in range(12, 16)]).items()
    )
    for workers in (1, 2):
        got = take(stream(pieces, workers), 12)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(reference, got) for k in a)
    resumed = take(stream(pieces, 2, consumed=7 * 4), 5)  # the position is consumed_samples
    assert all(torch.equal(a[k], b[k]) for a, b in zip(reference[7:], resumed) for k in a)


class Unreadable:
    def __init__(self, inner, bad):
        self.inner, self.bad = inner, bad

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError("record is corrupt")
        return self.inner[i]


def test_a_sample_that_fails_in_a_worker_is_named(pieces):
    from megatron_glm.data.loader import DataError

    s = stream(pieces, 2, dataset=Unreadable(pieces[0], 9))
    s.next()
    s.next()  # samples 4..7
    with pytest.raises(
        DataError, match=r"samples 8\.\.11: sample 9: ValueError: record is corrupt"
    ):
        s.next()
    s.close()


def test_a_token_beyond_the_vocabulary_is_named(pieces):
    from megatron_glm.data.loader import DataError, MicroBatches, collate_now

    train, collate = pieces
    top = int(collate([(i, train[i]) for i in range(4)])["tokens"].max())
    with pytest.raises(
        DataError, match=rf"sample \d: token id {top} is outside the model's vocabulary of {top}"
    ):
        collate_now(MicroBatches(train, collate, vocab_size=top), range(4))


def test_starting_the_loader_leaves_the_training_rng_alone(pieces):
    """The default generator drives dropout and is checkpointed: a resumed run starts its loader after restoring
    it, an uninterrupted one before step 1, so a draw there would make resumed steps differ."""
    before = torch.get_rng_state()
    for workers in (0, 2):
        take(stream(pieces, workers), 1)
    assert torch.equal(torch.get_rng_state(), before)


def test_negative_workers_are_refused(pieces):
    with pytest.raises(ValueError, match="--num-workers -1"):
        stream(pieces, -1)


def pretrain_args(data, save, extra=()):
    prefix, model = data
    return [
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "6",
        "--lr",
        "1e-3",
        "--bert-prob",
        "0.5",
        "--gap-sentence-prob",
        "0.3",
        "--split",
        "100,0,0",
        "--log-interval",
        "1",
        "--save",
        save,
        "--save-interval",
        "2",
        "--data-cache-path",
        os.path.join(os.path.dirname(save), "cache"),
        *extra,
    ]


def run(argv, fault=""):
    return subprocess.run(
        [sys.executable, "-m", "megatron_glm.training.pretrain", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MEGATRON_GLM_FAULT": fault},
    )


@pytest.mark.slow
def test_losses_are_bitwise_equal_with_and_without_workers_and_data_wait_is_logged(tmp_path, data):
    losses = {}
    for workers in (0, 2):
        save = str(tmp_path / f"w{workers}" / "ckpt")
        done = run(pretrain_args(data, save, ["--num-workers", str(workers)]))
        assert done.returncode == 0, done.stderr[-3000:]
        rows = records(save)
        assert all(r["data_wait_ms"] >= 0 for r in rows) and "data wait" in done.stdout
        losses[workers] = [r["lm_loss"] for r in rows]
    assert len(losses[0]) == 6 and losses[0] == losses[2]


@pytest.mark.slow
def test_a_worker_that_dies_stops_the_run_with_the_samples_and_keeps_the_checkpoints(
    tmp_path, data
):
    save = str(tmp_path / "ckpt")
    # sample 17 is in step 5 (samples 16..19): the checkpoints up to step 4 are kept (the loader runs ahead,
    # so the run may stop before step 4 is done, never after step 5)
    result = run(pretrain_args(data, save, ["--num-workers", "2"]), fault="worker_crash:17")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "a data-loader worker died reading or collating sample 17 " in result.stderr
    assert open(os.path.join(save, "latest")).read().strip() in ("iter_0000002", "iter_0000004")
    assert "iter 5/" not in result.stdout
