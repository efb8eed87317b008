"""The test sets a vector must not have trained on, as they are found: the analogy test sets in the
data directory (every analogy_questions/*/test.jsonl, UCLA VAT, every analogy_completion file)
and the relation test splits (the project's relations always; Todd et al.'s relations where the
data directory has them). Each set is a name and its word pairs, so a screen can say what it
removed per source.

Word pairs of a test item: a multiple-choice question's stem (a, b) and every choice (c, d); a
UCLA VAT problem's (A, B), (C, D) and (C, D'); a completion problem's (a, b) and (c, answer)
for every answer people gave; a relation test pair (input, output). Matching is
data.overlap's (normal forms, either order)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ffv_eval.data.analogies import (
    COMPLETION_SUBDIR,
    QUESTIONS_SUBDIR,
    UCLA_VAT_FILE,
    AnalogyDataError,
    ranked_responses,
    read_analogy_completion,
    read_analogy_questions,
    read_ucla_vat,
)
from ffv_eval.data.overlap import PairScreen
from ffv_eval.data.relations import (
    TODD_SUBDIR,
    RelationDataError,
    data_dir_from_env,
    load_project_relation,
    load_todd_relation,
    project_relations,
)

Pair = tuple[str, str]


@dataclass(frozen=True)
class TestSet:
    name: str  # e.g. "analogy_questions/u2/test.jsonl", "relation_antonym test split"
    kind: str  # "analogy" or "relation"
    pairs: tuple[Pair, ...]


def document_pairs(doc: dict) -> list[Pair]:
    """The word pairs of one test document of the project's lm-eval tasks: relation tasks
    ({"input", "output"}), multiple-choice analogies ({"a", "b", "choices": [[c, d], ...]}) and
    completions ({"a", "b", "c", "answers": [...]})."""
    pairs: list[Pair] = []
    if isinstance(doc.get("input"), str) and isinstance(doc.get("output"), str):
        pairs.append((doc["input"], doc["output"]))
    if isinstance(doc.get("a"), str) and isinstance(doc.get("b"), str):
        pairs.append((doc["a"], doc["b"]))
    for choice in doc.get("choices") or ():
        if isinstance(choice, (list, tuple)) and len(choice) == 2 and all(isinstance(w, str) for w in choice):
            pairs.append((choice[0], choice[1]))
    if isinstance(doc.get("c"), str):
        pairs += [(doc["c"], answer) for answer in doc.get("answers") or () if isinstance(answer, str)]
    return pairs


def analogy_test_sets(data_dir: str | os.PathLike | None) -> list[TestSet]:
    """The analogy test sets present in the data directory (absent ones are skipped; a data
    directory that does not exist is an error)."""
    root = data_dir_from_env(data_dir)
    if root is None:
        return []
    root = Path(root)
    if not root.is_dir():
        raise RelationDataError(f"analogy test sets: the data directory {root} does not exist")
    sets = []
    try:
        for path in sorted((root / QUESTIONS_SUBDIR).glob("*/test.jsonl")):
            pairs = [pair for q in read_analogy_questions(path) for pair in (tuple(q["stem"]), *map(tuple, q["choice"]))]
            sets.append(TestSet(str(path.relative_to(root)), "analogy", tuple(pairs)))
        if (root / UCLA_VAT_FILE).is_file():
            pairs = [pair for p in read_ucla_vat(root / UCLA_VAT_FILE)
                     for pair in ((p["a"], p["b"]), (p["c"], p["d"]), (p["c"], p["d_prime"]))]
            sets.append(TestSet(str(UCLA_VAT_FILE), "analogy", tuple(pairs)))
        for path in sorted((root / COMPLETION_SUBDIR).glob("*.jsonl")):
            pairs = [pair for p in read_analogy_completion(path)
                     for pair in ((p["a"], p["b"]), *((p["c"], answer) for answer, _ in ranked_responses(p["responses"])))]
            sets.append(TestSet(str(path.relative_to(root)), "analogy", tuple(pairs)))
    except AnalogyDataError as err:
        raise RelationDataError(str(err)) from err
    return sets


def relation_test_sets(data_dir: str | os.PathLike | None) -> list[TestSet]:
    """The test splits of the project's relations, and of Todd et al.'s where the data directory has them."""
    sets = [TestSet(f"relation_{name} test split", "relation",
                    tuple((p.input, p.output) for p in load_project_relation(name).split("test")))
            for name in project_relations()]
    root = data_dir_from_env(data_dir)
    if root is not None and (Path(root) / TODD_SUBDIR).is_dir():
        for path in sorted((Path(root) / TODD_SUBDIR).glob("*.json")):
            data = load_todd_relation(path.stem, root)
            sets.append(TestSet(f"todd_{path.stem} test split", "relation", tuple((p.input, p.output) for p in data.split("test"))))
    return sets


class TestScreen:
    """Test sets to screen training pairs against, one PairScreen each, so that removals can
    be counted per source: every pair found in a test set (`in`) is counted in `removed`."""

    __test__ = False  # not a pytest test class

    def __init__(self, sets: Sequence[TestSet]):
        self.sets = list(sets)
        self._screens = [(s.name, PairScreen(s.pairs)) for s in self.sets]
        self.removed: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sets]

    def sources_of(self, pair: Pair) -> list[str]:
        return [name for name, screen in self._screens if pair in screen]

    @property
    def has_analogy_sets(self) -> bool:
        return any(s.kind == "analogy" for s in self.sets)

    def __contains__(self, pair: Pair) -> bool:
        sources = self.sources_of(pair)
        for name in sources:
            self.removed[name] = self.removed.get(name, 0) + 1
        return bool(sources)

    def keep(self, pairs: Iterable) -> list:
        """The pairs (tuples or objects with .input and .output) that match no test set."""
        return [p for p in pairs if (p if isinstance(p, tuple) else (p.input, p.output)) not in self]

    def report(self, what: str) -> list[str]:
        """One line per test set that removed pairs, then forgets the counts."""
        lines = [f"[ffv] {what}: removed {n} pair(s) found in {name}" for name, n in sorted(self.removed.items())]
        self.removed = {}
        return lines or [f"[ffv] {what}: no pair found in the {len(self.sets)} test sets screened"]


def test_screen(data_dir: str | os.PathLike | None) -> TestScreen:
    """Every analogy test set of the data directory and every relation test split found."""
    return TestScreen(analogy_test_sets(data_dir) + relation_test_sets(data_dir))


test_screen.__test__ = False  # not a pytest test function
