"""Data and scoring behind the lm-eval relation tasks in tasks/: word pairs as a
datasets.DatasetDict (relation_<name>: the project's pairs; todd_<name>: Todd et al.'s files
from the data directory), and first-word scoring of generations."""

from __future__ import annotations

import string

from ffv_eval.data.relations import RelationData, load_project_relation, load_todd_relation

EDGE_PUNCTUATION = string.punctuation + "“”‘’«»"


def _splits(data: RelationData):
    import datasets

    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list([{"input": p.input, "output": p.output} for p in data.split(split)])
            for split in ("train", "validation", "test")
        }
    )


def relation_dataset(relation: str, **_metadata):
    """train / validation / test splits of the project's pairs of a relation (relation_<name>
    tasks); a data directory (lm-eval --metadata data_dir, $FFV_DATA_DIR) is not used."""
    return _splits(load_project_relation(relation))


def todd_dataset(relation: str, data_dir: str | None = None, **_metadata):
    """train / validation / test splits of Todd et al.'s pairs of a relation (todd_<name>
    tasks), from `data_dir` (lm-eval --metadata) or $FFV_DATA_DIR."""
    return _splits(load_todd_relation(relation, data_dir))


def first_words(text: str, n: int) -> list[str]:
    return [w.strip(EDGE_PUNCTUATION) for w in text.split()[:n]]


def first_word_match(generation: str, target: str) -> float:
    """1.0 if the generation starts with the target's words (as many words as the target has,
    punctuation at word edges ignored, case kept), else 0.0."""
    n = len(target.split())
    return float(first_words(generation, n) == first_words(target, n))


def process_relation_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": first_word_match(results[0], doc["output"])}
