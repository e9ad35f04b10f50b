"""Fine-tuning metrics: classification from candidate scores, seq2seq from scores and decoded texts.

Classification: accuracy, and for two classes the F1 of class 1 (SuperGLUE's and scikit-learn's
binary convention); macro F1 for more. Seq2seq, teacher-forced on any layout: the loss per target
token, and exact match, true exactly when every target token (``[eop]`` included) is the
argmax given the true prefix, that is when greedy decoding reproduces the target and stops.
From decoded texts: exact match, SQuAD's token F1, and ROUGE-1/2/L F-measures from Google's
``rouge-score``.
"""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np

# what a --best-metric may name, and whether larger is better
HIGHER_IS_BETTER = {
    "accuracy": True,
    "f1": True,
    "f1_macro": True,
    "loss": False,
    "exact_match": True,
    "token_accuracy": True,
    "token_f1": True,
    "rouge1": True,
    "rouge2": True,
    "rougeL": True,
}
DEV_METRICS = {
    "classification": ("accuracy", "f1", "f1_macro", "loss"),
    "seq2seq": ("exact_match", "token_accuracy", "loss"),
}


def _f1(predicted: np.ndarray, labels: np.ndarray, positive: int) -> float:
    tp = float(np.sum((predicted == positive) & (labels == positive)))
    fp = float(np.sum((predicted == positive) & (labels != positive)))
    fn = float(np.sum((predicted != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def classification(scores: np.ndarray, labels: list[int]) -> dict:
    """From ``scores[example, candidate]`` (-inf where absent) and each example's label."""
    labels_ = np.asarray(labels)
    predicted = scores.argmax(axis=1)  # a tie goes to the first candidate, as in glm-eval
    n = scores.shape[1]
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    out = {
        "accuracy": float(np.mean(predicted == labels_)),
        "loss": float(-np.mean(log_softmax[np.arange(len(labels_)), labels_])),
        "examples": len(labels_),
    }
    classes = [_f1(predicted, labels_, c) for c in range(n)]
    if n == 2:
        out["f1"] = classes[1]
    out["f1_macro"] = float(np.mean(classes))
    return out


def seq2seq_teacher_forced(scores: np.ndarray) -> dict:
    """From ``scores[row] = (nll sum, targets, argmax-correct targets)``."""
    nll, count, correct = scores[:, 0], scores[:, 1], scores[:, 2]
    return {
        "loss": float(nll.sum() / count.sum()),
        "exact_match": float(np.mean(correct == count)),
        "token_accuracy": float(correct.sum() / count.sum()),
        "examples": len(scores),
    }


def _normalize(text: str) -> list[str]:
    """SQuAD's answer normalization: lower case, no punctuation or articles, single spaces; as words."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(predicted: str, target: str) -> float:
    """SQuAD's token F1 of one prediction against its target."""
    p, t = _normalize(predicted), _normalize(target)
    if not p or not t:
        return float(p == t)
    common = sum((collections.Counter(p) & collections.Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def seq2seq_decoded(predictions: list[str], targets: list[str]) -> dict:
    """Exact match, token F1 and ROUGE-1/2/L (F-measure, stemmed) of decoded texts against targets."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = collections.defaultdict(float)
    for p, t in zip(predictions, targets):
        for name, value in scorer.score(t, p).items():
            rouge[name] += value.fmeasure
    n = max(len(targets), 1)
    return {
        "exact_match": float(
            np.mean([p.strip() == t.strip() for p, t in zip(predictions, targets)])
        ),
        "token_f1": float(np.mean([token_f1(p, t) for p, t in zip(predictions, targets)])),
        **{name: rouge[name] / n for name in ("rouge1", "rouge2", "rougeL")},
        "examples": len(targets),
    }


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` improves on ``best`` (None: nothing yet); a tie keeps the earlier."""
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if HIGHER_IS_BETTER[metric] else value < best
