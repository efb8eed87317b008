"""`ffv explain-cfv`: the unpatched and CFV runs of a task read from lm-eval results and samples
files (built here by hand in lm-eval 0.4's format, as `ffv leaderboard --run` writes them),
questions won, lost and changed, the side-by-side lines, the marker where the vector went, the
posterior table, and the errors that name what is missing and the command that makes it."""

import json
from pathlib import Path

import pytest

from ffv_eval.cli import main
from ffv_eval.data.analogies import completion_scores, one_shot_choices, process_choice_results
from ffv_eval.reports.cfv_evidence import MARKER, EvidenceError, Posteriors, explain_cfv, find_runs, pair_questions, select

MODEL = "smollm2-135m"
DATES = {"unpatched": "2026-11-27T03-00-50.856885", "cfv": "2026-11-27T04-00-00.000000"}
BASIS = "/nowhere/vectors/smollm2-135m/basis"

# multiple choice, 3 choices each: (a, b, choices, answer)
QUESTIONS = [
    ("hot", "cold", [["up", "down"], ["big", "large"], ["cat", "dog"]], 0),
    ("lie", "fib", [["quick", "slow"], ["fast", "rapid"], ["sun", "moon"]], 1),
    ("day", "night", [["left", "right"], ["red", "blue"], ["one", "two"]], 0),
    ("car", "road", [["ship", "sea"], ["bird", "tree"], ["pen", "ink"]], 0),
]
# per condition and question: whole-continuation log-likelihoods, then the C parts
LOGLIKELIHOODS = {
    "unpatched": [[-5, -6, -7, -1, -1, -1],    # doc 0: acc picks 1 (right)
                  [-5, -6, -7, -1, -1, -1],    # doc 1: picks 1 (wrong, answer 2)
                  [-5, -6, -7, -1, -1, -1],    # doc 2: right
                  [-6, -5, -7, -1, -1, -1]],   # doc 3: picks 2 (wrong)
    "cfv": [[-6, -5, -7, -1, -1, -1],          # doc 0: picks 2: lost
            [-6, -5, -7, -1, -1, -1],          # doc 1: picks 2: won
            [-5, -6, -7, -1, -1, -1],          # doc 2: unchanged
            [-6, -7, -5, -3, -1, -1]],         # doc 3: acc picks 3 (changed, still wrong); acc_d picks 1 (right)
}
# completion: (a, b, c, answers, counts) and the generation of each condition
COMPLETIONS = [
    ("hot", "cold", "up", ["down"], [5], {"unpatched": " up", "cfv": " down"}),
    ("big", "small", "tall", ["short"], [4], {"unpatched": " short", "cfv": " tiny"}),
    ("cat", "kitten", "dog", ["puppy"], [6], {"unpatched": " puppy", "cfv": " puppy"}),
]


def _sample(doc_id, doc, arguments, resps, filtered, metrics: dict) -> dict:
    return {"doc_id": doc_id, "doc": doc, "target": str(doc.get("answer", "")), "arguments": arguments, "resps": resps,
            "filtered_resps": filtered, "filter": "none", "metrics": list(metrics), "doc_hash": f"hash{doc_id}",
            "prompt_hash": "p", "target_hash": "t", **metrics}


def choice_samples(condition: str) -> list[dict]:
    lines = []
    for doc_id, ((a, b, choices, answer), lls) in enumerate(zip(QUESTIONS, LOGLIKELIHOODS[condition])):
        doc = {"a": a, "b": b, "choices": choices, "answer": answer, "prefix": ""}
        context = f"Q: {a}\nA: {b}\n\n"
        arguments = {f"gen_args_{i}": {"arg_0": context, "arg_1": text} for i, text in enumerate(one_shot_choices(doc))}
        pairs = [[str(float(x)), "False"] for x in lls]  # lm-eval writes the numbers as strings
        metrics = process_choice_results(doc, [(float(x), False) for x in lls])  # the task's own scoring
        lines.append(_sample(doc_id, doc, arguments, [[p] for p in pairs], pairs, metrics))
    return lines


def completion_samples(condition: str) -> list[dict]:
    lines = []
    for doc_id, (a, b, c, answers, counts, generations) in enumerate(COMPLETIONS):
        doc = {"a": a, "b": b, "c": c, "answers": answers, "counts": counts}
        arguments = {"gen_args_0": {"arg_0": f"Q: {a}\nA: {b}\n\nQ: {c}\nA:", "arg_1": {"until": ["\n"], "max_gen_toks": 8}}}
        generation = generations[condition]
        metrics = completion_scores(generation, answers, counts, (a, b, c))
        lines.append(_sample(doc_id, doc, arguments, [[generation]], [generation], metrics))
    return lines


def write_run(directory: Path, condition: str, task: str, samples: list[dict] | None, model: str = MODEL,
              vector: dict | None = None) -> Path:
    """results_<date>.json (and samples_<task>_<date>.jsonl) as lm-eval's EvaluationTracker writes them."""
    date = DATES.get(condition, DATES["cfv"])  # every patched run after the unpatched one
    folder = directory / model
    folder.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in samples[0]["metrics"]] if samples else ["acc"]
    results = {"name": task, "alias": task, "sample_len": len(samples or [])}
    for m in metrics:
        values = [s[m] for s in samples] if samples else [0.0]
        results[f"{m},none"] = sum(values) / len(values)
        results[f"{m}_stderr,none"] = 0.1
    if vector is None and condition == "cfv":
        vector = {"kind": "cfv", "path": BASIS, "sha256": "0" * 64, "relation": None, "patch_layer": 4, "patch_scale": 1.0,
                  "layer": 4, "n_basis": 83, "posterior": "calibrated"}
    data = {
        "results": {task: results},
        "configs": {task: {"task": task, "metadata": {"version": 2.0, "data_source": "data_dir", "data_dir": "/data"}}},
        "versions": {task: 2.0}, "n-shot": {task: 0},
        "higher_is_better": {task: {m: m != "repeats_abc" for m in metrics}},
        "n-samples": {task: {"original": 100, "effective": len(samples or [])}},
        "config": {"model": "ffv-patched", "model_args": {"pretrained": model, "vector": condition if condition != "unpatched" else "none"},
                   "model_fingerprint": "605e016b3905ed11", "ffv_model": model, "ffv_vector": vector, "limit": 4.0},
        "date": 1000.0 if condition == "unpatched" else 2000.0, "lm_eval_version": "0.4.13",
    }
    path = folder / f"results_{date}.json"
    path.write_text(json.dumps(data, indent=2))
    if samples is not None:
        (folder / f"samples_{task}_{date}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


@pytest.fixture
def choice_results(tmp_path) -> Path:
    for condition in ("unpatched", "cfv"):
        write_run(tmp_path, condition, "u2_analogy", choice_samples(condition))
    return tmp_path


@pytest.fixture
def completion_results(tmp_path) -> Path:
    for condition in ("unpatched", "cfv"):
        write_run(tmp_path, condition, "analogy_completion_kmiecik", completion_samples(condition))
    return tmp_path


def fake_posteriors(calls: list):
    def posteriors_of(model, stems, top, basis_dir, placement):
        calls.append((model, list(stems), top, basis_dir))
        rows = {stem: [(f"rel{i}_{stem[0]}", 0.5 / (i + 1), 0.1 * (i + 1)) for i in range(top)] for stem in stems}
        return Posteriors(rows, Path(basis_dir or "/shipped/basis"), "calibrated", "605e016b3905ed11")
    return posteriors_of


# -- reading and selecting ----------------------------------------------------------------------

def test_runs_are_paired_and_won_lost_changed_selected(choice_results):
    base, patched = find_runs(choice_results, MODEL, "u2_analogy")
    assert (base.condition, patched.condition) == ("unpatched", "cfv")
    questions = pair_questions(base, patched)
    assert [q.outcome("acc") for q in questions] == ["lost", "won", "unchanged", "unchanged"]
    assert [q.changed("acc") for q in questions] == [True, True, False, True]
    assert [q.doc_id for q in select(questions, "lost", "acc", 20)] == [0]
    assert [q.doc_id for q in select(questions, "won", "acc", 20)] == [1]
    assert [q.doc_id for q in select(questions, "changed", "acc", 20)] == [0, 1, 3]
    assert [q.doc_id for q in select(questions, "all", "acc", 2)] == [0, 1]
    # acc_d subtracts each choice's C part: doc 3's CFV picks choice 1 (right), a win under acc_d
    assert questions[3].patched.picks == {"acc": 2, "acc_d": 0}
    assert questions[3].outcome("acc_d") == "won"


def test_side_by_side_lines_and_marker_multiple_choice(choice_results):
    calls = []
    report = explain_cfv(choice_results, MODEL, "u2_analogy", only="lost", posteriors_of=fake_posteriors(calls), print_=lambda *a, **k: None)
    assert "- **acc**: cfv won 1, lost 1, unchanged 2 (unpatched 50.0%, cfv 50.0%); answers changed: 3" in report
    assert "- **acc_d**: cfv won 2, lost 1, unchanged 1" in report
    assert "## Document 0: lost (acc, answer changed)" in report
    assert "Document 1" not in report  # only the lost question
    assert "- 1. up : down ✔" in report and "- 2. big : large\n" in report
    assert "| acc | 1. up : down ✔ | 2. big : large ✘ |" in report
    assert f"Q: hot\nA: cold\n\nQ: up\nA:{MARKER} down\n" in report  # where D's first token is predicted
    # posteriors: one batched call for the shown source pairs, with the basis the run recorded (absent here: None)
    assert calls == [(MODEL, [("hot", "cold")], 5, None)]
    assert "| rel0_hot | 0.500 | 0.100 |" in report and "| rel4_hot | 0.100 | 0.500 |" in report
    assert "Note: the basis /shipped/basis is not the one the run used" in report  # sha256 recorded differs


def test_completion_generations_and_repeats(completion_results, capsys):
    explain_cfv(completion_results, MODEL, "analogy_completion_kmiecik", top=0)
    report = capsys.readouterr().out
    assert "- **top_answer**: cfv won 1, lost 1, unchanged 1" in report
    assert "- **answers repeating A, B or C**: unpatched 1, cfv 0 (of 3)" in report
    assert '| generation | `" up"` ✘ | `" down"` ✔ |' in report
    assert "| repeats A, B or C | yes | no |" in report
    assert f"Q: hot\nA: cold\n\nQ: up\nA:{MARKER}\n" in report  # the last prompt token
    assert "CFV posterior" not in report  # --top 0: no model loaded


def test_output_file_and_cli(choice_results, tmp_path, capsys):
    out = tmp_path / "reports" / "u2.md"
    assert main(["explain-cfv", str(choice_results), "--model", MODEL, "--task", "u2_analogy", "--top", "0",
                 "--only", "won", "--metric", "acc_d", "--output", str(out)]) == 0
    text = out.read_text()
    assert "Shown: 2 won question(s) by acc_d" in text and "## Document 1: won (acc_d" in text
    assert capsys.readouterr().out == ""


# -- errors ----------------------------------------------------------------------------------------

def test_missing_condition_names_the_command(tmp_path, capsys):
    write_run(tmp_path, "unpatched", "u2_analogy", choice_samples("unpatched"))
    assert main(["explain-cfv", str(tmp_path), "--model", MODEL, "--task", "u2_analogy", "--top", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no cfv or auto results of smollm2-135m / u2_analogy (conditions there: unpatched)" in err
    assert f"ffv leaderboard {tmp_path} --run smollm2-135m --tasks u2_analogy --conditions unpatched cfv --limit 4" in err


def test_missing_task_model_and_samples(choice_results):
    with pytest.raises(EvidenceError, match=r"no results of task sat_analogy for smollm2-135m \(its tasks there: u2_analogy\)"):
        find_runs(choice_results, MODEL, "sat_analogy")
    with pytest.raises(EvidenceError, match=r"no results of model gemma-3-270m \(models there: smollm2-135m\)"):
        find_runs(choice_results, "gemma-3-270m", "u2_analogy")
    (choice_results / MODEL / f"samples_u2_analogy_{DATES['cfv']}.jsonl").unlink()
    with pytest.raises(EvidenceError, match=r"no samples file for task u2_analogy \(samples_u2_analogy_2026-11-27T04-00-00.000000"
                                            r".jsonl.*--conditions unpatched cfv --limit 4"):
        find_runs(choice_results, MODEL, "u2_analogy")


def test_samples_scored_differently_are_refused(tmp_path):
    samples = choice_samples("cfv")
    samples[0]["acc"] = 1.0  # the log-likelihoods pick choice 2
    write_run(tmp_path, "unpatched", "u2_analogy", choice_samples("unpatched"))
    write_run(tmp_path, "cfv", "u2_analogy", samples)
    with pytest.raises(EvidenceError, match=r"line 1: field 'acc' is 1, but its log-likelihoods pick choice 2"):
        pair_questions(*find_runs(tmp_path, MODEL, "u2_analogy"))


def test_auto_run_is_read_when_there_is_no_cfv_run(tmp_path):
    """vector=auto gives each analogy question its CFV; the results record it per task."""
    write_run(tmp_path, "unpatched", "u2_analogy", choice_samples("unpatched"))
    used = {"kind": "cfv", "path": BASIS, "sha256": "0" * 64, "relation": None, "layer": 4}
    write_run(tmp_path, "auto", "u2_analogy", choice_samples("cfv"),
              vector={"kind": "auto", "relation": None, "path": "per task", "per_task": {"u2_analogy": used}})
    base, patched = find_runs(tmp_path, MODEL, "u2_analogy")
    assert patched.condition == "auto" and patched.vector.path == BASIS
    with pytest.raises(EvidenceError, match=r"no cfv results of smollm2-135m / u2_analogy \(conditions there: unpatched, auto\)"):
        find_runs(tmp_path, MODEL, "u2_analogy", condition="cfv")


# -- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_posteriors_of_smollm2_with_its_shipped_basis(choice_results):
    """Two documents, the real smollm2-135m and its shipped basis and map: the top 5 basis
    relations of each CFV, by posterior."""
    from ffv_eval import VECTORS_DIR

    basis = VECTORS_DIR / MODEL / "basis"
    if not (basis / "composite.json").exists():
        pytest.skip(f"no shipped basis at {basis}")
    names = json.loads((basis / "composite.json").read_text())["basis"]
    from ffv_eval.evaluation.cfv_posteriors import explain_cfv_with_model

    report = explain_cfv_with_model(choice_results, MODEL, "u2_analogy", limit=2, basis_dir=basis, print_=lambda *a, **k: None)
    tables = [block.split("|---|---:|---:|\n")[1].split("\n\n")[0].splitlines()
              for block in report.split("| basis relation | posterior | weight |\n")[1:]]
    assert [len(rows) for rows in tables] == [5, 5]  # 2 documents x top 5
    for doc_rows in tables:
        posteriors = [float(r.split("|")[2]) for r in doc_rows]
        assert posteriors == sorted(posteriors, reverse=True) and 0 < sum(posteriors) <= 1.0001
        assert all(r.split("|")[1].strip() in names for r in doc_rows)
    assert "Note: the basis" in report  # the run recorded another basis hash (this test's made-up one)
