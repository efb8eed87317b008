"""The leaderboard (read by `leaderboard_results`) as Markdown, CSV and one self-contained HTML
page. Markdown and HTML hold the same tables: scores (± lm-eval's standard error), the gain from
patching, the gain over unpatched per metric paired over the same questions (mean gain, paired
95% bootstrap interval, McNemar's exact p, n), extra sections, the vectors and the runs; the CSV
has one row per cell and metric, full precision, the paired gain in its own columns. The page
adds two plots as inline SVG (matplotlib's SVG canvas, no pyplot state): accuracy per task and
condition, grouped bars per model; and the gain from patching (patched minus unpatched) per
model and task, with the paired interval where there is one. No scripts, no external URLs.
Every file is rendered before any is written, and each is written atomically."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from ffv_eval.files.atomic import atomic_write, atomic_write_text
from ffv_eval.reports.leaderboard_results import PRIMARY_METRICS, Entry, GainRow, Leaderboard, display_path, when_text

# -- the tables, shared by Markdown and HTML ----------------------------------------------

def format_score(entry: Entry) -> str:
    stderr = f" ± {entry.stderr:.3f}" if entry.stderr is not None else ""
    return f"{entry.value:.3f}{stderr}"


def task_heading(board: Leaderboard, task: str) -> str:
    return f"{task} ({board.task_metric(task)}, v{'/'.join(board.task_versions(task))})"


def summary_lines(board: Leaderboard) -> list[str]:
    return [
        f"lm-eval {', '.join(board.lm_eval_versions)}; {len(board.sources)} results file(s); "
        f"{len(board.models)} model(s), {len(board.conditions)} condition(s), {len(board.tasks)} task(s).",
        "Each cell: the task's primary metric (first of " + ", ".join(PRIMARY_METRICS)
        + ") ± lm-eval's standard error. Task versions in the column headings.",
    ]


PAIRED_TITLE = "Gain over unpatched, paired over the same questions"
PAIRED_NOTE = ("Every metric of each patched run against the unpatched run of the same model and task, question by "
               "question (lm-eval's samples files, matched on doc_id and doc_hash): gain = mean of the per-question "
               "differences (patched minus unpatched); 95% CI = paired bootstrap interval of that mean (BCa, 10,000 "
               "resamples); p = exact McNemar test on the questions only one run got right (0/1 metrics), else "
               "Wilcoxon signed-rank; n = questions. For a metric marked (lower is better) a negative gain is an "
               "improvement. Separate standard errors of the two runs overstate the noise of their difference.")
PAIRED_HEADER = ["model", "task", "metric", "condition", "unpatched", "patched", "gain", "95% CI", "test", "p", "n"]


def metric_label(row: GainRow) -> str:
    return f"{row.metric} (lower is better)" if row.lower_is_better else row.metric


def paired_rows(board: Leaderboard) -> list[list]:
    """One row per model, task, metric and patched condition; without paired samples the CI
    column says what is missing and test, p and n stay empty."""
    rows = []
    for row in board.paired_gains:
        base, patched = row.unpatched.scores[row.metric], row.patched.scores[row.metric]
        head = [row.patched.model, row.patched.task, metric_label(row), row.patched.condition, f"{base:.3f}",
                f"{patched:.3f}", f"{row.gain:+.3f}"]
        if row.paired is None:
            rows.append([*head, row.note, None, None, None])
        else:
            low, high = row.paired.ci95
            rows.append([*head, f"[{low:+.3f}, {high:+.3f}]", row.paired.test, f"{row.paired.p_value:.3g}", row.paired.n])
    return rows


COMPOSITE_RELATION = "per question (composite)"  # a CFV records no relation of its own


def vector_rows(board: Leaderboard) -> list[list]:
    """The vector of each patched cell; under a per-task spec (auto) the kind the task got in brackets."""
    rows = []
    for e in board.entries:
        v = e.vector
        if v is None:
            continue
        kind = v.kind if v.task_kind in (None, v.kind) else f"{v.kind} ({v.task_kind})"
        composite = "cfv" in (v.kind, v.task_kind)
        rows.append([e.model, e.condition, e.task, kind, v.relation or (COMPOSITE_RELATION if composite else None), v.path,
                     v.layer, v.patch_layer, v.scale, v.patch_scale, v.overlap_text()])
    return rows


VECTOR_HEADER = ["model", "condition", "task", "kind", "relation", "path", "layer", "patch layer", "scale", "patch scale",
                 "test documents sharing a word pair with the vector's training data"]
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


# -- Markdown -----------------------------------------------------------------------------

def _markdown_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(map(_markdown_cell, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(_markdown_cell("" if v is None else v) for v in row) + " |" for row in rows]
    return lines


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
    paired = paired_rows(board)
    if paired:
        lines += ["", f"## {PAIRED_TITLE}", "", PAIRED_NOTE, ""] + _markdown_table(PAIRED_HEADER, paired)
    for title_text, header, rows in board.sections:
        lines += ["", f"## {title_text}", ""] + _markdown_table(header, rows)
    if vector_rows(board):
        lines += ["", "## Vectors", ""] + _markdown_table(VECTOR_HEADER, vector_rows(board))
    lines += ["", "## Runs", ""] + _markdown_table(RUN_HEADER, run_rows(board))
    if board.notes:
        lines += ["", "## Notes", ""] + [f"- {_markdown_cell(n)}" for n in board.notes]
    return "\n".join(lines) + "\n"


# -- CSV ----------------------------------------------------------------------------------

CSV_HEADER = ["model", "condition", "task", "metric", "value", "stderr", "n", "n_shot", "limit", "task_version",
              "lm_eval_version", "vector_kind", "vector_relation", "vector_path", "vector_layer", "patch_layer",
              "vector_scale", "patch_scale", "results_file", "date", "data_source", "model_fingerprint", "vector_sha256",
              "primary", "higher_is_better", "samples_file", "gain", "gain_ci95_low", "gain_ci95_high", "gain_test",
              "gain_p", "gain_n", "gain_discordant", "gain_note"]


def csv_row(entry: Entry, metric: str, gain: GainRow | None) -> list:
    """One metric of one cell; the gain columns for a patched cell with an unpatched run."""
    v = entry.vector
    vector_fields = [v.kind, v.relation, v.path, v.layer, v.patch_layer, v.scale, v.patch_scale] if v else [None] * 7
    stderr = entry.stderrs.get(metric)
    paired = gain.paired if gain else None
    gain_fields = [None] * 8 if gain is None else [
        repr(gain.gain), *(map(repr, paired.ci95) if paired else (None, None)), paired and paired.test,
        paired and repr(paired.p_value), paired and paired.n,
        "/".join(map(str, paired.discordant)) if paired and paired.discordant else None, gain.note]
    return [entry.model, entry.condition, entry.task, metric, repr(entry.scores[metric]),
            None if stderr is None else repr(stderr), entry.n_samples, entry.n_shot,
            None if entry.limit is None else f"{entry.limit:g}", entry.task_version, entry.lm_eval_version,
            *vector_fields, display_path(entry.source), when_text(entry.timestamp), entry.data_source,
            entry.model_fingerprint, v.sha256 if v else None, metric == entry.metric, entry.higher_is_better.get(metric),
            entry.samples and display_path(entry.samples), *gain_fields]


def write_csv(board: Leaderboard, path: str | os.PathLike) -> None:
    """One row per (model, condition, task, metric), the primary metric first, full precision;
    `gain*` columns: the paired gain over unpatched (see PAIRED_NOTE); written atomically."""
    gains = {(row.patched.cell, row.metric): row for row in board.paired_gains}

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            for entry in board.entries:
                for metric in sorted(entry.scores, key=lambda m: m != entry.metric):
                    row = csv_row(entry, metric, gains.get((entry.cell, metric)))
                    writer.writerow(["" if value is None else value for value in row])

    atomic_write(Path(path), write)


# -- HTML ---------------------------------------------------------------------------------

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; }
th { background: #eee; }
td:nth-child(-n+2) { white-space: nowrap; }
td.score { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure svg { max-width: 100%; height: auto; }
"""
CONDITION_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _table(header: Sequence[str], rows: Sequence[Sequence], table_id: str, score_from: int | None = None) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            css = ' class="score"' if score_from is not None and i >= score_from else ""
            cells.append(f"<td{css}>{escape('' if value is None else str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _svg_text(figure, salt: str) -> str:
    """The figure as an <svg> element: text kept as text, no XML prolog, no RDF metadata."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    FigureCanvasSVG(figure)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


def _bar_panels(title: str, panels: list[tuple[str, list[str], dict[str, list[float | None]], dict[str, list]]],
                ylabel: str, salt: str, unit_range: bool, colours: dict[str, str]) -> str:
    """One row of grouped bars per panel: (panel title, x labels, series -> values, series -> errors,
    each a stderr or a (low, high) interval); a missing value draws no bar."""
    from matplotlib.figure import Figure

    n_labels = max(len(labels) for _, labels, _, _ in panels)
    figure = Figure(figsize=(min(16.0, max(6.0, 0.9 * n_labels + 3)), 3.2 * len(panels) + 0.6))
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (panel_title, labels, series, errors) in zip(axes, panels):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
            heights = [v if v is not None else math.nan for v in values]
            bar_style = {"label": name, "color": colours[name]}
            if name in errors:  # an error is a stderr (symmetric) or a (low, high) interval
                below = [0.0 if e is None else e if not isinstance(e, tuple) else v - e[0] for e, v in zip(errors[name], values)]
                above = [0.0 if e is None else e if not isinstance(e, tuple) else e[1] - v for e, v in zip(errors[name], values)]
                bar_style.update(yerr=[below, above], capsize=2, error_kw={"elinewidth": 0.8})
            ax.bar(xs, heights, width, **bar_style)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30 if n_labels > 4 else 0, ha="right" if n_labels > 4 else "center", fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel)
        if unit_range:
            ax.set_ylim(0, 1.05)
        else:
            ax.axhline(0, color="black", linewidth=0.8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(title)
    figure.tight_layout()
    return _svg_text(figure, salt)


def condition_colours(board: Leaderboard) -> dict[str, str]:
    """One colour per condition, the same in both plots."""
    return {c: CONDITION_COLOURS[i % len(CONDITION_COLOURS)] for i, c in enumerate(board.conditions)}


def accuracy_svg(board: Leaderboard) -> str:
    cells = board.by_cell()
    tasks = board.tasks
    unit_range = all(0.0 <= e.value <= 1.0 for e in board.entries)
    panels = []
    for model in board.models:
        conditions = [c for m, c in board.rows() if m == model]
        series = {c: [cells[(model, c, t)].value if (model, c, t) in cells else None for t in tasks] for c in conditions}
        errors = {c: [cells[(model, c, t)].stderr if (model, c, t) in cells else None for t in tasks] for c in conditions}
        panels.append((model, tasks, series, errors))
    return _bar_panels("Score per task and condition (± stderr)", panels, "score", "ffv-accuracy", unit_range,
                       condition_colours(board))


def gain_svg(board: Leaderboard) -> str | None:
    gains = board.gains()
    if not gains:
        return None
    intervals = board.gain_intervals()
    panels = []
    for model in board.models:
        conditions = sorted({c for m, c, _ in gains if m == model}, key=board.conditions.index)
        if conditions:
            tasks = [t for t in board.tasks if any((model, c, t) in gains for c in conditions)]
            series = {c: [gains.get((model, c, t)) for t in tasks] for c in conditions}
            errors = {c: [intervals.get((model, c, t)) for t in tasks] for c in conditions}
            panels.append((model, tasks, series, errors))
    return _bar_panels("Gain from patching (patched minus unpatched, paired 95% CI)", panels, "gain", "ffv-gain", False,
                       condition_colours(board))


def render_html(board: Leaderboard, title: str = "Leaderboard") -> str:
    cells = board.by_cell()
    score_rows = [[m, c, *(format_score(cells[(m, c, t)]) if (m, c, t) in cells else "" for t in board.tasks)]
                  for m, c in board.rows()]
    parts = [f"<h1>{escape(title)}</h1>", *(f"<p>{escape(line)}</p>" for line in summary_lines(board))]
    parts.append(_table(["model", "condition", *(task_heading(board, t) for t in board.tasks)], score_rows,
                        "leaderboard", score_from=2))
    parts.append(f'<figure id="accuracy-plot">{accuracy_svg(board)}<figcaption>Score per task and condition, '
                 "one panel per model; error bars: lm-eval's standard error.</figcaption></figure>")
    gain_plot = gain_svg(board)
    if gain_plot is not None:
        parts.append("<h2>Gain from patching</h2>")
        parts.append(_table(["model", "condition", *board.tasks], gain_rows(board), "gains", score_from=2))
        parts.append(f'<figure id="gain-plot">{gain_plot}<figcaption>Patched score minus the unpatched score '
                     "of the same model and task; error bars: the paired 95% bootstrap interval where both runs logged "
                     "samples.</figcaption></figure>")
    else:
        parts.append("<p>No gain plot: no model has both an unpatched and a patched run of one task.</p>")
    paired = paired_rows(board)
    if paired:
        parts += [f"<h2>{escape(PAIRED_TITLE)}</h2>", f"<p>{escape(PAIRED_NOTE)}</p>",
                  _table(PAIRED_HEADER, paired, "paired-gains", score_from=4)]
    for i, (title_text, header, rows) in enumerate(board.sections):
        parts += [f"<h2>{escape(title_text)}</h2>", _table(header, rows, f"section-{i}")]
    if vector_rows(board):
        parts += ["<h2>Vectors</h2>", _table(VECTOR_HEADER, vector_rows(board), "vectors")]
    parts += ["<h2>Runs</h2>", _table(RUN_HEADER, run_rows(board), "runs")]
    if board.notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in board.notes) + "</ul>"]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# -- writing the files --------------------------------------------------------------------

def write_leaderboard(board: Leaderboard, markdown: str | os.PathLike | None = None, csv_path: str | os.PathLike | None = None,
                      html: str | os.PathLike | None = None, title: str = "Leaderboard") -> list[Path]:
    """Render everything first, then write each file atomically; returns the files written."""
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
