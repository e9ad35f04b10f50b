"""Shared fixtures: a real corpus (stdlib docstrings) and a sentencepiece model trained on it.

Built once per test session: the corpus and tokenizer are what users would make with the
project's own CLIs, so every data test runs on realistic text.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

# Triton kernels run in its interpreter on the CPU (before any kernel is built)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_glm.data_prep.stdlib_corpus import write_corpus
from megatron_glm.data_prep.train_tokenizer import train_tokenizer

# Every process the tests start sees this environment's tools first, the launcher tests' included. Otherwise
# DeepSpeed's JIT-built CPU op is compiled by the system's ninja in some processes and by this environment's
# in others, whose build logs disagree: each switch rebuilt it (about 35 s of both cores).
_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built():
    """Build DeepSpeed's CPU communication op once, in one process, before the multi-process runs.

    Every process that initializes DeepSpeed's comm JIT-builds it on first use; on a fresh
    machine that is 2-4 processes compiling into one folder at once (a TP2xPP2 run once took
    SIGABRT there). A failure here is left for the tests that need DeepSpeed to report.
    """
    import fcntl
    import tempfile

    # one build at a time when pytest-xdist runs several sessions: the others wait, then find it built
    with open(os.path.join(tempfile.gettempdir(), "megatron-glm-deepspeed-op.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:  # within pytest-timeout's 300 s for a fixture: a slower build finishes in the first test that needs it
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "from deepspeed.comm.torch import build_shm_op; build_shm_op()",
                ],
                capture_output=True,
                timeout=240,
            )
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Path of a JSONL corpus of 1,500 docstrings, and the texts themselves."""
    root = tmp_path_factory.mktemp("corpus")
    path = str(root / "corpus.jsonl")
    write_corpus(path, max_docs=1500)
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return path, texts


@pytest.fixture(scope="session")
def spm_model(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "spm")
    return train_tokenizer([corpus[0]], prefix, vocab_size=1500, threads=2)


@pytest.fixture(scope="session")
def tokenizer(spm_model):
    from megatron_glm.data.tokenizer import load_tokenizer

    return load_tokenizer(model=spm_model)


@pytest.fixture(scope="session")
def data(tmp_path_factory, corpus, tokenizer, spm_model):
    """(indexed dataset prefix, sentencepiece model): what glm-pretrain runs in the tests train on."""
    from megatron_glm.data_prep.preprocess import preprocess

    root = tmp_path_factory.mktemp("pretrain-data")
    preprocess([corpus[0]], str(root / "docs"), tokenizer.spec, append_eod=True)
    return str(root / "docs_text_document"), spm_model
