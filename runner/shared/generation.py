"""Text and generation metrics: exact match, token F1 (SQuAD), pass@k (Chen et al. 2021).

Stdlib only. Normalisation follows the official SQuAD v2.0 evaluation script: lowercase,
drop ASCII punctuation, drop the articles a/an/the, collapse whitespace, in that order;
a metric may ask for any subset of the steps. Token F1 counts the tokens two normalised
answers share (an empty answer matches only an empty one); several references score the
best of them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

NORMALIZATION_STEPS = ("lowercase", "punctuation", "articles", "whitespace")
# string.punctuation (a test holds them equal), without loading string into the agent
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalization(spec: str | Sequence[str] | None, default: str) -> tuple[str, ...]:
    """The steps a metric's ``normalize`` asks for (``squad``: all, ``none``: no step)."""
    chosen = default if spec is None else spec
    if chosen == "squad":
        return NORMALIZATION_STEPS
    if chosen == "none":
        return ()
    if isinstance(chosen, str):
        raise ValueError(f"unknown normalisation {chosen!r}")
    return tuple(s for s in NORMALIZATION_STEPS if s in chosen)


def normalize(text: str, steps: Sequence[str]) -> str:
    if "lowercase" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    if "articles" in steps:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in steps:
        text = " ".join(text.split())
    return text


def exact_match(prediction: str, references: Sequence[str], steps: Sequence[str]) -> int:
    """1 if the normalised prediction equals any normalised reference, else 0."""
    mine = normalize(prediction, steps)
    return 1 if any(normalize(r, steps) == mine for r in references) else 0


def _token_f1(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        return 1.0 if prediction == reference else 0.0
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return (2 * precision * recall) / (precision + recall)


def token_f1(prediction: str, references: Sequence[str], steps: Sequence[str]) -> float:
    """The best SQuAD token F1 of the prediction against any reference."""
    mine = normalize(prediction, steps).split()
    return max(_token_f1(mine, normalize(r, steps).split()) for r in references)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n generations of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - Π_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021), stable for large n.
    """
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
