"""`ffv compare` (evaluation/compare.py): one progress bar and the table on the terminal, lm-eval's
output in a log file (or on the terminal with --verbose), the table as Markdown and a bar chart
beside the JSON results. The model is a stand-in (no weights): lm-eval itself runs for real on
the project's relation_<name> task, so its loggers, progress bars and `git describe` subprocess
do what they do in a real run. The real Gemma run is marked slow."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ffv_eval.errors import SettingError
from ffv_eval.evaluation import compare
from ffv_eval.evaluation.compare import chart_values, comparison_figure, format_markdown, format_table, output_paths
from ffv_eval.progress import show_progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONDITIONS = ["zero_shot", "fv", "ffv", "10_shot"]


def _report(relations=("antonym", "synonym", "country-capital")) -> dict:
    return {"model": "gemma-3-270m", "data": "project", "limit": 5, "conditions": CONDITIONS,
            "relations": {name: {c: {"exact_match": round(0.1 * i + 0.2 * j, 3), "stderr": round(0.01 * (i + 1) + 0.02 * j, 3)}
                                 for j, c in enumerate(CONDITIONS)} | {"vectors": {}, "seconds": 1.0}
                          for i, name in enumerate(relations)}}


# --- where the files go ---------------------------------------------------------------------

def test_output_paths_default_to_a_folder_and_follow_the_first_result_file_given():
    assert output_paths() == {key: Path("ffv-compare") / f"compare.{ext}"
                              for key, ext in (("output", "json"), ("markdown", "md"), ("plot", "png"), ("log_file", "log"))}
    assert output_paths(output="runs/x.json") == {"output": Path("runs/x.json"), "markdown": Path("runs/x.md"),
                                                  "plot": Path("runs/x.png"), "log_file": Path("runs/x.log")}
    assert output_paths(markdown="t/table.md") == {"output": Path("t/table.json"), "markdown": Path("t/table.md"),
                                                   "plot": Path("t/table.png"), "log_file": Path("t/table.log")}
    chosen = output_paths(output="a/r.json", markdown="b/t.md", plot="c/p.png", log_file="d/l.txt")
    assert chosen == {"output": Path("a/r.json"), "markdown": Path("b/t.md"), "plot": Path("c/p.png"), "log_file": Path("d/l.txt")}
    assert output_paths(log_file="mine.log")["output"] == Path("ffv-compare/compare.json")
    with pytest.raises(SettingError, match="--output.*--markdown"):
        output_paths(output="x.md")  # the Markdown would overwrite the JSON


# --- the chart --------------------------------------------------------------------------------

def test_chart_has_a_bar_and_an_error_bar_per_relation_and_condition_plus_the_mean(tmp_path):
    from matplotlib.container import BarContainer
    from PIL import Image

    report = _report()
    rows = report["relations"]
    figure = comparison_figure(report)
    (ax,) = figure.axes
    groups = len(rows) + 1
    assert len(ax.patches) == groups * len(CONDITIONS)
    assert [t.get_text() for t in ax.get_xticklabels()] == [*rows, "mean"]
    assert "1.96" in ax.get_ylabel() and "stderr" in ax.get_ylabel()
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["zero-shot", "fv", "ffv", "10-shot"]
    for condition, container in zip(CONDITIONS, bars):
        heights = [p.get_height() for p in container.patches]
        segments = container.errorbar.lines[2][0].get_segments()  # one vertical line per bar
        half_widths = [(s[1][1] - s[0][1]) / 2 for s in segments]
        mean = sum(r[condition]["exact_match"] for r in rows.values()) / len(rows)
        mean_error = 1.96 * sum(r[condition]["stderr"] ** 2 for r in rows.values()) ** 0.5 / len(rows)
        assert heights == pytest.approx([r[condition]["exact_match"] for r in rows.values()] + [mean])
        assert half_widths == pytest.approx([1.96 * r[condition]["stderr"] for r in rows.values()] + [mean_error])
    assert chart_values(report)[0] == [*rows, "mean"]

    path = tmp_path / "chart.png"
    figure.savefig(path, format="png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


# --- a run through lm-eval with a stand-in model ----------------------------------------------

class StandInLM:
    """What compare_conditions uses of FFVPatchedLM, answering lm-eval's generate_until requests
    without a model: right when a vector is patched in, and on even test pairs with k shots.
    It also logs and prints the way the model libraries do, and runs a subprocess that
    writes to the process's stderr (file descriptor 2)."""

    def __new__(cls, **kwargs):
        from lm_eval.api.model import LM

        class _LM(LM):
            def __init__(self, pretrained, vector, batch_size, **model_args):
                super().__init__()
                self.stored_vector, self.patch_layer = None, 6
                logging.getLogger("transformers.modeling_utils").warning("stand-in: transformers warns while loading")
                logging.getLogger("stand-in-library").addHandler(logging.StreamHandler())  # a library setting up its logging

            def set_vector(self, vector):
                self.stored_vector = SimpleNamespace(path=vector) if vector else None
                if vector:
                    show_progress(f"[ffv] patching {vector} (stand-in)")

            def generate_until(self, requests, disable_tqdm=False):
                from tqdm import tqdm

                logging.getLogger("nnsight").warning("stand-in: nnsight says something")
                sys.stderr.write("stand-in: written to sys.stderr\n")
                for _ in tqdm(requests, desc="stand-in requests"):  # as HFLM's "Running generate_until requests"
                    pass
                subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('stand-in: a subprocess on fd 2\\n')"],
                               check=True)
                few_shot = ["\n\n" in r.args[0] for r in requests]
                return [" " + r.doc["output"] if self.stored_vector or (k and r.doc_id % 2 == 0) else " nope"
                        for r, k in zip(requests, few_shot)]

            def loglikelihood(self, requests):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

        return _LM(**kwargs)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """compare_conditions with the stand-in model and a TaskManager of the project's tasks only
    (lm-eval's own catalogue takes ~20 s to index), run in an empty folder (no git repository:
    lm-eval's `git describe` complains on stderr)."""
    import lm_eval.tasks

    from ffv_eval.harness import model as harness_model

    monkeypatch.setattr(harness_model, "FFVPatchedLM", StandInLM)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _logger_state():
    return {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level, logging.getLogger(name).propagate)
            for name in ("", "lm_eval", "transformers", "nnsight")}


ARGS = ["compare", "--relations", "antonym", "--limit", "3", "--kinds", "ffv", "--num-fewshot", "2", "--device", "cpu"]
LM_EVAL_CHATTER = ("Overwriting default num_fewshot", "stand-in: transformers warns", "stand-in: nnsight says",
                   "stand-in: a subprocess on fd 2", "stand-in: written to sys.stderr", "stand-in requests", "[ffv] patching",
                   "[ffv] relation_antonym:")


def test_compare_shows_a_bar_and_the_table_and_logs_lm_eval_to_a_file(stand_in, capfd):

    # a handler on lm-eval's logger that writes to the terminal, as lm_eval.utils.setup_logging
    # (lm-eval's own command line) leaves one
    lm_eval_terminal_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("lm_eval").addHandler(lm_eval_terminal_handler)
    try:
        _run_quietly_and_check(stand_in, capfd, lm_eval_terminal_handler)
    finally:
        logging.getLogger("lm_eval").removeHandler(lm_eval_terminal_handler)
        logging.getLogger("stand-in-library").handlers.clear()


def _run_quietly_and_check(stand_in, capfd, lm_eval_terminal_handler):
    from ffv_eval.cli import main

    before = _logger_state()
    stderr = sys.stderr
    assert main(ARGS) == 0
    out, err = capfd.readouterr()
    folder = stand_in / "ffv-compare"
    report = json.loads((folder / "compare.json").read_text())
    # the numbers: right answers only when patched, and on the even test pairs (0, 2) with 2 shots
    assert report["conditions"] == ["zero_shot", "ffv", "2_shot"]
    row = report["relations"]["antonym"]
    assert [row[c]["exact_match"] for c in report["conditions"]] == pytest.approx([0.0, 1.0, 2 / 3])
    assert [row[c]["per_question"] for c in report["conditions"]] == [[0, 0, 0], [1, 1, 1], [1, 0, 1]]
    assert row["vectors"]["ffv"]["path"].endswith("ffv/antonym.safetensors")
    # the FFV against each other condition, question by question: 3 (and 1) discordant questions,
    # all the FFV's, exact McNemar p = 2 * 0.5 ** 3 (and 1)
    paired = report["paired"]
    assert set(paired) == {"zero_shot", "2_shot"}
    assert (paired["zero_shot"]["mean_difference"], paired["zero_shot"]["discordant"], paired["zero_shot"]["p"]) == (1.0, [0, 3], 0.25)
    assert paired["2_shot"]["mean_difference"] == pytest.approx(1 / 3) and paired["2_shot"]["discordant"] == [0, 1]
    assert "| **ffv minus it**, paired over all questions [95% CI], p | +1.000 [" in format_table(report)

    # the terminal: the log file's line, the table, the files written; the bar alone on stderr
    log = folder / "compare.log"
    assert out == (f"ffv compare: lm-eval's output goes to {Path('ffv-compare/compare.log')} (--verbose shows it here)\n"
                   + format_table(report) + "\n"
                   + "ffv compare: wrote " + ", ".join(str(Path("ffv-compare") / f"compare.{e}") for e in ("json", "md", "png"))
                   + f" (log: {Path('ffv-compare/compare.log')})\n")
    bar = [f for f in re.split(r"[\r\n]", err) if f.strip()]  # the states the bar went through, and nothing else
    assert bar and all(re.match(r"(loading gemma-3-270m|antonym: (zero-shot|ffv|2-shot)|done): +\d+%\|.*\| [0-3]/3 ", f) for f in bar), bar
    assert bar[-1].startswith("done: 100%") and "3/3" in bar[-1]
    for chatter in LM_EVAL_CHATTER + ("fatal", "Running generate_until", "Building contexts"):
        assert chatter not in err and chatter not in out, chatter
    # the log: lm-eval's logger records and progress bars, the libraries' warnings, prints, subprocesses
    text = log.read_text()
    for chatter in LM_EVAL_CHATTER + ("Running generate_until requests",):  # lm-eval's INFO records too
        assert chatter in text, chatter
    assert text.count("stand-in: nnsight says") == 3  # once per run: no record twice
    # the Markdown is format_table's table (with the command), the chart a PNG
    assert (folder / "compare.md").read_text() == format_markdown(report, "ffv " + " ".join(sys.argv[1:]))
    assert f"\n\n{format_table(report)}\n\n" in (folder / "compare.md").read_text()
    assert (folder / "compare.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in folder.iterdir()) == ["compare.json", "compare.log", "compare.md", "compare.png"]
    # everything put back
    assert _logger_state() == before and sys.stderr is stderr
    assert lm_eval_terminal_handler in logging.getLogger("lm_eval").handlers
    logging.getLogger("lm_eval").warning("after the run")
    os.write(2, b"fd 2 after the run\n")
    logging.getLogger("stand-in-library").warning("the library's handler, made during the run, after it")
    err = capfd.readouterr().err
    assert "after the run" in err and "fd 2 after the run" in err and "the library's handler" in err
    assert "after the run" not in log.read_text() and "Logging error" not in err + log.read_text()


def test_verbose_leaves_lm_eval_on_the_terminal_and_writes_no_log(stand_in, capfd, caplog):
    from ffv_eval.cli import main

    assert main([*ARGS, "--verbose", "--output", "out/r.json"]) == 0
    out, err = capfd.readouterr()
    terminal = out + err
    # what is printed or written to stderr stays there; logger records go where logging sends them
    # (under pytest: its log capture, which stands for the terminal handlers)
    for chatter in ("[ffv] patching", "[ffv] relation_antonym:", "stand-in: a subprocess on fd 2", "fatal: not a git",
                    "stand-in: written to sys.stderr", "stand-in requests"):
        assert chatter in terminal, chatter
    for chatter in ("Overwriting default num_fewshot", "stand-in: nnsight says"):  # (transformers has a handler of its own)
        assert chatter in caplog.text, chatter
    assert "lm-eval's output goes to" not in out
    assert sorted(p.name for p in (stand_in / "out").iterdir()) == ["r.json", "r.md", "r.png"]
    assert not (stand_in / "ffv-compare").exists()
    report = json.loads((stand_in / "out" / "r.json").read_text())
    assert format_table(report) in out and out.rstrip().endswith("ffv compare: wrote out/r.json, out/r.md, out/r.png")


def test_a_failing_run_puts_the_terminal_and_the_loggers_back(stand_in, capfd, monkeypatch):
    def fail(lm, task_manager, task, num_fewshot, limit):
        logging.getLogger("lm_eval.evaluator").warning("about to fail")
        raise RuntimeError("lm-eval broke")

    monkeypatch.setattr(compare, "_score", fail)
    before, stderr, stdout = _logger_state(), sys.stderr, sys.stdout
    with pytest.raises(RuntimeError, match="lm-eval broke"):
        compare.compare_conditions(relations=["antonym"], kinds=["ffv"], limit=3, output="r.json", log_file="r.log")
    assert _logger_state() == before
    assert sys.stderr is stderr and sys.stdout is stdout
    assert "about to fail" in Path("r.log").read_text()
    assert not Path("r.json").exists()  # nothing half-written
    os.write(2, b"fd 2 works again\n")
    print("stdout works again")
    out, err = capfd.readouterr()
    assert "fd 2 works again" in err and "stdout works again" in out and "about to fail" not in err


def test_unwritable_outputs_fail_before_any_model_work(stand_in, monkeypatch):
    import ffv_eval
    from ffv_eval.files.atomic import UnwritableOutput
    from ffv_eval.harness import model as harness_model

    monkeypatch.setattr(harness_model, "FFVPatchedLM", lambda **kw: pytest.fail("the model loaded"))
    inside = Path(ffv_eval.__file__).resolve().parent / "compare.png"
    with pytest.raises(UnwritableOutput, match="--plot"):
        compare.compare_conditions(relations=["antonym"], kinds=["ffv"], plot=str(inside), log_file="r.log")
    with pytest.raises(SettingError, match="--plot chart.gif"):
        compare.compare_conditions(relations=["antonym"], kinds=["ffv"], plot="chart.gif", log_file="r.log")
    assert not Path("r.log").exists()


@pytest.mark.slow
def test_the_real_model_gives_the_same_numbers_quiet_and_verbose(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quiet = compare.compare_conditions("gemma-3-270m", ["antonym"], limit=3, kinds=["ffv"], num_fewshot=2,
                                       log_file="q.log", plot="q.png")
    quiet_out, quiet_err = capfd.readouterr()
    verbose = compare.compare_conditions("gemma-3-270m", ["antonym"], limit=3, kinds=["ffv"], num_fewshot=2)
    verbose_out, verbose_err = capfd.readouterr()
    strip = lambda r: {n: {c: row[c] for c in r["conditions"]} for n, row in r["relations"].items()}  # noqa: E731
    assert strip(quiet) == strip(verbose)
    assert "generate_until" in Path("q.log").read_text() and "generate_until" not in quiet_out + quiet_err
    assert "generate_until" in verbose_err
    assert len(quiet_out.splitlines()) == len(format_table(quiet).splitlines()) + 2
