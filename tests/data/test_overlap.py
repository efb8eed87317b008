"""The overlap check: normal forms, either order, and the record's counts."""

import pytest

from ffv_eval.data.overlap import MAX_LISTED, Overlap, PairScreen, normal_form, pair_key


@pytest.mark.parametrize("trained, tested", [
    (("grandsons", "granddaughters"), ("grandson", "granddaughter")),  # inflected
    (("keys", "car"), ("key", "car")),
    (("brother", "sister"), ("sister", "brother")),  # reversed
    (("New_York", "USA"), ("new york", "usa")),  # underscore, case
    (("ice-cream", "Cold"), ("  ice cream ", "cold")),  # hyphen, spaces
    (("mice", "cheese"), ("mouse", "cheese")),  # irregular plural
    (("walk", "walked"), ("WALKED", "Walk")),  # words sharing a lemma: their plain forms, either order
    (("cat", "CATS"), ("cats", "cat")),
])
def test_pairs_that_match(trained, tested):
    assert tested in PairScreen([trained])
    assert pair_key(*trained) == pair_key(*tested)


@pytest.mark.parametrize("trained, tested", [
    (("grandson", "granddaughter"), ("grandson", "grandmother")),
    (("hot", "cold"), ("hot", "warm")),
    (("paris", "france"), ("paris", "texas")),
    (("new york", "usa"), ("york", "usa")),
    # words sharing a lemma keep their forms: present-past is not verb-gerund nor verb-third-person
    (("walk", "walked"), ("walk", "walking")),
    (("walk", "walked"), ("walks", "walked")),
    (("big", "bigger"), ("big", "biggest")),
    (("walk", "walk"), ("walk", "walked")),  # a lemma key never meets a plain one
])
def test_pairs_that_do_not_match(trained, tested):
    assert tested not in PairScreen([trained])


def test_normal_form_lemmatises_each_word():
    assert normal_form("Running_Shoes") == "run shoe"
    assert normal_form("  GEESE ") == "goose"


def test_overlap_counts_documents_and_lists_each_pair_once():
    screen = PairScreen([("cat", "kittens"), ("dog", "puppy")])
    overlap = Overlap()
    overlap.count(screen, [("cats", "kitten"), ("sun", "moon")])
    overlap.count(screen, [("sun", "moon")])
    overlap.count(screen, [("puppy", "dog"), ("cats", "kitten")])
    assert overlap.to_json() == {"documents": 2, "of": 3, "pairs": [["cats", "kitten"], ["puppy", "dog"]]}
    assert Overlap.from_json(overlap.to_json()) == overlap


def test_overlap_lists_at_most_max_listed_pairs():
    pairs = [(f"w{i}", f"v{i}") for i in range(MAX_LISTED + 10)]
    overlap = Overlap()
    for pair in pairs:
        overlap.count(PairScreen(pairs), [pair])
    assert overlap.documents == overlap.of == MAX_LISTED + 10 and len(overlap.pairs) == MAX_LISTED
