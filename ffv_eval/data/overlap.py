"""The one overlap check between word pairs: does a test pair appear among the pairs a vector was
made from? Two pairs match when, after normalising each word, they are equal in either order.

Normalising a word or phrase: lower-case, trim, treat `_`, `-` and runs of spaces alike (one
space), and reduce each word to its lemma with simplemma (an offline, dictionary-based
lemmatiser with no dependencies, maintained and on PyPI; its English tables are inside the
wheel, so nothing is downloaded at run time). So grandsons:granddaughters matches
grandson:granddaughter, keys:car matches key:car, New_York:USA matches new york:usa, and
brother:sister matches sister:brother.

A pair whose two words share a lemma (walk:walked, cat:cats, big:bigger) would lose itself under
lemmas: walk:walked, walk:walking and walks:walked would all be walk:walk, one pair, and a
present-past pair would match every verb-gerund test pair of the same verb. Such a pair is
matched by its words' plain forms instead (lower-case, trimmed, separators alike): walk:walked
matches walked:walk and WALK:Walked, not walk:walking. Its key is tagged apart from the lemma
keys, so a match is never looser than the lemma rule would give.

The lemmatiser errs towards matching: irregular comparatives share their base's lemma
(better -> good), so good:better and good:best are one pair here. For a screen against test
leakage that is the safe side: a pair is at worst removed from training without need."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import simplemma

MAX_LISTED = 50  # pairs an overlap record lists (documents and of count them all)
_SEPARATORS = re.compile(r"[\s_\-]+")


@lru_cache(maxsize=200_000)
def normal_form(text: str) -> str:
    """`text` lower-cased and trimmed, `_`/`-`/spaces as one space, each word its lemma."""
    words = _SEPARATORS.sub(" ", str(text).strip().lower()).split()
    return " ".join(simplemma.lemmatize(w, lang="en").lower() for w in words)


@lru_cache(maxsize=200_000)
def plain_form(text: str) -> str:
    """`text` lower-cased and trimmed, `_`/`-`/spaces as one space (no lemmas)."""
    return " ".join(_SEPARATORS.sub(" ", str(text).strip().lower()).split())


def pair_key(a: str, b: str) -> tuple[str, str, str]:
    """The key under which a pair matches, in a fixed order (either order matches): both normal
    forms, or, when they are equal (the words share a lemma), both plain forms, tagged apart."""
    x, y = normal_form(a), normal_form(b)
    tag = "lemmas"
    if x == y:
        x, y, tag = plain_form(a), plain_form(b), "plain"
    return (tag, x, y) if x <= y else (tag, y, x)


class PairScreen:
    """The pairs of a vector's training data (or of test sets), looked up by pair_key."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        self._keys: dict[tuple[str, str], tuple[str, str]] = {}
        self.add(pairs)

    def add(self, pairs: Iterable[tuple[str, str]]) -> None:
        for a, b in pairs:
            self._keys.setdefault(pair_key(a, b), (str(a), str(b)))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return pair_key(*pair) in self._keys

    def matches(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The pairs of `pairs` (as given, each once) that match a screened pair."""
        out = {}
        for a, b in pairs:
            if (a, b) not in out and pair_key(a, b) in self._keys:
                out[(a, b)] = None
        return list(out)


@dataclass
class Overlap:
    """How many test documents share at least one word pair with the training data of the
    vector(s) they get: the record `config.ffv_vector...overlap` of lm-eval's results."""

    documents: int | None = 0  # None: the training pairs are unknown (unchecked says why)
    of: int = 0
    pairs: list[tuple[str, str]] = field(default_factory=list)
    unchecked: str | None = None

    @classmethod
    def not_checked(cls, n_documents: int, reason: str) -> Overlap:
        return cls(None, n_documents, [], reason)

    @property
    def found(self) -> bool:
        """Some document overlaps, or nothing could be checked."""
        return self.documents is None or self.documents > 0

    def count(self, screen: PairScreen, document_pairs: Iterable[tuple[str, str]]) -> None:
        """One test document with its word pairs, checked against `screen`."""
        found = screen.matches(document_pairs)
        self.of += 1
        if found:
            self.documents += 1
            for pair in found:
                if len(self.pairs) < MAX_LISTED and pair not in self.pairs:
                    self.pairs.append(pair)

    def to_json(self) -> dict:
        out = {"documents": self.documents, "of": self.of, "pairs": [list(p) for p in self.pairs]}
        return out if self.unchecked is None else {**out, "unchecked": self.unchecked}

    @classmethod
    def from_json(cls, data: dict) -> Overlap:
        documents = data["documents"]
        return cls(None if documents is None else int(documents), int(data["of"]), [tuple(p) for p in data.get("pairs", [])],
                   data.get("unchecked"))

    def summary(self) -> str:
        """'3 of 228 documents (key:car, man:woman, ...)' or why nothing was checked."""
        if self.documents is None:
            return f"{self.of} documents not checked: {self.unchecked}"
        shown = ", ".join(f"{a}:{b}" for a, b in self.pairs[:8]) + (", ..." if len(self.pairs) > 8 else "")
        return f"{self.documents} of {self.of} documents" + (f" ({shown})" if self.pairs else "")
