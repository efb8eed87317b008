"""`ffv leaderboard --run`: plan the lm-eval runs a leaderboard needs (models x conditions x
tasks), skip each task whose newest results cell already stands for the run, and run the rest
with lm-eval's `simple_evaluate` on the `ffv-patched` model, saved in `lm_eval --output_path`'s
layout with the per-question samples (`--log_samples`: the paired gains need them). A cell is
reused only when it has its samples file and its model fingerprint, vector (file hash, layer,
scale), data source, task version and limit all equal what the run would use now. lm-eval,
torch and the model are imported only when a run needs them."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ffv_eval import TASKS_DIR
from ffv_eval.data.relations import data_dir_from_env
from ffv_eval.files.hashes import vector_sha256
from ffv_eval.reports.leaderboard_results import (
    SHOT_CONDITION,
    Entry,
    LeaderboardError,
    condition_name,
    condition_spec,
    data_source,
    display_path,
    newest_entries,
    read_entries,
    version_text,
    visible_results_files,
)
from ffv_eval.vectors.library import KINDS, shipped_path
from ffv_eval.vectors.spec import VectorSpec, VectorTaskMismatch

DEFAULT_RUN_CONDITIONS = ("unpatched", "fv", "ffv", "10-shot")


@dataclass(frozen=True)
class PlannedRun:
    model: str
    condition: str  # as given on the command line
    tasks: tuple[str, ...]
    vector: str | None  # the vector spec passed as model_args vector= (None: vector=none, unpatched)
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

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(data_dir)} if data_dir is not None else None)
    known = set(manager.all_tasks)
    plans: dict[str, TaskPlan] = {}
    for name in tasks:
        if name not in known:
            plans.setdefault(name, TaskPlan(name, None, None))
            continue
        for task_name, task in manager.load([name])["tasks"].items():
            plans.setdefault(task_name, TaskPlan(task_name, version_text(task.VERSION), data_source(task.dump_config())))
    return list(plans.values())


def expand_tasks(tasks: Sequence[str], data_dir: Path | None = None) -> list[str]:
    """Task names of a `--run`, groups of ffv-eval's tasks expanded (see plan_tasks)."""
    return [plan.name for plan in plan_tasks(tasks, data_dir)]


def plan_runs(models: Sequence[str], tasks: Sequence[str], conditions: Sequence[str]) -> list[PlannedRun]:
    """Every run the leaderboard needs, one lm-eval run per model and condition: `unpatched` and
    `<k>-shot` (vector=none); a vector kind (`ffv`) patches each relation_<name> task with
    `<kind>:<name>` (vector=<kind>:*); `cfv` gives each question its composite vector; `auto`
    (vector=auto) each relation_<name> task its relation's FFV and each analogy question its
    composite vector; `<kind>:<relation>` patches all tasks with that one vector. Missing vectors
    are reported before anything runs."""
    runs, missing = [], []
    for model in models:
        for condition in conditions:
            shots = SHOT_CONDITION.match(condition)
            if condition == "unpatched" or shots:
                k = int(shots.group(1)) if shots else 0
                runs.append(PlannedRun(model, condition, tuple(tasks), None, k,
                                       tuple(condition_name(t, k, None, None) for t in tasks)))
                continue
            spec = condition_spec(condition)
            if not (spec.is_composite or spec.per_task or (spec.is_name and spec.kind)):
                raise LeaderboardError(f"condition '{condition}': expected unpatched, <k>-shot, cfv, auto, a vector kind "
                                       f"({', '.join(KINDS)}) or <kind>:<relation>")
            needed = {}  # the vectors the run will read, each once
            for task in tasks:
                try:
                    # as the run will: an analogy task's documents have source pairs (else the run says so)
                    used = spec.for_task(task, docs_have_source_pair=True)
                except VectorTaskMismatch:
                    raise LeaderboardError(f"condition '{condition}' patches each relation_<name> task with that "
                                           f"relation's {spec.kind}; task '{task}' is not one (use {spec.kind}:<relation>)") from None
                if used.is_name:
                    needed[shipped_path(model, used.kind, used.relation)] = None
            missing += [str(path) for path in needed if not path.exists()]
            if spec.per_task and not spec.is_auto:
                labels = tuple(spec.kind for _ in tasks)  # one lm-eval run; ffv-patched picks each task's own vector
            elif spec.is_name:
                labels = tuple(condition_name(t, 0, spec.kind, spec.relation) for t in tasks)
            else:
                labels = tuple(str(spec) for _ in tasks)
            runs.append(PlannedRun(model, condition, tuple(tasks), str(spec), 0, labels))
    if missing:
        raise LeaderboardError("no shipped vector for: " + ", ".join(missing))
    return runs


SAMPLES_LOGGED = "logged"


@dataclass(frozen=True)
class CellIdentity:
    """What a results cell must share with a planned run to stand for it. `vector` is None
    without a vector, else (file hash, patch layer, scale), a None inside meaning unknown;
    `samples` is SAMPLES_LOGGED when the run's per-question samples file is there."""

    model_fingerprint: str | None
    vector: tuple[str | None, int | None, float | None] | None
    data_source: str | None
    task_version: str | None
    limit: float | None
    samples: str | None = SAMPLES_LOGGED


def recorded_identity(entry: Entry) -> CellIdentity:
    """A results entry's identity. A vector whose run recorded no file hash is hashed where the
    run said it was (a vector file changed in place since then goes unnoticed: ffv-patched
    records `sha256` to close that gap)."""
    v = entry.vector
    vector = None if v is None else (
        v.sha256 or vector_sha256(v.path), v.patch_layer, None if v.patch_scale is None else float(v.patch_scale))
    return CellIdentity(entry.model_fingerprint, vector, entry.data_source, entry.task_version, entry.limit,
                        SAMPLES_LOGGED if entry.samples is not None else None)


def planned_vector(model: str, run: PlannedRun, task: str) -> tuple[str | None, int | None, float | None] | None:
    """(file hash, layer, scale) of the vector `run` would patch into `task`; None without one.
    The leaderboard patches at the vector's own layer, scale 1."""
    from ffv_eval.vectors.library import BasisError, find_basis_dir, read_composite_metadata
    from ffv_eval.vectors.store import VectorFileError, load_vector

    if run.vector is None:
        return None
    spec = VectorSpec.parse(run.vector).for_task(task, docs_have_source_pair=True)
    if spec.is_composite:
        directory = find_basis_dir(model)
        if directory is None:
            return (None, None, 1.0)  # no map: nothing to reuse (the run says what is wrong)
        try:
            layer = read_composite_metadata(directory)["layer"]
        except BasisError:
            return (None, None, 1.0)  # no usable map: nothing to reuse (the run says what is wrong)
        return (vector_sha256(directory), layer, 1.0)
    path = shipped_path(model, spec.kind, spec.relation)
    try:
        layer = load_vector(path).metadata["layer"]
    except VectorFileError:
        return (None, None, 1.0)
    return (vector_sha256(path), layer, 1.0)


IDENTITY_FIELDS = (("model_fingerprint", "model fingerprint"), ("vector", "vector (file hash, layer, scale)"),
                   ("data_source", "data source"), ("task_version", "task version"), ("limit", "limit"),
                   ("samples", "per-question samples"))
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
    from ffv_eval.models.loading import load_model_and_tokenizer, model_fingerprint

    loaded, _ = load_model_and_tokenizer(model)
    return model_fingerprint(loaded)


def runs_to_do(runs: Sequence[PlannedRun], task_plans: Sequence[TaskPlan], output_dir: Path, limit: int | None,
               fingerprint_of: Callable[[str], str] = model_fingerprint_of,
               log: Callable[[str], None] = print) -> list[PlannedRun]:
    """The planned runs, each cut down to the tasks whose newest results cell in output_dir (the
    one the leaderboard shows) does not match it in model fingerprint, vector file hash, layer,
    scale, data source, task version and limit, or has no samples file; a model is loaded for
    its fingerprint only if it has a cell to compare."""
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
    """One lm-eval run of `ffv-patched` with log_samples, saved by lm-eval's own
    EvaluationTracker into a temporary directory and moved, once complete, to
    `<output_dir>/<model>/`: `samples_<task>_<date>.jsonl` per task, then `results_<date>.json`
    (the `lm_eval --output_path --log_samples` layout). `data_dir` goes to the tasks as lm-eval
    metadata, so the results record it."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    from ffv_eval.harness.plugin import register

    register()
    model_args = {"pretrained": run.model, "vector": run.vector or "none"}  # ffv-patched's own default is auto
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ffv-run-", dir=output_dir))
    try:
        tracker = EvaluationTracker(output_path=str(staging))
        results = lm_eval.simple_evaluate(
            model="ffv-patched", model_args=model_args, tasks=list(run.tasks), num_fewshot=run.num_fewshot,
            limit=limit, batch_size=batch_size, log_samples=True, evaluation_tracker=tracker,
            metadata={"data_dir": str(data_dir)} if data_dir is not None else None,
        )
        samples = results.pop("samples")  # as lm-eval's own command line does
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        written = sorted(staging.rglob("results_*.json"))
        if len(written) != 1:
            raise LeaderboardError(f"lm-eval did not write a results file for {run.model} {run.condition} {list(run.tasks)}")
        target = output_dir / sanitize_model_name(run.model) / written[0].name
        target.parent.mkdir(parents=True, exist_ok=True)
        for sample_file in sorted(written[0].parent.glob("samples_*.jsonl")):  # before the results that name them
            os.replace(sample_file, target.with_name(sample_file.name))
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
