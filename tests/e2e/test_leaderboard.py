"""`ffv leaderboard` on real lm-eval results files: one run of the stock `lm_eval` command line
(Gemma 3 270M with the shipped antonym FFV, --log_samples) and `ffv leaderboard --run` adding the
unpatched and 2-shot runs (reusing the FFV one), all with --limit 5; the HTML page in headless
Chromium. (Written results of the analogy tasks: tests/reports/test_leaderboard_results.py; run
plans: tests/evaluation/test_leaderboard_runs.py.)"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ffv_eval.evaluation.leaderboard_runs import plan_runs, plan_tasks, runs_to_do
from ffv_eval.reports import leaderboard_render
from ffv_eval.reports.leaderboard_render import COMPOSITE_RELATION, format_markdown, vector_rows, write_csv, write_leaderboard
from ffv_eval.reports.leaderboard_results import LeaderboardError, build_leaderboard, samples_file
from ffv_eval.reports.paired import MCNEMAR, paired_gain

# Debian names it chromium, Ubuntu chromium-browser; Google's build is google-chrome
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MODEL, TASK = "gemma-3-270m", "relation_antonym"
RUN_ARGS = ["--run", MODEL, "--tasks", TASK, "--conditions", "unpatched", "ffv", "2-shot",
               "--limit", "5"]

pytestmark = pytest.mark.slow  # every test reads the real runs of the module's fixture


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FFV_DATA_DIR"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _results_files(directory: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in directory.rglob("results_*.json")}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """The stock lm_eval CLI writes the FFV run; `ffv leaderboard --run` adds unpatched and
    2-shot into the same directory and writes the leaderboard; a second call reuses all."""
    base = tmp_path_factory.mktemp("leaderboard")
    results_dir = base / "results"
    _run([sys.executable, "-m", "lm_eval", "--model", "ffv-patched", "--model_args",
          f"pretrained={MODEL},vector=antonym", "--tasks", TASK, "--limit", "5", "--output_path", str(results_dir),
          "--log_samples"], base)
    cli_files = _results_files(results_dir)
    assert len(cli_files) == 1
    ffv_leaderboard = [sys.executable, "-m", "ffv_eval.cli", "leaderboard", str(results_dir), *RUN_ARGS]
    first = _run([*ffv_leaderboard, "--out-prefix", str(base / "board")], base)
    after_first = _results_files(results_dir)
    second = _run([*ffv_leaderboard, "--out-prefix", str(base / "again")], base)
    return {"dir": results_dir, "base": base, "cli_file": next(iter(cli_files)), "first_output": first,
            "second_output": second, "after_first": after_first, "after_second": _results_files(results_dir)}


def _json_by_condition(results_dir: Path) -> dict[str, dict]:
    """The JSON's own task results, keyed by the condition each file must get."""
    out = {}
    for path in results_dir.rglob("results_*.json"):
        data = json.loads(path.read_text())
        vector = data["config"].get("ffv_vector")
        shots = data["n-shot"][TASK]
        out[vector["kind"] if vector else (f"{shots}-shot" if shots else "unpatched")] = data
    return out


# -- real runs ----------------------------------------------------------------------------

def test_run_writes_the_missing_runs_in_lm_evals_layout_and_reuses_the_cli_run(real_runs):
    out = real_runs["first_output"]
    assert f"reusing {MODEL} / ffv / {TASK}" in out
    assert "run 1/2" in out and "run 2/2" in out and "run(s) to do" in out
    files = real_runs["after_first"]
    assert len(files) == 3
    assert {p.parent.name for p in files} == {MODEL}  # lm_eval --output_path DIR -> DIR/<model>/results_<date>.json
    assert real_runs["cli_file"] in files and files[real_runs["cli_file"]] == real_runs["after_second"][real_runs["cli_file"]]
    for path in files:  # each run's per-question samples beside its results, same date
        samples = samples_file(path, TASK)
        assert samples is not None and samples.name == f"samples_{TASK}_{path.stem.removeprefix('results_')}.jsonl"
        assert sorted(json.loads(line)["doc_id"] for line in samples.read_text().splitlines()) == [0, 1, 2, 3, 4]
    unpatched = json.loads(_file_of(real_runs["dir"], "unpatched").read_text())["config"]["model_args"]
    assert "vector=none" in str(unpatched) or (isinstance(unpatched, dict) and unpatched.get("vector") == "none")


def test_second_run_reuses_everything(real_runs):
    out = real_runs["second_output"]
    assert "0 run(s) to do, 3 task result(s) reused" in out
    assert "run 1/" not in out
    assert real_runs["after_second"] == real_runs["after_first"]  # no new file, none rewritten


def test_reader_classifies_the_real_runs(real_runs):
    board = build_leaderboard([real_runs["dir"]])
    cells = board.by_cell()
    assert set(cells) == {(MODEL, c, TASK) for c in ("unpatched", "ffv", "2-shot")}
    assert board.conditions == ["unpatched", "ffv", "2-shot"]
    by_condition = _json_by_condition(real_runs["dir"])
    for condition, data in by_condition.items():
        entry = cells[(MODEL, condition, TASK)]
        assert entry.metric == "exact_match"
        assert entry.value == data["results"][TASK]["exact_match,none"]
        assert entry.stderr == data["results"][TASK]["exact_match_stderr,none"]
        assert entry.task_version == "1.0" and entry.lm_eval_version == data["lm_eval_version"]
        assert entry.n_samples == 5 and entry.limit == 5
    ffv = cells[(MODEL, "ffv", TASK)].vector
    recorded = by_condition["ffv"]["config"]["ffv_vector"]
    assert (ffv.kind, ffv.relation, ffv.layer, ffv.patch_layer, ffv.scale) == (
        "ffv", "antonym", recorded["layer"], recorded["patch_layer"], recorded["scale"])
    assert ffv.path.endswith("vectors/gemma-3-270m/ffv/antonym.safetensors")
    assert cells[(MODEL, "unpatched", TASK)].vector is None and cells[(MODEL, "2-shot", TASK)].n_shot == 2


def test_markdown_and_csv_hold_the_jsons_numbers(real_runs):
    base = real_runs["base"]
    by_condition = _json_by_condition(real_runs["dir"])
    markdown = (base / "board.md").read_text()
    assert f"lm-eval {by_condition['ffv']['lm_eval_version']}" in markdown
    assert f"{TASK} (exact_match, v1.0)" in markdown
    for condition, data in by_condition.items():
        value, stderr = data["results"][TASK]["exact_match,none"], data["results"][TASK]["exact_match_stderr,none"]
        assert f"| {MODEL} | {condition} | {value:.3f} ± {stderr:.3f} |" in markdown
    assert "## Vectors" in markdown and "ffv/antonym.safetensors" in markdown
    assert "## Gain from patching" in markdown
    gain = by_condition["ffv"]["results"][TASK]["exact_match,none"] - by_condition["unpatched"]["results"][TASK]["exact_match,none"]
    assert f"| {MODEL} | ffv | {gain:+.3f} |" in markdown

    rows = list(csv.DictReader((base / "board.csv").open(encoding="utf-8")))
    assert len(rows) == 3
    for row in rows:
        data = by_condition[row["condition"]]
        assert (row["model"], row["task"], row["metric"]) == (MODEL, TASK, "exact_match")
        assert float(row["value"]) == data["results"][TASK]["exact_match,none"]
        assert float(row["stderr"]) == data["results"][TASK]["exact_match_stderr,none"]
        assert row["task_version"] == "1.0" and row["lm_eval_version"] == data["lm_eval_version"]
        assert row["n_shot"] == str(data["n-shot"][TASK])
    ffv_row = next(r for r in rows if r["condition"] == "ffv")
    assert (ffv_row["vector_kind"], ffv_row["vector_relation"]) == ("ffv", "antonym")
    assert ffv_row["patch_layer"] == str(by_condition["ffv"]["config"]["ffv_vector"]["patch_layer"])
    assert float(ffv_row["gain"]) == pytest.approx(gain) and ffv_row["gain_test"] == MCNEMAR and ffv_row["gain_n"] == "5"


def test_the_real_runs_gain_is_paired_over_their_questions(real_runs):
    """The FFV run against the unpatched one, question by question from the two samples files."""
    outcomes = {}
    for condition in ("ffv", "unpatched"):
        samples = samples_file(_file_of(real_runs["dir"], condition), TASK)
        outcomes[condition] = {line["doc_id"]: line["exact_match"] for line in map(json.loads, samples.read_text().splitlines())}
    expected = paired_gain([outcomes["ffv"][i] for i in range(5)], [outcomes["unpatched"][i] for i in range(5)])
    row = next(r for r in build_leaderboard([real_runs["dir"]]).paired_gains if r.patched.condition == "ffv")
    assert row.paired == expected and row.metric == "exact_match" and row.paired.n == 5
    low, high = expected.ci95
    assert (f"| {MODEL} | {TASK} | exact_match | ffv | {row.unpatched.value:.3f} | {row.patched.value:.3f} | "
            f"{expected.mean_gain:+.3f} | [{low:+.3f}, {high:+.3f}] | {MCNEMAR} | {expected.p_value:.3g} | 5 |"
            ) in (real_runs["base"] / "board.md").read_text()


# -- mixing, duplicates, model names --------------------------------------------------------

def _copy_edited(source: Path, target: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2))
    return target


def _file_of(results_dir: Path, condition: str) -> Path:
    for path in results_dir.rglob("results_*.json"):
        data = json.loads(path.read_text())
        vector, shots = data["config"].get("ffv_vector"), data["n-shot"][TASK]
        if (vector["kind"] if vector else (f"{shots}-shot" if shots else "unpatched")) == condition:
            return path
    raise AssertionError(condition)


def test_different_task_versions_are_not_mixed(real_runs, tmp_path):
    ffv = shutil.copy(_file_of(real_runs["dir"], "ffv"), tmp_path / "results_a.json")
    edited = _copy_edited(_file_of(real_runs["dir"], "unpatched"), tmp_path / "other" / "results_b.json",
                          lambda d: d["versions"].update({TASK: 2.0}))
    with pytest.raises(LeaderboardError) as err:
        build_leaderboard([tmp_path])
    message = str(err.value)
    assert str(ffv) in message and str(edited) in message and "1.0" in message and "2.0" in message
    assert "--allow-mixed-versions" in message
    board = build_leaderboard([tmp_path], allow_mixed_versions=True)
    assert board.task_versions(TASK) == ["1.0", "2.0"]
    assert any("mixed task versions" in note for note in board.notes)
    assert "v1.0/2.0" in format_markdown(board)


def test_newest_run_of_a_cell_wins_and_is_stated(real_runs, tmp_path):
    source = _file_of(real_runs["dir"], "ffv")
    old = shutil.copy(source, tmp_path / "results_old.json")

    def newer(d):
        d["date"] += 100
        d["results"][TASK]["exact_match,none"] = 0.123

    new = _copy_edited(source, tmp_path / "results_new.json", newer)
    board = build_leaderboard([tmp_path])
    assert board.by_cell()[(MODEL, "ffv", TASK)].value == 0.123
    assert len(board.notes) == 1 and "results_new.json" in board.notes[0] and "results_old.json" in board.notes[0]
    markdown = format_markdown(board)
    assert "## Notes" in markdown and "replaces the older" in markdown
    assert Path(old).exists() and new.exists()


def test_plain_hf_run_is_named_by_pretrained(real_runs, tmp_path):
    def as_hf(d):
        for key in ("ffv_model", "ffv_vector"):
            d["config"].pop(key)
        d["config"].update(model="hf", model_args="pretrained=/cache/gemma-3-270m,dtype=float32")

    _copy_edited(_file_of(real_runs["dir"], "unpatched"), tmp_path / "results_hf.json", as_hf)
    board = build_leaderboard([tmp_path])
    assert [e.cell for e in board.entries] == [("/cache/gemma-3-270m", "unpatched", TASK)]


# -- bad input ----------------------------------------------------------------------------

def test_truncated_json_names_file_line_and_column(real_runs, tmp_path):
    text = real_runs["cli_file"].read_text()
    bad = tmp_path / "model" / "results_2026-01-01T00-00-00.json"
    bad.parent.mkdir()
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(LeaderboardError, match=r"line \d+ column \d+") as err:
        build_leaderboard([tmp_path])
    assert str(bad) in str(err.value) and "malformed JSON" in str(err.value)


# -- reuse only of runs that would score the same -------------------------------------------

def _reuse_decision(real_runs, tmp_path, edit, limit=5, fingerprint=None, samples=True) -> tuple[list, str]:
    """runs_to_do for the FFV cell against a results directory holding only the real FFV run
    (with its samples file unless told not), edited; the model's fingerprint is the recorded
    one unless given."""
    source = _file_of(real_runs["dir"], "ffv")
    copy = _copy_edited(source, tmp_path / "results" / MODEL / source.name, edit)
    if samples:
        shutil.copy(samples_file(source, TASK), copy.parent)
    recorded = json.loads(source.read_text())["config"]["model_fingerprint"]
    lines: list[str] = []
    todo = runs_to_do(plan_runs([MODEL], [TASK], ["ffv"]), plan_tasks([TASK]), copy.parent.parent, limit,
                      fingerprint_of=lambda model: fingerprint or recorded, log=lines.append)
    return todo, "\n".join(lines)


def _set_vector(**fields):
    return lambda d: d["config"]["ffv_vector"].update(fields)


def _shipped_ffv_sha256() -> str:
    from ffv_eval.vectors.library import shipped_path

    return hashlib.sha256(shipped_path(MODEL, "ffv", "antonym").read_bytes()).hexdigest()


@pytest.mark.parametrize("edit", [lambda d: None, lambda d: _set_vector(sha256=_shipped_ffv_sha256())(d)],
                         ids=["as-run", "recorded-hash"])
def test_an_identical_cell_is_reused(real_runs, tmp_path, edit):
    todo, log = _reuse_decision(real_runs, tmp_path, edit)
    assert todo == [] and f"reusing {MODEL} / ffv / {TASK}" in log


def _metadata(**fields):
    def edit(d):
        d["configs"][TASK]["metadata"].update(fields)
        d["configs"][TASK]["metadata"] = {k: v for k, v in d["configs"][TASK]["metadata"].items() if v is not None}
    return edit


@pytest.mark.parametrize("edit, reason", [
    (_set_vector(sha256="0" * 64), "vector (file hash, layer, scale)"),
    (_set_vector(patch_scale=2.0), "vector (file hash, layer, scale)"),
    (lambda d: _set_vector(patch_layer=d["config"]["ffv_vector"]["patch_layer"] + 1)(d), "vector (file hash, layer, scale)"),
    (lambda d: d["versions"].update({TASK: 1.1}), "task version: 1.1 in the results, 1.0 now"),
    (_metadata(data_source="data_dir", data_dir="/elsewhere"), "data source: data directory /elsewhere in the results, project files now"),
    (_metadata(data_source=None), "data source: unrecorded in the results"),  # results from before tasks said
    (lambda d: d["config"].pop("model_fingerprint"), "model fingerprint: unrecorded in the results"),
], ids=["vector-hash", "scale", "layer", "task-version", "data-source", "data-source-unrecorded", "no-fingerprint"])
def test_a_cell_that_differs_is_rerun(real_runs, tmp_path, edit, reason):
    todo, log = _reuse_decision(real_runs, tmp_path, edit)
    assert [(r.tasks, r.labels, r.vector) for r in todo] == [((TASK,), ("ffv",), "ffv:*")]
    assert f"rerunning {MODEL} / ffv / {TASK}" in log and reason in log, log


def test_a_cell_without_samples_is_rerun(real_runs, tmp_path):
    todo, log = _reuse_decision(real_runs, tmp_path, lambda d: None, samples=False)
    assert len(todo) == 1 and "per-question samples: none in the results, logged now" in log, log


def test_another_model_or_limit_is_rerun(real_runs, tmp_path):
    todo, log = _reuse_decision(real_runs, tmp_path / "a", lambda d: None, fingerprint="0123456789abcdef")
    assert len(todo) == 1 and "model fingerprint" in log and "0123456789abcdef now" in log
    todo, log = _reuse_decision(real_runs, tmp_path / "b", lambda d: None, limit=None)
    assert len(todo) == 1 and "limit: 5.0 in the results, none now" in log


def test_runs_of_different_data_sources_are_not_mixed(real_runs, tmp_path):
    shutil.copy(_file_of(real_runs["dir"], "ffv"), tmp_path / "results_a.json")
    _copy_edited(_file_of(real_runs["dir"], "unpatched"), tmp_path / "other" / "results_b.json",
                 _metadata(data_source="data_dir", data_dir="/todd-files"))
    with pytest.raises(LeaderboardError) as err:
        build_leaderboard([tmp_path])
    message = str(err.value)
    assert f"task {TASK} has data source" in message and "--allow-mixed-versions" in message
    assert "data source project files in" in message and "data source data directory /todd-files in" in message
    board = build_leaderboard([tmp_path], allow_mixed_versions=True)
    assert any("mixed task data sources" in note for note in board.notes)
    assert "| data directory /todd-files |" in format_markdown(board)


# -- atomic writes --------------------------------------------------------------------------

def test_a_failing_writer_leaves_no_partial_file(real_runs, tmp_path, monkeypatch):
    board = build_leaderboard([real_runs["dir"]])
    target = tmp_path / "board.csv"
    target.write_text("previous leaderboard\n")
    real_row, calls = leaderboard_render.csv_row, []

    def fails_on_second_row(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_row(*args)

    monkeypatch.setattr(leaderboard_render, "csv_row", fails_on_second_row)
    with pytest.raises(OSError, match="disk full"):
        write_csv(board, target)
    assert target.read_text() == "previous leaderboard\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.csv"]  # no temporary file left

    monkeypatch.setattr(leaderboard_render, "render_html", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("plot failed")))
    with pytest.raises(RuntimeError, match="plot failed"):
        write_leaderboard(board, tmp_path / "b.md", tmp_path / "b.csv", tmp_path / "b.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.csv"]  # rendered before anything is written


# -- the HTML page in a real browser ----------------------------------------------------------

def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium on PATH: chromium, chromium-browser or google-chrome "
                                              "(apt-get install -y chromium)")
def test_html_page_renders_table_and_plots_in_chromium(real_runs, tmp_path):
    html = real_runs["base"] / "board.html"
    text = html.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text), "the page must not load anything"
    assert "<script" not in text
    dumped = _chromium(["--dump-dom", html.as_uri()], tmp_path / "profile")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    table = re.search(r'<table id="leaderboard">.*?</table>', dom, re.S).group(0)
    for condition, data in _json_by_condition(real_runs["dir"]).items():
        value = data["results"][TASK]["exact_match,none"]
        assert re.search(rf"<td>{re.escape(condition)}</td>.*?{value:.3f} ±", table, re.S)
    for plot in ("accuracy-plot", "gain-plot"):
        figure = re.search(rf'<figure id="{plot}">(.*?)</figure>', dom, re.S)
        assert figure and "<svg" in figure.group(1) and "<path" in figure.group(1)
        assert TASK in figure.group(1) and MODEL in figure.group(1)  # axis labels and panel titles as SVG text

    png = tmp_path / "page.png"
    shot = _chromium([f"--screenshot={png}", "--window-size=1200,2000", html.as_uri()], tmp_path / "profile2")
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1200, 2000)
        grey = image.convert("L")
        low, high = grey.getextrema()
        dark = sum(grey.histogram()[:200])
    assert high - low > 100 and dark > 0.01 * 1200 * 2000, "the screenshot is blank"


# -- tables from ffv align reports and ffv check baselines ----------------------------------

def test_alignment_and_vector_quality_tables(real_runs, tmp_path):
    from ffv_eval.cli import main
    from ffv_eval.reports.leaderboard_sections import SectionError, alignment_section

    baseline = Path(__file__).resolve().parent.parent.parent / "vectors" / MODEL / "quality-baseline.json"
    figures = json.loads(baseline.read_text())["vectors"]["ffv/antonym"]
    report = {"model": MODEL, "sets": {kind: {
        "n_vectors": 24, "relsim": {"spearman": rho, "ci95": [rho - 0.05, rho + 0.05], "n_comparisons": 600},
        "semeval_prototypicality": {"mean_spearman": rho / 2, "ci95": [0.0, rho], "n_subcategories": 15}}
        for kind, rho in (("fv", 0.123), ("ffv", 0.234))}}
    align_file = tmp_path / "align.json"
    align_file.write_text(json.dumps(report))
    prefix = tmp_path / "board"
    assert main(["leaderboard", str(real_runs["dir"]), "--out-prefix", str(prefix), "--alignment", str(align_file),
                 "--vector-quality", str(baseline)]) == 0
    markdown = (tmp_path / "board.md").read_text()
    assert "## Alignment with human judgments" in markdown
    assert f"| {MODEL} | ffv | 0.234 [0.184, 0.284] | 600 | 0.117 [0.000, 0.234] | 15 |" in markdown
    assert f"| {MODEL} | antonym | {figures['zero_shot_accuracy']:.2f} |" in markdown
    assert f"{figures['accuracy']:.2f} / {figures['decoding_hits']}" in markdown
    assert "Alignment with human judgments" in (tmp_path / "board.html").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": MODEL}))
    with pytest.raises(SectionError, match="bad.json: not an `ffv align` report: field 'sets' is missing"):
        alignment_section([str(bad)])


def test_a_composite_run_names_its_relation_as_per_question(real_runs, tmp_path):
    def as_cfv(d):
        d["config"]["ffv_vector"].update(kind="cfv", relation=None)

    _copy_edited(_file_of(real_runs["dir"], "ffv"), tmp_path / "results_cfv.json", as_cfv)
    board = build_leaderboard([tmp_path])
    assert [e.condition for e in board.entries] == ["cfv"]
    assert vector_rows(board)[0][4] == COMPOSITE_RELATION


