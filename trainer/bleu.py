"""Corpus BLEU and chrF through sacrebleu, on detokenized text, so that scores compare with published ones.

BLEU uses sacrebleu's standard tokenization (13a; `zh` when the references are Chinese), chrF its defaults
(character 6-grams, β = 2). One reference per sentence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"bleu": …, "chrf": …}, both in [0, 100], of the hypotheses against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError("one reference per hypothesis")
    chinese = any(_CJK.search(reference) for reference in references)
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="zh" if chinese else "13a")
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}
