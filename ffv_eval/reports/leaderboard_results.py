"""Reading lm-eval results files into a leaderboard: the entries, their conditions, the newest
run of each cell, and the checks that keep incomparable runs apart. No rendering, no running.

A results file is what `lm_eval --output_path DIR` writes (`DIR/<model>/results_<date>.json`,
with `--log_samples` also `samples_<task>_<date>.jsonl` beside it: one line per question).
Each (file, task) becomes one entry: the model (`config.ffv_model`, else model_args'
`pretrained`), the condition (the patched vector's kind, `<k>-shot`, or `unpatched`), the
task's primary metric with lm-eval's standard error and all its other metrics, its samples file
when there is one, plus what makes two runs of a cell comparable: the model fingerprint, the
vector (file hash, layer, scale), the data source and the task version (`leaderboard_runs`
compares these before reusing a cell).

The gain of each patched run over the unpatched run of the same model and task is paired, per
metric: the questions' outcomes in the two samples files, matched on doc_id and doc_hash, give
the mean gain, its bootstrap interval and McNemar's test (`paired`); without samples files the
gain says so and has no interval."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from ffv_eval.errors import FFVError
from ffv_eval.files.json_lines import json_line_objects
from ffv_eval.reports.paired import Outcome, PairedGain, PairingError, match_outcomes, paired_gain
from ffv_eval.vectors.library import KINDS
from ffv_eval.vectors.record import VectorInfo, VectorRecord
from ffv_eval.vectors.spec import AUTO, COMPOSITE, VectorSpec

REQUIRED_FIELDS = ("results", "config", "versions", "n-shot")
PRIMARY_METRICS = ("exact_match", "acc", "acc_norm", "top_answer")
VECTOR_KIND_ORDER = (*KINDS, "cfv", "auto")
SHOT_CONDITION = re.compile(r"^(\d+)-shot$")


class LeaderboardError(FFVError, ValueError):
    """lm-eval results files, or leaderboard options, that cannot make a leaderboard."""


@dataclass(frozen=True)
class Entry:
    """One task's primary score from one results file."""

    model: str
    condition: str
    task: str
    metric: str
    value: float
    stderr: float | None
    n_samples: int | None
    n_shot: int
    limit: float | None
    task_version: str
    lm_eval_version: str
    vector: VectorInfo | None  # the vector this task got (vectors.record)
    source: Path
    timestamp: float
    model_fingerprint: str | None = None  # config.model_fingerprint (ffv-patched records it)
    data_source: str | None = None  # see data_source(); None: not recorded
    scores: dict[str, float] = field(default_factory=dict)  # every metric of the task (the primary's filter)
    stderrs: dict[str, float | None] = field(default_factory=dict)  # their standard errors (None: not reported)
    filter: str = "none"  # lm-eval's filter of those metrics
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # as the results record it
    samples: Path | None = None  # samples_<task>_<date>.jsonl beside the results file, if logged

    @property
    def cell(self) -> tuple[str, str, str]:
        return self.model, self.condition, self.task


@dataclass(frozen=True)
class GainRow:
    """One metric of one task: a patched run's gain over the unpatched run of the same model."""

    patched: Entry
    unpatched: Entry
    metric: str
    paired: PairedGain | None  # None: not paired, `note` says why
    note: str | None = None

    @property
    def gain(self) -> float:
        """The paired mean gain, else the difference of the two runs' scores."""
        return self.paired.mean_gain if self.paired else self.patched.scores[self.metric] - self.unpatched.scores[self.metric]

    @property
    def lower_is_better(self) -> bool:
        return self.patched.higher_is_better.get(self.metric) is False


@dataclass
class Leaderboard:
    entries: list[Entry]  # one per (model, condition, task), sorted
    sources: list[Path]  # every results file read
    notes: list[str] = field(default_factory=list)  # replaced duplicates, allowed version mixes
    sections: list[tuple[str, list[str], list[list]]] = field(default_factory=list)  # (title, header, rows) shown after the gains

    @property
    def models(self) -> list[str]:
        return sorted({e.model for e in self.entries})

    @property
    def conditions(self) -> list[str]:
        return sorted({e.condition for e in self.entries}, key=condition_sort_key)

    @property
    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.entries})

    @property
    def lm_eval_versions(self) -> list[str]:
        return sorted({e.lm_eval_version for e in self.entries})

    def by_cell(self) -> dict[tuple[str, str, str], Entry]:
        return {e.cell: e for e in self.entries}

    def task_versions(self, task: str) -> list[str]:
        return sorted({e.task_version for e in self.entries if e.task == task})

    def task_metric(self, task: str) -> str:
        return "/".join(sorted({e.metric for e in self.entries if e.task == task}))

    def rows(self) -> list[tuple[str, str]]:
        """(model, condition) pairs that have at least one score, in table order."""
        present = {(e.model, e.condition) for e in self.entries}
        return [(m, c) for m in self.models for c in self.conditions if (m, c) in present]

    def patched_pairs(self) -> list[tuple[Entry, Entry]]:
        """(patched entry, unpatched entry of the same model and task), in table order."""
        cells = self.by_cell()
        return [(e, cells[(e.model, "unpatched", e.task)]) for e in self.entries
                if e.vector is not None and (e.model, "unpatched", e.task) in cells]

    def gains(self) -> dict[tuple[str, str, str], float]:
        """(model, patched condition, task) -> score minus the unpatched score of that model and task."""
        return {e.cell: e.value - base.value for e, base in self.patched_pairs()}

    @cached_property
    def paired_gains(self) -> list[GainRow]:
        """Every metric of every patched cell against the unpatched run: paired where both
        runs logged samples (computed once: the bootstrap takes a moment)."""
        return [row for patched, base in self.patched_pairs() for row in compare_runs(patched, base)]

    def gain_intervals(self) -> dict[tuple[str, str, str], tuple[float, float]]:
        """(model, patched condition, task) -> paired 95% interval of the primary metric's gain."""
        return {row.patched.cell: row.paired.ci95 for row in self.paired_gains
                if row.paired is not None and row.metric == row.patched.metric}


# -- reading ------------------------------------------------------------------------------

def visible_results_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("results_*.json")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def find_results_files(locations: Sequence[str | os.PathLike]) -> list[Path]:
    """Every `results_*.json` under the given directories (or the files themselves); hidden
    directories (an interrupted `--run`'s staging area) are skipped."""
    found: list[Path] = []
    for location in map(Path, locations):
        if location.is_file():
            found.append(location)
        elif location.is_dir():
            files = visible_results_files(location)
            if not files:
                raise LeaderboardError(f"{location}: no lm-eval results files (results_*.json) in this directory")
            found.extend(files)
        else:
            raise LeaderboardError(f"{location}: no such results directory or file")
    return list(dict.fromkeys(p.resolve() for p in found))


def read_results_file(path: Path) -> dict:
    """The parsed results file; an error naming the file and the problem if it is not lm-eval's."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LeaderboardError(f"{path}: not a text file ({err.reason})") from err
    if not text.strip():
        raise LeaderboardError(f"{path}: empty file, not an lm-eval results file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LeaderboardError(
            f"{path}: line {err.lineno} column {err.colno}: malformed JSON ({err.msg}); truncated file?"
        ) from err
    if not isinstance(data, dict):
        raise LeaderboardError(f"{path}: not an lm-eval results file (a JSON {type(data).__name__}, expected an object)")
    for name in REQUIRED_FIELDS:
        if name not in data:
            raise LeaderboardError(f"{path}: not an lm-eval results file (field '{name}' is missing)")
        if not isinstance(data[name], dict):
            raise LeaderboardError(f"{path}: field '{name}' should be an object, got {type(data[name]).__name__}")
    return data


def parse_model_args(model_args, path: Path) -> dict:
    """A results file's `config.model_args`, recorded as given to lm-eval: a dict, or a
    'key=value,key=value' string, read by lm-eval's own parser (which also casts numbers and
    booleans, as it did for the run)."""
    if model_args is None:
        return {}
    if isinstance(model_args, dict):
        return model_args
    if not isinstance(model_args, str):
        raise LeaderboardError(f"{path}: field 'config.model_args' should be an object or a 'key=value,key=value' "
                               f"string, got {type(model_args).__name__}")
    from lm_eval.utils import simple_parse_args_string  # lm-eval's reading of --model_args; imported when needed

    parsed = simple_parse_args_string(model_args)
    if "" in parsed:
        raise LeaderboardError(f"{path}: field 'config.model_args' {model_args!r} has an entry with no key before '='; "
                               f"expected 'key=value,key=value'")
    return parsed


def model_name(config: dict, path: Path) -> str:
    if config.get("ffv_model"):
        return str(config["ffv_model"])
    pretrained = parse_model_args(config.get("model_args"), path).get("pretrained")
    if not pretrained:
        raise LeaderboardError(f"{path}: field 'config.model_args' has no 'pretrained' (and there is no 'config.ffv_model')")
    return str(pretrained)


def vector_record(config: dict, path: Path) -> VectorRecord | None:
    """The vector a run recorded (config.ffv_vector); None: unpatched. Each task's own vector is
    its `used_by(task)`."""
    recorded = config.get("ffv_vector")
    if recorded is None:
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("kind"), str):
        raise LeaderboardError(f"{path}: field 'config.ffv_vector' should be null or an object with a 'kind'")
    return VectorRecord.from_json(recorded)


PROJECT_DATA = "project files"


def data_source(task_config) -> str | None:
    """Where a task's documents came from, read off its config as lm-eval records it in results
    (`configs.<task>`) and as TaskManager builds it: the task YAML's `metadata.data_source` says
    `project` (the project's own files, e.g. relation_<name>) or `data_dir` (a data directory:
    todd_<name>, the analogy tasks), and lm-eval puts --metadata's `data_dir` next to it. None
    when that is not recorded: a data directory given by $FFV_DATA_DIR alone, results from
    before tasks declared their source, tasks of other projects. None never matches."""
    metadata = task_config.get("metadata") if isinstance(task_config, dict) else None
    if not isinstance(metadata, dict):
        return None
    declared, data_dir = metadata.get("data_source"), metadata.get("data_dir")
    if declared == "project":
        return PROJECT_DATA
    if declared == "data_dir" and data_dir:
        return f"data directory {data_dir}"
    return None


def condition_name(task: str, n_shot: int, vector_kind: str | None, vector_relation: str | None) -> str:
    """`unpatched`, `<k>-shot`, or the vector's kind; a vector made for another relation than the
    task's (relation_<name> or todd_<name>) is named `<kind>:<relation>`; a vector with
    demonstrations adds `+<k>-shot`."""
    if vector_kind is None:
        return f"{n_shot}-shot" if n_shot > 0 else "unpatched"
    name = vector_kind
    own_tasks = (f"relation_{vector_relation}", f"todd_{vector_relation}")
    if vector_kind != "cfv" and vector_relation and task not in own_tasks:  # a CFV is per question
        name = f"{vector_kind}:{vector_relation}"
    return f"{name}+{n_shot}-shot" if n_shot > 0 else name


def condition_spec(condition: str) -> VectorSpec:
    """The vector= of a patched condition (not `unpatched` or `<k>-shot`): a vector kind alone
    (`ffv`) stands for `<kind>:*`; `cfv`, `auto` and `<kind>:<relation>` are vector= as they are."""
    return VectorSpec.parse(condition if ":" in condition or condition in (COMPOSITE, AUTO) else f"{condition}:*")


def condition_sort_key(condition: str) -> tuple:
    if condition == "unpatched":
        return (0, 0, condition)
    shots = SHOT_CONDITION.match(condition)
    if shots:
        return (3, int(shots.group(1)), condition)
    kind = condition.split(":")[0].split("+")[0]
    rank = VECTOR_KIND_ORDER.index(kind) if kind in VECTOR_KIND_ORDER else len(VECTOR_KIND_ORDER)
    return (1 if condition == kind else 2, rank, condition)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _metric_keys(task_results: dict) -> dict[str, list[str]]:
    """metric -> its `metric,filter` keys with a numeric value (standard errors left out)."""
    by_metric: dict[str, list[str]] = {}
    for key, value in task_results.items():
        metric, sep, _ = key.partition(",")
        if sep and not metric.endswith("_stderr") and _number(value) is not None:
            by_metric.setdefault(metric, []).append(key)
    return by_metric


def _primary_key(task_results: dict) -> str | None:
    by_metric = _metric_keys(task_results)
    if not by_metric:
        return None
    metric = next((m for m in PRIMARY_METRICS if m in by_metric), next(iter(by_metric)))
    return f"{metric},none" if f"{metric},none" in by_metric[metric] else by_metric[metric][0]


def primary_metric(task_results: dict) -> tuple[str, float, float | None] | None:
    """(metric, value, stderr) for the first of PRIMARY_METRICS the task reports (filter
    `none` preferred), else its first numeric metric; None if it has none (a bare group)."""
    key = _primary_key(task_results)
    if key is None:
        return None
    stderr_key = key.replace(",", "_stderr,", 1)
    return key.partition(",")[0], float(task_results[key]), _number(task_results.get(stderr_key))


def task_scores(task_results: dict) -> tuple[str, dict[str, float], dict[str, float | None]]:
    """(filter, metric -> value, metric -> stderr) of every metric the task reports under its
    primary metric's filter: acc, acc_norm and acc_d of a multiple-choice analogy task, say."""
    key = _primary_key(task_results)
    if key is None:
        return "none", {}, {}
    filter_name = key.partition(",")[2]
    metrics = [m for m, keys in _metric_keys(task_results).items() if f"{m},{filter_name}" in keys]
    return (filter_name, {m: float(task_results[f"{m},{filter_name}"]) for m in metrics},
            {m: _number(task_results.get(f"{m}_stderr,{filter_name}")) for m in metrics})


def samples_file(results_path: Path, task: str) -> Path | None:
    """The `samples_<task>_<date>.jsonl` lm-eval wrote with `--log_samples` beside
    `results_<date>.json` (same date), or None."""
    date = results_path.stem.removeprefix("results_")
    path = results_path.with_name(f"samples_{task}_{date}.jsonl")
    return path if path.is_file() else None


def sample_lines(entry: Entry, error: type[Exception] = LeaderboardError):
    """(line number, doc_id, sample) for each line of the entry's samples file in the entry's
    filter (lm-eval writes one line per question and filter); a doc_id that is not an integer is
    an `error` naming the file and line."""
    for lineno, line in json_line_objects(entry.samples, error):
        if line.get("filter", "none") != entry.filter:
            continue
        doc_id = line.get("doc_id")
        if isinstance(doc_id, bool) or not isinstance(doc_id, int):
            raise error(f"{entry.samples}: line {lineno}: field 'doc_id' should be an integer, got {doc_id!r}")
        yield lineno, doc_id, line


def read_outcomes(entry: Entry) -> dict[str, list[Outcome]]:
    """metric -> each question's outcome in the entry's samples file (lines of the entry's
    filter; lm-eval writes one line per question and filter)."""
    if entry.samples is None:
        raise LeaderboardError(f"{entry.source}: no samples file for task {entry.task} (run lm-eval with --log_samples)")
    outcomes: dict[str, list[Outcome]] = {metric: [] for metric in entry.scores}
    for lineno, doc_id, line in sample_lines(entry):
        doc_hash = line.get("doc_hash") if isinstance(line.get("doc_hash"), str) else None
        for metric, found in outcomes.items():
            value = _number(line.get(metric))
            if value is None:
                raise LeaderboardError(f"{entry.samples}: line {lineno}: field '{metric}' should be a number, got "
                                       f"{line.get(metric)!r} (the results file reports {metric} for {entry.task})")
            found.append(Outcome(doc_id, doc_hash, value))
    return outcomes


def compare_runs(patched: Entry, unpatched: Entry) -> list[GainRow]:
    """One row per metric both runs report: paired over their questions when both logged
    samples, else the plain difference with a note saying what is missing."""
    metrics = [m for m in patched.scores if m in unpatched.scores]
    missing = [f"{display_path(e.source)} ({label})" for e, label in ((patched, "patched"), (unpatched, "unpatched"))
               if e.samples is None]
    if missing:
        note = "no per-question samples for " + " and ".join(missing) + ": rerun with --log_samples"
        return [GainRow(patched, unpatched, m, None, note) for m in metrics]
    outcomes = read_outcomes(patched), read_outcomes(unpatched)
    rows = []
    for metric in metrics:
        try:
            treated, base = match_outcomes(outcomes[0][metric], outcomes[1][metric],
                                           f"{patched.condition} ({display_path(patched.samples)})",
                                           f"unpatched ({display_path(unpatched.samples)})")
        except PairingError as err:
            rows.append(GainRow(patched, unpatched, metric, None, f"not paired: {err}"))
            continue
        rows.append(GainRow(patched, unpatched, metric, paired_gain(treated, base)))
    return rows


def version_text(version) -> str:
    number = _number(version)
    return str(number) if number is not None else str(version)


def _timestamp(data: dict, path: Path) -> float:
    try:
        return float(data["date"])
    except (KeyError, TypeError, ValueError):
        return path.stat().st_mtime


def entries_from_file(path: Path, data: dict) -> list[Entry]:
    """One entry per task in `results` that reports a metric."""
    config = data["config"]
    model = model_name(config, path)
    lm_eval_version = str(data.get("lm_eval_version") or config.get("lm_eval_version") or "unknown")
    timestamp = _timestamp(data, path)
    limit = _number(config.get("limit"))
    fingerprint = config.get("model_fingerprint")
    task_configs = data.get("configs") if isinstance(data.get("configs"), dict) else {}
    entries = []
    for task, task_results in data["results"].items():
        if not isinstance(task_results, dict):
            raise LeaderboardError(f"{path}: field 'results.{task}' should be an object")
        metric = primary_metric(task_results)
        if metric is None:
            continue
        if task not in data["versions"]:
            raise LeaderboardError(f"{path}: field 'versions.{task}' is missing")
        n_shot = data["n-shot"].get(task, 0)
        if _number(n_shot) is None:
            raise LeaderboardError(f"{path}: field 'n-shot.{task}' should be a number, got {n_shot!r}")
        effective = (data.get("n-samples") or {}).get(task, {})
        n_samples = effective.get("effective") if isinstance(effective, dict) else None
        record = vector_record(config, path)
        vector = None if record is None else record.used_by(task)
        filter_name, scores, stderrs = task_scores(task_results)
        directions = (data.get("higher_is_better") or {}).get(task)
        entries.append(Entry(
            model=model,
            condition=condition_name(task, int(n_shot), vector and vector.kind, vector and vector.relation),
            task=task, metric=metric[0], value=metric[1], stderr=metric[2],
            n_samples=int(n_samples) if _number(n_samples) is not None else None,
            n_shot=int(n_shot), limit=limit, task_version=version_text(data["versions"][task]),
            lm_eval_version=lm_eval_version, vector=vector, source=path, timestamp=timestamp,
            model_fingerprint=str(fingerprint) if fingerprint else None, data_source=data_source(task_configs.get(task)),
            scores=scores, stderrs=stderrs, filter=filter_name, samples=samples_file(path, task),
            higher_is_better={m: v for m, v in directions.items() if isinstance(v, bool)} if isinstance(directions, dict) else {},
        ))
    return entries


def read_entries(locations: Sequence[str | os.PathLike]) -> tuple[list[Entry], list[Path]]:
    files = find_results_files(locations)
    entries = [e for path in files for e in entries_from_file(path, read_results_file(path))]
    return entries, files


# -- the leaderboard: the newest run of each cell ----------------------------------------

def display_path(path: Path | str) -> str:
    """Relative to the current directory when below it, else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def when_text(timestamp: float) -> str:
    """A results file's date as shown in notes and the CSV."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def newest_entries(entries: Iterable[Entry], replaced: Callable[[Entry, Entry], None] | None = None) -> dict[tuple[str, str, str], Entry]:
    """The newest entry of each (model, condition, task): the one a leaderboard shows.
    `replaced(newer, older)` hears of each older one set aside."""
    newest: dict[tuple[str, str, str], Entry] = {}
    for entry in sorted(entries, key=lambda e: (e.timestamp, str(e.source))):
        older = newest.get(entry.cell)
        if older is not None and replaced is not None:
            replaced(entry, older)
        newest[entry.cell] = entry
    return newest


def build_leaderboard(locations: Sequence[str | os.PathLike], allow_mixed_versions: bool = False) -> Leaderboard:
    """Read every results file; the newest run of a (model, condition, task) wins (stated in
    the notes); different versions or data sources of one task are an error unless allowed."""
    entries, files = read_entries(locations)
    if not entries:
        raise LeaderboardError(f"no task scores in {len(files)} results file(s): {', '.join(map(str, files))}")
    notes = []

    def note_replaced(entry: Entry, older: Entry) -> None:
        notes.append(f"{' / '.join(entry.cell)}: {display_path(entry.source)} ({when_text(entry.timestamp)}) "
                     f"replaces the older {display_path(older.source)} ({when_text(older.timestamp)})")

    newest = newest_entries(entries, note_replaced)
    kept = sorted(newest.values(), key=lambda e: (e.model, condition_sort_key(e.condition), e.task))
    for task in sorted({e.task for e in kept}):
        for what, value_of in (("version", lambda e: e.task_version), ("data source", lambda e: e.data_source or "unrecorded")):
            first_by_value: dict[str, Entry] = {}
            for e in kept:
                if e.task == task:
                    first_by_value.setdefault(value_of(e), e)
            if len(first_by_value) > 1:
                (v1, a), (v2, b) = list(first_by_value.items())[:2]
                message = f"task {task} has {what} {v1} in {a.source} but {what} {v2} in {b.source}"
                if not allow_mixed_versions:
                    raise LeaderboardError(f"{message}; runs of different task versions or data sources are not mixed "
                                           "(rerun them, or pass --allow-mixed-versions)")
                notes.append(f"mixed task {what}s: {message}")
    return Leaderboard(entries=kept, sources=files, notes=notes)

