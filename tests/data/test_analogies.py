"""Analogy data and the lm-eval tasks in tasks/analogies/: loaders on the real public files, every
bad input, the prompts each task builds, completion scoring, and one small run on the real model."""

import json
import re
import threading
import time
from collections import Counter

import pytest
import torch

import ffv_eval
from ffv_eval import TASKS_DIR
from ffv_eval.data import analogies as A

QUESTION_TASKS = [f"{s}_analogy{v}" for v in ("", "_plain") for s in A.QUESTION_SETS]
ALL_TASKS = QUESTION_TASKS + ["ucla_vat", "ucla_vat_plain"] + [f"analogy_completion_{s}" for s in A.COMPLETION_SETS]
SAT_QUESTION = {"stem": ["ostrich", "bird"], "choice": [["lion", "cat"], ["goose", "flock"], ["cub", "bear"]], "answer": 0}
GREEN_PROBLEM = {"a": "hot", "b": "cold", "c": "up", "responses": {"down": 5, "low": 1}}


def _tasks(data_dir):
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's own ~10k task files would take ~10 s per call
    return TaskManager(include_path=str(ffv_eval.TASKS_DIR), include_defaults=False,
                       metadata={"data_dir": str(data_dir)})


@pytest.fixture
def full_data(shared_data, tmp_path):
    """The shared data plus small hand-made SAT and Green files (not public), so every task loads."""
    root = tmp_path / "data"
    (root / A.QUESTIONS_SUBDIR / "sat").mkdir(parents=True)
    (root / A.COMPLETION_SUBDIR).mkdir()
    for name in ("u2", "u4", "bats", "google"):
        (root / A.QUESTIONS_SUBDIR / name).symlink_to(shared_data / A.QUESTIONS_SUBDIR / name)
    for name in ("kmiecik", "semeval"):
        (root / A.COMPLETION_SUBDIR / f"{name}.jsonl").symlink_to(shared_data / A.COMPLETION_SUBDIR / f"{name}.jsonl")
    (root / "ucla_vat").symlink_to(shared_data / "ucla_vat")
    for split in A.QUESTION_SPLITS:
        (root / A.QUESTIONS_SUBDIR / "sat" / f"{split}.jsonl").write_text(json.dumps(SAT_QUESTION) + "\n")
    (root / A.COMPLETION_SUBDIR / "green.jsonl").write_text(json.dumps(GREEN_PROBLEM) + "\n")
    return root


# -- loaders on the real files -------------------------------------------------------------------
@pytest.mark.parametrize("name,total", [("u2", 252), ("u4", 480), ("bats", 1998), ("google", 550)])
def test_analogy_questions_are_read_with_the_published_counts(shared_data, name, total):
    splits = {s: A.load_analogy_questions(name, s, shared_data) for s in A.QUESTION_SPLITS}
    assert sum(map(len, splits.values())) == total and len(splits["valid"]) < len(splits["test"])
    for q in splits["test"]:
        assert len(q["stem"]) == 2 and 0 <= q["answer"] < len(q["choice"]) and all(len(p) == 2 for p in q["choice"])


def test_data_dir_comes_from_the_environment(shared_data, monkeypatch):
    monkeypatch.setenv("FFV_DATA_DIR", str(shared_data))
    assert len(A.load_analogy_questions("u2", "valid")) == 24
    assert len(A.load_ucla_vat()) == 80


def test_ucla_vat_carries_the_relation_down(shared_data):
    problems = A.load_ucla_vat(shared_data)
    assert len(problems) == 80
    assert Counter(p["relation"] for p in problems) == {
        "Synonym": 20, "Opposite": 20, "Function": 20, "Category Members": 20}
    assert problems[0] == {"relation": "Synonym", "a": "easy", "b": "simple", "c": "sad", "d": "unhappy", "d_prime": "happy"}
    assert problems[1]["relation"] == "Synonym" and problems[-1]["relation"] == "Category Members"


@pytest.mark.parametrize("name,total", [("kmiecik", 183), ("semeval", 588)])
def test_analogy_completion_is_read_with_the_published_counts(shared_data, name, total):
    problems = A.load_analogy_completion(name, shared_data)
    assert len(problems) == total
    assert all(p["a"] and p["b"] and p["c"] and sum(p["responses"].values()) > 0 for p in problems)


# -- bad input -----------------------------------------------------------------------------------
def _write_questions(root, name, split, *lines):
    folder = root / A.QUESTIONS_SUBDIR / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))


GOOD = json.dumps(SAT_QUESTION)


@pytest.mark.parametrize("bad,message", [
    ('{"stem": ["a", "b"], "choice": [["c", "d"]', r"u2/test.jsonl: line 2: malformed JSON"),
    ('["a", "b"]', r"line 2: expected a JSON object"),
    (json.dumps({**SAT_QUESTION, "stem": ["a"]}), r"line 2: field 'stem' must be two non-empty strings"),
    (json.dumps({**SAT_QUESTION, "stem": ["a", 3]}), r"line 2: field 'stem' must be two"),
    (json.dumps({**SAT_QUESTION, "choice": [["c", "d"]]}), r"line 2: field 'choice' must be a list of at least two"),
    (json.dumps({**SAT_QUESTION, "choice": [["c", "d"], ["e"]]}), r"line 2: field 'choice' item 1 must be two"),
    (json.dumps({**SAT_QUESTION, "answer": 3}), r"line 2: field 'answer' must be an int index into the 3 choices \(0-2\), got 3"),
    (json.dumps({**SAT_QUESTION, "answer": -1}), r"line 2: field 'answer' must be an int index"),
    (json.dumps({**SAT_QUESTION, "answer": "1"}), r"line 2: field 'answer' must be an int index.*got '1'"),
    (json.dumps({**SAT_QUESTION, "answer": True}), r"line 2: field 'answer' must be an int index"),
    (json.dumps({k: v for k, v in SAT_QUESTION.items() if k != "answer"}), r"line 2: field 'answer'.*got None"),
])
def test_bad_analogy_questions_name_file_line_and_field(tmp_path, bad, message):
    _write_questions(tmp_path, "u2", "test", GOOD, bad)
    with pytest.raises(A.AnalogyDataError, match=message):
        A.load_analogy_questions("u2", "test", tmp_path)
    assert issubclass(A.AnalogyDataError, ValueError)


def test_missing_or_empty_analogy_files_say_where_to_put_them(tmp_path):
    with pytest.raises(A.AnalogyDataError, match=rf"no file {tmp_path}/analogy_questions/sat/valid.jsonl; "
                                                 rf"put sat/valid.jsonl in the analogy_questions format .* into {tmp_path}/analogy_questions/sat/"):
        A.load_analogy_questions("sat", "valid", tmp_path)
    with pytest.raises(A.AnalogyDataError, match=rf"no file {tmp_path}/ucla_vat/UCLA_VAT.csv; put UCLA_VAT.csv"):
        A.load_ucla_vat(tmp_path)
    with pytest.raises(A.AnalogyDataError, match=rf"put green.jsonl in the analogy_completion format .* into {tmp_path}/analogy_completion/"):
        A.load_analogy_completion("green", tmp_path)
    _write_questions(tmp_path, "u4", "test", "", "  ")
    with pytest.raises(A.AnalogyDataError, match=r"u4/test.jsonl: no questions in the file"):
        A.load_analogy_questions("u4", "test", tmp_path)
    with pytest.raises(A.AnalogyDataError, match=r"unknown analogy question set 'sat2' \(known: sat, u2"):
        A.load_analogy_questions("sat2", "test", tmp_path)
    with pytest.raises(A.AnalogyDataError, match=r"unknown analogy question split 'validation'"):
        A.load_analogy_questions("u2", "validation", tmp_path)
    with pytest.raises(A.AnalogyDataError, match=r"unknown analogy completion set 'gren'"):
        A.load_analogy_completion("gren", tmp_path)


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """A Hugging Face cache without the analogy questions, whatever this machine has cached."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_no_data_directory_says_how_to_give_one(monkeypatch, empty_hub_cache):
    real_check = A._hub_reachable
    monkeypatch.setattr(A, "_hub_reachable", lambda timeout=1.0: False)
    with pytest.raises(A.AnalogyDataError, match=r"analogy questions 'u2' \(test\): no data directory given; set FFV_DATA_DIR=<dir> "
                                                 r"or pass lm-eval --metadata '\{\"data_dir\": \"<dir>\"\}' with "
                                                 r"analogy_questions/u2/test.jsonl under <dir> \(the Hugging Face hub dataset "
                                                 rf"relbert/analogy_questions \(revision {A.HUB_REVISION}\) is not reachable"):
        A.load_analogy_questions("u2", "test")
    with pytest.raises(A.AnalogyDataError, match=r"UCLA VAT: no data directory given; set FFV_DATA_DIR.*ucla_vat/UCLA_VAT.csv under <dir>"):
        A.load_ucla_vat()
    with pytest.raises(A.AnalogyDataError, match=r"analogy completion 'kmiecik': no data directory given.*analogy_completion/kmiecik.jsonl"):
        A.load_analogy_completion("kmiecik", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real check: offline mode answers without the network
    assert real_check() is False


@pytest.fixture
def hanging_network(monkeypatch):
    """Every connection hangs (as a name lookup does on a machine whose resolver is
    unreachable) until the test ends."""
    import socket

    release = threading.Event()

    def hang(*_args, **_kwargs):
        release.wait(60)
        raise OSError("network unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", hang)
    yield
    release.set()


@pytest.mark.parametrize("offline_mode", [False, True])
def test_hub_fallback_fails_fast_without_network(monkeypatch, empty_hub_cache, hanging_network, offline_mode):
    """No data directory and no network: loading a question task fails within about a second
    (the connection check's timeout), saying how to give a data directory."""
    from lm_eval.tasks import TaskManager

    if offline_mode:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=str(ffv_eval.TASKS_DIR), include_defaults=False)
    started = time.perf_counter()
    with pytest.raises(A.AnalogyDataError) as err:
        manager.load(["u2_analogy"])
    elapsed = time.perf_counter() - started
    message = str(err.value)
    assert "analogy questions 'u2' (test): no data directory given; set FFV_DATA_DIR=<dir>" in message
    assert '--metadata \'{"data_dir": "<dir>"}\'' in message and "is not reachable" in message
    assert elapsed < A.HUB_CONNECT_TIMEOUT_S + 1.0, f"took {elapsed:.2f} s"


def test_hub_files_come_from_the_pinned_revision(monkeypatch, tmp_path):
    """The hub file is asked for at HUB_REVISION, a full commit sha: first in the local cache
    (no network needed), then, when the hub answers, downloaded."""
    import huggingface_hub

    assert re.fullmatch(r"[0-9a-f]{40}", A.HUB_REVISION)
    questions = tmp_path / "test.jsonl"
    questions.write_text(GOOD + "\n")
    lookups, downloads = [], []

    def cache_lookup(repo_id, filename, **kwargs):
        lookups.append((repo_id, filename, kwargs))
        return str(questions) if cached else None

    def download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename, kwargs))
        return str(questions)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache_lookup)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(A, "_hub_reachable", lambda timeout=1.0: pytest.fail("the cached file needs no network"))
    cached = True
    assert A.load_analogy_questions("u2", "test") == [{**SAT_QUESTION, "prefix": ""}]
    expected = ("relbert/analogy_questions", "dataset/u2/test.jsonl", {"revision": A.HUB_REVISION, "repo_type": "dataset"})
    assert lookups == [expected] and downloads == []
    cached = False
    monkeypatch.setattr(A, "_hub_reachable", lambda timeout=1.0: True)
    assert len(A.load_analogy_questions("u2", "test")) == 1
    assert downloads == [expected]


UCLA_HEADER = "Relation,A,B,C,D,D'"


@pytest.mark.parametrize("lines,message", [
    (["Relation,A,B,C,D", "Synonym,a,b,c,d"], r"UCLA_VAT.csv: line 1: expected the header Relation,A,B,C,D,D'"),
    ([], r"UCLA_VAT.csv: line 1: expected the header.*an empty file"),
    ([UCLA_HEADER, ",easy,simple,sad,unhappy,happy"], r"line 2: field 'Relation' is empty and no earlier row names one"),
    ([UCLA_HEADER, "Synonym,easy,simple,sad,unhappy,happy", ",hurry,rush,harm,injure"], r"line 3: expected 6 columns, got 5"),
    ([UCLA_HEADER, "Synonym,easy,simple,sad,unhappy,happy", ",hurry,rush,harm,,help"], r"line 3: field 'D' is empty"),
    ([UCLA_HEADER, "Synonym,easy,simple,sad,unhappy,"], r"line 2: field 'D'' is empty"),
    ([UCLA_HEADER, ",,,,,"], r"UCLA_VAT.csv: no problems in the file"),
])
def test_bad_ucla_vat_names_file_line_and_field(tmp_path, lines, message):
    (tmp_path / "ucla_vat").mkdir()
    (tmp_path / "ucla_vat" / "UCLA_VAT.csv").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(A.AnalogyDataError, match=message):
        A.load_ucla_vat(tmp_path)


@pytest.mark.parametrize("bad,message", [
    ('{"a": "x", "b": "y", "c": "z", "responses": {"w": 1}', r"kmiecik.jsonl: line 2: malformed JSON"),
    (json.dumps({**GREEN_PROBLEM, "c": ""}), r"line 2: field 'c' must be a non-empty string"),
    (json.dumps({k: v for k, v in GREEN_PROBLEM.items() if k != "b"}), r"line 2: field 'b' must be a non-empty string, got None"),
    (json.dumps({**GREEN_PROBLEM, "responses": {}}), r"line 2: field 'responses' must be a non-empty object"),
    (json.dumps({**GREEN_PROBLEM, "responses": ["down"]}), r"line 2: field 'responses' must be a non-empty object"),
    (json.dumps({**GREEN_PROBLEM, "responses": {"down": 0}}), r"line 2: field 'responses': count of 'down' must be a positive int"),
    (json.dumps({**GREEN_PROBLEM, "responses": {"down": 2.5}}), r"line 2: field 'responses': count of 'down'"),
])
def test_bad_analogy_completion_names_file_line_and_field(tmp_path, bad, message):
    (tmp_path / "analogy_completion").mkdir()
    (tmp_path / "analogy_completion" / "kmiecik.jsonl").write_text(json.dumps(GREEN_PROBLEM) + "\n" + bad + "\n")
    with pytest.raises(A.AnalogyDataError, match=message):
        A.load_analogy_completion("kmiecik", tmp_path)


# -- scoring -------------------------------------------------------------------------------------
def test_responses_are_ranked_without_skips_ties_alphabetical():
    ranked = A.ranked_responses({"skip": 9, "Paint": 2, "brush": 4, "hair": 4, ", paint": 1, "picture books": 3})
    assert ranked == [("brush", 4), ("hair", 4), ("paint", 3), ("picture books", 3)]


@pytest.mark.parametrize("generation,top,share", [
    (" brush", 1.0, 4 / 14), (" Brush, then", 1.0, 4 / 14), (" hair\n", 0.0, 4 / 14), (" brushes", 0.0, 0.0),
    (" picture books and", 0.0, 3 / 14), (" picture", 0.0, 0.0), ("", 0.0, 0.0), (" skip", 0.0, 0.0),
])
def test_completion_scores(generation, top, share):
    answers, counts = zip(*A.ranked_responses({"skip": 9, "brush": 4, "hair": 4, "paint": 3, "picture books": 3}))
    scores = A.completion_scores(generation, list(answers), list(counts))
    assert scores == {"top_answer": top, "human_share": pytest.approx(share), "repeats_abc": 0.0}
    doc = {"answers": list(answers), "counts": list(counts), "a": "artist", "b": "paint", "c": "hairdresser"}
    assert A.process_completion_results(doc, [generation]) == scores
    assert A.completion_scores(" x", [], []) == {"top_answer": 0.0, "human_share": 0.0, "repeats_abc": 0.0}


# -- the lm-eval tasks ---------------------------------------------------------------------------
def test_every_analogy_task_loads_and_builds_its_requests(full_data):
    loaded = _tasks(full_data).load(["analogies"])
    assert sorted(loaded["tasks"]) == sorted(ALL_TASKS)
    assert sorted(loaded["group_map"]["analogies"]) == sorted(ALL_TASKS)
    sizes = {}
    for name, task in loaded["tasks"].items():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        doc = task.instances[0].doc
        sizes[name] = len(task.test_docs())
        if task.OUTPUT_TYPE == "multiple_choice":
            one_shot = name in ("u2_analogy", "u4_analogy", "bats_analogy", "google_analogy", "sat_analogy", "ucla_vat")
            per_choice = 2 if one_shot else 1  # the one-shot template also scores each choice's C part (acc_d)
            assert [i.request_type for i in task.instances] == ["loglikelihood"] * per_choice * len(doc["choices"]), name
        else:
            assert [i.request_type for i in task.instances] == ["generate_until"], name
    assert sizes["u2_analogy"] == sizes["u2_analogy_plain"] == 228 and sizes["bats_analogy"] == 1799
    assert sizes["ucla_vat"] == 80 and sizes["analogy_completion_semeval"] == 588 and sizes["sat_analogy"] == 1
    assert len(loaded["tasks"]["u2_analogy"].validation_docs()) == 24


def _requests(task_manager, name):
    task = task_manager.load([name])["tasks"][name]
    task.build_all_requests(limit=1, rank=0, world_size=1)
    return task.instances[0].doc, [i.args for i in task.instances]


def test_u2_prompts_of_both_templates(shared_data):
    tm = _tasks(shared_data)
    # first U2 test question: lie : prevaricate :: waver : falter (answer 2)
    doc, args = _requests(tm, "u2_analogy")
    assert (doc["a"], doc["b"], doc["answer"]) == ("lie", "prevaricate", 2)
    assert args == [
        ("Q: lie\nA: prevaricate\n\n", "Q: betray\nA: trust"),
        ("Q: lie\nA: prevaricate\n\n", "Q: philander\nA: donate"),
        ("Q: lie\nA: prevaricate\n\n", "Q: waver\nA: falter"),
        ("Q: lie\nA: prevaricate\n\n", "Q: deride\nA: praise"),
        ("Q: lie\nA: prevaricate\n\n", "Q: corroborate\nA: doubt"),
        ("Q: lie\nA: prevaricate\n\n", "Q: betray\nA:"),
        ("Q: lie\nA: prevaricate\n\n", "Q: philander\nA:"),
        ("Q: lie\nA: prevaricate\n\n", "Q: waver\nA:"),
        ("Q: lie\nA: prevaricate\n\n", "Q: deride\nA:"),
        ("Q: lie\nA: prevaricate\n\n", "Q: corroborate\nA:"),
    ]
    _, args = _requests(tm, "u2_analogy_plain")
    assert args == [
        ("lie is to prevaricate as", " betray is to trust"),
        ("lie is to prevaricate as", " philander is to donate"),
        ("lie is to prevaricate as", " waver is to falter"),
        ("lie is to prevaricate as", " deride is to praise"),
        ("lie is to prevaricate as", " corroborate is to doubt"),
    ]
    doc, args = _requests(tm, "ucla_vat")
    assert doc["answer"] == 0 and doc["relation"] == "Synonym"
    assert args == [("Q: easy\nA: simple\n\n", "Q: sad\nA: unhappy"), ("Q: easy\nA: simple\n\n", "Q: sad\nA: happy"),
                    ("Q: easy\nA: simple\n\n", "Q: sad\nA:"), ("Q: easy\nA: simple\n\n", "Q: sad\nA:")]
    _, args = _requests(tm, "ucla_vat_plain")
    assert args == [("easy is to simple as", " sad is to unhappy"), ("easy is to simple as", " sad is to happy")]
    doc, args = _requests(tm, "analogy_completion_kmiecik")
    assert args[0][0] == "Q: assistant\nA: laboratory\n\nQ: receptionist\nA:"
    assert args[0][1]["until"] == ["\n"] and args[0][1]["max_gen_toks"] == 8
    assert doc["answers"][0] == "office" and doc["counts"][0] == 24 and "skip" not in doc["answers"]


def test_sat_task_without_sat_files_says_where_to_put_them(shared_data, tmp_path):
    _write_questions(tmp_path, "u2", "test", GOOD)  # a data directory without sat/
    with pytest.raises(A.AnalogyDataError, match=rf"put sat/test.jsonl in the analogy_questions format .* into {tmp_path}/analogy_questions/sat/"):
        _tasks(tmp_path).load(["sat_analogy"])


# -- the real model, kept small ------------------------------------------------------------------
@pytest.fixture
def one_torch_thread():
    """On this shared 2-core machine two torch threads next to other CPU jobs make each forward
    pass ~7x slower; one thread keeps the run short."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_u2_on_gemma_hf_equals_ffv_patched_and_completion_runs(shared_data, one_torch_thread):
    import string

    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    from ffv_eval.models.loading import resolve_pretrained

    tm = _tasks(shared_data)
    runs = {}
    hf = get_model("hf").create_from_arg_string(f"pretrained={resolve_pretrained('gemma-3-270m')},device=cpu")
    runs["hf"] = lm_eval.simple_evaluate(model=hf, tasks=["u2_analogy"], limit=4, task_manager=tm, bootstrap_iters=0)
    hf_completion = lm_eval.simple_evaluate(model=hf, tasks=["analogy_completion_kmiecik"], limit=2, task_manager=tm,
                                            bootstrap_iters=0)["samples"]["analogy_completion_kmiecik"]
    del hf
    ffv = get_model("ffv-patched").create_from_arg_string("pretrained=gemma-3-270m,device=cpu,vector=none")
    runs["ffv"] = lm_eval.simple_evaluate(model=ffv, tasks=["u2_analogy"], limit=4, task_manager=tm, bootstrap_iters=0)
    hf_res, ffv_res = (runs[k]["results"]["u2_analogy"] for k in ("hf", "ffv"))
    assert hf_res["acc,none"] == ffv_res["acc,none"] and hf_res["acc_norm,none"] == ffv_res["acc_norm,none"]
    lls = {k: [s["filtered_resps"] for s in runs[k]["samples"]["u2_analogy"]] for k in runs}
    assert len(lls["hf"]) == 4
    for a, b in zip(lls["hf"], lls["ffv"]):
        assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)

    out = lm_eval.simple_evaluate(model=ffv, tasks=["analogy_completion_kmiecik"], limit=2, task_manager=tm,
                                  bootstrap_iters=0)
    res = out["results"]["analogy_completion_kmiecik"]
    assert res["sample_len"] == 2
    # the unpatched generations are stock HF's; both metrics recomputed from the raw file, for
    # them and for scripted answers whose scores are known (doc 0's top answer, doc 1's second)
    generations = [s["filtered_resps"][0] for s in sorted(out["samples"]["analogy_completion_kmiecik"], key=lambda s: s["doc_id"])]
    assert generations == [s["filtered_resps"][0] for s in sorted(hf_completion, key=lambda s: s["doc_id"])]
    raw = [json.loads(line) for line in (shared_data / "analogy_completion" / "kmiecik.jsonl").read_text().splitlines()[:2]]
    people = [{answer: n for answer, n in item["responses"].items() if answer != "skip"} for item in raw]

    def expected(answers):
        first = [a.lower().split()[0].strip(string.punctuation) if a.split() else "" for a in answers]
        top = [f == min(p, key=lambda answer: (-p[answer], answer)) for f, p in zip(first, people)]
        share = [p.get(f, 0) / sum(p.values()) for f, p in zip(first, people)]
        return pytest.approx(sum(top) / 2), pytest.approx(sum(share) / 2)

    assert (res["top_answer,none"], res["human_share,none"]) == expected(generations)

    scripted = [" Office, of course", " " + sorted(people[1], key=people[1].get)[-2].capitalize() + "."]

    class Scripted(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [scripted[r.doc_id] for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        loglikelihood_rolling = loglikelihood

    res = lm_eval.simple_evaluate(model=Scripted(), tasks=["analogy_completion_kmiecik"], limit=2, task_manager=tm,
                                  bootstrap_iters=0)["results"]["analogy_completion_kmiecik"]
    assert (res["top_answer,none"], res["human_share,none"]) == expected(scripted) and res["top_answer,none"] == 0.5


# -- the score of D given C ------------------------------------------------------------------------
@pytest.mark.slow
def test_acc_d_scores_d_given_c_and_acc_equals_lm_eval_multiple_choice(gemma, shared_data, tmp_path):
    """acc and acc_norm equal lm-eval's own multiple-choice metrics on a copy of the task that
    scores only the whole continuations; acc_d's per-choice score equals log P(D's tokens |
    prompt through C) computed with a plain forward of the model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ffv_eval.harness.model import FFVPatchedLM

    template = (TASKS_DIR / "analogies" / "_analogy_one_shot_template_yaml").read_text()
    (tmp_path / "utils.py").write_text((TASKS_DIR / "analogies" / "utils.py").read_text()
                                       + "\n\ndef whole_choices(doc):\n    return one_shot_choices(doc)[: len(doc['choices'])]\n")
    text = template.replace("doc_to_choice: !function utils.one_shot_choices", "doc_to_choice: !function utils.whole_choices")
    text = text.replace("process_results: !function utils.process_choice_results\n", "")
    text = text.replace("  - metric: acc_d\n    aggregation: mean\n    higher_is_better: true\n", "")
    (tmp_path / "_whole_yaml").write_text(text)
    (tmp_path / "u2_whole.yaml").write_text("include: _whole_yaml\ntask: u2_whole\ndataset_kwargs:\n  analogy_set: u2\n")
    assert text != template
    tm = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], metadata={"data_dir": str(shared_data)})
    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["u2_analogy", "u2_whole"], limit=12, task_manager=tm, log_samples=True,
                                  bootstrap_iters=0)
    ours = {s["doc_id"]: s for s in out["samples"]["u2_analogy"]}
    theirs = {s["doc_id"]: s for s in out["samples"]["u2_whole"]}
    assert len(ours) == len(theirs) == 12
    for doc_id, s in ours.items():
        assert (s["acc"], s["acc_norm"]) == (theirs[doc_id]["acc"], theirs[doc_id]["acc_norm"]), doc_id
    flips = sum(s["acc_d"] != s["acc"] for s in ours.values())
    # acc_d against a plain forward: log P(D | "Q: a\nA: b\n\nQ: c\nA:") for every choice of one question
    model, tok = gemma
    s = ours[0]
    doc, n = s["doc"], len(s["doc"]["choices"])
    lls = [r[0][0] for r in s["resps"]]
    for k, (c, d) in enumerate(doc["choices"]):
        prompt = tok(f"Q: {doc['a']}\nA: {doc['b']}\n\nQ: {c}\nA:").input_ids
        whole = tok(f"Q: {doc['a']}\nA: {doc['b']}\n\nQ: {c}\nA: {d}").input_ids
        assert whole[: len(prompt)] == prompt
        logits = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        expected = sum(float(logits[i - 1, whole[i]]) for i in range(len(prompt), len(whole)))
        assert lls[k] - lls[n + k] == pytest.approx(expected, abs=2e-3), (k, c, d)
    assert out["results"]["u2_analogy"]["acc_d,none"] == pytest.approx(sum(s["acc_d"] for s in ours.values()) / 12)
    print(f"acc_d differs from acc on {flips} of 12 questions")


def test_repeats_of_a_b_or_c_are_counted_unless_people_gave_them():
    from ffv_eval.data.analogies import completion_scores

    answers, counts = ["bird", "animal"], [5, 2]
    assert completion_scores(" canary", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 1.0
    assert completion_scores(" Cat.", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 1.0
    assert completion_scores(" animal", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 0.0  # someone said it
    assert completion_scores(" bird", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 0.0
    assert completion_scores(" canaries", answers, counts, ("cat", "animal", "canary"))["repeats_abc"] == 0.0
