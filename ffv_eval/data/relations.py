"""Relation word pairs: the project's own files (tasks/relations/pairs/<name>.jsonl) or Todd et
al.'s files from a data directory (<data_dir>/function_vectors/abstractive/<name>.json), split
deterministically into train / validation / test (the one home of the split). A train or
validation pair that matches a test pair (data.overlap: in either order, as lemmas, e.g.
big:large against large:big, or kings:queens against king:queen) is dropped from its split, so
a relation's test pairs never reach its vectors nor its few-shot prompts.

Which of the two is read is always said by the caller: `load_project_relation` (the
relation_<name> tasks), `load_todd_relation` (the todd_<name> tasks), or `load_relation`, whose
`data_dir` (else $FFV_DATA_DIR) selects Todd et al.'s files (the `--data-dir` of ffv extract /
train / decode)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ffv_eval import TASKS_DIR
from ffv_eval.data.overlap import PairScreen
from ffv_eval.errors import FFVError
from ffv_eval.files.hashes import file_sha256
from ffv_eval.files.json_lines import json_document, json_line_objects

PAIRS_DIR = TASKS_DIR / "relations" / "pairs"
TODD_SUBDIR = Path("function_vectors") / "abstractive"
HEADLINE_RELATIONS = ("antonym", "capitalize", "country-capital", "english-french", "present-past", "singular-plural")
SPLIT_SEED = 20260108
MIN_TRAIN, MIN_VALIDATION, MIN_TEST = 20, 15, 50


class RelationDataError(FFVError, ValueError):
    """Word-pair data that is unknown, missing, malformed or too small (the message names the file
    and line)."""


@dataclass(frozen=True)
class WordPair:
    input: str
    output: str


@dataclass(frozen=True)
class RelationData:
    name: str
    source: str  # "project" or "todd"
    path: Path
    sha256: str
    train: tuple[WordPair, ...]
    validation: tuple[WordPair, ...]
    test: tuple[WordPair, ...]

    def split(self, name: str) -> tuple[WordPair, ...]:
        if name not in ("train", "validation", "test"):
            raise RelationDataError(f"unknown split '{name}' (train, validation, test)")
        return getattr(self, name)


def data_dir_from_env(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit if explicit not in (None, "") else os.environ.get("FFV_DATA_DIR") or None
    return Path(value) if value is not None else None


def no_data_dir_message(what: str, looked_for: str) -> str:
    """The error for data that only a data directory holds, naming both ways to give one."""
    return (f"{what}: no data directory given; set FFV_DATA_DIR=<dir> or pass lm-eval "
            f"--metadata '{{\"data_dir\": \"<dir>\"}}' with {looked_for} under <dir>")


def project_relations() -> list[str]:
    return sorted(p.stem for p in PAIRS_DIR.glob("*.jsonl"))


def project_relation_path(name: str) -> Path:
    path = PAIRS_DIR / f"{name}.jsonl"
    if not path.exists():
        raise RelationDataError(
            f"unknown relation '{name}': no file {path} (project relations: {', '.join(project_relations())})"
        )
    return path


def todd_relation_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Todd et al.'s file of a relation in `data_dir` (else $FFV_DATA_DIR); an error saying
    where it looked when there is no data directory or no such file."""
    root = data_dir_from_env(data_dir)
    looked_for = f"{TODD_SUBDIR}/{name}.json"
    if root is None:
        raise RelationDataError(no_data_dir_message(f"Todd et al.'s relation '{name}'", looked_for))
    path = root / TODD_SUBDIR / f"{name}.json"
    if not path.exists():
        raise RelationDataError(
            f"relation '{name}': no file {path} in the data directory {root} "
            f"(expected Todd et al.'s layout function_vectors/abstractive/<relation>.json)"
        )
    return path


def relation_path(name: str, data_dir: Path | None = None) -> tuple[Path, str]:
    """(path, source): Todd et al.'s file in `data_dir` if one is given, else the project's file."""
    if data_dir is not None:
        return todd_relation_path(name, data_dir), "todd"
    return project_relation_path(name), "project"


def _pair_from(obj, where: str) -> WordPair:
    if not isinstance(obj, dict):
        raise RelationDataError(f"{where}: expected an object with 'input' and 'output', got {type(obj).__name__}")
    for field in ("input", "output"):
        value = obj.get(field)
        if not isinstance(value, str) or not value.strip():
            raise RelationDataError(f"{where}: field '{field}' must be a non-empty string, got {value!r}")
    return WordPair(obj["input"].strip(), obj["output"].strip())


def read_pairs(path: Path, keep_repeated_inputs: bool = False) -> list[WordPair]:
    """Read a .jsonl (one object a line) or .json (a list of objects) file of word pairs. A
    repeated input keeps its first answer unless keep_repeated_inputs (for callers that
    refuse duplicates themselves)."""
    if path.suffix == ".json":
        items = json_document(path, RelationDataError)
        if not isinstance(items, list):
            raise RelationDataError(f"{path}: expected a JSON list of {{input, output}} objects")
        pairs = [_pair_from(obj, f"{path}: item {i}") for i, obj in enumerate(items)]
    else:
        pairs = [_pair_from(obj, f"{path}: line {n}") for n, obj in json_line_objects(path, RelationDataError)]
    if keep_repeated_inputs:
        return pairs
    seen: dict[str, WordPair] = {}
    for pair in pairs:
        seen.setdefault(pair.input, pair)
    return list(seen.values())


def seeded_shuffle(items: Sequence) -> list:
    """`items` in the project's fixed shuffled order (random.shuffle seeded with SPLIT_SEED): the
    order the splits are cut from, and the order of the basis sources that have none of their own."""
    shuffled = list(items)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    return shuffled


def split_sizes(n: int) -> tuple[int, int, int]:
    n_test = max(MIN_TEST, round(0.3 * n))
    n_valid = max(MIN_VALIDATION, round(0.1 * n))
    n_train = n - n_test - n_valid
    return n_train, n_valid, n_test


def _split_relation(name: str, path: Path, source: str) -> RelationData:
    pairs = read_pairs(path)
    n_train, n_valid, n_test = split_sizes(len(pairs))
    if n_train < MIN_TRAIN:
        raise RelationDataError(
            f"{path}: {len(pairs)} distinct pairs; need at least "
            f"{MIN_TRAIN + MIN_VALIDATION + MIN_TEST} for train/validation/test splits"
        )
    shuffled = seeded_shuffle(pairs)
    test = tuple(shuffled[n_train + n_valid :])
    screen = PairScreen((p.input, p.output) for p in test)
    train, validation = ([p for p in part if (p.input, p.output) not in screen]
                         for part in (shuffled[:n_train], shuffled[n_train : n_train + n_valid]))
    if len(train) < MIN_TRAIN:
        raise RelationDataError(
            f"{path}: {len(train)} training pairs once those matching a test pair (either order, as lemmas) are "
            f"dropped; need at least {MIN_TRAIN}: add pairs, each unordered pair once"
        )
    return RelationData(name=name, source=source, path=path, sha256=file_sha256(path),
                        train=tuple(train), validation=tuple(validation), test=test)


def load_project_relation(name: str) -> RelationData:
    """The project's own pairs of a relation, whatever $FFV_DATA_DIR says."""
    return _split_relation(name, project_relation_path(name), "project")


def load_todd_relation(name: str, data_dir: str | os.PathLike | None = None) -> RelationData:
    """Todd et al.'s pairs of a relation from `data_dir` (else $FFV_DATA_DIR)."""
    return _split_relation(name, todd_relation_path(name, data_dir), "todd")


def load_relation(name: str, data_dir: str | os.PathLike | None = None) -> RelationData:
    """Todd et al.'s pairs when a data directory is given (`data_dir`, else $FFV_DATA_DIR),
    else the project's."""
    root = data_dir_from_env(data_dir)
    return load_todd_relation(name, root) if root is not None else load_project_relation(name)
