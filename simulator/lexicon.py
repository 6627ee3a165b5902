"""A small positive/negative word lexicon for the simulated raters' `sentiment` taste.

Hand-written for this project (common English opinion words, in the spirit of the Hu & Liu and
AFINN lexicons, but not copied from either): a few hundred words are enough for a scripted rater
whose taste a 135M model can learn. `sentiment_counts` also handles the simplest negation: a
negator ("not", "never", "no", "n't" ...) within the two words before an opinion word flips it,
so "not good" counts as negative and "not bad" as positive.
"""
from __future__ import annotations

import re

POSITIVE = frozenset("""
    admire admired adore adored adventure adventurous affection agree alive amaze amazed amazing
    amusing appreciate appreciated awesome beautiful beautifully beauty beloved best better bless
    blessed bliss blissful bloom bright brighter brightest brilliant calm care careful caring celebrate
    celebrated celebration charm charming cheer cheerful cheers cherish cherished clever comfort
    comfortable compassion confident cool courage courageous cozy creative cute delicious delight
    delighted delightful dream dreams eager ease easy effective elegant encourage encouraging energetic
    enjoy enjoyed enjoying enjoyable enthusiastic excellent excited exciting fabulous fair faith fantastic
    fascinating favorite favourite fine fortunate free freedom fresh friend friendly friends friendship
    fun funny generous gentle genius gift glad glorious glory good gorgeous grace graceful grand grateful
    gratitude great greatest happier happiest happily happiness happy harmony healthy heartwarming help
    helpful hero honest hope hopeful hug ideal impressive incredible inspire inspired inspiring
    interesting joy joyful joyous kind kindness laugh laughter liked lively love loved lovely
    loving loyal lucky magic magical marvelous marvellous meaningful merry nice optimistic paradise
    passion passionate peace peaceful perfect pleasant please pleased pleasure plenty polite positive
    precious pretty pride proud relax relaxed relaxing reliable remarkable respect rich safe satisfied
    satisfying secure shine shining smart smile smiles smiling soft special splendid strong succeed success
    successful sunny sunshine super superb support supportive sweet talented tasty tender terrific thank
    thankful thanks thoughtful thrilled thriving treasure trust true truly victory vibrant warm warmth
    welcome wholesome win winning wisdom wise won wonder wonderful wonderfully worth worthy yay
""".split())

NEGATIVE = frozenset("""
    abandon abandoned abuse afraid aggressive agony alone angry anger annoyed annoying anxiety anxious
    ashamed awful bad badly bitter bland bleak blame bored boring broke broken brutal bug buggy burden
    careless chaos cheap cold complain complaint confused confusing crash crime cruel cry crying damage
    damaged danger dangerous dark dead death defeat depressed depressing desperate despair destroy
    destroyed difficult dirty disappoint disappointed disappointing disaster disgusting dislike dread
    dreadful dull dumb empty enemy evil fail failed failing failure fake fault fear fearful fight filthy
    flaw flawed fool foolish fragile frustrated frustrating furious gloomy grief grim gross guilt guilty
    harm harmful harsh hate hated hateful hell helpless hopeless horrible horrid horror hostile hurt ill
    impossible inferior injury insult jealous kill killed lame lazy lonely lose loser losing loss lost
    mad mean mess messy miserable misery mistake nasty negative nervous noisy nightmare offensive pain
    painful panic pathetic poor poorly problem problems regret reject rejected rotten rude sad sadly
    sadness scared scary selfish severe shame shameful shock shocking sick slow sorrow sorry stress
    stressed stressful struggle stuck stupid suffer suffering terrible terribly terrified threat tired
    tragedy tragic trouble ugly unfair unfortunate unhappy upset useless vile violent waste weak weird
    worried worry worse worst worthless wrong
""".split())

NEGATORS = frozenset("not no never none nobody nothing neither nor without cannot hardly".split())
NEGATION_WINDOW = 2
"""An opinion word is negated when a negator is among the words this far before it."""

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Return the lower-case words of `text` (letters, with an inner apostrophe kept: "don't")."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _is_negator(word: str) -> bool:
    return word in NEGATORS or word.endswith("n't")


def sentiment_counts(text: str) -> tuple[int, int]:
    """Return (positive, negative) opinion-word counts of `text`, negated words counted on the other side."""
    tokens = words(text)
    positive = negative = 0
    for i, word in enumerate(tokens):
        polarity = 1 if word in POSITIVE else -1 if word in NEGATIVE else 0
        if not polarity:
            continue
        if any(_is_negator(w) for w in tokens[max(0, i - NEGATION_WINDOW):i]):
            polarity = -polarity
        if polarity > 0:
            positive += 1
        else:
            negative += 1
    return positive, negative
