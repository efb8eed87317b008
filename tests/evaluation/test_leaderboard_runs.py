"""Planning `ffv leaderboard --run` (ffv_eval.evaluation.leaderboard_runs): what cannot run is refused
before running, no model is loaded when there is nothing to compare, task plans expand groups and
know versions and data sources. (Reusing real runs: tests/e2e/test_leaderboard.py.)"""

import pytest

from ffv_eval.evaluation.leaderboard_runs import expand_tasks, plan_runs, plan_tasks, runs_to_do
from ffv_eval.reports.leaderboard_results import PROJECT_DATA, LeaderboardError

MODEL, TASK = "gemma-3-270m", "relation_antonym"


def test_run_plan_refuses_what_cannot_run_before_running():
    with pytest.raises(LeaderboardError, match="sat_analogy"):
        plan_runs([MODEL], ["sat_analogy"], ["ffv"])
    with pytest.raises(LeaderboardError, match="no shipped vector for: .*no-such-model/ffv/antonym.safetensors"):
        plan_runs(["no-such-model"], [TASK], ["unpatched", "ffv"])
    runs = plan_runs([MODEL], expand_tasks(["relations"]), ["unpatched", "fv", "fv:antonym", "cfv"])
    assert len(runs[0].tasks) == 6 and runs[0].vector is None
    # one run patches each relation task with its own FV (vector=fv:*)
    assert runs[1].vector == "fv:*" and runs[1].tasks == runs[0].tasks and set(runs[1].labels) == {"fv"}
    assert runs[2].vector == "fv:antonym" and runs[2].labels[0] == "fv" and runs[2].labels[1] == "fv:antonym"
    assert runs[3].vector == "cfv" and set(runs[3].labels) == {"cfv"}


def test_no_model_is_loaded_when_there_is_nothing_to_compare(tmp_path):
    runs = plan_runs([MODEL], [TASK], ["unpatched"])
    todo = runs_to_do(runs, plan_tasks([TASK]), tmp_path / "none", None,
                      fingerprint_of=lambda model: pytest.fail("loaded a model"), log=lambda line: None)
    assert todo == runs


def test_task_plans_expand_groups_and_know_versions_and_data_sources(shared_data):
    from ffv_eval.data.relations import HEADLINE_RELATIONS, RelationDataError

    plans = plan_tasks(["relations", "todd_antonym", "relation_antonym", "hellaswag"], shared_data)
    assert [p.name for p in plans] == [f"relation_{r}" for r in HEADLINE_RELATIONS] + ["todd_antonym", "hellaswag"]
    assert {(p.version, p.data_source) for p in plans[:6]} == {("1.0", PROJECT_DATA)}
    assert (plans[6].version, plans[6].data_source) == ("1.0", f"data directory {shared_data}")
    assert (plans[7].version, plans[7].data_source) == (None, None)  # not ffv-eval's: never reused
    with pytest.raises(RelationDataError, match="no data directory given"):  # before any model loads
        plan_tasks(["todd"])
