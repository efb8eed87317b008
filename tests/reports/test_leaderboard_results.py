"""Reading lm-eval results for the leaderboard (ffv_eval.reports.leaderboard_results): condition
names and primary metrics, files that are not lm-eval's, an empty or missing directory, and the
paired gains over unpatched of the analogy tasks (three metrics each) from written results and
samples files, with and without samples. (On real runs of the stock `lm_eval` command:
tests/e2e/test_leaderboard.py.)"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from ffv_eval.evaluation.leaderboard_runs import plan_runs, planned_vector
from ffv_eval.reports import leaderboard_render
from ffv_eval.reports.leaderboard_render import COMPOSITE_RELATION, format_markdown, vector_rows, write_csv
from ffv_eval.reports.leaderboard_results import LeaderboardError, build_leaderboard, condition_name, primary_metric
from ffv_eval.reports.paired import MCNEMAR, WILCOXON, paired_gain

MODEL, TASK = "gemma-3-270m", "relation_antonym"


def test_condition_names_and_primary_metric():
    assert condition_name(TASK, 0, None, None) == "unpatched"
    assert condition_name(TASK, 10, None, None) == "10-shot"
    assert condition_name(TASK, 0, "ffv", "antonym") == "ffv"
    assert condition_name("relation_capitalize", 0, "fv", "antonym") == "fv:antonym"
    assert condition_name(TASK, 5, "cfv", "antonym") == "cfv+5-shot"
    scores = {"alias": "x", "acc_norm,none": 0.5, "acc,none": 0.4, "acc_stderr,none": 0.1, "acc_norm_stderr,none": 0.2}
    assert primary_metric(scores) == ("acc", 0.4, 0.1)
    assert primary_metric({"top_answer,none": 0.3, "top_answer_stderr,none": "N/A"}) == ("top_answer", 0.3, None)
    assert primary_metric({"alias": "group"}) is None


@pytest.mark.parametrize("content, field", [
    ({"accuracy": 0.5}, "results"),
    ({"results": {}, "config": {}, "versions": {}}, "n-shot"),
    ([1, 2, 3], "list"),
])
def test_json_that_is_not_lm_evals_is_refused(tmp_path, content, field):
    bad = tmp_path / "results_x.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(LeaderboardError) as err:
        build_leaderboard([tmp_path])
    assert str(bad) in str(err.value) and "not an lm-eval results file" in str(err.value) and field in str(err.value)


def test_empty_or_missing_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeaderboardError, match="no lm-eval results files"):
        build_leaderboard([tmp_path / "empty"])
    staging = tmp_path / "empty" / ".ffv-run-abc" / MODEL / "results_2026.json"  # an interrupted --run
    staging.parent.mkdir(parents=True)
    staging.write_text("{")
    with pytest.raises(LeaderboardError, match="no lm-eval results files"):
        build_leaderboard([tmp_path / "empty"])
    with pytest.raises(LeaderboardError, match="no such results directory"):
        build_leaderboard([tmp_path / "absent"])
    from ffv_eval.cli import main

    assert main(["leaderboard", str(tmp_path / "empty"), "--out-prefix", str(tmp_path / "lb")]) == 2
    assert f"ffv: error: {tmp_path / 'empty'}: no lm-eval results files" in capsys.readouterr().err
    assert not list(tmp_path.glob("lb*"))


# -- paired gains of the analogy tasks, from written results and samples files -----------------

MC_TASK, COMPLETION_TASK = "u2_analogy", "analogy_completion_semeval"


METRICS = {MC_TASK: ("acc", "acc_norm", "acc_d"), COMPLETION_TASK: ("top_answer", "human_share", "repeats_abc")}


LOWER_IS_BETTER = {"repeats_abc"}


def _outcomes(seed: int, n: int) -> dict[str, dict[str, list[float]]]:
    """Per task and metric, n questions' values: 0/1, human_share a share."""
    rng = __import__("random").Random(seed)
    return {task: {m: [round(rng.random(), 2) if m == "human_share" else float(rng.random() < 0.5) for _ in range(n)]
                   for m in metrics} for task, metrics in METRICS.items()}


def _write_run(directory: Path, date: str, vector: dict | None, outcomes: dict, samples: bool = True,
               order=None) -> Path:
    """A results file as lm-eval writes it (the aggregates are the means of the per-question
    values) and, unless told not, a samples file per task, lines in the given doc order."""
    directory.mkdir(parents=True, exist_ok=True)
    results = {task: {"alias": task, **{f"{m},none": sum(v) / len(v) for m, v in metrics.items()},
                      **{f"{m}_stderr,none": 0.05 for m in metrics}} for task, metrics in outcomes.items()}
    data = {"results": results, "versions": {t: 2.0 for t in outcomes}, "n-shot": {t: 0 for t in outcomes},
            "higher_is_better": {t: {m: m not in LOWER_IS_BETTER for m in METRICS[t]} for t in outcomes},
            "config": {"model": "ffv-patched", "model_args": f"pretrained={MODEL},vector={'none' if vector is None else vector['kind']}",
                       "ffv_model": MODEL, "ffv_vector": vector, "model_fingerprint": "f" * 16},
            "configs": {t: {"metadata": {"data_source": "data_dir", "data_dir": "/data"}} for t in outcomes},
            "lm_eval_version": "0.4.13", "date": float(len(list(directory.iterdir())))}
    path = directory / f"results_{date}.json"
    path.write_text(json.dumps(data))
    for task, metrics in outcomes.items() if samples else ():
        n = len(next(iter(metrics.values())))
        lines = [{"doc_id": i, "doc": {"a": f"a{i}"}, "filter": "none", "doc_hash": f"hash-{task}-{i}",
                  **{m: v[i] for m, v in metrics.items()}} for i in range(n)]
        lines += [{**line, "filter": "other", **{m: 0.0 for m in metrics}} for line in lines]  # another filter: not read
        ordered = [lines[i] for i in (order or range(len(lines)))]
        (directory / f"samples_{task}_{date}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in ordered))
    return path


CFV_RECORD = {"kind": "cfv", "relation": None, "path": "/basis", "sha256": "b" * 64, "patch_layer": 6, "layer": 6,
              "patch_scale": 1.0}


AUTO_RECORD = {"kind": "auto", "relation": None, "path": "per task", "patch_scale": 1.0,
               "per_task": {MC_TASK: CFV_RECORD, COMPLETION_TASK: CFV_RECORD}}


def _analogy_runs(tmp_path: Path, n: int = 40) -> tuple[Path, dict]:
    outcomes = {"unpatched": _outcomes(1, n), "cfv": _outcomes(2, n), "auto": _outcomes(3, n)}
    directory = tmp_path / "results" / MODEL
    shuffled = list(reversed(range(2 * n)))
    _write_run(directory, "2026-01-01T00-00-00", None, outcomes["unpatched"])
    _write_run(directory, "2026-01-02T00-00-00", CFV_RECORD, outcomes["cfv"], order=shuffled)
    _write_run(directory, "2026-01-03T00-00-00", AUTO_RECORD, outcomes["auto"])
    return tmp_path / "results", outcomes


def test_paired_gains_per_metric_of_the_analogy_tasks(tmp_path):
    results, outcomes = _analogy_runs(tmp_path)
    board = build_leaderboard([results])
    assert board.conditions == ["unpatched", "cfv", "auto"]
    rows = {(r.patched.condition, r.patched.task, r.metric): r for r in board.paired_gains}
    assert set(rows) == {(c, t, m) for c in ("cfv", "auto") for t, ms in METRICS.items() for m in ms}
    for (condition, task, metric), row in rows.items():
        treated, base = outcomes[condition][task][metric], outcomes["unpatched"][task][metric]
        assert row.paired == paired_gain(treated, base)  # matched on doc_id, whatever the line order
        assert row.paired.test == (WILCOXON if metric == "human_share" else MCNEMAR)
        assert row.gain == pytest.approx(row.patched.scores[metric] - row.unpatched.scores[metric])  # = the aggregates
        if row.paired.test == MCNEMAR:
            b = sum(1 for t, u in zip(treated, base) if u == 1 and t == 0)
            c = sum(1 for t, u in zip(treated, base) if u == 0 and t == 1)
            assert row.paired.discordant == (b, c)
    markdown = format_markdown(board)
    acc = rows[("auto", MC_TASK, "acc_d")].paired
    assert (f"| {MODEL} | {MC_TASK} | acc_d | auto | {rows[('auto', MC_TASK, 'acc_d')].unpatched.scores['acc_d']:.3f} | "
            f"{rows[('auto', MC_TASK, 'acc_d')].patched.scores['acc_d']:.3f} | {acc.mean_gain:+.3f} | "
            f"[{acc.ci95[0]:+.3f}, {acc.ci95[1]:+.3f}] | {MCNEMAR} | {acc.p_value:.3g} | 40 |") in markdown
    assert f"| {COMPLETION_TASK} | repeats_abc (lower is better) | cfv |" in markdown
    assert "## Gain over unpatched, paired over the same questions" in markdown

    write_csv(board, tmp_path / "board.csv")
    csv_rows = list(csv.DictReader((tmp_path / "board.csv").open(encoding="utf-8")))
    assert len(csv_rows) == 3 * 2 * 3  # conditions x tasks x metrics
    human = next(r for r in csv_rows if (r["condition"], r["task"], r["metric"]) == ("cfv", COMPLETION_TASK, "human_share"))
    paired = rows[("cfv", COMPLETION_TASK, "human_share")].paired
    assert (float(human["gain"]), float(human["gain_ci95_low"]), float(human["gain_ci95_high"]), float(human["gain_p"])) == (
        paired.mean_gain, *paired.ci95, paired.p_value)
    assert human["gain_test"] == WILCOXON and human["gain_n"] == "40" and human["primary"] == "False"
    repeats = next(r for r in csv_rows if (r["condition"], r["task"], r["metric"]) == ("auto", COMPLETION_TASK, "repeats_abc"))
    assert repeats["higher_is_better"] == "False" and repeats["gain_discordant"] == "/".join(
        map(str, rows[("auto", COMPLETION_TASK, "repeats_abc")].paired.discordant))
    assert all(r["gain"] == "" for r in csv_rows if r["condition"] == "unpatched")

    html = leaderboard_render.render_html(board)
    table = re.search(r'<table id="paired-gains">.*?</table>', html, re.S).group(0)
    assert table.count("<tr>") == 1 + len(rows) and f"[{acc.ci95[0]:+.3f}, {acc.ci95[1]:+.3f}]" in table


def test_the_auto_condition_and_its_vectors(tmp_path):
    results, _ = _analogy_runs(tmp_path)
    board = build_leaderboard([results])
    auto = [row for row in vector_rows(board) if row[1] == "auto"]
    assert [row[3:5] for row in auto] == [["auto (cfv)", COMPOSITE_RELATION]] * 2
    runs = plan_runs([MODEL], [TASK, MC_TASK], ["unpatched", "auto"])
    assert (runs[0].vector, runs[1].vector, runs[1].labels) == (None, "auto", ("auto", "auto"))
    # vector=auto gives relation_<name> its FFV and an analogy task a CFV per question
    ffv = plan_runs([MODEL], [TASK], ["ffv"])[0]
    cfv = plan_runs([MODEL], [MC_TASK], ["cfv"])[0]
    assert planned_vector(MODEL, runs[1], TASK) == planned_vector(MODEL, ffv, TASK) != None  # noqa: E711
    assert planned_vector(MODEL, runs[1], MC_TASK) == planned_vector(MODEL, cfv, MC_TASK)
    with pytest.raises(LeaderboardError, match="no shipped vector for: .*no-such-model/ffv/antonym.safetensors"):
        plan_runs(["no-such-model"], [TASK, MC_TASK], ["auto"])


def test_missing_or_unmatched_samples_are_said_in_the_row(tmp_path):
    results, outcomes = _analogy_runs(tmp_path)
    directory = results / MODEL
    (directory / f"samples_{MC_TASK}_2026-01-02T00-00-00.jsonl").unlink()  # the cfv run's MC samples
    shorter = {t: {m: v[:30] for m, v in ms.items()} for t, ms in outcomes["auto"].items()}  # auto rerun with --limit 30
    _write_run(directory, "2026-01-04T00-00-00", AUTO_RECORD, shorter)
    (directory / f"samples_{MC_TASK}_2025-12-31T00-00-00.jsonl").write_text("{}\n")  # another date: not this run's
    board = build_leaderboard([results])
    rows = {(r.patched.condition, r.patched.task, r.metric): r for r in board.paired_gains}
    missing = rows[("cfv", MC_TASK, "acc")]
    assert missing.paired is None and "results_2026-01-02T00-00-00.json (patched)" in missing.note
    assert "rerun with --log_samples" in missing.note
    assert missing.gain == pytest.approx(missing.patched.scores["acc"] - missing.unpatched.scores["acc"])
    unmatched = rows[("auto", MC_TASK, "acc")]
    assert unmatched.paired is None and "not over the same questions" in unmatched.note
    assert "10 only in unpatched" in unmatched.note
    assert rows[("cfv", COMPLETION_TASK, "top_answer")].paired is not None  # its samples are there
    markdown = format_markdown(board)
    line = next(text for text in markdown.splitlines() if text.startswith(f"| {MODEL} | {MC_TASK} | acc | cfv |"))
    assert "no per-question samples" in line and line.endswith("|  |  |  |")  # no test, p or n
