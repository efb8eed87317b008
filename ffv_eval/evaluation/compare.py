"""The main job: score a model on the relation tasks zero-shot, with each relation's vector
patched in, and with k-shot prompting, all through lm-eval, and print the comparison.

By default (`ffv compare`) the terminal shows one progress bar over all the lm-eval runs and
then the table; everything lm-eval, transformers and nnsight log or print (their progress
bars included, and what subprocesses write) goes to a log file. `--verbose` leaves it all on
the terminal. Next to the JSON results go the table as Markdown and a bar chart (PNG)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from weakref import WeakSet

from tqdm import tqdm

from ffv_eval import DEFAULT_MODEL, TASKS_DIR
from ffv_eval.data.relations import HEADLINE_RELATIONS, load_project_relation, load_todd_relation, project_relations
from ffv_eval.errors import SettingError
from ffv_eval.files.atomic import atomic_write, atomic_write_text, check_writable
from ffv_eval.progress import show_progress
from ffv_eval.vectors.library import KINDS, shipped_path
from ffv_eval.vectors.spec import VectorNameError

DEFAULT_DIRECTORY = Path("ffv-compare")  # the outputs of a bare `ffv compare`: compare.json, .md, .png, .log
# Loggers whose records go to the log file (and not to the terminal) while lm-eval runs; any
# other logger that writes to the terminal is redirected too (see _lm_eval_output_to).
LIBRARY_LOGGERS = ("lm_eval", "lm-eval", "transformers", "nnsight", "accelerate", "datasets", "huggingface_hub")
INTERVAL_Z = 1.96  # error bars of the chart: ± INTERVAL_Z × stderr (a normal 95% interval)


def _score(lm, task_manager, task: str, num_fewshot: int, limit: int | None) -> dict:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    metrics = out["results"][task]
    # each question's exact match in doc_id order, for the paired comparisons (paired_comparisons)
    per_question = [float(s["exact_match"]) for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
    return {"exact_match": metrics["exact_match,none"], "stderr": metrics["exact_match_stderr,none"], "per_question": per_question}


PAIRED_AGAINST = "ffv"  # the condition the others are compared with, question by question


def paired_comparisons(report: dict) -> dict[str, dict]:
    """{condition: PairedGain.as_dict()} of the FFV minus each other condition, over every test
    question of every relation (the same questions in each run: pooled, paired)."""
    from ffv_eval.reports.paired import paired_gain

    rows = report["relations"].values()
    if PAIRED_AGAINST not in report["conditions"]:
        return {}
    ours = [v for row in rows for v in row[PAIRED_AGAINST]["per_question"]]
    return {c: paired_gain(ours, [v for row in rows for v in row[c]["per_question"]]).as_dict()
            for c in report["conditions"] if c != PAIRED_AGAINST}


def output_paths(output=None, markdown=None, plot=None, log_file=None) -> dict[str, Path]:
    """The files of `ffv compare`: {"output": JSON, "markdown": ..., "plot": PNG, "log_file": ...}.
    Each path given is kept; the others share the stem of the first result file given (output,
    markdown, plot: `--output runs/x.json` gives runs/x.md, runs/x.png, runs/x.log), or, when
    none is given, lie in ./ffv-compare/ (compare.json, compare.md, compare.png, compare.log).
    Raises SettingError when two of them are the same file."""
    given = {"output": output, "markdown": markdown, "plot": plot, "log_file": log_file}
    first = next((Path(p) for p in (output, markdown, plot) if p), None)
    stem = first.with_suffix("") if first is not None else DEFAULT_DIRECTORY / "compare"
    suffixes = {"output": ".json", "markdown": ".md", "plot": ".png", "log_file": ".log"}
    paths = {key: Path(given[key]) if given[key] else stem.with_name(stem.name + suffixes[key]) for key in suffixes}
    seen = {}
    for key, path in paths.items():
        other = seen.setdefault(path.absolute(), key)
        if other != key:
            raise SettingError(f"{path}: both the {_option(other)} and the {_option(key)} file of ffv compare; "
                               f"pass {_option(key)} with another path")
    return paths


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _plot_format(path) -> str:
    """The chart's file format, from the --plot path's suffix: png (also without a suffix), svg or pdf."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in ("", "png", "svg", "pdf"):
        raise SettingError(f"--plot {path}: the chart is written as .png, .svg or .pdf; pass a path with one of these suffixes")
    return suffix or "png"


def compare_conditions(model: str = DEFAULT_MODEL, relations=None, limit=None, batch_size=16, num_fewshot=10,
                       data_dir=None, output=None, kinds=None, markdown=None, command=None, placement=None,
                       plot=None, log_file=None) -> dict:
    """Per relation: zero-shot, patched with the model's shipped vector of each kind in `kinds`
    (library.KINDS: fv, ffv, ffv-first-token, ffv-random), and num_fewshot-shot, each an lm-eval
    run of relation_<name>.
    placement: a model_loading.Placement, passed to lm-eval's HFLM as device=, dtype= (and
    parallelize=True with the device map).

    Writes the report as JSON to `output`, the table as Markdown to `markdown` and a bar chart
    to `plot` (PNG), each only when given (`output_paths` gives the defaults of `ffv compare`).
    With `log_file`, everything lm-eval and the model libraries log or print goes there, and
    the terminal shows a line naming it, one progress bar and the table; without, their output
    stays on the terminal, as do the job's own progress lines."""
    from lm_eval.tasks import TaskManager

    from ffv_eval.harness.model import FFVPatchedLM
    from ffv_eval.models.loading import Placement

    model_args = (placement or Placement()).lm_eval_args()  # validated before any model work

    relations = project_relations() if relations in (["all"], ("all",)) else list(relations or HEADLINE_RELATIONS)
    if kinds is None:  # every kind of vector shipped for all the relations
        kinds = [k for k in KINDS if all(shipped_path(model, k, name).exists() for name in relations)]
    for name in relations:  # bad names, data files and missing vectors fail before the model loads
        load_todd_relation(name, data_dir) if data_dir else load_project_relation(name)
        for kind in kinds:
            if not shipped_path(model, kind, name).exists():
                raise VectorNameError(f"no shipped {kind} for {name} on {model}: {shipped_path(model, kind, name)}")
    files = {"output": output, "markdown": markdown, "plot": plot, "log_file": log_file}
    for key, path in files.items():  # so is an output that cannot be written
        if path:
            check_writable(path, _option(key))
    plot_format = _plot_format(plot) if plot else None
    conditions = ["zero_shot", *kinds, f"{num_fewshot}_shot"]
    if log_file:
        print(f"ffv compare: lm-eval's output goes to {log_file} (--verbose shows it here)", flush=True)
    rows = {}
    with _lm_eval_output_to(log_file) as terminal:
        bar = None if terminal is None else _Bar(total=len(relations) * len(conditions), file=terminal, unit="run",
                                                  desc=f"loading {model}")
        try:
            task_manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": data_dir} if data_dir else None)
            lm = FFVPatchedLM(pretrained=model, vector="none", batch_size=batch_size, **model_args)
            for name in relations:
                task, t = f"{'todd' if data_dir else 'relation'}_{name}", time.perf_counter()  # todd_<name>: Todd et al.'s files
                row = {"vectors": {}}
                for condition in conditions:
                    if bar is not None:
                        bar.set_description_str(f"{name}: {condition.replace('_', '-')}")
                    lm.set_vector(None if condition in ("zero_shot", conditions[-1]) else str(shipped_path(model, condition, name)))
                    if lm.stored_vector is not None:
                        row["vectors"][condition] = {"path": str(lm.stored_vector.path), "layer": lm.patch_layer}
                    row[condition] = _score(lm, task_manager, task, num_fewshot if condition == conditions[-1] else 0, limit)
                    if bar is not None:
                        bar.update()
                lm.set_vector(None)
                row["seconds"] = time.perf_counter() - t
                rows[name] = row
                show_progress(f"[ffv] {task}: " + ", ".join(f"{c} {row[c]['exact_match']:.3f}" for c in conditions))
            if bar is not None:
                bar.set_description_str("done")
        finally:
            if bar is not None:
                bar.close()
    report = {"model": model, "data": "todd" if data_dir else "project", "limit": limit, "conditions": conditions, "relations": rows}
    report["paired"] = paired_comparisons(report)
    table = format_table(report)
    print(table)
    if output:
        atomic_write_text(Path(output), json.dumps(report, indent=2) + "\n")
    if markdown:
        atomic_write_text(Path(markdown), format_markdown(report, command))
    if plot:
        figure = comparison_figure(report)
        atomic_write(Path(plot), lambda tmp: figure.savefig(tmp, format=plot_format, dpi=120))
    written = [str(p) for p in (output, markdown, plot) if p]
    if written or log_file:
        print(f"ffv compare: wrote {', '.join(written) or 'no result files'}" + (f" (log: {log_file})" if log_file else ""),
              flush=True)
    return report


def format_table(report: dict) -> str:
    """Markdown: one row per relation, one column per condition (exact match ± stderr), and the mean."""
    conditions = report["conditions"]
    lines = [
        f"{report['model']} on {report['data']} data: exact match of the first generated word(s), ± stderr"
        + (f" (first {report['limit']} test pairs)" if report.get("limit") else ""),
        "",
        "| relation | " + " | ".join(c.replace("_", "-") for c in conditions) + " |",
        "|---" * (len(conditions) + 1) + "|",
    ]
    for name, row in report["relations"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]['exact_match']:.3f} ± {row[c]['stderr']:.3f}" for c in conditions) + " |")
    means = [sum(r[c]["exact_match"] for r in report["relations"].values()) / len(report["relations"]) for c in conditions]
    lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    paired = report.get("paired") or {}
    if paired:
        lines.append(f"| **{PAIRED_AGAINST} minus it**, paired over all questions [95% CI], p | "
                     + " | ".join(_paired_cell(paired[c]) if c in paired else "" for c in conditions) + " |")
    return "\n".join(lines)


def _paired_cell(gain: dict) -> str:
    low, high = gain["ci95"]
    return f"{gain['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}], p={gain['p']:.2g}"


def format_markdown(report: dict, command: str | None = None) -> str:
    """The Markdown file: a heading, format_table's table and the command that regenerates it."""
    regenerate = f"\n\nRegenerate with:\n\n```bash\n{command}\n```\n" if command else "\n"
    return f"# {report['model']}: relation completion\n\n{format_table(report)}{regenerate}"


def chart_values(report: dict) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    """The chart's groups (the relations, then "mean"), and per condition the bar heights (exact
    match) and error bar half-widths: INTERVAL_Z × stderr; for the mean over n relations
    INTERVAL_Z × sqrt(sum of the squared stderrs) / n (the relations taken as independent)."""
    rows = report["relations"]
    n = len(rows)
    heights, errors = {}, {}
    for c in report["conditions"]:
        heights[c] = [row[c]["exact_match"] for row in rows.values()] + [sum(row[c]["exact_match"] for row in rows.values()) / n]
        errors[c] = ([INTERVAL_Z * row[c]["stderr"] for row in rows.values()]
                     + [INTERVAL_Z * math.sqrt(sum(row[c]["stderr"] ** 2 for row in rows.values())) / n])
    return [*rows, "mean"], heights, errors


def comparison_figure(report: dict):
    """A matplotlib Figure (Agg canvas, no pyplot state): grouped bars, one group per relation
    and one for the mean, one bar per condition, with ± INTERVAL_Z × stderr error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups, heights, errors = chart_values(report)
    conditions = report["conditions"]
    width = 0.8 / len(conditions)
    figure = Figure(figsize=(min(24.0, max(7.0, 2.5 + len(groups) * (0.15 * len(conditions) + 0.2))), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for i, condition in enumerate(conditions):
        x = [g + (i - (len(conditions) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(x, heights[condition], width, yerr=errors[condition], capsize=2, label=condition.replace("_", "-"),
               error_kw={"elinewidth": 1, "ecolor": "0.2"})
    tilt = len(groups) > 8 or max(map(len, groups)) * len(groups) > 70  # long names would run into each other
    ax.set_xticks(range(len(groups)), groups, rotation=35 if tilt else 0, ha="right" if tilt else "center")
    ax.axvline(len(groups) - 1.5, color="0.6", linestyle=":", linewidth=1)  # the relations | their mean
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"exact match (error bars: ±{INTERVAL_Z} × stderr)")
    ax.set_title(f"{report['model']} on {report['data']} data" + (f", first {report['limit']} test pairs" if report.get("limit") else ""))
    ax.legend(title="condition", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    caption = (f"Bars: exact match of the first generated word(s). Error bars: ±{INTERVAL_Z} × stderr (normal 95% interval, "
               f"clipped to [0, 1]); for the mean over the n relations ±{INTERVAL_Z} × √(Σ stderr²) / n.")
    figure.supxlabel(textwrap.fill(caption, width=int(figure.get_figwidth() * 15)), fontsize="small")
    return figure


class _Bar(tqdm):
    """The job's progress bar. Its own instance registry keeps tqdm from giving the bars lm-eval
    opens meanwhile (written to the log file) a second line position with cursor moves."""
    _instances = WeakSet()


@contextlib.contextmanager
def _lm_eval_output_to(log_file):
    """With a log_file: everything written meanwhile (lm-eval's and the model libraries' logger
    records and progress bars, prints, warnings, and what subprocesses or C code write to file
    descriptors 1 and 2) goes to log_file (overwritten); yields a handle on the terminal's
    stderr for the job's own progress bar. Without: changes nothing and yields None. Everything
    is restored on the way out, on errors too."""
    if not log_file:
        yield None
        return
    log_path = Path(log_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path, "w", encoding="utf-8", errors="replace", buffering=1))
        terminal = _terminal_handle(sys.stderr)
        if terminal is not sys.stderr:
            stack.callback(terminal.close)
        stack.enter_context(_loggers_to(log))
        stack.enter_context(_file_descriptors_to(log))
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(contextlib.redirect_stderr(log))
        yield terminal


def _terminal_handle(stream):
    """A handle that keeps writing where `stream` writes while file descriptors 1 and 2 point
    at the log: a duplicate of its descriptor, or the stream itself if it has none (pytest's
    capture, a notebook)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    if fd not in (1, 2):
        return stream
    stream.flush()
    return os.fdopen(os.dup(fd), "w", encoding=getattr(stream, "encoding", None) or "utf-8", errors="replace", buffering=1)


@contextlib.contextmanager
def _file_descriptors_to(log):
    """Point file descriptors 1 and 2 at the log (for subprocesses, such as lm-eval's
    `git describe`, and for C code), and back afterwards."""
    saved = {}
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        for fd in (1, 2):
            try:
                saved[fd] = os.dup(fd)
            except OSError:  # not open in this process
                continue
            os.dup2(log.fileno(), fd)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, log):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _writes_to_stream(handler: logging.Handler) -> bool:
    """A StreamHandler, but not a FileHandler: what libraries set up to write to the terminal."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _writes_to_terminal(handler: logging.Handler) -> bool:
    terminal = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    return _writes_to_stream(handler) and id(getattr(handler, "stream", None)) in terminal


@contextlib.contextmanager
def _loggers_to(log):
    """Send the records of lm-eval's and the model libraries' loggers (lm-eval's from INFO up)
    to the log, with their stream handlers taken off, and those of any other logger that write
    to the terminal; put the loggers back as they were afterwards."""
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [%(name)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    manager = logging.Logger.manager
    named = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    loggers = [logging.getLogger(), *named,
               *(lg for lg in list(manager.loggerDict.values()) if isinstance(lg, logging.Logger) and lg not in named)]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    try:
        for lg in loggers:
            removed = [h for h in lg.handlers if (_writes_to_stream(h) if lg in named else _writes_to_terminal(h))]
            for h in removed:
                lg.removeHandler(h)
            if lg is loggers[0]:
                lg.addHandler(handler)
            elif lg in named or removed:
                lg.addHandler(handler)
                lg.propagate = False  # the root logger has the handler too: no record twice
        for name in ("lm_eval", "lm-eval"):
            lm_eval_logger = logging.getLogger(name)
            if lm_eval_logger.getEffectiveLevel() > logging.INFO:
                lm_eval_logger.setLevel(logging.INFO)
        yield
    finally:
        for lg, handlers, level, propagate in saved:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        _unhook_new_handlers(log)
        handler.close()


def _unhook_new_handlers(log) -> None:
    """Handlers made while the output went to the log (a library that set up its logging then)
    write to it; point them at the restored stderr, as they would have been made, before the
    log closes."""
    for lg in [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and h.stream is log:
                h.setStream(sys.stderr)
