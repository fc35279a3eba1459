"""Corpus BLEU (Papineni et al. 2002) on token lists: our own small implementation, one reference per sentence.

BLEU = BP · exp(Σₙ ¼ log pₙ), n = 1..4, with pₙ the clipped n-gram precision summed over the corpus and
BP = min(1, exp(1 - r/c)) for reference length r and hypothesis length c. No smoothing: a corpus without
any matching 4-gram scores 0, as in sacrebleu's default. Scores are on the trainer's tokens (English words,
punctuation split off), not on sacrebleu's 13a tokenization, so they are close to but not identical with
sacrebleu's numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """BLEU in [0, 100] of the hypotheses against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError("one reference per hypothesis")
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, max_n + 1):
            h, r = ngrams(hyp, n), ngrams(ref, n)
            matches[n - 1] += sum(min(count, r[gram]) for gram, count in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or any(m == 0 for m in matches):
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = min(0.0, 1 - ref_len / hyp_len)
    return 100 * math.exp(brevity + log_precision)
