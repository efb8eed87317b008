"""`ffv leaderboard`: one table (model x condition x task) of lm-eval results files as Markdown,
CSV and a self-contained HTML page, with each patched run's gain over unpatched per metric,
paired over the same questions; with `--run`, the missing lm-eval runs are made first.

The command in three steps, each in its own module: `leaderboard_runs` makes the missing runs
(with --run, samples logged), `leaderboard_results` reads and classifies the results files and
their samples files and pairs the runs (statistics in `paired`), `leaderboard_render` writes
the Markdown, CSV and HTML; `leaderboard_sections` adds tables from `ffv align` reports and
`ffv check` baselines."""

from __future__ import annotations

from collections.abc import Sequence

from ffv_eval.evaluation.leaderboard_runs import DEFAULT_RUN_CONDITIONS, run_missing
from ffv_eval.reports.leaderboard_render import write_leaderboard
from ffv_eval.reports.leaderboard_results import Leaderboard, LeaderboardError, build_leaderboard
from ffv_eval.reports.leaderboard_sections import alignment_section, vector_quality_section


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
    board.sections += [alignment_section(alignment_files)] if alignment_files else []
    board.sections += [vector_quality_section(quality_files)] if quality_files else []
    for path in write_leaderboard(board, markdown, csv_path, html):
        print(f"[ffv] leaderboard: wrote {path}", flush=True)
    for note in board.notes:
        print(f"[ffv] leaderboard: note: {note}", flush=True)
    return board
