"""Analogy data behind the lm-eval tasks in tasks/analogies/: loaders for public analogy
datasets read in their own layouts from a user-supplied data directory (`data_dir` from lm-eval
--metadata, or $FFV_DATA_DIR), the datasets.DatasetDict builders the YAML tasks call, and the
scoring of open analogy completions.

Layout under the data directory:

    analogy_questions/{sat,u2,u4,bats,google}/{valid,test}.jsonl
        {"stem": [a, b], "choice": [[c, d], ...], "answer": int (0-based), "prefix": str}
    ucla_vat/UCLA_VAT.csv
        columns Relation,A,B,C,D,D'; Relation only on the first row of each block
    analogy_completion/{kmiecik,semeval,green}.jsonl
        {"a": str, "b": str, "c": str, "responses": {answer: count, ...}}

Loaders return lists of plain dicts; every problem with a file is a ValueError subclass
(AnalogyDataError) naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ffv_eval.data.relations import data_dir_from_env, no_data_dir_message
from ffv_eval.data.task_data import first_words
from ffv_eval.errors import FFVError
from ffv_eval.files.json_lines import json_line_objects

QUESTION_SETS = ("sat", "u2", "u4", "bats", "google")
QUESTION_SPLITS = ("valid", "test")
COMPLETION_SETS = ("kmiecik", "semeval", "green")
QUESTIONS_SUBDIR = "analogy_questions"
COMPLETION_SUBDIR = "analogy_completion"
UCLA_VAT_FILE = Path("ucla_vat") / "UCLA_VAT.csv"
UCLA_VAT_COLUMNS = ("Relation", "A", "B", "C", "D", "D'")
HUB_DATASET = "relbert/analogy_questions"
# The dataset's commit used without a data directory (head of `main` when pinned, "Update
# analogy_questions.py"); a later push to the hub cannot change the questions under the same task.
HUB_REVISION = "d607d2b6dbe4cf86623fa542bc6d696e10ec3799"
# Seconds allowed to open a connection to the hub, name lookup included, before the hub counts
# as unreachable.
HUB_CONNECT_TIMEOUT_S = 1.0
# lm-eval split names of the analogy_questions files
LM_EVAL_SPLITS = {"test": "test", "validation": "valid"}
# Response recorded when a participant skipped the problem: not an answer.
NON_ANSWERS = frozenset({"skip"})

QUESTIONS_FORMAT = 'the analogy_questions format (one JSON a line: {"stem": [a, b], "choice": [[c, d], ...], "answer": int})'
COMPLETION_FORMAT = 'the analogy_completion format (one JSON a line: {"a": ..., "b": ..., "c": ..., "responses": {answer: count}})'
UCLA_VAT_FORMAT = "the UCLA VAT CSV format (columns Relation,A,B,C,D,D'; Relation on the first row of each block)"


class AnalogyDataError(FFVError, ValueError):
    """An analogy data set that is unknown, missing, or malformed (the message names the file and line)."""


# -- data directory ------------------------------------------------------------------------------
def _no_data_dir(what: str, looked_for: str, hub_note: str = "") -> AnalogyDataError:
    return AnalogyDataError(no_data_dir_message(what, looked_for) + hub_note)


def _hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """True if the Hugging Face hub accepts a TCP connection within `timeout` seconds (name
    lookup included: it runs in a daemon thread, since getaddrinfo has no timeout of its own);
    False at once in offline mode."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    connected, done = [], threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                connected.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=connect, name="ffv-hub-check", daemon=True).start()
    done.wait(timeout)
    return bool(connected)


def _hub_questions_file(name: str, split: str) -> Path:
    """The analogy_questions file of the Hugging Face dataset relbert/analogy_questions at
    HUB_REVISION (same format as the public repository): from the local hub cache if it is
    there, else downloaded when the hub answers within HUB_CONNECT_TIMEOUT_S; otherwise an
    AnalogyDataError naming the data directory option."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    what = f"analogy questions '{name}' ({split})"
    looked_for = f"{QUESTIONS_SUBDIR}/{name}/{split}.jsonl"
    remote = f"dataset/{name}/{split}.jsonl"
    where = f"the Hugging Face hub dataset {HUB_DATASET} (revision {HUB_REVISION})"
    # a plain cache lookup: hf_hub_download(local_files_only=True) may still go on the network
    cached = try_to_load_from_cache(HUB_DATASET, remote, revision=HUB_REVISION, repo_type="dataset")
    if isinstance(cached, str):
        return Path(cached)
    if not _hub_reachable():
        raise _no_data_dir(what, looked_for, f" ({where} is not reachable: offline, or no connection within "
                                             f"{HUB_CONNECT_TIMEOUT_S:g} s)")
    try:
        return Path(hf_hub_download(HUB_DATASET, remote, repo_type="dataset", revision=HUB_REVISION))
    except Exception as err:  # noqa: BLE001 - any hub failure ends in the same advice
        raise _no_data_dir(what, looked_for, f" (download of {remote} from {where} failed: {err})") from err


def _check_name(name: str, known: tuple[str, ...], what: str) -> None:
    if name not in known:
        raise AnalogyDataError(f"unknown {what} '{name}' (known: {', '.join(known)})")


def _jsonl_objects(path: Path):
    return json_line_objects(path, AnalogyDataError)


def _is_word(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_word_pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_word(v) for v in value)


# -- multiple-choice analogy questions -----------------------------------------------------------
def read_analogy_questions(path: Path) -> list[dict]:
    """Questions of one analogy_questions file, as {"stem": [a, b], "choice": [[c, d], ...],
    "answer": int, "prefix": str} (prefix "" where the file has none)."""
    questions = []
    for lineno, obj in _jsonl_objects(path):
        where = f"{path}: line {lineno}"
        stem, choice, answer = obj.get("stem"), obj.get("choice"), obj.get("answer")
        if not _is_word_pair(stem):
            raise AnalogyDataError(f"{where}: field 'stem' must be two non-empty strings [a, b], got {stem!r}")
        if not isinstance(choice, list) or len(choice) < 2:
            raise AnalogyDataError(f"{where}: field 'choice' must be a list of at least two [c, d] pairs, got {choice!r}")
        for i, pair in enumerate(choice):
            if not _is_word_pair(pair):
                raise AnalogyDataError(f"{where}: field 'choice' item {i} must be two non-empty strings [c, d], got {pair!r}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choice):
            raise AnalogyDataError(
                f"{where}: field 'answer' must be an int index into the {len(choice)} choices (0-{len(choice) - 1}), got {answer!r}"
            )
        prefix = obj.get("prefix", "")
        questions.append(
            {
                "stem": [stem[0].strip(), stem[1].strip()],
                "choice": [[c.strip(), d.strip()] for c, d in choice],
                "answer": answer,
                "prefix": prefix if isinstance(prefix, str) else str(prefix),
            }
        )
    if not questions:
        raise AnalogyDataError(f"{path}: no questions in the file (expected {QUESTIONS_FORMAT})")
    return questions


def analogy_questions_path(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    _check_name(name, QUESTION_SETS, "analogy question set")
    _check_name(split, QUESTION_SPLITS, "analogy question split")
    root = data_dir_from_env(data_dir)
    if root is None:
        return _hub_questions_file(name, split)
    folder = Path(root) / QUESTIONS_SUBDIR / name
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        source = (
            f"the SAT questions (Turney 2005, research use only) are not shipped; {HUB_DATASET} on the Hugging Face hub has them"
            if name == "sat"
            else f"the public source is {HUB_DATASET}, or the data/ folder of asahi417/analogy-language-model"
        )
        raise AnalogyDataError(
            f"analogy questions '{name}': no file {path}; put {name}/{split}.jsonl in {QUESTIONS_FORMAT} "
            f"into {folder}/ ({source})"
        )
    return path


def load_analogy_questions(name: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One split ("valid" or "test") of a multiple-choice analogy set (sat, u2, u4, bats, google)."""
    return read_analogy_questions(analogy_questions_path(name, split, data_dir))


# -- UCLA Verbal Analogy Test --------------------------------------------------------------------
def read_ucla_vat(path: Path) -> list[dict]:
    """Problems of UCLA_VAT.csv as {"relation", "a", "b", "c", "d", "d_prime"}; the relation,
    written only on the first row of each block, is carried down."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(cell.strip() for cell in rows[0]) != UCLA_VAT_COLUMNS:
        got = rows[0] if rows else "an empty file"
        raise AnalogyDataError(f"{path}: line 1: expected the header {','.join(UCLA_VAT_COLUMNS)}, got {got!r}")
    problems, relation = [], ""
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(UCLA_VAT_COLUMNS):
            raise AnalogyDataError(f"{path}: line {lineno}: expected {len(UCLA_VAT_COLUMNS)} columns, got {len(row)}")
        cells = [cell.strip() for cell in row]
        if cells[0]:
            relation = cells[0]
        elif not relation:
            raise AnalogyDataError(f"{path}: line {lineno}: field 'Relation' is empty and no earlier row names one")
        for column, value in zip(UCLA_VAT_COLUMNS[1:], cells[1:]):
            if not value:
                raise AnalogyDataError(f"{path}: line {lineno}: field '{column}' is empty")
        a, b, c, d, d_prime = cells[1:]
        problems.append({"relation": relation, "a": a, "b": b, "c": c, "d": d, "d_prime": d_prime})
    if not problems:
        raise AnalogyDataError(f"{path}: no problems in the file (expected {UCLA_VAT_FORMAT})")
    return problems


def load_ucla_vat(data_dir: str | os.PathLike | None = None) -> list[dict]:
    root = data_dir_from_env(data_dir)
    if root is None:
        raise _no_data_dir("UCLA VAT", str(UCLA_VAT_FILE))
    path = Path(root) / UCLA_VAT_FILE
    if not path.is_file():
        raise AnalogyDataError(
            f"UCLA VAT: no file {path}; put UCLA_VAT.csv in {UCLA_VAT_FORMAT} into {path.parent}/ "
            f"(public source: taylorwwebb/emergent_analogies_LLM)"
        )
    return read_ucla_vat(path)


# -- open analogy completion ---------------------------------------------------------------------
def read_analogy_completion(path: Path) -> list[dict]:
    """Problems of an analogy_completion file as {"a", "b", "c", "responses": {answer: count}}."""
    problems = []
    for lineno, obj in _jsonl_objects(path):
        where = f"{path}: line {lineno}"
        for field in ("a", "b", "c"):
            if not _is_word(obj.get(field)):
                raise AnalogyDataError(f"{where}: field '{field}' must be a non-empty string, got {obj.get(field)!r}")
        responses = obj.get("responses")
        if not isinstance(responses, dict) or not responses:
            raise AnalogyDataError(f"{where}: field 'responses' must be a non-empty object {{answer: count}}, got {responses!r}")
        for answer, count in responses.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise AnalogyDataError(f"{where}: field 'responses': count of {answer!r} must be a positive int, got {count!r}")
        problems.append({"a": obj["a"].strip(), "b": obj["b"].strip(), "c": obj["c"].strip(), "responses": dict(responses)})
    if not problems:
        raise AnalogyDataError(f"{path}: no problems in the file (expected {COMPLETION_FORMAT})")
    return problems


def load_analogy_completion(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Open completion problems A:B::C:? with people's answers (kmiecik, semeval, green)."""
    _check_name(name, COMPLETION_SETS, "analogy completion set")
    root = data_dir_from_env(data_dir)
    if root is None:
        raise _no_data_dir(f"analogy completion '{name}'", f"{COMPLETION_SUBDIR}/{name}.jsonl")
    folder = Path(root) / COMPLETION_SUBDIR
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise AnalogyDataError(
            f"analogy completion '{name}': no file {path}; put {name}.jsonl in {COMPLETION_FORMAT} into {folder}/"
        )
    return read_analogy_completion(path)


# -- lm-eval datasets (custom_dataset hooks) -----------------------------------------------------
def _choice_docs(stem_a: str, stem_b: str, pairs, answer: int, **extra) -> dict:
    return {"a": stem_a, "b": stem_b, "choices": [list(p) for p in pairs], "answer": answer, **extra}


def analogy_questions_dataset(analogy_set: str, data_dir: str | None = None, **_metadata):
    """test (test.jsonl) and validation (valid.jsonl) splits: {"a", "b", "choices": [[c, d],
    ...], "answer", "prefix"}."""
    import datasets

    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(
                [
                    _choice_docs(*q["stem"], q["choice"], q["answer"], prefix=q["prefix"])
                    for q in load_analogy_questions(analogy_set, file_split, data_dir)
                ]
            )
            for split, file_split in LM_EVAL_SPLITS.items()
        }
    )


def ucla_vat_dataset(data_dir: str | None = None, **_metadata):
    """test split: choices [[C, D], [C, D']], answer 0."""
    import datasets

    docs = [
        _choice_docs(p["a"], p["b"], [(p["c"], p["d"]), (p["c"], p["d_prime"])], 0, relation=p["relation"])
        for p in load_ucla_vat(data_dir)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def ranked_responses(responses: dict[str, int]) -> list[tuple[str, int]]:
    """People's answers, lower-cased and stripped of edge punctuation, merged, without skips,
    most frequent first; ties alphabetical."""
    merged: dict[str, int] = {}
    for answer, count in responses.items():
        key = " ".join(w for w in first_words(answer.lower(), len(answer.split())) if w)
        if key and key not in NON_ANSWERS:
            merged[key] = merged.get(key, 0) + count
    return sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))


def analogy_completion_dataset(analogy_set: str, data_dir: str | None = None, **_metadata):
    """test split: {"a", "b", "c", "answers": [...], "counts": [...]} with answers ranked by
    ranked_responses (answers[0] is the top answer)."""
    import datasets

    docs = []
    for p in load_analogy_completion(analogy_set, data_dir):
        ranked = ranked_responses(p["responses"])
        docs.append({"a": p["a"], "b": p["b"], "c": p["c"],
                     "answers": [a for a, _ in ranked], "counts": [n for _, n in ranked]})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# -- scoring -------------------------------------------------------------------------------------
def _starts_with(generation: str, answer: str) -> bool:
    n = len(answer.split())
    return n > 0 and first_words(generation.lower(), n) == answer.split()


def completion_scores(generation: str, answers: list[str], counts: list[int], prompt_words: tuple[str, ...] = ()) -> dict[str, float]:
    """top_answer: the generation's first word(s) equal the most frequent answer (answers are
    ranked, ties alphabetical). human_share: share of people (skips excluded) whose answer the
    generation starts with (for one-word answers: who gave the model's first word).
    repeats_abc: the generation starts with a word of the prompt (A, B or C) that no one gave."""
    repeats = float(any(_starts_with(generation, w.lower()) and w.lower() not in answers for w in prompt_words))
    total = sum(counts)
    if not answers or total == 0:
        return {"top_answer": 0.0, "human_share": 0.0, "repeats_abc": repeats}
    share = sum(n for answer, n in zip(answers, counts) if _starts_with(generation, answer))
    return {"top_answer": float(_starts_with(generation, answers[0])), "human_share": share / total, "repeats_abc": repeats}


def process_completion_results(doc: dict, results: list[str]) -> dict[str, float]:
    return completion_scores(results[0], doc["answers"], doc["counts"], (doc["a"], doc["b"], doc["c"]))


# -- prompt templates (doc_to_choice hooks) ------------------------------------------------------
def one_shot_choices(doc: dict) -> list[str]:
    """Continuations of the one-shot function-vector template after "Q: {a}\\nA: {b}\\n\\n": each
    choice "Q: {c}\\nA: {d}", then each choice's C part alone, "Q: {c}\\nA:", so that
    process_choice_results can score D's tokens given C (acc_d)."""
    return [f"Q: {c}\nA: {d}" for c, d in doc["choices"]] + [f"Q: {c}\nA:" for c, _ in doc["choices"]]


def process_choice_results(doc: dict, results) -> dict[str, float]:
    """acc and acc_norm as lm-eval computes them for multiple choice, over the whole
    continuations "Q: C\\nA: D" (acc_norm divides each log-likelihood by the continuation's
    length in characters), and acc_d: the choice whose D is most likely given its own C, log P(Q:
    C\\nA: D) - log P(Q: C\\nA:), the part a vector added where D starts can change."""
    n = len(doc["choices"])
    if len(results) != 2 * n:
        raise AnalogyDataError(f"{len(results)} scores for a question with {n} choices; expected {2 * n} "
                               f"(each choice, then its C part; see one_shot_choices)")
    whole = np.array([float(r[0]) for r in results[:n]])
    c_part = np.array([float(r[0]) for r in results[n:]])
    lengths = np.array([float(len(text)) for text in one_shot_choices(doc)[:n]])
    answer = int(doc["answer"])
    return {"acc": float(np.argmax(whole) == answer), "acc_norm": float(np.argmax(whole / lengths) == answer),
            "acc_d": float(np.argmax(whole - c_part) == answer)}


def plain_choices(doc: dict) -> list[str]:
    """Continuations of the plain template after "{a} is to {b} as" (lm-eval adds the space)."""
    return [f"{c} is to {d}" for c, d in doc["choices"]]
