"""vector=<kind>:* in ffv-patched: one lm-eval run patches each relation task with its own vector,
and scores exactly as one run per task with that vector."""

import hashlib
from pathlib import Path

import pytest


@pytest.mark.slow
def test_per_task_vectors_equal_one_run_per_vector():
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ffv_eval import TASKS_DIR
    from ffv_eval.harness.model import FFVPatchedLM, VectorTaskMismatch
    from ffv_eval.vectors.store import VectorNameError

    tasks = ["relation_antonym", "relation_english-french"]
    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="ffv:*", batch_size=8)
    project_tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # not lm-eval's ~10k task files

    def run(task_list):
        out = lm_eval.simple_evaluate(model=lm, tasks=task_list, limit=6, log_samples=True, random_seed=0, task_manager=project_tasks,
                                      numpy_random_seed=0, torch_random_seed=0)
        return out, {t: [s["filtered_resps"] for s in out["samples"][t]] for t in task_list}

    together, generations = run(tasks)
    used = together["config"]["ffv_vector"]["per_task"]
    assert set(used) == set(tasks) and used["relation_antonym"]["path"].endswith("ffv/antonym.safetensors")
    for task in tasks:  # the file each task was patched with, by content (what leaderboard --run compares)
        assert used[task]["sha256"] == hashlib.sha256(Path(used[task]["path"]).read_bytes()).hexdigest()
    for task in tasks:
        lm.set_vector(f"ffv:{task.removeprefix('relation_')}")
        alone, alone_generations = run([task])
        assert alone_generations[task] == generations[task]
        assert alone["results"][task]["exact_match,none"] == together["results"][task]["exact_match,none"]
    lm.set_vector(None)
    lm.per_task_kind = "ffv"
    with pytest.raises(VectorTaskMismatch, match="u2_analogy is not one"):
        lm._per_task([type("R", (), {"task_name": "u2_analogy"})()], lambda group: group)
    with pytest.raises(VectorNameError, match="unknown kind 'nope'"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector="nope:*")
