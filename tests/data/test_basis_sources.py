"""Basis relations for the composite function vector: real reference data (skipped without it)
and small hand-made data directories for the parsing and error paths."""

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from ffv_eval import VECTORS_DIR
from ffv_eval.data.basis_sources import (
    SOURCES,
    basis_relations,
    project_train_pairs,
    slug,
)
from ffv_eval.data.relations import RelationDataError, WordPair, load_relation, project_relations
from ffv_eval.data.test_sets import test_screen


# -- real data -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exclude(shared_data):
    return test_screen(shared_data)


@pytest.fixture(scope="module")
def basis(shared_data, exclude):
    return basis_relations(shared_data, min_pairs=12, exclude=exclude)


def per_source(relations):
    return dict(Counter(r.source for r in relations))


def test_counts_without_exclusion(shared_data):
    relations = basis_relations(shared_data, min_pairs=12)
    assert per_source(relations) == {"project": 24, "todd": 12, "bats": 40, "google": 14, "semeval": 79}


def test_counts_with_test_pairs_screened_out(basis):
    # the BATS and Google analogy test sets are built from the BATS and Google pairs, and the
    # SemEval completion set from SemEval's: screening out every test pair (stems, every choice,
    # every answer people gave, every relation test split; inflected and reversed twins too)
    # leaves no BATS or Google relation, 44 of SemEval's 79 and 22 of the project's 24
    assert per_source(basis) == {"project": 22, "todd": 12, "semeval": 44}


def test_relation_sizes_and_exclusion(basis, exclude, shared_data):
    raw = _test_set_pairs(shared_data)
    for relation in basis:
        assert 12 <= len(relation.pairs) <= 80, relation.name
        inputs = [p.input for p in relation.pairs]
        assert len(set(inputs)) == len(inputs), relation.name
        for pair in relation.pairs:
            assert (pair.input, pair.output) not in exclude, (relation.name, pair)
            assert (pair.input.lower(), pair.output.lower()) not in raw, (relation.name, pair)  # independent of data.overlap
            assert pair.input and pair.output and not any(ch.isdigit() for ch in pair.input + pair.output)


def test_names_unique_and_deterministic(shared_data, basis, exclude):
    names = [r.name for r in basis]
    assert len(set(names)) == len(names)
    assert all(r.name.startswith(r.source + "/") for r in basis)
    assert basis_relations(shared_data, min_pairs=12, exclude=exclude) == basis
    everything = {r.name for r in basis_relations(shared_data)}
    for name in ("project/antonym", "bats/e01-country-capital", "bats/i10-verb-3psg-ved",
                 "google/capital-common-countries", "semeval/1a-class-inclusion-taxonomic",
                 "todd/person-instrument"):
        assert name in everything
    # relations the project already has are not taken again from Todd et al.'s files
    assert not {f"todd/{slug(name)}" for name in project_relations()} & everything


def test_project_pairs_are_the_train_split(shared_data):
    for name in project_relations():
        pairs, _ = project_train_pairs(name)
        assert pairs == list(load_relation(name).train)
    relation = basis_relations(None, sources=("project",), max_pairs=1000)[0]
    assert relation.pairs == load_relation(relation.name.split("/")[1]).train


def test_semeval_most_prototypical_first(shared_data):
    relation = next(r for r in basis_relations(shared_data, sources=("semeval",))
                    if r.name == "semeval/10b-reference-expression")
    assert relation.pairs[:2] == (WordPair("laugh", "happiness"), WordPair("nod", "agreement"))
    assert WordPair("exhaustion", "sigh") not in relation.pairs  # negative rating


def test_semeval_ratings_from_maxdiff_answers_match_gold(shared_data, tmp_path):
    # without the Gold-Ratings package the ratings are computed from the Phase 2 MaxDiff answers
    (tmp_path / "semeval2012").mkdir()
    package = "SemEval-2012-Complete-Data-Package"
    (tmp_path / "semeval2012" / package).symlink_to(shared_data / "semeval2012" / package)
    computed = basis_relations(tmp_path, sources=("semeval",))
    gold = basis_relations(shared_data, sources=("semeval",))
    assert "Phase2Answers" in computed[0].origin and "GoldRatings" in gold[0].origin
    assert [(r.name, r.pairs) for r in computed] == [(r.name, r.pairs) for r in gold]


# -- hand-made data --------------------------------------------------------------------------------
def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_bats_and_google_parsing(tmp_path):
    lines = [f"w{chr(97 + i)}\tv{chr(97 + i)}/alt" for i in range(14)]
    write(tmp_path / "bats" / "1_X" / "E01 [country - capital].txt",
          "\n".join(lines + ["bow_wow\tdog_house/x", "b2\tc", "wa\tduplicate"]) + "\n")
    write(tmp_path / "google" / "questions-words.txt",
          ": tiny\nA B C D\nA B E F\n: capital-common-countries\n"
          + "".join(f"x{chr(97 + i)} y{chr(97 + i)} x{chr(98 + i)} y{chr(98 + i)}\n" for i in range(13)))
    relations = basis_relations(tmp_path, sources=("bats", "google"), min_pairs=3, max_pairs=100,
                                exclude=frozenset({("WB", "vb")}))
    bats, tiny, google = relations
    assert bats.name == "bats/e01-country-capital" and bats.source == "bats"
    assert len(bats.pairs) == 14  # 14 + bow_wow - the digit pair - the excluded one
    assert WordPair("bow wow", "dog house") in bats.pairs and WordPair("wa", "va") in bats.pairs
    assert (bats.dropped_invalid, bats.dropped_excluded) == (1, 1)
    assert tiny.name == "google/tiny" and set(tiny.pairs) == {WordPair("A", "B"), WordPair("C", "D"), WordPair("E", "F")}
    assert google.name == "google/capital-common-countries" and len(google.pairs) == 14
    assert "questions-words.txt" in google.origin
    capped = basis_relations(tmp_path, sources=("google",), min_pairs=4, max_pairs=5)
    assert [(r.name, len(r.pairs)) for r in capped] == [("google/capital-common-countries", 5)]


def test_missing_folders(tmp_path, monkeypatch):
    write(tmp_path / "google" / "questions-words.txt", ": c\n" + "".join(f"a{i} b{i} c{i} d{i}\n" for i in "xyz"))
    with pytest.raises(RelationDataError, match=r"no .*bats.* in the data directory") as err:
        basis_relations(tmp_path, sources=("google", "bats"), min_pairs=1)
    assert str(tmp_path) in str(err.value) and "word1<TAB>word2" in str(err.value)
    for source, folder in (("todd", "function_vectors"), ("semeval", "semeval2012")):
        with pytest.raises(RelationDataError, match=folder):
            basis_relations(tmp_path, sources=(source,))
    # sources not asked for are not needed
    assert basis_relations(tmp_path, sources=("google",), min_pairs=1)[0].name == "google/c"
    with pytest.raises(RelationDataError, match="does not exist"):
        basis_relations(tmp_path / "nowhere", sources=("bats",))
    with pytest.raises(RelationDataError, match="no data directory"):
        basis_relations(None, sources=("project", "todd"))
    assert len(basis_relations(None, sources=("project",))) == len(project_relations())
    with pytest.raises(RelationDataError, match="unknown basis source"):
        basis_relations(tmp_path, sources=("wordnet",))
    assert set(SOURCES) == {"project", "todd", "bats", "google", "semeval"}


def test_malformed_bats_line(tmp_path):
    path = write(tmp_path / "bats" / "c" / "E01 [a - b].txt", "ab\tcd\nef gh\n")
    with pytest.raises(RelationDataError, match=r"line 2") as err:
        basis_relations(tmp_path, sources=("bats",))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text, lineno", [(": c\nA B C D\nA B C\n", 3), ("A B C D\n", 1)])
def test_malformed_google_line(tmp_path, text, lineno):
    path = write(tmp_path / "google" / "questions-words.txt", text)
    with pytest.raises(RelationDataError, match=rf"line {lineno}\b") as err:
        basis_relations(tmp_path, sources=("google",))
    assert str(path) in str(err.value)


def test_analogy_test_sets(tmp_path):
    from ffv_eval.data.test_sets import analogy_test_sets

    question = {"stem": ["Hot", "cold"], "choice": [["up", "left"], ["Up", "Down"]], "answer": 1, "prefix": ""}
    write(tmp_path / "analogy_questions" / "u2" / "test.jsonl", json.dumps(question) + "\n")
    valid = dict(question, stem=["valid", "only"])
    write(tmp_path / "analogy_questions" / "u2" / "valid.jsonl", json.dumps(valid) + "\n")
    write(tmp_path / "ucla_vat" / "UCLA_VAT.csv", "Relation,A,B,C,D,D'\nSynonym,easy,simple,sad,unhappy,happy\n")
    problem = {"a": "puppy", "b": "dog", "c": "kitten", "responses": {"Cat": 3, "cats": 1, "lion": 3, "skip": 9}}
    write(tmp_path / "analogy_completion" / "kmiecik.jsonl", json.dumps(problem) + "\n")
    sets = {s.name: set(s.pairs) for s in analogy_test_sets(tmp_path)}  # valid.jsonl and skips are not test pairs
    assert sets == {"analogy_questions/u2/test.jsonl": {("Hot", "cold"), ("up", "left"), ("Up", "Down")},
                    "ucla_vat/UCLA_VAT.csv": {("easy", "simple"), ("sad", "unhappy"), ("sad", "happy")},
                    "analogy_completion/kmiecik.jsonl": {("puppy", "dog"), ("kitten", "cat"), ("kitten", "cats"), ("kitten", "lion")}}
    screen = test_screen(tmp_path)
    assert ("DOWN", "ups") in screen and ("cat", "kittens") in screen and ("dog", "kitten") not in screen
    write(tmp_path / "analogy_completion" / "semeval.jsonl", '{"a": "x"}\n')
    with pytest.raises(RelationDataError, match=r"semeval\.jsonl: line 1"):
        analogy_test_sets(tmp_path)
    with pytest.raises(RelationDataError, match="does not exist"):
        analogy_test_sets(tmp_path / "nowhere")


# -- the shipped basis and map ---------------------------------------------------------------------
MODELS = ("gemma-3-270m", "smollm2-135m")


def _test_set_pairs(root: Path) -> set[tuple[str, str]]:
    """Every word pair of the analogy test sets, read straight from the files (both orders,
    lower-cased): an independent reference for basis_sources.analogy_test_pairs."""
    pairs = set()

    def add(a, b):
        a, b = a.strip().lower(), b.strip().lower()
        pairs.update({(a, b), (b, a)})

    for path in (root / "analogy_questions").glob("*/test.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                q = json.loads(line)
                add(*q["stem"])
                for c, d in q["choice"]:
                    add(c, d)
    with (root / "ucla_vat" / "UCLA_VAT.csv").open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            if row["A"].strip():
                add(row["A"], row["B"])
                add(row["C"], row["D"])
                add(row["C"], row["D'"])
    for path in (root / "analogy_completion").glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                p = json.loads(line)
                add(p["a"], p["b"])
                for answer in p["responses"]:
                    add(p["c"], answer)
    return pairs


@pytest.mark.parametrize("model", MODELS)
def test_the_shipped_basis_records_the_pairs_it_was_made_from(model, shared_data):
    """Each shipped basis's training_pairs.jsonl lists, per basis relation, the pairs whose hash
    the basis vector's sidecar recorded when it was trained (the first 20 trained it, the rest made
    the map's training analogies), and none of them matches a pair of any analogy or relation
    test set in the data directory under the one overlap check (data.overlap: either order, as
    lemmas), nor as the test files spell it."""
    from ffv_eval.data.test_sets import test_screen
    from ffv_eval.files.hashes import pairs_sha256
    from ffv_eval.vectors.library import basis_training_pairs

    directory = VECTORS_DIR / model / "basis"
    meta = json.loads((directory / "composite.json").read_text())
    recorded = basis_training_pairs(directory)
    assert set(recorded["basis"]) == set(meta["basis"])
    test_pairs = _test_set_pairs(shared_data)
    assert len(test_pairs) > 20000
    screen = test_screen(shared_data)
    assert screen.has_analogy_sets
    for name in meta["basis"]:
        side = json.loads((directory / f"{name}.json").read_text())
        pairs = [WordPair(a, b) for a, b in recorded["basis"][name]]
        assert side["data"]["pairs_sha256"] == pairs_sha256(pairs), name
        spare = recorded["basis"][name][side["settings"]["n_pairs"]:]
        assert recorded["map"].get(name, spare) == spare
        leaked = {(p.input.lower(), p.output.lower()) for p in pairs} & test_pairs
        assert not leaked, (name, sorted(leaked)[:5])
        twins = [(p.input, p.output, screen.sources_of((p.input, p.output))) for p in pairs if (p.input, p.output) in screen]
        assert not twins, (name, twins[:5])
