"""The GLM model: mask semantics, attention paths, KV-cache generation, shape checks."""

import dataclasses

import numpy as np
import pytest
import torch

from megatron_glm.config import ModelConfig, preset
from megatron_glm.data.blank_infilling import (
    BlankInfillingCollator,
    BlankInfillingConfig,
    SpecialIds,
)
from megatron_glm.model.attention import interval_attention
from megatron_glm.model.generation import GenerationConfig, _feed, fill_blanks
from megatron_glm.model.glm import GLMModel, KVCache

SP = SpecialIds(pad=0, mask=1, smask=2, gmask=3, sop=4, eop=5)
VOCAB = 128


def model_for(kind: str, **kw) -> GLMModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        vocab_size=VOCAB,
        position_embedding_type=kind,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **kw,
    )
    return GLMModel(cfg).eval()


def batch(packed=False, index=3):
    collate = BlankInfillingCollator(BlankInfillingConfig(seq_length=64, packed=packed), SP)
    text = np.random.default_rng(index).integers(6, VOCAB, 64)
    return collate([(index, {"text": text, "document_lengths": np.array([25, 39])})])


def logits(model, b, tokens=None):
    return model(
        b["tokens"] if tokens is None else tokens, b["position_ids"], b["attn_lo"], b["attn_hi"]
    )


KINDS = ["learned_2d", "rotary_2d", "rotary_1d"]


@pytest.mark.parametrize(
    "kind, options",
    [
        ("learned_2d", {}),
        ("rotary_2d", {}),
        ("learned_2d", {"deepnorm": True}),
        ("rotary_2d", {"geglu": True}),
        ("rotary_1d", {"geglu": True, "deepnorm": True}),
    ],
)
def test_part_b_never_leaks_backwards(kind, options):
    model, b = model_for(kind, **options), batch()
    sep = int(b["attn_hi"][0, 0])
    base = logits(model, b)
    for j in (sep, sep + 3, int(b["loss_mask"][0].nonzero()[-1])):
        changed = b["tokens"].clone()
        changed[0, j] = (changed[0, j] + 7) % VOCAB
        out = logits(model, b, changed)
        assert torch.allclose(out[0, :j], base[0, :j], atol=1e-6), (
            "Part A and earlier Part B are unchanged"
        )
        assert not torch.allclose(out[0, j : j + 1], base[0, j : j + 1]), (
            "the changed position itself changes"
        )


@pytest.mark.parametrize("kind", KINDS)
def test_part_a_is_seen_by_everything(kind):
    model, b = model_for(kind), batch()
    sep = int(b["attn_hi"][0, 0])
    base = logits(model, b)
    changed = b["tokens"].clone()
    changed[0, sep - 1] = (changed[0, sep - 1] + 5) % VOCAB  # the last Part A token
    out = logits(model, b, changed)
    end = int(b["loss_mask"][0].nonzero()[-1]) + 1
    differs = (out[0, :end] - base[0, :end]).abs().amax(-1) > 1e-6
    assert differs.all(), "every Part A and Part B position depends on every Part A token"


def test_packed_segments_never_see_each_other():
    model, b = model_for("learned_2d"), batch(packed=True)
    lo = b["attn_lo"][0]
    starts = sorted(
        set(lo.tolist()) - {i for i in range(64) if b["tokens"][0, i] == SP.pad and lo[i] == i}
    )
    assert len(starts) >= 2, "two documents give two segments"
    second = starts[1]
    base = logits(model, b)
    changed = b["tokens"].clone()
    changed[0, :second] = (changed[0, :second] + 11) % VOCAB  # rewrite the whole first segment
    out = logits(model, b, changed)
    assert torch.allclose(out[0, second:], base[0, second:], atol=1e-6)


def test_sdpa_equals_the_dense_eager_reference():
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    b = batch(packed=True)
    lo, hi = b["attn_lo"][:, :40].expand(2, 40), b["attn_hi"][:, :40].expand(2, 40)
    torch.testing.assert_close(
        interval_attention(q, k, v, lo, hi, impl="sdpa"),
        interval_attention(q, k, v, lo, hi, impl="eager"),
        atol=1e-5,
        rtol=1e-5,
    )
    # the eager path is the textbook definition: softmax over the allowed keys only
    scores = q[0, 0] @ k[0, 0].T / 4.0
    row = 5
    allowed = slice(int(lo[0, row]), int(hi[0, row]))
    expected = torch.softmax(scores[row, allowed], -1) @ v[0, 0, allowed]
    torch.testing.assert_close(
        interval_attention(q, k, v, lo, hi, impl="eager")[0, 0, row], expected
    )


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_logits_equal_full_recompute(kind):
    """Part A once, then [sop] and tokens one by one == one pass over the whole sequence."""
    model = model_for(kind, geglu=kind == "rotary_2d")
    part_a = [9, 10, 1, 11, 12, 1, 13]  # two [MASK]s at 2 and 5
    spans = [[20, 21, 22], [30, 31]]
    cache = KVCache(model.cfg.num_layers)
    a = len(part_a)
    pos = torch.stack([torch.arange(a), torch.zeros(a, dtype=torch.long)])[None]
    model(
        torch.tensor([part_a]),
        pos,
        torch.zeros(1, a, dtype=torch.int32),
        torch.full((1, a), a, dtype=torch.int32),
        cache,
    )
    incremental = []
    for mask_pos, span in zip((2, 5), spans):
        for j, t in enumerate([SP.sop] + span):
            incremental.append(
                _feed(
                    model,
                    cache,
                    torch.tensor([[t]]),
                    torch.tensor([[mask_pos]]),
                    torch.tensor([[j + 1]]),
                    VOCAB,
                )[0]
            )
    tokens = part_a + [SP.sop] + spans[0] + [SP.sop] + spans[1]
    n = len(tokens)
    pos0 = list(range(a)) + [2] * 4 + [5] * 3
    pos1 = [0] * a + [1, 2, 3, 4] + [1, 2, 3]
    lo = torch.zeros(1, n, dtype=torch.int32)
    hi = torch.tensor([[a] * a + list(range(a + 1, n + 1))], dtype=torch.int32)
    full = model(torch.tensor([tokens]), torch.tensor([[pos0, pos1]]), lo, hi)[0, a:]
    torch.testing.assert_close(torch.stack(incremental), full, atol=1e-5, rtol=1e-5)


def test_glm_130b_positions_follow_its_generation_rule():
    """GLM-130B's 1D positions (THUDM/GLM-130B generate.py): a [gMASK] at the end of Part A is generated
    at positions that go on counting (Part A 0..a-1, [sop] a, ...); a [MASK] span stays at its blank."""
    text = np.random.default_rng(7).integers(6, VOCAB, 60)
    document = BlankInfillingConfig(
        seq_length=64, token_prob=0.0, gpt_infill_prob=1.0, positions_1d=True
    )
    b = BlankInfillingCollator(document, SP)([(3, {"text": text, "document_lengths": [60]})])
    tokens, (pos0, pos1) = b["tokens"][0], b["position_ids"][0]
    a = int((tokens == SP.gmask).nonzero()) + 1  # the [gMASK] ends Part A
    used = int((tokens != SP.pad).sum())
    assert tokens[a] == SP.sop and torch.equal(pos0[:used], torch.arange(used))
    assert torch.equal(pos1[a:used], torch.arange(1, used - a + 1))

    token = BlankInfillingConfig(seq_length=64, positions_1d=True)
    b = BlankInfillingCollator(token, SP)([(3, {"text": text, "document_lengths": [60]})])
    flat = BlankInfillingConfig(seq_length=64)
    assert torch.equal(
        b["position_ids"],
        BlankInfillingCollator(flat, SP)([(3, {"text": text, "document_lengths": [60]})])[
            "position_ids"
        ],
    ), "[MASK] spans keep their blank's position"

    # generation feeds a [gMASK] span at the positions one forward over the whole sequence uses
    model = model_for("rotary_1d", geglu=True, deepnorm=True)
    part_a, span = [9, 10, 11, 12, SP.gmask], [20, 21, 22]
    a = len(part_a)
    cache = KVCache(model.cfg.num_layers)
    zeros = torch.zeros(1, a, dtype=torch.long)
    bounds = torch.zeros(1, a, dtype=torch.int32), torch.full((1, a), a, dtype=torch.int32)
    model(torch.tensor([part_a]), torch.stack([torch.arange(a)[None], zeros], 1), *bounds, cache)
    fed = [
        _feed(
            model,
            cache,
            torch.tensor([[t]]),
            torch.tensor([[a - 1]]),
            torch.tensor([[j + 1]]),
            VOCAB,
            True,
        )[0]
        for j, t in enumerate([SP.sop] + span)
    ]
    tokens = part_a + [SP.sop] + span
    n = len(tokens)
    positions = torch.tensor([[list(range(n)), [0] * a + list(range(1, n - a + 1))]])
    hi = torch.tensor([[a] * a + list(range(a + 1, n + 1))], dtype=torch.int32)
    full = model(torch.tensor([tokens]), positions, torch.zeros(1, n, dtype=torch.int32), hi)
    torch.testing.assert_close(torch.stack(fed), full[0, a:], atol=1e-5, rtol=1e-5)


def test_glm_130b_preset_is_the_published_model():
    """About 130B parameters (the paper's count) in 70 layers, hidden 12,288, GeGLU 32,768, 1D rotary."""
    from megatron_glm.model.parallelize import count_parameters

    cfg = preset("glm-130b", vocab_size=150528)
    cfg.validate(2048)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == (70, 12288, 96)
    assert (
        cfg.geglu
        and cfg.deepnorm
        and cfg.positions_1d
        and cfg.embedding_gradient_shrink_alpha == 0.1
    )
    # per layer 4h^2 (attention) + 3 h f (GeGLU's two input halves and its output), plus the embedding
    assert count_parameters(cfg, 1) == pytest.approx(130e9, rel=0.02)


class ToyTokenizer:
    """Ids are characters' code points (small alphabet); enough to drive fill_blanks."""

    mask_id, smask_id, gmask_id, sop_id, eop_id = 1, 2, 3, 4, 5
    vocab_size = 106  # the model's rows past these (VOCAB = 128) are Megatron's padding

    def encode(self, text, allow_special=True):
        return [1 if ch == "_" else 6 + (ord(ch) % 100) for ch in text]

    def decode(self, ids):
        outside = [i for i in ids if i >= self.vocab_size]
        assert not outside, (
            f"token ids {outside} are outside this tokenizer's {self.vocab_size} ids"
        )
        return "".join("?" if i < 6 else chr(i - 6 + 32) for i in ids)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_fill_blanks_strategies(strategy):
    model = model_for("learned_2d")
    cfg = GenerationConfig(strategy, max_new_tokens=5, num_beams=3, top_k=10, top_p=0.9, seed=0)
    filled, spans = fill_blanks(model, ToyTokenizer(), "ab_cd_e", cfg)
    assert len(spans) == 2 and all(len(s) <= 5 for s in spans)
    again = fill_blanks(model, ToyTokenizer(), "ab_cd_e", cfg)
    assert (filled, spans) == again, "seeded generation is reproducible"
    if strategy == "greedy":  # the first greedy token is the argmax after [sop] at the first blank
        cache = KVCache(2)
        ids = ToyTokenizer().encode("ab_cd_e")
        a = len(ids)
        pos = torch.stack([torch.arange(a), torch.zeros(a, dtype=torch.long)])[None]
        model(
            torch.tensor([ids]),
            pos,
            torch.zeros(1, a, dtype=torch.int32),
            torch.full((1, a), a, dtype=torch.int32),
            cache,
        )
        first = int(
            _feed(
                model,
                cache,
                torch.tensor([[4]]),
                torch.tensor([[2]]),
                torch.tensor([[1]]),
                ToyTokenizer.vocab_size,
            ).argmax()
        )
        if first == ToyTokenizer.eop_id:
            assert spans[0] == ""
        else:
            assert spans[0][:1] == ToyTokenizer().decode([first])
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        fill_blanks(model, ToyTokenizer(), "abc", cfg)


@pytest.mark.parametrize(
    "strategy, temperature",
    [("greedy", 1.0), ("sample", 5.0), ("sample", float("inf")), ("beam", 1.0)],
)
def test_the_padding_rows_of_the_vocabulary_are_never_generated(strategy, temperature):
    """Megatron pads the embedding past the tokenizer's ids; those rows are untrained and must never be drawn,
    even when their logits are the largest (here made so) or every logit is alike (an infinite temperature)."""
    model = model_for("learned_2d")
    with torch.no_grad():
        model.word_embeddings.weight[ToyTokenizer.vocab_size :] *= 50.0
    cfg = GenerationConfig(strategy, max_new_tokens=6, num_beams=3, temperature=temperature, seed=1)
    for seed in range(4):
        _, spans = fill_blanks(
            model, ToyTokenizer(), "ab_cd_e", dataclasses.replace(cfg, seed=seed)
        )
        assert len(spans) == 2  # decode asserts every id is the tokenizer's


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "not divisible"),
        (dict(vocab_size=0), "vocab size"),
        (dict(position_embedding_type="alibi"), "use one of learned_2d, rotary_2d, rotary_1d"),
        (dict(hidden_dropout=1.5), "hidden-dropout"),
    ],
)
def test_impossible_shapes_are_named(change, message):
    cfg = preset("glm-tiny", vocab_size=VOCAB)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match="exceeds --max-position-embeddings"):
        preset("glm-tiny", vocab_size=VOCAB).validate(seq_length=1024)


def test_deepnorm_is_post_ln_with_scaled_residuals():
    model = model_for("learned_2d", deepnorm=True)
    layer = model.transformer.layers[0]
    assert layer.alpha == pytest.approx((2 * 2) ** 0.5)
    x = torch.randn(1, 5, 64)
    pos = torch.zeros(1, 2, 5, dtype=torch.long)
    lo, hi = torch.zeros(1, 5, dtype=torch.int32), torch.full((1, 5), 5, dtype=torch.int32)
    h = layer.input_layernorm(layer.alpha * x + layer.attention(x, pos, lo, hi))
    expected = layer.post_attention_layernorm(layer.alpha * h + layer.mlp(h))
    torch.testing.assert_close(layer(x, pos, lo, hi), expected)
    out = layer(x, pos, lo, hi)
    (
        torch.testing.assert_close(out.mean(-1), torch.zeros(1, 5), atol=1e-5, rtol=0),
        "post-LN output is normalised",
    )


def test_presets_have_the_published_sizes():
    expected = {
        "glm-base": (12, 768, 12),
        "glm-large": (24, 1024, 16),
        "glm-410m": (30, 1024, 16),
        "glm-515m": (30, 1152, 18),
        "glm-2b": (36, 2048, 32),
        "glm-10b": (48, 4096, 64),
    }
    for name, (layers, hidden, heads) in expected.items():
        cfg = preset(name, vocab_size=30592)
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == (layers, hidden, heads)
        assert cfg.ffn_hidden_size == 4 * hidden
    model = GLMModel(preset("glm-tiny", vocab_size=VOCAB))
    assert (
        model.word_embeddings.weight is not None
        and model.transformer.position_embeddings.num_embeddings == 513
    )


# learned 2D takes the fused embedding, rotary the plain lookup
@pytest.mark.parametrize("kind", KINDS)
def test_embedding_gradient_shrink(kind):
    """GLM-130B's shrink: forward bitwise unchanged; the word embedding's gradient from its lookup times alpha.

    The table is tied to the output layer, whose gradient share must stay: with alpha 0 only that share is
    left, so ``g(alpha) - g(0) == alpha * (g(1) - g(0))``; the other parameters' gradients do not change.
    """
    b = batch()
    grads, outs = {}, {}
    for alpha in (1.0, 0.1, 0.0):
        model = model_for(kind, embedding_gradient_shrink_alpha=alpha)
        out = logits(model, b)
        loss, _, _ = model.loss(out, b["labels"], b["loss_mask"].float())
        loss.backward()
        outs[alpha] = out.detach()
        grads[alpha] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(outs[0.1], outs[1.0]) and torch.equal(outs[0.0], outs[1.0]), (
        "the forward is untouched"
    )
    emb = "word_embeddings.weight"
    lookup_share = grads[1.0][emb] - grads[0.0][emb]
    assert lookup_share.abs().max() > 0
    # the differences cancel the output's share: absolute tolerance
    scale = float(grads[1.0][emb].abs().max())
    torch.testing.assert_close(
        grads[0.1][emb] - grads[0.0][emb], 0.1 * lookup_share, rtol=0, atol=1e-5 * scale
    )
    assert float((0.1 * lookup_share).abs().max()) > 1e-2 * scale, (
        "the lookup's share is large enough to test"
    )
    for name in grads[1.0]:
        if name != emb:
            torch.testing.assert_close(grads[0.1][name], grads[1.0][name], rtol=0, atol=0, msg=name)


def test_a_preset_keeps_its_switches_and_a_given_flag_overrides_it():
    from megatron_glm.config import model_from_flags
    from megatron_glm.training.arguments import build_parser

    def model(*flags):
        return model_from_flags(build_parser().parse_args(["--data-path", "x", *flags]), 1000, 256)

    big = model("--preset", "glm-130b")
    assert big.geglu and big.deepnorm and big.positions_1d and big.ffn_hidden_size == 32768
    learned = model("--preset", "glm-130b", "--position-embedding-type", "learned_2d")
    assert learned.position_embedding_type == "learned_2d" and learned.geglu
    # a size given equal to the preset-less default is still given
    small = model("--preset", "glm-large", "--hidden-size", "128", "--num-attention-heads", "4")
    assert (small.hidden_size, small.num_attention_heads, small.ffn_hidden_size) == (128, 4, 512)
