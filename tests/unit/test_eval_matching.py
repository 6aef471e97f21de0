import pytest

from starmerge.eval.matching import match_choice, match_label, parse_number, words

SENT = ["positive", "negative"]


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("Negative.", SENT, "negative"),
        ("  POSITIVE!!", SENT, "positive"),
        ("The sentiment is: negative", SENT, "negative"),
        # negation is not interpreted: the first whole-word label wins
        ("not positive", SENT, "positive"),
        ("positive or negative? Negative.", SENT, "positive"),
        # substrings of other words never match
        ("non-negativity", SENT, None),
        ("positively", SENT, None),
        ("", SENT, None),
        ("I cannot tell.", SENT, None),
        # labels that are substrings of each other: longest at the same position
        ("not_entailment", ["entailment", "not_entailment"], "not_entailment"),
        ("Not entailment.", ["entailment", "not_entailment"], "not_entailment"),
        ("entailment", ["entailment", "not_entailment"], "entailment"),
        ("an apple", ["a", "an"], "an"),
        ("a pear", ["an", "a"], "a"),
        ("banana", ["a", "an"], None),
        # multi-word and punctuated labels
        ("Sci/Tech news", ["Sci/Tech", "Sports"], "Sci/Tech"),
        ("(B) is right", ["A", "B"], "B"),
        ("Option 2", ["Option 1", "Option 2"], "Option 2"),
        ("the answer is in favor", ["in favor", "against"], "in favor"),
        # digits are words too
        ("Rating: 3", ["1", "2", "3"], "3"),
        ("13", ["1", "3"], None),
        # non-ASCII words
        ("Réponse : négatif", ["positif", "négatif"], "négatif"),
    ],
)
def test_match_label(text, labels, expected):
    assert match_label(text, labels) == expected


def test_label_returned_exactly_as_given_and_ties_go_to_first():
    assert match_label("yes", ["Yes", "yes"]) == "Yes"
    assert match_label("anything", ["", "!!"]) is None


def test_match_choice_variants():
    choices = [["entailment", "entail"], ["neutral", "neither"], ["contradiction", "contradict"]]
    assert match_choice("They contradict each other", choices) == 2
    assert match_choice("Neither.", choices) == 1
    assert match_choice("maybe", choices) is None


def test_words_and_numbers():
    assert words("Not_entailment, Sci/Tech!") == ["not", "entailment", "sci", "tech"]
    assert parse_number("score: 3.5/5") == 3.5
    assert parse_number("-.5 or so") == -0.5
    assert parse_number("no number") is None
