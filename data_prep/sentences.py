"""Sentence splitting for ``glm-preprocess --split-sentences`` (Megatron's option): NLTK's Punkt.

Each sentence becomes one sequence of the indexed dataset and each document one entry of its
document index, as Megatron's ``tools/preprocess_data.py`` writes them. Punkt's trained
parameters for ``--lang`` come from NLTK's ``punkt_tab`` data when it is installed
(``python -m nltk.downloader punkt_tab``); without it the same algorithm runs untrained (it then
knows no abbreviations, so "Dr." ends a sentence), with a warning.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MAX_CHARS = 1_000_000  # like Megatron, Punkt sees a text in pieces of at most this many characters


class SentenceSplitError(ValueError):
    """Sentence splitting cannot run as asked (nltk missing, an unknown language)."""


def load_splitter(lang: str = "english", keep_newlines: bool = False, warn: bool = False):
    """A Punkt sentence splitter; ``keep_newlines`` keeps the whitespace after a sentence end in that sentence."""
    try:
        from nltk.tokenize import punkt
    except ImportError as e:
        raise SentenceSplitError(
            "--split-sentences needs NLTK: pip install nltk (or megatron-glm[sentences])"
        ) from e

    class KeepWhitespace(punkt.PunktLanguageVars):
        """A sentence end takes the whitespace after it, newlines included, instead of dropping it."""

        _period_context_fmt = r"""
            %(SentEndChars)s             # a candidate sentence end
            \s*                          # and the whitespace after it, kept with the sentence
            (?=(?P<after_tok>
                %(NonWord)s              # then punctuation
                |
                (?P<next_tok>\S+)        # or the next token, right here
            ))"""

    try:
        params = punkt.PunktTokenizer(lang)._params
    except LookupError:
        params = None
        if warn:
            log.warning(
                "NLTK's punkt_tab data for %r is not installed: Punkt runs untrained (no known "
                "abbreviations). Install it with: python -m nltk.downloader punkt_tab",
                lang,
            )
    except ValueError as e:
        raise SentenceSplitError(f"--lang {lang!r}: {e}") from e
    lang_vars = KeepWhitespace() if keep_newlines else punkt.PunktLanguageVars()
    return punkt.PunktSentenceTokenizer(train_text=params, lang_vars=lang_vars)


def split(splitter, text: str) -> list[str]:
    """The sentences of ``text``, in order."""
    return [
        s
        for i in range(0, len(text), MAX_CHARS)
        for s in splitter.tokenize(text[i : i + MAX_CHARS])
    ]
