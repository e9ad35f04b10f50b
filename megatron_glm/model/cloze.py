"""Fine-tuning losses on the last pipeline stage: cloze classification over candidates, and seq2seq.

A classification example is scored by each candidate's log-likelihood in the blank: summed
over its tokens (glm-eval's "summed" score), or per token (``--score per_token``). THUDM/GLM's
``--loss-func`` choices then turn the scores into a loss:

- ``cross_entropy`` (default): softmax over the candidates' scores, against the label;
- ``hinge``: ``sum over wrong c of max(0, margin - s_label + s_c)`` (THUDM's margin, 1);
- ``generative``: the label's negative log-likelihood alone (its teacher-forced LM loss);
- ``mix``: ``cross_entropy + generative``.

Every score comes from the vocabulary-parallel cross entropy, so each works on any TP size
without gathering the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "hinge", "generative", "mix")
SCORES = ("summed", "per_token")
HINGE_MARGIN = 1.0


def candidate_scores(chunk, logits, batch: dict, per_token: bool = False) -> torch.Tensor:
    """``[examples, candidates]`` log-likelihood scores (-inf where an example lacks the candidate).

    One row per candidate: the row's summed (or mean) target log-probabilities. The fast layout
    (``choice_tokens``): one row per example, each candidate's log-probability at ``[sop]``.
    """
    valid = batch["choice_valid"]
    examples, candidates = valid.shape
    ce = chunk.output_layer.cross_entropy
    if "choice_tokens" in batch:
        at = batch["loss_mask"].argmax(dim=1)  # [sop]'s place: the row's one target
        last = logits[torch.arange(examples, device=logits.device), at]  # [examples, V / tp]
        nll = ce(last[:, None, :].expand(-1, candidates, -1), batch["choice_tokens"])
        scores = -nll
    else:
        mask = batch["loss_mask"]
        nll = (ce(logits, batch["labels"]) * mask).sum(dim=1)
        if per_token:
            nll = nll / mask.sum(dim=1).clamp(min=1.0)
        scores = -nll.view(examples, candidates)
    return scores.masked_fill(valid == 0, float("-inf"))


def classification_loss(scores: torch.Tensor, label: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean loss over the real examples (``label >= 0``) of a micro-batch."""
    real = label >= 0
    scores, label = scores[real], label[real]
    if kind == "hinge":
        correct = scores.gather(1, label[:, None])
        wrong = torch.ones_like(scores, dtype=torch.bool).scatter(1, label[:, None], False)
        wrong &= torch.isfinite(scores)
        margins = (HINGE_MARGIN - correct + scores).clamp(min=0.0)
        return torch.where(wrong, margins, torch.zeros_like(margins)).sum(dim=1).mean()
    generative = -scores.gather(1, label[:, None]).mean()
    if kind == "generative":
        return generative
    cross_entropy = F.cross_entropy(scores, label)
    return cross_entropy + generative if kind == "mix" else cross_entropy


class ClassificationLoss:
    """``StepRunner``'s loss and score functions for cloze classification."""

    def __init__(self, kind: str = "cross_entropy", per_token: bool = False):
        self.kind, self.per_token = kind, per_token

    def loss(self, chunk, logits, batch: dict) -> torch.Tensor:
        scores = candidate_scores(chunk, logits, batch, self.per_token)
        return classification_loss(scores, batch["choice_label"], self.kind)

    def score(self, chunk, logits, batch: dict) -> torch.Tensor:
        """``[examples, candidates]``, detached."""
        return candidate_scores(chunk, logits.detach(), batch, self.per_token)


class Seq2SeqLoss:
    """The mean cross entropy over the target tokens (Part B); rows scored as glm-eval scores them."""

    def loss(self, chunk, logits, batch: dict) -> torch.Tensor:
        return chunk.loss(logits, batch["labels"], batch["loss_mask"])[0]

    def score(self, chunk, logits, batch: dict) -> torch.Tensor:
        """``[rows, 3]``: summed nll, targets, targets that are the argmax (all: greedy decoding gives the target)."""
        return torch.stack(chunk.score(logits, batch["labels"], batch["loss_mask"]), dim=1)
