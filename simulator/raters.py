"""Scripted raters: a taste over response texts (`--preference`), and a rater that turns it into scores.

A taste is a pure function of the response text with values in [0, 1]; a rater's score is
`round(1 + 4 * taste + bias + noise)` clipped to 1..5, and its best candidate is the one of
highest taste, preferred over those of lower taste.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .lexicon import sentiment_counts

SENTIMENT_SATURATION = 3
"""Net opinion words (positive minus negative) at which the sentiment taste reaches 0 or 1."""


def keyword_taste(text: str, word: str) -> float:
    """Return 1.0 when `word` occurs in `text` as a whole word (any case), else 0.0."""
    if not word.strip():
        raise ValueError("keyword: needs a word")
    pattern = r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)"
    return 1.0 if re.search(pattern, text, flags=re.IGNORECASE) else 0.0


def length_taste(text: str, target: int) -> float:
    """Return 1 - |words - target| / target clipped to [0, 1]: 1 at exactly `target` words."""
    if target < 1:
        raise ValueError("length: needs a target of at least one word")
    n = len(text.split())
    return max(0.0, 1.0 - abs(n - target) / target)


def sentiment_taste(text: str, saturation: int = SENTIMENT_SATURATION) -> float:
    """Return 0.5 + (positive - negative words) / (2 * saturation) clipped to [0, 1] (0.5 = neutral)."""
    positive, negative = sentiment_counts(text)
    return min(1.0, max(0.0, 0.5 + (positive - negative) / (2 * saturation)))


def regex_taste(text: str, pattern: str | re.Pattern[str]) -> float:
    """Return 1.0 when the regular expression matches anywhere in `text`, else 0.0."""
    return 1.0 if re.search(pattern, text) else 0.0


@dataclass(frozen=True)
class Preference:
    """A parsed `--preference`: its spec and the taste function (text -> [0, 1])."""

    spec: str
    taste: Callable[[str], float] = field(compare=False, repr=False)

    def __call__(self, text: str) -> float:
        return self.taste(text)


def parse_preference(spec: str) -> Preference:
    """Return the Preference a spec names (keyword:WORD, length:TARGET, sentiment, regex:PATTERN); raise ValueError."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "keyword":
        if not arg.strip():
            raise ValueError("keyword: needs a word, e.g. keyword:happy")
        word = arg.strip()
        return Preference(spec, lambda text: keyword_taste(text, word))
    if kind == "length":
        try:
            target = int(arg)
        except ValueError:
            raise ValueError(f"length: needs a whole number of words, not {arg!r}") from None
        if target < 1:
            raise ValueError("length: needs a target of at least one word")
        return Preference(spec, lambda text: length_taste(text, target))
    if kind == "sentiment":
        if arg.strip():
            raise ValueError("sentiment takes no argument")
        return Preference(spec, sentiment_taste)
    if kind == "regex":
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise ValueError(f"regex: {exc}") from None
        return Preference(spec, lambda text: regex_taste(text, pattern))
    raise ValueError(f"unknown preference {spec!r}: use keyword:WORD, length:TARGET, sentiment or regex:PATTERN")


def score_from_taste(taste: float, bias: float = 0.0, noise: float = 0.0) -> int:
    """Return the 1..5 score of a taste in [0, 1] given the rater's bias and a noise draw: round(1 + 4t + b + n)."""
    value = 1.0 + 4.0 * taste + bias + noise
    return int(min(5, max(1, math.floor(value + 0.5))))


def rater_biases(k: int, bias: float) -> list[float]:
    """Return k per-rater offsets spread evenly over [-bias, +bias] (one rater: 0)."""
    if k < 1:
        raise ValueError("at least one rater")
    if k == 1:
        return [0.0]
    return [bias * (2 * i / (k - 1) - 1) for i in range(k)]


@dataclass
class Judgement:
    """What a rater thinks of one candidate: its taste, its noisy utility and the score given."""

    taste: float
    utility: float
    score: int


class ScriptedRater:
    """One simulated person: a name, a taste, an offset and a seeded noise source."""

    def __init__(self, name: str, preference: Preference, *, bias: float = 0.0, noise: float = 0.0,
                 seed: int = 0):
        self.name, self.preference, self.bias, self.noise = name, preference, bias, noise
        self.rng = random.Random(seed)

    def judge(self, texts: Sequence[str]) -> list[Judgement]:
        """Return a judgement per text (scores use one noise draw each)."""
        out = []
        for text in texts:
            taste = float(self.preference(text))
            draw = self.rng.gauss(0.0, self.noise) if self.noise > 0 else 0.0
            out.append(Judgement(taste, taste + (draw + self.bias) / 4.0, score_from_taste(taste, self.bias, draw)))
        return out

    @staticmethod
    def best(judgements: Sequence[Judgement]) -> tuple[int | None, list[int]]:
        """Return (index of the best candidate, indices it beats); (None, []) when no candidate stands out.

        The best has the highest taste (the noisy utility breaks ties) and beats exactly the
        candidates of lower taste: like a person who picks a best one only when it is better,
        the noise blurs the 1..5 scores, not which of two responses has more of what it likes.
        """
        if len(judgements) < 2:
            return None, []
        best = max(range(len(judgements)), key=lambda i: (judgements[i].taste, judgements[i].utility))
        beaten = [i for i, j in enumerate(judgements) if j.taste < judgements[best].taste]
        return (best, beaten) if beaten else (None, [])

