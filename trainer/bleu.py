"""Corpus BLEU and chrF through sacrebleu, of detokenized hypotheses against the references as written, so that
scores compare with published ones.

BLEU uses sacrebleu's standard tokenization (13a; `zh` for a Chinese target), chrF its defaults (character
6-grams, β = 2). One reference per sentence.
"""

from __future__ import annotations

from collections.abc import Sequence


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> dict[str, float]:
    """{"bleu": …, "chrf": …}, both in [0, 100], of the hypotheses against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError("one reference per hypothesis")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}
