"""Match generated text to a label word, on whole words.

The seed code matched labels as substrings in dict order, so "not_entailment" also matched
"entailment", "an" matched "a", and "negative" matched "non-negative". Here:

- Text and labels are split into words: runs of letters and digits, lower-cased; every other
  character (punctuation, ``_``, ``/``, ``-``, spaces) separates words. "Negative." and
  "NEGATIVE" are the word ``negative``; the label ``not_entailment`` is the words
  ``not entailment`` and matches "Not entailment" or "not-entailment".
- The label whose words occur earliest in the text wins; at the same position the label with
  more words (then more characters) wins, so "not entailment" beats "entailment" and
  "Sci/Tech" is never read as "Sci".
- Negation is not interpreted: "not positive" predicts ``positive`` when ``positive`` is a
  label and ``not positive`` is not. A task that needs it lists the negated phrase as a label.
- No label present: ``None`` (the example counts as wrong).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"[^\W_]+")  # letters and digits, any script; "_" separates words


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` as the matcher sees them.

    Example:
        >>> words("Not_entailment, Sci/Tech!")
        ['not', 'entailment', 'sci', 'tech']
    """
    return _WORD.findall(str(text).lower())


def _find(haystack: list[str], needle: list[str]) -> int | None:
    """First index where ``needle`` occurs as a contiguous word run in ``haystack``."""
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return None


def match_label(text: str, labels: Iterable[str]) -> str | None:
    """Return the label that occurs first in ``text`` as whole words, or ``None``.

    Args:
        text: A model's generated output.
        labels: Candidate label words or phrases; returned exactly as given. A label with no
            letters or digits can never match.

    Returns:
        The matching label; ties at the same position go to the longer label, then to the
        earlier one in ``labels``.

    Example:
        >>> match_label("Answer: Not entailment.", ["entailment", "not_entailment"])
        'not_entailment'
        >>> match_label("It is positive or negative? Negative.", ["negative", "positive"])
        'positive'
    """
    text_words = words(text)
    best: tuple[int, int, int] | None = None  # (position, -n_words, -n_chars)
    best_label = None
    for label in labels:
        label_words = words(label)
        if not label_words:
            continue
        pos = _find(text_words, label_words)
        if pos is None:
            continue
        key = (pos, -len(label_words), -sum(map(len, label_words)))
        if best is None or key < best:
            best, best_label = key, label
    return best_label


def match_choice(text: str, choices: Sequence[Sequence[str]]) -> int | None:
    """Index of the choice (a list of accepted words per choice) whose word matches first.

    Example:
        >>> match_choice("Contradict.", [["entailment"], ["contradiction", "contradict"]])
        1
    """
    owner: dict[str, int] = {}
    for i, variants in enumerate(choices):
        for word in variants:
            owner.setdefault(word, i)
    hit = match_label(text, owner)
    return None if hit is None else owner[hit]


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)")


def parse_number(text: str) -> float | None:
    """First decimal number in ``text`` ("3.5/5" -> 3.5, ".5" -> 0.5), or ``None``.

    Example:
        >>> parse_number("I'd say 4.2 out of 5")
        4.2
    """
    hit = _NUMBER.search(str(text))
    return float(hit.group()) if hit else None
