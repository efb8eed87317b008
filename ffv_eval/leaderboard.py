"""`ffv leaderboard`: one table of lm-eval results files (model x condition x task) as Markdown,
CSV and a self-contained HTML page; with `--run`, the missing lm-eval runs are made first.

A results file is what `lm_eval --output_path DIR` writes (`DIR/<model>/results_<date>.json`).
Each (file, task) becomes one entry: the model (`config.ffv_model`, else model_args'
`pretrained`), the condition (the patched vector's kind, `<k>-shot`, or `unpatched`) and the
task's primary metric with lm-eval's standard error, plus what makes two runs of a cell
comparable: the model fingerprint, the vector (file hash, layer, scale), the data source and the
task version. `--run` reuses a cell only when all of these equal what it would run now."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ffv_eval.atomic_files import atomic_write, atomic_write_text
from ffv_eval.file_hashes import vector_sha256

REQUIRED_FIELDS = ("results", "config", "versions", "n-shot")
PRIMARY_METRICS = ("exact_match", "acc", "acc_norm", "top_answer")
VECTOR_KIND_ORDER = ("fv", "ffv", "ffv-random", "cfv")
DEFAULT_RUN_CONDITIONS = ("unpatched", "fv", "ffv", "10-shot")
RELATION_GROUPS = ("relations", "relations_all")
SHOT_CONDITION = re.compile(r"^(\d+)-shot$")


class LeaderboardError(ValueError):
    pass


@dataclass(frozen=True)
class VectorInfo:
    """What a patched run recorded about its vector (config.ffv_vector)."""

    kind: str
    relation: str | None
    path: str | None
    layer: int | None
    patch_layer: int | None
    scale: float | None
    patch_scale: float | None
    sha256: str | None = None  # of the vector file (or basis directory), where the run recorded it


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
    vector: VectorInfo | None
    source: Path
    timestamp: float
    model_fingerprint: str | None = None  # config.model_fingerprint (ffv-patched records it)
    data_source: str | None = None  # see data_source(); None: not recorded

    @property
    def cell(self) -> tuple[str, str, str]:
        return self.model, self.condition, self.task


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

    def gains(self) -> dict[tuple[str, str, str], float]:
        """(model, patched condition, task) -> score minus the unpatched score of that model and task."""
        cells = self.by_cell()
        out = {}
        for e in self.entries:
            base = cells.get((e.model, "unpatched", e.task))
            if e.vector is not None and base is not None:
                out[e.cell] = e.value - base.value
        return out


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


def parse_model_args(model_args) -> dict:
    """lm-eval records model_args as given: a dict, or a 'key=value,key=value' string."""
    if isinstance(model_args, dict):
        return model_args
    if isinstance(model_args, str):
        return dict(part.split("=", 1) for part in model_args.split(",") if "=" in part)
    return {}


def model_name(config: dict, path: Path) -> str:
    if config.get("ffv_model"):
        return str(config["ffv_model"])
    pretrained = parse_model_args(config.get("model_args")).get("pretrained")
    if not pretrained:
        raise LeaderboardError(f"{path}: field 'config.model_args' has no 'pretrained' (and there is no 'config.ffv_model')")
    return str(pretrained)


def vector_info(config: dict, path: Path, task: str | None = None) -> VectorInfo | None:
    """The vector a run recorded; for per-task runs (vector=<kind>:*), the one `task` used."""
    recorded = config.get("ffv_vector")
    if recorded is None:
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("kind"), str):
        raise LeaderboardError(f"{path}: field 'config.ffv_vector' should be null or an object with a 'kind'")
    per_task = recorded.get("per_task")
    if isinstance(per_task, dict) and isinstance(per_task.get(task), dict):
        used = per_task[task]
        recorded = {**recorded, "relation": str(task).removeprefix("relation_"), "path": used.get("path"),
                    "layer": used.get("layer"), "patch_layer": used.get("layer"), "sha256": used.get("sha256")}
    sha256 = recorded.get("sha256")
    return VectorInfo(
        kind=recorded["kind"], relation=recorded.get("relation"), path=recorded.get("path"),
        layer=recorded.get("layer"), patch_layer=recorded.get("patch_layer"),
        scale=recorded.get("scale"), patch_scale=recorded.get("patch_scale"),
        sha256=sha256 if isinstance(sha256, str) else None,
    )


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


def primary_metric(task_results: dict) -> tuple[str, float, float | None] | None:
    """(metric, value, stderr) for the first of PRIMARY_METRICS the task reports (filter
    `none` preferred), else its first numeric metric; None if it has none (a bare group)."""
    by_metric: dict[str, list[str]] = {}
    for key, value in task_results.items():
        metric, sep, _ = key.partition(",")
        if sep and not metric.endswith("_stderr") and _number(value) is not None:
            by_metric.setdefault(metric, []).append(key)
    if not by_metric:
        return None
    metric = next((m for m in PRIMARY_METRICS if m in by_metric), next(iter(by_metric)))
    key = f"{metric},none" if f"{metric},none" in by_metric[metric] else by_metric[metric][0]
    stderr_key = key.replace(",", "_stderr,", 1)
    return metric, float(task_results[key]), _number(task_results.get(stderr_key))


def _version_text(version) -> str:
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
        vector = vector_info(config, path, task)
        entries.append(Entry(
            model=model,
            condition=condition_name(task, int(n_shot), vector and vector.kind, vector and vector.relation),
            task=task, metric=metric[0], value=metric[1], stderr=metric[2],
            n_samples=int(n_samples) if _number(n_samples) is not None else None,
            n_shot=int(n_shot), limit=limit, task_version=_version_text(data["versions"][task]),
            lm_eval_version=lm_eval_version, vector=vector, source=path, timestamp=timestamp,
            model_fingerprint=str(fingerprint) if fingerprint else None, data_source=data_source(task_configs.get(task)),
        ))
    return entries


def read_entries(locations: Sequence[str | os.PathLike]) -> tuple[list[Entry], list[Path]]:
    files = find_results_files(locations)
    entries = [e for path in files for e in entries_from_file(path, read_results_file(path))]
    return entries, files


def _when(timestamp: float) -> str:
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
        notes.append(f"{' / '.join(entry.cell)}: {display_path(entry.source)} ({_when(entry.timestamp)}) "
                     f"replaces the older {display_path(older.source)} ({_when(older.timestamp)})")

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


# -- formatting ---------------------------------------------------------------------------

def display_path(path: Path | str) -> str:
    """Relative to the current directory when below it, else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def format_score(entry: Entry) -> str:
    stderr = f" ± {entry.stderr:.3f}" if entry.stderr is not None else ""
    return f"{entry.value:.3f}{stderr}"


def task_heading(board: Leaderboard, task: str) -> str:
    return f"{task} ({board.task_metric(task)}, v{'/'.join(board.task_versions(task))})"


def _markdown_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(map(_markdown_cell, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(_markdown_cell("" if v is None else v) for v in row) + " |" for row in rows]
    return lines


def summary_lines(board: Leaderboard) -> list[str]:
    return [
        f"lm-eval {', '.join(board.lm_eval_versions)}; {len(board.sources)} results file(s); "
        f"{len(board.models)} model(s), {len(board.conditions)} condition(s), {len(board.tasks)} task(s).",
        "Each cell: the task's primary metric (first of " + ", ".join(PRIMARY_METRICS)
        + ") ± lm-eval's standard error. Task versions in the column headings.",
    ]


COMPOSITE_RELATION = "per question (composite)"  # a CFV records no relation of its own


def vector_rows(board: Leaderboard) -> list[list]:
    return [[e.model, e.condition, e.task, e.vector.kind,
             e.vector.relation or (COMPOSITE_RELATION if e.vector.kind == "cfv" else None), e.vector.path, e.vector.layer,
             e.vector.patch_layer, e.vector.scale, e.vector.patch_scale]
            for e in board.entries if e.vector is not None]


VECTOR_HEADER = ["model", "condition", "task", "kind", "relation", "path", "layer", "patch layer", "scale", "patch scale"]
RUN_HEADER = ["model", "condition", "task", "n-shot", "n", "limit", "lm-eval", "task version", "data", "results file"]


def run_rows(board: Leaderboard) -> list[list]:
    return [[e.model, e.condition, e.task, e.n_shot, e.n_samples, None if e.limit is None else f"{e.limit:g}",
             e.lm_eval_version, e.task_version, e.data_source or "unrecorded", display_path(e.source)] for e in board.entries]


def gain_rows(board: Leaderboard) -> list[list]:
    gains = board.gains()
    rows = []
    for model, condition in board.rows():
        values = [gains.get((model, condition, t)) for t in board.tasks]
        if any(v is not None for v in values):
            rows.append([model, condition, *(f"{v:+.3f}" if v is not None else "" for v in values)])
    return rows


def format_markdown(board: Leaderboard, title: str = "Leaderboard") -> str:
    cells = board.by_cell()
    lines = [f"# {title}", "", *summary_lines(board), ""]
    score_rows = [[m, c, *(format_score(cells[(m, c, t)]) if (m, c, t) in cells else "" for t in board.tasks)]
                  for m, c in board.rows()]
    lines += _markdown_table(["model", "condition", *(task_heading(board, t) for t in board.tasks)], score_rows)
    gains = gain_rows(board)
    if gains:
        lines += ["", "## Gain from patching (patched minus unpatched)", ""]
        lines += _markdown_table(["model", "condition", *board.tasks], gains)
    for title_text, header, rows in board.sections:
        lines += ["", f"## {title_text}", ""] + _markdown_table(header, rows)
    if vector_rows(board):
        lines += ["", "## Vectors", ""] + _markdown_table(VECTOR_HEADER, vector_rows(board))
    lines += ["", "## Runs", ""] + _markdown_table(RUN_HEADER, run_rows(board))
    if board.notes:
        lines += ["", "## Notes", ""] + [f"- {_markdown_cell(n)}" for n in board.notes]
    return "\n".join(lines) + "\n"


CSV_HEADER = ["model", "condition", "task", "metric", "value", "stderr", "n", "n_shot", "limit", "task_version",
              "lm_eval_version", "vector_kind", "vector_relation", "vector_path", "vector_layer", "patch_layer",
              "vector_scale", "patch_scale", "results_file", "date", "data_source", "model_fingerprint", "vector_sha256"]


def csv_row(entry: Entry) -> list:
    v = entry.vector
    vector_fields = [v.kind, v.relation, v.path, v.layer, v.patch_layer, v.scale, v.patch_scale] if v else [None] * 7
    return [entry.model, entry.condition, entry.task, entry.metric, repr(entry.value),
            None if entry.stderr is None else repr(entry.stderr), entry.n_samples, entry.n_shot,
            None if entry.limit is None else f"{entry.limit:g}", entry.task_version, entry.lm_eval_version,
            *vector_fields, display_path(entry.source), _when(entry.timestamp), entry.data_source,
            entry.model_fingerprint, v.sha256 if v else None]


def write_csv(board: Leaderboard, path: str | os.PathLike) -> None:
    """One row per (model, condition, task), full precision; written atomically, row by row."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            for entry in board.entries:
                writer.writerow(["" if value is None else value for value in csv_row(entry)])

    atomic_write(Path(path), write)


def write_leaderboard(board: Leaderboard, markdown: str | os.PathLike | None = None, csv_path: str | os.PathLike | None = None,
                      html: str | os.PathLike | None = None, title: str = "Leaderboard") -> list[Path]:
    """Render everything first, then write each file atomically; returns the files written."""
    from ffv_eval.leaderboard_html import render_html

    markdown_text = format_markdown(board, title) if markdown else None
    html_text = render_html(board, title) if html else None
    written = []
    if markdown:
        atomic_write_text(Path(markdown), markdown_text)
        written.append(Path(markdown))
    if csv_path:
        write_csv(board, csv_path)
        written.append(Path(csv_path))
    if html:
        atomic_write_text(Path(html), html_text)
        written.append(Path(html))
    return written


# -- running the missing evaluations ------------------------------------------------------

@dataclass(frozen=True)
class PlannedRun:
    model: str
    condition: str  # as given on the command line
    tasks: tuple[str, ...]
    vector: str | None  # the vector spec passed as model_args vector=
    num_fewshot: int
    labels: tuple[str, ...]  # the condition the reader will give each task's result


@dataclass(frozen=True)
class TaskPlan:
    """A task as a run would record it: its version and data source (see data_source()); both
    None for tasks that are not ffv-eval's, whose results are never reused."""

    name: str
    version: str | None
    data_source: str | None


def plan_tasks(tasks: Sequence[str], data_dir: Path | None = None) -> list[TaskPlan]:
    """The tasks of a `--run`: a group of ffv-eval's tasks/ (relations, relations_all, todd,
    analogies) becomes its tasks, and each ffv-eval task is built by lm-eval's TaskManager with
    the metadata the run will pass (`data_dir`), so missing or bad data fails here, before any
    model loads. Other names (lm-eval's own tasks) stay as given."""
    from lm_eval.tasks import TaskManager

    from ffv_eval import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(data_dir)} if data_dir is not None else None)
    known = set(manager.all_tasks)
    plans: dict[str, TaskPlan] = {}
    for name in tasks:
        if name not in known:
            plans.setdefault(name, TaskPlan(name, None, None))
            continue
        for task_name, task in manager.load([name])["tasks"].items():
            plans.setdefault(task_name, TaskPlan(task_name, _version_text(task.VERSION), data_source(task.dump_config())))
    return list(plans.values())


def expand_tasks(tasks: Sequence[str], data_dir: Path | None = None) -> list[str]:
    """Task names of a `--run`, groups of ffv-eval's tasks expanded (see plan_tasks)."""
    return [plan.name for plan in plan_tasks(tasks, data_dir)]


def plan_runs(models: Sequence[str], tasks: Sequence[str], conditions: Sequence[str]) -> list[PlannedRun]:
    """Every run the leaderboard needs, one lm-eval run per model and condition: `unpatched` and
    `<k>-shot`; a vector kind (`ffv`) patches each relation_<name> task with `<kind>:<name>`
    (vector=<kind>:*); `cfv` gives each question its composite vector; `<kind>:<relation>` patches
    all tasks with that one vector. Missing vectors are reported before anything runs."""
    from ffv_eval.vector_store import shipped_path

    runs, missing = [], []
    for model in models:
        for condition in conditions:
            shots = SHOT_CONDITION.match(condition)
            if condition == "unpatched" or shots:
                k = int(shots.group(1)) if shots else 0
                runs.append(PlannedRun(model, condition, tuple(tasks), None, k,
                                       tuple(condition_name(t, k, None, None) for t in tasks)))
                continue
            kind, _, relation = condition.partition(":")
            if relation:
                if not shipped_path(model, kind, relation).exists():
                    missing.append(str(shipped_path(model, kind, relation)))
                runs.append(PlannedRun(model, condition, tuple(tasks), condition, 0,
                                       tuple(condition_name(t, 0, kind, relation) for t in tasks)))
                continue
            if kind == "cfv":  # each question's composite vector, from its own source pair
                runs.append(PlannedRun(model, condition, tuple(tasks), "cfv", 0, tuple("cfv" for _ in tasks)))
                continue
            for task in tasks:
                if not task.startswith("relation_"):
                    raise LeaderboardError(f"condition '{condition}' patches each relation_<name> task with that "
                                           f"relation's {kind}; task '{task}' is not one (use {kind}:<relation>)")
                name = task.removeprefix("relation_")
                if not shipped_path(model, kind, name).exists():
                    missing.append(str(shipped_path(model, kind, name)))
            # one lm-eval run; ffv-patched picks each task's own vector (vector=<kind>:*)
            runs.append(PlannedRun(model, condition, tuple(tasks), f"{kind}:*", 0, tuple(kind for _ in tasks)))
    if missing:
        raise LeaderboardError("no shipped vector for: " + ", ".join(missing))
    return runs


@dataclass(frozen=True)
class CellIdentity:
    """What a results cell must share with a planned run to stand for it. `vector` is None
    without a vector, else (file hash, patch layer, scale), a None inside meaning unknown."""

    model_fingerprint: str | None
    vector: tuple[str | None, int | None, float | None] | None
    data_source: str | None
    task_version: str | None
    limit: float | None


def recorded_identity(entry: Entry) -> CellIdentity:
    """A results entry's identity. A vector whose run recorded no file hash is hashed where the
    run said it was (a vector file changed in place since then goes unnoticed: ffv-patched
    records `sha256` to close that gap)."""
    v = entry.vector
    vector = None if v is None else (
        v.sha256 or vector_sha256(v.path), v.patch_layer, None if v.patch_scale is None else float(v.patch_scale))
    return CellIdentity(entry.model_fingerprint, vector, entry.data_source, entry.task_version, entry.limit)


def planned_vector(model: str, run: PlannedRun, task: str) -> tuple[str | None, int | None, float | None] | None:
    """(file hash, layer, scale) of the vector `run` would patch into `task`; None without one.
    The leaderboard patches at the vector's own layer, scale 1."""
    from ffv_eval.vector_store import VectorFileError, load_vector, shipped_path

    if run.vector is None:
        return None
    if run.vector == "cfv":
        from ffv_eval.basis import default_basis_dir
        from ffv_eval.composite import COMPOSITE_FILE

        directory = default_basis_dir(model)
        try:
            layer = json.loads((directory / COMPOSITE_FILE).with_suffix(".json").read_text(encoding="utf-8"))["layer"]
        except (OSError, ValueError, KeyError, TypeError):
            return (None, None, 1.0)  # no usable map: nothing to reuse (the run says what is wrong)
        return (vector_sha256(directory), layer, 1.0)
    kind, _, relation = run.vector.partition(":")
    path = shipped_path(model, kind, task.removeprefix("relation_") if relation == "*" else relation)
    try:
        layer = load_vector(path).metadata["layer"]
    except VectorFileError:
        return (None, None, 1.0)
    return (vector_sha256(path), layer, 1.0)


IDENTITY_FIELDS = (("model_fingerprint", "model fingerprint"), ("vector", "vector (file hash, layer, scale)"),
                   ("data_source", "data source"), ("task_version", "task version"), ("limit", "limit"))
MUST_BE_KNOWN = ("model_fingerprint", "data_source", "task_version")  # None: unrecorded / unknown


def identity_mismatch(recorded: CellIdentity, planned: CellIdentity) -> str | None:
    """Why a results cell does not stand for the planned run, or None if it does. Unknown
    (unrecorded) fingerprints, vector hashes, data sources and task versions never match."""
    for field_name, label in IDENTITY_FIELDS:
        was, now = getattr(recorded, field_name), getattr(planned, field_name)
        unknown = field_name in MUST_BE_KNOWN and (was is None or now is None)
        if field_name == "vector" and was is not None and now is not None:
            unknown = was[0] is None or now[0] is None
        if unknown or was != now:
            must = field_name in MUST_BE_KNOWN
            return (f"{label}: {was if was is not None else 'unrecorded' if must else 'none'} in the results, "
                    f"{now if now is not None else 'unknown' if must else 'none'} now")
    return None


def model_fingerprint_of(model: str) -> str:
    """The fingerprint ffv-patched will record for `model` (loads the model once)."""
    from ffv_eval.model_loading import load_model_and_tokenizer, model_fingerprint

    loaded, _ = load_model_and_tokenizer(model)
    return model_fingerprint(loaded)


def runs_to_do(runs: Sequence[PlannedRun], task_plans: Sequence[TaskPlan], output_dir: Path, limit: int | None,
               fingerprint_of: Callable[[str], str] = model_fingerprint_of,
               log: Callable[[str], None] = print) -> list[PlannedRun]:
    """The planned runs, each cut down to the tasks whose newest results cell in output_dir (the
    one the leaderboard shows) does not match it in model fingerprint, vector file hash, layer,
    scale, data source, task version and limit; a model is loaded for its fingerprint only if
    it has a cell to compare."""
    newest = newest_entries(read_entries([output_dir])[0]) if output_dir.is_dir() and visible_results_files(output_dir) else {}
    plans = {plan.name: plan for plan in task_plans}
    fingerprints: dict[str, str] = {}
    todo = []
    for run in runs:
        missing = []
        for task, label in zip(run.tasks, run.labels):
            entry = newest.get((run.model, label, task))
            if entry is None:
                missing.append((task, label))
                continue
            if run.model not in fingerprints:
                fingerprints[run.model] = fingerprint_of(run.model)
            plan = plans.get(task, TaskPlan(task, None, None))
            planned = CellIdentity(fingerprints[run.model], planned_vector(run.model, run, task), plan.data_source,
                                   plan.version, None if limit is None else float(limit))
            reason = identity_mismatch(recorded_identity(entry), planned)
            if reason is None:
                log(f"[ffv] leaderboard: reusing {run.model} / {label} / {task}: {display_path(entry.source)}")
            else:
                log(f"[ffv] leaderboard: rerunning {run.model} / {label} / {task}, {display_path(entry.source)} differs in {reason}")
                missing.append((task, label))
        if missing:
            todo.append(PlannedRun(run.model, run.condition, tuple(t for t, _ in missing), run.vector, run.num_fewshot,
                                   tuple(label for _, label in missing)))
    return todo


def evaluate_and_save(run: PlannedRun, output_dir: Path, limit: int | None, batch_size: int | str,
                      data_dir: Path | None = None) -> Path:
    """One lm-eval run of `ffv-patched`, saved by lm-eval's own EvaluationTracker into a
    temporary directory and moved to `<output_dir>/<model>/results_<date>.json` (the
    `lm_eval --output_path` layout) once complete. `data_dir` goes to the tasks as lm-eval
    metadata, so the results record it."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    from ffv_eval.lm_eval_plugin import register

    register()
    model_args = {"pretrained": run.model, **({"vector": run.vector} if run.vector else {})}
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ffv-run-", dir=output_dir))
    try:
        tracker = EvaluationTracker(output_path=str(staging))
        results = lm_eval.simple_evaluate(
            model="ffv-patched", model_args=model_args, tasks=list(run.tasks), num_fewshot=run.num_fewshot,
            limit=limit, batch_size=batch_size, log_samples=False, evaluation_tracker=tracker,
            metadata={"data_dir": str(data_dir)} if data_dir is not None else None,
        )
        tracker.save_results_aggregated(results=results, samples=None)
        written = sorted(staging.rglob("results_*.json"))
        if len(written) != 1:
            raise LeaderboardError(f"lm-eval did not write a results file for {run.model} {run.condition} {list(run.tasks)}")
        target = output_dir / sanitize_model_name(run.model) / written[0].name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written[0], target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_missing(output_dir: str | os.PathLike, models: Sequence[str], tasks: Sequence[str],
                conditions: Sequence[str] = DEFAULT_RUN_CONDITIONS, limit: int | None = None,
                batch_size: int | str = 16, log: Callable[[str], None] | None = None,
                data_dir: str | os.PathLike | None = None,
                fingerprint_of: Callable[[str], str] = model_fingerprint_of) -> list[Path]:
    """Run every planned evaluation that has no matching results in output_dir yet (see
    runs_to_do); `data_dir` (else $FFV_DATA_DIR) is passed to the tasks. Returns the results
    files written."""
    from ffv_eval.relations import data_dir_from_env

    log = log or (lambda line: print(line, flush=True))
    output_dir = Path(output_dir)
    if not tasks:
        raise LeaderboardError("--run needs --tasks")
    root = data_dir_from_env(data_dir)
    root = root.resolve() if root is not None else None
    task_plans = plan_tasks(tasks, root)
    runs = plan_runs(models, [plan.name for plan in task_plans], conditions)
    todo = runs_to_do(runs, task_plans, output_dir, limit, fingerprint_of, log)
    log(f"[ffv] leaderboard: {len(todo)} run(s) to do, {sum(len(r.tasks) for r in runs) - sum(len(r.tasks) for r in todo)} "
        f"task result(s) reused from {output_dir}")
    written = []
    for i, run in enumerate(todo, start=1):
        log(f"[ffv] leaderboard: run {i}/{len(todo)}: {run.model} / {run.condition} / {', '.join(run.tasks)}"
            + (f" (limit {limit})" if limit is not None else ""))
        started = time.perf_counter()
        path = evaluate_and_save(run, output_dir, limit, batch_size, root)
        log(f"[ffv] leaderboard: run {i}/{len(todo)} done in {time.perf_counter() - started:.1f} s: {display_path(path)}")
        written.append(path)
    return written


def leaderboard_command(results_dirs: Sequence[str], markdown: str | None, csv_path: str | None, html: str | None,
                        allow_mixed_versions: bool = False, run_models: Sequence[str] | None = None,
                        tasks: Sequence[str] | None = None, conditions: Sequence[str] = DEFAULT_RUN_CONDITIONS,
                        limit: int | None = None, batch_size: int | str = 16, alignment_files: Sequence[str] = (),
                        quality_files: Sequence[str] = (), data_dir: str | None = None) -> Leaderboard:
    """`ffv leaderboard`: run what is missing (with --run), then read and write; `ffv align`
    reports and `ffv check` baselines add their own tables."""
    if run_models:
        run_missing(results_dirs[0], run_models, tasks or [], conditions, limit, batch_size, data_dir=data_dir)
    elif tasks:
        raise LeaderboardError("--tasks is only used with --run MODEL ...")
    board = build_leaderboard(results_dirs, allow_mixed_versions)
    from ffv_eval.leaderboard_sections import alignment_section, vector_quality_section

    board.sections += [alignment_section(alignment_files)] if alignment_files else []
    board.sections += [vector_quality_section(quality_files)] if quality_files else []
    for path in write_leaderboard(board, markdown, csv_path, html):
        print(f"[ffv] leaderboard: wrote {path}", flush=True)
    for note in board.notes:
        print(f"[ffv] leaderboard: note: {note}", flush=True)
    return board
