"""Fused kernels equal their torch references, and the references equal the GLM mask's definition.

On the CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (conftest) in fp32 and fp16
(the interpreter has no bf16 arithmetic) with small tiles, so short odd lengths still span
several tiles. With a GPU the same tests also run on CUDA in fp16 and bf16.
"""

import warnings

import pytest
import torch

from megatron_glm import kernels
from megatron_glm.config import ModelConfig
from megatron_glm.kernels import reference
from megatron_glm.model.glm import GLMModel

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    (d, dt)
    for d in DEVICES
    for dt in ((torch.float32, torch.float16) if d == "cpu" else (torch.float16, torch.bfloat16))
]
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


@pytest.fixture(autouse=True)
def triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


def glm_rows(layouts, length):
    """Bounds and an independent dense mask from segment layouts.

    ``layouts``: per row, a list of ``(start, sep, end)`` segments (Part A is ``[start, sep)``,
    Part B ``[sep, end)``); positions after the last segment are padding.
    """
    lo = torch.empty(len(layouts), length, dtype=torch.int32)
    hi = torch.empty_like(lo)
    dense = torch.zeros(len(layouts), length, length, dtype=torch.bool)
    for r, segments in enumerate(layouts):
        lo[r] = torch.arange(length)
        hi[r] = torch.arange(length) + 1
        for i in range(length):
            dense[r, i, i] = True  # padding attends to itself
        for start, sep, end in segments:
            for i in range(start, end):
                lo[r, i], hi[r, i] = start, max(sep, i + 1)
                dense[r, i, :] = False
                for j in range(start, end):
                    # all of Part A; Part B causally
                    dense[r, i, j] = j < sep or (i >= sep and j <= i)
    return lo, hi, dense


LAYOUTS = {
    "one-segment": ([[(0, 23, 37)], [(0, 9, 37)]], 37),
    "packed+padding": ([[(0, 5, 12), (12, 30, 41), (41, 44, 47)], [(0, 16, 33)]], 50),
    "all-part-a": ([[(0, 40, 40)]], 40),
    "gpt-like": ([[(0, 1, 29)]], 29),
}


def qkv(b, h, sq, sk, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, h, s, d, generator=g).to(device, dtype).requires_grad_()
        for s in (sq, sk, sk)
    ]


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(
        out.device, out.dtype
    )
    return torch.autograd.grad(out, inputs, g)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ---------------------------------------------------------------- references vs the definition


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_mask_and_attention_match_the_glm_definition(layout):
    rows, length = LAYOUTS[layout]
    lo, hi, dense = glm_rows(rows, length)
    assert torch.equal(reference.interval_mask(lo, hi, length), dense)
    q, k, v = (t.detach() for t in qkv(len(rows), 2, length, length, 8, torch.float64, "cpu"))
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    expected = torch.softmax(scores.masked_fill(~dense[:, None], float("-inf")), -1) @ v  # fp64
    torch.testing.assert_close(
        reference.attention_reference(q, k, v, lo, hi), expected, atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(kernels.sdpa_attention(q, k, v, lo, hi), expected)


def test_reference_rotary_is_a_complex_rotation_of_each_half():
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    pos = torch.randint(0, 50, (2, 2, 5))
    out = reference.rotary_2d_reference(x, pos, base=100.0)
    for half, row in ((slice(0, 8), 0), (slice(8, 16), 1)):
        part = x[..., half]
        z = torch.complex(part[..., :4], part[..., 4:])  # pairs (i, i + d/2) as complex numbers
        freqs = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
        rotated = z * torch.polar(
            torch.ones(1, dtype=torch.float64), pos[:, row, None, :, None] * freqs
        )
        torch.testing.assert_close(
            out[..., half], torch.cat([rotated.real, rotated.imag], -1), atol=1e-5, rtol=0
        )


def test_reference_1d_rotary_is_a_complex_rotation_of_the_whole_head():
    """GLM-130B's: pairs (i, i + d/2) of the whole head turned by position x base^(-2i/d)."""
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    pos = torch.randint(0, 50, (2, 5))
    z = torch.complex(x[..., :8], x[..., 8:])
    freqs = 100.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    rotated = z * torch.polar(torch.ones(1, dtype=torch.float64), pos[:, None, :, None] * freqs)
    torch.testing.assert_close(
        reference.rotary_1d_reference(x, pos, base=100.0),
        torch.cat([rotated.real, rotated.imag], -1),
        atol=1e-5,
        rtol=0,
    )


# ---------------------------------------------------------------- flash attention


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize(
    "layout, head_dim",
    [("one-segment", 16), ("packed+padding", 24), ("all-part-a", 32), ("gpt-like", 64)],
)
def test_flash_attention_equals_reference(device, dtype, layout, head_dim):
    rows, length = LAYOUTS[layout]
    lo, hi, _ = glm_rows(rows, length)
    lo, hi = lo.to(device), hi.to(device)
    q, k, v = qkv(len(rows), 2, length, length, head_dim, dtype, device)
    from megatron_glm.kernels.triton_attention import glm_flash_attention

    out = glm_flash_attention(q, k, v, lo, hi)
    expected = reference.attention_reference(q, k, v, lo, hi)
    assert_close(out, expected, dtype)
    for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("device, dtype", CASES[:1] + CASES[2:])
def test_flash_attention_with_a_kv_cache_shape(device, dtype):
    """Generation: fewer queries than keys (``Sq != Sk``), bounds in key indices."""
    q, k, v = qkv(2, 2, 3, 29, 16, dtype, device)
    lo = torch.zeros(2, 3, dtype=torch.int32, device=device)
    hi = torch.tensor([[27, 28, 29], [20, 21, 22]], dtype=torch.int32, device=device)
    from megatron_glm.kernels.triton_attention import glm_flash_attention

    out = glm_flash_attention(q, k, v, lo, hi)
    expected = reference.attention_reference(q, k, v, lo, hi)
    assert_close(out, expected, dtype)
    for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
        assert_close(got, want, dtype)


def test_flash_attention_never_reads_key_tiles_outside_the_union():
    """NaN in keys no query may see: a dense computation turns them into NaN (0 * NaN), the kernel skips them."""
    q, k, v = (t.detach() for t in qkv(1, 1, 20, 64, 16, torch.float32, "cpu"))
    lo = torch.full((1, 20), 32, dtype=torch.int32)
    hi = torch.arange(40, 60, dtype=torch.int32)[None]
    # two whole 16-key tiles before every interval
    k[..., :32, :], v[..., :32, :] = (
        float("nan"),
        float("nan"),
    )
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    from megatron_glm.kernels.triton_attention import glm_flash_attention

    out = glm_flash_attention(q, k, v, lo, hi)
    assert torch.isfinite(out).all()
    dq, dk, dv = grads(out, (q, k, v))
    assert (
        torch.isfinite(dq).all() and (dk[..., :32, :] == 0).all() and (dv[..., :32, :] == 0).all()
    )
    assert torch.isnan(reference.attention_reference(q, k, v, lo, hi)).all(), (
        "a dense path is poisoned (0 * NaN)"
    )
    keep = slice(32, 60)
    expected = reference.attention_reference(
        q[..., :, :], k[..., keep, :], v[..., keep, :], lo - 32, hi - 32
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attention_dropout_uses_one_mask_forward_and_backward(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows, length = LAYOUTS["packed+padding"]
    lo, hi, _ = glm_rows(rows, length)
    lo, hi = lo.to(device), hi.to(device)
    q, k, v = qkv(2, 2, length, length, 16, dtype, device)
    from megatron_glm.kernels.triton_attention import dropout_keep_mask, glm_flash_attention

    torch.manual_seed(7)
    if device == "cuda":
        torch.cuda.manual_seed(7)
    out = glm_flash_attention(q, k, v, lo, hi, dropout_p=0.25)
    torch.manual_seed(7)
    if device == "cuda":
        torch.cuda.manual_seed(7)
    # the draw the kernel made
    seed = torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
    keep = dropout_keep_mask(seed, 4, length, length, 0.25).view(2, 2, length, length)
    assert 0.70 < keep.float().mean().item() < 0.80
    expected = reference.attention_reference(q, k, v, lo, hi, dropout_p=0.25, keep_mask=keep)
    assert_close(out, expected, dtype)
    for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
        assert_close(got, want, dtype)
    again = glm_flash_attention(q, k, v, lo, hi, dropout_p=0.25)
    assert not torch.equal(again, out), "a new call draws a new mask"


# ---------------------------------------------------------------- masked softmax


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("single", [True, False])
def test_masked_softmax_equals_reference(device, dtype, single):
    rows, length = LAYOUTS["packed+padding"]
    lo, hi, _ = glm_rows(rows, length)
    lo, hi = lo.to(device), hi.to(device)
    scores = (torch.randn(2, 3, length, length) * 4).to(device, dtype).requires_grad_()
    from megatron_glm.kernels.triton_softmax import glm_masked_softmax

    out = glm_masked_softmax(scores, lo, hi, 0.3, single=single)
    expected = reference.masked_softmax_reference(scores, lo, hi, 0.3)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    assert_close(grads(out, (scores,))[0], grads(expected, (scores,))[0], dtype)


def test_masked_softmax_has_no_length_cap():
    """Rows longer than the in-register limit (and Megatron's 4096) take the chunked path."""
    from megatron_glm.kernels.triton_softmax import MAX_SINGLE, glm_masked_softmax

    sk = MAX_SINGLE + 500
    scores = torch.randn(1, 1, 3, sk, requires_grad=True)
    lo = torch.tensor([[0, 100, 8000]], dtype=torch.int32)
    hi = torch.tensor([[sk, 9000, 8001]], dtype=torch.int32)
    out = glm_masked_softmax(scores, lo, hi, 1.0)
    expected = reference.masked_softmax_reference(scores, lo, hi, 1.0)
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(
        grads(out, (scores,))[0], grads(expected, (scores,))[0], atol=1e-7, rtol=1e-5
    )


# ---------------------------------------------------------------- embeddings and rotary


@pytest.mark.parametrize("device, dtype", CASES)
def test_fused_embedding_accumulates_repeated_indices(device, dtype):
    b, s, hidden, vocab, rows = 3, 19, 40, 11, 25
    g = torch.Generator().manual_seed(0)
    # 57 tokens over 11 rows: many repeats
    tokens = torch.randint(0, vocab, (b, s), generator=g).to(device)
    position_ids = torch.stack(
        [torch.arange(s).expand(b, s), torch.zeros(b, s, dtype=torch.long)], 1
    ).clone()
    # Part B; block position 0 is shared by all of Part A
    position_ids[:, 1, 14:] = torch.arange(1, 6)
    position_ids = position_ids.to(device)
    tables = [
        (torch.randn(n, hidden, generator=g) * 0.5).to(device, dtype).requires_grad_()
        for n in (vocab, rows, rows)
    ]
    from megatron_glm.kernels.triton_embedding import glm_embedding_2d

    out = glm_embedding_2d(tokens, position_ids, *tables)
    exact = [
        t.detach().float().requires_grad_() for t in tables
    ]  # fp32 sums: torch's fp16 backward rounds more
    expected = reference.embedding_2d_reference(tokens, position_ids, *exact)
    assert_close(out, expected, dtype)
    for got, want in zip(grads(out, tables), grads(expected, exact)):
        assert got.dtype == dtype
        assert_close(got, want, dtype)


@pytest.mark.parametrize("device, dtype", CASES)
def test_fused_rotary_equals_reference_on_strided_qkv_views(device, dtype):
    b, s, heads, d = 2, 13, 3, 32
    qkv_out = torch.randn(b, s, 3 * heads * d).to(device, dtype).requires_grad_()
    # the model's views, not contiguous
    q, k, _ = qkv_out.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
    position_ids = torch.stack([torch.randint(0, 500, (b, s)), torch.randint(0, 40, (b, s))], 1).to(
        device
    )
    from megatron_glm.kernels.triton_rotary import rotary_2d_qk

    got_q, got_k = rotary_2d_qk(q, k, position_ids)
    want_q, want_k = (reference.rotary_2d_reference(t, position_ids) for t in (q, k))
    assert_close(got_q, want_q, dtype)
    assert_close(got_k, want_k, dtype)
    g = torch.randn(2, *got_q.shape).to(device, dtype)
    (got,) = torch.autograd.grad((got_q * g[0]).sum() + (got_k * g[1]).sum(), qkv_out)
    (want,) = torch.autograd.grad((want_q * g[0]).sum() + (want_k * g[1]).sum(), qkv_out)
    assert_close(got, want, dtype)


# ---------------------------------------------------------------- dispatch and the model


def test_dispatch_auto_uses_the_reference_off_cuda(monkeypatch):
    kernels.set_backend("auto")

    def boom(*_):
        raise AssertionError("a Triton kernel ran on the CPU under --kernels auto")

    import megatron_glm.kernels.triton_embedding as emb

    monkeypatch.setattr(emb, "glm_embedding_2d", boom)
    w = torch.randn(5, 4)
    out = kernels.embedding_2d(
        torch.tensor([[1, 2]]), torch.zeros(1, 2, 2, dtype=torch.long), w, w, w
    )
    torch.testing.assert_close(out, w[[1, 2]][None] + 2 * w[0])


def test_dispatch_warns_once_and_falls_back_on_an_unsupported_call():
    q, k, v = (torch.randn(1, 1, 6, 8, dtype=torch.float64) for _ in range(3))
    lo, hi = torch.zeros(1, 6, dtype=torch.int32), torch.full((1, 6), 6, dtype=torch.int32)
    with pytest.warns(
        RuntimeWarning, match="flash_attention: dtype torch.float64.*torch reference"
    ):
        out = kernels.flash_attention(q, k, v, lo, hi)
    torch.testing.assert_close(
        out, reference.attention_reference(q, k, v, lo, hi), atol=1e-6, rtol=1e-5
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.flash_attention(q, k, v, lo, hi)  # the same reason again: silent


def test_forcing_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="need a CUDA device.*TRITON_INTERPRET=1"):
        kernels.embedding_2d(torch.tensor([[1]]), torch.zeros(1, 2, 1, dtype=torch.long), w, w, w)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.set_backend("cuda")


@pytest.mark.parametrize(
    "kind, impl", [("learned_2d", "flash"), ("rotary_2d", "flash"), ("learned_2d", "softmax")]
)
def test_model_on_triton_kernels_equals_the_reference_model(kind, impl):
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=48,
        num_attention_heads=3,
        vocab_size=64,
        max_position_embeddings=40,
        position_embedding_type=kind,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = GLMModel(cfg)
    rows, length = LAYOUTS["packed+padding"]
    lo, hi, _ = glm_rows(rows, length)
    tokens = torch.randint(0, 64, (2, length))
    pos = torch.stack([torch.arange(length) % 40, (torch.arange(length) % 7)], 0).expand(
        2, 2, length
    )

    def run(backend, attention):
        kernels.set_backend(backend)
        model.set_attention_impl(attention)
        model.zero_grad()
        logits = model(tokens, pos, lo, hi)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads_ = run("triton", impl)
    ref_logits, ref_grads = run("torch", "eager")
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    for name, g in grads_.items():
        torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("impl, dtype", [("sdpa", torch.bfloat16), ("flash", torch.float16)])
def test_low_precision_attention_takes_its_softmax_in_fp32(impl, dtype):
    """What --attention-softmax-in-fp32 asks for, every implementation does: in 16 bits it stays as close to
    fp32 attention as the output's rounding allows, far closer than a softmax taken in 16 bits (the Triton
    interpreter has no bf16, so the kernel runs fp16 here)."""
    from megatron_glm.model.attention import interval_attention

    torch.manual_seed(0)
    q, k, v = (3 * torch.randn(3, 1, 2, 64, 32)).to(dtype).unbind(0)
    lo = torch.zeros(1, 64, dtype=torch.int32)
    hi = torch.arange(1, 65, dtype=torch.int32)[None].clamp(min=20)
    exact = reference.attention_reference(q.float(), k.float(), v.float(), lo, hi)
    got = interval_attention(q, k, v, lo, hi, impl=impl).float()
    mask = reference.interval_mask(lo, hi, 64)[:, None]
    scores = (q.float() @ k.float().transpose(-1, -2) * 32**-0.5).masked_fill(~mask, float("-inf"))
    low = (torch.softmax(scores.to(dtype), -1) @ v).float()
    assert (got - exact).abs().max() < 0.25 * (low - exact).abs().max()


def test_the_fused_masked_softmax_computes_in_fp32():
    torch.manual_seed(0)
    scores = (20 * torch.randn(2, 2, 64, 64)).half()
    lo, hi = torch.zeros(2, 64, dtype=torch.int32), torch.full((2, 64), 64, dtype=torch.int32)
    exact = torch.softmax(scores.float(), -1)
    got = kernels.masked_softmax(scores, lo, hi).float()
    assert ((got - exact).abs() <= exact * 2**-10 + 2**-24).all(), (
        "the fp32 softmax, rounded once to fp16"
    )


@pytest.mark.parametrize("device", DEVICES)
# a whole GLM row; a KV-cached step (queries after keys)
@pytest.mark.parametrize("sq, sk", [(40, 40), (7, 45)])
def test_flex_attention_equals_the_reference(device, sq, sk):
    """--attention-impl flex: PyTorch's FlexAttention under our interval mask (GLM rows and packed segments).
    The CPU has its forward only; on CUDA the backward is checked too."""
    from megatron_glm.model.attention import interval_attention

    torch.manual_seed(0)
    b, h, d = 3, 2, 16
    q = torch.randn(b, h, sq, d, device=device, requires_grad=device == "cuda")
    k, v = (
        torch.randn(b, h, sk, d, device=device, requires_grad=device == "cuda") for _ in range(2)
    )
    i = torch.arange(sk - sq, sk, device=device)
    sep = torch.tensor([sk * 3 // 4, sk // 2, sk - 1], device=device)
    lo = torch.zeros(b, sq, dtype=torch.int32, device=device)
    lo[1] = torch.where(i >= sk // 2, sk // 2, 0)  # row 1: two packed segments
    hi = torch.maximum(sep[:, None], i[None] + 1).to(torch.int32)
    hi[1] = torch.where(
        i >= sk // 2, torch.maximum(i + 1, torch.tensor(sk * 3 // 4, device=device)), sk // 2
    )
    got = interval_attention(q, k, v, lo, hi, impl="flex")
    ref = reference.attention_reference(q, k, v, lo, hi)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    if device == "cuda":
        grads = torch.autograd.grad(got.sum(), (q, k, v))
        expected = torch.autograd.grad(ref.sum(), (q, k, v))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, **TOL[torch.float32])
