"""The main job: score a model on the relation tasks zero-shot, with each relation's vector
patched in, and with k-shot prompting, all through lm-eval, and print the comparison."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ffv_eval import TASKS_DIR
from ffv_eval.relations import HEADLINE_RELATIONS, load_relation


def _score(lm, task_manager, task: str, num_fewshot: int, limit: int | None) -> dict:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    metrics = out["results"][task]
    return {"exact_match": metrics["exact_match,none"], "stderr": metrics["exact_match_stderr,none"]}


def compare_conditions(model: str = "gemma-3-270m", relations=None, limit=None, batch_size=16, num_fewshot=10,
                       data_dir=None, output=None) -> dict:
    from lm_eval.tasks import TaskManager

    from ffv_eval.lm_model import FFVPatchedLM

    relations = list(relations or HEADLINE_RELATIONS)
    for name in relations:  # bad names and data files fail before the model loads
        load_relation(name, data_dir)
    task_manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": data_dir} if data_dir else None)
    lm = FFVPatchedLM(pretrained=model, batch_size=batch_size)
    rows = {}
    for name in relations:
        task, t = f"relation_{name}", time.perf_counter()
        lm.set_vector(None)
        zero = _score(lm, task_manager, task, 0, limit)
        lm.set_vector(name)
        vector_info = {"path": str(lm.stored_vector.path), "kind": lm.stored_vector.metadata["kind"], "layer": lm.patch_layer}
        patched = _score(lm, task_manager, task, 0, limit)
        lm.set_vector(None)
        fewshot = _score(lm, task_manager, task, num_fewshot, limit)
        rows[name] = {"zero_shot": zero, "patched": patched, f"{num_fewshot}_shot": fewshot, "vector": vector_info,
                      "seconds": time.perf_counter() - t}
        print(f"[ffv] {task}: zero-shot {zero['exact_match']:.3f}, patched {patched['exact_match']:.3f}, "
              f"{num_fewshot}-shot {fewshot['exact_match']:.3f}", flush=True)
    report = {"model": model, "data": "todd" if data_dir else "project", "limit": limit, "relations": rows}
    print(format_table(report, num_fewshot))
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    return report


def format_table(report: dict, num_fewshot: int = 10) -> str:
    head = f"| relation | zero-shot | patched | {num_fewshot}-shot | vector (layer) |"
    lines = [f"{report['model']} on {report['data']} data (exact match on the first word, ± stderr)", head, "|---|---|---|---|---|"]
    cell = lambda m: f"{m['exact_match']:.3f} ± {m['stderr']:.3f}"
    means = {"zero_shot": 0.0, "patched": 0.0, f"{num_fewshot}_shot": 0.0}
    for name, row in report["relations"].items():
        lines.append(f"| {name} | {cell(row['zero_shot'])} | {cell(row['patched'])} | {cell(row[f'{num_fewshot}_shot'])} | "
                     f"{row['vector']['kind']} ({row['vector']['layer']}) |")
        for k in means:
            means[k] += row[k]["exact_match"] / len(report["relations"])
    lines.append(f"| mean | {means['zero_shot']:.3f} | {means['patched']:.3f} | {means[f'{num_fewshot}_shot']:.3f} | |")
    return "\n".join(lines)
