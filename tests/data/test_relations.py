"""Relation data (ffv_eval.data.relations) and the relation_<name> and todd_<name> lm-eval tasks
that read it: formats, splits and every bad input."""

import json

import pytest

from ffv_eval.data import relations as R


def test_every_project_relation_has_distinct_splits_of_the_required_size():
    names = R.project_relations()
    assert set(R.HEADLINE_RELATIONS) <= set(names) and len(names) >= 20
    for name in names:
        data = R.load_relation(name)
        assert len(data.train) >= 20 and len(data.test) >= 50 and len(data.validation) >= 15, name
        inputs = [p.input for split in ("train", "validation", "test") for p in data.split(split)]
        assert len(inputs) == len(set(inputs)), f"{name}: a pair is in two splits"
        assert R.load_relation(name) == data  # deterministic


def test_no_project_test_pair_has_a_twin_in_its_other_splits():
    """The project's files need no screening: no test pair matches (either order, as lemmas) a
    pair of the same file's train or validation split, so the loader drops nothing."""
    for name in R.project_relations():
        data = R.load_relation(name)
        assert len(data.train) + len(data.validation) + len(data.test) == len(R.read_pairs(R.project_relation_path(name))), name


def test_train_and_validation_pairs_matching_a_test_pair_are_dropped(tmp_path):
    from ffv_eval.data.overlap import PairScreen

    folder = tmp_path / "function_vectors" / "abstractive"
    folder.mkdir(parents=True)
    words = [(f"big{i}", f"large{i}") for i in range(100)]
    # every pair twice: reversed, and as plural twins with a different case
    twins = [*words, *((b, a) for a, b in words), *((f"{a.upper()}s", f"{b}s") for a, b in words)]
    (folder / "synonym.json").write_text(json.dumps([{"input": a, "output": b} for a, b in twins]))
    data = R.load_relation("synonym", tmp_path)
    test = PairScreen((p.input, p.output) for p in data.test)
    shuffled = R.seeded_shuffle(R.read_pairs(folder / "synonym.json"))
    n_train, n_valid, _ = R.split_sizes(len(shuffled))
    expected = [[p for p in part if (p.input, p.output) not in test]
                for part in (shuffled[:n_train], shuffled[n_train:n_train + n_valid])]
    assert [list(data.train), list(data.validation)] == expected  # the test split is as cut, the others screened
    assert len(data.train) < n_train and len(data.validation) < n_valid
    assert not [p for p in (*data.train, *data.validation) if (p.input, p.output) in test]
    (folder / "synonym.json").write_text(json.dumps([{"input": a, "output": b} for a, b in (*words[:45], *((b, a) for a, b in words[:45]))]))
    with pytest.raises(R.RelationDataError, match="training pairs once those matching a test pair .* are dropped; need at least 20"):
        R.load_relation("synonym", tmp_path)


def test_todd_files_are_read_from_the_data_directory(shared_data, monkeypatch):
    data = R.load_relation("antonym", shared_data)
    assert data.source == "todd" and len(data.test) > 500
    monkeypatch.setenv("FFV_DATA_DIR", str(shared_data))
    assert R.load_relation("country-capital").source == "todd"


def _relation_tasks(**metadata):
    from lm_eval.tasks import TaskManager

    from ffv_eval import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata or None)


def _docs(task) -> set[tuple[str, str]]:
    return {(d["input"], d["output"]) for split in (task.training_docs(), task.validation_docs(), task.test_docs())
            for d in split}


def _raw_pairs(path) -> set[tuple[str, str]]:
    """Pairs read straight from a file, first answer of a repeated input (the loader's rule)."""
    text = path.read_text()
    items = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    first: dict[str, str] = {}
    for item in items:
        first.setdefault(item["input"].strip(), item["output"].strip())
    return set(first.items())


def test_relation_tasks_read_the_project_pairs_whatever_the_data_directory_says(shared_data, monkeypatch):
    project = _raw_pairs(R.PAIRS_DIR / "antonym.jsonl")
    todd = _raw_pairs(shared_data / R.TODD_SUBDIR / "antonym.json")
    assert project != todd
    monkeypatch.setenv("FFV_DATA_DIR", str(shared_data))
    loaded = _relation_tasks(data_dir=str(shared_data)).load(["relation_antonym", "todd_antonym"])["tasks"]
    assert _docs(loaded["relation_antonym"]) == project
    kept = R.load_relation("antonym", shared_data)  # less the train/validation twins of test pairs
    assert _docs(loaded["todd_antonym"]) == {(p.input, p.output) for part in (kept.train, kept.validation, kept.test) for p in part} < todd
    # same split rule: 30% (at least 50) test, 10% (at least 15) validation, less the twins of test pairs
    assert len(loaded["todd_antonym"].test_docs()) == len(kept.test) == max(50, round(0.3 * len(todd)))
    assert len(loaded["todd_antonym"].validation_docs()) == len(kept.validation) < max(15, round(0.1 * len(todd)))
    # same prompt and scoring as the relation tasks
    todd_task, project_task = loaded["todd_antonym"], loaded["relation_antonym"]
    for key in ("doc_to_text", "doc_to_target", "generation_kwargs", "target_delimiter", "metric_list"):
        assert todd_task.config[key] == project_task.config[key], key
    assert todd_task.config.process_results is project_task.config.process_results
    assert todd_task.config.metadata["data_source"] == "data_dir" and project_task.config.metadata["data_source"] == "project"


def test_todd_tasks_one_per_file_and_the_todd_group(shared_data):
    from ffv_eval import TASKS_DIR

    files = sorted(p.stem for p in (shared_data / R.TODD_SUBDIR).glob("*.json"))
    assert len(files) == 27
    assert sorted(p.stem for p in (TASKS_DIR / "todd").glob("todd_*.yaml")) == [f"todd_{f}" for f in files]
    loaded = _relation_tasks(data_dir=str(shared_data)).load(["todd"])
    assert sorted(loaded["tasks"]) == [f"todd_{f}" for f in files]
    synonym = loaded["tasks"]["todd_synonym"]
    kept = R.load_relation("synonym", shared_data)
    assert _docs(synonym) == {(p.input, p.output) for part in (kept.train, kept.validation, kept.test) for p in part}
    assert _docs(synonym) < _raw_pairs(shared_data / R.TODD_SUBDIR / "synonym.json")


def test_todd_tasks_say_where_they_looked(tmp_path):
    with pytest.raises(R.RelationDataError, match=r"Todd et al.'s relation 'antonym': no data directory given; "
                                                  r"set FFV_DATA_DIR=<dir> or pass lm-eval --metadata '\{\"data_dir\": \"<dir>\"\}' "
                                                  r"with function_vectors/abstractive/antonym.json under <dir>"):
        _relation_tasks().load(["todd_antonym"])
    with pytest.raises(R.RelationDataError, match=rf"no file {tmp_path}/function_vectors/abstractive/antonym.json "
                                                  rf"in the data directory {tmp_path}"):
        _relation_tasks(data_dir=str(tmp_path)).load(["todd_antonym"])


def test_bad_relation_data_names_the_problem(tmp_path, monkeypatch):
    with pytest.raises(R.RelationDataError, match="unknown relation 'no-such'"):
        R.load_relation("no-such")
    with pytest.raises(R.RelationDataError, match="no file .*function_vectors/abstractive/antonym.json"):
        R.load_relation("antonym", tmp_path)
    folder = tmp_path / "function_vectors" / "abstractive"
    folder.mkdir(parents=True)
    (folder / "antonym.json").write_text('[{"input": "hot", "output": "cold"},\n {"input": "up" "output": "down"}]')
    with pytest.raises(R.RelationDataError, match=r"antonym.json: line 2: malformed JSON"):
        R.load_relation("antonym", tmp_path)
    (folder / "antonym.json").write_text(json.dumps([{"input": "hot", "output": ""}]))
    with pytest.raises(R.RelationDataError, match=r"item 0: field 'output' must be a non-empty string"):
        R.load_relation("antonym", tmp_path)
    (folder / "antonym.json").write_text(json.dumps([{"input": f"w{i}", "output": "x"} for i in range(40)]))
    with pytest.raises(R.RelationDataError, match="40 distinct pairs; need at least 85"):
        R.load_relation("antonym", tmp_path)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    with pytest.raises(R.RelationDataError, match=r"p.jsonl: line 2: field 'output'"):
        R.read_pairs(pairs)
