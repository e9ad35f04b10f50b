"""Blank filling: glm-generate fills ``[MASK]``/``[sMASK]``/``[gMASK]`` in a text, left to right.

Part A (the text with its blanks) is encoded once, bidirectionally, into the KV cache. Each
blank is then generated as GLM was trained: ``[sop]`` at position (mask position, 1), then
tokens at (mask position, 2, 3, ...) until ``[eop]``, each attending to Part A and everything
generated before it (with GLM-130B's 1D positions a ``[gMASK]`` span goes on counting from its
blank instead: mask position + 1, + 2, ...). Greedy, sampling (temperature, top-k, top-p) and beam search choose the
tokens; a finished span is fed back into the cache so later blanks see it. (The command
itself, which reads checkpoints, is ``megatron_glm/generate.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_glm.model.glm import KVCache

if TYPE_CHECKING:
    from megatron_glm.model.glm import GLMModel


@dataclass
class GenerationConfig:
    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if self.strategy not in ("greedy", "sample", "beam"):
            problems.append(f"strategy {self.strategy!r} is not greedy, sample or beam")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if not self.temperature > 0:  # also NaN
            problems.append(
                f"--temperature {self.temperature} must be positive (greedy decoding needs none)"
            )
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k} must be 0 (off) or positive")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p} must be in (0, 1]; 1 turns nucleus sampling off")
        if self.num_beams < 1:
            problems.append(f"--num-beams {self.num_beams} must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))


def _feed(model: GLMModel, cache: KVCache, tokens, pos0, pos1, vocab: int, continues=False):
    """Run ``tokens [B, t]`` after the cache; causal over the new ones. Returns last logits ``[B, vocab]``:
    the rows past the tokenizer's ids (Megatron's padding of the embedding) are never chosen.

    ``continues``: a [gMASK] span under GLM-130B's 1D positions, which go on from the blank's
    (``pos0 + pos1``) where a [MASK] span's stay at it."""
    b, t = tokens.shape
    start = cache.length
    device = tokens.device
    if continues and model.cfg.positions_1d:
        pos0 = pos0 + pos1
    position_ids = torch.stack([pos0, pos1], dim=1)
    lo = torch.zeros(b, t, dtype=torch.int32, device=device)
    hi = torch.arange(start + 1, start + t + 1, dtype=torch.int32, device=device).expand(b, t)
    return model(tokens, position_ids, lo, hi, cache)[:, -1, :vocab].float()


def _filter(logits, cfg: GenerationConfig):
    logits = logits / max(cfg.temperature, 1e-6)
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _span_greedy_or_sample(
    model, cache, mask_pos, sop, eop, cfg, generator, device, vocab, continues=False
):
    out = []
    token = torch.tensor([[sop]], device=device)
    for step in range(1, cfg.max_new_tokens + 2):
        logits = _feed(
            model,
            cache,
            token,
            torch.tensor([[mask_pos]], device=device),
            torch.tensor([[step]], device=device),
            vocab,
            continues,
        )
        if cfg.strategy == "greedy":
            nxt = int(logits.argmax(-1))
        else:
            probs = torch.softmax(_filter(logits, cfg), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if nxt == eop or len(out) == cfg.max_new_tokens:
            return out
        out.append(nxt)
        token = torch.tensor([[nxt]], device=device)
    return out


def _span_beam(model, cache, mask_pos, sop, eop, cfg, device, vocab, continues=False):
    """Beam search over one span on a copy of the cache; returns the best token list."""
    beams = cfg.num_beams
    work = cache.copy()
    logits = _feed(
        model,
        work,
        torch.tensor([[sop]], device=device),
        torch.tensor([[mask_pos]], device=device),
        torch.tensor([[1]], device=device),
        vocab,
        continues,
    )
    work.reorder(torch.zeros(beams, dtype=torch.long, device=device))
    seqs = [[] for _ in range(beams)]
    scores = torch.full((beams,), float("-inf"), device=device)
    scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []
    logprobs = torch.log_softmax(logits, -1).expand(beams, -1)
    for step in range(1, cfg.max_new_tokens + 2):
        total = (scores[:, None] + logprobs).flatten()
        top = torch.topk(total, 2 * beams)
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            row, token = divmod(flat, logprobs.shape[-1])
            if score == float("-inf"):
                break
            if token == eop or step > cfg.max_new_tokens:
                finished.append((score / max(len(seqs[row]), 1) ** cfg.length_penalty, seqs[row]))
            elif len(keep_rows) < beams:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
        best_alive = (
            max(keep_scores) / (len(seqs[0]) + 1) ** cfg.length_penalty
            if keep_scores
            else float("-inf")
        )
        if not keep_rows or (len(finished) >= beams and max(f[0] for f in finished) >= best_alive):
            break
        seqs = [seqs[r] + [t] for r, t in zip(keep_rows, keep_tokens)]
        index = torch.tensor(keep_rows, device=device)
        work.reorder(index)
        scores = torch.tensor(keep_scores, device=device)
        tokens = torch.tensor(keep_tokens, device=device)[:, None]
        n = len(keep_rows)
        logits = _feed(
            model,
            work,
            tokens,
            torch.full((n, 1), mask_pos, device=device),
            torch.full((n, 1), step + 1, device=device),
            vocab,
            continues,
        )
        logprobs = torch.log_softmax(logits, -1)
        if n < beams:
            scores = torch.cat([scores, torch.full((beams - n,), float("-inf"), device=device)])
            logprobs = torch.cat([logprobs, logprobs[:1].expand(beams - n, -1)])
            seqs += [[] for _ in range(beams - n)]
            work.reorder(
                torch.cat(
                    [
                        torch.arange(n, device=device),
                        torch.zeros(beams - n, dtype=torch.long, device=device),
                    ]
                )
            )
    if not finished:
        return seqs[int(scores.argmax())]
    return max(finished, key=lambda f: f[0])[1]


def prompt_problem(model: GLMModel, tokenizer, text: str, cfg: GenerationConfig) -> str | None:
    """Why ``fill_blanks`` cannot take ``text``, or None: checked for a whole input before any of it runs."""
    ids = tokenizer.encode(text, allow_special=True)
    if not {tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id} & set(ids):
        return "the text has no [MASK], [sMASK] or [gMASK] to fill"
    limit = model.cfg.max_position_embeddings
    if len(ids) > limit or cfg.max_new_tokens + 1 > limit:
        return f"{len(ids)} prompt tokens / {cfg.max_new_tokens} new tokens exceed the model's {limit} positions"
    return None


@torch.no_grad()
def fill_blanks(
    model: GLMModel, tokenizer, text: str, cfg: GenerationConfig | None = None
) -> tuple[str, list[str]]:
    """``(text with every blank filled, the generated spans)``."""
    cfg = cfg or GenerationConfig()
    if cfg.strategy not in ("greedy", "sample", "beam"):
        raise ValueError(f"unknown strategy {cfg.strategy!r}: use greedy, sample or beam")
    problem = prompt_problem(model, tokenizer, text, cfg)
    if problem:
        raise ValueError(problem)
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(text, allow_special=True)
    blank_ids = {tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id}
    blanks = [i for i, t in enumerate(ids) if t in blank_ids]
    generator = torch.Generator(device=device)
    if cfg.seed is not None:
        generator.manual_seed(cfg.seed)
    cache = KVCache(model.cfg.num_layers)
    vocab = tokenizer.vocab_size
    a = len(ids)
    tokens = torch.tensor([ids], device=device)
    position_ids = torch.stack(
        [torch.arange(a, device=device), torch.zeros(a, dtype=torch.long, device=device)]
    )[None]
    bounds = (
        torch.zeros(1, a, dtype=torch.int32, device=device),
        torch.full((1, a), a, dtype=torch.int32, device=device),
    )
    model(tokens, position_ids, *bounds, cache)  # Part A, bidirectional, once
    spans = []
    for pos in blanks:
        continues = ids[pos] == tokenizer.gmask_id
        if cfg.strategy == "beam":
            span = _span_beam(
                model, cache, pos, tokenizer.sop_id, tokenizer.eop_id, cfg, device, vocab, continues
            )
            fed = torch.tensor([[tokenizer.sop_id] + span], device=device)
            n = fed.shape[1]
            _feed(
                model,
                cache,
                fed,
                torch.full((1, n), pos, device=device),
                torch.arange(1, n + 1, device=device)[None],
                vocab,
                continues,
            )
        else:
            span = _span_greedy_or_sample(
                model,
                cache,
                pos,
                tokenizer.sop_id,
                tokenizer.eop_id,
                cfg,
                generator,
                device,
                vocab,
                continues,
            )
        spans.append(span)
    out, k = [], 0
    for i, t in enumerate(ids):
        if i in blanks:
            out.extend(spans[k])
            k += 1
        else:
            out.append(t)
    return tokenizer.decode(out), [tokenizer.decode(s) for s in spans]
