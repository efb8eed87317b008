"""Data and scoring behind the lm-eval YAML tasks in tasks/: relation word pairs as a
datasets.DatasetDict, and first-word scoring of generations."""

from __future__ import annotations

import string

from ffv_eval.relations import load_relation

EDGE_PUNCTUATION = string.punctuation + "“”‘’«»"


def relation_dataset(relation: str, data_dir: str | None = None, **_metadata):
    """train / validation / test splits of a relation; `data_dir` (lm-eval --metadata) or
    $FFV_DATA_DIR switches to Todd et al.'s files."""
    import datasets

    data = load_relation(relation, data_dir)
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list([{"input": p.input, "output": p.output} for p in data.split(split)])
            for split in ("train", "validation", "test")
        }
    )


def first_words(text: str, n: int) -> list[str]:
    return [w.strip(EDGE_PUNCTUATION) for w in text.split()[:n]]


def first_word_match(generation: str, target: str) -> float:
    """1.0 if the generation starts with the target's words (as many words as the target has,
    punctuation at word edges ignored, case kept), else 0.0."""
    n = len(target.split())
    return float(first_words(generation, n) == first_words(target, n))


def process_relation_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": first_word_match(results[0], doc["output"])}
