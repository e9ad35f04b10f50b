"""An export-hf folder as a transformers user loads it: logits, tokenizer, generate, and back again.

The oracles are ours: GLMModel under the batch contract, the blank-infilling collator's
positions and bounds, GLMTokenizer, and glm-generate's blank filling.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_glm.checkpoint import load_model_weights
from megatron_glm.config import ModelConfig
from megatron_glm.convert.cli import main as convert
from megatron_glm.convert.sources import StateDict
from megatron_glm.convert.writers import write_megatron_glm
from megatron_glm.data.blank_infilling import (
    BlankInfillingCollator,
    BlankInfillingConfig,
    SpecialIds,
)
from megatron_glm.generate import load_for_inference
from megatron_glm.kernels.reference import interval_mask
from megatron_glm.model.generation import GenerationConfig, fill_blanks
from megatron_glm.model.glm import GLMModel

VARIANTS = {
    "learned_2d": {},
    "rotary_2d+geglu": dict(position_embedding_type="rotary_2d", geglu=True),
    "deepnorm": dict(deepnorm=True),
    "glm-130b's (rotary_1d+geglu+deepnorm)": dict(
        position_embedding_type="rotary_1d", geglu=True, deepnorm=True
    ),
}
S = 48
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint(root, tokenizer, **arch):
    """A glm-pretrain checkpoint of a random model (wide enough weights that greedy choices are clear)."""
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=tokenizer.padded_vocab_size(),
        max_position_embeddings=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.08,
        **arch,
    )
    model = GLMModel(cfg, seed=11).eval()
    path = str(root / "ckpt")
    write_megatron_glm(
        path,
        StateDict(model.state_dict(), cfg, {"tokenizer": tokenizer.describe(), "iteration": 5}),
    )
    return path, model


def export(root, ckpt, *flags):
    hf = str(root / "hf")
    assert convert(["export-hf", "--load", ckpt, "--save", hf, *flags]) == 0
    return hf


def load_hf(hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval(),
        AutoTokenizer.from_pretrained(hf, trust_remote_code=True),
    )


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hf-learned")
    ckpt, model = checkpoint(root, tokenizer)
    return ckpt, model, export(root, ckpt)


def samples(tokenizer, texts, **objective):
    collate = BlankInfillingCollator(
        BlankInfillingConfig(seq_length=S, **objective), SpecialIds.from_tokenizer(tokenizer)
    )
    long = [t for t in texts if len(tokenizer.encode(t)) > 2 * S][:4]
    return [collate.encode(i, np.array(tokenizer.encode(t)), None) for i, t in enumerate(long)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_logits_equal_ours_on_training_samples(tmp_path, tokenizer, corpus, variant):
    ckpt, ours = checkpoint(tmp_path, tokenizer, **VARIANTS[variant])
    theirs, _ = load_hf(export(tmp_path, ckpt))
    for row in samples(tokenizer, corpus[1]):  # token objective: several shuffled spans per sample
        tokens = torch.from_numpy(row["tokens"])[None]
        positions = torch.from_numpy(np.stack([row["pos0"], row["pos1"]]))[None]
        real = row["tokens"] != tokenizer.pad_id
        with torch.no_grad():
            expected = ours(
                tokens,
                positions,
                torch.from_numpy(row["attn_lo"])[None],
                torch.from_numpy(row["attn_hi"])[None],
            )
            # the mask comes from the separator; shuffled spans need their positions given
            got = theirs(input_ids=tokens, position_ids=positions).logits
        torch.testing.assert_close(got[0, real], expected[0, real], rtol=1e-5, atol=1e-5)


def test_layout_from_the_separator_is_the_collators(learned, tokenizer, corpus):
    from megatron_glm.convert.hf_files.configuration_megatron_glm import MegatronGLMConfig
    from megatron_glm.convert.hf_files.modeling_megatron_glm import glm_layout

    config = MegatronGLMConfig.from_pretrained(learned[2])
    # the document objective: one [gMASK] span
    one_span = samples(tokenizer, corpus[1], token_prob=0.0)
    for row, in_order in [(r, True) for r in one_span] + [
        (r, False) for r in samples(tokenizer, corpus[1])
    ]:
        real = row["tokens"] != tokenizer.pad_id
        positions, mask = glm_layout(torch.from_numpy(row["tokens"])[None], config)
        expected = interval_mask(
            torch.from_numpy(row["attn_lo"])[None], torch.from_numpy(row["attn_hi"])[None], S
        )
        assert torch.equal(mask[0, 0][real][:, real], expected[0][real][:, real])
        if in_order:
            assert torch.equal(
                positions[0][:, real],
                torch.from_numpy(np.stack([row["pos0"], row["pos1"]]))[:, real],
            )


def test_tokenization_is_ours_on_a_corpus_sample(learned, tokenizer, corpus, tmp_path):
    _, theirs = load_hf(learned[2])
    texts = corpus[1][:300] + [
        "a [MASK] b [sMASK] c[gMASK]",
        "x [sop] y [eop] <unk> [CLS]",
        "number [MASK] seconds",
        "number[MASK]seconds",
        " x  [MASK]  \n y [gMASK]",
    ]
    for text in texts:
        special = theirs(text, add_special_tokens=False)["input_ids"]
        assert special == tokenizer.encode(text, allow_special=True)
        assert theirs.decode(special) == tokenizer.decode(special)
        ids = theirs(text, split_special_tokens=True)["input_ids"]
        assert ids == tokenizer.encode(text)
        assert theirs.decode(ids) == tokenizer.decode(ids)
    assert (
        theirs.mask_token_id,
        theirs.sop_token_id,
        theirs.eop_token_id,
        theirs.gmask_token_id,
    ) == (tokenizer.mask_id, tokenizer.sop_id, tokenizer.eop_id, tokenizer.gmask_id)
    # a tokenizer saved again by transformers loads the same
    theirs.save_pretrained(tmp_path / "saved")
    again = load_hf_tokenizer(tmp_path / "saved")
    assert again(texts[0])["input_ids"] == theirs(texts[0])["input_ids"]


@pytest.mark.parametrize("backend", ["hf", "gpt2", "bert"])
def test_other_tokenizer_backends_are_ours_too(tmp_path, corpus, backend):
    """tokenizer.json and GPT-2 files (specials appended) and BERT's vocab.txt (its own [MASK], [PAD]...)."""
    import tokenizers

    from megatron_glm.convert.writers import write_hf
    from megatron_glm.data.tokenizer import load_tokenizer

    texts = corpus[1][:150] + ["one [MASK] two [PAD] three [sop] <|endoftext|>"]
    if backend == "bert":
        words = sorted({w.lower() for t in texts[:50] for w in t.split() if w.isalpha()})
        (tmp_path / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n"
        )
        ours = load_tokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    else:
        bpe = tokenizers.ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"])
        bpe.save(str(tmp_path / "tokenizer.json"))
        bpe.save_model(str(tmp_path))
        ours = (
            load_tokenizer(model=str(tmp_path / "tokenizer.json"))
            if backend == "hf"
            else load_tokenizer(
                vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt")
            )
        )
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=ours.padded_vocab_size()
    )
    write_hf(
        str(tmp_path / "hf"),
        StateDict(GLMModel(cfg, seed=0).state_dict(), cfg, {"tokenizer": ours.describe()}),
    )
    theirs = load_hf_tokenizer(tmp_path / "hf")
    for text in texts:
        assert theirs(text)["input_ids"] == ours.encode(text, allow_special=True)
        ids = theirs(text, split_special_tokens=True)["input_ids"]
        assert ids == ours.encode(text) and theirs.decode(ids) == ours.decode(ids)
    assert theirs.mask_token_id == ours.mask_id and theirs.eop_token_id == ours.eop_id


def load_hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def test_greedy_generate_fills_the_blank_as_glm_generate_does(learned, tokenizer):
    ckpt, _, hf = learned
    theirs, hf_tokenizer = load_hf(hf)
    ours, our_tokenizer, _ = load_for_inference(ckpt)
    prompts = [
        "Return the [MASK] of a path.",
        "Open the file and [MASK] its lines, then close it again.",
    ]
    new = 12
    expected = [
        fill_blanks(ours, our_tokenizer, p, GenerationConfig(max_new_tokens=new))[1][0]
        for p in prompts
    ]
    eop = hf_tokenizer.eop_token_id
    alone = []
    for prompt in prompts:
        inputs = hf_tokenizer(prompt + "[sop]", return_tensors="pt")
        out = theirs.generate(**inputs, max_new_tokens=new + 1, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
        alone.append(hf_tokenizer.decode([t for t in out.tolist() if t != eop][:new]))
    assert alone == expected
    # left padding
    batch = hf_tokenizer([p + "[sop]" for p in prompts], return_tensors="pt", padding=True)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()
    out = theirs.generate(**batch, max_new_tokens=new + 1, do_sample=False)[
        :, batch["input_ids"].shape[1] :
    ]
    together = [
        hf_tokenizer.decode([t for t in row if t not in (eop, hf_tokenizer.pad_token_id)][:new])
        for row in out.tolist()
    ]
    assert together == expected


@pytest.fixture
def transformers_logs(caplog):
    """transformers' own log lines in ``caplog``: its loggers do not propagate to the root by default, so
    without this a test of its warnings could never fail; and its once-only warnings forgotten, so that
    an earlier test cannot have used one up."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.warning_once.cache_clear()
    transformers_logging.enable_propagation()
    yield caplog
    transformers_logging.disable_propagation()


def test_generate_reuses_the_cache_without_deprecation_warnings(learned, transformers_logs):
    """transformers 5.x names the cache ``cache``: the export's code takes it under that name (and the old
    one), so every step after the prompt feeds one token, and nothing of ours is deprecated."""
    import logging

    _, _, hf = learned
    theirs, hf_tokenizer = load_hf(hf)
    fed = []
    theirs.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    inputs = hf_tokenizer("Return the [MASK] of a path.[sop]", return_tensors="pt")
    with transformers_logs.at_level(logging.WARNING):
        theirs.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert fed == [inputs["input_ids"].shape[1], 1, 1, 1, 1], (
        "each new token alone, the rest from the cache"
    )
    assert not [r for r in transformers_logs.records if "deprecated" in r.getMessage()]


def test_load_run_and_generate_warn_of_nothing(learned, transformers_logs):
    """Every Python warning an error and every transformers log line at WARNING or above a failure, from loading
    the export through a forward pass to generate: our files use nothing transformers deprecates."""
    import logging
    import warnings

    _, _, hf = learned
    with warnings.catch_warnings(), transformers_logs.at_level(logging.WARNING):
        warnings.simplefilter("error")
        theirs, hf_tokenizer = load_hf(hf)
        inputs = hf_tokenizer("Return the [MASK] of a path.[sop]", return_tensors="pt")
        theirs(**inputs)
        theirs.generate(**inputs, max_new_tokens=3, do_sample=False)
        theirs.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert not [r.getMessage() for r in transformers_logs.records if r.levelno >= logging.WARNING]


def test_export_import_round_trip_is_bitwise_through_shards(tmp_path, learned, tokenizer):
    ckpt, model, _ = learned
    # written tensor by tensor, a shard per worker process
    hf = export(tmp_path, ckpt, "--max-shard-size", "100KB", "--workers", "2")
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.exists(os.path.join(hf, s)) for s in shards)
    modes = {n: os.stat(os.path.join(hf, n)).st_mode & 0o777 for n in os.listdir(hf)}
    assert set(modes.values()) == {modes["config.json"]}, (
        f"the weights are as readable as the rest: {modes}"
    )
    theirs, _ = load_hf(hf)  # transformers reads the shards too
    assert all(torch.equal(theirs.state_dict()[n], p) for n, p in model.state_dict().items())

    back = str(tmp_path / "back")
    assert (
        convert(["import-hf", "--load", hf, "--save", back, "--target-tp", "2", "--workers", "2"])
        == 0
    )
    state, meta = load_model_weights(back)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())
    assert meta["iteration"] == 5 and meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint()


def test_bad_exports_are_named(tmp_path, learned, capsys):
    ckpt = learned[0]
    hf = export(tmp_path, ckpt, "--max-shard-size", "100KB")
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    os.remove(os.path.join(hf, sorted(set(index["weight_map"].values()))[1]))
    assert convert(["import-hf", "--load", hf, "--save", str(tmp_path / "x")]) == 1
    assert "is missing 1 of its" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")

    glm4 = tmp_path / "glm4"  # transformers' own GLM-4, which owns model_type "glm"
    glm4.mkdir()
    (glm4 / "config.json").write_text(json.dumps({"model_type": "glm", "num_hidden_layers": 40}))
    (glm4 / "model.safetensors").write_bytes(b"")
    assert convert(["import-hf", "--load", str(glm4), "--save", str(tmp_path / "y")]) == 1
    assert "not a megatron-glm export (model_type 'glm')" in capsys.readouterr().err


@pytest.mark.slow
def test_loads_from_the_checkouts_root_beside_our_kernels_folder(learned, tokenizer):
    """Our top-level ``kernels/`` never shadows Hugging Face's ``kernels`` (transformers needs it to load a model).

    The checkout's root is on sys.path in this pytest process, in ``python -c`` and in ``python -m`` run
    there (and so for a script beside setup.py): each loads the export and fills a blank as glm-generate does.
    """
    import kernels

    from megatron_glm import kernels as ours

    assert hasattr(kernels, "CUDAProperties") and kernels.__file__ != os.path.join(
        ROOT, "kernels", "__init__.py"
    )
    assert ours.__file__ == os.path.join(ROOT, "kernels", "__init__.py") and callable(
        ours.flash_attention
    )
    with pytest.raises(ModuleNotFoundError, match="megatron_glm.data_prep"):
        import data_prep  # noqa: F401  (no package of that name is installed: ours does not answer to it either)

    ckpt, _, hf = learned
    prompt, new = "Return the [MASK] of a path.", 12
    ours_model, our_tokenizer, _ = load_for_inference(ckpt)
    expected = fill_blanks(ours_model, our_tokenizer, prompt, GenerationConfig(max_new_tokens=new))[
        1
    ][0]
    probe = (
        ["-m", "tests.hf_root_probe"],
        [
            "-c",
            "import sys; from tests.hf_root_probe import main; "
            "main(sys.argv[1], sys.argv[2], int(sys.argv[3]))",
        ],
    )
    for how in probe:
        run = subprocess.run(
            [sys.executable, *how, hf, prompt, str(new)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        assert os.path.abspath(got["path0"] or ".") == ROOT
        assert got["kernels"] == kernels.__file__ and got["has_CUDAProperties"]
        assert got["ours"] == ours.__file__ and got["ours_has_flash"]
        assert got["fill"] == expected


def test_non_finite_weights_are_refused_by_every_reader(tmp_path, learned, tokenizer, capsys):
    """One NaN written into an export's weights, and one into a checkpoint's: each reader refuses it by name."""
    import shutil

    from megatron_glm.evaluate import main as evaluate
    from megatron_glm.generate import main as generate

    _, model, hf = learned
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    name = next(k for k in sorted(header) if k != "__metadata__")
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[
        header[name]["dtype"]
    ]
    nan = torch.tensor([float("nan")], dtype=dtype).view(torch.uint8).numpy().tobytes()
    at = 8 + size + header[name]["data_offsets"][0]
    raw[at : at + len(nan)] = nan
    (bad / "model.safetensors").write_bytes(bytes(raw))
    assert convert(["import-hf", "--load", str(bad), "--save", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"1 tensor holds NaN or Inf ({name})" in err and not os.path.exists(tmp_path / "x")
    assert evaluate(["--load", str(bad), "--lm-samples", "1"]) == 1
    assert "holds NaN or Inf" in capsys.readouterr().err

    state = model.state_dict()
    state["word_embeddings.weight"][3, 5] = float("inf")
    ckpt = str(tmp_path / "ckpt")
    write_megatron_glm(
        ckpt, StateDict(state, model.cfg, {"tokenizer": tokenizer.describe(), "iteration": 5})
    )
    assert generate(["--load", ckpt, "--text", "a [MASK] b"]) == 1
    assert "1 tensor holds NaN or Inf (word_embeddings.weight)" in capsys.readouterr().err
    assert convert(["export-hf", "--load", ckpt, "--save", str(tmp_path / "y")]) == 1
    assert "word_embeddings.weight" in capsys.readouterr().err and not os.path.exists(
        tmp_path / "y"
    )


def test_glm_generate_reads_an_export_as_it_reads_the_checkpoint(learned, capsys):
    from megatron_glm.generate import main as generate

    ckpt, _, hf = learned
    texts = [
        "--text",
        "Return the [MASK] of a path.",
        "--text",
        "Open the file and [MASK] its lines.",
    ]
    assert generate(["--load", ckpt, *texts, "--max-new-tokens", "8"]) == 0
    from_checkpoint = capsys.readouterr().out
    assert generate(["--load", hf, *texts, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == from_checkpoint and len(from_checkpoint.splitlines()) == 2
